"""The root config: one YAML describes one run.

Every section (model, data, trainer, optimizer, scheduler, checkpoint, callbacks, distributed) names a
registered `type`; the section is validated against that class's own pydantic config. Errors name the
file and line, the field path and what is allowed. Validation is pure: no network, no weights, no
process group; but the files and folders a config names (`ExistingPath` / `ModelPath` fields) must exist.
"""

from __future__ import annotations

import difflib
import errno
import os
import re
import types
import typing
from pathlib import Path
from typing import Annotated, Any, Union

from pydantic import BaseModel, ConfigDict, Field, PrivateAttr, SerializeAsAny, ValidationError, field_validator

from arctic_vl.config.loader import KeyPath, LocatedConfig, apply_overrides, dotted, from_dict, load_file
from arctic_vl.config.paths import PathField, resolve_user_path
from arctic_vl.errors import ConfigError
from arctic_vl.plugins import load_plugins, run_config_checks
from arctic_vl.registry import REGISTRIES, ComponentConfig, non_finite_values

#: the type a section gets when it names none
DEFAULT_TYPES = {
    "model": "hf_vlm",
    "data": "vlm",
    "trainer": "sft",
    "optimizer": "adamw",
    "scheduler": "cosine",
    "checkpoint": "default",
    "distributed": "single",
}


class EvalConfig(BaseModel):
    """Evaluation on `data.eval_sources`: loss, and greedy exact match with `generate: true`."""

    model_config = ConfigDict(extra="forbid")

    every_n_steps: int | None = Field(None, ge=1, description="evaluate every N optimizer steps (and at the end); "
                                      "null: only at the end")
    generate: bool = Field(False, description="also greedy-decode each eval sample and report exact-match accuracy")
    max_new_tokens: int = Field(16, ge=1)
    micro_batch_size: int | None = Field(None, ge=1, description="default: data.micro_batch_size")
    max_samples: int | None = Field(None, ge=1, description="evaluate on the first N eval samples only")

    @field_validator("every_n_steps", mode="before")
    @classmethod
    def _every_positive(cls, value: Any) -> Any:
        if isinstance(value, int) and not isinstance(value, bool) and value < 1:
            raise ValueError(f"must be at least 1 (got {value}); for no periodic evaluation write null (or leave it "
                             "out): evaluation then runs once, at the end")
        return value


class EngineConfig(BaseModel):
    """A whole run. Built by `load_config`; sections hold the registered classes' own config objects."""

    model_config = ConfigDict(extra="forbid", arbitrary_types_allowed=True)

    model: SerializeAsAny[ComponentConfig]
    data: SerializeAsAny[ComponentConfig]
    trainer: SerializeAsAny[ComponentConfig]
    optimizer: SerializeAsAny[ComponentConfig]
    scheduler: SerializeAsAny[ComponentConfig]
    checkpoint: SerializeAsAny[ComponentConfig]
    callbacks: list[SerializeAsAny[ComponentConfig]] = Field(default_factory=list)
    distributed: SerializeAsAny[ComponentConfig]
    eval: EvalConfig = Field(default_factory=EvalConfig)

    #: the file the config was read from (None for a dict); not part of the run's settings
    source: str | None = Field(None, exclude=True)
    _located: LocatedConfig | None = PrivateAttr(None)

    def to_dict(self) -> dict[str, Any]:
        """The resolved config as plain data (what `validate` prints and the run saves)."""
        return self.model_dump(mode="json", exclude={"source"})


SECTIONS = (*REGISTRIES.keys(), "eval")


# ------------------------------------------------------------------------------------- entry points


def load_config(
    config: str | os.PathLike[str] | dict[str, Any] | EngineConfig,
    overrides: list[str] | tuple[str, ...] = (),
    base_dir: Path | None = None,
    writable_output: bool = True,
) -> EngineConfig:
    """A validated EngineConfig from a YAML path, a dict, or an EngineConfig (returned as is).

    `writable_output`: check that `trainer.output_dir` can be written (see `build_config`)."""
    if isinstance(config, EngineConfig):
        if overrides:
            config = config.to_dict()
        else:
            return config
    if isinstance(config, dict):
        located = from_dict(config, base_dir)
        source = None
    elif not isinstance(config, (str, os.PathLike)):
        raise ConfigError(f"config: expected a YAML path or a mapping of sections, got {type(config).__name__}")
    else:
        source = str(resolve_user_path(config, where="config file"))
        located = load_file(config)
    located = apply_overrides(located, list(overrides))
    cfg = build_config(located, writable_output)
    cfg.source = source
    return cfg


