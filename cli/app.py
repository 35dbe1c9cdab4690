"""The ``zopeft`` command line: a thin Typer layer over :mod:`zopeft`.

Expected problems (a bad recipe key, a missing file, a target module that
matches nothing) print one ``error:`` line per problem and exit with code 2;
``--debug`` shows the traceback instead, and the libraries' own warnings.
``--help``, ``recipes`` and ``validate`` never import torch or transformers.
"""

from __future__ import annotations

import contextlib
import logging
import os
import shlex
import shutil
import sys
import warnings
from collections.abc import Iterator
from pathlib import Path
from typing import Annotated, Optional

import typer
import yaml

app = typer.Typer(
    name="zopeft",
    help="Zeroth-order (forward-only) fine-tuning of PEFT adapters: train, eval, merge, validate recipes.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
)
recipes_app = typer.Typer(help="List the bundled recipes, or copy one out to edit (`zopeft recipes cp NAME DEST`).")
app.add_typer(recipes_app, name="recipes")

RecipeArg = Annotated[Path, typer.Argument(help="recipe YAML file (see `zopeft recipes`)")]
Overrides = Annotated[Optional[list[str]], typer.Argument(help="dotted overrides: max_steps=200 zo.eps=1e-3")]
Debug = Annotated[bool, typer.Option("--debug", help="show tracebacks and the libraries' warnings")]
Overwrite = Annotated[bool, typer.Option("--overwrite", help="replace a previous output of this command (nothing else)")]
Threads = Annotated[Optional[int], typer.Option(
    "--threads", help="torch CPU threads (the recipe's threads key; default: what torch chooses)")]
ReplaceFile = Annotated[bool, typer.Option("--overwrite", help="replace an existing output file")]
_NO_BARS = "HF_HUB_DISABLE_PROGRESS_BARS"
MAX_POINTS, MAX_SPAN = 50, 1e6  # lr-find: each point is a short training run; the grid spans lr/span .. lr*span


@contextlib.contextmanager
def _quiet_libraries() -> Iterator[None]:
    """Hide what users cannot act on, for this command only: bitsandbytes' optional-kernel and the kernels hub's
    offline warnings, FutureWarnings, load progress bars. The CLI called from Python (a notebook, CliRunner) leaves
    the caller's warning filters, loggers, environment and progress bars as they were."""
    loggers = [logging.getLogger(name) for name in ("bitsandbytes", "kernels")]
    levels = [logger.level for logger in loggers]
    env_bars = os.environ.get(_NO_BARS)
    bars_on = _progress_bars_on()
    try:
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", category=FutureWarning)
            for logger in loggers:
                logger.setLevel(logging.ERROR)
            os.environ.setdefault(_NO_BARS, "1")  # read when transformers is imported
            if "transformers" in sys.modules:  # imported already (e.g. the CLI called from Python)
                from transformers.utils import logging as hf_logging

                hf_logging.disable_progress_bar()
            yield
    finally:
        for logger, level in zip(loggers, levels):
            logger.setLevel(level)
        if env_bars is None:
            os.environ.pop(_NO_BARS, None)
        if bars_on and "transformers" in sys.modules:
            from transformers.utils import logging as hf_logging

            hf_logging.enable_progress_bar()


def _progress_bars_on() -> bool:
    """Whether the libraries show download/load progress bars now (transformers' switch, else the environment's)."""
    if "transformers" in sys.modules:
        from transformers.utils import logging as hf_logging

        return hf_logging.is_progress_bar_enabled()
    return os.environ.get(_NO_BARS, "").upper() not in {"1", "ON", "YES", "TRUE"}


@contextlib.contextmanager
def _user_errors(debug: bool) -> Iterator[None]:
    """Turn expected problems into `error:` lines and exit code 2 (tracebacks and library noise with --debug)."""
    from zopeft.recipe import RecipeError

    with contextlib.nullcontext() if debug else _quiet_libraries():
        try:
            yield
        except RecipeError as err:
            if debug:
                raise
            for line in err.errors:
                typer.secho(f"error: {line}", fg="red", err=True)
            raise typer.Exit(2) from None
        except (ValueError, OSError, ImportError) as err:  # OSError: FileNotFoundError; ImportError: optional package
            if debug:
                raise
            typer.secho(f"error: {str(err).splitlines()[0] if str(err) else type(err).__name__}", fg="red", err=True)
            raise typer.Exit(2) from None


