"""SIGTERM (a scheduler's preemption) and SIGINT (Ctrl-C) during `zopeft train`: the step in progress ends, a
checkpoint is saved, the lock is released, the exit status is 128 + the signal, and the resume is exact."""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from test_cli import adapter_tensors, invoke, write_recipe

from zopeft.stopping import StopSignals, Stopped

ZOPEFT = str(Path(sys.executable).parent / "zopeft")


def train_until(recipe: Path, line: str, signum: int) -> tuple[int, str]:
    """Start `zopeft train RECIPE`, send ``signum`` once it printed a line starting with ``line``; (status, output)."""
    env = {**os.environ, "PYTHONUNBUFFERED": "1", "OMP_NUM_THREADS": "1"}
    proc = subprocess.Popen([ZOPEFT, "train", str(recipe)], stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            env=env, stdin=subprocess.DEVNULL)
    seen = []
    for text in proc.stdout:
        seen.append(text)
        if text.startswith(line):
            proc.send_signal(signum)
            break
    rest, _ = proc.communicate(timeout=300)
    return proc.returncode, "".join(seen) + rest


@pytest.mark.parametrize("signum", [signal.SIGTERM, signal.SIGINT])
def test_a_signal_mid_run_saves_a_checkpoint_releases_the_lock_and_the_resume_is_exact(tmp_path, signum):
    (tmp_path / "a").mkdir()
    recipe = write_recipe(tmp_path / "a", max_steps=500, logging_steps=1)
    status, output = train_until(recipe, "step 3/", signum)
    assert status == 128 + signum, output
    name = signal.Signals(signum).name
    assert f"{name}: finishing this step, then saving a checkpoint" in output
    step = int(re.search(rf"stopped by {name} after step (\d+): saved \S+/checkpoint-(\d+);", output)[1])
    assert f"resume with: zopeft train {recipe} resume_from_checkpoint=auto" in output
    out = tmp_path / "a" / "out"
    assert (out / f"checkpoint-{step}" / "optimizer.json").exists() and not (out / ".zopeft.lock").exists()
    assert "Traceback" not in output

    resumed = invoke("train", recipe, "resume_from_checkpoint=auto", f"max_steps={step + 2}")
    assert resumed.exit_code == 0 and f"RESUMING from {out / f'checkpoint-{step}'}" in resumed.output, resumed.output
    (tmp_path / "b").mkdir()
    assert invoke("train", write_recipe(tmp_path / "b", max_steps=step + 2, logging_steps=1)).exit_code == 0
    a, b = adapter_tensors(out), adapter_tensors(tmp_path / "b" / "out")
    assert all(torch.equal(a[k], b[k]) for k in b)  # as if it had never stopped


def test_a_signal_before_the_first_step_stops_at_once_and_the_retry_starts_over(tmp_path):
    recipe = write_recipe(tmp_path, max_steps=5, max_eval_samples=400)  # the evaluation at the start takes a while
    status, output = train_until(recipe, "eval on ", signal.SIGTERM)
    assert status == 143, output
    assert "stopped by SIGTERM before the first step: nothing to resume; run the same command again" in output
    assert not (tmp_path / "out" / ".zopeft.lock").exists()
    again = invoke("train", recipe, "max_eval_samples=8")
    assert again.exit_code == 0, again.output


def test_a_second_signal_stops_at_once(tmp_path):
    lines: list[str] = []
    with StopSignals(lines.append) as stops:
        assert not stops.requested()
        stops.step_done(1)  # a step is done: from now on the first signal waits for the end of the step
        os.kill(os.getpid(), signal.SIGTERM)
        assert lines == ["SIGTERM: finishing this step, then saving a checkpoint and stopping (send it again to stop "
                         "at once)"]
        assert stops.requested()
        with pytest.raises(Stopped) as stopped:
            stops.step_done(2)
        assert (stopped.value.step, stopped.value.exit_code) == (2, 143)
        with pytest.raises(Stopped) as again:
            os.kill(os.getpid(), signal.SIGINT)
        assert (again.value.step, again.value.exit_code) == (None, 130)
    assert signal.getsignal(signal.SIGINT) is signal.default_int_handler  # the previous handlers are back