def build_config(located: LocatedConfig, writable_output: bool = True) -> EngineConfig:
    """Validate every section against its registered class; collect all errors, then raise one ConfigError.

    `writable_output`: also check that `trainer.output_dir` can be written (off for commands that only read
    a run directory, e.g. `export`)."""
    load_plugins()
    data = located.data
    errors = [
        f"{located.where((key,))}: {key}: unknown section{_did_you_mean(key, SECTIONS)}. "
        f"Allowed: {', '.join(SECTIONS)}, extends"
        for key in data if key not in SECTIONS
    ]
    sections: dict[str, Any] = {}
    for section, registry in REGISTRIES.items():
        raw = data.get(section)
        if section == "callbacks":
            sections[section] = _validate_callbacks(located, raw, registry, errors)
        elif raw is None and section in ("model", "data"):
            errors.append(f"{located.where(())}: {section}: required section missing")
        elif raw is not None or section in DEFAULT_TYPES:
            cfg = _validate_section(located, (section,), raw or {}, registry, DEFAULT_TYPES.get(section), errors)
            if cfg is not None:
                sections[section] = cfg
    if "eval" in data:
        raw_eval = data["eval"]
        raw_eval = dict(raw_eval) if isinstance(raw_eval, dict) else raw_eval
        if isinstance(raw_eval, dict):
            drop_nulls(EvalConfig, raw_eval)
        try:
            sections["eval"] = EvalConfig.model_validate(raw_eval if raw_eval is not None else {})
        except ValidationError as e:
            errors.extend(format_validation_error(e, located, ("eval",), EvalConfig, raw_eval))
    errors.extend(_non_finite_errors(sections, located))
    if errors:
        raise ConfigError(_joined(errors))
    cfg = EngineConfig(**sections)
    cfg._located = located
    if writable_output:
        check_output_dir(cfg, located)
    run_config_checks(cfg, located)
    return cfg


def _non_finite_errors(sections: dict[str, Any], located: LocatedConfig) -> list[str]:
    """Every inf/nan float of the validated sections (nested models too), at its file and line."""
    errors = []
    for section, value in sections.items():
        for i, item in enumerate(value) if isinstance(value, list) else [(None, value)]:
            prefix = (section,) if i is None else (section, i)
            errors.extend(f"{located.where(path)}: {dotted(path)}: must be a finite number (got {bad})"
                          for path, bad in non_finite_values(item, prefix))
    return errors


def check_output_dir(cfg: EngineConfig, located: LocatedConfig) -> None:
    """`trainer.output_dir` must be a directory this user can create or write: not a file, not under a file."""
    out = getattr(cfg.trainer, "output_dir", None)
    if isinstance(out, str):
        problem = output_dir_problem(Path(out))
        if problem:
            raise ConfigError(f"{located.where(('trainer', 'output_dir'))}: trainer.output_dir: {problem}")


def output_dir_problem(path: Path) -> str | None:
    """Why a run cannot write into `path` (None when it can); checks only, creates nothing."""
    try:
        if path.is_symlink():
            try:
                os.stat(path)
            except OSError as e:
                if e.errno == errno.ELOOP:
                    return f"{path} is a loop of symbolic links; point it at a directory (or remove the link)"
                return (f"{path} is a symbolic link to {os.readlink(path)}, which does not exist; point it at a "
                        "directory (or remove the link)")
        if path.exists() and not path.is_dir():
            return f"{path} is an existing file; name a directory (it is created if missing)"
        ancestor = path
        while not ancestor.exists() and ancestor.parent != ancestor:
            ancestor = ancestor.parent
        if not ancestor.is_dir():
            return f"{path} lies under {ancestor}, which is a file, not a directory"
        if not os.access(ancestor, os.W_OK | os.X_OK):
            what = "is not writable" if ancestor == path else f"cannot be created: {ancestor} is not writable"
            return f"{path} {what} by this user"
    except OSError as e:  # e.g. a parent without search permission, a symlink loop
        return f"{path} cannot be checked: {e.strerror or e}"
    return None


