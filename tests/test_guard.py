"""The loss-spike guard (zopeft.Guard): rollback, backoff, stop, state, replay."""

from __future__ import annotations

import gc
import tempfile
from pathlib import Path

import pytest
import torch

import zopeft
from zopeft.guard import GuardStop

TARGET = torch.tensor([1.0, -2.0, 0.5, 3.0, -1.0, 0.25])


def run(steps: int, *, spike=range(0), guard: dict | None = None, name: str = "mezo", seed: int = 0,
        state_at: int | None = None):
    """MeZO/AdaMeZO on a quadratic whose loss jumps by 100 during the ``spike`` steps."""
    w = torch.nn.Parameter(torch.zeros(6))
    kw = {"mezo": dict(lr=0.02), "adamezo": dict(lr=2e-4, window=3)}[name]
    opt = zopeft.get_optimizer(name, [w], seed=seed, **kw)
    g = zopeft.Guard(opt, **guard) if guard is not None else None
    saved = None
    for _ in range(steps):
        jump = 100.0 if opt.step_index in spike else 0.0
        closure = lambda: ((w - TARGET) ** 2).sum() + jump  # noqa: E731
        g.step(closure) if g else opt.step(closure)
        if state_at is not None and opt.step_index == state_at:
            saved = (w.detach().clone(), opt.state_dict(), g.state_dict())
    return w, opt, g, saved


def test_a_spike_triggers_one_rollback_to_the_best_weights_and_scales_the_lr():
    w, opt, guard, _ = run(30, spike=range(10, 16), guard={})
    (event,) = guard.events
    assert event["step"] == 14 and event["rollback_to"] == 9  # 5 observations above best + 50%
    assert event["new_lr"] == [event["old_lr"][0] * 0.5]
    rollback = next(i for i, r in enumerate(opt.step_log) if "rollback_to" in r)
    assert opt.step_log[rollback + 1]["lr"] == [0.01]  # the next step runs at half the learning rate
    # the weights right after the rollback were the best copy, bit for bit: replaying up to it shows it
    w_best, opt_best, _, _ = run(10)
    fresh = torch.nn.Parameter(torch.zeros(6))
    replayer = zopeft.MeZO([fresh], lr=0.02)
    replayer.replay(opt.step_log[: rollback + 1])
    assert torch.equal(fresh.detach(), w_best.detach())


def test_without_a_spike_the_guard_changes_nothing():
    plain, _, _, _ = run(40)
    guarded, _, guard, _ = run(40, guard={})
    assert guard.rollbacks == 0 and torch.equal(plain.detach(), guarded.detach())


def test_rollbacks_without_progress_stop_cleanly_with_the_best_weights():
    with pytest.raises(GuardStop, match="rolled back 2 times without a new best"):
        run(100, spike=range(10, 100), guard={"max_rollbacks": 2})


@pytest.mark.parametrize("max_copy_bytes", [1 << 30, 0], ids=["copy", "replay"])
@pytest.mark.parametrize("name", ["mezo", "adamezo"])
def test_state_round_trip_continues_bit_identically(name, max_copy_bytes):
    """Resumed between the best step (9) and the rollback (14): the rollback lands on the same weights."""
    full, _, guard, saved = run(40, spike=range(10, 16), guard={"max_copy_bytes": max_copy_bytes}, name=name, state_at=12)
    assert guard.rollbacks == 1
    weights, opt_state, guard_state = saved
    w = torch.nn.Parameter(weights.clone())
    kw = {"mezo": dict(lr=0.02), "adamezo": dict(lr=2e-4, window=3)}[name]
    opt = zopeft.get_optimizer(name, [w], seed=99, **kw)
    opt.load_state_dict(opt_state)
    g = zopeft.Guard(opt, max_copy_bytes=max_copy_bytes)
    g.load_state_dict(guard_state)
    for _ in range(40 - 12):
        jump = 100.0 if opt.step_index in range(10, 16) else 0.0
        g.step(lambda: ((w - TARGET) ** 2).sum() + jump)
    assert g.rollbacks == 1 and torch.equal(w.detach(), full.detach())


