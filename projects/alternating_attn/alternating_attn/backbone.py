"""Initialise an alternating-attention composite from a backbone checkpoint (and report what happened).

A parameter is copied when its name, mapped onto the composite's naming, exists in the composite with the same
shape, and it does not belong to a skipped part. Parts are located by the composite's *real* module paths (found
by walking the model for its `LlavaOnevisionModel`), not by guessed name prefixes: the origin repo skipped
`mm_projector` / `vision_resampler` with `startswith` on names that never start that way and so skipped nothing.

Backbone key layouts understood (mapped to the `...ForConditionalGeneration` naming):

==============================================  ==============================================
backbone key                                    composite key
==============================================  ==============================================
`model.language_model.*`, `model.vision_tower.*` as is (transformers-5 in-memory LLaVA-OneVision)
`model.multi_modal_projector.*`, `model.image_newline`, `lm_head.*`
`language_model.lm_head.*`                      `lm_head.*` (LLaVA-OneVision as saved on disk)
`language_model.model.*`                        `model.language_model.*` (transformers-4 llava-hf)
`language_model.*`                              `model.language_model.*` (LLaVA-OneVision on disk)
`vision_tower.*`, `multi_modal_projector.*`,    `model.` + key
`image_newline`
`model.vision_tower.vision_tower.*`             `model.vision_tower.*` (original LLaVA repo)
`model.mm_projector.0.*` / `.2.*`               `model.multi_modal_projector.linear_1.*` / `linear_2.*`
`model.*` (Qwen2ForCausalLM)                    `model.language_model.*`
`layers.*`, `embed_tokens.*`, `norm.*` (Qwen2Model) `model.language_model.*`
==============================================  ==============================================

Checkpoints are read from safetensors only (`model.safetensors` or a sharded `model.safetensors.index.json`), one
shard at a time and only the tensors that are copied; pickled `.bin` files are refused, never unpickled.
"""

from __future__ import annotations

import contextlib
import re
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import nn

__all__ = [
    "PARTS",
    "WeightReport",
    "init_from_backbone",
    "load_backbone_state_dict",
    "map_backbone_key",
]

#: Parts that can be skipped, with the attribute names of their modules inside `LlavaOnevisionModel`
#: (`lm_head` sits on the generation class, next to that model).
PARTS: dict[str, tuple[str, ...]] = {
    "vision": ("vision_tower",),
    # The image newline is a projector-side embedding: it always goes with the aligner.
    "aligner": ("multi_modal_projector", "image_newline"),
    "llm": ("language_model", "lm_head"),
}

# (pattern, replacement) pairs tried in order; the first match wins. Targets use the generation-class naming.
_KEY_RULES: tuple[tuple[re.Pattern[str], str], ...] = tuple(
    (re.compile(pattern), replacement)
    for pattern, replacement in (
        (r"^model\.vision_tower\.vision_tower\.(.*)$", r"model.vision_tower.\1"),
        (r"^model\.mm_projector\.0\.(.*)$", r"model.multi_modal_projector.linear_1.\1"),
        (r"^model\.mm_projector\.2\.(.*)$", r"model.multi_modal_projector.linear_2.\1"),
        (r"^(model\.(?:language_model|vision_tower|multi_modal_projector)\..*)$", r"\1"),
        (r"^(model\.image_newline)$", r"\1"),
        (r"^(lm_head\..*)$", r"\1"),
        (r"^language_model\.lm_head\.(.*)$", r"lm_head.\1"),
        (r"^language_model\.model\.(.*)$", r"model.language_model.\1"),
        (r"^language_model\.(.*)$", r"model.language_model.\1"),
        (r"^((?:vision_tower|multi_modal_projector)\..*)$", r"model.\1"),
        (r"^(image_newline)$", r"model.\1"),
        (r"^model\.(.*)$", r"model.language_model.\1"),
        (r"^((?:layers|embed_tokens|norm)\..*)$", r"model.language_model.\1"),
    )
)


def map_backbone_key(key: str) -> str | None:
    """Map a backbone checkpoint key to the composite's `...ForConditionalGeneration` naming (`None`: no rule)."""
    for pattern, replacement in _KEY_RULES:
        if pattern.match(key):
            return pattern.sub(replacement, key)
    return None


