"""Smoke tests of the benchmark suite: each benchmark at a tiny size, its JSON checked.

The models are tiny random Llamas built from a config (the convergence race uses the real
SmolLM2 tokenizer with a tiny random model of its vocabulary), a couple of steps each.  The
memory and peers benchmarks start one fresh Python process per configuration, so they are
kept to two configurations each.
"""

from __future__ import annotations

import json
import logging
import math
import subprocess
import sys
import warnings
from pathlib import Path

import pytest
import torch

from benchmarks import __main__ as suite
from benchmarks import (
    bench_anatomy, bench_batched, bench_convergence, bench_eps, bench_memory, bench_peers, bench_scaling, bench_startup,
    common,
)


@pytest.fixture(autouse=True)
def _leave_the_process_as_found():
    """The benchmarks set threads, seeds, warning filters and logger levels: undo that for later tests."""
    threads, rng, filters = torch.get_num_threads(), torch.random.get_rng_state(), warnings.filters[:]
    levels = {name: logging.getLogger(name).level for name in common.QUIET_LOGGERS}
    torch.set_num_threads(1)  # as the benchmarks run here (see _args)
    yield
    torch.set_num_threads(threads)
    torch.random.set_rng_state(rng)
    warnings.filters[:] = filters
    for name, level in levels.items():
        logging.getLogger(name).setLevel(level)


def _args(out: Path, *extra: str) -> list[str]:
    """Common options; one thread: the tiny models gain nothing from more, and on a loaded machine
    every op of a multi-threaded tiny forward waits for a descheduled thread."""
    return ["--device", "cpu", "--threads", "1", "--out-dir", str(out), *extra]


def _load(result: dict) -> dict:
    """The JSON file the benchmark wrote, checked for the machine record."""
    data = json.loads(Path(result["json"]).read_text())
    assert data["machine"]["device"] == "cpu"
    assert data["machine"]["torch_threads"] >= 1 and data["machine"]["torch"]
    assert "load_average_at_end" in data["machine"]
    assert data["table"].count("\n") == len(data["results"])  # header + one line per row
    return data


def test_batched(tmp_path: Path) -> None:
    result = bench_batched.main(_args(tmp_path, "--model", "tiny", "--ns", "2", "--quant", "none",
                                      "--labels", "answer", "--repeats", "1", "--generation", "tiny"))
    data = _load(result)
    assert Path(result["json"]).name == "batched_cpu.json"
    (row,) = data["results"]
    assert row["n_perturbations"] == 2 and row["sequential_s"] > 0 and row["batched_s"] > 0
    assert row["max_rel_loss_diff"] < 1e-4  # the batched path computes the same losses
    (generation,) = data["generation"]["results"]  # 9 points x 4 SQuAD prompts, one generate call vs nine
    assert (generation["points"], generation["prompts"], generation["new_tokens"]) == (9, 4, 16)
    assert generation["identical"] == "yes" and len(generation["generations"]) == 4
    assert generation["sequential_s"] > 0 and generation["batched_s"] > 0 and generation["batched_peak_mib"] >= 0


def test_anatomy(tmp_path: Path) -> None:
    result = bench_anatomy.main(_args(tmp_path, "--quick", "--model", "tiny", "--adapters", "lora,full",
                                      "--quant", "none,nf4", "--batch", "2", "--length", "8", "--repeats", "1"))
    data = _load(result)
    assert Path(result["json"]).name == "anatomy_cpu_quick.json"
    rows = {(r["adapter"], r["quant"], r["optimizer"]): r for r in data["results"]}
    assert set(rows) == {(a, q, o) for a, q in [("lora", "none"), ("full", "none"), ("lora", "nf4"), ("lora-all", "none")]
                         for o in ("mezo", "adamezo", "fzoo-sequential", "fzoo-batched")}
    assert rows[("lora-all", "none", "mezo")]["tensors"] == 336 and rows[("lora-all", "none", "mezo")]["model"] == "deep-narrow"
    assert data["skipped"] == [{"adapter": "full", "quant": "nf4", "reason": bench_anatomy.FULL_4BIT}]
    for row in rows.values():
        assert row["ratio"] > 0 and row["forward_s"] > 0 and row["step_s"] > 0
        assert row["evaluations_per_step"] == (9 if row["optimizer"].startswith("fzoo") else 2)
    assert rows[("lora", "nf4", "fzoo-batched")]["path"] == "batched"
    assert rows[("full", "none", "fzoo-batched")]["path"] == "sequential"  # full-parameter: no batched path
    assert rows[("lora", "none", "mezo")]["path"] == "sequential"


