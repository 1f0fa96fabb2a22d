"""`hf_vlm`: a Hugging Face VLM of one of the six families, from a local directory or an inline tiny config."""

from __future__ import annotations

from pathlib import Path
from typing import Any, Literal

import torch
from pydantic import Field, field_serializer, model_validator

from arctic_vl.config.jsontext import JsonTextError, parse_json
from arctic_vl.config.paths import ModelPath
from arctic_vl.config.types import Seed
from arctic_vl.errors import ConfigError
from arctic_vl.models.base import ModelBundle, ModelFactory
from arctic_vl.models.export_dtype import cast_state_dict, stamp_config_dtype, stored_dtype
from arctic_vl.models.lora import LoraConfig, apply_lora, is_peft, save_lora_export
from arctic_vl.models.tiny import TinyModelConfig, check_tiny_shape
from arctic_vl.registry import MODELS, ComponentConfig

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


class HFModelConfig(ComponentConfig):
    """The `model:` section of `hf_vlm`: a local HF directory (or an inline tiny model), dtype, freezing, LoRA."""

    type: str = "hf_vlm"
    name_or_path: ModelPath | None = Field(
        None, description="a local HF model directory (config.json, safetensors, processor)"
    )
    family: str | None = Field(None, description="with no name_or_path: build a tiny random model of this family")
    tiny: TinyModelConfig = Field(default_factory=TinyModelConfig,
                                  description="shape of the tiny model (layers, hidden, heads, ...); with family")
    dtype: Literal["float32", "bfloat16", "float16"] = Field(
        "float32", description="dtype the weights train in (float32: fp32 master weights, with trainer.bf16 autocast)"
    )
    export_dtype: Literal["auto", "float32", "bfloat16", "float16"] = Field(
        "auto", description="dtype of the exported weights (final/, `arctic_vl export`); auto: the dtype the source "
        "checkpoint's weights are stored in (its safetensors headers, all shards; the majority of parameters when "
        "mixed), else model.dtype"
    )
    attn_implementation: Literal["sdpa", "eager", "flash_attention_2"] | None = Field(
        None, description="default: flash_attention_2 when it imports, else sdpa"
    )
    gradient_checkpointing: bool = False
    freeze: list[Literal["vision", "aligner", "llm"]] = Field(
        default_factory=list, description="parts whose weights do not train (no grad, not in checkpoints)"
    )
    lora: LoraConfig | None = Field(
        None, description="LoRA (PEFT) on some parts; parts neither frozen nor LoRA'd train fully (modules_to_save)"
    )
    seed: Seed | None = Field(None, description="seed for the tiny model's random weights (default: trainer seed)")

    @field_serializer("tiny")
    def _tiny_as_given(self, tiny: TinyModelConfig) -> dict[str, int]:
        # the keys the config set, as before this was a model: saved runs compare equal on resume
        return tiny.given()

    @model_validator(mode="after")
    def _source(self) -> HFModelConfig:
        if self.name_or_path is None and self.family is None:
            raise ValueError("give name_or_path (a local HF directory) or family (to build a tiny model)")
        if self.name_or_path is not None and self.family is not None:
            raise ValueError("give name_or_path or family, not both (a config that extends a tiny recipe and "
                             "names a checkpoint unsets the inherited keys: `family: null, tiny: null`)")
        if self.name_or_path is not None and self.tiny.given():
            raise ValueError("tiny: only applies with family (an inline tiny model); with name_or_path, unset an "
                             "inherited tiny shape with `tiny: null`")
        if self.family is not None:
            from arctic_vl.models.families import FAMILIES

            if self.family not in FAMILIES:
                raise ValueError(f"unknown family {self.family!r}; allowed: {', '.join(FAMILIES)}")
            check_tiny_shape(self.family, self.tiny.given())
        if self.name_or_path is not None:
            path = Path(self.name_or_path)
            if path.is_absolute() and not (path / "config.json").is_file():
                what = "does not exist" if not path.exists() else "has no config.json"
                raise ValueError(f"model directory {self.name_or_path} {what}")
            if path.is_absolute():  # refuse a model type no family trains now, not after loading the weights
                from arctic_vl.models.families import family_for_model_type, unsupported_model_type

                model_type = _config_model_type(path / "config.json")
                if family_for_model_type(str(model_type)) is None:
                    raise ValueError(unsupported_model_type(model_type, str(path / "config.json")))
        return self


