"""One run per run directory: an exclusive lock on OUTPUT_DIR/.lock for the life of a run.

The main process (rank 0) takes `fcntl.flock(LOCK_EX | LOCK_NB)` on OUTPUT_DIR/.lock and writes its pid,
host and start time into it; the other ranks of the same run trust it (they write nothing before rank 0
has the lock: the engine's barrier orders them). A second run on the same directory finds the lock held
and stops with exit code 2, naming the holder. The kernel drops a flock when its process dies, so the lock
of a killed run is free again; the file still names the dead holder, and the next run takes it over with a
warning. Processes forked by the run (DataLoader workers) close their copy of the descriptor, so a
straggling worker never keeps a dead run's directory locked. The file is never deleted (deleting a lock
file races with a process that has just opened it); a clean release empties it.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import os
import socket
import time
from pathlib import Path

from loguru import logger

from arctic_vl.config.run_files import open_for_write, run_directory
from arctic_vl.errors import ConfigError

LOCK_FILE = ".lock"
#: lock descriptors open in this process: closed in forked children (they are not the run)
_HELD: set[int] = set()


def _close_in_child() -> None:
    for fd in list(_HELD):
        with contextlib.suppress(OSError):
            os.close(fd)
    _HELD.clear()


os.register_at_fork(after_in_child=_close_in_child)


def _holder(text: str) -> dict[str, str]:
    out = {}
    for line in text.splitlines():
        key, _, value = line.partition("=")
        if key and value:
            out[key.strip()] = value.strip()
    return out


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # another user's process
        return True
    return True


def _describe(info: dict[str, str]) -> str:
    if not info:
        return "a process that left no name"
    since = f" (since {info['since']})" if "since" in info else ""
    return f"pid {info.get('pid', '?')} on host {info.get('host', '?')}{since}"


class RunLock:
    """The lock of one run directory; `acquire` takes it (or raises), `release` gives it back."""

    def __init__(self, path: Path, fd: int):
        self.path = path
        self._fd: int | None = fd

    @classmethod
    def acquire(cls, output_dir: Path, where: str = "<config>") -> RunLock:
        """Take OUTPUT_DIR/.lock for this process. Held by a live run: ConfigError (exit 2) naming the holder's pid
        and host. Left by a dead run: taken over, with a warning naming it. `where`: the `file:line` of
        trainer.output_dir, for the message. A `.lock` that is a symbolic link, a directory or anything but a
        regular file of its own: ConfigError naming it (see `arctic_vl.config.run_files`)."""
        path = Path(output_dir) / LOCK_FILE
        run_directory(path.parent, where)
        # never through a link (a `.lock` pointing at someone's file would be truncated), only a regular file
        fd = open_for_write(path, read=True)
        try:
            _flock(fd)
        except OSError as e:
            info = _holder(_read(fd))
            os.close(fd)
            if e.errno not in (errno.EWOULDBLOCK, errno.EAGAIN, errno.EACCES):
                raise ConfigError(f"{where}: trainer.output_dir: cannot lock {path}: {e.strerror} "
                                  "(the filesystem may not support file locks); put trainer.output_dir on a local "
                                  "or lock-capable filesystem") from None
            raise ConfigError(
                f"{where}: trainer.output_dir: {path.parent} is in use by another run: {_describe(info)} holds {path}. "
                "Two runs on one directory overwrite each other's checkpoints and metrics: "
                "wait for it to finish (or stop it), or give this run another trainer.output_dir"
            ) from None
        previous = _holder(_read(fd))
        if previous:
            pid = previous.get("pid", "")
            same_host = previous.get("host") == socket.gethostname()
            state = "is gone" if same_host and pid.isdigit() and not _alive(int(pid)) else "no longer holds it"
            logger.warning(f"{path}: taking over the lock left by {_describe(previous)}, which {state} "
                           "(a killed or crashed run); resuming in its directory")
        os.ftruncate(fd, 0)
        os.pwrite(fd, f"pid={os.getpid()}\nhost={socket.gethostname()}\nsince={time.strftime('%Y-%m-%dT%H:%M:%S')}\n"
                  .encode(), 0)
        os.fsync(fd)
        _HELD.add(fd)
        return cls(path, fd)

    def release(self) -> None:
        """Empty the lock file and unlock it (idempotent)."""
        fd, self._fd = self._fd, None
        if fd is None:
            return
        _HELD.discard(fd)
        with contextlib.suppress(OSError):
            os.ftruncate(fd, 0)
        with contextlib.suppress(OSError):
            fcntl.flock(fd, fcntl.LOCK_UN)
        os.close(fd)

    def __del__(self) -> None:  # an Engine dropped without `release` (e.g. after `_build` in a script)
        with contextlib.suppress(Exception):
            self.release()

    def __enter__(self) -> RunLock:
        return self

    def __exit__(self, *exc: object) -> None:
        self.release()


#: how long a lock whose recorded holder is dead may stay held (a child it forked that has not closed its copy yet)
DEAD_HOLDER_GRACE_S = 10.0


def _flock(fd: int) -> None:
    """flock(LOCK_EX | LOCK_NB); while the file names a dead process of this host, retry for a few seconds."""
    deadline = time.monotonic() + DEAD_HOLDER_GRACE_S
    while True:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            return
        except OSError as e:
            if e.errno not in (errno.EWOULDBLOCK, errno.EAGAIN) or time.monotonic() > deadline:
                raise
            info = _holder(_read(fd))
            pid = info.get("pid", "")
            if info.get("host") != socket.gethostname() or not pid.isdigit() or _alive(int(pid)):
                raise
            time.sleep(0.2)


def _read(fd: int) -> str:
    try:
        return os.pread(fd, 4096, 0).decode("utf-8", "replace")
    except OSError:
        return ""
