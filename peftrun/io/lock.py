"""One run per output folder: an exclusive lock (fcntl.flock) on a lock file, with who holds it written inside.

The operating system releases a flock when its process dies, however it dies, so a lock file left by a killed
run holds no lock: the next run takes it over and says whose it was. A second run while the first holds it is
refused at once, naming the holder (pid, host, start time). Where the filesystem has no flock (some network
filesystems), the pid written in the file decides: a live pid on this host holds the folder.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import json
import os
import socket
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from peftrun.errors import PeftrunError


def _holder(raw: bytes) -> dict[str, Any] | None:
    try:
        data = json.loads(raw.decode("utf-8"))
    except (UnicodeDecodeError, ValueError):
        return None
    return data if isinstance(data, dict) else None


def describe(holder: dict[str, Any] | None) -> str:
    if not holder:
        return "a process that left no details"
    what = f" ({holder['command']})" if holder.get("command") else ""
    return f"pid {holder.get('pid')} on host {holder.get('host')}, started {holder.get('started')}{what}"


def _alive_here(holder: dict[str, Any]) -> bool:
    if holder.get("host") != socket.gethostname():
        return True  # cannot tell from here: assume it runs
    try:
        os.kill(int(holder.get("pid")), 0)
    except (TypeError, ValueError, ProcessLookupError):
        return False
    except PermissionError:
        return True
    return True


def _read(fd: int) -> bytes:
    os.lseek(fd, 0, os.SEEK_SET)
    return os.read(fd, 4096)


@contextlib.contextmanager
def hold_lock(lock_file: str | os.PathLike[str], *, what: str, command: str, say=None) -> Iterator[None]:
    """Hold `lock_file` exclusively for the body; `what` names the folder it guards in messages."""
    say = say or (lambda text: print(text, file=sys.stderr, flush=True))
    path = Path(lock_file)
    if path.is_symlink():
        raise PeftrunError("the lock file is a symbolic link; peftrun will not follow it", where=str(path))
    fd = -1
    for _ in range(10):
        fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_NOFOLLOW | os.O_CLOEXEC, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = _holder(_read(fd))
            os.close(fd)
            raise PeftrunError(
                f"{what} is in use by another peftrun run: {describe(holder)}",
                where=str(path),
                hint="wait for that run to end, or choose another folder",
            ) from None
        except OSError as exc:
            if exc.errno not in (errno.ENOLCK, errno.EOPNOTSUPP, errno.EINVAL):
                os.close(fd)
                raise
            holder = _holder(_read(fd))  # no flock here: the pid decides
            if holder and _alive_here(holder) and holder.get("pid") != os.getpid():
                os.close(fd)
                raise PeftrunError(
                    f"{what} is in use by another peftrun run: {describe(holder)}",
                    where=str(path),
                    hint=f"wait for that run to end; if it is gone, delete {path}",
                ) from None
        # the previous holder may have released and unlinked this file between our open and our lock
        try:
            same = os.path.samestat(os.fstat(fd), os.stat(path, follow_symlinks=False))
        except FileNotFoundError:
            same = False
        if same:
            break
        os.close(fd)
        fd = -1
    if fd < 0:
        raise PeftrunError(f"could not take the lock of {what}: it kept changing", where=str(path))
    try:
        previous = _read(fd)
        if previous.strip():
            say(f"note: taking over a stale lock on {what}: {describe(_holder(previous))} is no longer running")
        record = {
            "pid": os.getpid(), "host": socket.gethostname(),
            "started": time.strftime("%Y-%m-%dT%H:%M:%S%z"), "command": command,
        }
        os.ftruncate(fd, 0)
        os.lseek(fd, 0, os.SEEK_SET)
        os.write(fd, (json.dumps(record) + "\n").encode())
        os.fsync(fd)
        yield
    finally:
        with contextlib.suppress(OSError):
            if os.path.samestat(os.fstat(fd), os.stat(path, follow_symlinks=False)):
                path.unlink()
        os.close(fd)


@contextlib.contextmanager
def output_dir_lock(folder: Path, *, command: str = "train") -> Iterator[None]:
    """The lock of a run's output_dir, inside it (made when missing; removed again when the run left it empty)."""
    from peftrun.io.outputs import LOCK

    created = not folder.exists()
    folder.mkdir(parents=True, exist_ok=True)
    try:
        with hold_lock(folder / LOCK, what=f"output_dir {folder}", command=command):
            yield
    finally:
        if created:
            with contextlib.suppress(OSError):
                folder.rmdir()  # only when empty: a run that failed before writing anything leaves no folder


@contextlib.contextmanager
def beside_lock(folder: Path, *, command: str) -> Iterator[None]:
    """The lock of a folder written whole (merge, combine): a hidden file beside it, since the folder is
    swapped in by a rename."""
    folder.parent.mkdir(parents=True, exist_ok=True)
    with hold_lock(folder.parent / f".{folder.name}.peftrun-lock", what=str(folder), command=command):
        yield
