"""What zopeft wrote in a directory, so that it never replaces or removes what it did not write.

Every directory zopeft writes into on its own account (a training ``output_dir``, a ``merge`` or
``replay`` output, the folder of an ``eval`` or ``lr-find`` result it created) holds
``.zopeft-manifest.json``: the command that made it and the names zopeft wrote there, recorded
*before* each is written (a killed write leaves a listed name that does not exist, never an
unlisted file of its own).  Anything else in such a directory is the user's.

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
    """``{"written_by": COMMAND, "names": [...]}`` of a directory zopeft wrote into, else None."""
    try:
        data = json.loads((Path(directory) / MANIFEST_NAME).read_text())
    except (OSError, ValueError):
        return None
    names = data.get("names") if isinstance(data, dict) else None
    if not isinstance(names, list) or not all(isinstance(n, str) for n in names):
        return None
    return {"written_by": str(data.get("written_by", "zopeft")), "names": names}


def claim(directory: str | Path, names: Iterable[str], written_by: str) -> None:
    """Record ``names`` as zopeft's in ``directory`` (created if needed) before they are written."""
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    current = manifest(directory)
    listed = sorted({*(current["names"] if current else ()), *names})
    if current is None or current["names"] != listed:
        text = json.dumps({"written_by": current["written_by"] if current else written_by, "names": listed}, indent=1)
        write_text_atomic(directory / MANIFEST_NAME, text + "\n")


def foreign(directory: str | Path, owned: Iterable[str] = ()) -> list[str]:
    """The entries of ``directory`` zopeft did not write: neither in its manifest nor in ``owned`` nor its bookkeeping.

    zopeft's bookkeeping is the manifest, the lock and its temporaries.
    """
    directory = Path(directory)
    if not directory.is_dir():
        return []
    mine = {MANIFEST_NAME, LOCK_NAME, *(manifest(directory) or {"names": []})["names"], *owned}
    return sorted(p.name for p in directory.iterdir() if p.name not in mine and not _TEMPORARY.fullmatch(p.name))


def _listed(path: Path) -> bool:
    """Whether zopeft's manifest beside ``path`` lists it (zopeft wrote it)."""
    return path.name in (manifest(path.parent) or {"names": []})["names"]


def check_output_file(path: Path, *, overwrite: bool, option: str) -> None:
    """Refuse (:class:`RecipeError`) to write the file ``path`` if it is a directory, or a file zopeft did not
    write and ``overwrite`` is not given.  Called before the work whose result it receives."""
    if path.is_dir():
        raise RecipeError([f"{option}: {path} is a directory; give a file name, e.g. {path / 'result.json'}"])
    if path.exists() and not overwrite and not _listed(path):
        raise RecipeError([f"{option}: {path} exists; pass --overwrite to replace it, or choose another file"])
    if path.parent.exists() and not path.parent.is_dir():
        raise RecipeError([f"{option}: {path.parent} is a file, not a directory; choose another path"])


def write_output_file(path: Path, text: str, written_by: str) -> None:
    """Write a command's result file; a directory that is new, empty or zopeft's records it in its manifest."""
    directory = path.parent
    if not directory.exists() or manifest(directory) is not None or not any(directory.iterdir()):
        claim(directory, [path.name], written_by)
    write_text_atomic(path, text)
