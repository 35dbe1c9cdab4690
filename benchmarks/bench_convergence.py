"""Convergence race: zopeft's MeZO, FZOO, AdaMeZO and HiZOO vs first-order AdamW, LoRA on SmolLM2-135M.

    python -m benchmarks.bench_convergence [--quick] [--device auto|cpu|cuda] [--tasks sst2-2shot,rte] [--seeds 3]
        [--budget 720] [--grid fzoo=1e-3,3e-3] [--objectives loss,candidate_ce,margin] [--resume]

Same model (real SmolLM2-135M-Instruct weights, fp32, LoRA r=8 alpha 16 on q/v, B = 0 at the
start so every run starts at the zero-shot model), same data, same batch size, and for each seed
the same LoRA initialisation and example order for every optimizer.  Tasks (:data:`TASKS`):

* ``sst2``: the bundled SST-2 prompt (``Review: ...\\nSentiment:`` scored on `` negative``/`` positive``);
  SmolLM2 starts at ~79%, so gains are small next to the evaluation's noise (quick mode's task).
* ``sst2-2shot``: the demo recipe's 2-shot prompt with `` bad``/`` good``, batches of 4; the model
  starts badly calibrated (~56%), so the optimizers' speeds differ by far more than the noise.
* ``rte``: the bundled RTE prompt.
* ``boolq``: the bundled BoolQ prompt (passage, question, `` No``/`` Yes``), 32 training examples (FewGLUE's
  32-shot set), long prompts (cut to 256 tokens from the left), batches of 8.
* ``squad``: the bundled SQuAD questions (``{context}\nQuestion: {question}\nAnswer:``), answers
  generated greedily (16 new tokens at most, cut at the first newline), scored by SQuAD F1 (ranked,
  kept under the curves' ``accuracy`` key so that every task reads alike) and exact match, on all
  500 dev questions; the tune slice is the last 100 training questions, never trained on.

Objectives (``--objectives``): what the optimizers train on: ``loss`` (the language-model loss of
the gold label word over the whole vocabulary, zopeft's default), ``candidate_ce`` (the cross-entropy
over the candidates, as the MeZO / FZOO / AdaMeZO reference code train classification) or
``margin``; on a generation task (squad) the loss of the first gold answer, ``f1`` or
``exact_match`` (1 − the score of each point's greedy generations on the batch).  AdamW takes the
differentiable ones.  A run on another objective than the loss is labelled ``optimizer:objective``
(``fzoo:candidate_ce``, ``fzoo:f1``) and has its own lr tuning.

Budget and counting.  Every optimizer gets the same budget of *forward-pass equivalents*: a ZO
loss evaluation is one (MeZO and AdaMeZO: 2 per step, FZOO: N+1 = 9 per step); a first-order
AdamW step is counted as 3 (one forward pass + a backward pass, which costs about two forward
passes) - the usual estimate, stated rather than measured.  HiZOO spends 3 per step.  A greedy generation
of up to 16 new tokens (a point's evaluation under ``f1`` / ``exact_match``) counts as
:data:`zopeft.costs.GENERATION_FORWARD_EQUIVALENTS` = 2, as in lr-find: the prefill is one forward
pass over the prompt, and the cached decoding steps (one token per row each) cost about one more on this CPU (measured 1.4-2.0x a
loss forward on the same 4 SQuAD prompts, SmolLM2-135M, one thread; in FLOPs they are ~5% of the
prefill, so this charges the F1 objective its wall time, not its arithmetic).  The ZO optimizers evaluate their
points with zopeft's batched path (the points as replicas of the batch in one forward pass:
the same losses to fp32 rounding, fewer and larger forwards).  Wall time is training time only
(evaluation excluded) on a machine that may be shared: see the recorded load averages.

Protocol.  The dev split is cut into a *report* set (the curves) and a disjoint *tune* set.  Each
optimizer's learning rate is picked from a small grid by the tune-set accuracy after a short run
(``--tune-budget``, seed 0; ties: lower tune loss); the chosen lr then runs with every seed on the
full budget, evaluated on the report set every ``--eval-every`` forward-pass equivalents (each point of
a classification curve also counts the predictions per label, ``predicted``).  The
target accuracy is the zero-shot report accuracy + the task's target gain; forward passes and
seconds to the target are read off the first evaluation at or above it (evaluation points are
discrete: the true crossing is at or before the reported count).  ``--defaults`` runs what ``zopeft
train`` does by default on a recipe with an evaluation set (``zo.objective: auto`` = ``candidate_ce``
here, the guard watching the evaluations, ``load_best_model_at_end``), judging on the tune slice as
``zo.guard.select_size`` makes the CLI do: a run's *final* accuracy is then the report accuracy of
the adapter the run leaves (its best tune-slice evaluation, the start included), *last* its last
step's, so the reported number is never one the run was selected on.  It evaluates every
``--eval-every`` forward-pass equivalents, outside the budget; ``zopeft train``'s ``eval_steps: auto``
evaluates about as often where the evaluations fit in 25% of the training's forward passes, less
often where they do not (sst2-2shot's 256 + 200 records: every 40 of FZOO's 80 steps).

Quick mode is a smoke test: one seed, one lr per optimizer (no tuning), 36 forward-pass
equivalents, 64 report examples - it checks the machinery end to end and says nothing reliable
about which optimizer converges faster.  Full mode: sst2-2shot and RTE, a 4-point lr grid per
optimizer, 3 seeds, 720 forward-pass equivalents; hours on 2 CPU cores (``--resume`` reuses the
runs already recorded in ``convergence_<device>.runs.jsonl`` and their step-0 evaluation as the
zero-shot, and continues an interrupted run from its last evaluation, kept in
``convergence_<device>.runs.jsonl.partial/``).  To use both cores, run disjoint ``--optimizers``
subsets with ``--threads 1`` and ``--resume`` into the same ``--out-dir`` (each finished run appends
its own line), then ``--summary-only`` (with the race's ``--budget``, ``--batch`` and ``--report-size``) for the
table and plot of every recorded report run, which trains and evaluates nothing.

Writes ``convergence_<device>[_quick].json`` and a ``.png`` (accuracy against forward-pass
equivalents and against wall time, mean ± std over seeds).
"""

from __future__ import annotations

import argparse
import functools
import hashlib
import json
import math
import shutil
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Any

import torch

from zopeft.costs import GENERATION_FORWARD_EQUIVALENTS
from zopeft.jsonl import dumps
from zopeft.metrics import predicted_counts, without_generations