def _did_you_mean(key: Any, allowed: Any) -> str:
    close = difflib.get_close_matches(str(key), list(allowed), n=1)
    return f" (did you mean '{close[0]}'?)" if close else ""


def _validate_callbacks(located: LocatedConfig, raw: Any, registry: Any, errors: list[str]) -> list[Any]:
    """The `callbacks:` list, each item validated against its registered callback's config."""
    raw = [] if raw is None else raw
    if not isinstance(raw, list):
        errors.append(f"{located.where(('callbacks',))}: callbacks: must be a list of {{type: ...}} mappings")
        return []
    items = []
    for i, item in enumerate(raw):
        cfg = _validate_section(located, ("callbacks", i), item, registry, None, errors)
        if cfg is not None:
            items.append(cfg)
    return items


def _validate_section(
    located: LocatedConfig,
    path: KeyPath,
    raw: Any,
    registry: Any,
    default_type: str | None,
    errors: list[str],
) -> ComponentConfig | None:
    if not isinstance(raw, dict):
        errors.append(
            f"{located.where(path)}: {dotted(path)}: must be a mapping with a `type`, got {type(raw).__name__}"
        )
        return None
    raw = dict(raw)
    type_name = raw.setdefault("type", default_type)
    if type_name is None:
        errors.append(
            f"{located.where(path)}: {dotted(path)}.type: required. Registered: {', '.join(registry.names())}"
        )
        return None
    if not isinstance(type_name, str) or type_name not in registry.names():
        errors.append(
            f"{located.where((*path, 'type'))}: {dotted((*path, 'type'))}: {registry.unknown_message(type_name)}"
        )
        return None
    config_class = registry.get(type_name).config_class
    drop_nulls(config_class, raw)
    missing: list[tuple[KeyPath, str]] = []
    resolve_raw_paths(config_class, raw, path, located, missing)
    cfg, lines = None, []
    try:
        cfg = config_class.model_validate(raw)
    except ValidationError as e:
        lines = format_validation_error(e, located, path, config_class, raw)
    # A validator that read the missing path already said so (often with a hint of its own): no second line.
    errors.extend(missing_path_error(located, at, value) for at, value in missing
                  if not any(value in line for line in lines))
    errors.extend(lines)
    return None if missing else cfg


def _admits_none(annotation: Any) -> bool:
    """Whether a field of this type may hold None (Optional, a union with None, Any)."""
    if annotation is Any or annotation is None or annotation is type(None):
        return True
    origin = typing.get_origin(annotation)
    if origin is Annotated:
        return _admits_none(typing.get_args(annotation)[0])
    if origin in (Union, types.UnionType):
        return any(_admits_none(a) for a in typing.get_args(annotation))
    return False


def _nested_models(annotation: Any) -> list[type[BaseModel]]:
    """The pydantic models a field holds directly or as list items (through Optional/Union/Annotated)."""
    origin = typing.get_origin(annotation)
    if origin in (Annotated, Union, types.UnionType, list):
        args = typing.get_args(annotation)
        return [m for a in (args[:1] if origin is Annotated else args) for m in _nested_models(a)]
    return [annotation] if isinstance(annotation, type) and issubclass(annotation, BaseModel) else []


def drop_nulls(model: type[BaseModel], raw: dict[str, Any]) -> None:
    """Remove (in place, nested models too) every `key: null` whose field cannot hold None, so its default applies.

    That is how a child config unsets what it inherits through `extends` (`model: {tiny: null}` brings back the
    default tiny shape): where a field may be None (`max_grad_norm: null`: no clipping), null is that value."""
    for name, info in model.model_fields.items():
        key = info.alias or name
        if key not in raw:
            continue
        value = raw[key]
        if value is None and not _admits_none(info.annotation):
            del raw[key]
            continue
        for sub in _nested_models(info.annotation):
            if isinstance(value, dict):
                raw[key] = value = dict(value)
                drop_nulls(sub, value)
            elif isinstance(value, list):
                raw[key] = value = [dict(v) if isinstance(v, dict) else v for v in value]
                for item in value:
                    if isinstance(item, dict):
                        drop_nulls(sub, item)
            break


