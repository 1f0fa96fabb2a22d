"""`alternating_attn`: the model factory that builds a LLaVA-OneVision composite of one attention variant.

YAML (`model:` section)::

    model:
      type: alternating_attn
      name_or_path: /ckpt/llava-onevision-tiny     # or `family: llava_onevision` + `tiny: {...}`
      variant: alternating                          # auto | alternating | alternating_cross | base
      force: false                                  # build `variant` even if the checkpoint is another one
      init_from_backbone: /ckpt/qwen2-tiny          # optional: a Qwen2 causal LM or LLaVA-OneVision directory
      skip_parts: [aligner, vision]                 # parts never copied from the backbone

Validation reads `config.json` files only: the checkpoint's `model_type` is checked against `variant` with
`check_variant` there, so a mismatch fails `arctic_vl validate` (exit 2, with file and line) before any weights are
read. `describe()` (what `validate` prints as `# model:`) shows the resolved model type: the "dry run" of the
origin repo. Every other key is that of the core's `hf_vlm` factory (dtype, attention, freezing, ...).
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

from loguru import logger
from pydantic import Field, model_validator

from arctic_vl import (
    DTYPES,
    MODELS,
    ConfigError,
    ExistingPath,
    HFModelConfig,
    HFModelFactory,
    JsonTextError,
    ModelBundle,
    family_of_dir,
    load_model,
    load_processor,
    parse_json,
)

from .variants import VARIANT_MODEL_TYPES, check_variant

if TYPE_CHECKING:
    import torch

    from .backbone import WeightReport

__all__ = ["BACKBONE_MODEL_TYPES", "AlternatingModelConfig", "AlternatingModelFactory"]

#: model types `init_from_backbone` accepts: a Qwen2 language model or any LLaVA-OneVision composite.
BACKBONE_MODEL_TYPES: tuple[str, ...] = ("qwen2", "qwen2_alternating", *VARIANT_MODEL_TYPES.values())
#: the only family the composites belong to (they are LLaVA-OneVision models with another language model)
FAMILY = "llava_onevision"


def _model_type_of(path: str, field: str) -> str:
    """`model_type` of a local checkpoint for a validator: a ValueError naming `field` (so the config error points
    at its line) when the directory or its config.json is missing or broken."""
    config_file = Path(path) / "config.json"
    if not config_file.is_file():
        what = "does not exist" if not Path(path).exists() else "has no config.json"
        raise ValueError(f"{field}: {path} {what}; the alternating_attn factory reads local checkpoints only")
    try:
        model_type = parse_json(config_file.read_bytes()).get("model_type")
    except (OSError, JsonTextError, AttributeError) as e:
        raise ValueError(f"{field}: {config_file} is not a valid HF config ({e})") from None
    if not isinstance(model_type, str) or not model_type:
        raise ValueError(f"{field}: {config_file} has no model_type")
    return model_type


class AlternatingModelConfig(HFModelConfig):
    """The `hf_vlm` keys plus the variant, its check against the checkpoint, and backbone initialisation."""

    type: str = "alternating_attn"
    variant: Literal["auto", "alternating", "alternating_cross", "base"] = Field(
        "auto", description="attention variant; `auto` follows the checkpoint's model_type"
    )
    force: bool = Field(False, description="build `variant` even when the checkpoint is another variant")
    init_from_backbone: ExistingPath | None = Field(
        None, description="a Qwen2 causal LM or LLaVA-OneVision directory: copy params whose name and shape match"
    )
    skip_parts: list[Literal["vision", "aligner", "llm"]] = Field(
        default_factory=lambda: ["aligner", "vision"],
        description="parts never copied from the backbone (the image newline goes with the aligner)",
    )

    @model_validator(mode="after")
    def _check_variant(self) -> AlternatingModelConfig:
        # Runs after HFModelConfig._source: exactly one of name_or_path / family is set.
        if self.family is not None and self.family != FAMILY:
            raise ValueError(f"family {self.family!r}: the alternating composites are LLaVA-OneVision models; "
                             f"allowed: {FAMILY}")
        if self.name_or_path is not None:
            model_type = _model_type_of(self.name_or_path, "name_or_path")
            check_variant(self.variant, model_type, self.force)  # ValueError -> a config error at `variant`
        if self.attn_implementation == "flash_attention_2" and self.resolved_variant() != "base":
            raise ValueError("attn_implementation 'flash_attention_2' cannot express the alternating mask; "
                             "allowed for this variant: sdpa, eager")
        if self.init_from_backbone is not None:
            backbone_type = _model_type_of(self.init_from_backbone, "init_from_backbone")
            if backbone_type not in BACKBONE_MODEL_TYPES:
                raise ValueError(f"init_from_backbone: {self.init_from_backbone} has model_type {backbone_type!r}; "
                                 f"allowed: {', '.join(BACKBONE_MODEL_TYPES)}")
        return self

    def checkpoint_model_type(self) -> str | None:
        """`model_type` of `name_or_path` (None for an inline tiny model, which is a plain LLaVA-OneVision)."""
        return None if self.name_or_path is None else _model_type_of(self.name_or_path, "name_or_path")

    def resolved_variant(self) -> str:
        """The variant this config builds (never `auto`). An inline tiny model is a plain LLaVA-OneVision, so `auto`
        means `base` there and every explicit variant is built from it."""
        model_type = self.checkpoint_model_type()
        if model_type is None:
            return "base" if self.variant == "auto" else self.variant
        return check_variant(self.variant, model_type, self.force)


@MODELS.register("alternating_attn")
class AlternatingModelFactory(HFModelFactory):
    """Loads (or converts) a LLaVA-OneVision checkpoint into the composite of the configured variant.

    * checkpoint of the requested type: loaded as is (`from_pretrained`);
    * another variant (plain OneVision, or another composite with `force: true`): its config is converted with
      `build_composite_config` and its weights load into the requested class (the parameter names are shared);
    * `init_from_backbone`: afterwards, every backbone tensor whose mapped name and shape match is copied, except
      the `skip_parts`; the WeightReport is logged and kept in `bundle.extras["weight_report"]`.

    An inline tiny model (`family: llava_onevision`) is written as a plain OneVision under OUTPUT_DIR/base_model on
    first run (as `hf_vlm` does) and converted the same way.
    """

    config_class = AlternatingModelConfig
    config: AlternatingModelConfig
    #: the backbone copy's report of the last `load`, handed to the bundle by `build`
    _report: WeightReport | None = None

    # ------------------------------------------------------------------------------------------ pure
    def describe(self) -> str:
        """Resolved model type, where it comes from and what is converted or copied (config files only)."""
        c = self.config
        variant = c.resolved_variant()
        target = VARIANT_MODEL_TYPES[variant]
        source_type = c.checkpoint_model_type()
        if source_type is None:
            shape = ", ".join(f"{k}={v}" for k, v in c.tiny.given().items()) or "default shape"
            text = f"{target} (variant {variant}) from a tiny {FAMILY} ({shape}) written to OUTPUT_DIR/base_model"
        else:
            text = f"{target} (variant {variant}) from {c.name_or_path}"
            if source_type != target:  # validation passed, so the config says force: true
                text += f", converted from {source_type} (force: true)"
        if c.init_from_backbone is not None:
            backbone_type = _model_type_of(c.init_from_backbone, "init_from_backbone")
            skipped = ", ".join(c.skip_parts) or "nothing"
            text += f"; init_from_backbone {c.init_from_backbone} ({backbone_type}), skipping {skipped}"
        return text

    # ------------------------------------------------------------------------------------- building
    def build_model(self, source: Path) -> tuple[torch.nn.Module, WeightReport | None]:
        """The composite of the resolved variant from `source`, then the backbone copy (if configured)."""
        from transformers import AutoConfig

        from .backbone import init_from_backbone
        from .modeling_alternating import composite_model_class, register_auto
        from .variants import build_composite_config, read_model_type

        register_auto()
        c = self.config
        variant = c.resolved_variant()
        dtype = DTYPES[c.dtype]
        source_type = read_model_type(source)
        if source_type == VARIANT_MODEL_TYPES[variant]:
            model = load_model(source, dtype=dtype, attn_implementation=c.attn_implementation)
        else:
            # Same parameter names in every variant: only the config (class, text config) changes.
            config = build_composite_config(variant, AutoConfig.from_pretrained(source, trust_remote_code=False))
            model = composite_model_class(variant).from_pretrained(
                source, config=config, dtype=dtype, attn_implementation=c.attn_implementation or "sdpa",
                trust_remote_code=False,
            )
            logger.info(f"built {VARIANT_MODEL_TYPES[variant]} from the {source_type} checkpoint {source}")
        report = None
        if c.init_from_backbone is not None:
            report = init_from_backbone(model, c.init_from_backbone, skip_parts=c.skip_parts)
            logger.info(f"init_from_backbone {c.init_from_backbone}:\n{report.format()}")
        return model, report

    def load(self, path: Path, *, exported: bool = False) -> tuple[torch.nn.Module, Any, Any]:
        """(model, processor, family) for the core's `build`, which then freezes, applies LoRA and moves the model.

        A run's own export (`exported`: `final/`, what `evaluate` passes to `build`) is loaded as saved: no
        conversion and no backbone copy, since it already holds the trained weights of the variant. Otherwise
        the WeightReport of the backbone copy, if any, is kept in `bundle.extras["weight_report"]` by `build`.
        """
        from .modeling_alternating import register_auto

        register_auto()
        if exported:
            model = load_model(path, dtype=DTYPES[self.config.dtype],
                               attn_implementation=self.config.attn_implementation)
            self._report = None
        else:
            model, self._report = self.build_model(path)
        return model, load_processor(path), family_of_dir(path)

    def build(self, device: torch.device | None = None, output_dir: Path | None = None,
              path: Path | None = None) -> ModelBundle:
        """The core's build (freeze, gradient checkpointing, LoRA, device) around `load`."""
        self._report = None
        bundle = super().build(device=device, output_dir=output_dir, path=path)
        if self._report is not None:
            bundle.extras["weight_report"] = self._report
        return bundle


def inspect_weights(config: str, overrides: list[str], first: int = 20) -> str:
    """What `arctic_vl inspect-weights` prints: the model description and the WeightReport of the backbone copy."""
    import torch

    from arctic_vl import Engine, where

    engine = Engine(config, overrides)
    factory = engine.model_factory()
    if not isinstance(factory, AlternatingModelFactory):
        raise ConfigError(f"{where(engine.config, ('model', 'type'))}: model.type: inspect-weights works with "
                          f"model type 'alternating_attn', got {engine.config.model.type!r}")
    if factory.config.init_from_backbone is None:
        raise ConfigError(f"{where(engine.config, ('model',))}: model.init_from_backbone: not set, so no weights "
                          "are copied; name a Qwen2 causal LM or LLaVA-OneVision directory there")
    seed = engine.config.trainer.seed
    factory.prepare(engine.output_dir, seed)
    torch.manual_seed(seed)  # the same random init of skipped parts as a training run's first build
    _, report = factory.build_model(factory.model_dir(engine.output_dir))
    assert report is not None  # init_from_backbone is set
    return f"# model: {factory.describe()}\n{report.format(first=first)}"
