"""YAML configs that remember where every value came from.

A config is read into plain dicts and lists plus a location map: for every key path, the file and line
(or the `--set` argument, or the dotted path of a dict given to `Engine`). Errors found later, in
validation or at run time, point back at that place.

Rules: `extends: FILE` (or a list of files) inherits from other configs; mappings merge deeply, lists
and scalars replace, and a mapping whose `type` changes is replaced whole. Duplicate keys are errors.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from arctic_vl.config.paths import resolve_user_path
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
        """Printable location of `path` (or its nearest written ancestor); `<config>` when none is known."""
        loc = self.loc(path)
        return loc.where if loc else "<config>"

    def base_dir(self, path: KeyPath) -> Path:
        """The directory relative paths at `path` resolve against (the writing file's); the cwd when none is known."""
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

#: a run config nests a handful of levels and holds hundreds of values: these bounds stop nesting bombs and
#: YAML alias bombs (an anchor copied into itself over and over) fast, with an error instead of a MemoryError
MAX_DEPTH = 64
MAX_VALUES = 100_000

_YAML = "tag:yaml.org,2002:"
_MAP_TAG, _SEQ_TAG = _YAML + "map", _YAML + "seq"
#: the scalar types a config may hold; every other tag (python/*, binary, set, omap, local `!tags`) is refused
_SCALAR_TAGS = {_YAML + t for t in ("null", "bool", "int", "float", "str", "timestamp")}
_PLAIN = "a config holds plain mappings, lists, strings, numbers, booleans and null"


def _display(path: Path) -> str:
    try:
        resolved = path.resolve()
    except (OSError, RuntimeError, ValueError):  # a link loop or a NUL byte: resolve_user_path names those
        return str(path)
    try:
        return str(resolved.relative_to(Path.cwd()))
    except ValueError:
        return str(resolved)


def _short(path: KeyPath) -> str:
    """A key path for a message: the first levels of a very deep one."""
    return dotted(path) if len(path) <= 6 else dotted(path[:6]) + "..."


def _short_tag(tag: str) -> str:
    return "!!" + tag[len(_YAML):] if tag.startswith(_YAML) else tag


class _Builder:
    """Plain Python data from a composed YAML node graph, recording the line of every key path.

    Every node's tag is checked (only plain YAML types pass), and the expansion is bounded: aliases make the
    node graph a DAG (or, with `&a [*a]`, a cycle), so values are counted and depth is limited as they are
    built.
    """

    def __init__(self, shown: str, base_dir: Path, with_lines: bool = True):
        self.shown = shown
        self.base_dir = base_dir
        self.with_lines = with_lines
        self.values = 0
        self.scalars = yaml.SafeLoader("")  # scalars: the standard YAML 1.1 rules

    def where(self, node: yaml.Node) -> str:
        return f"{self.shown}:{node.start_mark.line + 1}" if self.with_lines else self.shown

    def build(self, node: yaml.Node, path: KeyPath, locs: dict[KeyPath, Loc]) -> Any:
        where = self.where(node)
        locs[path] = Loc(where, self.base_dir)
        self.values += 1
        if self.values > MAX_VALUES:
            raise ConfigError(f"{where}: {_short(path)}: the config expands to more than {MAX_VALUES} values "
                              "(YAML anchors and aliases copy what they name); a run config is far smaller")
        if len(path) > MAX_DEPTH:
            raise ConfigError(f"{where}: {_short(path)}: nested deeper than {MAX_DEPTH} levels "
                              "(or a YAML alias that contains itself); a run config needs a handful")
        if isinstance(node, yaml.MappingNode):
            self._check_tag(node, _MAP_TAG, path)
            return self._mapping(node, path, locs)
        if isinstance(node, yaml.SequenceNode):
            self._check_tag(node, _SEQ_TAG, path)
            return [self.build(item, (*path, i), locs) for i, item in enumerate(node.value)]
        if node.tag not in _SCALAR_TAGS:
            self._refuse_tag(node, path)
        try:
            return self.scalars.construct_object(node)
        except (ValueError, TypeError, OverflowError, yaml.YAMLError) as e:  # `!!int abc`, `2020-13-45`
            problem = getattr(e, "problem", None) or e
            raise ConfigError(f"{where}: {dotted(path)}: invalid YAML value {node.value!r}: {problem}") from None

    def _mapping(self, node: yaml.MappingNode, path: KeyPath, locs: dict[KeyPath, Loc]) -> dict[Any, Any]:
        out: dict[Any, Any] = {}
        for key_node, value_node in node.value:
            key_where = self.where(key_node)
            if key_node.tag == _YAML + "merge":
                raise ConfigError(
                    f"{key_where}: {dotted(path)}: YAML merge keys (<<) are not supported; use `extends:`"
                )
            key = self.build(key_node, (*path, "<key>"), {})
            if not isinstance(key, (str, int, float, bool)):
                raise ConfigError(f"{key_where}: {dotted(path)}: a key must be a plain scalar")
            child = (*path, key)
            if key in out:
                first = locs[child].where
                raise ConfigError(f"{key_where}: {dotted(child)}: duplicate key (first given at {first}); "
                                  "each key may appear once")
            locs[child] = Loc(key_where, self.base_dir)
            out[key] = self.build(value_node, child, locs)
            locs[child] = Loc(key_where, self.base_dir)  # a key's line, not its value's (a block may start below)
        return out

    def _check_tag(self, node: yaml.Node, plain: str, path: KeyPath) -> None:
        if node.tag != plain:
            self._refuse_tag(node, path)

    def _refuse_tag(self, node: yaml.Node, path: KeyPath) -> None:
        raise ConfigError(
            f"{self.where(node)}: {dotted(path)}: YAML tag {_short_tag(node.tag)} is not allowed; {_PLAIN}"
        )


def _yaml_error(shown: str, e: yaml.YAMLError, text: str = "") -> str:
    """`file:line: invalid YAML: problem`; an unclosed bracket or quote points at the line that opened it."""
    if isinstance(e, yaml.reader.ReaderError):  # a control character: the reader knows only the offset
        line = text[: e.position].count("\n") + 1 if text else None
        char = f"U+{e.character:04X}" if isinstance(e.character, int) else repr(e.character)
        return f"{shown}{f':{line}' if line else ''}: invalid YAML: character {char} is not allowed in YAML text"
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


def decode_text(data: bytes, shown: str) -> str:
    """UTF-8 text of a file (a BOM is dropped); any other encoding is an error naming the file and line."""
    try:
        return data.decode("utf-8-sig")
    except UnicodeDecodeError as e:
        line = data[: e.start].count(b"\n") + 1
        column = e.start - (data.rfind(b"\n", 0, e.start) + 1) + 1
        raise ConfigError(f"{shown}:{line}: not UTF-8 text: byte 0x{data[e.start]:02x} at column {column} cannot be "
                          "decoded; save the file as UTF-8") from None


def _check_nesting(text: str) -> None:
    """Refuse nesting deeper than MAX_DEPTH from the event stream, before PyYAML's recursive composer sees it."""
    depth = 0
    for event in yaml.parse(text, Loader=yaml.SafeLoader):
        if isinstance(event, (yaml.MappingStartEvent, yaml.SequenceStartEvent)):
            depth += 1
            if depth > MAX_DEPTH:
                raise _TooDeep(event.start_mark.line + 1)
        elif isinstance(event, (yaml.MappingEndEvent, yaml.SequenceEndEvent)):
            depth -= 1


class _TooDeep(Exception):
    def __init__(self, line: int):
        self.line = line


def compose_text(text: str, shown: str, with_lines: bool = True) -> yaml.Node | None:
    """The YAML node graph of `text`, after checking its syntax and nesting; errors name `shown` (and line)."""
    try:
        _check_nesting(text)
        return yaml.compose(text, Loader=yaml.SafeLoader)
    except _TooDeep as e:
        at = f"{shown}:{e.line}" if with_lines else shown
        raise ConfigError(f"{at}: invalid YAML: nested deeper than {MAX_DEPTH} levels; a run config needs a handful") \
            from None
    except yaml.YAMLError as e:
        raise ConfigError(_yaml_error(shown, e, text)) from None


def parse_value(text: str, shown: str) -> Any:
    """One YAML value (e.g. of `--set key=VALUE`) as plain data, under the same rules as a config file."""
    node = compose_text(text, shown, with_lines=False)
    return None if node is None else _Builder(shown, Path.cwd(), with_lines=False).build(node, (), {})


def _compose_file(file: Path, shown: str, what: str) -> yaml.Node | None:
    """`file`'s YAML node tree (None when empty); a missing, unreadable or non-UTF-8 file is a ConfigError
    naming it (`what`: "config file" or "file")."""
    try:
        data = file.read_bytes()
    except FileNotFoundError:
        raise ConfigError(f"{shown}: {what} not found") from None
    except IsADirectoryError:
        raise ConfigError(f"{shown}: is a directory, not a {what}") from None
    except OSError as e:
        raise ConfigError(f"{shown}: cannot read {what}: {e.strerror}") from None
    return compose_text(decode_text(data, shown), shown)


def read_plain_yaml(file: Path) -> Any:
    """Any YAML file (e.g. a data-source list) as plain data: UTF-8, plain types only, bounded size and depth;
    every problem is a ConfigError naming the file and line."""
    shown = _display(file)
    node = _compose_file(file, shown, "file")
    return None if node is None else _Builder(shown, file.parent).build(node, (), {})


def read_yaml(file: Path) -> LocatedConfig:
    """Parse one YAML file into a LocatedConfig (no `extends` processing)."""
    shown = _display(file)
    node = _compose_file(file, shown, "config file")
    locs: dict[KeyPath, Loc] = {}
    root = Loc(f"{shown}:1", file.parent)
    if node is None:
        return LocatedConfig({}, {}, root)
    data = _Builder(shown, file.parent).build(node, (), locs)
    if not isinstance(data, dict):
        raise ConfigError(
            f"{shown}:1: a config must be a mapping of sections (model, data, trainer, ...), got {type(data).__name__}"
        )
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
    file = resolve_user_path(file, where="config file") if not _chain else Path(file)
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
        where = ext_locs.get(("extends", i), ext_loc) if len(parents) > 1 else ext_loc
        where_s = where.where if where else _display(file)
        field = f"extends[{i}]" if len(parents) > 1 else "extends"
        parent_path = resolve_user_path(parent, file.parent, f"{where_s}: {field}")
        if not parent_path.is_file():
            raise ConfigError(f"{where_s}: {field}: file not found: {parent} (looked at {_display(parent_path)})")
        if parent_path in (*_chain, file):
            cycle = " -> ".join(_display(p) for p in (*_chain, file, parent_path))
            raise ConfigError(f"{where_s}: {field}: cycle: {cycle}")
        try:
            base = load_file(parent_path, (*_chain, file))
        except ConfigError as e:
            # the parent's own problem names the parent (e.g. a binary file's "line 1"): say who named it too
            raise ConfigError(f"{e} (named by {where_s}: {field})") from None
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
        value = parse_value(raw, shown) if raw.strip() else ""
    except ConfigError as e:  # the same rules as a file: plain types, bounded size and depth
        problem = str(e).removeprefix(f"{shown}: ").removeprefix("<root>: ").removeprefix("invalid YAML: ")
        raise ConfigError(f"{shown}: {key}: value is not valid YAML: {problem}") from None
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
    """A dict given to `Engine`: locations are the dotted paths themselves (bounded like a YAML file)."""
    if not isinstance(data, dict):
        raise ConfigError(f"config: expected a mapping of sections, got {type(data).__name__}")
    base = base_dir or Path.cwd()
    locs: dict[KeyPath, Loc] = {}

    def rec(value: Any, path: KeyPath) -> None:
        if len(path) > MAX_DEPTH:  # also a dict that contains itself
            raise ConfigError(
                f"config[{_short(path)}]: nested deeper than {MAX_DEPTH} levels; a run config needs a handful"
            )
        if len(locs) >= MAX_VALUES:
            raise ConfigError(f"config: more than {MAX_VALUES} values; a run config is far smaller")
        locs[path] = Loc(f"config[{dotted(path)}]" if path else "config", base)
        if isinstance(value, dict):
            for k, v in value.items():
                rec(v, (*path, k))
        elif isinstance(value, list):
            for i, v in enumerate(value):
                rec(v, (*path, i))

    rec(data, ())
    data = copy.deepcopy(data)
    root = locs.pop(())
    return LocatedConfig(data, locs, root)
