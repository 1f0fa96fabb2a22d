"""YAML configs that remember where every value came from.

A config is read into plain dicts and lists plus a location map: for every key path, the file and line
(or the `--set` argument, or the dotted path of a dict given to `Engine`). Errors found later, in
validation or at run time, point back at that place.

Rules: `extends: FILE` (or a list of files) inherits from other configs; mappings merge deeply, lists
and scalars replace, and a mapping whose `type` changes is replaced whole. Duplicate keys are errors.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from arctic_vl.errors import ConfigError

KeyPath = tuple[Any, ...]


@dataclass(frozen=True)
class Loc:
    """Where a value was written: `where` is printable ("run.yaml:12", "--set a.b=1"); `base_dir` resolves paths."""

    where: str
    base_dir: Path


@dataclass
class LocatedConfig:
    """Plain config data and the location of every key path in it."""

    data: dict[str, Any]
    locs: dict[KeyPath, Loc] = field(default_factory=dict)
    root: Loc | None = None

    def loc(self, path: KeyPath) -> Loc | None:
        """The location of `path` or of its nearest written ancestor."""
        path = tuple(path)
        while True:
            if path in self.locs:
                return self.locs[path]
            if not path:
                return self.root
            path = path[:-1]

    def where(self, path: KeyPath) -> str:
        loc = self.loc(path)
        return loc.where if loc else "<config>"

    def base_dir(self, path: KeyPath) -> Path:
        loc = self.loc(path)
        return loc.base_dir if loc else Path.cwd()


def dotted(path: KeyPath) -> str:
    """`("data", "sources", 0, "path")` -> `data.sources[0].path`."""
    out = ""
    for part in path:
        if isinstance(part, int):
            out += f"[{part}]"
        else:
            out += ("." if out else "") + str(part)
    return out or "<root>"


# ---------------------------------------------------------------------------------------------- YAML

_SCALARS = yaml.SafeLoader("")


def _display(path: Path) -> str:
    try:
        return str(path.resolve().relative_to(Path.cwd()))
    except ValueError:
        return str(path.resolve())


def _construct(node: yaml.Node, file: Path, shown: str, path: KeyPath, locs: dict[KeyPath, Loc]) -> Any:
    loc = Loc(f"{shown}:{node.start_mark.line + 1}", file.parent)
    locs[path] = loc
    if isinstance(node, yaml.MappingNode):
        out: dict[Any, Any] = {}
        for key_node, value_node in node.value:
            if key_node.tag == "tag:yaml.org,2002:merge":
                raise ConfigError(
                    f"{shown}:{key_node.start_mark.line + 1}: {dotted(path)}: YAML merge keys (<<) are not supported; "
                    "use `extends:`"
                )
            key = _construct(key_node, file, shown, (*path, "<key>"), {})
            if not isinstance(key, (str, int, float, bool)):
                raise ConfigError(f"{shown}:{key_node.start_mark.line + 1}: {dotted(path)}: a key must be a plain scalar")
            if key in out:
                first = locs[(*path, key)].where
                raise ConfigError(
                    f"{shown}:{key_node.start_mark.line + 1}: {dotted((*path, key))}: duplicate key "
                    f"(first given at {first}); each key may appear once"
                )
            child = (*path, key)
            locs[child] = Loc(f"{shown}:{key_node.start_mark.line + 1}", file.parent)
            out[key] = _construct(value_node, file, shown, child, locs)
            locs[child] = Loc(f"{shown}:{key_node.start_mark.line + 1}", file.parent)
        return out
    if isinstance(node, yaml.SequenceNode):
        return [_construct(item, file, shown, (*path, i), locs) for i, item in enumerate(node.value)]
    try:
        return _SCALARS.construct_object(node, deep=True)  # scalars: the standard YAML 1.1 rules
    except (ValueError, TypeError, OverflowError) as e:  # e.g. `!!int abc`, `2020-13-45` (a bad date)
        raise ConfigError(f"{loc.where}: {dotted(path)}: invalid YAML value {node.value!r}: {e}") from None


def _yaml_error(shown: str, e: yaml.YAMLError) -> str:
    """`file:line: invalid YAML: problem`; an unclosed bracket or quote points at the line that opened it."""
    mark = getattr(e, "problem_mark", None)
    problem = getattr(e, "problem", None) or str(e)
    context = getattr(e, "context", None) or ""
    context_mark = getattr(e, "context_mark", None)
    if mark is None:
        return f"{shown}: invalid YAML: {problem}"
    if "\\t" in problem or "\t" in problem:
        problem += " (indent with spaces: YAML does not allow tabs)"
    if context_mark is not None and context.startswith(("while parsing a flow", "while scanning a quoted")) \
            and context_mark.line != mark.line:
        return (f"{shown}:{context_mark.line + 1}: invalid YAML: the bracket or quote opened on this line is not "
                f"closed: {problem} (at line {mark.line + 1})")
    return f"{shown}:{mark.line + 1}: invalid YAML: {problem}"


def read_yaml(file: Path) -> LocatedConfig:
    """Parse one YAML file into a LocatedConfig (no `extends` processing)."""
    shown = _display(file)
    try:
        text = file.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise ConfigError(f"{shown}: config file not found") from None
    except OSError as e:
        raise ConfigError(f"{shown}: cannot read config file: {e.strerror}") from None
    try:
        node = yaml.compose(text, Loader=yaml.SafeLoader)
    except yaml.YAMLError as e:
        raise ConfigError(_yaml_error(shown, e)) from None
    locs: dict[KeyPath, Loc] = {}
    root = Loc(f"{shown}:1", file.parent)
    if node is None:
        return LocatedConfig({}, {}, root)
    try:
        data = _construct(node, file, shown, (), locs)
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None) or getattr(e, "context_mark", None)
        line = f":{mark.line + 1}" if mark else ""
        raise ConfigError(f"{shown}{line}: invalid YAML value: {getattr(e, 'problem', e)}") from None
    if not isinstance(data, dict):
        raise ConfigError(f"{shown}:1: a config must be a mapping of sections (model, data, trainer, ...), got {type(data).__name__}")
    locs.pop((), None)
    return LocatedConfig(data, locs, root)


# ------------------------------------------------------------------------------------------- extends


def merge(base: LocatedConfig, top: LocatedConfig) -> LocatedConfig:
    """`top` over `base`: mappings merge deeply, lists and scalars replace, a changed `type` replaces whole."""
    locs = dict(base.locs)

    def drop_locs(prefix: KeyPath) -> None:
        for key in [k for k in locs if k[: len(prefix)] == prefix and len(k) > len(prefix)]:
            del locs[key]

    def rec(b: Any, t: Any, path: KeyPath) -> Any:
        if isinstance(b, dict) and isinstance(t, dict):
            if "type" in b and "type" in t and b["type"] != t["type"]:
                drop_locs(path)
                return t
            out = dict(b)
            for key, value in t.items():
                child = (*path, key)
                if key in b:
                    if not (isinstance(b[key], dict) and isinstance(value, dict)):
                        drop_locs(child)
                    out[key] = rec(b[key], value, child)
                else:
                    out[key] = value
            return out
        drop_locs(path)
        return t

    data = rec(base.data, top.data, ())
    locs.update(top.locs)
    return LocatedConfig(data, locs, top.root)


def load_file(file: str | Path, _chain: tuple[Path, ...] = ()) -> LocatedConfig:
    """Read a config file and everything it `extends`, merged."""
    file = Path(file).resolve() if not _chain else Path(file)
    cfg = read_yaml(file)
    parents = cfg.data.pop("extends", None)
    ext_loc = cfg.locs.get(("extends",))
    ext_locs = {k: cfg.locs.pop(k) for k in [k for k in cfg.locs if k and k[0] == "extends"]}
    if parents is None:
        return cfg
    if isinstance(parents, str):
        parents = [parents]
    if not (isinstance(parents, list) and parents and all(isinstance(p, str) for p in parents)):
        where = ext_loc.where if ext_loc else _display(file)
        raise ConfigError(f"{where}: extends: must be a file path or a list of file paths, got {parents!r}")
    merged: LocatedConfig | None = None
    for i, parent in enumerate(parents):
        parent_path = (file.parent / parent).resolve()
        where = ext_locs.get(("extends", i), ext_loc) if len(parents) > 1 else ext_loc
        where_s = where.where if where else _display(file)
        field = f"extends[{i}]" if len(parents) > 1 else "extends"
        if not parent_path.is_file():
            raise ConfigError(f"{where_s}: {field}: file not found: {parent} (looked at {_display(parent_path)})")
        if parent_path in (*_chain, file):
            cycle = " -> ".join(_display(p) for p in (*_chain, file, parent_path))
            raise ConfigError(f"{where_s}: {field}: cycle: {cycle}")
        base = load_file(parent_path, (*_chain, file))
        merged = base if merged is None else merge(merged, base)
    assert merged is not None
    return merge(merged, cfg)


# ---------------------------------------------------------------------------------------------- --set


def _parse_override(arg: str) -> tuple[list[Any], Any]:
    """`a.b.0.c=VALUE` -> (["a", "b", 0, "c"], the value parsed as YAML)."""
    shown = f"--set {arg}"
    key, sep, raw = arg.partition("=")
    key = key.strip()
    if not sep or not key:
        raise ConfigError(f"{shown}: expected KEY=VALUE with a dotted key, e.g. --set trainer.max_steps=100")
    parts: list[Any] = []
    for piece in key.split("."):
        if not piece:
            raise ConfigError(f"{shown}: empty name in dotted key '{key}'")
        parts.append(int(piece) if piece.isdigit() else piece)
    try:
        value = yaml.safe_load(raw) if raw.strip() else ""
    except yaml.YAMLError as e:
        raise ConfigError(f"{shown}: {key}: value is not valid YAML: {getattr(e, 'problem', None) or e}") from None
    except (ValueError, TypeError, OverflowError) as e:  # e.g. `!!int abc`, a bad date
        raise ConfigError(f"{shown}: {key}: value is not valid YAML: {e}") from None
    return parts, value


def _override_parent(cfg: LocatedConfig, parts: list[Any], shown: str) -> Any:
    """The mapping or list that holds `parts[-1]`; missing mappings on the way are created (located at --set)."""
    node: Any = cfg.data
    for depth, part in enumerate(parts[:-1]):
        if isinstance(node, list):
            if not isinstance(part, int) or part >= len(node):
                raise ConfigError(f"{shown}: {dotted(tuple(parts[: depth + 1]))}: no such list item")
            node = node[part]
            continue
        if not isinstance(node, dict):
            raise ConfigError(f"{shown}: {dotted(tuple(parts[:depth]))} is not a mapping")
        nxt = node.get(part)
        if nxt is None:
            nxt = node[part] = {}
            cfg.locs[tuple(parts[: depth + 1])] = Loc(shown, Path.cwd())  # created by this --set
        node = nxt
    last = parts[-1]
    if isinstance(node, list):
        if not isinstance(last, int) or last >= len(node):
            raise ConfigError(f"{shown}: {dotted(tuple(parts))}: no such list item")
    elif not isinstance(node, dict):
        raise ConfigError(f"{shown}: {dotted(tuple(parts[:-1]))} is not a mapping")
    return node


def apply_overrides(cfg: LocatedConfig, overrides: list[str] | tuple[str, ...]) -> LocatedConfig:
    """Apply `section.key=value` overrides; values are parsed as YAML (`3`, `true`, `[a, b]`, `{r: 8}`)."""
    for arg in overrides:
        shown = f"--set {arg}"
        parts, value = _parse_override(arg)
        node = _override_parent(cfg, parts, shown)
        last = parts[-1]
        old = node[last] if isinstance(node, list) or last in node else None
        if isinstance(old, dict) and isinstance(value, dict):
            sub = merge(LocatedConfig(old), LocatedConfig(value))
            value = sub.data
        node[last] = value
        path = tuple(parts)
        for k in [k for k in cfg.locs if k[: len(path)] == path]:
            del cfg.locs[k]
        cfg.locs[path] = Loc(shown, Path.cwd())
    return cfg


def from_dict(data: dict[str, Any], base_dir: Path | None = None) -> LocatedConfig:
    """A dict given to `Engine`: locations are the dotted paths themselves."""
    if not isinstance(data, dict):
        raise ConfigError(f"config: expected a mapping of sections, got {type(data).__name__}")
    base = base_dir or Path.cwd()
    locs: dict[KeyPath, Loc] = {}

    def rec(value: Any, path: KeyPath) -> None:
        locs[path] = Loc(f"config[{dotted(path)}]" if path else "config", base)
        if isinstance(value, dict):
            for k, v in value.items():
                rec(v, (*path, k))
        elif isinstance(value, list):
            for i, v in enumerate(value):
                rec(v, (*path, i))

    import copy

    data = copy.deepcopy(data)
    rec(data, ())
    root = locs.pop(())
    return LocatedConfig(data, locs, root)