def missing_path_error(located: LocatedConfig, path: KeyPath, value: str) -> str:
    """`file:line: dotted.path: PATH does not exist`, for a path the config names that must exist."""
    parent = Path(value).parent
    hint = "" if parent.is_dir() else f" (nor does its folder {parent})"
    return (f"{located.where(path)}: {dotted(path)}: {value} does not exist{hint}; the files and folders a config "
            "names must exist (a relative path is relative to the file that sets it; for --set, the current directory)")


def _joined(errors: list[str]) -> str:
    if len(errors) == 1:
        return f"invalid config: {errors[0]}"
    return "invalid config:\n  " + "\n  ".join(errors)


# ---------------------------------------------------------------------------------------- error text


def format_validation_error(
    err: ValidationError, located: LocatedConfig, prefix: KeyPath, model: type[BaseModel], raw: Any = None
) -> list[str]:
    """One line per pydantic error: `file:line: dotted.path: what is wrong. what is allowed`.

    `raw` is the input that was validated: with it, pydantic's union-member tags (`str`, `SourceSpec`, ...)
    are dropped from the path, and a union's members that failed only on the input's type are not reported
    when another member got further.
    """
    entries = []  # (path within the section, message, a union member's type mismatch?)
    for e in err.errors(include_url=False):
        kind = e["type"]
        if raw is not None:
            loc, tagged = _clean_loc(e["loc"], raw, kind)
        else:
            loc = tuple(p for p in e["loc"] if not (isinstance(p, str) and ("[" in p or p.startswith("function-"))))
            tagged = False
        if kind == "extra_forbidden":
            allowed = _fields_at(model, loc[:-1])
            close = difflib.get_close_matches(str(loc[-1]), allowed, n=1)
            hint = f" (did you mean '{close[0]}'?)" if close else ""
            msg = f"unknown key{hint}. Allowed: {', '.join(allowed)}"
        elif kind == "missing":
            msg = "required field missing"
        else:
            msg = e["msg"]
            if kind not in ("value_error", "assertion_error") and "input" in e and not isinstance(e["input"], dict):
                msg += f" (got {e['input']!r})"
            if msg.startswith("Value error, "):
                msg = msg[len("Value error, "):]
            if kind in ("greater_than_equal", "greater_than") and loc and _field_admits_none(model, loc):
                msg += "; or null to leave it unset"
            if kind in ("value_error", "assertion_error") and isinstance(e.get("input"), dict):
                loc = (*loc, *_blamed_field(msg, e["input"]))
        entries.append((loc, msg, tagged and kind.endswith("_type")))
    # A union member that failed only because the input has another type: noise when another member got further.
    kept = [
        x for x in entries
        if not (x[2] and any(y is not x and not y[2] and y[0][: len(x[0])] == x[0] for y in entries))
    ]
    lines: list[str] = []
    merged: dict[KeyPath, int] = {}
    for loc, msg, type_only in kept:
        path = (*prefix, *loc)
        if type_only and loc in merged:  # several members, all of the wrong type: one line
            lines[merged[loc]] += f"; or: {msg}"
            continue
        if type_only:
            merged[loc] = len(lines)
        lines.append(f"{located.where(path)}: {dotted(path)}: {msg}")
    return lines


def _clean_loc(loc: tuple[Any, ...], raw: Any, kind: str) -> tuple[KeyPath, bool]:
    """A pydantic error location as a path through the input, and whether union tags were dropped from it."""
    out: list[Any] = []
    node, tagged = raw, False
    for i, part in enumerate(loc):
        last = i == len(loc) - 1
        into_dict = isinstance(node, dict) and part in node
        if into_dict or (isinstance(node, list) and isinstance(part, int) and 0 <= part < len(node)):
            out.append(part)
            node = node[part]
        elif last and isinstance(node, dict) and kind in ("missing", "extra_forbidden"):
            out.append(part)
        else:  # a union member's tag (`str`, `SourceSpec`, `list[int]`) or a validator's name
            tagged = True
    return tuple(out), tagged