def _recipe_file(recipe: Path) -> Path:
    """RECIPE as given, else the bundled recipe it names (``llama3_lora_fzoo``, with or without ``.yaml``)."""
    from zopeft.hints import did_you_mean
    from zopeft.recipe import RecipeError, bundled_recipes_dir

    if recipe.exists():
        return recipe
    name = recipe.name if recipe.suffix in (".yaml", ".yml") else f"{recipe.name}.yaml"
    if (bundled_recipes_dir() / name).is_file():
        return bundled_recipes_dir() / name
    if recipe.parent == Path("."):  # a bare name: perhaps a misspelled bundled one
        names = [p.stem for p in bundled_recipes_dir().glob("*.yaml")]
        raise RecipeError([f"recipe {str(recipe)!r}: no such file and no bundled recipe of that name"
                           f"{did_you_mean(Path(name).stem, names)}; see `zopeft recipes`"])
    return recipe


def _resolve(recipe: Path, overrides: list[str] | None):
    from zopeft.recipe import load_recipe

    resolved = load_recipe(_recipe_file(recipe), overrides or [])
    for note in resolved.notes():
        typer.secho(f"note: {note}", fg="yellow", err=True)
    return resolved


def _threads(threads: int | None) -> list[str]:
    """``--threads N`` as the override ``threads=N`` (validated with the recipe)."""
    return [] if threads is None else [f"threads={threads}"]


def _cost(result) -> str:
    """The forward-pass equivalents of a run, labelled (a backward pass counts as two forwards)."""
    if result.forward_equivalents == result.forward_passes:
        return f"{result.forward_passes} forward passes (= forward-pass equivalents: no backward pass)"
    return (f"{result.forward_passes} forward + {result.forward_passes} backward passes = "
            f"{result.forward_equivalents} forward-pass equivalents (a backward ≈ 2 forwards)")


def _untrained(result) -> str | None:
    """What to say when no step of the run made an update (every one skipped), else None."""
    skipped = sum(result.skipped.values())
    if not result.steps_run or skipped < result.steps_run:
        return None
    reasons = ", ".join(f"{why if why.startswith('non-finite') else 'every point equal, ' + why}: {n}"
                        for why, n in result.skipped.items())
    if all(why.startswith("non-finite") for why in result.skipped):
        fix = "no point of any step gave a finite value: check zo.objective's function, the data and compute_dtype"
    else:
        fix = "raise zo.eps or per_device_train_batch_size, or use zo.objective: margin (see the warning above)"
    return (f"no step trained: all {result.steps_run} steps were skipped ({reasons}), so the adapter in "
            f"{result.output_dir} is the one the run started from; {fix}")


def _resume_command(recipe: Path, overrides: list[str] | None, threads: int | None) -> str:
    """The command line that resumes a stopped ``zopeft train`` from its latest checkpoint (under torchrun, with as
    many processes as wrote it)."""
    from zopeft.distributed import launch_rank

    kept = [o for o in overrides or [] if not o.startswith(("resume_from_checkpoint=", "overwrite_output_dir="))]
    flags = [] if threads is None else ["--threads", str(threads)]
    command = shlex.join(["zopeft", "train", str(recipe), *kept, "resume_from_checkpoint=auto", *flags])
    world = launch_rank()[1]
    return command if world == 1 else f"torchrun --nproc_per_node {world} ... --no-python {command}"


def _stopped_line(stopped, output_dir: str, resume: str) -> str:
    """Where a run stopped by a signal left off, and how to go on."""
    from zopeft.rundir import RunDir

    if stopped.step is not None:
        return (f"stopped by {stopped.name} after step {stopped.step}: saved {output_dir}/checkpoint-{stopped.step}; "
                f"resume with: {resume}")
    latest = RunDir(output_dir).checkpoints()
    if latest:
        return (f"stopped by {stopped.name} before this run finished a step; the latest checkpoint is {latest[-1]}; "
                f"resume with: {resume}")
    return f"stopped by {stopped.name} before the first step: nothing to resume; run the same command again"


