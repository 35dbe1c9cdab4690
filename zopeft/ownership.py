"""What zopeft wrote in a directory, so that it never replaces or removes what it did not write.

Every directory zopeft writes into on its own account (a training ``output_dir``, a ``merge`` or
``replay`` output, the folder of an ``eval`` or ``lr-find`` result it created) holds
``.zopeft-manifest.json``: the command that made it and the names zopeft wrote there, recorded
*before* each is written (a killed write leaves a listed name that does not exist, never an
unlisted file of its own).  Anything else in such a directory is the user's.  A result file (of
``eval``, ``lr-find``) is listed with the command that wrote it: another result may replace it
(the same command's without ``--overwrite``), never a file of the directory's own output (a run's).

Files are written whole: under a temporary name, ``.NAME.zopeft-tmp-PID`` (``.NAME.zopeft-old-PID``
for a directory moved aside while its replacement goes in), then renamed.  Those names are
zopeft's alone, so the start-up clean-up of what a killed process left removes only them.
"""

from __future__ import annotations

import json
import os
import re
import shutil
from collections.abc import Iterable
from pathlib import Path

from .recipe import RecipeError

__all__ = [
    "LOCK_NAME", "MANIFEST_NAME", "aside", "check_output_file", "claim", "foreign", "manifest", "remove",
    "remove_stale_temporaries", "temporary", "write_output_file", "write_text_atomic",
]

MANIFEST_NAME, LOCK_NAME = ".zopeft-manifest.json", ".zopeft.lock"
PID_MAX = 1 << 22  # Linux's largest process id (pid_max); a longer number is not one of zopeft's temporaries
_TEMPORARY = re.compile(r"\.(?P<name>.+)\.zopeft-(?P<kind>tmp|old)-(?P<pid>[1-9]\d{0,6})")


def temporary(final: Path) -> Path:
    """Where ``final`` is assembled before it is renamed into place."""
    return final.with_name(f".{final.name}.zopeft-tmp-{os.getpid()}")


def aside(final: Path) -> Path:
    """Where a directory being replaced waits until its replacement is in place."""
    return final.with_name(f".{final.name}.zopeft-old-{os.getpid()}")


def write_text_atomic(path: str | Path, text: str) -> None:
    """Write a text file via a temporary file and rename."""
    path = Path(path)
    tmp = temporary(path)
    tmp.write_text(text)
    os.replace(tmp, path)


def remove(path: Path) -> None:
    """Remove a file, a link (never what it points to) or a directory tree."""
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path, ignore_errors=True)
    else:
        path.unlink(missing_ok=True)


def _process_alive(pid: int) -> bool:
    """Whether a process with this id runs on this machine."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # it exists, owned by another user
        return True
    return True


def _stale(name: str) -> re.Match[str] | None:
    """The parts of one of zopeft's temporaries whose process is gone, else None (any other name)."""
    match = _TEMPORARY.fullmatch(name)
    if match is None or int(match["pid"]) > PID_MAX:
        return None
    pid = int(match["pid"])
    return None if pid == os.getpid() or _process_alive(pid) else match


def remove_stale_temporaries(directory: str | Path) -> list[str]:
    """Remove the ``.NAME.zopeft-tmp-PID`` / ``.NAME.zopeft-old-PID`` entries in ``directory`` whose process is gone.

    These are what a process killed while writing leaves; no other name is touched.  One killed
    between the two renames of a directory's replacement (``NAME`` already moved aside to
    ``.NAME.zopeft-old-PID``) left a complete ``.NAME.zopeft-tmp-PID``: that one is put in place as
    ``NAME``.  Returns what was done, a name each.
    """
    done = []
    for path in sorted(Path(directory).glob(".*")):  # .NAME.zopeft-old-PID sorts before .NAME.zopeft-tmp-PID
        match = _stale(path.name)
        if match is None or not os.path.lexists(path):
            continue
        final, new = path.with_name(match["name"]), path.with_name(f".{match['name']}.zopeft-tmp-{match['pid']}")
        if match["kind"] == "old" and new.is_dir() and not new.is_symlink() and not os.path.lexists(final):
            os.replace(new, final)
            done.append(f"{new.name} (complete: now {final.name})")
        remove(path)
        done.append(path.name)
    return done