@dataclass
class WeightReport:
    """Outcome of [`init_from_backbone`]. Names are the composite's, except `unexpected` (backbone keys)."""

    copied: list[str] = field(default_factory=list)
    #: (name, reason): `part '<part>'` or `shape (backbone) != (composite)` or `tied to <name>`.
    skipped: list[tuple[str, str]] = field(default_factory=list)
    #: Composite tensors that received nothing (they keep their initialisation).
    missing: list[str] = field(default_factory=list)
    #: Backbone keys with no target in the composite.
    unexpected: list[str] = field(default_factory=list)

    def format(self, first: int = 20) -> str:
        """Counts, then the first `first` entries of each list."""
        lines = [
            f"copied: {len(self.copied)}, skipped: {len(self.skipped)}, missing: {len(self.missing)}, "
            f"unexpected: {len(self.unexpected)}"
        ]
        sections: list[tuple[str, list[str]]] = [
            ("copied", self.copied),
            ("skipped", [f"{name}: {reason}" for name, reason in self.skipped]),
            ("missing", self.missing),
            ("unexpected", self.unexpected),
        ]
        for title, entries in sections:
            if not entries:
                continue
            shown = entries[:first]
            more = f" (first {len(shown)} of {len(entries)})" if len(entries) > len(shown) else ""
            lines.append(f"{title}{more}:")
            lines.extend(f"  {entry}" for entry in shown)
        return "\n".join(lines)

    def __str__(self) -> str:
        return self.format()


class _TensorSource:
    """Names, shapes and lazily loaded tensors of a state dict or of safetensors files."""

    def __init__(self, source: Mapping[str, torch.Tensor] | str | Path, stack: contextlib.ExitStack):
        self._tensors: Mapping[str, torch.Tensor] | None = None
        self._handles: dict[str, object] = {}
        if isinstance(source, Mapping):
            self._tensors = source
            return
        from safetensors import safe_open

        for file in _safetensors_files(Path(source)):
            handle = stack.enter_context(safe_open(str(file), framework="pt", device="cpu"))
            self._handles.update(dict.fromkeys(handle.keys(), handle))

    def names(self) -> list[str]:
        return list(self._tensors.keys()) if self._tensors is not None else list(self._handles)

    def shape(self, key: str) -> tuple[int, ...]:
        if self._tensors is not None:
            return tuple(self._tensors[key].shape)
        return tuple(self._handles[key].get_slice(key).get_shape())

    def get(self, key: str) -> torch.Tensor:
        if self._tensors is not None:
            return self._tensors[key]
        return self._handles[key].get_tensor(key)


def _safetensors_files(path: Path) -> list[Path]:
    if path.is_file():
        if path.suffix != ".safetensors":
            raise ValueError(
                f"{path}: only .safetensors checkpoints are read (pickled files are never loaded)"
            )
        return [path]
    if not path.is_dir():
        raise FileNotFoundError(f"No checkpoint at {path}")
    single = path / "model.safetensors"
    if single.is_file():
        return [single]
    index = path / "model.safetensors.index.json"
    if index.is_file():
        from arctic_vl import parse_json

        weight_map = parse_json(index.read_bytes()).get("weight_map", {})
        shards = sorted(set(weight_map.values()))
        if not shards:
            raise ValueError(f"{index} has an empty weight_map")
        return [path / shard for shard in shards]
    pickled = sorted(p.name for p in path.glob("*.bin"))
    hint = f" (found {pickled}: convert them to safetensors first)" if pickled else ""
    raise FileNotFoundError(f"No model.safetensors or model.safetensors.index.json in {path}{hint}")


def load_backbone_state_dict(path: str | Path) -> dict[str, torch.Tensor]:
    """Every tensor of a safetensors checkpoint (file, directory, or sharded directory), on CPU."""
    with contextlib.ExitStack() as stack:
        source = _TensorSource(path, stack)
        return {key: source.get(key) for key in source.names()}


