"""The CPU demo (benchmarks/demo.py): its summary from a training log, and a slow end-to-end smoke run."""

from __future__ import annotations

import json
import logging
import math
import os
import warnings
from pathlib import Path

import pytest
import torch

from benchmarks import common, demo
from zopeft.recipe import load_recipe


def _fake_run(out: Path, accuracies: list[float], n: int = 200) -> None:
    """An output_dir as `zopeft train` leaves it: the resolved recipe and a trainer_log.jsonl."""
    out.mkdir(parents=True)
    (out / "recipe.yaml").write_text(load_recipe(demo.RECIPE, check_files=False).to_yaml())
    lines = []
    for i, acc in enumerate(accuracies):
        lines.append({"step": 40 * i, "forward_passes": 360 * i, "eval_accuracy": acc, "eval_loss": 1.0, "eval_n": n,
                      "eval_accuracy_stderr": math.sqrt(acc * (1 - acc) / (n - 1))})
        lines.append({"step": 40 * i + 5, "forward_passes": 360 * i + 45, "lr": 0.01, "loss": 1.0})
    (out / "trainer_log.jsonl").write_text("".join(json.dumps(r) + "\n" for r in lines[:-1]))


def test_summary_reads_before_and_after_from_the_log_with_standard_errors(tmp_path: Path) -> None:
    _fake_run(tmp_path / "run", [0.54, 0.70, 0.865])
    s = demo.summarize(tmp_path / "run", tmp_path / "run" / "merged", 100.0, 10.0, 120.0)
    assert (s["accuracy_before"], s["accuracy_after"], s["dev_examples"]) == (0.54, 0.865, 200)
    assert s["se_before"] == pytest.approx(math.sqrt(0.54 * 0.46 / 199))  # the logged eval_accuracy_stderr
    assert s["gain_in_standard_errors"] == pytest.approx(0.325 / math.hypot(s["se_before"], s["se_after"]))
    assert s["accuracy_curve"] == [(0, 0.54), (360, 0.70), (720, 0.865)]
    assert s["forward_passes"] == 720 and s["steps"] == 80
    text = demo.report(s)
    assert "54.0% ± 3.5%  ->  86.5% ± 2.4%" in text
    for path in s["outputs"].values():
        assert path in text


def test_idle_cores_is_at_least_one() -> None:
    assert 1 <= demo.idle_cores() <= max(1, os.cpu_count() or 1)


@pytest.fixture
def _restore_process_state():
    """demo.main sets threads, warning filters and logger levels (via benchmarks.common.setup): undo that."""
    threads = torch.get_num_threads()
    levels = {name: logging.getLogger(name).level for name in common.QUIET_LOGGERS}
    with warnings.catch_warnings():
        yield
    torch.set_num_threads(threads)
    for name, level in levels.items():
        logging.getLogger(name).setLevel(level)


@pytest.mark.slow
@pytest.mark.usefixtures("_restore_process_state")
def test_demo_end_to_end_writes_adapter_plot_merged_model_and_json(tmp_path: Path) -> None:
    out, results = tmp_path / "demo", tmp_path / "demo_cpu.json"
    summary = demo.main([
        "--output-dir", str(out), "--results", str(results), "--threads", "1",
        "max_steps=1", "max_eval_samples=4", "eval_steps=null", "logging_steps=1",
    ])
    assert json.loads(results.read_text())["forward_passes"] == summary["forward_passes"] == 9
    for name in ("adapter_model.safetensors", "training_curves.png", "trainer_log.jsonl", "merged/model.safetensors"):
        assert (out / name).is_file(), name
