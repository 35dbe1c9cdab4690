"""torchrun on the CPU (gloo): ranks stay bit-identical and perturbation parallelism changes nothing.

Every launch goes through ``torch.distributed.run`` (torchrun) in a subprocess, one thread
per process, as a user would start it; the references run the same way with one process.
"""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from conftest import saved_tiny_model
from safetensors.torch import load_file
from test_cli import adapter_tensors, write_recipe

from zopeft.distributed import ZOComm

HERE = Path(__file__).parent
BIN = Path(sys.executable).parent


def torchrun(nproc: int, *command: str | Path, check: bool = True) -> subprocess.CompletedProcess:
    """Launch ``torchrun --standalone``; on a time-out the whole process group (workers too) is killed."""
    env = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1"}
    args = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", str(nproc),
            *map(str, command)]
    with subprocess.Popen(args, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                          start_new_session=True) as proc:
        try:
            out, err = proc.communicate(timeout=300)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            raise
    done = subprocess.CompletedProcess(args, proc.returncode, out, err)
    if check:
        assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    return done


@pytest.fixture(scope="module")
def worker_runs(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("dist")
    model = saved_tiny_model("llama")
    torchrun(2, HERE / "distributed_worker.py", model, out)
    torchrun(1, HERE / "distributed_worker.py", model, out)
    return out


@pytest.mark.parametrize("name,mode", [("fzoo", "perturbation"), ("mezo", "data"), ("adamezo", "data")])
def test_ranks_identical_and_equal_to_the_single_process_run(worker_runs, name, mode):
    rank0, rank1, single = (load_file(str(worker_runs / f"{name}-rank{r}-world{w}.safetensors"))
                            for r, w in ((0, 2), (1, 2), (0, 1)))
    assert rank0.keys() == rank1.keys() == single.keys()
    assert all(torch.equal(rank0[k], rank1[k]) for k in rank0), "replicas diverged"
    # perturbation parallel: the same points and batch, split over ranks; data parallel: the
    # reference accumulates the two ranks' batches, so both average the same loss vectors
    assert all(torch.equal(rank0[k], single[k]) for k in rank0), "differs from the single-process run"

    stats = json.loads((worker_runs / f"{name}-rank0-world2.json").read_text())
    reference = json.loads((worker_runs / f"{name}-rank0-world1.json").read_text())
    assert stats["forward_passes"] == reference["forward_passes"]  # the job's evaluations, not the rank's
    n = 6 if name == "fzoo" else 2
    assert stats["comm_bytes"] == ZOComm.payload_bytes(n) == (n + 1) * 8
    assert "comm_bytes" not in reference


def test_diverged_replicas_stop_with_a_clear_error(tmp_path):
    torchrun(2, HERE / "distributed_worker.py", saved_tiny_model("llama"), tmp_path, "--diverge")
    errors = sorted(tmp_path.glob("*.error"))
    assert len(errors) == 6  # 3 optimizers x 2 ranks, each stopped at the first check
    assert all("differ between ranks at step 1" in e.read_text() for e in errors)


def test_cli_under_torchrun_matches_single_process_and_resumes(tmp_path):
    """``torchrun --no-python zopeft train``: perturbation-parallel FZOO ends where one process does."""
    zopeft = BIN / "zopeft"
    keys = dict(max_steps=4, save_steps=2, zo__batched=False, lr_scheduler_type="constant")
    for run in ("single", "pair", "resumed"):
        (tmp_path / run).mkdir()
    for run, nproc in (("single", 1), ("pair", 2)):
        recipe = write_recipe(tmp_path / run, output_dir=str(tmp_path / run / "out"), **keys)
        torchrun(nproc, "--no-python", zopeft, "train", recipe)
    single, pair = adapter_tensors(tmp_path / "single" / "out"), adapter_tensors(tmp_path / "pair" / "out")
    assert all(torch.equal(single[k], pair[k]) for k in single)
    log = [json.loads(x) for x in (tmp_path / "pair" / "out" / "trainer_log.jsonl").read_text().splitlines()]
    assert all(r["comm_bytes"] == ZOComm.payload_bytes(4) for r in log if "loss" in r)
    state = json.loads((tmp_path / "pair" / "out" / "checkpoint-2" / "trainer_state.json").read_text())
    assert state["world_size"] == 2

    # resume from the 2-rank checkpoint at step 2, in a new directory, with 2 ranks: same end point
    resumed = write_recipe(tmp_path / "resumed", output_dir=str(tmp_path / "resumed" / "out"),
                           resume_from_checkpoint=str(tmp_path / "pair" / "out" / "checkpoint-2"), **keys)
    done = torchrun(2, "--no-python", zopeft, "train", resumed)
    assert "RESUMING" in done.stdout
    again = adapter_tensors(tmp_path / "resumed" / "out")
    assert all(torch.equal(again[k], pair[k]) for k in pair)
    # ... but not with another world size
    refused = torchrun(1, "--no-python", zopeft, "train", resumed, check=False)
    assert refused.returncode != 0 and "written by 2 process(es)" in refused.stdout + refused.stderr


def test_a_guard_watching_evaluations_rolls_back_every_rank(tmp_path):
    """Only rank 0 evaluates; every rank's guard judges its metrics, so the replicas roll back together."""
    keys = dict(max_steps=6, eval_steps=1, learning_rate=0.1, zo__batched=False, zo__sync_check_steps=1,
                zo__guard={"watch": "eval", "patience": 1, "smoothing": 0.0, "margin": 0.0, "max_rollbacks": 10})
    ends, rollbacks = {}, {}
    for run, nproc in (("single", 1), ("pair", 2)):
        (tmp_path / run).mkdir()
        recipe = write_recipe(tmp_path / run, output_dir=str(tmp_path / run / "out"), **keys)
        torchrun(nproc, "--no-python", BIN / "zopeft", "train", recipe)  # a replica that differs is an error
        log = [json.loads(x) for x in (tmp_path / run / "out" / "trainer_log.jsonl").read_text().splitlines()]
        rollbacks[run] = [r["rollback_to"] for r in log if r.get("guard") == "rollback"]
        ends[run] = adapter_tensors(tmp_path / run / "out")
    assert rollbacks["single"] and rollbacks["pair"] == rollbacks["single"]  # lr 0.1 overshoots: rolled back alike
    assert all(torch.equal(ends["single"][k], ends["pair"][k]) for k in ends["single"])


def test_sigterm_to_torchrun_stops_every_rank_at_one_checkpoint_and_the_resume_is_exact(tmp_path):
    """A scheduler preempting ``torchrun zopeft train``: torchrun passes SIGTERM on to its workers, every rank stops
    after the step rank 0 saw it at, one checkpoint is saved, and two ranks resuming end where an unstopped run does."""
    keys = dict(zo__batched=False, lr_scheduler_type="constant", logging_steps=1)
    for run in ("stopped", "whole"):
        (tmp_path / run).mkdir()
    recipe = write_recipe(tmp_path / "stopped", output_dir=str(tmp_path / "stopped" / "out"), max_steps=500, **keys)
    args = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2", "--no-python",
            str(BIN / "zopeft"), "train", str(recipe)]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1", "PYTHONUNBUFFERED": "1"}
    with subprocess.Popen(args, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                          stdin=subprocess.DEVNULL, start_new_session=True) as proc:
        seen = []
        for text in proc.stdout:
            seen.append(text)
            if text.startswith("step 3/"):
                proc.send_signal(signal.SIGTERM)  # to torchrun alone, as a scheduler signals the job's launcher
                break
        try:
            rest, _ = proc.communicate(timeout=300)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            raise
    output = "".join(seen) + rest
    assert proc.returncode != 0, output
    step = int(re.search(r"stopped by SIGTERM after step (\d+): saved", output)[1])
    assert output.count("stopped by SIGTERM") == 1, output  # rank 0 speaks for the run, with the launcher to resume
    assert f"resume with: torchrun --nproc_per_node 2 ... --no-python zopeft train {recipe} resume_from_checkpoint=auto" \
        in output, output
    out = tmp_path / "stopped" / "out"
    assert json.loads((out / f"checkpoint-{step}" / "trainer_state.json").read_text())["world_size"] == 2
    assert not (out / ".zopeft.lock").exists(), output
    assert not re.search(r'File ".*/(zopeft|cli)/', output), output  # torchrun's own SignalException only

    done = torchrun(2, "--no-python", BIN / "zopeft", "train", recipe, "resume_from_checkpoint=auto",
                    f"max_steps={step + 2}")
    assert done.stdout.count("\ndone: ") == 1 and done.stdout.count("\ntime: ") == 1, done.stdout
    whole = write_recipe(tmp_path / "whole", output_dir=str(tmp_path / "whole" / "out"), max_steps=step + 2, **keys)
    torchrun(2, "--no-python", BIN / "zopeft", "train", whole)
    resumed, unstopped = adapter_tensors(out), adapter_tensors(tmp_path / "whole" / "out")
    assert all(torch.equal(resumed[k], unstopped[k]) for k in unstopped)