def _blamed_field(msg: str, given: dict[Any, Any]) -> tuple[str, ...]:
    """For a model validator's error: the given field its message names (or whose value it quotes), if any."""
    keys = [k for k in given if isinstance(k, str) and k != "type"]
    named = [(m.start(), k) for k in keys if (m := re.search(rf"(?<![\w.]){re.escape(k)}(?!\w)", msg))]
    if named:
        return (min(named)[1],)
    quoted = [k for k in keys if isinstance(given[k], str) and len(given[k]) > 1 and given[k] in msg]
    return (quoted[0],) if quoted else ()


def _unwrap(annotation: Any) -> list[Any]:
    """The concrete types inside Optional/Union/list/dict/Annotated."""
    origin = typing.get_origin(annotation)
    if origin is Annotated:
        return _unwrap(typing.get_args(annotation)[0])
    if origin in (Union, types.UnionType, list, tuple, set, dict, typing.Literal) or origin is not None:
        if origin is typing.Literal:
            return []
        out = []
        for arg in typing.get_args(annotation):
            out.extend(_unwrap(arg))
        return out
    return [annotation]


def _field_at(model: type[BaseModel], loc: KeyPath) -> Any:
    """The pydantic FieldInfo at `loc` (through nested models and list items), or None."""
    current: Any = model
    info = None
    for part in loc:
        if isinstance(part, int):
            continue
        if not (isinstance(current, type) and issubclass(current, BaseModel)) or part not in current.model_fields:
            return None
        info = current.model_fields[part]
        models = _nested_models(info.annotation)
        current = models[0] if models else None
    return info


def _field_admits_none(model: type[BaseModel], loc: KeyPath) -> bool:
    info = _field_at(model, loc)
    return info is not None and _admits_none(info.annotation)


def _fields_at(model: type[BaseModel], loc: KeyPath) -> list[str]:
    current: Any = model
    for part in loc:
        if isinstance(part, int):
            continue
        if not (isinstance(current, type) and issubclass(current, BaseModel)) or part not in current.model_fields:
            return []
        models = [
            t for t in _unwrap(current.model_fields[part].annotation)
            if isinstance(t, type) and issubclass(t, BaseModel)
        ]
        if not models:
            return []
        current = models[0]
    if isinstance(current, type) and issubclass(current, BaseModel):
        return sorted(current.model_fields)
    return []


# --------------------------------------------------------------------------------------------- paths


_HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+$")


def resolve_path(value: str, base_dir: Path, hub_ok: bool = False, where: str = "") -> str:
    """`value` made absolute against `base_dir` (with `~` expanded); an absolute path is kept as written. A NUL
    byte or a symbolic link loop is a ConfigError starting with `where` (see `resolve_user_path`)."""
    expanded = Path(os.path.expanduser(value))
    joined = base_dir / expanded
    if "\0" not in value and not expanded.is_absolute() and _broken_link_in(joined):
        return str(joined)  # resolve() would follow a dangling link: keep it, to be named
    resolved = resolve_user_path(value, base_dir, where)
    if expanded.is_absolute():
        return str(expanded)
    if hub_ok and not resolved.exists() and _HUB_ID.match(value):
        return value
    return str(resolved)


def _broken_link_in(path: Path) -> bool:
    """Whether some component of `path` is a symbolic link that points nowhere (a loop of links is not:
    `resolve_user_path` names it)."""
    current = Path(path.anchor)
    for part in path.parts[1:]:
        current = current / part
        if current.is_symlink():
            try:
                os.stat(current)
            except OSError as e:
                return e.errno != errno.ELOOP
        elif not current.exists():
            return False
    return False


def _path_marker(annotation: Any, metadata: list[Any]) -> PathField | None:
    for m in metadata:
        if isinstance(m, PathField):
            return m
    if typing.get_origin(annotation) is Annotated:
        for m in typing.get_args(annotation)[1:]:
            if isinstance(m, PathField):
                return m
    return None