@app.command()
def train(
    recipe: RecipeArg,
    overrides: Overrides = None,
    overwrite: Annotated[bool, typer.Option(
        "--overwrite", help="start over in an output_dir that holds a previous run, or write beside files zopeft did "
        "not write (never replacing them) (overwrite_output_dir=true)")] = False,
    threads: Threads = None,
    debug: Debug = False,
) -> None:
    """Train an adapter as the recipe says (overrides: key=value, dotted for nested keys).

    SIGTERM or Ctrl-C: the step in progress ends, a checkpoint is saved, and the exit status is 128 + the signal.
    """
    from zopeft.stopping import Stopped

    with _user_errors(debug):
        from zopeft.distributed import launch_rank
        from zopeft.runner import train as run

        flags = [*(["overwrite_output_dir=true"] if overwrite else []), *_threads(threads)]
        resolved = _resolve(recipe, [*(overrides or []), *flags])
        reports = launch_rank()[0] == 0  # under torchrun rank 0 alone speaks for the run, as it logs and saves
        try:
            result = run(resolved, echo=typer.echo)
        except Stopped as stopped:
            if reports:
                typer.secho(_stopped_line(stopped, resolved.output_dir, _resume_command(recipe, overrides, threads)),
                            fg="yellow", err=True)
            raise typer.Exit(stopped.exit_code) from None
    if reports:
        _report(result)
    untrained = _untrained(result)
    if untrained:
        if reports:
            typer.secho(f"error: {untrained}", fg="red", err=True)
        raise typer.Exit(1)


def _report(result) -> None:
    """The run's last lines: the evaluation of the adapter left against the start, the cost, the time."""
    from zopeft.best_model import selection_note
    from zopeft.metrics import compare_line, majority_note

    if result.eval_after:
        typer.echo(f"eval on {result.evaluated_on}: {compare_line(result.eval_before, result.eval_after)}"
                   f"{_kept(result.best_model)}")
        for note in (selection_note(result.best_model), majority_note(result.eval_after)):
            if note:
                typer.echo(f"note: {note}")
    found = (f" + {result.lr_find_forward_passes} of lr-find (learning_rate: auto: {result.learning_rate:g})"
             if result.lr_find_forward_passes else "")
    typer.echo(f"done: {result.steps} steps, {_cost(result)}{found} -> {result.output_dir}")
    rest = result.wall_seconds - result.train_seconds - result.eval_seconds - result.lr_find_seconds
    searched = f"{_seconds(result.lr_find_seconds)}s lr-find + " if result.lr_find_forward_passes else ""
    typer.echo(f"time: {_seconds(result.wall_seconds)}s wall = {searched}{_seconds(result.train_seconds)}s training + "
               f"{_seconds(result.eval_seconds)}s evaluation + {_seconds(rest)}s loading, checks and saving")


def _kept(kept: dict | None) -> str:
    """`` (the adapter of step 40, eval_accuracy 0.7900; the last step, 80, scored 0.6500)`` when the best is not the
    last (:func:`zopeft.best_model.kept_adapter`)."""
    from zopeft.best_model import kept_adapter

    return "" if kept is None or kept["step"] == kept["last_step"] else f" ({kept_adapter(kept)})"


def _seconds(value: float) -> str:
    """Tenths of a second, or milliseconds below 0.1 s (a short part never reads as 0.0)."""
    return f"{value:.1f}" if value >= 0.1 else f"{value:.3f}"