@pytest.mark.parametrize("max_copy_bytes", [1 << 30, 0])
def test_replay_repeats_the_rollbacks_and_the_copy_can_live_on_disk(max_copy_bytes):
    copies = lambda: set(Path(tempfile.gettempdir()).glob("zopeft-guard-*/origin.safetensors"))  # noqa: E731
    before = copies()
    w, opt, guard, _ = run(40, spike=range(10, 16), guard={"max_copy_bytes": max_copy_bytes}, name="adamezo")
    on_disk = copies() - before
    assert len(on_disk) == (0 if max_copy_bytes else 1)
    assert guard.rollbacks == 1 and guard.in_memory == bool(max_copy_bytes)
    fresh = torch.nn.Parameter(torch.zeros(6))
    replayer = zopeft.AdaMeZO([fresh], lr=2e-4, window=3)
    replayer.replay(opt.step_log)
    assert torch.equal(fresh.detach(), w.detach())
    memory, _, _, _ = run(40, spike=range(10, 16), guard={}, name="adamezo")
    assert torch.equal(memory.detach(), w.detach())  # the disk copy + replay rebuilds the same best state
    del guard, opt
    gc.collect()
    assert not any(path.exists() for path in on_disk)  # the disk copy lives as long as the guard


def test_watching_evaluations_rolls_back_to_the_best_evaluated_weights():
    w = torch.nn.Parameter(torch.zeros(6))
    opt = zopeft.MeZO([w], lr=0.02)
    guard = zopeft.Guard(opt, watch="eval", patience=2, smoothing=0.0, margin=0.1)
    accuracy = iter([0.5, 0.8, 0.6, 0.55, 0.9])
    snapshots = {}
    for step in range(5):
        guard.step(lambda: ((w - TARGET) ** 2).sum())  # the loss is not watched
        snapshots[step] = w.detach().clone()
        guard.observe_eval(next(accuracy))
        if step == 3:
            break
    (event,) = guard.events
    assert event["rollback_to"] == 1 and torch.equal(w.detach(), snapshots[1])


def test_watching_evaluations_has_its_own_defaults():
    """One evaluation 5% below the best is acted on; the loss defaults (50% for 5 steps) would never see a collapse."""
    w = torch.nn.Parameter(torch.zeros(6))
    guard = zopeft.Guard(zopeft.MeZO([w], lr=0.02), watch="eval")
    assert (guard.smoothing, guard.margin, guard.patience) == (0.0, 0.05, 1)
    guard.observe_eval(0.80)
    guard.observe_eval(0.77)  # within 5%: kept
    assert guard.rollbacks == 0
    guard.observe_eval(0.50)  # predictions collapsed to chance
    assert guard.rollbacks == 1
    assert zopeft.Guard(zopeft.MeZO([w], lr=0.02), watch="eval", patience=3).patience == 3


def test_evaluation_metrics_are_judged_by_accuracy_else_by_loss():
    """observe_metrics: the accuracy (higher is better; the HF Trainer's eval_ prefix), else the loss (lower is)."""
    w = torch.nn.Parameter(torch.zeros(6))
    guard = zopeft.Guard(zopeft.MeZO([w], lr=0.02), watch="eval", smoothing=0.0)
    guard.observe_metrics({"eval_accuracy": 0.7, "eval_loss": 9.0}, prefix="eval_")
    assert guard.best == -0.7
    guard.observe_metrics({"loss": 0.4})  # no accuracy: the loss
    assert guard.best == -0.7  # a value of 0.4 is worse than -0.7
    guard.observe_metrics({"accuracy": 0.8})
    assert guard.best == pytest.approx(-0.8)
    fresh = zopeft.Guard(zopeft.MeZO([w], lr=0.02), watch="eval", smoothing=0.0)
    fresh.observe_metrics({"perplexity": 3.0, "loss": 1.1})
    assert fresh.best == 1.1
    watching_loss = zopeft.Guard(zopeft.MeZO([w], lr=0.02))
    watching_loss.observe_metrics({"accuracy": 0.1})
    assert watching_loss.best == float("inf")  # watch="loss": evaluations are ignored


