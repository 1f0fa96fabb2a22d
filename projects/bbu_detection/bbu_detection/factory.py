"""`bbu_detection` model factory: a local Qwen-VL checkpoint (qwen2_5_vl, qwen2_vl, qwen3_vl) plus a `DetectionHead`.

The YAML section is the core's `hf_vlm` section (name_or_path or an inline tiny family, dtype, freeze, LoRA, ...)
under `type: bbu_detection`, plus the head's shape::

    model:
      type: bbu_detection
      name_or_path: /models/Qwen2.5-VL-3B-Instruct
      detection: {num_queries: 100, decoder_layers: 2, caption_layers: 4, d_model: 256, adapter_ratio: 8}

The trained module is `DetectionVLM` (`vlm`: the HF model, possibly PEFT-wrapped; `detection_head`). Its
parameters fall into five parts: the VLM's `vision`, `aligner`, `llm`, and the head's `adapter` (every
`*adapter*` parameter of the head) and `detection` (the rest of the head); optimizer parameter groups name them.

Export: `final/` is the plain HF VLM (save_pretrained; transformers loads and generates with it, LoRA merged),
and `final/detection_head/` the head (safetensors + config.json); `load_detection_model(final)` reloads the pair.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import torch
from loguru import logger
from pydantic import Field, model_validator
from torch import nn

from arctic_vl import MODELS, PARTS, HFModelConfig, HFModelFactory, ModelBundle, read_model_type

from .head import (
    DetectionHead,
    DetectionHeadConfig,
    DetectionSettings,
    load_detection_head,
    read_head_config,
    save_detection_head,
)

#: the families whose image embeddings and grids the head reads
FAMILIES = ("qwen2_5_vl", "qwen2_vl", "qwen3_vl")
#: the extra parts of this model, after the VLM's three
HEAD_PARTS = ("detection", "adapter")
HEAD_DIR = "detection_head"
HEAD_PREFIX = "detection_head."
VLM_PREFIX = "vlm."


class DetectionModelConfig(HFModelConfig):
    """The `model:` section of `bbu_detection`: an `hf_vlm` Qwen-VL model plus the detection head's shape."""

    type: str = "bbu_detection"
    detection: DetectionSettings = Field(default_factory=DetectionSettings, description="the detection head's shape")

    @model_validator(mode="after")
    def _qwen_only(self) -> DetectionModelConfig:
        model_type = self.family
        if self.name_or_path is not None and (Path(self.name_or_path) / "config.json").is_file():
            model_type = read_model_type(self.name_or_path)
        if model_type is not None and model_type not in FAMILIES:
            raise ValueError(
                f"model type {model_type!r} is not supported by bbu_detection; allowed: {', '.join(FAMILIES)}"
            )
        return self


class DetectionVLM(nn.Module):
    """The trained pair: `vlm` (the HF VLM, maybe PEFT-wrapped) and `detection_head`."""

    def __init__(self, vlm: nn.Module, detection_head: DetectionHead):
        super().__init__()
        self.vlm = vlm
        self.detection_head = detection_head

    def forward(self, *args: Any, **kwargs: Any) -> Any:
        """The VLM's own forward (logits); the trainer and `predict` run the head themselves."""
        return self.vlm(*args, **kwargs)

    def generate(self, *args: Any, **kwargs: Any) -> Any:
        """The VLM's `generate` (what the core's exact-match evaluation calls)."""
        return self.vlm.generate(*args, **kwargs)


class DetectionBundle(ModelBundle):
    """`part_of` over `DetectionVLM` names: the head's two parts, else the VLM family's three."""

    def part_of(self, name: str) -> str | None:
        """`adapter` | `detection` for head parameters, `vision` | `aligner` | `llm` for the VLM's."""
        if name.startswith(HEAD_PREFIX):
            return "adapter" if "adapter" in name[len(HEAD_PREFIX):] else "detection"
        if name.startswith(VLM_PREFIX):
            return super().part_of(name[len(VLM_PREFIX):])
        return None


def head_parameter_report(head: DetectionHead) -> str:
    """One line: the head's parameters, its caption decoder's, and how much of that is vocabulary (embedding and
    output layer), or that captions use the language model's (tied)."""
    def count(module: nn.Module) -> int:
        return sum(p.numel() for p in module.parameters())

    cap = head.captioner
    total, captions = count(head), count(cap)
    if cap.tied:
        vocab = "vocabulary tied to the language model's embedding and output layer (tie_caption_embeddings)"
    else:
        own = count(cap.embed) + count(cap.head)
        vocab = (f"{own:,} of them its own vocabulary embedding and output layer (model.detection."
                 "tie_caption_embeddings: true reads the language model's instead)")
    return f"detection head: {total:,} parameters; caption decoder {captions:,}, {vocab}"


