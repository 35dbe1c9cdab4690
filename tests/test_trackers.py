"""report_to: TensorBoard and Weights & Biases (offline) receive the loss, lr, zo_* statistics and eval
metrics against forward-pass equivalents."""

from __future__ import annotations

from pathlib import Path

import pytest
from test_cli import invoke, write_recipe
from test_user_errors import one_error_line

from zopeft.trackers import Trackers, scalars


def test_scalar_names():
    record = {"step": 3, "forward_passes": 12, "forward_equivalents": 36, "lr": 0.01, "loss": 2.5, "loss_ema": 2.7,
              "sigma": 0.1, "skipped": "non-finite loss", "eval_accuracy": 0.5, "eval_predicted": {"0": 3, "1": 1},
              "select_accuracy": 0.6, "skipped_steps": 1}  # select_: the records zo.guard.select_size holds out
    assert scalars(record) == {"train/global_step": 3, "train/learning_rate": 0.01, "train/loss": 2.5,
                               "train/loss_ema": 2.7, "train/zo_sigma": 0.1, "eval/accuracy": 0.5,
                               "select/accuracy": 0.6, "train/zo_skipped_steps": 1}


def test_the_x_axis_is_forward_pass_equivalents():
    logged = []
    trackers = Trackers([], Path("."), {})
    trackers.backends = [type("Fake", (), {"log": lambda self, metrics, x: logged.append(x)})()]
    trackers.log({"step": 1, "forward_passes": 1, "forward_equivalents": 3, "loss": 1.0})  # AdamW: + a backward
    trackers.log({"step": 1, "forward_passes": 4, "loss": 1.0})  # a log written before the count existed
    assert logged == [3, 4]


def test_report_to_tensorboard_and_wandb_offline(tmp_path, monkeypatch):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("WANDB_SILENT", "true")
    path = write_recipe(tmp_path, max_steps=2, report_to="tensorboard,wandb")
    assert "report_to:\n- tensorboard\n- wandb" in invoke("validate", path).output
    result = invoke("train", path)
    assert result.exit_code == 0, result.output
    out = tmp_path / "out"

    events = EventAccumulator(str(out / "runs"))
    events.Reload()
    tags = set(events.Tags()["scalars"])
    assert {"train/loss", "train/learning_rate", "train/zo_sigma", "train/zo_skipped_steps", "eval/accuracy"} <= tags
    assert [e.step for e in events.Scalars("train/loss")] == [4, 8]  # forward passes: N+1 = 4 per FZOO step
    assert [e.step for e in events.Scalars("eval/accuracy")] == [0, 8]

    (run_file,) = out.glob("wandb/offline-run-*/run-*.wandb")
    logged = run_file.read_bytes()  # protobuf records: the metric names are stored as plain strings
    for name in (b"forward_equivalents", b"train/loss", b"train/zo_sigma", b"eval/accuracy"):
        assert name in logged


@pytest.mark.parametrize("value,expected", [("tensorbord", "(did you mean 'tensorboard'?)"), ("[wandb, mlflow]", "report_to:")])
def test_unknown_report_to_is_refused(tmp_path, value, expected):
    one_error_line(invoke("validate", write_recipe(tmp_path), f"report_to={value}"), expected)