from . import common

ADAMW_FORWARD_EQUIVALENTS = 3  # forward + backward ≈ 1 + 2 forward passes
# what a curve's point keeps of an evaluation; ``predicted`` (a classification task's predictions per label) tells a
# gain in accuracy from a shift of the label prior, e.g. towards the majority answer
POINT_METRICS = ("accuracy", "loss", "f1", "exact_match", "predicted")
PAPERS = {
    "fzoo": "FZOO paper: about 3x fewer forward passes than MeZO to the same accuracy",
    "adamezo": "AdaMeZO paper: up to 70% fewer forward passes than MeZO",
    "hizoo": "HiZOO paper: about 8x fewer training steps than MeZO on SST-2 (RoBERTa-large), at 3/2 the forwards per step",
}


@dataclass(frozen=True)
class OptimizerSetting:
    """Fixed hyperparameters, the lr grid of full mode and the single lr of quick mode."""

    kwargs: dict[str, Any]
    grid: tuple[float, ...]
    quick_lr: float


OPTIMIZERS: dict[str, OptimizerSetting] = {
    # Grids are half-decade steps around the step length each rule gives on SmolLM2 + LoRA, where the
    # LoRA gradient's norm is ~3 (measured at the start): MeZO moves a coordinate by ~lr·|g|, FZOO by
    # ~lr/√N (its step is divided by the losses' spread), AdaMeZO by ~lr·100·|m|/√v ≈ lr·50.
    # eps 1e-2: the MeZO paper's LoRA setting; lr 1e-4 is its LoRA lr
    "mezo": OptimizerSetting({"eps": 1e-2}, (1e-4, 3e-4, 1e-3, 3e-3), 1e-4),
    "fzoo": OptimizerSetting({"eps": 1e-3, "n_perturbations": 8}, (1e-3, 3e-3, 1e-2, 3e-2), 5e-3),
    # the update is 100·m/(√v+δ) (normalised momentum): lrs ~100x below MeZO's give similar step sizes
    "adamezo": OptimizerSetting({"eps": 1e-2}, (3e-6, 1e-5, 3e-5, 1e-4), 1e-5),
    # MeZO's step along Σ^(-1/2)·z with Gaussian z; Σ starts at 1 and moves with the reference code's
    # smoothing (1e-8), so the step length, and the grid, are MeZO's
    "hizoo": OptimizerSetting({"eps": 1e-2, "hessian_smooth": 1e-8}, (1e-4, 3e-4, 1e-3, 3e-3), 1e-4),
    "adamw": OptimizerSetting({}, (1e-4, 3e-4, 1e-3, 3e-3), 1e-4),
}


@dataclass(frozen=True)
class TaskSetting:
    """A bundled dataset with its prompt, the dev slices ``[start, stop)`` used to report and to tune,
    and the task's default batch size and target gain (both can be overridden on the command line)."""

    dataset: str
    cutoff_len: int
    report: tuple[int, int]
    tune: tuple[int, int]
    batch_size: int
    target_gain: float
    recipe: str | None = None  # a bundled recipe whose template and label words replace the dataset's
    metric: str = "accuracy"  # the score ranked, tuned on and plotted (squad: f1)
    tune_split: str = "dev"  # where the tune slice is (train: it is then never trained on)

    @property
    def objectives(self) -> tuple[str, ...]:
        """What a run on this task can train on (``--objectives`` keeps those it names)."""
        return ("loss", *(GENERATION_OBJECTIVES if self.metric == "f1" else CANDIDATE_OBJECTIVES))


TASKS = {
    # the dataset's own prompt: SmolLM2 starts at ~79%, and gains stay within the evaluation's noise
    "sst2": TaskSetting("sst2", 64, (0, 256), (256, 456), 16, 0.03),
    # the demo's 2-shot prompt with " bad"/" good": ~56% zero-shot (badly calibrated), so the gains
    # are large and fast; batches of 4, as in the demo
    "sst2-2shot": TaskSetting("sst2", 128, (0, 256), (256, 456), 4, 0.20, "smollm2_lora_fzoo_sst2_demo"),
    "rte": TaskSetting("rte", 128, (0, 177), (177, 277), 16, 0.03),
    # passages of ~150 tokens (a tenth above 250): batches of 8 cost about what RTE's 16 do
    "boolq": TaskSetting("boolq", 256, (0, 200), (200, 300), 8, 0.03),
    # generated answers, all 500 dev questions reported; prompts cut to 512 - 16 tokens (most fit whole)
    "squad": TaskSetting("squad", 512, (0, 500), (900, 1000), 4, 0.05, metric="f1", tune_split="train"),
}
CANDIDATE_OBJECTIVES, GENERATION_OBJECTIVES = ("candidate_ce", "margin"), ("f1", "exact_match")
DIFFERENTIABLE = ("loss", "candidate_ce")  # what AdamW can train on
# discrete objectives move only when a perturbation changes an outcome: eps 1e-2, as zo.objective accuracy needed on
# the demo (README: at 1e-3 a perturbation rarely changes a generation, and the step is skipped)
OBJECTIVE_KWARGS: dict[str, dict[str, Any]] = {"f1": {"eps": 1e-2}, "exact_match": {"eps": 1e-2}}
RECIPES_DIR = Path(__file__).resolve().parent.parent / "recipes"


@dataclass(frozen=True)
class RunSpec:
    """One training run; also the key under which a finished run is recorded for ``--resume``."""

    task: str
    optimizer: str
    lr: float
    seed: int
    budget: int  # forward-pass equivalents
    eval_every: int
    eval_set: str  # "report" or "tune"
    eval_slice: tuple[int, int]
    model: str
    batch_size: int
    guard: bool = False  # wrap the ZO optimizer in zopeft.Guard (its defaults)
    guard_watch: str = "loss"  # eval: the guard judges the tune slice's accuracy at each evaluation (and at the end)
    objective: str = "loss"  # zo.objective: loss, candidate_ce or margin (AdamW: loss or candidate_ce)
    keep_best: bool = False  # load_best_model_at_end judged on the tune slice: the run's final = the kept adapter

    @property
    def label(self) -> str:
        return cell_label(self.optimizer, self.objective)


def cell_label(optimizer: str, objective: str) -> str:
    """The optimizer, with the objective when it is not the loss (``fzoo:candidate_ce``)."""
    return optimizer if objective == "loss" else f"{optimizer}:{objective}"


