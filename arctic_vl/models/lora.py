"""LoRA through PEFT, and what a LoRA run exports.

`model.lora` puts LoRA adapters on the linear layers of some parts (`vision`, `aligner`, `llm`); the
other parts are trained fully unless `model.freeze` names them. PEFT freezes everything it does not
wrap, so the fully trained parts go into PEFT's `modules_to_save`: the adapter then carries them and
`PeftModel.from_pretrained(base, adapter_dir)` rebuilds the trained model.

A part is given to `modules_to_save` as its largest submodules whose parameters all belong to that part
(LLaVA's `model.multi_modal_projector`; Qwen's `model.visual.blocks` but not `model.visual`, which also
holds the merger). A parameter that sits loose on a module of mixed parts (LLaVA-NeXT's
`model.image_newline`, an aligner parameter directly on the composite) cannot be wrapped by PEFT: it is
kept trainable by hand and written into the adapter file under its PEFT name, which PEFT's loader
restores as it restores non-LoRA biases (keys without an adapter name, loaded non-strictly).

Export writes the MERGED model (W + alpha/r * B @ A, modules_to_save copies in place of the originals)
computed from a state dict, so neither the live model nor a copy of it is changed: a run can export and
go on training.
"""

from __future__ import annotations

import json
import re
from collections.abc import Callable
from pathlib import Path
from typing import Any, Literal

import torch
from pydantic import BaseModel, ConfigDict, Field, field_validator

from arctic_vl.errors import ConfigError

PEFT_PREFIX = "base_model.model."
ADAPTER = "default"  # PEFT's adapter name; the only adapter a run trains
ADAPTER_FILE = "adapter_model.safetensors"


class LoraConfig(BaseModel):
    """`model.lora`: LoRA (PEFT) on the linear layers of `parts`; other parts train fully unless frozen."""

    model_config = ConfigDict(extra="forbid")

    r: int = Field(8, ge=1, description="LoRA rank")
    alpha: float = Field(16.0, gt=0, description="LoRA alpha; the update is scaled by alpha / r")
    dropout: float = Field(0.0, ge=0, lt=1, description="dropout on the LoRA input")
    target: str = Field("all-linear", description="all-linear, or a regex (re.search) on full module names")
    parts: list[Literal["vision", "aligner", "llm"]] = Field(
        default_factory=lambda: ["llm"], min_length=1, description="parts whose linear layers get LoRA"
    )
    modules_to_save: list[str] = Field(
        default_factory=list,
        description="extra module names (or name suffixes) trained fully and saved with the adapter",
    )

    @field_validator("target")
    @classmethod
    def _valid_target(cls, v: str) -> str:
        if v != "all-linear":
            try:
                re.compile(v)
            except re.error as e:
                raise ValueError(f"target must be 'all-linear' or a valid regex: {e}") from None
        return v

    @property
    def scaling(self) -> float:
        """PEFT's LoRA scaling, `alpha / r` (what a merge multiplies B @ A by)."""
        return self.alpha / self.r


# --------------------------------------------------------------------------------------------- applying
def lora_targets(model: torch.nn.Module, lora: LoraConfig, part_of: Callable[[str], str | None]) -> list[str]:
    """Full names of the nn.Linear modules that get LoRA: in `lora.parts`, matching `lora.target`.

    The output layer is never a target: the memory-lean loss multiplies hidden states by the head's
    weight directly, so a LoRA update on it would be silently ignored in training.
    """
    head = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    parts = set(lora.parts)
    regex = None if lora.target == "all-linear" else re.compile(lora.target)
    targets, head_hit = [], False
    for name, module in model.named_modules():
        if not isinstance(module, torch.nn.Linear) or part_of(name + ".weight") not in parts:
            continue
        if regex is not None and not regex.search(name):
            continue
        if module is head:
            head_hit = regex is not None
            continue
        targets.append(name)
    if head_hit:
        raise ConfigError(
            "model.lora.target matches the output layer (lm_head): LoRA on it is not supported because the "
            "memory-lean loss uses the head's weight directly; train it fully (model.lora.modules_to_save: "
            "[lm_head]) or narrow the regex"
        )
    if not targets:
        raise ConfigError(
            f"model.lora: target {lora.target!r} matches no linear layer in parts {lora.parts}; "
            "use 'all-linear' or a regex on module names such as 'q_proj|v_proj'"
        )
    return targets