def _tiny_config(**extra: object) -> dict:
    return {"model": common.model_path("tiny"), "batch": 2, "length": 8, "steps": 2, "device": "cpu", **extra}


def test_memory(tmp_path: Path) -> None:
    result = bench_memory.main(_args(tmp_path, "--model", "tiny", "--bases", "fp32", "--modes", "mezo",
                                     "--batch", "2", "--length", "8", "--steps", "2"))  # one fresh process
    (row,) = _load(result)["results"]
    assert row["mode"] == "mezo" and row["trainable"] > 0
    assert row["memory_setup_mib"] > 50  # a Python process with torch and a model
    assert row["memory_peak_mib"] > 0 and row["memory_increment_mib"] > -1
    assert row["peak_scope"] in ("since_reset", "process")
    assert len(row["step_seconds"]) == 2 and row["step_s"] > 0
    assert row["vs_inference"] is None  # no inference row to compare with


@pytest.mark.parametrize("mode", ["inference", "fzoo", "fzoo-sequential", "adamw"])
def test_memory_modes(mode: str) -> None:  # in this process: the step code of the other modes
    row = bench_memory.child(_tiny_config(mode=mode))
    assert row["step_s"] > 0 and row["memory_peak_mib"] > 0 and row["parameters"] > row["trainable"] > 0


def test_peers(tmp_path: Path) -> None:
    result = bench_peers.main(_args(tmp_path, "--model", "tiny", "--adapters", "lora", "--impls", "zopeft",
                                    "--batch", "2", "--length", "8", "--steps", "2"))  # one fresh process
    (row,) = _load(result)["results"]
    assert row["implementation"] == "zopeft"
    assert row["step_s"] > 0 and row["forward_s"] > 0 and row["ratio"] > 0 and row["memory_peak_mib"] > 0
    assert row["tensors"] == 8  # LoRA A and B on q/v of two layers
    assert row["exact"] == "yes"  # fp32 master copies: an lr = 0 step leaves every tensor bit-identical


@pytest.mark.parametrize("impl", ["zopeft-inplace", "mezo-pypi", "zopeft"])
def test_peer_implementations(impl: str) -> None:  # in this process
    if impl == "mezo-pypi" and not bench_peers.mezo_installed():
        pytest.skip("the mezo package is not installed")
    row = bench_peers.child(_tiny_config(impl=impl, adapter="full"))
    assert row["step_s"] > 0 and row["tensors"] == 21 and row["trainable"] > 0
    # an lr = 0 step: perturbing fp32 weights in place and back leaves rounding in most tensors; masters leave none
    if impl == "zopeft":
        assert row["tensors_changed"] == 0 and row["exact"] == "yes"
    else:
        assert row["tensors_changed"] >= 10 and row["exact"] == f"no ({row['tensors_changed']}/21)"


def test_mezo_package_noise_check() -> None:
    if not bench_peers.mezo_installed():
        pytest.skip("the mezo package is not installed")
    assert not bench_peers.mezo_noise_check((1000, 101))["update_noise_equals_perturbation_noise"]
    assert bench_peers.mezo_noise_check((1000, 128))["update_noise_equals_perturbation_noise"]
    assert bench_peers.mezo_noise_check((50, 101))["update_noise_equals_perturbation_noise"]  # drawn in one piece


