"""Where peftrun may write, replace and delete: the one output-folder policy of every command.

- `~` is expanded in every path a user gives (`user_path`).
- No output is the filesystem root, the home folder, the current folder, the peftrun sources, or a folder
  above any of them (`refuse_protected`); none is an input of the command or a folder above one.
- A folder is replaced whole (merge --output, combine --output) only when it does not exist, is empty, or
  holds nothing but what peftrun wrote there, as its marker file MARKER lists, and only with an explicit
  overwrite (`check_output_folder`). A folder a user made, or added a file to, is never replaced.
- Deleting inside an output folder never follows a symbolic link out of it (`remove_inside`).
"""

from __future__ import annotations

import json
import os
import shutil
import socket
import time
from collections.abc import Iterable
from pathlib import Path
from typing import Any

from peftrun.errors import PeftrunError

MARKER = ".peftrun"  # written by peftrun into every folder it writes whole: what wrote it, and the files
LOCK = ".peftrun.lock"  # inside a train's output_dir for the life of the run (io.lock)
RUN_CACHE = ".peftrun-cache"  # library caches of a train (datasets' Arrow files), removed when the run ends
OWN_NAMES = (MARKER, LOCK, RUN_CACHE)  # peftrun's own bookkeeping: a folder holding only these is empty
SOURCES = Path(__file__).resolve().parent.parent  # the peftrun package


def user_path(path: str | os.PathLike[str]) -> Path:
    """A path as the user wrote it, `~` expanded (a shell does not expand it in `--output=~/x` or YAML)."""
    try:
        return Path(os.fspath(path)).expanduser()
    except RuntimeError as exc:  # ~someone who has no home folder here
        raise PeftrunError(f"'{path}' cannot be resolved: {exc}") from None


def _resolve(path: Path, where: str) -> Path:
    try:
        return path.resolve()
    except (OSError, RuntimeError) as exc:  # a symlink loop
        raise PeftrunError(f"'{path}' cannot be resolved: {exc}", where=where) from None


def protected_folders() -> list[tuple[Path, str]]:
    folders = [(Path(Path.cwd().resolve().anchor), "the filesystem root")]
    try:
        folders.append((Path.home().resolve(), "your home folder"))
    except RuntimeError:  # no home folder known (HOME unset, no passwd entry)
        pass
    folders += [(Path.cwd().resolve(), "the current folder"), (SOURCES.parent, "the peftrun source folder")]
    return folders


def refuse_protected(path: str | os.PathLike[str], *, where: str, name: str = "the output") -> Path:
    """`path` (`~` expanded, resolved) unless it is a protected folder, above one, or inside the sources."""
    if not str(path).strip():
        raise PeftrunError(f"{name} is empty", where=where)
    out = _resolve(user_path(path), where)
    for folder, what in protected_folders():
        if out == folder or out in folder.parents:
            raise PeftrunError(
                f"{name} '{path}' is {what} or a folder above it; peftrun writes and deletes files there",
                where=where,
                hint="give a folder of its own, e.g. out/my_run",
            )
    if out == SOURCES or SOURCES in out.parents:
        raise PeftrunError(f"{name} '{path}' is inside the peftrun sources", where=where, hint="give a folder of its own")
    return out


def refuse_inputs(out: Path, inputs: Iterable[tuple[str | os.PathLike[str] | None, str]], *, where: str) -> None:
    """`out` (resolved) is none of the inputs [(path, what it is)] and no folder above one."""
    for path, what in inputs:
        if path is None:
            continue
        candidate = user_path(path)
        if not candidate.exists():
            continue  # a hub name, not a folder here
        resolved = _resolve(candidate, where)
        if out == resolved:
            raise PeftrunError(f"the output is {what} itself; peftrun never writes over an input", where=where)
        if out in resolved.parents:
            raise PeftrunError(
                f"the output is a folder above {what} ({path}); replacing it would delete that input",
                where=where,
                hint="give a new folder beside the inputs",
            )


# ------------------------------------------------------------------ the marker


def marker_record(command: str, files: Iterable[str] | None = None) -> dict[str, Any]:
    record: dict[str, Any] = {
        "written_by": f"peftrun {command}",
        "pid": os.getpid(),
        "host": socket.gethostname(),
        "time": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
    }
    if files is not None:
        record["files"] = sorted(files)
    return record