@app.command("eval")
def evaluate(
    recipe: RecipeArg,
    overrides: Overrides = None,
    adapter: Annotated[Optional[Path], typer.Option(help="trained adapter directory (default: the untrained model)")] = None,
    split: Annotated[str, typer.Option(help="dev: the evaluation records (eval_dataset, what val_size holds out, or "
                                       "the dataset's dev/validation split); train: the records trained on; select: the "
                                       "records the guard judges (zo.guard.select_size); or another split of the dataset "
                                       "(a saved DatasetDict's test)")] = "dev",
    output: Annotated[Optional[Path], typer.Option(help="JSON file for the metrics")] = None,
    overwrite: ReplaceFile = False,
    threads: Threads = None,
    debug: Debug = False,
) -> None:
    """Evaluate on a split: accuracy, macro-F1, loss, per-class precision / recall and the confusion matrix
    (a generation task: F1, exact match and loss, and each record's generation in generations_SPLIT.jsonl)."""
    with _user_errors(debug):
        from zopeft.jsonl import dumps as strict_json
        from zopeft.metrics import collapse_warning, majority_note, report_lines
        from zopeft.ownership import check_output_file, write_output_file
        from zopeft.resolved import task_settings
        from zopeft.runner import evaluate as run

        resolved = _resolve(recipe, [*(overrides or []), *_threads(threads)])
        target = output or (adapter or Path(resolved.output_dir)) / f"eval_{split}.json"
        written = [target]
        if task_settings(resolved)["kind"] == "generation":  # each record's prompt, generation, answers and scores
            written.append(target.with_name(f"generations_{split}.jsonl"))
        for path in written:
            check_output_file(path, overwrite=overwrite, option="--output", written_by="zopeft eval")
        metrics = run(resolved, adapter=adapter, split=split)
        generations = metrics.pop("generations", None)
        write_output_file(target, strict_json(metrics, indent=1), "zopeft eval")
        if generations is not None:
            write_output_file(written[1], "".join(strict_json(row, ensure_ascii=False) + "\n" for row in generations),
                              "zopeft eval")
    typer.echo(f"eval on {metrics['evaluated_on']}")
    for line in report_lines(metrics):
        typer.echo(line)
    note = majority_note(metrics)
    if note:
        typer.echo(f"note: {note}")
    warning = collapse_warning(metrics)
    if warning:
        typer.secho(f"warning: {warning}", fg="yellow", err=True)
    typer.echo(f"written: {', '.join(map(str, written))}")


@app.command()
def generate(
    source: Annotated[Path, typer.Argument(help="a recipe (its base model), a training output_dir or checkpoint-N "
                                           "(its adapter), or a merged model directory")],
    prompt: Annotated[Optional[list[str]], typer.Option(
        help="a prompt, used as given (\\n: a newline); repeat for several")] = None,
    file: Annotated[Optional[Path], typer.Option(
        help="records (.jsonl, .json, .csv) formatted with the recipe's template; scored where they hold answers")] = None,
    recipe: Annotated[Optional[Path], typer.Option(
        help="the recipe for a merged model (template, max_new_tokens, stop_strings), or instead of a run's")] = None,
    max_new_tokens: Annotated[Optional[int], typer.Option(help="new tokens at most (default: the recipe's, else 16)")] = None,
    threads: Threads = None,
    debug: Debug = False,
) -> None:
    """Print what the model generates greedily: for --prompt the answers, for --file one JSON line per record."""
    with _user_errors(debug):
        from zopeft.data import load_records
        from zopeft.inference import generate as run
        from zopeft.jsonl import dumps as strict_json
        from zopeft.recipe import unescape

        if (prompt is None) == (file is None):
            raise ValueError("give --prompt TEXT or --file RECORDS, one of them")
        records = load_records(file) if file is not None else None
        rows = run(source, prompts=[unescape(p) for p in prompt] if prompt else None, records=records, recipe=recipe,
                   max_new_tokens=max_new_tokens, threads=threads)
    for row in rows:
        typer.echo(row["generation"] if file is None else strict_json(row, ensure_ascii=False))


@app.command()
def merge(
    adapter: Annotated[Path, typer.Option(help="adapter directory (a training output_dir or checkpoint)")],
    out: Annotated[Path, typer.Option(help="directory for the merged model")],
    dtype: Annotated[str, typer.Option(help="bf16 | fp16 | fp32 (or bfloat16 | float16 | float32)")] = "bf16",
    max_shard_size: Annotated[str, typer.Option(help="largest safetensors shard, e.g. 5GB")] = "5GB",
    recipe: Annotated[Optional[Path], typer.Option(help="recipe (default: recipe.yaml beside the adapter)")] = None,
    overwrite: Overwrite = False,
    debug: Debug = False,
) -> None:
    """Merge a LoRA adapter into its base, reloaded unquantized; write sharded safetensors and verify logits."""
    with _user_errors(debug):
        from zopeft.merge import describe_checks, merge_adapter

        report = merge_adapter(adapter, out, dtype=dtype, max_shard_size=max_shard_size,
                               recipe_path=recipe and _recipe_file(recipe), overwrite=overwrite)
    typer.echo(f"merged model: {report['out_dir']} ({len(report['files'])} files)")
    for line in describe_checks(report):
        typer.echo(line)


