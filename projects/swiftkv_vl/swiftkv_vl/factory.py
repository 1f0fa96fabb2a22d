"""`swiftkv_vl` model factory: a LLaVA teacher turned into a SwiftKV student, ready to distil.

The YAML section::

    model:
      type: swiftkv_vl
      teacher: ../runs/teacher/final      # a local LLaVA-NeXT (Llama) or LLaVA-OneVision (Qwen2) directory
      # or, instead of `teacher`, a tiny random teacher written to OUTPUT_DIR/teacher and loaded from there:
      # teacher_tiny: {family: llava_next, layers: 4, hidden: 64, heads: 2, kv_heads: 1}
      num_key_value_layers: 2             # M
      key_value_group_size: 1             # G

Validation is pure: it reads the teacher's config.json (or the `teacher_tiny` shape) and nothing else, so
`arctic_vl validate` rejects an impossible (M, G) layout or an unsupported teacher with exit code 2, naming
the file, line and field. `build` loads the teacher with `from_pretrained`, converts it to SwiftKV,
initialises the SwiftKV parameters from the teacher and freezes everything else.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Literal

import torch
from pydantic import BaseModel, ConfigDict, Field, PrivateAttr, model_validator

from arctic_vl import MODELS, ComponentConfig, ExistingPath, JsonTextError, ModelBundle, ModelFactory, Seed, parse_json

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}

#: teacher composite model_type -> the language-model types SwiftKV supports inside it
SUPPORTED_TEACHERS: dict[str, tuple[str, ...]] = {
    "llava_next": ("llama", "llama_swiftkv"),
    "llava_onevision": ("qwen2", "qwen2_swiftkv"),
}


class TeacherTinyConfig(BaseModel):
    """Shape of a tiny random teacher (see `arctic_vl make-tiny-model`); written once under OUTPUT_DIR/teacher."""

    model_config = ConfigDict(extra="forbid")

    family: Literal["llava_next", "llava_onevision"] = "llava_next"
    layers: int = Field(4, ge=2, description="language-model layers (L)")
    hidden: int = Field(64, ge=8)
    heads: int = Field(2, ge=1)
    kv_heads: int = Field(1, ge=1)
    intermediate: int | None = Field(None, ge=8, description="default: 2 x hidden")
    vision_layers: int = Field(2, ge=1)
    vision_hidden: int = Field(64, ge=16)
    image_size: int | None = Field(None, ge=16)
    patch_size: int | None = Field(None, ge=2)
    vocab_size: int | None = Field(None, ge=1, le=262144, description="default: the tiny tokenizer's size rounded "
                                   "up to 64 (150016 for a real-size output layer, as Qwen's)")
    seed: Seed | None = Field(None, description="seed of the random weights (default: trainer.seed)")

    @model_validator(mode="after")
    def _heads(self) -> TeacherTinyConfig:
        if self.hidden % self.heads:
            raise ValueError(f"hidden ({self.hidden}) must be a multiple of heads ({self.heads})")
        if self.heads % self.kv_heads:
            raise ValueError(f"heads ({self.heads}) must be a multiple of kv_heads ({self.kv_heads})")
        return self


class SwiftKVModelConfig(ComponentConfig):
    """Mirrors `arctic_vl.models.hf.HFModelConfig` (dtype, attention, checkpointing) with a teacher instead of
    `name_or_path`, plus the SwiftKV layout. `freeze` is not offered: only the SwiftKV parameters ever train."""

    type: str = "swiftkv_vl"
    teacher: ExistingPath | None = Field(
        None, description="local LLaVA-NeXT (Llama) or LLaVA-OneVision (Qwen2) directory; relative to the config file"
    )
    teacher_tiny: TeacherTinyConfig | None = Field(
        None, description="instead of teacher: build a tiny random teacher under OUTPUT_DIR/teacher"
    )
    num_key_value_layers: int = Field(..., ge=1, description="M: leading layers that keep their own K/V")
    key_value_group_size: int = Field(1, ge=1, description="G: consecutive layers >= M sharing one SwiftKV K/V")
    dtype: Literal["float32", "bfloat16", "float16"] = "float32"
    attn_implementation: Literal["sdpa", "eager", "flash_attention_2"] | None = Field(
        None, description="default: flash_attention_2 when it imports, else sdpa"
    )
    gradient_checkpointing: bool = False

    # (composite model_type, language-model model_type, L) of the teacher, read during validation
    _layout: tuple[str, str, int] | None = PrivateAttr(None)

    @model_validator(mode="after")
    def _check(self) -> SwiftKVModelConfig:
        if (self.teacher is None) == (self.teacher_tiny is None):
            raise ValueError("give teacher (a local model directory) or teacher_tiny (a tiny random teacher), "
                             "exactly one of them")
        if self.teacher is not None:
            composite, text_type, layers = read_teacher_layout(self.teacher)
        else:
            tiny = self.teacher_tiny
            composite = tiny.family
            text_type = SUPPORTED_TEACHERS[composite][0]
            layers = tiny.layers
        m, g = self.num_key_value_layers, self.key_value_group_size
        if m >= layers:
            raise ValueError(f"num_key_value_layers ({m}) must be below the teacher's {layers} language-model "
                             f"layers: allowed 1..{layers - 1}")
        if (layers - m) % g:
            allowed = [d for d in range(1, layers - m + 1) if (layers - m) % d == 0]
            raise ValueError(f"key_value_group_size ({g}) must divide the {layers - m} SwiftKV layers "
                             f"(teacher layers {layers} - num_key_value_layers {m}); allowed: "
                             f"{', '.join(map(str, allowed))}")
        self._layout = (composite, text_type, layers)
        return self

    @property
    def layout(self) -> tuple[str, str, int]:
        """(teacher composite model_type, language-model model_type, number of layers L)."""
        assert self._layout is not None  # set by validation
        return self._layout


def read_teacher_layout(path: str | Path) -> tuple[str, str, int]:
    """(composite model_type, language-model model_type, L) from a teacher directory's config.json.

    Raises ValueError (a validation error of the `teacher` field) for a missing directory or an unsupported teacher.
    """
    cfg_file = Path(path) / "config.json"
    if not cfg_file.is_file():
        what = "does not exist" if not Path(path).exists() else "has no config.json"
        raise ValueError(f"teacher directory {path} {what} (train or build the teacher first; see "
                         "projects/swiftkv_vl/README.md)")
    try:
        cfg = parse_json(cfg_file.read_bytes())
    except (OSError, JsonTextError) as e:
        raise ValueError(f"teacher {cfg_file} is not a readable HF config: {e}") from None
    composite = cfg.get("model_type")
    if composite not in SUPPORTED_TEACHERS:
        raise ValueError(f"teacher model_type {composite!r} ({cfg_file}) is not supported; allowed: "
                         f"{', '.join(SUPPORTED_TEACHERS)} (LLaVA-NeXT with Llama, LLaVA-OneVision with Qwen2)")
    text = cfg.get("text_config") or {}
    text_type = text.get("model_type")
    if text_type not in SUPPORTED_TEACHERS[composite]:
        raise ValueError(f"teacher language model {text_type!r} inside {composite} ({cfg_file}) is not supported; "
                         f"allowed: {', '.join(SUPPORTED_TEACHERS[composite])}")
    layers = text.get("num_hidden_layers")
    if not isinstance(layers, int) or layers < 2:
        raise ValueError(f"teacher {cfg_file}: text_config.num_hidden_layers must be an int >= 2, got {layers!r}")
    return composite, text_type, layers


@MODELS.register("swiftkv_vl")
class SwiftKVModelFactory(ModelFactory):
    """Teacher (from_pretrained, never trust_remote_code) -> SwiftKV student with only the SwiftKV parameters
    trainable. The export is the SwiftKV composite with SwiftKV on; it reloads after `import swiftkv_vl`."""

    config_class = SwiftKVModelConfig
    config: SwiftKVModelConfig

    def teacher_dir(self, output_dir: Path | None = None) -> Path:
        """Where the teacher is loaded from (a `teacher_tiny` teacher lives in OUTPUT_DIR/teacher)."""
        if self.config.teacher is not None:
            return Path(self.config.teacher)
        if output_dir is None:
            raise ValueError("a teacher_tiny teacher needs the run's output directory")
        return Path(output_dir) / "teacher"

    def source_dirs(self, output_dir: Path) -> dict[str, Path]:
        """The teacher's directory (`model.teacher`, or OUTPUT_DIR/teacher), fingerprinted with each checkpoint."""
        return {"model.teacher" if self.config.teacher is not None else "model.teacher_tiny (OUTPUT_DIR/teacher)":
                self.teacher_dir(output_dir)}

    def describe(self) -> str:
        """The teacher (composite and text model type, layers, source) and the SwiftKV settings M and G."""
        composite, text_type, layers = self.config.layout
        source = self.config.teacher if self.config.teacher is not None else "teacher_tiny (OUTPUT_DIR/teacher)"
        return (f"swiftkv_vl: teacher {composite} ({text_type}, {layers} layers) from {source}; "
                f"num_key_value_layers (M)={self.config.num_key_value_layers}, "
                f"key_value_group_size (G)={self.config.key_value_group_size}")

    def prepare(self, output_dir: Path, seed: int) -> None:
        """On the main process before any rank builds: write the tiny teacher if the config asks for one."""
        tiny = self.config.teacher_tiny
        target = self.teacher_dir(output_dir)
        if tiny is None or (target / "config.json").is_file():
            return
        from arctic_vl import make_tiny_model

        shape: dict[str, Any] = {
            "text_layers": tiny.layers, "hidden": tiny.hidden, "heads": tiny.heads, "kv_heads": tiny.kv_heads,
            "intermediate": tiny.intermediate or 2 * tiny.hidden, "vision_layers": tiny.vision_layers,
            "vision_hidden": tiny.vision_hidden, "image_size": tiny.image_size, "patch_size": tiny.patch_size,
            "vocab_size": tiny.vocab_size,
        }
        make_tiny_model(tiny.family, target, seed=tiny.seed if tiny.seed is not None else seed, **shape)

    def load_processor(self, output_dir: Path) -> tuple[Any, Any]:
        """(processor, family) of the teacher, without its weights."""
        from arctic_vl import family_of_dir, load_processor

        teacher = self.teacher_dir(output_dir)
        return load_processor(teacher), family_of_dir(teacher)

    def build(self, device: torch.device | None = None, output_dir: Path | None = None,
              path: Path | None = None) -> ModelBundle:
        """The SwiftKV student (SwiftKV on, all but the SwiftKV parameters frozen).

        `path` (the engine passes a run's `final/` to evaluate it) is an already converted and trained SwiftKV
        composite: it is loaded as is. Otherwise the teacher is loaded, converted and initialised (DESIGN.md).
        """
        from arctic_vl import family_of_dir, load_model, load_processor

        from . import convert_to_swiftkv, freeze_all_but_swiftkv, register_auto, set_swiftkv

        register_auto()
        source = Path(path) if path is not None else self.teacher_dir(output_dir)
        loaded = load_model(source, dtype=DTYPES[self.config.dtype],
                            attn_implementation=self.config.attn_implementation)
        if path is not None:
            model = loaded
        else:
            # convert_to_swiftkv copies the teacher weights into the SwiftKV model and runs init_swiftkv_from_teacher
            model = convert_to_swiftkv(loaded, self.config.num_key_value_layers, self.config.key_value_group_size)
            del loaded
        set_swiftkv(model, True)
        freeze_all_but_swiftkv(model)
        if self.config.gradient_checkpointing:
            model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
            model.config.use_cache = False
        if device is not None:
            model.to(device)
        return ModelBundle(model, load_processor(source), family_of_dir(source))

    def export(self, bundle: ModelBundle, model: torch.nn.Module, out_dir: Path,
               state_dict: dict[str, torch.Tensor] | None = None) -> Path:
        """save_pretrained (safetensors) of the SwiftKV composite, SwiftKV on, plus the teacher's processor."""
        from . import set_swiftkv

        set_swiftkv(model, True)  # the saved text_config says swiftkv: true, so a reload runs the student
        out_dir.mkdir(parents=True, exist_ok=True)
        model.save_pretrained(out_dir, safe_serialization=True, state_dict=state_dict)
        if bundle.processor is not None:
            bundle.processor.save_pretrained(out_dir)
        return out_dir