def write_marker(folder: Path, command: str, *, list_files: bool = True) -> None:
    """Mark `folder` as written by peftrun; list_files: record its entries (a folder written whole, whose
    contents peftrun alone decided), so that a later overwrite can tell a file someone added."""
    files = sorted(p.name for p in folder.iterdir() if p.name != MARKER) if list_files else None
    (folder / MARKER).write_text(json.dumps(marker_record(command, files), indent=1) + "\n")


def read_marker(folder: Path) -> dict[str, Any] | None:
    file = folder / MARKER
    if file.is_symlink() or not file.is_file():
        return None
    try:
        data = json.loads(file.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    return data if isinstance(data, dict) else None


def foreign_entries(folder: Path) -> list[str]:
    """The entries of `folder` that its marker does not list (all of them where there is no usable marker)."""
    entries = sorted(p.name for p in folder.iterdir())
    marker = read_marker(folder)
    listed = marker.get("files") if marker else None
    if not isinstance(listed, list):
        return [e for e in entries if e != MARKER] or ([MARKER] if MARKER in entries else [])
    return [e for e in entries if e != MARKER and e not in listed]


# ------------------------------------------------------------------ the checks


def check_output_folder(
    path: str | os.PathLike[str],
    *,
    where: str,
    inputs: Iterable[tuple[str | os.PathLike[str] | None, str]] = (),
    overwrite: bool = False,
) -> Path:
    """A folder a command writes whole (merge, combine): the path to use (`~` expanded), or a refusal."""
    out = _allowed(path, where, inputs)
    if out.is_symlink():
        raise PeftrunError("the output is a symbolic link; give a real folder", where=where)
    if out.exists() and not out.is_dir():
        raise PeftrunError("the output exists and is not a folder", where=where)
    if out.is_dir() and any(out.iterdir()):
        if not overwrite:
            raise PeftrunError(
                "the output folder is not empty", where=where, hint="choose another, or pass --overwrite"
            )
        foreign = foreign_entries(out)
        if foreign:
            raise PeftrunError(
                f"the output folder holds '{foreign[0]}', which peftrun did not write there; --overwrite replaces "
                "only a folder peftrun wrote whole",
                where=where,
                hint="choose another folder, or empty this one yourself",
            )
    return out


def _allowed(path, where: str, inputs) -> Path:
    """`path` with `~` expanded, refused when it is a protected folder, an input or a folder above one."""
    out = user_path(path)
    refuse_inputs(refuse_protected(out, where=where), inputs, where=where)
    return out


def check_output_file(
    path: str | os.PathLike[str], *, where: str, inputs: Iterable[tuple[str | os.PathLike[str] | None, str]] = ()
) -> Path:
    """A file a command writes (predict --output, generate --output): replaced atomically when it exists,
    but never a folder, an input, or a protected folder."""
    out = _allowed(path, where, inputs)
    if out.is_dir():
        raise PeftrunError("the output is a folder; give a file name", where=where)
    if out.exists() and not out.is_file():
        raise PeftrunError("the output exists and is not a regular file", where=where)
    return out


def check_output_dir_value(output_dir: str, *, where: str) -> None:
    """A train's output_dir gets files written and (checkpoints/) deleted: it must be a folder of its own."""
    refuse_protected(output_dir, where=where, name="output_dir")


def is_empty_for_a_run(folder: Path) -> bool:
    """Nothing but peftrun's own bookkeeping (marker, lock, run cache) in `folder`."""
    return not any(p.name not in OWN_NAMES for p in folder.iterdir())


# ------------------------------------------------------------------ deleting


def _has_link_between(path: Path, root: Path) -> bool:
    """Whether a component of `path` strictly below `root`, `path` itself excluded, is a symbolic link."""
    relative = path.relative_to(root)
    here = root
    for part in relative.parts[:-1]:
        here = here / part
        if here.is_symlink():
            return True
    return False


def remove_inside(path: str | os.PathLike[str], root: str | os.PathLike[str]) -> None:
    """Delete `path`, which must lie strictly inside `root`, never following a symbolic link: a link at
    `path` loses only the link; a link on the way from `root` to `path` refuses."""
    path, root = Path(path), Path(root)
    if ".." in path.parts or not path.is_relative_to(root) or path == root:
        raise PeftrunError(f"refusing to delete '{path}': it is not inside '{root}'")
    if _has_link_between(path, root):
        raise PeftrunError(f"refusing to delete '{path}': a symbolic link on the way leads out of '{root}'")
    if path.is_symlink() or path.is_file():
        path.unlink(missing_ok=True)
    elif path.exists():
        shutil.rmtree(path, ignore_errors=True)  # rmtree itself never follows links inside the tree
