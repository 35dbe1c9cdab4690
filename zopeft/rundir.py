"""The run directory (``output_dir``): lock, checkpoints, resume checks, logs, final adapter and plot.

What a run leaves there::

    recipe.yaml            the resolved recipe
    trainer_log.jsonl      one JSON line per logged step (loss, loss_ema, lr, ...) and per evaluation (eval_*,
                           eval_predicted), each with forward_passes and forward_equivalents
    zo_steps.jsonl         every ZO step's record (step, lr per param group, losses): `zopeft replay` input
    checkpoint-N/          adapter, optimizer / scheduler / RNG state, trainer_state.json, recipe.yaml
    checkpoint-best/       the adapter of the best evaluation and best.json (zopeft.best_model)
    adapter_model.safetensors, adapter_config.json, tokenizer files: the final adapter (PEFT layout)
    training_curves.png
    runs/, wandb/          report_to's trackers (tensorboard, wandb)
    .zopeft.lock           while a `zopeft train` runs in it (its pid)
    .zopeft-manifest.json  the names zopeft wrote here (:mod:`zopeft.ownership`)

Every file is written atomically (a temporary and a rename); a killed process's temporaries are
removed by the next run.  A file zopeft did not write is never replaced or removed: a run refuses
to start where one has a name it writes, and does not save its optional files (the PEFT model card
README.md, tokenizer files) over one.  Nothing here builds a model: :mod:`zopeft.components` does.
"""

from __future__ import annotations

import contextlib
import fcntl
import filecmp
import fnmatch
import json
import logging
import os
import shutil
from collections.abc import Callable, Iterable, Iterator
from pathlib import Path
from typing import Any

import torch

from .checkpoint import atomic_directory, atomic_files, check_safetensors, load_state, save_state, write_text_atomic
from .jsonl import CRC_KEY, checked_line, dumps
from .ownership import LOCK_NAME, claim, foreign, manifest, remove, remove_stale_temporaries
from .recipe import Recipe, RecipeError, load_recipe
from .trackers import TRACKER_DIRS, tracker_problem

__all__ = [
    "BEST_NAME", "LOG_NAME", "RECIPE_NAME", "STEP_LOG_NAME", "JsonlLog", "RunDir", "checkpoint_problem",
    "checkpoint_recipe", "check_output_target", "load_weights", "read_jsonl",
]

logger = logging.getLogger("zopeft")
LOG_NAME, STEP_LOG_NAME, RECIPE_NAME, STATE_NAME = "trainer_log.jsonl", "zo_steps.jsonl", "recipe.yaml", "trainer_state.json"
PLOT_NAME, WRITTEN_BY, BEST_NAME = "training_curves.png", "zopeft train", "checkpoint-best"
# files that mark a directory as holding a run or an adapter (besides checkpoint-N directories)
RUN_FILES = ("adapter_config.json", "adapter_model.safetensors", LOG_NAME, STEP_LOG_NAME)
# what a run writes and cannot do without (besides checkpoint-N): a file of such a name that zopeft did not write
# stops a run before it starts; a full fine-tune writes the model's files instead of the adapter's
RUN_OUTPUTS = (RECIPE_NAME, PLOT_NAME, BEST_NAME, *RUN_FILES)
FULL_OUTPUTS = ("config.json", "generation_config.json", "model*.safetensors*")
# zo keys that group the perturbed forwards: a change on resume rounds differently (not bit-identical)
REGROUPING_ZO_KEYS = ("batched", "perturbation_batch_size", "max_memory")
STATE_FILES = ("optimizer", "scheduler", "rng")  # save_state names in a checkpoint
# schedules whose learning rate at every step depends on max_steps (and any with warmup_steps a fraction of it)
STRETCHED_SCHEDULES = ("linear", "cosine", "polynomial")

Echo = Callable[[str], None]


def _step_of(path: Path) -> int | None:
    """N of a ``checkpoint-N`` directory, None for any other name."""
    prefix, _, step = path.name.partition("-")
    return int(step) if prefix == "checkpoint" and step.isdigit() and len(step) < 19 and path.is_dir() else None


def _shown(names: list[str]) -> str:
    return ", ".join(names[:4]) + (", …" if len(names) > 4 else "")


def read_jsonl(path: Path) -> list[dict[str, Any]]:
    """The records of a JSON-lines file, without a last line a killed writer left unfinished."""
    records = []
    for line in path.read_text().splitlines() if path.exists() else []:
        with contextlib.suppress(ValueError):
            records.append(json.loads(line))
    return records