def check_lora_rank(model: torch.nn.Module, lora: LoraConfig, targets: list[str]) -> None:
    """Refuse a rank above the smallest dimension of a target layer (ConfigError naming it and its size): such a
    rank adds no expressiveness (an update to an in x out matrix has rank at most min(in, out)) and only allocates
    r x (in + out) values per layer, gigabytes for a rank in the thousands."""
    modules = dict(model.named_modules())
    name, smallest = min(((t, min(modules[t].in_features, modules[t].out_features)) for t in targets),
                         key=lambda x: x[1])
    if lora.r > smallest:
        layer = modules[name]
        raise ConfigError(f"model.lora.r: rank {lora.r} exceeds the smallest dimension of the target layer {name} "
                          f"({layer.in_features} -> {layer.out_features}, so at most rank {smallest}); lower r to "
                          f"{smallest} or less, or narrow model.lora.target / parts")


def whole_part_modules(model: torch.nn.Module, parts: set[str],
                       part_of: Callable[[str], str | None]) -> tuple[list[str], list[str]]:
    """(modules, loose parameters) that cover exactly the parameters of `parts`.

    Modules are the largest ones whose parameters all belong to `parts`; loose parameters belong to
    `parts` but sit directly on a module that also holds other parts (they cannot be wrapped).
    """
    modules: list[str] = []
    loose: list[str] = []

    def visit(prefix: str, module: torch.nn.Module) -> None:
        names = [prefix + n for n, _ in module.named_parameters()]
        # PEFT cannot wrap a bare container (Qwen3-VL's deepstack_merger_list): its children are saved instead
        container = isinstance(module, torch.nn.ModuleList | torch.nn.ModuleDict)
        if names and prefix and not container and all(part_of(n) in parts for n in names):
            modules.append(prefix[:-1])
            return
        for pname, _ in module.named_parameters(recurse=False):
            if part_of(prefix + pname) in parts:
                loose.append(prefix + pname)
        for cname, child in module.named_children():
            visit(f"{prefix}{cname}.", child)

    visit("", model)
    return modules, loose


def apply_lora(model: torch.nn.Module, lora: LoraConfig, frozen: set[str],
               part_of: Callable[[str], str | None]) -> torch.nn.Module:
    """Wrap `model` in a PeftModel: LoRA on `lora.parts`, full training of parts neither frozen nor LoRA'd.

    `part_of` maps plain (unwrapped) parameter names to parts. Returns the PeftModel; its
    `arctic_vl_loose` attribute lists the PEFT names of the loose parameters kept trainable by hand.
    """
    from peft import LoraConfig as PeftLoraConfig
    from peft import get_peft_model

    targets = lora_targets(model, lora, part_of)
    check_lora_rank(model, lora, targets)
    full_parts = {p for p in ("vision", "aligner", "llm") if p not in frozen and p not in lora.parts}
    save_modules, loose = whole_part_modules(model, full_parts, part_of) if full_parts else ([], [])
    save_modules += [m for m in lora.modules_to_save if m not in save_modules]
    peft_config = PeftLoraConfig(
        r=lora.r, lora_alpha=lora.alpha, lora_dropout=lora.dropout, target_modules=targets,
        modules_to_save=save_modules or None, bias="none",
    )
    try:
        peft_model = get_peft_model(model, peft_config)
    except ValueError as e:  # e.g. a modules_to_save entry that names no module
        raise ConfigError(f"model.lora: PEFT refused the configuration: {e}") from None
    wrapped = {n for n, _ in peft_model.named_modules()}
    missing = [m for m in lora.modules_to_save
               if not any(n == PEFT_PREFIX + m or n.endswith("." + m) for n in wrapped)]
    if missing:
        raise ConfigError(f"model.lora.modules_to_save: no module named {missing[0]!r}")
    params = dict(peft_model.named_parameters())
    peft_loose = [PEFT_PREFIX + n for n in loose]
    for name in peft_loose:
        params[name].requires_grad_(True)
    peft_model.arctic_vl_loose = peft_loose  # type: ignore[attr-defined]
    return peft_model


def is_peft_copy(name: str) -> bool:
    """True for PEFT's frozen `original_module` copy of a modules_to_save module: the trainable copy beside it
    (`modules_to_save.default`) is the module that trains and is exported, so a parameter count counts that one
    and skips this (a LoRA model's count is the base model's plus the LoRA adapters)."""
    return ".original_module." in name


def is_peft(model: torch.nn.Module) -> bool:
    """True for a PEFT model (it has `get_base_model` and `peft_config`)."""
    return callable(getattr(model, "get_base_model", None)) and hasattr(model, "peft_config")


