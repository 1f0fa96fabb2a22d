"""Path markers for config fields. Imports nothing of the project, so every layer may declare path fields.

A field typed `ConfigPath` (or `ModelPath`) is resolved against the directory of the YAML file that sets
it (or the current directory for `--set` and dicts) before validation, with `~` expanded.
"""

from __future__ import annotations

from typing import Annotated


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


#: a path relative to the config file that names it (output directories, files a run may create)
ConfigPath = Annotated[str, PathField()]
#: a local model directory that must exist (or a value of the form `org/name` naming nothing on disk: a hub
#: id, kept as given and not checked)
ModelPath = Annotated[str, PathField(hub_ok=True, must_exist=True)]
#: a file or folder that must exist when the config is validated (data files, teacher checkpoints)
ExistingPath = Annotated[str, PathField(must_exist=True)]