@app.command()
def replay(
    run_dir: Annotated[Path, typer.Argument(help="a ZO training output_dir (recipe.yaml + zo_steps.jsonl)")],
    out: Annotated[Path, typer.Option(help="directory for the rebuilt adapter")],
    overwrite: Overwrite = False,
    debug: Debug = False,
) -> None:
    """Rebuild a ZO run's adapter from its recipe and step log (zo_steps.jsonl) without a forward pass."""
    with _user_errors(debug):
        from zopeft.replay import replay_run

        result = replay_run(run_dir, out, overwrite=overwrite)
    for note in result["notes"]:
        typer.secho(f"note: {note}", fg="yellow", err=True)
    kept = result["kept_step"]
    kept = "" if kept is None else f" (the adapter the run left is that of step {kept}: load_best_model_at_end)"
    typer.echo(f"replayed {result['steps']} steps -> {result['out_dir']}{kept}")
    if result["identical"] is None:
        typer.echo(f"not compared: {run_dir} holds no final adapter of these {result['steps']} steps")
    elif result["identical"]:
        typer.echo(f"bit-identical to {result['compared']}")
    else:
        typer.secho(f"error: differs from {result['compared']} (another device or library version?)", fg="red", err=True)
        raise typer.Exit(1)


@app.command()
def validate(recipe: RecipeArg, overrides: Overrides = None, debug: Debug = False) -> None:
    """Print the resolved recipe and what a run will use (task, prompt, label-word tokens, data), or its errors."""
    with _user_errors(debug):
        from zopeft.resolved import effective_lines

        resolved = _resolve(recipe, overrides)
        effective = effective_lines(resolved)
    typer.echo(resolved.to_yaml().rstrip())
    if resolved.is_zeroth_order:
        from zopeft.registry import hyperparameters

        typer.echo(f"# settings of {resolved.zo.optimizer} (zo.<key>):")
        for name, setting in hyperparameters(resolved.zo.optimizer).items():
            typer.echo(f"#   {setting.describe(name)}")
    typer.echo("# effective values (what train and eval will use):")
    for line in effective:
        typer.echo(f"#   {line}")
    typer.secho("recipe is valid", fg="green", err=True)


@app.command("lr-find")
def lr_find(
    recipe: RecipeArg,
    overrides: Overrides = None,
    budget: Annotated[float, typer.Option(help="the share of the run's forward passes lr-find may spend")] = 0.25,
    points: Annotated[int, typer.Option(help="learning rates in the grid (fewer when the budget cannot pay for them)")] = 7,
    span: Annotated[float, typer.Option(help="the grid runs from lr/span to lr*span (log-spaced; learning_rate: auto: "
                                        "1e-5 to 1e-1)")] = 30.0,
    output: Annotated[Optional[Path], typer.Option(help="JSON file (default: output_dir/lr_find.json)")] = None,
    write_recipe: Annotated[Optional[Path], typer.Option(help="write a copy of the recipe with the recommended lr")] = None,
    overwrite: Annotated[bool, typer.Option("--overwrite", help="replace existing --output / --write-recipe files")] = False,
    debug: Debug = False,
) -> None:
    """Successive halving over a log-spaced grid of learning rates around the recipe's; print and save the pick."""
    with _user_errors(debug):
        from zopeft.jsonl import dumps as strict_json
        from zopeft.lr_find import lr_find as find
        from zopeft.ownership import check_output_file, write_output_file

        for ok, problem in ((0 < budget <= 1, f"--budget {budget:g}: a share of the run's forward passes in (0, 1]"),
                            (2 <= points <= MAX_POINTS, f"--points {points}: from 2 to {MAX_POINTS} learning rates "
                                                        "(each is a short training run)"),
                            (1 < span <= MAX_SPAN, f"--span {span:g}: above 1 and at most {MAX_SPAN:g} (the grid "
                                                   "runs from lr/span to lr*span)")):
            if not ok:
                raise ValueError(problem)
        resolved = _resolve(recipe, overrides)
        target = output or Path(resolved.output_dir) / "lr_find.json"
        for path, option in ((target, "--output"), (write_recipe, "--write-recipe")):
            if path is not None:
                check_output_file(path, overwrite=overwrite, option=option, written_by="zopeft lr-find")
        result = find(resolved, budget=budget, points=points, span=span, echo=typer.echo, progress=sys.stderr.isatty())
    typer.echo(f"{'lr':>10} {'steps':>6} {'value':>9} {'loss':>9}  status  (ranked by {result.ranked_by})")
    for row in result.rows:
        last = row["evaluations"][-1] if row["evaluations"] else None
        value, loss = (f"{last['value']:9.4f}", f"{last['loss']:9.4f}") if last else (f"{'-':>9}", f"{'-':>9}")
        mark = " <- recommended" if row["lr"] == result.recommended else ""
        typer.echo(f"{row['lr']:10.3g} {row['steps']:6d} {value} {loss}  {row['status']}{mark}")
    typer.echo(result.summary())
    write_output_file(target, strict_json({**result.to_dict(), "recipe_lr": resolved.learning_rate}, indent=1),
                      "zopeft lr-find")
    if result.recommended is None:
        typer.echo("no learning rate survived (each diverged or stalled): lower the grid (learning_rate, --span)")
    else:
        beat = "" if result.improved else "; none beat the start: the run may need more steps, or a larger --span"
        typer.echo(f"recommended learning_rate: {result.recommended:.3g} ({result.rule}){beat}")
        if write_recipe is not None:  # the resolved recipe (overrides included) with the recommended lr
            tuned = resolved.model_copy(update={"learning_rate": float(f"{result.recommended:.3g}"),
                                                "lr_find_pick": None})
            write_output_file(write_recipe, tuned.to_yaml(), "zopeft lr-find")
            typer.echo(f"written: {write_recipe}")
    typer.echo(f"written: {target}")