def test_convergence(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    argv = _args(tmp_path, "--quick", "--model", "tiny", "--optimizers", "mezo,fzoo,hizoo,adamw", "--budget", "4",
                 "--eval-every", "2", "--report-size", "8", "--grid", "mezo=1e-4,1e-3", "--tune-budget", "2",
                 "--tune-size", "8")
    result = bench_convergence.main(argv)
    data = _load(result)
    assert Path(data["png"]).stat().st_size > 0
    (tuning,) = data["tuning"]
    assert tuning["optimizer"] == "mezo" and tuning["chosen_lr"] in (1e-4, 1e-3)
    runs = {r["optimizer"]: r for r in data["runs"]}
    # each run spends the budget in whole steps: MeZO 2 evaluations/step, FZOO 9, HiZOO 3, AdamW 3 equivalents
    assert runs["mezo"]["forward_equivalents"] == 4 and runs["mezo"]["steps"] == 2
    assert runs["hizoo"]["forward_equivalents"] == 6 and runs["hizoo"]["steps"] == 2
    assert runs["fzoo"]["forward_equivalents"] == 9 and runs["fzoo"]["steps"] == 1
    assert runs["adamw"]["forward_equivalents"] == 6 and runs["adamw"]["steps"] == 2
    assert runs["adamw"]["skipped_steps"] == 0 and all(0 <= r["skipped_steps"] <= r["steps"] for r in runs.values())
    for run in runs.values():
        xs = [p["forward_equivalents"] for p in run["curve"]]
        assert xs[0] == 0 and xs == sorted(xs) and xs[-1] == run["forward_equivalents"]
        assert all(0 <= p["accuracy"] <= 1 and math.isfinite(p["loss"]) for p in run["curve"])
        # each evaluation's predictions per label, one for each of the report set's 8 reviews
        assert all(set(p["predicted"]) == {"0", "1"} and sum(p["predicted"].values()) == 8
                   for p in run["curve"])
    target = data["tasks"]["sst2"]["target_accuracy"]
    assert target == pytest.approx(data["tasks"]["sst2"]["zero_shot"]["accuracy"] + 0.03)
    assert {c["optimizer"] for c in data["comparison"]} == {"fzoo", "hizoo", "adamw"}

    # --resume reuses every recorded run, and their step-0 evaluation as the zero-shot: nothing is evaluated again
    log = Path(result["json"]).with_suffix(".runs.jsonl")
    lines = log.read_text()
    monkeypatch.setattr(bench_convergence.Race, "evaluate", lambda *a, **k: pytest.fail("evaluated again"))
    again = bench_convergence.main([*argv, "--resume"])
    assert log.read_text() == lines
    assert [r["curve"] for r in again["runs"]] == [r["curve"] for r in data["runs"]]
    zero_shot = _load(again)["tasks"]["sst2"]["zero_shot"]
    assert zero_shot == {k: data["tasks"]["sst2"]["zero_shot"][k] for k in zero_shot} and "accuracy" in zero_shot


def test_convergence_races_objectives(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """--objectives: every optimizer on every objective it can train on, each run labelled and keyed by it; two
    processes' cells in one --out-dir, summarised together by --summary-only."""
    argv = _args(tmp_path, "--quick", "--model", "tiny", "--objectives", "loss,candidate_ce,margin", "--budget", "9",
                 "--eval-every", "9", "--report-size", "8")
    assert {r["optimizer"] for r in bench_convergence.main([*argv, "--optimizers", "adamw"])["runs"]} == {"adamw"}
    result = bench_convergence.main([*argv, "--optimizers", "fzoo", "--resume"])
    assert {r["optimizer"] for r in result["runs"]} == {"fzoo"}  # the last process's JSON: its own cells only
    monkeypatch.setattr(bench_convergence, "Race", lambda *a, **k: pytest.fail("--summary-only loaded a model"))
    result = bench_convergence.main([*argv, "--summary-only"])
    data = _load(result)
    runs = {r["optimizer"] if r.get("objective", "loss") == "loss" else f"{r['optimizer']}:{r['objective']}": r
            for r in data["runs"]}
    assert set(runs) == {"fzoo", "fzoo:candidate_ce", "fzoo:margin", "adamw", "adamw:candidate_ce"}
    assert {row["optimizer"] for row in data["results"]} == set(runs)
    # the same start, seed and batches: the objective alone makes the runs differ
    assert runs["fzoo"]["curve"][0] == runs["fzoo:candidate_ce"]["curve"][0]
    assert runs["fzoo"]["curve"][-1] != runs["fzoo:candidate_ce"]["curve"][-1]
    log = Path(result["json"]).with_suffix(".runs.jsonl")
    keys = [json.loads(line)["key"] for line in log.read_text().splitlines()]
    assert sum('"objective"' in k for k in keys) == 3  # runs on the loss keep the keys recorded before objectives


def test_an_interrupted_convergence_run_continues_bit_for_bit(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Each run is killed once at its second batch (after an evaluation saved its state, the ZO runs' guards'
    too); --resume continues it."""
    argv = ["--quick", "--model", "tiny", "--optimizers", "mezo,fzoo,hizoo,adamw", "--budget", "12", "--eval-every", "2",
            "--report-size", "8", "--guard", "eval"]
    whole = bench_convergence.main(_args(tmp_path / "whole", *argv))
    batch, calls = bench_convergence.Race.batch, []

    def killed_once(self, task, train, seed, step, bs, *rest):  # the 1st, 3rd, ... request of step 1: one per run
        calls.append(step)
        if step == 1 and calls.count(1) % 2:
            raise KeyboardInterrupt
        return batch(self, task, train, seed, step, bs, *rest)

    monkeypatch.setattr(bench_convergence.Race, "batch", killed_once)
    interrupted = _args(tmp_path / "cut", *argv)
    for attempt in range(5):
        try:
            cut = bench_convergence.main([*interrupted, *(["--resume"] if attempt else [])])
            break
        except KeyboardInterrupt:
            assert any((tmp_path / "cut").glob("*.partial/*/run.json"))  # the state it continues from
    assert calls.count(1) == 8 and calls.count(0) == 4  # 4 runs, each cut once and continued, not started over
    def strip(run: dict) -> dict:  # all but the times, as the JSON records them
        run = json.loads(json.dumps(run))
        return {**run, "train_seconds": 0, "seconds_per_step": 0, "load_average": None,
                "curve": [{**p, "train_seconds": 0} for p in run["curve"]]}

    assert [strip(r) for r in cut["runs"]] == [strip(r) for r in whole["runs"]]
    assert not any((tmp_path / "cut").glob("*.partial/*"))  # removed as each run finished


def test_convergence_on_squad_scores_f1_and_charges_generations(tmp_path: Path) -> None:
    """The squad task: F1 ranked (under "accuracy") with exact match beside it, FZOO on F1 charged 2 per generation,
    the tune slice held out of training."""
    argv = _args(tmp_path, "--quick", "--model", "tiny", "--tasks", "squad", "--optimizers", "mezo,fzoo,adamw",
                 "--objectives", "loss,f1,candidate_ce", "--budget", "18", "--eval-every", "18", "--report-size", "3")
    data = _load(bench_convergence.main(argv))
    runs = {r["optimizer"] + (f":{r['objective']}" if r.get("objective", "loss") != "loss" else ""): r
            for r in data["runs"]}
    # candidate_ce is not a squad objective, and AdamW has no gradient of F1
    assert set(runs) == {"mezo", "mezo:f1", "fzoo", "fzoo:f1", "adamw"}
    assert runs["fzoo:f1"]["forward_equivalents"] == 18 and runs["fzoo:f1"]["steps"] == 1  # 9 generations x 2
    assert runs["mezo"]["forward_equivalents"] == 18 and runs["mezo"]["steps"] == 9
    zero_shot = data["tasks"]["squad"]["zero_shot"]
    assert zero_shot["accuracy"] == zero_shot["f1"] and "exact_match" in zero_shot and "generations" not in zero_shot
    for run in runs.values():
        assert all({"f1", "exact_match"} <= p.keys() and p["accuracy"] == p["f1"] for p in run["curve"])
        assert "final_exact_match" in run
    assert {r["metric"] for r in data["results"]} == {"f1"}
    assert len(bench_convergence.Race.training_records("squad")) == 900  # train[900:1000] is the tune slice


def test_convergence_defaults_leave_the_adapter_of_the_best_tune_evaluation(tmp_path: Path,
                                                                           monkeypatch: pytest.MonkeyPatch) -> None:
    """--defaults: candidate_ce, the guard on the tune slice and the best model kept; the run's final accuracy is the
    report accuracy of its best tune-slice evaluation, not its last step's."""
    evaluate, tune_scores = bench_convergence.Race.evaluate, iter([0.5, 0.6, 0.8, 0.7, 0.3])

    def scripted_tune(self, model, task_name, bounds, eval_set="report"):
        metrics = evaluate(self, model, task_name, bounds, eval_set)
        return {**metrics, "accuracy": next(tune_scores)} if eval_set == "tune" else metrics

    monkeypatch.setattr(bench_convergence.Race, "evaluate", scripted_tune)
    argv = _args(tmp_path, "--quick", "--model", "tiny", "--optimizers", "fzoo", "--defaults", "--budget", "36",
                 "--eval-every", "9", "--report-size", "8")
    result = bench_convergence.main(argv)
    (run,) = _load(result)["runs"]
    assert (run["objective"], run["guard"], run["guard_watch"], run["keep_best"]) == ("candidate_ce", True, "eval", True)
    selects = [p["select_accuracy"] for p in run["curve"]]
    assert selects[:3] == [0.5, 0.6, 0.8] and len(selects) == 5
    assert run["kept_step"] == run["curve"][2]["steps"] == 2
    assert run["final_accuracy"] == run["curve"][2]["accuracy"] and run["last_accuracy"] == run["curve"][-1]["accuracy"]
    key = json.loads(Path(result["json"]).with_suffix(".runs.jsonl").read_text().splitlines()[0])["key"]
    assert '"keep_best": true' in key


def test_convergence_tasks_and_defaults() -> None:
    """sst2-2shot scores the bundled SST-2 records with the demo recipe's prompt; tasks carry their batch/target."""
    from zopeft.recipe import load_recipe

    race = bench_convergence.Race
    demo = load_recipe(bench_convergence.RECIPES_DIR / "smollm2_lora_fzoo_sst2_demo.yaml", check_files=False)
    two_shot = race.task("sst2-2shot")
    assert two_shot.template == demo.template and two_shot.words == [" bad", " good"] and two_shot.cutoff_len == 128
    assert race.task("sst2").words == [" negative", " positive"]
    assert race.records("sst2-2shot", "dev", (0, 5)) == race.records("sst2", "dev", (0, 5))

    _, plan = bench_convergence.parse_args([])
    assert plan.tasks == ["sst2-2shot", "rte"] and (plan.budget, plan.eval_every) == (720, 90)
    assert plan.batch_for("sst2-2shot") == 4 and plan.batch_for("rte") == 16 and plan.gain_for("sst2-2shot") == 0.2
    assert all(len(grid) == 4 for grid in plan.grids.values())
    _, plan = bench_convergence.parse_args(["--batch", "8", "--target-gain", "0.1"])
    assert plan.batch_for("rte") == 8 and plan.gain_for("sst2-2shot") == 0.1


def test_scaling(tmp_path: Path) -> None:
    result = bench_scaling.main(_args(tmp_path, "--quick", "--model", "tiny", "--steps", "1"))
    data = _load(result)
    rows = {(r["optimizer"], r["world_size"]): r for r in data["results"]}
    assert set(rows) == {("fzoo", 1), ("fzoo", 2), ("mezo", 1), ("mezo", 2)}
    assert rows["fzoo", 2]["comm_bytes"] == 10 * 8 and rows["mezo", 2]["comm_bytes"] == 3 * 8  # N+2, 2+1 float64
    assert rows["fzoo", 1]["comm_bytes"] == 0 and rows["mezo", 2]["examples_per_step"] == 2 * rows["mezo", 1]["examples_per_step"]
    assert all(r["step_s"] > 0 and r["speedup"] > 0 for r in rows.values())


def test_startup(tmp_path: Path) -> None:
    result = bench_startup.main(_args(tmp_path, "--quick", "--repeats", "1", "--commands", "import,validate"))
    rows = {r["command"]: r for r in _load(result)["results"]}
    assert set(rows) == {"import zopeft", "zopeft validate"}
    assert all(r["heavy_imports"] == "none" and 0 < r["min_s"] <= r["median_s"] for r in rows.values())


def test_eps(tmp_path: Path) -> None:
    result = bench_eps.main(_args(tmp_path, "--quick", "--model", "tiny", "--eps", "1e-4,1e-2", "--directions", "3"))
    rows = {(r["dtype"], r["eps"]): r for r in _load(result)["results"]}
    assert set(rows) == {(d, e) for d in ("fp32", "bf16") for e in (1e-4, 1e-2)}
    assert all(len(r["differences"]) == 3 and r["forward_s"] > 0 for r in rows.values())
    for eps in (1e-4, 1e-2):
        assert rows["fp32", eps]["correlation"] == pytest.approx(1.0) and rows["fp32", eps]["verdict"] == "ok"
    assert rows["bf16", 1e-4]["noise"] > 10 * rows["fp32", 1e-4]["noise"]  # the same directions, rounded


def test_first_reaching_and_comparison() -> None:
    def run(accuracies: list[float], step: int) -> dict:
        curve = [{"accuracy": a, "forward_equivalents": i * step, "train_seconds": float(i)}
                 for i, a in enumerate(accuracies)]
        return {"curve": curve, "steps": len(accuracies) - 1, "forward_equivalents": curve[-1]["forward_equivalents"],
                "seconds_per_step": 1.0, "final_accuracy": accuracies[-1], "best_accuracy": max(accuracies)}

    mezo = bench_convergence.summarise("sst2", "mezo", 1e-4, [run([0.5, 0.6, 0.7, 0.8], 100)], 0.8)
    fzoo = bench_convergence.summarise("sst2", "fzoo", 1e-3, [run([0.5, 0.8, 0.8, 0.8], 100)], 0.8)
    adamw = bench_convergence.summarise("sst2", "adamw", 1e-4, [run([0.5, 0.6, 0.6, 0.6], 100)], 0.8)
    assert mezo["fwd_to_target"] == (300, 0.0) and fzoo["fwd_to_target"] == (100, 0.0)
    assert adamw["fwd_to_target"] is None and adamw["reached"] == "0/1"
    rows = {c["optimizer"]: c for c in bench_convergence.compare([mezo, fzoo, adamw], budget=300)}
    assert rows["fzoo"]["mezo_over_other"] == pytest.approx(3.0) and rows["fzoo"]["verdict"] == "3.00x fewer"
    assert rows["adamw"]["mezo_over_other"] is None and "did not reach" in rows["adamw"]["verdict"]
    # reached in one seed of two: no mean cost to the target, and the verdict says so
    partial = bench_convergence.summarise("sst2", "fzoo", 1e-3, [run([0.5, 0.8], 100), run([0.5, 0.6], 100)], 0.8)
    assert partial["reached"] == "1/2" and partial["fwd_to_target"] is None
    (row,) = bench_convergence.compare([mezo, partial], budget=300)
    assert row["verdict"] == "more: reached it in 1/2 seeds only (MeZO: 300)"


def test_peak_memory_sees_an_allocation() -> None:
    """In a fresh process, as the memory benchmark measures (a long-lived one may reuse freed pages)."""
    code = (
        "import torch; from benchmarks import common\n"
        "meter = common.PeakMemory(torch.device('cpu')); before = meter.current(); meter.reset()\n"
        "block = torch.ones(64 << 20, dtype=torch.uint8); del block  # 64 MiB, touched\n"
        "print(meter.peak() - before)"
    )
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True,
                          cwd=Path(__file__).resolve().parent.parent)
    assert int(done.stdout.split()[-1]) >= 48 << 20


def test_format_table_marks_missing_values() -> None:
    text = common.format_table([{"a": 1.5, "b": None}, {"a": float("nan"), "b": "x"}], [("A", "a", ".1f"), ("B", "b", "")])
    assert text.splitlines() == [
        "       A         B",
        "     1.5         -",
        "       -         x",
    ]


def test_suite_runs_the_chosen_benchmarks_and_reports_failures(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                                             capsys: pytest.CaptureFixture) -> None:
    calls = []

    def fake_main(name: str):
        def main(argv: list[str]) -> dict:
            calls.append((name, argv))
            if name == "memory":
                raise RuntimeError("boom")
            return {"json": str(tmp_path / f"{name}.json")}

        return main

    monkeypatch.setattr(suite, "benchmark_main", fake_main)
    assert suite.main(_args(tmp_path, "--quick", "--only", "memory,anatomy")) == 1
    assert [name for name, _ in calls] == ["anatomy", "memory"]  # in the suite's order
    assert all("--quick" in argv and "--out-dir" in argv for _, argv in calls)
    summary = json.loads((tmp_path / "suite_cpu_quick.json").read_text())
    assert summary["benchmarks"]["memory"]["error"] == "RuntimeError: boom"
    assert summary["benchmarks"]["anatomy"]["json"].endswith("anatomy.json")
    with pytest.raises(SystemExit) as refused:
        suite.main(_args(tmp_path, "--only", "nonsense"))
    assert refused.value.code == 2 and "--only: unknown benchmark(s) nonsense; choose from" in capsys.readouterr().err