def caption_end_id(tokenizer: Any) -> int:
    """The token that ends a caption: `<|im_end|>` when the tokenizer has it, else its eos token."""
    tid = tokenizer.convert_tokens_to_ids("<|im_end|>")
    if isinstance(tid, int) and tid >= 0 and tid != tokenizer.unk_token_id:
        return tid
    if tokenizer.eos_token_id is None:
        raise ValueError("the tokenizer has neither <|im_end|> nor an eos token to end captions with")
    return int(tokenizer.eos_token_id)


def head_config_for(vlm: nn.Module, processor: Any, settings: DetectionSettings) -> DetectionHeadConfig:
    """The head config for a VLM: its LLM width (which the image embeddings share) and its vocabulary."""
    text = vlm.config.get_text_config()
    tokenizer = getattr(processor, "tokenizer", processor)
    return DetectionHeadConfig(**settings.model_dump(), hidden_size=int(text.hidden_size),
                               vision_size=int(text.hidden_size), vocab_size=int(text.vocab_size),
                               caption_end_id=caption_end_id(tokenizer))


def load_detection_model(path: str | Path, device: torch.device | str | None = None,
                         dtype: torch.dtype = torch.float32) -> tuple[DetectionVLM, Any]:
    """(DetectionVLM, processor) from an export: the HF VLM in `path` and its head in `path/detection_head`."""
    from arctic_vl import load_model, load_processor

    path = Path(path)
    if not (path / HEAD_DIR / "config.json").is_file():
        raise FileNotFoundError(f"{path}: no {HEAD_DIR}/config.json: not a bbu_detection export")
    vlm = load_model(path, dtype=dtype)
    head = load_detection_head(path / HEAD_DIR, dtype=dtype).tie_to(vlm)
    model = DetectionVLM(vlm, head).eval()
    if device is not None:
        model.to(device)
    return model, load_processor(path)


@MODELS.register("bbu_detection")
class DetectionModelFactory(HFModelFactory):
    """The core's HF VLM factory, with a `DetectionHead` beside the VLM (built fresh, or read from an export)."""

    config_class = DetectionModelConfig
    config: DetectionModelConfig
    parts = (*PARTS, *HEAD_PARTS)

    def describe(self) -> str:
        """The VLM's description, then the head's queries, decoder and caption layers and width."""
        d = self.config.detection
        return (f"bbu_detection: {super().describe()}; head: {d.num_queries} queries, {d.decoder_layers} decoder "
                f"layers, {d.caption_layers} caption layers, d_model {d.d_model}")

    def build(self, device: torch.device | None = None, output_dir: Path | None = None,
              path: Path | None = None) -> ModelBundle:
        """The VLM as the core builds it (freeze, LoRA, device), then the head: from `path/detection_head` when
        evaluating an export, else freshly initialised from the trainer seed (identical on every rank)."""
        inner = super().build(device=device, output_dir=output_dir, path=path)
        if path is not None and (Path(path) / HEAD_DIR / "config.json").is_file():
            saved = read_head_config(Path(path) / HEAD_DIR)
            want = head_config_for(inner.model, inner.processor, self.config.detection)
            if saved != want:
                raise ValueError(f"{path}/{HEAD_DIR}/config.json differs from the configured head: "
                                 f"{saved.model_dump()} vs {want.model_dump()}")
            head = load_detection_head(Path(path) / HEAD_DIR)
        else:
            seed = self.config.seed if self.config.seed is not None else getattr(
                getattr(self.engine_config, "trainer", None), "seed", 0)
            with torch.random.fork_rng(devices=[]):
                torch.manual_seed(seed)
                head = DetectionHead(head_config_for(inner.model, inner.processor, self.config.detection))
        head.tie_to(inner.model)
        head.to(dtype=next(inner.model.parameters()).dtype)
        if device is not None:
            head.to(device)
        model = DetectionVLM(inner.model, head)
        if os.environ.get("RANK", "0") == "0":  # once per run, not once per process
            logger.info(head_parameter_report(head))
        return DetectionBundle(model, inner.processor, inner.family, extras={"head_config": head.config},
                               part_names=self.parts)

    def export(self, bundle: ModelBundle, model: nn.Module, out_dir: Path,
               state_dict: dict[str, torch.Tensor] | None = None) -> Path:
        """`out_dir`: the plain HF VLM (the core's export, LoRA merged) and `out_dir/detection_head/`."""
        vlm_state = head_state = None
        if state_dict is not None:  # gathered by ZeRO-3, named as DetectionVLM names them
            vlm_state = {k[len(VLM_PREFIX):]: v for k, v in state_dict.items() if k.startswith(VLM_PREFIX)}
            head_state = {k[len(HEAD_PREFIX):]: v for k, v in state_dict.items() if k.startswith(HEAD_PREFIX)}
        super().export(bundle, model.vlm, out_dir, state_dict=vlm_state)
        save_detection_head(model.detection_head, Path(out_dir) / HEAD_DIR, head_state)
        info = {"model_type": "bbu_detection", "vlm": ".", "detection_head": HEAD_DIR,
                "load_with": "bbu_detection.load_detection_model(path)"}
        (Path(out_dir) / HEAD_DIR / "export.json").write_text(json.dumps(info, indent=1) + "\n")
        return out_dir