# ---------------------------------------------------------------------------------------------- merging
def merge_lora_state_dict(state_dict: dict[str, torch.Tensor], scaling: float) -> dict[str, torch.Tensor]:
    """A PEFT LoRA model's state dict -> the plain model's, with every LoRA update merged in.

    `x.base_layer.weight` becomes `x.weight` + scaling * B @ A (computed in fp32, stored in the base
    dtype); `x.modules_to_save.default.*` replace `x.original_module.*`; adapter tensors are dropped.
    Works on the live model's state dict and on a gathered (ZeRO-3) or checkpoint one alike.
    """
    sd = {k[len(PEFT_PREFIX):] if k.startswith(PEFT_PREFIX) else k: v for k, v in state_dict.items()}
    out: dict[str, torch.Tensor] = {}
    for key, value in sd.items():
        if ".lora_" in key or ".original_module." in key:
            continue
        if ".modules_to_save." in key:
            head, rest = key.split(".modules_to_save.", 1)
            adapter, rest = rest.split(".", 1)
            if adapter == ADAPTER:
                out[f"{head}.{rest}"] = value
            continue
        if ".base_layer." in key:
            layer, rest = key.split(".base_layer.", 1)
            if rest == "weight":
                a, b = sd.get(f"{layer}.lora_A.{ADAPTER}.weight"), sd.get(f"{layer}.lora_B.{ADAPTER}.weight")
                if a is None or b is None:
                    raise KeyError(f"{layer}: LoRA layer without lora_A/lora_B weights in the state dict")
                delta = (b.float() @ a.float()) * scaling
                value = (value.float() + delta.to(value.device)).to(value.dtype)
            out[f"{layer}.{rest}"] = value
            continue
        out[key] = value
    return out


def peft_scaling(peft_model: torch.nn.Module) -> float:
    """alpha / r of the run's adapter (rank/alpha patterns and rsLoRA are not used by arctic_vl)."""
    cfg = peft_model.peft_config[ADAPTER]
    if getattr(cfg, "use_rslora", False) or getattr(cfg, "rank_pattern", None) or getattr(cfg, "alpha_pattern", None):
        raise ValueError("merging supports plain LoRA scaling (alpha / r) only")
    return cfg.lora_alpha / cfg.r


def save_lora_export(peft_model: torch.nn.Module, out_dir: Path, processor: Any = None,
                     state_dict: dict[str, torch.Tensor] | None = None, dtype: torch.dtype | None = None) -> Path:
    """Write `out_dir` = the merged full model (plain transformers loads it) + `out_dir/adapter` (PEFT).

    `state_dict`: the PEFT model's full state dict (names as `peft_model.state_dict()`), e.g. gathered
    from ZeRO-3 shards or loaded from a checkpoint; default: the live model's. Nothing is modified.
    `dtype`: the merged model's weights are cast to it after merging in the training dtype (the adapter
    keeps the dtype it trained in).
    """
    from safetensors.torch import load_file, save_file

    from arctic_vl.models.export_dtype import cast_state_dict, stamp_config_dtype

    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    sd = state_dict if state_dict is not None else peft_model.state_dict()
    merged = merge_lora_state_dict(sd, peft_scaling(peft_model))
    base = peft_model.get_base_model()
    expected = set(_plain_state_dict_keys(peft_model))
    if set(merged) != expected:
        extra, lacking = sorted(set(merged) - expected), sorted(expected - set(merged))
        raise RuntimeError(f"merged LoRA state dict does not match the model: extra {extra[:3]}, missing {lacking[:3]}")
    if dtype is not None:
        merged = cast_state_dict(merged, dtype)
    base.save_pretrained(out_dir, safe_serialization=True, state_dict=merged)
    if dtype is not None:
        stamp_config_dtype(out_dir, str(dtype).removeprefix("torch."))
    if processor is not None:
        processor.save_pretrained(out_dir)
    adapter_dir = out_dir / "adapter"
    peft_model.save_pretrained(adapter_dir, state_dict=dict(sd), safe_serialization=True)
    loose = getattr(peft_model, "arctic_vl_loose", [])
    if loose:
        # PEFT's save keeps adapter and modules_to_save tensors only; add the loose trained parameters
        # under their PEFT names (PEFT's loader restores such keys non-strictly, as it does biases).
        tensors = load_file(str(adapter_dir / ADAPTER_FILE))
        for name in loose:
            tensors[name] = sd[name].detach().contiguous().cpu()
        save_file(tensors, str(adapter_dir / ADAPTER_FILE), metadata={"format": "pt"})
        (adapter_dir / "arctic_vl_loose_params.json").write_text(json.dumps(loose, indent=1))
    return out_dir


def _plain_state_dict_keys(peft_model: torch.nn.Module) -> list[str]:
    """The state-dict keys the base model has without PEFT (what the merged dict must hold)."""
    keys = []
    for key in peft_model.state_dict():
        k = key[len(PEFT_PREFIX):] if key.startswith(PEFT_PREFIX) else key
        if ".lora_" in k or ".modules_to_save." in k:
            continue
        keys.append(k.replace(".base_layer.", ".").replace(".original_module.", "."))
    return keys