# ----- optimizers behind one interface -----------------------------------------------------------
class _ZOTrainer:
    """A zopeft optimizer (optionally guarded) stepping on batched loss closures; counts its loss evaluations."""

    def __init__(self, name: str, model: torch.nn.Module, lr: float, seed: int, guard: bool = False,
                 watch: str = "loss", objective: str = "loss") -> None:
        import zopeft

        self.model, self.objective = model, objective
        kwargs = {**OPTIMIZERS[name].kwargs, **OBJECTIVE_KWARGS.get(objective, {})}
        self.opt = zopeft.get_optimizer(name, model, lr=lr, seed=seed, batched=True, **kwargs)
        self.guard = zopeft.Guard(self.opt, watch=watch) if guard else None  # each watch with its own defaults
        self.stopped: str | None = None  # the guard's reason to stop

    def step(self, batch: Any) -> None:
        """One step on a model batch (the loss), a CandidateBatch or a GenerationBatch (the objective)."""
        from zopeft.batched import generation_closure, loss_closure, metric_closure
        from zopeft.guard import GuardStop

        if self.objective == "loss":
            closure = loss_closure(self.model, batch)
        elif self.objective in GENERATION_OBJECTIVES:
            closure = generation_closure(self.model, batch, self.objective)
        else:
            closure = metric_closure(self.model, batch, self.objective)
        try:
            (self.guard or self.opt).step(closure)
        except GuardStop as stop:
            self.stopped = str(stop)

    def state_dict(self) -> dict[str, Any]:
        return {"opt": self.opt.state_dict(), "guard": self.guard.state_dict() if self.guard else None,
                "stopped": self.stopped}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Continue from :meth:`state_dict` (the model's trainable tensors already restored)."""
        self.opt.load_state_dict(state["opt"])
        if self.guard is not None:
            self.guard.load_state_dict(state["guard"])
        self.stopped = state["stopped"]

    def observe_eval(self, accuracy: float) -> None:
        """Let a guard watching evaluations judge one (it may roll back, or stop the run)."""
        from zopeft.guard import GuardStop

        try:
            self.guard.observe_eval(accuracy)
        except GuardStop as stop:
            self.stopped = str(stop)

    @property
    def forward_equivalents(self) -> int:
        per_point = GENERATION_FORWARD_EQUIVALENTS if self.objective in GENERATION_OBJECTIVES else 1
        return self.opt.forward_passes * per_point

    @property
    def skipped_steps(self) -> int:
        """Steps that made no update (a non-finite loss, or every point equal on a discrete objective)."""
        return self.opt.skipped_steps


class _AdamWTrainer:
    """First-order AdamW on the LoRA tensors; a step counts as :data:`ADAMW_FORWARD_EQUIVALENTS`."""

    skipped_steps = 0  # every step updates

    def __init__(self, model: torch.nn.Module, lr: float) -> None:
        self.model = model
        self.opt = torch.optim.AdamW(common.trainable(model), lr=lr, weight_decay=0.0)
        self.steps = 0

    def step(self, batch: Any) -> None:
        """One step on a model batch (its loss) or a CandidateBatch (the cross-entropy over its candidates)."""
        from zopeft.batched import candidate_loss
        from zopeft.objectives import CandidateBatch

        loss = (lambda: candidate_loss(self.model, batch)) if isinstance(batch, CandidateBatch) else None
        common.adamw_step(self.model, self.opt, batch, loss)
        self.steps += 1

    def state_dict(self) -> dict[str, Any]:
        return {"opt": self.opt.state_dict(), "steps": self.steps}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.opt.load_state_dict(state["opt"])
        self.steps = state["steps"]

    @property
    def forward_equivalents(self) -> int:
        return ADAMW_FORWARD_EQUIVALENTS * self.steps


# ----- the race ---------------------------------------------------------------------------------
class Race:
    """The shared pieces (tokenizer, task formats, records, model) and one training run."""

    def __init__(self, model: str, device: torch.device) -> None:
        from zopeft.models import ModelSpec, load_tokenizer

        self.tokenizer = load_tokenizer(ModelSpec(common.SMOLLM2))
        vocab = None if model == "smollm2" else len(self.tokenizer)
        self.model_name, self.path = model, common.model_path(model, vocab_size=vocab)
        self.device = device
        self.start_selects: dict[str, float] = {}

    def fresh_model(self, seed: int) -> torch.nn.Module:
        """The base with a new LoRA adapter (A from ``seed``, B = 0: the zero-shot model)."""
        base = common.load_base(self.path, self.device)
        torch.manual_seed(seed)
        return common.with_adapter(base, "lora")

    @staticmethod
    def task(name: str) -> Any:
        from zopeft.data import BUILTIN_DATASETS
        from zopeft.recipe import load_recipe
        from zopeft.tasks import build_task

        setting = TASKS[name]
        settings = dict(BUILTIN_DATASETS[setting.dataset]["task"])
        if setting.recipe:
            recipe = load_recipe(RECIPES_DIR / f"{setting.recipe}.yaml", check_files=False)
            settings.update(template=recipe.template, label_words=recipe.label_words)
        return build_task(settings.pop("kind"), cutoff_len=setting.cutoff_len, **settings)

    @staticmethod
    def records(name: str, split: str, bounds: tuple[int, int] | None = None) -> list[dict]:
        from zopeft.data import load_records

        records = load_records(TASKS[name].dataset, split)
        return records[bounds[0] : bounds[1]] if bounds else records

    @classmethod
    def training_records(cls, name: str) -> list[dict]:
        """The train split, less the tune slice where it lies there."""
        setting, records = TASKS[name], cls.records(name, "train")
        return records[: setting.tune[0]] + records[setting.tune[1] :] if setting.tune_split == "train" else records

    def evaluate(self, model: torch.nn.Module, task_name: str, bounds: tuple[int, int], eval_set: str = "report",
                 ) -> dict[str, Any]:
        """The task's metrics on ``bounds`` of the report (dev) or tune split (without a generation task's answers);
        ``accuracy``: its ranked score; ``predicted``: a classification task's predictions per label."""
        setting = TASKS[task_name]
        split = setting.tune_split if eval_set == "tune" else "dev"
        metrics = self.task(task_name).evaluate(model, self.tokenizer, self.records(task_name, split, bounds),
                                                batch_size=32)
        predicted = predicted_counts(metrics)
        return {**without_generations(metrics), "accuracy": metrics[setting.metric],
                **({"predicted": predicted} if predicted else {})}

    def batch(self, task: Any, train: list[dict], seed: int, step: int, bs: int, objective: str = "loss") -> Any:
        """Batch ``step`` (of ``bs`` examples) of the example order of ``seed`` (a new permutation each epoch),
        as ``objective`` reads it: the task's model batch (the loss), a GenerationBatch (prompts and answers to
        generate from) or a CandidateBatch (an objective of the candidates' scores)."""
        n = len(train)
        records = [train[_order(seed, p // n, n)[p % n]] for p in range(step * bs, (step + 1) * bs)]
        if objective in GENERATION_OBJECTIVES:
            return task.generation_batch(records, self.tokenizer).to(self.device)
        if objective != "loss":
            return task.candidate_batch(records, self.tokenizer).to(self.device)
        return {k: v.to(self.device) for k, v in task.collate(records, self.tokenizer).items()}

    def run(self, spec: RunSpec, start: dict[str, float] | None, partial: Path | None = None) -> dict[str, Any]:
        """Train until the budget is spent, evaluating every ``eval_every`` forward-pass equivalents
        (and at the end); ``start``: the shared step-0 evaluation, prepended to the curve.

        ``partial``: where the run keeps its state after each evaluation; a run interrupted (a
        session's end) continues from there, bit for bit, when started again.
        """
        from zopeft.checkpoint import load_state, save_state

        model = self.fresh_model(spec.seed)
        trainer = (_AdamWTrainer(model, spec.lr) if spec.optimizer == "adamw"
                   else _ZOTrainer(spec.optimizer, model, spec.lr, spec.seed, spec.guard, spec.guard_watch, spec.objective))
        guard_on_tune = spec.guard and spec.guard_watch == "eval"  # select on the tune slice, report on the report set
        judge_on_tune = guard_on_tune or spec.keep_best
        task, train = self.task(spec.task), self.training_records(spec.task)
        curve = [_point(0, 0, 0.0, start)] if start else []
        steps, seconds, next_eval = 0, 0.0, spec.eval_every
        if partial is not None and (partial / "run.json").exists():
            state = load_state(partial, "run")
            with torch.no_grad():
                for tensor, saved in zip(common.trainable(model), state["weights"]):
                    tensor.copy_(saved)
            trainer.load_state_dict(state["trainer"])
            torch.set_rng_state(state["rng"])
            steps, seconds, next_eval, curve = state["steps"], state["seconds"], state["next_eval"], state["curve"]
            print(f"  continuing {spec.label} lr={spec.lr:g} seed={spec.seed} after {steps} steps", flush=True)
        elif spec.keep_best:  # the start is a candidate for the kept adapter, as in zopeft train
            start_select = self.start_select(spec.task)
            if curve:
                curve[0]["select_accuracy"] = start_select
            if guard_on_tune:  # as zopeft train's guard judges the start: a state to roll back to
                trainer.observe_eval(start_select)
        while trainer.forward_equivalents < spec.budget:
            batch = self.batch(task, train, spec.seed, steps, spec.batch_size, spec.objective)
            seconds += common.timed(lambda: trainer.step(batch), self.device)
            steps += 1
            done = trainer.forward_equivalents >= spec.budget or getattr(trainer, "stopped", None) is not None
            if trainer.forward_equivalents >= next_eval or done:
                judged = None
                if judge_on_tune:
                    judged = self.evaluate(model, spec.task, TASKS[spec.task].tune, "tune")["accuracy"]
                if guard_on_tune:
                    rollbacks = len(trainer.guard.events)
                    trainer.observe_eval(judged)
                    done = done or trainer.stopped is not None
                    if len(trainer.guard.events) > rollbacks:
                        judged = None  # the weights reported below are the guard's earlier ones, not those judged
                if spec.eval_set == "report" or done:
                    metrics = self.evaluate(model, spec.task, spec.eval_slice, spec.eval_set)
                    point = _point(steps, trainer.forward_equivalents, seconds, metrics)
                    curve.append({**point, "select_accuracy": judged} if spec.keep_best else point)
                while next_eval <= trainer.forward_equivalents:
                    next_eval += spec.eval_every
                if partial is not None and not done:
                    partial.mkdir(parents=True, exist_ok=True)
                    save_state({"weights": [t.detach() for t in common.trainable(model)],
                                "trainer": trainer.state_dict(), "rng": torch.get_rng_state(), "steps": steps,
                                "seconds": seconds, "next_eval": next_eval, "curve": curve}, partial, "run")
        kept = _kept(curve) if spec.keep_best else curve[-1]
        return {
            **asdict(spec),
            "steps": steps,
            "skipped_steps": trainer.skipped_steps,
            "forward_equivalents": trainer.forward_equivalents,
            "train_seconds": seconds,
            "seconds_per_step": seconds / max(steps, 1),
            "final_accuracy": kept["accuracy"],
            "final_loss": kept["loss"],
            "best_accuracy": max(p["accuracy"] for p in curve),
            **({"final_exact_match": kept["exact_match"]} if "exact_match" in kept else {}),
            **({"last_accuracy": curve[-1]["accuracy"], "kept_step": kept["steps"]} if spec.keep_best else {}),
            "curve": curve,
            "load_average": common.load_average(),
            **({"guard_events": trainer.guard.events, "guard_stop": trainer.stopped} if getattr(trainer, "guard", None)
               else {}),
        }

    def start_select(self, task: str) -> float:
        """The zero-shot model's tune-slice accuracy (every seed's start: B = 0)."""
        if task not in self.start_selects:
            self.start_selects[task] = self.evaluate(self.fresh_model(0), task, TASKS[task].tune, "tune")["accuracy"]
        return self.start_selects[task]


def _kept(curve: list[dict[str, Any]]) -> dict[str, Any]:
    """The point whose adapter load_best_model_at_end leaves: the first best tune-slice accuracy (the start
    included: a run that never beats it leaves the zero-shot adapter)."""
    judged = [p for p in curve if p.get("select_accuracy") is not None]
    return max(judged, key=lambda p: p["select_accuracy"]) if judged else curve[-1]


@functools.lru_cache(maxsize=8)
def _order(seed: int, epoch: int, n: int) -> list[int]:
    return torch.randperm(n, generator=torch.Generator().manual_seed(seed * 1_000_003 + epoch)).tolist()


def _point(steps: int, forward_equivalents: int, seconds: float, metrics: dict[str, Any]) -> dict[str, Any]:
    return {"steps": steps, "forward_equivalents": forward_equivalents, "train_seconds": seconds,
            **{k: metrics[k] for k in POINT_METRICS if k in metrics}}


# ----- recorded runs (for --resume) --------------------------------------------------------------
class RunLog:
    """Finished runs, one JSON line each; with ``resume`` the lines already there are reused."""

    def __init__(self, path: Path, resume: bool) -> None:
        self.path = path
        self.partials = path.with_name(f"{path.name}.partial")  # runs in progress (see Race.run)
        self.done: dict[str, dict[str, Any]] = {}
        if resume and path.exists():
            for line in path.read_text().splitlines():
                record = json.loads(line)
                self.done[record["key"]] = record["run"]
        else:
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_text("")
            shutil.rmtree(self.partials, ignore_errors=True)

    @staticmethod
    def key(spec: RunSpec) -> str:
        fields = asdict(spec)
        if not fields["guard"]:  # runs recorded before the guard existed keep their keys
            del fields["guard"]
        if fields["guard_watch"] == "loss":
            del fields["guard_watch"]
        if fields["objective"] == "loss":  # runs recorded before the objectives keep their keys
            del fields["objective"]
        if not fields["keep_best"]:
            del fields["keep_best"]
        return json.dumps(fields, sort_keys=True)

    def get(self, spec: RunSpec) -> dict[str, Any] | None:
        return self.done.get(self.key(spec))

    def partial(self, spec: RunSpec) -> Path:
        """Where the run of ``spec`` keeps its state while it is in progress."""
        return self.partials / hashlib.sha256(self.key(spec).encode()).hexdigest()[:16]

    def zero_shot(self, task: str, report: tuple[int, int], model: str) -> dict[str, Any] | None:
        """The step-0 report evaluation of a recorded run on the same task, report slice and model (the untrained
        model's, whichever run recorded it), or None: with ``--resume`` it is not evaluated again."""
        for run in self.done.values():
            start = run["curve"][0] if run.get("curve") else {}
            if ((run["task"], tuple(run["eval_slice"]), run["model"], run["eval_set"]) == (task, report, model, "report")
                    and start.get("steps") == 0):
                return {k: start[k] for k in POINT_METRICS if k in start}
        return None

    def report_runs(self, task: str, report: tuple[int, int], plan: Plan) -> dict[str, list[dict[str, Any]]]:
        """The finished runs on ``task``'s ``report`` slice at ``plan``'s budget, model and batch, by cell: its label,
        with the guard and the best model where it had them, and the lr where a label ran at several."""
        wanted = (task, "report", report, plan.budget, plan.model, plan.batch_for(task))
        named = [(_cell_name(run), run) for run in self.done.values()
                 if (run["task"], run["eval_set"], tuple(run["eval_slice"]), run["budget"], run["model"],
                     run["batch_size"]) == wanted]
        lrs: dict[str, set[float]] = {}
        for name, run in named:
            lrs.setdefault(name, set()).add(run["lr"])
        cells: dict[str, list[dict[str, Any]]] = {}
        for name, run in named:
            cells.setdefault(name + (f" lr={run['lr']:g}" if len(lrs[name]) > 1 else ""), []).append(run)
        return cells

    def tasks(self) -> list[str]:
        """The tasks of the recorded runs, in the order they were recorded."""
        return list(dict.fromkeys(run["task"] for run in self.done.values()))

    def add(self, spec: RunSpec, run: dict[str, Any]) -> None:
        self.done[self.key(spec)] = run
        with self.path.open("a") as fh:
            fh.write(dumps({"key": self.key(spec), "run": run}) + "\n")
        shutil.rmtree(self.partial(spec), ignore_errors=True)


def _cell_name(run: dict[str, Any]) -> str:
    """A recorded run's cell: its label, with its guard and best model where it had them."""
    kept = [f"guard {run.get('guard_watch', 'loss')}"] * bool(run.get("guard"))
    kept += ["best kept"] * bool(run.get("keep_best"))
    return cell_label(run["optimizer"], run.get("objective", "loss")) + (f" ({', '.join(kept)})" if kept else "")


# ----- summaries ---------------------------------------------------------------------------------
def first_reaching(run: dict[str, Any], target: float) -> dict[str, Any] | None:
    """The first evaluation point at or above ``target`` (None: not reached within the budget)."""
    return next((p for p in run["curve"] if p["accuracy"] >= target), None)


def _pm(values: Sequence[float], fmt: str) -> str | None:
    if not values:
        return None
    mean, std = common.mean_std(values)
    return f"{mean:{fmt}}±{std:{fmt}}" if len(values) > 1 else f"{mean:{fmt}}"


def summarise(task: str, optimizer: str, lr: float, runs: list[dict[str, Any]], target: float) -> dict[str, Any]:
    """One table row: final/best accuracy and cost to the target over the seeds."""
    reached = [p for p in (first_reaching(r, target) for r in runs) if p is not None]
    fwd = [p["forward_equivalents"] for p in reached]
    secs = [p["train_seconds"] for p in reached]
    return {
        "task": task, "optimizer": optimizer, "lr": lr, "seeds": len(runs), "metric": TASKS[task].metric,
        "fwd_per_step": runs[0]["forward_equivalents"] / max(runs[0]["steps"], 1),
        "s_per_step": common.mean_std([r["seconds_per_step"] for r in runs])[0],
        "final_accuracy": common.mean_std([r["final_accuracy"] for r in runs]),
        "best_accuracy": common.mean_std([r["best_accuracy"] for r in runs]),
        "reached": f"{len(reached)}/{len(runs)}",
        "fwd_to_target": common.mean_std(fwd) if len(reached) == len(runs) else None,
        "seconds_to_target": common.mean_std(secs) if len(reached) == len(runs) else None,
        "final_acc": _pm([r["final_accuracy"] for r in runs], ".3f"),
        "last_acc": _pm([r["last_accuracy"] for r in runs if "last_accuracy" in r], ".3f"),
        "best_acc": _pm([r["best_accuracy"] for r in runs], ".3f"),
        "final_em": _pm([r["final_exact_match"] for r in runs if "final_exact_match" in r], ".3f"),
        "fwd_target": _pm(fwd, ".0f"),
        "s_target": _pm(secs, ".0f"),
    }


def compare(rows: list[dict[str, Any]], budget: int) -> list[dict[str, Any]]:
    """Forward passes to the target relative to MeZO, next to what the papers report."""
    out = []
    for task in dict.fromkeys(r["task"] for r in rows):
        by_opt = {r["optimizer"]: r for r in rows if r["task"] == task}
        mezo = by_opt.get("mezo")
        for name, other in by_opt.items():
            if mezo is None or name == "mezo":
                continue
            out.append({"task": task, "optimizer": name, **_relative(mezo, other, budget),
                        "final_accuracy_difference": other["final_accuracy"][0] - mezo["final_accuracy"][0]})
    return out


def _relative(mezo: dict[str, Any], other: dict[str, Any], budget: int) -> dict[str, Any]:
    """How many times fewer forward passes ``other`` needed than MeZO (a bound when one did not arrive)."""
    m, o = mezo["fwd_to_target"], other["fwd_to_target"]
    if m and o:
        ratio = m[0] / o[0]
        verdict = f"{ratio:.2f}x fewer" if ratio >= 1 else f"{1 / ratio:.2f}x more"
        return {"mezo_over_other": ratio, "verdict": verdict}
    if o:  # MeZO needs more than the budget in some seed
        return {"mezo_over_other": budget / o[0], "verdict": f"> {budget / o[0]:.2f}x fewer (MeZO {_missed(mezo, budget)})"}
    if m:
        return {"mezo_over_other": None, "verdict": f"more: {_missed(other, budget)} (MeZO: {m[0]:.0f})"}
    return {"mezo_over_other": None, "verdict": "neither reached the target in every seed"}


def _missed(row: dict[str, Any], budget: int) -> str:
    reached = row["reached"]
    return f"did not reach it in {budget}" if reached.startswith("0/") else f"reached it in {reached} seeds only"


# ----- plot --------------------------------------------------------------------------------------
def plot(curves: dict[str, dict[str, list[dict[str, Any]]]], targets: dict[str, float], path: Path, title: str) -> Path:
    """Accuracy against forward-pass equivalents and against training seconds, mean ± std over seeds."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    tasks = list(curves)
    fig, axes = plt.subplots(len(tasks), 2, figsize=(11, 4 * len(tasks)), squeeze=False)
    for row, task in enumerate(tasks):
        for col, (x_key, x_label) in enumerate((("forward_equivalents", "forward-pass equivalents"),
                                                ("train_seconds", "training seconds (this machine)"))):
            ax = axes[row][col]
            for name, runs in curves[task].items():
                points = min(len(r["curve"]) for r in runs)
                xs = [common.mean_std([r["curve"][i][x_key] for r in runs])[0] for i in range(points)]
                stats = [common.mean_std([r["curve"][i]["accuracy"] for r in runs]) for i in range(points)]
                mean = [m for m, _ in stats]
                line, = ax.plot(xs, mean, marker="o", label=f"{name} (lr {runs[0]['lr']:g})")
                ax.fill_between(xs, [m - s for m, s in stats], [m + s for m, s in stats],
                                color=line.get_color(), alpha=0.15)
            ax.axhline(targets[task], color="grey", linestyle="--", linewidth=1, label="target")
            ax.set(xlabel=x_label, ylabel=f"{task} dev {TASKS[task].metric} (report set)")
            ax.grid(alpha=0.3)
            ax.legend(fontsize=8)
    fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


# ----- main --------------------------------------------------------------------------------------
COLUMNS: list[common.Column] = [
    ("task", "task", ""), ("optimizer", "optimizer", ""), ("lr", "lr", "g"), ("seeds", "seeds", "d"),
    ("fwd/step", "fwd_per_step", ".0f"), ("s/step", "s_per_step", ".2f"), ("metric", "metric", ""),
    ("final acc", "final_acc", ""), ("last acc", "last_acc", ""), ("best acc", "best_acc", ""), ("final EM", "final_em", ""), ("reached", "reached", ""),
    ("fwd to target", "fwd_target", ""), ("s to target", "s_target", ""),
]
COMPARE_COLUMNS: list[common.Column] = [
    ("task", "task", ""), ("optimizer", "optimizer", ""), ("forward passes to target vs MeZO", "verdict", ""),
    ("final acc - MeZO's", "final_accuracy_difference", "+.3f"),
]


def _first(bounds: tuple[int, int], size: int | None) -> tuple[int, int]:
    """The first ``size`` examples of the slice ``bounds`` (all of it for None)."""
    return bounds if size is None else (bounds[0], min(bounds[1], bounds[0] + size))


def parse_grid(items: Sequence[str]) -> dict[str, tuple[float, ...]]:
    """``["fzoo=1e-3,3e-3", "mezo:margin=1e-3"]`` → ``{"fzoo": (0.001, 0.003), "mezo:margin": (0.001,)}``
    (an ``optimizer:objective`` grid applies to that objective's runs only)."""
    grid = {}
    for item in items:
        label, _, values = item.partition("=")
        if label.partition(":")[0] not in OPTIMIZERS or not values:
            raise SystemExit(f"--grid {item!r}: expected NAME[:OBJECTIVE]=LR[,LR...] with NAME in {', '.join(OPTIMIZERS)}")
        grid[label] = tuple(float(v) for v in values.split(","))
    return grid


@dataclass(frozen=True)
class Plan:
    """What one invocation runs (from the command line)."""

    quick: bool
    tasks: list[str]
    grids: dict[str, tuple[float, ...]]  # optimizer -> lr grid (one lr: no tuning)
    seeds: list[int]
    budget: int
    eval_every: int
    tune_budget: int
    report_size: int | None
    tune_size: int | None
    target_gain: float | None  # None: each task's default
    model: str
    batch_size: int | None  # None: each task's default
    guard: bool = False
    guard_watch: str = "loss"
    objectives: tuple[str, ...] = ("loss",)
    keep_best: bool = False

    def cells(self, task: str) -> list[tuple[str, str]]:
        """(optimizer, objective) pairs to race on ``task``: each objective the task has, for each optimizer that
        can train on it."""
        return [(name, objective) for name in self.optimizers for objective in self.objectives
                if objective in TASKS[task].objectives and (name != "adamw" or objective in DIFFERENTIABLE)]

    @property
    def optimizers(self) -> list[str]:
        return [label for label in self.grids if ":" not in label]

    def grid_for(self, name: str, objective: str) -> tuple[float, ...]:
        """The lr grid of ``name`` on ``objective`` (``--grid name:objective=...`` where given)."""
        return self.grids.get(cell_label(name, objective), self.grids[name])

    def batch_for(self, task: str) -> int:
        return self.batch_size or TASKS[task].batch_size

    def gain_for(self, task: str) -> float:
        return TASKS[task].target_gain if self.target_gain is None else self.target_gain


class Experiment:
    """Runs the protocol for one task: lr tuning, then the seeds; finished runs are logged."""

    def __init__(self, plan: Plan, race: Race, log: RunLog) -> None:
        self.plan, self.race, self.log = plan, race, log
        self.tuning: list[dict[str, Any]] = []

    def run(self, spec: RunSpec, start: dict[str, float] | None) -> dict[str, Any]:
        done = self.log.get(spec)
        if done is None:
            began = time.perf_counter()
            done = self.race.run(spec, start, self.log.partial(spec))
            self.log.add(spec, done)
            print(f"  {spec.task} {spec.label} lr={spec.lr:g} seed={spec.seed} ({spec.eval_set}): "
                  f"{TASKS[spec.task].metric} {done['final_accuracy']:.3f} after {done['forward_equivalents']} fwd-eq, "
                  f"{done['train_seconds']:.0f} s training ({time.perf_counter() - began:.0f} s with eval)", flush=True)
        return done

    def choose_lr(self, task: str, name: str, objective: str) -> float:
        """The grid's lr with the best tune-set accuracy after a short seed-0 run (ties: lower loss)."""
        grid, plan = self.plan.grid_for(name, objective), self.plan
        if len(grid) == 1:
            return grid[0]
        tune = _first(TASKS[task].tune, plan.tune_size)
        tuned = [self.run(RunSpec(task, name, lr, 0, plan.tune_budget, plan.tune_budget, "tune", tune, plan.model,
                                  plan.batch_for(task), objective=objective), None) for lr in grid]
        def rank(r: dict[str, Any]) -> tuple[float, float]:  # a non-finite final loss is recorded as null
            return r["final_accuracy"], -(math.inf if r["final_loss"] is None else r["final_loss"])

        best = max(tuned, key=rank)
        self.tuning.append({"task": task, "optimizer": cell_label(name, objective), "grid": list(grid), "chosen_lr": best["lr"],
                            "tune_budget": plan.tune_budget, "tune_examples": tune[1] - tune[0],
                            "tune_accuracy": {f"{r['lr']:g}": r["final_accuracy"] for r in tuned}})
        return best["lr"]

    def run_race(self, task: str, report: tuple[int, int], start: dict[str, float]) -> dict[str, list[dict[str, Any]]]:
        """Every optimizer at its chosen lr, every seed, on the full budget, evaluated on the report set.

        All lrs are chosen first, then the runs go seed by seed, so that an interrupted (or
        still running) invocation already holds complete comparisons for the first seeds.
        """
        plan = self.plan
        lrs = {cell: self.choose_lr(task, *cell) for cell in plan.cells(task)}
        runs: dict[str, list[dict[str, Any]]] = {}
        for seed in plan.seeds:
            for (name, objective), lr in lrs.items():
                spec = RunSpec(task, name, lr, seed, plan.budget, plan.eval_every, "report", report, plan.model,
                               plan.batch_for(task), plan.guard and name != "adamw", plan.guard_watch, objective,
                               plan.keep_best)
                runs.setdefault(spec.label, []).append(self.run(spec, start))
        return runs


def parse_args(argv: list[str] | None) -> tuple[argparse.Namespace, Plan]:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    common.add_common_arguments(parser)
    parser.add_argument("--model", default="smollm2", help="smollm2 (real weights) or a random Llama size (tests)")
    parser.add_argument("--tasks", default=None,
                        help=f"comma-separated: {', '.join(TASKS)} (default: sst2 quick, sst2-2shot,rte full)")
    parser.add_argument("--optimizers", default=",".join(OPTIMIZERS), help=f"comma-separated subset of {', '.join(OPTIMIZERS)}")
    parser.add_argument("--grid", action="append", default=[], metavar="NAME=LR[,LR...]",
                        help="lr grid of one optimizer (default: the built-in grid in full mode, one lr in quick)")
    parser.add_argument("--seeds", type=int, default=None, help="seeds per optimizer (default 1 quick, 3 full)")
    parser.add_argument("--budget", type=int, default=None, help="forward-pass equivalents per run (36 quick, 720 full)")
    parser.add_argument("--eval-every", type=int, default=None, help="forward-pass equivalents (18 quick, 90 full)")
    parser.add_argument("--tune-budget", type=int, default=None, help="budget of an lr-tuning run (default budget/3)")
    parser.add_argument("--report-size", type=int, default=None, help="report examples (default 64 quick, else the task's)")
    parser.add_argument("--tune-size", type=int, default=None, help="tune examples (default: the task's)")
    parser.add_argument("--batch", type=int, default=None, help="examples per step (default: the task's)")
    parser.add_argument("--target-gain", type=float, default=None,
                        help="target = zero-shot report accuracy + this (default: the task's)")
    parser.add_argument("--objectives", default="loss",
                        help="comma-separated: loss, candidate_ce, margin (classification tasks), f1, exact_match "
                             "(squad); each optimizer trains on each its task has, AdamW on the differentiable ones")
    parser.add_argument("--resume", action="store_true", help="reuse runs recorded by an interrupted invocation")
    parser.add_argument("--guard", nargs="?", const="loss", default=None, choices=("loss", "eval"),
                        help="wrap the ZO optimizers in zopeft.Guard in the report runs (not the lr tuning): loss "
                             "(its defaults, judging the step losses) or eval (judging the tune slice's accuracy at "
                             "each evaluation, rolling back to the best evaluated weights; the report set is disjoint)")
    parser.add_argument("--keep-best", action="store_true",
                        help="load_best_model_at_end as zopeft train does it, judged on the tune slice: a run's final "
                             "accuracy is the report accuracy of the adapter of its best tune-slice evaluation (the "
                             "start included); 'last acc' is its last step's")
    parser.add_argument("--defaults", action="store_true",
                        help="what zopeft train does by default with an evaluation set: zo.objective auto "
                             "(candidate_ce on these tasks), the guard watching the evaluations and the best model "
                             "kept (= --objectives candidate_ce --guard eval --keep-best)")
    parser.add_argument("--summary-only", action="store_true",
                        help="train and evaluate nothing: the table, plot and JSON of every report run recorded in "
                             "--out-dir at this --budget, --batch and --report-size, each cell with its recorded seeds "
                             "(default --tasks: those recorded), e.g. after processes ran disjoint cells into it")
    args = parser.parse_args(argv)
    if args.defaults:
        args.objectives, args.guard, args.keep_best = "candidate_ce", "eval", True
    q = args.quick
    names = args.optimizers.split(",")
    budget, eval_every = args.budget or (36 if q else 720), args.eval_every or (18 if q else 90)
    plan = Plan(
        quick=q, tasks=(args.tasks or ("sst2" if q else "sst2-2shot,rte")).split(","),
        grids={n: (OPTIMIZERS[n].quick_lr,) if q else OPTIMIZERS[n].grid for n in names} | parse_grid(args.grid),
        seeds=list(range(args.seeds or (1 if q else 3))), budget=budget, eval_every=eval_every,
        tune_budget=args.tune_budget or max(eval_every, budget // 3), report_size=args.report_size or (64 if q else None),
        tune_size=args.tune_size, target_gain=args.target_gain, model=args.model, batch_size=args.batch,
        guard=args.guard is not None, guard_watch=args.guard or "loss", objectives=tuple(args.objectives.split(",")),
        keep_best=args.keep_best,
    )
    known = ("loss", *CANDIDATE_OBJECTIVES, *GENERATION_OBJECTIVES)
    unknown = [o for o in plan.objectives if o not in known]
    if unknown:
        raise SystemExit(f"--objectives: unknown {', '.join(unknown)}; choose from {', '.join(known)}")
    return args, plan


def main(argv: list[str] | None = None) -> dict[str, Any]:
    args, plan = parse_args(argv)
    common.setup(args.threads)
    device = common.resolve_device(args.device)
    machine = common.machine_info(device)
    q = plan.quick
    if q:
        tuned = "lr tuned on a grid" if any(len(g) > 1 for g in plan.grids.values()) else "1 lr per optimizer (no tuning)"
        print(f"QUICK MODE - a smoke test: {len(plan.seeds)} seed(s), {tuned}, {plan.budget} forward-pass equivalents, "
              f"{plan.report_size} report examples. The numbers below do not rank the optimizers.", flush=True)
    log = RunLog(common.result_path(args.out_dir, "convergence", device, q, ".runs.jsonl"),
                 args.resume or args.summary_only)
    if args.summary_only and args.tasks is None:
        plan = replace(plan, tasks=log.tasks())
        if not plan.tasks:
            raise SystemExit(f"--summary-only: {log.path} records no runs")
    experiment = None if args.summary_only else Experiment(plan, Race(plan.model, device), log)
    rows, curves, tasks = [], {}, {}
    for task in plan.tasks:
        report = _first(TASKS[task].report, plan.report_size)
        zero_shot = log.zero_shot(task, report, plan.model)
        if experiment is None:
            curves[task] = log.report_runs(task, report, plan)
            if zero_shot is None or not curves[task]:
                raise SystemExit(f"--summary-only: {log.path} records no run of {task} on report examples {report} "
                                 f"at budget {plan.budget}, batch {plan.batch_for(task)}; pass the race's --budget, "
                                 "--batch and --report-size")
        else:
            zero_shot = zero_shot or experiment.race.evaluate(experiment.race.fresh_model(0), task, report)
        tasks[task] = {**asdict(TASKS[task]), "batch_size": plan.batch_for(task), "report_examples": report[1] - report[0],
                       "zero_shot": zero_shot, "target_gain": plan.gain_for(task),
                       "target_accuracy": zero_shot["accuracy"] + plan.gain_for(task)}
        print(f"{task}: zero-shot report {TASKS[task].metric} {zero_shot['accuracy']:.3f} on {report[1] - report[0]} examples; "
              f"target {tasks[task]['target_accuracy']:.3f}", flush=True)
        if experiment is not None:
            curves[task] = experiment.run_race(task, report, zero_shot)
        rows += [summarise(task, name, runs[0]["lr"], runs, tasks[task]["target_accuracy"])
                 for name, runs in curves[task].items()]
    print(f"\nconvergence ({'QUICK, smoke-level' if q else 'full'}): {plan.budget} forward-pass equivalents per run "
          f"(AdamW step = {ADAMW_FORWARD_EQUIVALENTS}); " + "; ".join(
              f"{t}: batch {info['batch_size']}, target = zero-shot + {info['target_gain']:g}" for t, info in tasks.items()))
    table = common.print_table(rows, COLUMNS)
    comparison = compare(rows, plan.budget)
    print()
    compare_table = common.print_table(comparison, COMPARE_COLUMNS)
    print("\n".join(f"  {claim}" for claim in PAPERS.values()))
    batches = ", ".join(f"{t} batch {info['batch_size']}" for t, info in tasks.items())
    title = (f"SmolLM2-135M + LoRA r=8 q/v, {batches}, {len(plan.seeds)} seed(s), budget {plan.budget} "
             "fwd-eq" + (" - QUICK smoke run: not a ranking" if q else ""))
    png = plot(curves, {t: info["target_accuracy"] for t, info in tasks.items()},
               common.result_path(args.out_dir, "convergence", device, q, ".png"), title)
    print(f"wrote {png}")
    result = {
        "benchmark": "convergence",
        "quick": q,
        "honesty": ("quick mode: smoke-level (tiny budget and report set, few seeds and lrs); it does not rank "
                    "the optimizers") if q else "full mode",
        "machine": machine,
        "model": {"name": plan.model, "dtype": "fp32", "adapter": "LoRA r=8 alpha 16 on q_proj/v_proj (B = 0 at start)"},
        "tasks": tasks,
        "seeds": plan.seeds,
        "budget_forward_equivalents": plan.budget,
        "eval_every": plan.eval_every,
        "counting": (f"ZO: one loss evaluation = one forward pass (zopeft's forward_passes); AdamW: one step = "
                     f"{ADAMW_FORWARD_EQUIVALENTS} forward-pass equivalents (1 forward + backward ~ 2 forwards, "
                     "estimated, not measured); a greedy generation (a point's evaluation under f1 / exact_match) = "
                     f"{GENERATION_FORWARD_EQUIVALENTS} (the prefill + its cached decoding steps, measured 1.4-2.0x a "
                     "loss forward on this CPU). ZO evaluations use the batched path (zopeft.batched)."),
        "optimizers": {n: {"fixed": OPTIMIZERS[n.partition(":")[0]].kwargs, "grid": list(g)} for n, g in plan.grids.items()},
        "objectives": list(plan.objectives),
        "tuning": ("not summarised (--summary-only: the recorded report runs)" if experiment is None
                   else experiment.tuning or "none (one lr per optimizer)"),
        "table": table,
        "comparison_table": compare_table,
        "results": rows,
        "comparison": comparison,
        "papers": PAPERS,
        "runs": [r for task_curves in curves.values() for runs in task_curves.values() for r in runs],
        "png": str(png),
    }
    return common.save_result(result, args.out_dir, device)


if __name__ == "__main__":
    main()