class JsonlLog:
    """An append-only JSON-lines log (strict JSON); opening it keeps only the records ``keep`` accepts from ``source``.

    That is how a resumed run drops what the killed run logged after its checkpoint.  A ``checked``
    log ends each line with a checksum chained from the line before (:mod:`zopeft.jsonl`).
    """

    def __init__(
        self, path: Path, keep: Callable[[dict[str, Any]], bool], source: Path | None = None, *, checked: bool = False
    ) -> None:
        self.path, self.checked, self._crc = path, checked, 0
        self.kept = [{k: v for k, v in r.items() if k != CRC_KEY} for r in read_jsonl(source or path) if keep(r)]
        write_text_atomic(path, "".join(map(self._line, self.kept)))

    def write(self, record: dict[str, Any]) -> None:
        with self.path.open("a") as f:
            f.write(self._line(record))

    def _line(self, record: dict[str, Any]) -> str:
        if not self.checked:
            return dumps(record) + "\n"
        line, self._crc = checked_line(record, self._crc)
        return line + "\n"


def checkpoint_problem(checkpoint: Path) -> str | None:
    """What makes a ``checkpoint-N`` directory unusable for resuming (a missing or truncated file), or None."""
    if not checkpoint.is_dir():
        return f"{checkpoint} is not a directory"
    for name in (STATE_NAME, RECIPE_NAME, *(f"{s}.json" for s in STATE_FILES)):
        path = checkpoint / name
        if not path.is_file():
            return f"{path} is missing"
        try:
            if name.endswith(".json"):
                json.loads(path.read_text())
        except ValueError:
            return f"{path} is not valid JSON (truncated?)"
    weights = sorted(checkpoint.glob("*.safetensors"))
    if not any(w.name.startswith(("adapter_model", "model")) for w in weights):
        return f"{checkpoint} holds no weights (adapter_model.safetensors or model*.safetensors)"
    return next((p for p in map(check_safetensors, weights) if p), None)


def _holds_run(directory: Path) -> str | None:
    """The first run file or checkpoint-N directory at any depth under ``directory``, or None."""
    for root, dirs, files in os.walk(directory):
        found = [f for f in files if f in RUN_FILES] + [d for d in dirs if _step_of(Path(root) / d) is not None]
        if found:
            return str(Path(root) / found[0])
    return None


def check_output_target(out: Path, *, overwrite: bool, written_by: str, keep: Iterable[Path] = (),
                        option: str = "--out") -> None:
    """Refuse (:class:`RecipeError`) to write the directory ``out`` unless it is new, empty, or (with
    ``overwrite``) a previous output of the same command (``written_by``, its manifest says).

    Never, flag or not: a file, a directory holding anything else (a run, an adapter or checkpoints
    at any depth, any file that command did not write), one of the ``keep`` paths (e.g. the adapter
    being merged) or the current directory.
    """
    target = out.resolve()
    for path in (*keep, Path.cwd()):
        inside = path.resolve()
        if target == inside or target in inside.parents:
            raise RecipeError([f"{option}: writing {out} would replace {path}; choose another directory"])
    if not target.exists():
        return
    if not target.is_dir():
        raise RecipeError([f"{option}: {out} is a file; choose a directory that does not exist yet"])
    previous = manifest(target)
    ours = previous is not None and previous["written_by"] == written_by and not foreign(target)
    if ours and not overwrite:
        raise RecipeError([f"{option}: {out} holds the output of a previous `{written_by}`; pass --overwrite to "
                           "replace it, or choose another directory"])
    if ours or not any(target.iterdir()):
        return
    run = _holds_run(target)
    if run:
        raise RecipeError([f"{option}: {out} holds a training run or adapter ({run}) and is never replaced; "
                           "choose another directory"])
    if previous is not None and not foreign(target):
        raise RecipeError([f"{option}: {out} holds the output of `{previous['written_by']}`, which `{written_by}` "
                           "never replaces; choose another directory"])
    raise RecipeError([f"{option}: {out} holds files `{written_by}` did not write ({_shown(foreign(target))}), "
                       "which are never replaced, --overwrite or not; choose a new or empty directory"])


