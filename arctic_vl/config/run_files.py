"""Writing inside a run directory without ever following a symbolic link.

A run directory may sit in a shared place (a team's `runs/`, a scratch filesystem) and the run may run as
root. A symbolic link planted where the engine writes (`OUTPUT_DIR/.lock` -> `/etc/passwd`,
`metrics.jsonl` -> someone's file, `final` -> another folder) would make the engine truncate, append to or
fill whatever it points at. So every file and folder the engine creates or rewrites inside a run directory
goes through this module: files are opened with `O_NOFOLLOW` and must be regular files with one link, folders
are created by `mkdir` (which never follows a link at the last component) and a link found at any of these
paths is a `ConfigError` (exit 2) naming it, its target untouched. The run directory itself may be a link to
a real directory (`runs -> /scratch/runs`): the user chose that one.

Lives in the config layer (it imports only the error types) so the checkpointer, the callbacks and the loop
share it.
"""

from __future__ import annotations

import errno
import os
import shutil
import stat
from pathlib import Path

from arctic_vl.errors import ConfigError

_ADVICE = ("arctic_vl never writes through a symbolic link inside a run directory (it could point at anyone's "
           "file); its target was left untouched. Remove the link, or give the run another trainer.output_dir")


def _link_target(path: Path) -> str:
    try:
        return os.readlink(path)
    except OSError:
        return "?"


def refuse_link(path: str | os.PathLike[str]) -> None:
    """ConfigError (exit 2) when `path` is a symbolic link (a dangling one too); nothing when it is absent."""
    p = Path(path)
    if p.is_symlink():
        raise ConfigError(f"{p}: is a symbolic link (to {_link_target(p)}); {_ADVICE}")


def no_follow_opener(path: str | os.PathLike[str], flags: int) -> int:
    """An `opener` for `open(path, mode, opener=no_follow_opener)`: the file is opened with `O_NOFOLLOW` and
    must be a regular file with one link; a symbolic link, a directory, a device, a FIFO or a file with other
    hard links at `path` is a ConfigError (exit 2) naming it. The one way a run opens a file for writing in
    its run directory."""
    p = Path(path)
    truncate = bool(flags & os.O_TRUNC)  # only once the file is known to be ours (a hard link would lose its data)
    try:
        # O_NONBLOCK: a FIFO planted there fails at once (ENXIO) instead of waiting for a reader
        fd = os.open(p, (flags & ~os.O_TRUNC) | os.O_NOFOLLOW | os.O_CLOEXEC | os.O_NONBLOCK, 0o644)
    except OSError as e:
        if e.errno == errno.ELOOP or p.is_symlink():
            raise ConfigError(f"{p}: is a symbolic link (to {_link_target(p)}); {_ADVICE}") from None
        if e.errno == errno.ENXIO:
            raise ConfigError(f"{p}: is a FIFO, where arctic_vl writes its own file; {_ADVICE}") from None
        if e.errno == errno.EISDIR:
            raise ConfigError(f"{p}: is a directory, where arctic_vl writes a file; remove it (or give the run "
                              "another trainer.output_dir)") from None
        raise
    st = os.fstat(fd)
    problem = None
    if not stat.S_ISREG(st.st_mode):
        problem = "is not a regular file (a device, FIFO or socket)"
    elif st.st_nlink > 1:  # a hard link to a file elsewhere would be written just like a symbolic one
        problem = f"has {st.st_nlink} hard links (it is also a file elsewhere)"
    if problem is not None:
        os.close(fd)
        raise ConfigError(f"{p}: {problem}, where arctic_vl writes its own file; {_ADVICE}")
    os.set_blocking(fd, True)
    if truncate:
        os.ftruncate(fd, 0)
    return fd


def open_for_write(path: str | os.PathLike[str], *, read: bool = False) -> int:
    """A descriptor of the regular file `path` (created if absent) opened for writing (`read`: read-write)
    through `no_follow_opener`; nothing is truncated."""
    return no_follow_opener(path, (os.O_RDWR if read else os.O_WRONLY) | os.O_CREAT)


def replace_file(path: str | os.PathLike[str], data: str) -> None:
    """Write `data` to `.NAME.tmp` next to `path`, then rename it over `path` (a failure keeps the old file).
    A link at `path` or at the temporary name is refused, never followed nor silently replaced."""
    p = Path(path)
    refuse_link(p)
    tmp = p.with_name(f".{p.name}.tmp")
    try:
        with open(tmp, "w", encoding="utf-8", opener=no_follow_opener) as fh:
            fh.write(data)
        os.replace(tmp, p)
    finally:
        if tmp.is_file() and not tmp.is_symlink():
            tmp.unlink()


def make_dir(path: str | os.PathLike[str]) -> Path:
    """Create the folder `path` (and its parents) unless it exists; a link or a file there is a ConfigError
    naming it."""
    p = Path(path)
    refuse_link(p)
    try:
        p.mkdir(parents=True, exist_ok=True)
    except FileExistsError:
        refuse_link(p)  # a link that appeared since
        raise ConfigError(f"{p}: exists and is not a directory, where arctic_vl writes a folder; remove it") from None
    return p


def fresh_dir(path: str | os.PathLike[str]) -> Path:
    """An empty new folder at `path`: what was there (a leftover of an interrupted write) is removed first. A
    link there is refused, not removed (and never followed into: the new folder is made by this process)."""
    p = Path(path)
    refuse_link(p)
    if p.is_dir():
        shutil.rmtree(p)
    elif p.exists():
        p.unlink()
    p.mkdir(parents=True)
    return p


def remove_tree(path: str | os.PathLike[str]) -> None:
    """Remove the folder `path` if it is there; a link there is refused (never followed into)."""
    p = Path(path)
    refuse_link(p)
    if p.is_dir():
        shutil.rmtree(p)


def run_directory(path: str | os.PathLike[str], where: str = "<config>") -> Path:
    """Create the run directory `path` (with parents). A dangling link or a link loop there, or a file, is a
    ConfigError naming it and `where` (the config's `file:line` of trainer.output_dir); a link to an existing
    directory is used as it is."""
    p = Path(path)
    if p.is_symlink():
        try:
            os.stat(p)
        except OSError as e:
            what = "a loop of symbolic links" if e.errno == errno.ELOOP else \
                f"a symbolic link to {_link_target(p)}, which does not exist"
            raise ConfigError(f"{where}: trainer.output_dir: {p} is {what}; point trainer.output_dir at a "
                              "directory (or remove the link)") from None
    try:
        p.mkdir(parents=True, exist_ok=True)
    except FileExistsError:
        raise ConfigError(f"{where}: trainer.output_dir: {p} exists and is not a directory") from None
    except OSError as e:
        if e.errno == errno.ELOOP:
            raise ConfigError(f"{where}: trainer.output_dir: {p}: a loop of symbolic links in its path") from None
        raise ConfigError(f"{where}: trainer.output_dir: {p} cannot be created: {e.strerror or e}") from None
    return p
