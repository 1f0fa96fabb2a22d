"""Path markers for config fields, and the output-directory check of the CLI verbs. Imports nothing of the
project but its error types, so every layer may declare path fields.

A field typed `ConfigPath` (or `ModelPath`, `ExistingPath`) is resolved against the directory of the YAML
file that sets it (or the current directory for `--set` and dicts) before validation, with `~` expanded.
Every path is a non-empty string without NUL bytes: an empty `output_dir` would write the run into
whatever the current directory is.
"""

from __future__ import annotations

import errno
import os
from pathlib import Path
from typing import Annotated

from pydantic import AfterValidator

from arctic_vl.errors import ConfigError


class PathField:
    """Marks a string field as a filesystem path, resolved against the directory of the file that sets it.

    `hub_ok`: if the resolved path does not exist and the value looks like `org/name`, keep it as given
    (transformers may resolve it from its cache); nothing in our tests or examples relies on that.
    `must_exist`: config validation (`arctic_vl validate` and every start) checks the resolved path exists:
    a missing one is an error naming the file and line that set it (exit 2).
    """

    def __init__(self, hub_ok: bool = False, must_exist: bool = False):
        self.hub_ok = hub_ok
        self.must_exist = must_exist


def _usable(value: str) -> str:
    if not value.strip():
        raise ValueError("a path must not be empty")
    if "\x00" in value:
        raise ValueError("a path must not contain a NUL byte")
    return value


#: a path relative to the config file that names it (output directories, files a run may create)
ConfigPath = Annotated[str, PathField(), AfterValidator(_usable)]
#: a local model directory that must exist (or a value of the form `org/name` naming nothing on disk: a hub
#: id, kept as given and not checked)
ModelPath = Annotated[str, PathField(hub_ok=True, must_exist=True), AfterValidator(_usable)]
#: a file or folder that must exist when the config is validated (data files, teacher checkpoints). The config
#: layer checks it (`arctic_vl.config.schema`), where the file and line that set it are known; a model built
#: in code (e.g. a data source a YAML list names) is not checked here but where it is read.
ExistingPath = Annotated[str, PathField(must_exist=True), AfterValidator(_usable)]


def resolve_user_path(value: str | os.PathLike[str], base_dir: str | os.PathLike[str] | None = None,
                      where: str = "") -> Path:
    """`value` (a path a user wrote: in a config, a data list, on the command line) as an absolute, resolved
    Path: `~` expanded, a relative path taken against `base_dir` (default: the current directory).

    The one place such paths are resolved: a NUL byte in it, or a symbolic link loop on the way, is a
    ConfigError (exit 2) starting with `where` (e.g. "run.yaml:3: data.sources[0].path") and naming the path,
    never a ValueError or RuntimeError from the OS layer. A path that does not exist is fine here (the caller
    says whether it must).
    """
    text = os.fspath(value)
    at = f"{where}: " if where else ""
    if "\x00" in text:
        raise ConfigError(f"{at}{text!r}: a path must not contain a NUL byte")
    path = Path(os.path.expanduser(text))
    if not path.is_absolute():
        path = Path(base_dir if base_dir is not None else Path.cwd()) / path
    loop = ConfigError(f"{at}{text}: a symbolic link loop (a link that leads back to itself); point the path "
                       "or the link at a real file or folder")
    try:
        resolved = path.resolve()
    except RuntimeError:  # Python <= 3.12: "Symlink loop from ..."
        raise loop from None
    except OSError as e:
        if e.errno == errno.ELOOP:
            raise loop from None
        raise ConfigError(f"{at}{text}: cannot be used as a path: {e.strerror or e}") from None
    try:
        os.stat(resolved)  # Python 3.13's resolve() no longer raises on a loop: the stat still does
    except OSError as e:
        if e.errno == errno.ELOOP:
            raise loop from None
    return resolved


def output_directory(path: str | Path, option: str) -> Path:
    """Create (with parents) and return the directory a verb writes to, given on the command line as `option`
    (e.g. "OUT_DIR", "--out"); one that cannot be created or written is a ConfigError (exit 2) naming the option,
    the path and why, before any work is done."""
    out = Path(path).expanduser()
    try:
        out.mkdir(parents=True, exist_ok=True)
    except FileExistsError:
        raise ConfigError(f"{option} {out}: exists and is not a directory") from None
    except OSError as e:
        raise ConfigError(f"{option} {out}: cannot be created: {e.strerror or e}") from None
    probe = out / f".arctic_vl-write-test-{id(out)}"
    try:
        probe.touch()
        probe.unlink()
    except OSError as e:
        raise ConfigError(f"{option} {out}: not writable: {e.strerror or e}") from None
    return out


def output_file(path: str | Path, option: str) -> Path:
    """Check (before any work) the file a verb will write, given on the command line as `option` (e.g. "--out"):
    its folder is created if missing (as `output_directory`), and the file must not be an existing directory nor
    an existing file this user cannot write. A problem is a ConfigError (exit 2) naming the option, the path and
    why. Returns the path (`~` expanded); the file itself is not created."""
    out = Path(path).expanduser()
    if str(out) in ("", ".") or "\x00" in str(out):
        raise ConfigError(f"{option} {str(path)!r}: name a file")
    try:
        is_dir = out.is_dir()
    except OSError as e:
        raise ConfigError(f"{option} {out}: cannot be checked: {e.strerror or e}") from None
    if is_dir:
        raise ConfigError(f"{option} {out}: is an existing directory; name the file to write")
    output_directory(out.parent, f"{option} {out}: its folder")
    if out.exists() and not os.access(out, os.W_OK):
        raise ConfigError(f"{option} {out}: exists and is not writable by this user")
    return out