# ----- the manifest ----------------------------------------------------------------------------------
def manifest(directory: str | Path) -> dict | None:
    """``{"written_by": COMMAND, "names": [...], "results": {NAME: COMMAND}}`` of a directory zopeft wrote into,
    else None; ``results``: the listed names that are a command's result file, not the directory's own output."""
    try:
        data = json.loads((Path(directory) / MANIFEST_NAME).read_text())
    except (OSError, ValueError):
        return None
    names = data.get("names") if isinstance(data, dict) else None
    if not isinstance(names, list) or not all(isinstance(n, str) for n in names):
        return None
    results = data.get("results")
    results = {str(k): str(v) for k, v in results.items() if k in names} if isinstance(results, dict) else {}
    return {"written_by": str(data.get("written_by", "zopeft")), "names": names, "results": results}


def claim(directory: str | Path, names: Iterable[str], written_by: str, *, result: bool = False) -> None:
    """Record ``names`` as zopeft's in ``directory`` (created if needed) before they are written: ``written_by``'s
    result files if ``result``, else the directory's own output."""
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    names, current = set(names), manifest(directory)
    previous = current or {"written_by": written_by, "names": [], "results": {}}
    results = {n: c for n, c in previous["results"].items() if n not in names}
    results.update(dict.fromkeys(names if result else (), written_by))
    updated = {"written_by": previous["written_by"], "names": sorted({*previous["names"], *names}),
               "results": dict(sorted(results.items()))}
    if updated != current:
        write_text_atomic(directory / MANIFEST_NAME, json.dumps(updated, indent=1) + "\n")


def foreign(directory: str | Path, owned: Iterable[str] = ()) -> list[str]:
    """The entries of ``directory`` zopeft did not write: neither in its manifest nor in ``owned`` nor its bookkeeping.

    zopeft's bookkeeping is the manifest, the lock and its temporaries.
    """
    directory = Path(directory)
    if not directory.is_dir():
        return []
    mine = {MANIFEST_NAME, LOCK_NAME, *(manifest(directory) or {"names": []})["names"], *owned}
    return sorted(p.name for p in directory.iterdir() if p.name not in mine and not _TEMPORARY.fullmatch(p.name))


def _check_writer(path: Path, *, overwrite: bool, option: str, written_by: str) -> None:
    """Refuse to replace a file zopeft listed beside ``path``: the directory's own output always, another
    command's result without ``overwrite``."""
    listed = manifest(path.parent)
    if listed is None or path.name not in listed["names"]:
        if path.exists() and not overwrite:
            raise RecipeError([f"{option}: {path} exists; pass --overwrite to replace it, or choose another file"])
        return
    writer = listed["results"].get(path.name, listed["written_by"])
    if writer == written_by:
        return
    if path.name not in listed["results"]:
        raise RecipeError([f"{option}: {path} is part of the output of `{writer}` in {path.parent} and is never "
                           "replaced, --overwrite or not; choose another file"])
    if path.exists() and not overwrite:
        raise RecipeError([f"{option}: {path} holds the result of `{writer}`; pass --overwrite to replace it, "
                           "or choose another file"])


def check_output_file(path: Path, *, overwrite: bool, option: str, written_by: str) -> None:
    """Refuse (:class:`RecipeError`) to write the file ``path`` if it is a directory or part of a directory's own
    output (a run's), or, without ``overwrite``, a file that is not a previous result of ``written_by``.  Called
    before the work whose result it receives."""
    if path.is_dir():
        raise RecipeError([f"{option}: {path} is a directory; give a file name, e.g. {path / 'result.json'}"])
    _check_writer(path, overwrite=overwrite, option=option, written_by=written_by)
    if path.parent.exists() and not path.parent.is_dir():
        raise RecipeError([f"{option}: {path.parent} is a file, not a directory; choose another path"])


def write_output_file(path: Path, text: str, written_by: str) -> None:
    """Write a command's result file; a directory that is new, empty or zopeft's lists it as ``written_by``'s result."""
    directory = path.parent
    if not directory.exists() or manifest(directory) is not None or not any(directory.iterdir()):
        claim(directory, [path.name], written_by, result=True)
    write_text_atomic(path, text)