def _part_paths(model: nn.Module) -> tuple[str, dict[str, tuple[str, ...]]]:
    """The composite's real module paths of each part, and the prefix of its `LlavaOnevisionModel`."""
    from transformers import LlavaOnevisionModel

    for name, module in model.named_modules():
        if isinstance(module, LlavaOnevisionModel):
            prefix = f"{name}." if name else ""
            break
    else:
        raise TypeError(
            f"{type(model).__name__} contains no LlavaOnevisionModel; expected a LLaVA-OneVision composite"
        )
    paths = {
        part: tuple(
            attribute if attribute == "lm_head" else f"{prefix}{attribute}" for attribute in attributes
        )
        for part, attributes in PARTS.items()
    }
    return prefix, paths


def _in_path(name: str, path: str) -> bool:
    return name == path or name.startswith(path + ".")


def init_from_backbone(
    model: nn.Module,
    backbone_state_dict_or_path: Mapping[str, torch.Tensor] | str | Path,
    *,
    skip_parts: Iterable[str] = ("aligner", "vision"),
) -> WeightReport:
    """Copy every backbone tensor whose mapped name and shape match into `model`, except the skipped parts.

    Args:
        model: a LLaVA-OneVision composite (`...ForConditionalGeneration` or its base `...Model`), any variant.
        backbone_state_dict_or_path: a state dict, a `.safetensors` file, or a checkpoint directory (single or
            sharded safetensors). A Qwen2ForCausalLM / Qwen2Model or a LLaVA-OneVision checkpoint (see the module
            docstring for the key layouts).
        skip_parts: any of `vision` (vision tower), `aligner` (projector + image newline), `llm` (language model +
            head). Their tensors are reported as skipped, never copied.

    Returns:
        A [`WeightReport`]. Tensors are copied in place (converted to the composite's dtype and device).
    """
    skip_parts = tuple(skip_parts)
    unknown = sorted(set(skip_parts) - set(PARTS))
    if unknown:
        raise ValueError(f"Unknown part(s) {unknown} in skip_parts; valid parts: {sorted(PARTS)}")

    prefix, part_paths = _part_paths(model)
    targets = model.state_dict(keep_vars=True)
    # Tied tensors (lm_head <-> embed_tokens) appear under several names but are one storage.
    alias_of: dict[str, int] = {name: id(tensor) for name, tensor in targets.items()}

    def to_model_name(canonical: str) -> str:
        # Canonical names use the generation class's `model.` prefix; the base model has none.
        return prefix + canonical[len("model.") :] if canonical.startswith("model.") else canonical

    def part_of(name: str) -> str | None:
        for part, paths in part_paths.items():
            if any(_in_path(name, path) for path in paths):
                return part
        return None

    report = WeightReport()
    copied_storages: dict[int, str] = {}
    with contextlib.ExitStack() as stack, torch.no_grad():
        source = _TensorSource(backbone_state_dict_or_path, stack)
        backbone_keys = source.names()
        for key in backbone_keys:
            canonical = map_backbone_key(key)
            name = to_model_name(canonical) if canonical is not None else None
            if name is None or name not in targets:
                report.unexpected.append(key)
                continue
            part = part_of(name)
            if part in skip_parts:
                report.skipped.append((name, f"part '{part}'"))
                continue
            source_shape, target_shape = source.shape(key), tuple(targets[name].shape)
            if source_shape != target_shape:
                report.skipped.append((name, f"shape {source_shape} != {target_shape}"))
                continue
            if alias_of[name] in copied_storages:
                report.skipped.append((name, f"tied to {copied_storages[alias_of[name]]} (already copied)"))
                continue
            targets[name].copy_(source.get(key))
            report.copied.append(name)
            copied_storages[alias_of[name]] = name

        # A tied-embedding backbone stores no lm_head; an untied composite head then takes the input embedding,
        # which is exactly what the backbone computes with.
        head, embed = "lm_head.weight", to_model_name("model.language_model.embed_tokens.weight")
        head_from_backbone = any(map_backbone_key(k) == head for k in backbone_keys)
        if (
            head in targets
            and embed in report.copied
            and not head_from_backbone
            and alias_of[head] not in copied_storages
            and "llm" not in skip_parts
            and targets[head].shape == targets[embed].shape
        ):
            targets[head].copy_(targets[embed])
            report.copied.append(head)
            copied_storages[alias_of[head]] = head

    report.missing = [name for name in targets if alias_of[name] not in copied_storages]
    return report