def test_guard_settings_are_validated():
    opt = zopeft.MeZO([torch.nn.Parameter(torch.zeros(2))])
    with pytest.raises(ValueError, match="backoff"):
        zopeft.Guard(opt, backoff=1.5)
    with pytest.raises(ValueError, match="watch"):
        zopeft.Guard(opt, watch="accuracy")


def test_cli_guard_rolls_back_a_diverging_run_stops_it_and_replay_repeats_it(tmp_path):
    import json

    from safetensors.torch import load_file
    from test_cli import invoke, write_recipe

    recipe = write_recipe(tmp_path, finetuning_type="full", learning_rate=0.5, max_steps=30, logging_steps=1,
                          zo={"optimizer": "mezo", "eps": 1e-2, "guard": {"watch": "loss", "patience": 2,
                                                                          "max_rollbacks": 2}})
    result = invoke("train", str(recipe))
    assert result.exit_code == 0, result.output
    assert "guard: rolled back to the weights after" in result.output and "stopping with the best" in result.output
    out = tmp_path / "out"
    log = [json.loads(line) for line in (out / "trainer_log.jsonl").read_text().splitlines()]
    assert [r["guard"] for r in log if "guard" in r] == ["rollback", "rollback", "stop"]
    rollbacks = [json.loads(line) for line in (out / "zo_steps.jsonl").read_text().splitlines() if "rollback_to" in line]
    assert len(rollbacks) == 2 and rollbacks[1]["lr_scale"] == [0.25]
    replayed = invoke("replay", str(out), "--out", str(tmp_path / "replayed"))
    assert replayed.exit_code == 0, replayed.output
    a, b = load_file(str(out / "model.safetensors")), load_file(str(tmp_path / "replayed" / "model.safetensors"))
    assert a.keys() == b.keys() and all(__import__("torch").equal(a[k], b[k]) for k in a)


def test_cli_rollbacks_judged_on_evaluations_reach_the_step_log(tmp_path, monkeypatch):
    """watch: eval judges the start too and rolls back after an evaluation; zo_steps.jsonl holds the rollbacks, so
    replay rebuilds the run."""
    import json

    from test_cli import invoke, write_recipe

    scores = iter([0.9, 0.5, 0.4, 0.3])  # the evaluations at the start and after steps 2, 4, 6: each worse than the start
    monkeypatch.setattr(zopeft.Guard, "observe_metrics", lambda self, metrics, **kw: self.observe_eval(next(scores)))
    recipe = write_recipe(tmp_path, max_steps=8, eval_steps=2, zo={
        "optimizer": "mezo", "guard": {"watch": "eval", "patience": 1, "smoothing": 0.0, "margin": 0.0, "max_rollbacks": 5}})
    result = invoke("train", str(recipe))
    assert result.exit_code == 0, result.output
    out = tmp_path / "out"
    records = [json.loads(line) for line in (out / "zo_steps.jsonl").read_text().splitlines()]
    assert [r["rollback_to"] for r in records if "rollback_to" in r] == [-1, -1, -1]  # back to the start, each time
    assert [r["step"] for r in records if "losses" in r] == list(range(8))
    replayed = invoke("replay", str(out), "--out", str(tmp_path / "replayed"))
    assert replayed.exit_code == 0, replayed.output
    assert "bit-identical to" in replayed.output