def _resolve_value(annotation: Any, metadata: list[Any], value: Any, path: KeyPath, located: LocatedConfig,
                   missing: list[tuple[KeyPath, str]]) -> Any:
    marker = _path_marker(annotation, metadata)
    if marker is not None and isinstance(value, str) and value.strip() and "\x00" not in value:
        resolved = resolve_path(value, located.base_dir(path), marker.hub_ok, f"{located.where(path)}: {dotted(path)}")
        kept_hub_id = marker.hub_ok and resolved == value and not Path(value).is_absolute()
        if marker.must_exist and not kept_hub_id and not Path(resolved).exists():
            missing.append((path, resolved))
        return resolved
    origin = typing.get_origin(annotation)
    if origin is Annotated:
        args = typing.get_args(annotation)
        return _resolve_value(args[0], list(args[1:]), value, path, located, missing)
    if origin in (Union, types.UnionType):
        for arg in typing.get_args(annotation):
            if isinstance(value, str) and _path_marker(arg, []) is not None:
                return _resolve_value(arg, [], value, path, located, missing)
            if isinstance(value, dict) and isinstance(arg, type) and issubclass(arg, BaseModel):
                return _resolve_value(arg, [], value, path, located, missing)
            if isinstance(value, list) and typing.get_origin(arg) is list:
                return _resolve_value(arg, [], value, path, located, missing)
        return value
    if origin is list and isinstance(value, list):
        (inner,) = typing.get_args(annotation) or (Any,)
        return [_resolve_value(inner, [], v, (*path, i), located, missing) for i, v in enumerate(value)]
    if isinstance(annotation, type) and issubclass(annotation, BaseModel) and isinstance(value, dict):
        resolve_raw_paths(annotation, value, path, located, missing)
    return value


def resolve_raw_paths(model: type[BaseModel], raw: dict[str, Any], path: KeyPath, located: LocatedConfig,
                      missing: list[tuple[KeyPath, str]] | None = None) -> None:
    """Make every path-typed value in `raw` absolute, against the file (or cwd for --set) that set it.

    Done before validation so validators that read files (e.g. a checkpoint's config.json) see real paths.
    A value of an `ExistingPath` (or `ModelPath`, unless kept as a hub id) field that names nothing on disk
    is appended to `missing` as (its key path, the resolved path).
    """
    missing = [] if missing is None else missing
    for name, info in model.model_fields.items():
        key = info.alias or name
        if key in raw:
            raw[key] = _resolve_value(info.annotation, list(info.metadata), raw[key], (*path, key), located, missing)
        elif isinstance(info.default, str) and info.default:
            # a path default (e.g. trainer.output_dir) is relative to the run's config file, like a written one
            marker = _path_marker(info.annotation, list(info.metadata))
            if marker is not None:
                base = located.root.base_dir if located.root else Path.cwd()
                raw[key] = resolve_path(info.default, base, marker.hub_ok, f"{located.where((*path, key))}: "
                                                                           f"{dotted((*path, key))} (default)")


def located_of(cfg: EngineConfig) -> LocatedConfig | None:
    """The locations the config was read with (for errors found after validation)."""
    return cfg._located


def where(cfg: EngineConfig, path: KeyPath) -> str:
    """`file:line` of a config value, for errors found at run time (e.g. a bad data path)."""
    located = located_of(cfg)
    return located.where(path) if located else dotted(path)


def json_schema() -> dict[str, Any]:
    """JSON Schema of the whole config: each section is a union of its registered types' schemas."""
    load_plugins()
    defs: dict[str, Any] = {}
    properties: dict[str, Any] = {
        "extends": {"anyOf": [{"type": "string"}, {"type": "array", "items": {"type": "string"}}]}
    }
    for section, registry in REGISTRIES.items():
        variants = []
        for name, cls in registry.items():
            schema = cls.config_class.model_json_schema(ref_template="#/$defs/{model}")
            defs.update(schema.pop("$defs", {}))
            schema.setdefault("properties", {})["type"] = {"const": name}
            title = f"{section}.{name}"
            defs[title] = schema
            variants.append({"$ref": f"#/$defs/{title}"})
        entry = {"anyOf": variants} if variants else {"type": "object"}
        properties[section] = {"type": "array", "items": entry} if section == "callbacks" else entry
    eval_schema = EvalConfig.model_json_schema()
    properties["eval"] = eval_schema
    return {
        "$schema": "https://json-schema.org/draft/2020-12/schema",
        "title": "arctic_vl run config",
        "type": "object",
        "additionalProperties": False,
        "properties": properties,
        "required": ["model", "data"],
        "$defs": defs,
    }