@recipes_app.callback(invoke_without_command=True)
def list_recipes(ctx: typer.Context) -> None:
    """List the bundled recipes with their one-line descriptions."""
    from zopeft.recipe import bundled_recipes_dir

    if ctx.invoked_subcommand is not None:
        return
    for path in sorted(bundled_recipes_dir().glob("*.yaml")):
        description = (yaml.safe_load(path.read_text()) or {}).get("description", "")
        typer.echo(f"{path.stem:32s} {description}")


@recipes_app.command("cp")
def copy_recipe(name: str, dest: Path, overwrite: Annotated[bool, typer.Option(
        "--overwrite", help="replace DEST's recipe of that name (your edits are lost)")] = False) -> None:
    """Copy the bundled recipe NAME to DEST (a file or a directory) to edit it."""
    from zopeft.hints import did_you_mean
    from zopeft.recipe import RecipeError, bundled_recipes_dir

    with _user_errors(False):
        source = bundled_recipes_dir() / (name if name.endswith(".yaml") else f"{name}.yaml")
        if not source.exists():
            names = [p.stem for p in bundled_recipes_dir().glob("*.yaml")]
            raise RecipeError([f"no bundled recipe {name!r}{did_you_mean(name, names)}; see `zopeft recipes`"])
        target = dest / source.name if dest.is_dir() else dest
        if not target.parent.is_dir():
            raise RecipeError([f"DEST: {target.parent} is not a directory; create it or copy into an existing one"])
        if target.exists() and not overwrite:
            raise RecipeError([f"DEST: {target} exists; pass --overwrite to replace it, or choose another path"])
        shutil.copyfile(source, target)
    typer.echo(f"copied {source.name} -> {target}")


@app.command()
def env(debug: Debug = False) -> None:
    """Versions of the stack and the device zopeft would use."""
    with contextlib.nullcontext() if debug else _quiet_libraries():
        import bitsandbytes
        import peft
        import torch
        import transformers

        import zopeft

        cuda = torch.cuda.is_available()
        rows = {
            "zopeft": zopeft.__version__, "python": sys.version.split()[0], "torch": torch.__version__,
            "transformers": transformers.__version__, "peft": peft.__version__, "bitsandbytes": bitsandbytes.__version__,
            "cuda": torch.version.cuda if cuda else "not available",
            "device": torch.cuda.get_device_name(0) if cuda else f"cpu ({os.cpu_count()} cores, "
                                                                  f"{torch.get_num_threads()} threads)",
            "optimizers": ", ".join(zopeft.available_optimizers()),
        }
    for k, v in rows.items():
        typer.echo(f"{k:14s} {v}")


def main() -> None:
    """Console-script entry point."""
    try:
        app()
    except SystemExit as done:
        if "torch" in sys.modules:  # a command that never imported torch ran no distributed job
            from zopeft.distributed import exit_worker

            exit_worker(done.code)  # a torchrun worker ends here, past torch's unreliable teardown
        raise