def test_a_recipe_whose_guard_cannot_watch_its_evaluations_is_refused_or_noted():
    from zopeft.recipe import RecipeError, load_recipe
    from zopeft.resolved import resolve_run, run_lines
    from zopeft.splits import DataSplits

    base = ["model_name_or_path=m", "dataset=sst2", "zo.guard.watch=eval", "max_steps=80"]
    with pytest.raises(RecipeError, match="zo.guard.watch: eval: the guard judges the evaluations every eval_steps, but eval_steps "
                                          "is null"):
        load_recipe(None, [*base, "eval_steps="], check_files=False)
    def run_notes(*overrides: str) -> list[str]:  # what validate and train print of the run, settled
        recipe = load_recipe(None, [*base, *overrides], check_files=False)
        data = DataSplits(recipe)
        return [line for line in run_lines(resolve_run(recipe, data), data) if line.startswith("note: zo.guard")]

    few = run_notes("eval_steps=40", "zo.guard.patience=2")  # the start, step 40
    assert len(few) == 1 and "rolls back after 2 in a row above its best, and this run makes 2 before its end" in few[0]
    assert run_notes("eval_steps=10", "zo.guard.patience=2") == []
    assert len(run_notes("zo.guard.patience=5")) == 1  # eval_steps: auto: every 20 of 80 steps (872 records): 4 judged
    assert len(run_notes("eval_steps=100")) == 1  # only the start is judged
    watching = load_recipe(None, [*base, "eval_steps=40"], check_files=False)  # the evaluations' own defaults
    assert (watching.zo.guard.smoothing, watching.zo.guard.margin, watching.zo.guard.patience) == (0.0, 0.05, 1)
    assert watching.notes() == [] and run_notes("eval_steps=40") == []
    kept = load_recipe(None, [*base, "eval_steps=40", "zo.guard.smoothing=0.5"], check_files=False).zo.guard
    assert (kept.smoothing, kept.patience) == (0.5, 1)  # what the recipe sets wins
    assert load_recipe(None, base[:2], check_files=False).zo.guard.patience == 5  # watching the loss
    assert load_recipe(None, [*base[:-1], "zo.guard=false"], check_files=False).notes() == []


def test_with_select_size_the_guard_judges_held_out_training_records_and_the_eval_set_is_only_reported(
        tmp_path, monkeypatch):
    import json

    from test_cli import invoke, write_recipe

    from zopeft.recipe import load_recipe
    from zopeft.splits import DataSplits

    seen = []
    real = zopeft.Guard.observe_metrics
    monkeypatch.setattr(zopeft.Guard, "observe_metrics",
                        lambda self, metrics, **kw: (seen.append(dict(metrics)), real(self, metrics, **kw)))
    recipe = write_recipe(tmp_path, max_steps=4, eval_steps=2, zo={
        "optimizer": "mezo", "guard": {"watch": "eval", "select_size": 12}})
    result = invoke("train", str(recipe))
    assert result.exit_code == 0, result.output
    assert "guard judges sst2 train split, held out by zo.guard.select_size 12 with seed 42 (12 records)" in result.output
    log = [json.loads(line) for line in (tmp_path / "out" / "trainer_log.jsonl").read_text().splitlines()]
    judged = [r for r in log if "select_loss" in r]
    reported = [r for r in log if "eval_loss" in r]
    # the guard judges the start and step 2; the best model also the end (4), on the same held-out records
    assert [r["step"] for r in judged] == [0, 2, 4] and [r["step"] for r in reported] == [0, 2, 4]
    assert [m["loss"] for m in seen] == [r["select_loss"] for r in judged[:2]]  # the guard saw the held-out records
    assert all(m["loss"] != r["eval_loss"] for m, r in zip(seen, reported))
    data = DataSplits(load_recipe(recipe))
    assert not {r["sentence"] for r in data.select.records} & {r["sentence"] for r in data.train.records}
    scored = invoke("eval", str(recipe), "--split", "select", "--adapter", str(tmp_path / "out"))
    assert scored.exit_code == 0, scored.output
    report = json.loads((tmp_path / "out" / "eval_select.json").read_text())
    assert report["evaluated_on"] == data.select.description and len(data.select.records) == 12