def _config_model_type(config_file: Path) -> str | None:
    try:
        return parse_json(config_file.read_bytes()).get("model_type")
    except (OSError, JsonTextError, AttributeError) as e:
        raise ValueError(f"{config_file} is not a valid HF config ({e})") from None


def read_model_type(path: str | Path) -> str:
    """`model_type` from a model directory's config.json (no weights read)."""
    cfg_file = Path(path) / "config.json"
    try:
        return parse_json(cfg_file.read_bytes())["model_type"]
    except FileNotFoundError:
        raise ConfigError(f"{cfg_file}: not found (model.name_or_path must be a local HF model directory)") from None
    except (JsonTextError, KeyError, TypeError) as e:
        raise ConfigError(f"{cfg_file}: not a valid HF config ({e})") from None


@MODELS.register("hf_vlm")
class HFModelFactory(ModelFactory):
    """Loads with the real `from_pretrained` path; never `trust_remote_code`."""

    config_class = HFModelConfig
    #: the dtype the source checkpoint's weights are stored in (what `export_dtype: auto` writes)
    source_dtype: str | None = None
    #: set by `build_for_data`: `load` builds the model on the meta device, reading no weights
    _skeleton: bool = False

    def model_dir(self, output_dir: Path | None = None) -> Path:
        """The directory the model is loaded from (an inline tiny model is written under OUTPUT_DIR/base_model)."""
        if self.config.name_or_path is not None:
            return Path(self.config.name_or_path)
        if output_dir is None:
            raise ValueError("an inline tiny model needs the run's output directory")
        return output_dir / "base_model"

    def source_dirs(self, output_dir: Path) -> dict[str, Path]:
        """`model.name_or_path` (an inline tiny model: OUTPUT_DIR/base_model), fingerprinted with each checkpoint."""
        key = "model.name_or_path" if self.config.name_or_path is not None else "model.family (OUTPUT_DIR/base_model)"
        return {key: self.model_dir(output_dir)}

    def describe(self) -> str:
        """One line naming the model: its model type and directory, or the tiny family and shape."""
        if self.config.name_or_path is not None:
            return f"{read_model_type(self.config.name_or_path)} from {self.config.name_or_path}"
        shape = self.config.tiny.given()
        return f"tiny {self.config.family} ({', '.join(f'{k}={v}' for k, v in shape.items()) or 'default shape'})"

    def prepare(self, output_dir: Path, seed: int) -> None:
        """On the main process, before any rank builds: write the inline tiny model if the config asks for one."""
        if self.config.family is None:
            return
        target = self.model_dir(output_dir)
        if (target / "config.json").is_file() and not (target / "config.json").is_symlink():
            return
        from arctic_vl.config.run_files import fresh_dir
        from arctic_vl.models.tiny import make_tiny_model

        fresh_dir(target)  # an interrupted write's leftovers (or links planted in it) go; a link at it is refused

        make_tiny_model(self.config.family, target, seed=self.config.seed if self.config.seed is not None else seed,
                        **self.config.tiny.given())

    def load(self, path: Path, *, exported: bool = False) -> tuple[torch.nn.Module, Any, Any]:
        """(model, processor, family) from a local directory; `build` then freezes, applies LoRA and moves it.

        `exported`: `path` is a finished run's own export (`final/`, what `Engine.evaluate` passes), to be
        loaded exactly as saved. Subclasses that convert a source checkpoint override this and skip the
        conversion for an export.
        """
        from arctic_vl.models.loading import family_of_dir, load_model, load_processor, model_skeleton

        load = model_skeleton if self._skeleton else load_model
        model = load(path, dtype=DTYPES[self.config.dtype], attn_implementation=self.config.attn_implementation)
        return model, load_processor(path), family_of_dir(path)

    def _read_source_dtype(self, source: Path) -> None:
        """`source_dtype` from the source checkpoint's stored weights; mixed dtypes are said once."""
        stored = stored_dtype(source)
        self.source_dtype = stored.name if stored is not None else None
        if stored is not None and stored.mixed and self.config.export_dtype == "auto":
            from loguru import logger

            logger.info(f"{source}: weights stored in mixed dtypes; model.export_dtype auto exports in the dtype of "
                        f"most parameters: {stored.describe()}")

    def export_dtype(self) -> str:
        """The dtype name `export` writes: `model.export_dtype`, or for `auto` the dtype the source checkpoint's
        weights are stored in (its safetensors headers; the majority of parameters when mixed)."""
        if self.config.export_dtype != "auto":
            return self.config.export_dtype
        return self.source_dtype or self.config.dtype

    def build_for_data(self, output_dir: Path) -> ModelBundle:
        """`build` with the model made from its config on the meta device (`load` reads no weights; a subclass
        that overrides `load` without calling this one builds in full, on the CPU)."""
        self._skeleton = True
        try:
            bundle = self.build(device=None, output_dir=output_dir)
        finally:
            self._skeleton = False
        return bundle

    def load_processor(self, output_dir: Path) -> tuple[Any, Any]:
        """(processor, family) of the configured model directory, without its weights."""
        from arctic_vl.models.loading import family_of_dir, load_processor

        model_dir = self.model_dir(output_dir)
        return load_processor(model_dir), family_of_dir(model_dir)

    def build(self, device: torch.device | None = None, output_dir: Path | None = None,
              path: Path | None = None) -> ModelBundle:
        """Load the configured model, or the one in `path` (what `Engine.evaluate` passes: the run's final/);
        freeze `model.freeze`; enable gradient checkpointing; then wrap with LoRA (`model.lora`)."""
        source = Path(path) if path is not None else self.model_dir(output_dir)
        if path is None:  # here, not in `load`: a subclass's own `load` (a conversion) exports the same way
            self._read_source_dtype(source)
        model, processor, family = self.load(source, exported=path is not None)
        bundle = ModelBundle(model, processor, family, part_names=self.parts)
        self.freeze(bundle)
        if self.config.gradient_checkpointing:
            model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
            model.config.use_cache = False
        if self.config.lora is not None:
            # after freezing: PEFT freezes all but its adapters; the parts neither frozen nor LoRA'd are
            # handed to it as modules_to_save so the adapter carries them
            model = apply_lora(model, self.config.lora, set(self.config.freeze), bundle.part_of)
            bundle.model = model
        if device is not None:
            model.to(device)
        return bundle

    def freeze(self, bundle: ModelBundle) -> None:
        """Set requires_grad False on every parameter of the parts in `model.freeze` (vision, aligner, llm)."""
        frozen = set(self.config.freeze)
        if not frozen:
            return
        for name, param in bundle.model.named_parameters():
            if bundle.part_of(name) in frozen:
                param.requires_grad_(False)

    def export(self, bundle: ModelBundle, model: torch.nn.Module, out_dir: Path,
               state_dict: dict[str, torch.Tensor] | None = None) -> Path:
        """`out_dir`: an HF directory (safetensors + processor) in `export_dtype()`. A LoRA model is written
        merged, with the PEFT adapter in `out_dir/adapter`; the live model is not changed (training may go on)."""
        dtype = DTYPES[self.export_dtype()]
        try:
            if is_peft(model):
                return save_lora_export(model, out_dir, bundle.processor, state_dict=state_dict, dtype=dtype)
            out_dir.mkdir(parents=True, exist_ok=True)
            state = state_dict if state_dict is not None else model.state_dict()
            model.save_pretrained(out_dir, safe_serialization=True, state_dict=cast_state_dict(state, dtype))
            stamp_config_dtype(out_dir, self.export_dtype())
            if bundle.processor is not None:
                bundle.processor.save_pretrained(out_dir)
        except (OSError, RuntimeError) as e:  # a full disk, a read-only target: name it (and the bytes needed)
            from arctic_vl.checkpoint.files import disk_full, write_error

            needed = sum(p.numel() * dtype.itemsize for p in model.parameters())
            if not isinstance(e, OSError) and not disk_full(e, out_dir, needed):
                raise  # not an I/O failure: the traceback is the useful part
            raise write_error(out_dir, e, needed, what="export") from None
        return out_dir