def test_data_parallel_ranks_read_disjoint_slices_of_one_stream(tmp_path):
    from zopeft.recipe import load_recipe
    from zopeft.components import batch_indices

    recipe = load_recipe(write_recipe(tmp_path, per_device_train_batch_size=3, gradient_accumulation_steps=2))
    for step in range(3):
        for micro in range(2):
            shards = [batch_indices(recipe, step, micro, 64, r, 2) for r in range(2)]
            assert not set(shards[0]) & set(shards[1])
    # one rank of two reads what the single process reads at twice the steps
    assert batch_indices(recipe, 1, 0, 64, 0, 2) == batch_indices(recipe, 2, 0, 64)


def test_cli_data_parallel_mezo_doubles_the_batch(tmp_path):
    """Two ranks on disjoint slices = one process accumulating the same two micro-batches a step."""
    recipe = write_recipe(tmp_path, max_steps=2, zo__optimizer="mezo", zo__parallel="data")
    torchrun(2, "--no-python", BIN / "zopeft", "train", recipe)
    log = [json.loads(x) for x in (tmp_path / "out" / "trainer_log.jsonl").read_text().splitlines()]
    assert [r["forward_passes"] for r in log if "loss" in r] == [4, 8]  # 2 ranks x 2 points per step
    (tmp_path / "single").mkdir()
    single = write_recipe(tmp_path / "single", max_steps=2, zo__optimizer="mezo", zo__parallel="data",
                          gradient_accumulation_steps=2, output_dir=str(tmp_path / "single" / "out"))
    torchrun(1, "--no-python", BIN / "zopeft", "train", single)
    pair, one = adapter_tensors(tmp_path / "out"), adapter_tensors(tmp_path / "single" / "out")
    assert all(torch.equal(pair[k], one[k]) for k in one)


@pytest.mark.parametrize(("world", "code", "status", "stderr"),
                         [("2", "3", 3, ""), ("2", "'no such recipe'", 1, "no such recipe"), ("1", "3", 0, "returned")])
def test_exit_worker_ends_a_torchrun_worker_with_its_status_and_output(world, code, status, stderr):
    """A worker of a multi-process job exits at once with SystemExit's status, output flushed; one process returns."""
    script = ("import sys; from zopeft.distributed import exit_worker; print('written', end='')\n"
              f"exit_worker({code}); print('returned', file=sys.stderr)")
    done = subprocess.run([sys.executable, "-c", script], env={**os.environ, "WORLD_SIZE": world},
                          capture_output=True, text=True, timeout=120)
    assert (done.returncode, done.stdout) == (status, "written") and stderr in done.stderr