class RunDir:
    """One training run's ``output_dir``."""

    def __init__(self, path: str | Path) -> None:
        self.path = Path(path)

    # ----- what is there ---------------------------------------------------------------------
    def owned(self) -> set[str]:
        """The names zopeft wrote here: its manifest's (a run of zopeft 0.2, without one: its run files)."""
        listed = manifest(self.path)
        if listed is not None:
            return set(listed["names"])
        if not (self.path / LOG_NAME).is_file():
            return set()
        return {p.name for p in self.path.iterdir()
                if any(fnmatch.fnmatch(p.name, n) for n in (*RUN_OUTPUTS, *FULL_OUTPUTS)) or _step_of(p) is not None}

    def _claim(self, names: Iterable[str]) -> None:
        """Record ``names`` in the manifest before writing them (a 0.2 run's files are adopted into a new one)."""
        adopted = self.owned() if manifest(self.path) is None else ()
        claim(self.path, [*adopted, *names], WRITTEN_BY)

    def foreign(self) -> list[str]:
        """The entries zopeft did not write (never replaced or removed)."""
        return foreign(self.path, self.owned())

    def checkpoints(self) -> list[Path]:
        """The ``checkpoint-N`` directories zopeft wrote, oldest first."""
        owned = self.owned()
        return sorted((p for p in self.path.glob("checkpoint-*") if _step_of(p) is not None and p.name in owned),
                      key=_step_of)

    def run_files(self) -> list[str]:
        """Names of what a previous run left here (run files and checkpoints)."""
        owned = self.owned()
        best = [BEST_NAME] if BEST_NAME in owned and (self.path / BEST_NAME).is_dir() else []
        return ([n for n in RUN_FILES if n in owned and (self.path / n).exists()] + [p.name for p in self.checkpoints()]
                + best)

    def _trained_nothing(self) -> bool:
        """Whether the run here stopped before leaving anything to continue or rebuild from: no checkpoint, no
        final weights, no step record."""
        weights = [n for n in self.owned() if fnmatch.fnmatch(n, "*model*.safetensors") and (self.path / n).exists()]
        if self.checkpoints() or weights:
            return False
        return not read_jsonl(self.path / STEP_LOG_NAME) and not any("loss" in r for r in read_jsonl(self.path / LOG_NAME))

    def recipe(self) -> Recipe:
        """The recipe the run saved (``recipe.yaml``)."""
        if not (self.path / RECIPE_NAME).is_file():
            raise RecipeError([f"{self.path}: no {RECIPE_NAME} there; pass a training output_dir"])
        return load_recipe(self.path / RECIPE_NAME, check_files=False)

    def step_records(self) -> list[dict[str, Any]]:
        """The ZO step log (``zo_steps.jsonl``): one record per step, in order."""
        return read_jsonl(self.path / STEP_LOG_NAME)

    # ----- exclusive use ---------------------------------------------------------------------
    @contextlib.contextmanager
    def locked(self, echo: Echo) -> Iterator[None]:
        """Hold ``.zopeft.lock`` (with this pid) for the duration; remove killed processes' temporaries.

        The lock is the ``flock`` on that file, which the kernel releases when its process ends: a
        lock file that no process holds is taken over, with a message.  Directories this call
        created are removed again if the block leaves them empty.
        """
        if self.path.exists() and not self.path.is_dir():
            raise RecipeError([f"output_dir: {self.path} is a file; choose a directory"])
        created = [p for p in (self.path, *self.path.parents) if not p.exists()]
        self.path.mkdir(parents=True, exist_ok=True)
        lock = self.path / LOCK_NAME
        fd = None
        try:
            fd = _acquire(lock, echo)
            removed = remove_stale_temporaries(self.path)
            if removed:
                echo(f"output_dir: cleaned up what killed runs left unfinished: {', '.join(removed)}")
            yield
        finally:
            if fd is not None:
                lock.unlink(missing_ok=True)
                os.close(fd)
            for path in created:  # deepest first
                with contextlib.suppress(OSError):
                    path.rmdir()

    # ----- before a run: what to resume, and whether it may start here -----------------------
    def prepare(self, recipe: Recipe, checkpoint: Path | None, world_size: int, echo: Echo) -> None:
        """Every check that needs no model (report_to's trackers included) before a run from ``checkpoint``
        (:meth:`resume_point`; None: from the start); writes nothing."""
        problem = tracker_problem(recipe.report_to)
        if problem:
            raise RecipeError([f"report_to: {problem}"])
        others = [p.name for p in self.path.glob("checkpoint-*") if p.is_dir() and _step_of(p) is None
                  and p.name != BEST_NAME]
        if others:
            echo(f"output_dir: leaving {', '.join(others)} alone (only checkpoint-<step> directories are resumed and rotated)")
        self._check_foreign(recipe)
        if checkpoint is not None:
            self._check_resumable(recipe, checkpoint, world_size, echo)
        previous = self.run_files()
        if previous and not self._holds(checkpoint) and not recipe.overwrite_output_dir:
            if self._trained_nothing():
                echo(f"output_dir: the run in {self.path} stopped before training a step (no checkpoint, adapter or "
                     f"step record; it left {_shown(previous)}): starting over")
                return
            resume = "" if recipe.resume_from_checkpoint == "auto" else "continue it with resume_from_checkpoint=auto, "
            raise RecipeError([
                f"output_dir: {self.path} already holds a run ({_shown(previous)}); {resume}choose another output_dir, "
                "or start over with --overwrite (overwrite_output_dir: true)"
            ])

    def _check_foreign(self, recipe: Recipe) -> None:
        """Refuse files zopeft did not write where a run writes, and (without overwrite_output_dir) anywhere
        in an output_dir that holds no zopeft run."""
        others = self.foreign()
        outputs = (*RUN_OUTPUTS, *(FULL_OUTPUTS if recipe.finetuning_type == "full" else ()),
                   *(TRACKER_DIRS[name] for name in recipe.report_to))
        clashes = [n for n in others if any(fnmatch.fnmatch(n, o) for o in outputs) or _step_of(self.path / n) is not None]
        if others and not self.run_files() and not recipe.overwrite_output_dir:
            move = f" ({_shown(clashes)}, which a run writes, would have to move first)" if clashes else ""
            raise RecipeError([
                f"output_dir: {self.path} holds files zopeft did not write ({_shown(others)}) and no zopeft run; choose "
                "a new or empty directory, or pass --overwrite to write the run beside them (zopeft never replaces "
                f"or removes them){move}"
            ])
        if clashes:
            raise RecipeError([
                f"output_dir: {self.path} holds {_shown(clashes)}, which zopeft did not write and a run writes there "
                "(it never replaces them, --overwrite or not); move them, or choose another output_dir"
            ])

    def _holds(self, checkpoint: Path | None) -> bool:
        """Whether ``checkpoint`` is one of this run's (a resume in place)."""
        return checkpoint is not None and checkpoint.resolve().parent == self.path.resolve()

    def resume_point(self, recipe: Recipe, echo: Echo) -> Path | None:
        """The complete checkpoint ``resume_from_checkpoint`` names (auto: this run's latest), or None."""
        value = recipe.resume_from_checkpoint
        if value is None:
            return None
        if value != "auto":
            problem = checkpoint_problem(Path(value))
            if problem:
                raise RecipeError([f"resume_from_checkpoint: {problem}; resume from an earlier checkpoint-N"])
            return Path(value)
        for checkpoint in reversed(self.checkpoints()):
            problem = checkpoint_problem(checkpoint)
            if problem is None:
                return checkpoint
            echo(f"resume_from_checkpoint: auto: skipping {checkpoint.name}: {problem}; trying the previous checkpoint")
        echo(f"resume_from_checkpoint: auto found no complete checkpoint in {self.path}; starting from step 0")
        return None

    @staticmethod
    def _check_resumable(recipe: Recipe, checkpoint: Path, world_size: int, echo: Echo) -> None:
        state = json.loads((checkpoint / STATE_NAME).read_text())
        saved_world, step = state.get("world_size", 1), state["global_step"]
        if saved_world != world_size:
            raise RecipeError([
                f"resume_from_checkpoint: {checkpoint} was written by {saved_world} process(es), this run has "
                f"{world_size}; resume with torchrun --nproc_per_node {saved_world}"
            ])
        saved = checkpoint_recipe(checkpoint)
        kept, given = saved.essentials(), recipe.essentials()
        changed = [k for k in {**given, **kept} if kept.get(k) != given.get(k)
                   and not (k == "lr_find_pick" and given[k] is None)]  # auto: the checkpoint's pick, see auto_lr
        if changed:
            raise RecipeError([
                f"resume_from_checkpoint: {checkpoint} was trained with different {', '.join(changed)}; "
                "restore those keys or start a new output_dir"
            ])
        if step > recipe.max_steps:
            raise RecipeError([
                f"max_steps: {recipe.max_steps} is below the step of {checkpoint} ({step}); "
                f"set max_steps to {step} or more, or resume an earlier checkpoint"
            ])
        stretched = recipe.lr_scheduler_type in STRETCHED_SCHEDULES or (
            recipe.lr_scheduler_type == "constant_with_warmup" and isinstance(recipe.warmup_steps, float))
        old, new = saved.zo.model_dump(), recipe.zo.model_dump()
        regrouped = [k for k in REGROUPING_ZO_KEYS if old.get(k) != new.get(k)]
        if regrouped:
            changes = ", ".join(f"zo.{k}: {json.dumps(old.get(k))} -> {json.dumps(new.get(k))}" for k in regrouped)
            echo(f"{changes} since {checkpoint.name}: the perturbed forwards are grouped differently, which rounds "
                 "differently: this run can differ in the last bits from one that never stopped")
        if saved.max_steps != recipe.max_steps and stretched:
            echo(f"max_steps: {saved.max_steps} -> {recipe.max_steps} under lr_scheduler_type {recipe.lr_scheduler_type}: "
                 f"from step {step} on the learning rate follows the {recipe.max_steps}-step schedule, so this run "
                 f"matches neither the {saved.max_steps}-step run nor a {recipe.max_steps}-step run from scratch")

    @staticmethod
    def check_data(checkpoint: Path, fingerprint: str) -> None:
        """Refuse to resume on other training records than the checkpoint's (it records their fingerprint)."""
        saved = json.loads((checkpoint / STATE_NAME).read_text()).get("train_data")
        if saved is not None and saved != fingerprint:
            raise RecipeError([
                f"dataset: the training records are not those {checkpoint} was trained on (fingerprint {saved}, "
                f"now {fingerprint}): the data changed, or which of its records are held out (val_size, the "
                "dataset's splits); restore it, or start a new output_dir"
            ])

    # ----- writing -----------------------------------------------------------------------------
    def open_logs(self, recipe: Recipe, start: int, checkpoint: Path | None, echo: Echo) -> tuple[JsonlLog, JsonlLog | None]:
        """Write recipe.yaml; open trainer_log.jsonl and (ZO) zo_steps.jsonl, each cut back to ``start``.

        A run that starts over (``overwrite_output_dir``, or after a run that trained nothing:
        :meth:`prepare`) first removes what zopeft wrote here before.  A run resumed from another
        directory's checkpoint takes the step log up to its step from there.
        """
        if not self._holds(checkpoint) and self.run_files() and (recipe.overwrite_output_dir or self._trained_nothing()):
            removed = sorted(n for n in self.owned() if os.path.lexists(self.path / n))
            for name in removed:
                remove(self.path / name)
            echo(f"output_dir: removed the previous run's {', '.join(removed)} from {self.path}")
        self._claim([RECIPE_NAME, LOG_NAME, STEP_LOG_NAME, *(TRACKER_DIRS[n] for n in recipe.report_to)])
        write_text_atomic(self.path / RECIPE_NAME, recipe.to_yaml())
        log = JsonlLog(self.path / LOG_NAME, lambda r: r.get("step", 0) <= start)
        if not recipe.is_zeroth_order:
            return log, None
        source = checkpoint.parent / STEP_LOG_NAME if checkpoint is not None else None
        steps = JsonlLog(self.path / STEP_LOG_NAME, lambda r: r["step"] < start, source, checked=True)
        if [r["step"] for r in steps.kept if "rollback_to" not in r] != list(range(start)):  # as zopeft.replay reads it
            echo(f"{STEP_LOG_NAME}: no complete step log before step {start} (looked in {source}); "
                 "`zopeft replay` will not be able to rebuild this run")
        return log, steps

    @contextlib.contextmanager
    def directory(self, name: str) -> Iterator[Path]:
        """A temporary directory that becomes ``output_dir/name`` (listed as zopeft's) if the block succeeds."""
        self._claim([name])
        with atomic_directory(self.path / name, WRITTEN_BY) as tmp:
            yield tmp

    def save_checkpoint(self, step: int, recipe: Recipe, model: torch.nn.Module, opt: Any, sched: Any,
                        state: dict[str, Any], guard: Any = None) -> Path:
        """Write ``checkpoint-<step>`` atomically, then keep only the newest ``save_total_limit``."""
        path = self.path / f"checkpoint-{step}"
        with self.directory(path.name) as tmp:
            model.save_pretrained(tmp)
            save_state(opt.state_dict(), tmp, "optimizer")
            save_state(sched.state_dict(), tmp, "scheduler")
            if guard is not None:
                save_state(guard.state_dict(), tmp, "guard")
            save_state({"torch": torch.get_rng_state()}, tmp, "rng")
            (tmp / STATE_NAME).write_text(dumps({"global_step": step, **state}, indent=1))
            (tmp / RECIPE_NAME).write_text(recipe.to_yaml())
        if recipe.save_total_limit:
            for old in self.checkpoints()[: -recipe.save_total_limit]:
                shutil.rmtree(old, ignore_errors=True)
        return path

    @staticmethod
    def load_checkpoint(checkpoint: Path, model: torch.nn.Module, opt: Any, sched: Any, guard: Any = None) -> dict[str, Any]:
        """Restore the weights, optimizer, scheduler, guard and RNG state; return trainer_state.json."""
        load_weights(checkpoint, model)
        opt.load_state_dict(load_state(checkpoint, "optimizer"))
        sched.load_state_dict(load_state(checkpoint, "scheduler"))
        if guard is not None and (checkpoint / "guard.json").exists():
            guard.load_state_dict(load_state(checkpoint, "guard"))
        torch.set_rng_state(load_state(checkpoint, "rng")["torch"])
        return json.loads((checkpoint / STATE_NAME).read_text())

    def save_final(self, model: torch.nn.Module, tokenizer: Any, echo: Echo) -> None:
        """Write the trained adapter (PEFT layout) and tokenizer, each file renamed into place; a file of the same
        name that zopeft did not write (e.g. a README.md) is kept, and said so unless it holds the same bytes."""
        others = set(self.foreign())
        with atomic_files(self.path) as staging:
            model.save_pretrained(staging)
            tokenizer.save_pretrained(staging)
            kept = sorted(p.name for p in staging.iterdir() if p.name in others)
            differ = [n for n in kept if not ((self.path / n).is_file() and (staging / n).is_file()
                                              and filecmp.cmp(staging / n, self.path / n, shallow=False))]
            for name in kept:
                remove(staging / name)
            self._claim([p.name for p in staging.iterdir()])
        if differ:
            echo(f"output_dir: kept {', '.join(differ)}, which zopeft did not write: the run's own "
                 f"{'copies were' if len(differ) > 1 else 'copy was'} not saved there")

    def plot(self) -> Path | None:
        """``training_curves.png`` from the log (None without matplotlib, the ``plot`` extra)."""
        try:
            from .plot import plot_log
        except ImportError:
            logger.info("matplotlib not installed: skipping the loss plot (pip install 'zopeft[plot]')")
            return None
        self._claim([PLOT_NAME])
        return plot_log(self.path / LOG_NAME, self.path / PLOT_NAME)


