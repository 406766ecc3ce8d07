"""Atomic writes: a file, a folder, or files into a folder that holds other things.

A crash (even SIGKILL) leaves the previous version in place, never half of the new one. A write that fails
(a full disk, a file size limit) raises an OSError naming the file, as it would be called once in place, even
where the library that wrote it said only "No space left on device" (see `naming_files`).
"""

from __future__ import annotations

import contextlib
import errno
import os
import re
import shutil
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import IO

from safetensors import SafetensorError

# safetensors' writer reports an I/O failure as text: "... I/O error: No space left on device (os error 28)"
_OS_ERROR = re.compile(r"\(os error (\d+)\)")


def _fsync_dir(path: Path) -> None:
    with contextlib.suppress(OSError):
        fd = os.open(path, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)


def _fsync_tree(path: Path, final: Path | None = None) -> None:
    """fsync every file under `path` (`final`: where `path` goes, for naming a file in an error)."""
    for file in path.rglob("*"):
        if file.is_file():
            shown = file if final is None else Path(final) / file.relative_to(path)
            with open(file, "rb") as fh, naming_files(shown):
                os.fsync(fh.fileno())  # delayed allocation: a full disk may show only here
    _fsync_dir(path)


def _remove(path: Path) -> None:
    """Delete what peftrun is replacing, never through a symbolic link (a link loses only itself)."""
    if path.is_symlink() or path.is_file():
        path.unlink(missing_ok=True)
    else:
        shutil.rmtree(path, ignore_errors=True)


def _newest_file(folder: Path) -> Path | None:
    """The file under `folder` written last: the one a write failed on, when a library did not say."""
    files = [f for f in folder.rglob("*") if f.is_file()] if folder.is_dir() else []
    return max(files, key=lambda f: f.stat().st_mtime_ns, default=None)


@contextlib.contextmanager
def naming_files(target: str | os.PathLike[str], final: str | os.PathLike[str] | None = None) -> Iterator[None]:
    """Writes inside this block that fail without naming their file are raised again naming it.

    `target`: the file written, or a (temporary) folder whose newest file is taken as the one that failed
    (the folder itself where the writer removed its file); `final`: where that folder goes once complete, so
    the message names the file as the user will know it (an error naming a file of the temporary folder is
    raised again naming it under `final`). Writers that know their file say so themselves
    (peft_format.save_tensors, save_torch); this is the net under every atomic write.
    An OSError without a file name (Python's own writes, fsync) and safetensors' error for an I/O failure
    both become an OSError(errno, reason, file); other errors pass unchanged.
    """
    try:
        yield
    except OSError as exc:
        if exc.filename is None:
            raise _named(exc.errno or errno.EIO, exc.strerror or str(exc), target, final) from exc
        shown = _as_final(Path(os.fsdecode(exc.filename)), Path(target), final)
        if shown is None:
            raise
        raise OSError(exc.errno, exc.strerror, str(shown)) from exc  # the file as it is called once in place
    except SafetensorError as exc:
        match = _OS_ERROR.search(str(exc))
        if match is None:  # not an I/O failure: a bug, left as it is
            raise
        code = int(match.group(1))
        # safetensors removes the file it failed to write: in a folder, name the folder rather than guess
        raise _named(code, os.strerror(code), target, final, guess=False) from exc


def _as_final(file: Path, target: Path, final) -> Path | None:
    """`file` under the temporary folder `target`, as it is called under `final`; None where it is not there."""
    if final is None or not file.is_relative_to(target) or file == target:
        return None
    return Path(final) / file.relative_to(target)


def _named(code: int, reason: str, target, final, *, guess: bool = True) -> OSError:
    """OSError(code, reason, the file): `target` itself, else its newest file (guess), else the folder."""
    target = Path(target)
    if not target.is_dir():
        return OSError(code, reason, str(target))
    newest = _newest_file(target) if guess else None
    if newest is None:
        return OSError(code, reason, str(final if final is not None else target))
    return OSError(code, reason, str(_as_final(newest, target, final) or newest))


@contextlib.contextmanager
def atomic_dir(final: str | os.PathLike[str], *, tmp: Path | None = None) -> Iterator[Path]:
    """Yield a temporary folder beside `final`; on success it replaces `final` in one rename.

    A crash before the rename leaves `final` as it was; the temporary folder is removed on errors.
    `tmp`: a hidden folder beside `final` that the caller made (several processes write into it).
    """
    final = Path(final)
    final.parent.mkdir(parents=True, exist_ok=True)
    if tmp is None:
        tmp = final.parent / f".{final.name}.tmp-{os.getpid()}-{uuid.uuid4().hex[:8]}"
        tmp.mkdir()
    try:
        with naming_files(tmp, final):
            yield tmp
        _fsync_tree(tmp, final)
        old = None
        if final.exists():
            old = final.parent / f".{final.name}.old-{uuid.uuid4().hex[:8]}"
            os.replace(final, old)
        os.replace(tmp, final)
        _fsync_dir(final.parent)
        if old is not None:
            _remove(old)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def atomic_files(folder: str | os.PathLike[str], write, *, last: str = "adapter_config.json") -> None:
    """Write files with `write(tmp_folder)`, then move each into `folder`, the file named `last` last.

    Used where `folder` holds other things (checkpoints/, metrics) and cannot be swapped whole: `last`
    (by default an adapter's config, see io.peft_format) appears only once the files beside it are complete.
    """
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    tmp = folder / f".write-{os.getpid()}-{uuid.uuid4().hex[:8]}"
    tmp.mkdir()
    try:
        with naming_files(tmp, folder):
            write(tmp)
        _fsync_tree(tmp, folder)
        names = sorted((p.name for p in tmp.iterdir()), key=lambda n: n == last)
        for name in names:
            target = folder / name
            if target.is_dir() or target.is_symlink():
                _remove(target)
            os.replace(tmp / name, target)
        _fsync_dir(folder)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


@contextlib.contextmanager
def atomic_file(path: str | os.PathLike[str]) -> Iterator[IO[str]]:
    """Yield a text file open beside `path`; on success it is synced and renamed onto `path`."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.parent / f".{path.name}.tmp-{os.getpid()}-{uuid.uuid4().hex[:8]}"
    try:
        with naming_files(path), open(tmp, "w", encoding="utf-8", newline="") as fh:
            yield fh
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)
