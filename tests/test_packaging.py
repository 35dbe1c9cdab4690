"""After `pip install`: the recipes ship inside the package, start-up imports nothing heavy, output is quiet."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest
from test_cli import REPO, write_recipe

HEAVY = ("torch", "transformers", "peft", "bitsandbytes")
CLI = "import sys; from zopeft_cli.app import main; sys.argv[0] = 'zopeft'; main()"


def run_python(code: str, *args: str, env: dict | None = None, cwd: Path = REPO) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-c", code, *args], capture_output=True, text=True, cwd=cwd,
                          env={**os.environ, **(env or {})}, timeout=300)


def heavy_modules_after(*cli_args: str) -> list[str]:
    """The heavy libraries in sys.modules when the CLI command (or, with no args, `import zopeft`) ends."""
    report = f"import atexit, sys; atexit.register(lambda: print('HEAVY', [m for m in {HEAVY!r} if m in sys.modules]))"
    done = run_python(f"{report}\n" + (CLI if cli_args else "import zopeft; zopeft.__all__"), *cli_args)
    assert done.returncode == 0, done.stderr
    return json.loads(done.stdout.splitlines()[-1].removeprefix("HEAVY ").replace("'", '"'))


@pytest.mark.parametrize("args", [(), ("--help",), ("recipes",), ("validate", "recipes/llama3_lora_fzoo.yaml")],
                         ids=["import", "help", "recipes", "validate"])
def test_light_commands_never_import_torch_or_transformers(args):
    assert heavy_modules_after(*args) == []


def test_a_public_name_imports_on_first_use():
    done = run_python("import sys, zopeft; zopeft.FZOO; print('torch' in sys.modules, 'FZOO' in dir(zopeft))")
    assert done.stdout.split() == ["True", "True"]
    assert "has no attribute 'nope'" in run_python("import zopeft; zopeft.nope").stderr


def test_recipes_ship_in_the_wheel_and_work_without_the_repository(tmp_path):
    source = tmp_path / "src"  # a copy: building in the checkout would leave build/ and *.egg-info there
    for name in ("zopeft", "cli", "recipes"):
        shutil.copytree(REPO / name, source / name, ignore=shutil.ignore_patterns("__pycache__"))
    for name in ("pyproject.toml", "README.md"):
        shutil.copy(REPO / name, source / name)
    built = subprocess.run([sys.executable, "-m", "pip", "wheel", "-q", "--no-deps", "--no-build-isolation", "--no-index",
                            "-w", str(tmp_path / "dist"), str(source)], capture_output=True, text=True, timeout=300)
    assert built.returncode == 0, built.stderr
    assert "absent from the `packages` configuration" not in built.stdout + built.stderr  # an error in future setuptools
    (wheel,) = (tmp_path / "dist").glob("zopeft-*.whl")
    names = zipfile.ZipFile(wheel).namelist()
    data = sorted(str(p.relative_to(REPO)) for p in (REPO / "zopeft" / "bundled_data").rglob("*")
                  if p.suffix in (".md", ".jsonl", ".tsv"))
    assert [d for d in data if d not in names] == []  # the bundled datasets and their provenance
    modules = sorted(str(p.relative_to(REPO)) for p in (REPO / "zopeft").rglob("*.py") if "bundled_data" not in p.parts)
    assert [m for m in modules if m not in names] == []  # every subpackage is listed in pyproject.toml
    bundled = sorted(p.name for p in (REPO / "recipes").glob("*.yaml"))
    assert sorted(n.split("/")[-1] for n in names if n.startswith("zopeft/recipes/")) == bundled

    site = tmp_path / "site"  # the installed layout, with no checkout beside it
    zipfile.ZipFile(wheel).extractall(site)
    env = {"PYTHONPATH": str(site)}
    where = run_python("import zopeft.recipe as r; print(r.__file__); print(r.bundled_recipes_dir())", env=env, cwd=tmp_path)
    module, recipes = where.stdout.split()
    assert module.startswith(str(site)) and recipes == str(site / "zopeft" / "recipes")
    imported = run_python("import zopeft; zopeft.loss_closure; import zopeft.batched.adapters.lora", env=env, cwd=tmp_path)
    assert imported.returncode == 0, imported.stderr
    listed = run_python(CLI, "recipes", env=env, cwd=tmp_path)
    assert listed.returncode == 0 and all(Path(b).stem in listed.stdout for b in bundled)
    copied = run_python(CLI, "recipes", "cp", "llama3_lora_fzoo", str(tmp_path), env=env, cwd=tmp_path)
    assert copied.returncode == 0, copied.stderr
    assert (tmp_path / "llama3_lora_fzoo.yaml").read_text() == (REPO / "recipes" / "llama3_lora_fzoo.yaml").read_text()


def test_library_noise_is_hidden_unless_debug(tmp_path):
    path = write_recipe(tmp_path, quantization_bit=4, max_eval_samples=2)
    done = run_python(CLI, "eval", str(path), "--output", str(tmp_path / "m.json"))
    assert done.returncode == 0, done.stderr
    for noise in ("kernels-community", "FutureWarning", "Loading weights"):
        assert noise not in done.stderr, done.stderr
    assert "\naccuracy " in done.stdout
    loud = run_python(CLI, "eval", str(path), "--output", str(tmp_path / "m.json"), "--overwrite", "--debug")
    assert loud.returncode == 0  # what the quieting hides is really there (which of it depends on the caches)
    assert any(noise in loud.stderr for noise in ("kernels-community", "FutureWarning", "Loading weights")), loud.stderr