def checkpoint_recipe(checkpoint: Path) -> Recipe:
    """The recipe a checkpoint was written with (resolved: its max_steps, guard watch and learning rate)."""
    return load_recipe(checkpoint / RECIPE_NAME, check_files=False)


def load_weights(directory: Path, model: torch.nn.Module) -> None:
    """Load the adapter (or, full-parameter, the model) ``save_pretrained`` wrote to ``directory`` into ``model``."""
    from peft import PeftModel, set_peft_model_state_dict
    from safetensors.torch import load_file

    if isinstance(model, PeftModel):
        set_peft_model_state_dict(model, load_file(str(directory / "adapter_model.safetensors")))
    else:
        state = {}
        for shard in sorted(directory.glob("model*.safetensors")):
            state.update(load_file(str(shard)))
        model.load_state_dict(state, strict=False)


def _read_pid(fd: int) -> int | None:
    os.lseek(fd, 0, os.SEEK_SET)
    text = os.read(fd, 64).decode(errors="replace").strip()
    return int(text) if text.isdigit() else None


def _acquire(lock: Path, echo: Echo) -> int:
    """An open, exclusively ``flock``-ed descriptor of ``lock`` holding this pid; RecipeError if another holds it."""
    while True:
        fd = os.open(lock, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = _read_pid(fd)
            os.close(fd)
            raise RecipeError([
                f"output_dir: {lock.parent} is in use by another zopeft train (pid {holder}); "
                "wait for it to finish or choose another output_dir"
            ]) from None
        with contextlib.suppress(FileNotFoundError):
            if os.fstat(fd).st_ino == os.stat(lock).st_ino:
                break  # still the file at that path (not one its previous holder just removed)
        os.close(fd)
    previous = _read_pid(fd)
    if previous is not None:  # decided by the flock alone: a pid in the file may have been reused since
        echo(f"output_dir: took over the lock file left by pid {previous}: no process holds its lock (a run that "
             "ended without removing it)")
    os.ftruncate(fd, 0)
    os.write(fd, f"{os.getpid()}\n".encode())
    return fd
