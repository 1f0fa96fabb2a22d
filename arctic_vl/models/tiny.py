"""Tiny offline VLMs: a small BPE tokenizer, per-family configs, and a builder that writes HF checkpoints.

Everything is built from code (no hub): the model goes through the real `save_pretrained`, so the
checkpoints load back with `from_pretrained` exactly like a downloaded one.
"""

from __future__ import annotations

import argparse
import functools
import inspect
import itertools
import json
from pathlib import Path
from typing import Any

from pydantic import AliasChoices, BaseModel, ConfigDict, Field, ValidationError

from arctic_vl.config.paths import output_directory
from arctic_vl.errors import ConfigError
from arctic_vl.models.families import FAMILIES, FamilySpec, get_family

PAD, BOS, EOS, EOT = "<|pad|>", "<|bos|>", "<|endoftext|>", "<|im_end|>"
IM_START = "<|im_start|>"
IMAGE_TOKENS = ("<image>", "<video>", "<|image_pad|>", "<|vision_start|>", "<|vision_end|>", "<|video_pad|>")
# Special tokens come first so their ids are small and fixed: 0..len-1.
SPECIAL_TOKENS = (PAD, BOS, EOS, IM_START, EOT, *IMAGE_TOKENS)

_COLOURS = ("red", "green", "blue", "yellow", "purple", "orange", "cyan", "white", "black", "gray")
_SHAPES = ("circle", "square", "triangle", "star", "box", "line")
_NUMBERS = ("zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine", "ten")
_PLACES = ("left", "right", "top", "bottom", "center", "top left", "bottom right")
_QUESTIONS = (
    "What colour is the {s}?",
    "Which shape is {c}?",
    "How many {s}s are there?",
    "Where is the {c} {s}?",
    "Describe the image.",
    "Describe the objects in the image.",
    "What shape is at the {p}?",
)
_ANSWERS = (
    "The {s} is {c}.",
    "There are {n} {c} {s}s.",
    "The {c} {s} is at the {p}.",
    "A {c} {s} at the {p} of the image.",
    "{n}",
    "{c}",
)


def _corpus() -> list[str]:
    """A fixed English + JSON corpus covering what tests and examples say to the tiny models."""
    lines: list[str] = []
    for i, (c, s, n, p) in enumerate(itertools.product(_COLOURS, _SHAPES, _NUMBERS[:4], _PLACES[:4])):
        q = _QUESTIONS[i % len(_QUESTIONS)].format(c=c, s=s, n=n, p=p)
        a = _ANSWERS[i % len(_ANSWERS)].format(c=c, s=s, n=n, p=p)
        lines.append(f"{q} {a}")
        x1, y1 = (i * 37) % 1000, (i * 91) % 1000
        lines.append(json.dumps({"bbox_2d": [x1, y1, min(999, x1 + 120), min(999, y1 + 80)], "desc": f"{c} {s}"}))
    lines += [" ".join(_NUMBERS), " ".join(str(d) for d in range(100)), " ".join(_PLACES)]
    lines += [
        "You are a helpful assistant. Answer the question about the image.",
        'Objects: [{"poly": [1, 2, 3, 4], "line": [5, 6, 7, 8], "desc": "object", "summary": "objects"}]',
        "pass fail reason: the image shows the objects described. true false null",
    ]
    return lines


@functools.lru_cache(maxsize=1)
def _trained_bpe_json() -> str:
    """Train the byte-level BPE once per process; the JSON is the cache (tokenizers are mutable)."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=1000,
        special_tokens=list(SPECIAL_TOKENS),
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(_corpus(), trainer=trainer)
    return tok.to_str()


def chat_template(image_placeholder: str = "<image>") -> str:
    """ChatML template; `content` is a string or a list of {type: text|image} parts.

    An image part renders as `image_placeholder` (the family's unexpanded image marker).
    """
    return (
        "{%- for message in messages -%}"
        "{{- '<|im_start|>' + message['role'] + '\\n' -}}"
        "{%- if message['content'] is string -%}{{- message['content'] -}}"
        "{%- else -%}{%- for part in message['content'] -%}"
        "{%- if part['type'] == 'image' -%}{{- '" + image_placeholder + "' -}}"
        "{%- elif part['type'] == 'text' -%}{{- part['text'] -}}{%- endif -%}"
        "{%- endfor -%}{%- endif -%}"
        "{{- '<|im_end|>\\n' -}}"
        "{%- endfor -%}"
        "{%- if add_generation_prompt -%}{{- '<|im_start|>assistant\\n' -}}{%- endif -%}"
    )


def build_tokenizer(family: str | None = None):
    """A ~1000-token byte-level BPE `PreTrainedTokenizerFast` with ChatML template and image tokens.

    The vocabulary is the same for every family; `family` only sets the named image-token
    attributes its processor reads (e.g. `tokenizer.image_token`) and the template's image marker.
    """
    from tokenizers import Tokenizer
    from transformers import PreTrainedTokenizerFast

    spec: FamilySpec | None = get_family(family) if family is not None else None
    named = dict(spec.special_tokens) if spec is not None else {}
    placeholder = spec.image_placeholder if spec is not None else "<image>"
    extra = named or list(IMAGE_TOKENS)
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=Tokenizer.from_str(_trained_bpe_json()),
        pad_token=PAD,
        bos_token=BOS,
        eos_token=EOT,  # generation stops at the end of the assistant turn
        unk_token=None,
        extra_special_tokens=extra,
        chat_template=chat_template(placeholder),
        model_max_length=4096,
        padding_side="right",
    )
    return tokenizer


def _round_up(n: int, multiple: int = 64) -> int:
    return (n + multiple - 1) // multiple * multiple


def _mrope_section(head_dim: int) -> list[int]:
    """Split head_dim/2 rotary pairs into (t, h, w) as Qwen does (16, 24, 24 for head_dim 128)."""
    half = head_dim // 2
    hw = (3 * half) // 8
    return [half - 2 * hw, hw, hw]


def _token_ids(tokenizer) -> dict[str, int]:
    return {t: tokenizer.convert_tokens_to_ids(t) for t in SPECIAL_TOKENS}


def _llava_pinpoints(image_size: int, grid: int | None = None) -> list[list[int]]:
    """Any-res grids in tiles of `image_size`: every rows x cols up to `grid` x `grid` when given
    (`grid=1`: one tile of the crop size, the fewest image tokens), else 1x2, 2x1 and 2x2."""
    s = image_size
    if grid is not None:
        if grid < 1:
            raise ValueError(f"anyres_grid must be >= 1, got {grid}")
        return [[r * s, c * s] for r in range(1, grid + 1) for c in range(1, grid + 1)]
    return [[s, 2 * s], [2 * s, s], [2 * s, 2 * s]]


class TinyModelConfig(BaseModel):
    """`model.tiny`: the shape of an inline tiny model (`tiny_config`'s keywords; unset keys keep its defaults).

    The ranges keep the model tiny and buildable; `check_tiny_shape` checks what depends on several keys or on
    the family (heads dividing hidden, even head sizes, the crop holding a patch, any-res only for LLaVA).
    """

    model_config = ConfigDict(extra="forbid", allow_inf_nan=False, populate_by_name=True)

    layers: int | None = Field(None, ge=1, le=128, validation_alias=AliasChoices("layers", "text_layers"),
                               description="language-model layers (default 2)")
    hidden: int | None = Field(None, ge=2, le=8192, description="language-model width (default 64)")
    heads: int | None = Field(None, ge=1, le=128, description="attention heads (default 4); must divide hidden")
    kv_heads: int | None = Field(None, ge=1, le=128, description="key/value heads (default 2); must divide heads")
    intermediate: int | None = Field(None, ge=1, le=32768, description="MLP width (default 128)")
    vision_layers: int | None = Field(None, ge=1, le=64, description="vision-tower layers (default 2)")
    vision_hidden: int | None = Field(None, ge=4, le=4096, description="vision-tower width (default 64)")
    image_size: int | None = Field(None, ge=1, le=4096,
                                   description="LLaVA: the vision crop (default 32); Qwen: the largest image side")
    patch_size: int | None = Field(None, ge=1, le=64,
                                   description="vision patch (default 8 LLaVA, 14 Qwen2/2.5, 16 Qwen3)")
    vocab_size: int | None = Field(None, ge=1, le=262144, description="default: the tokenizer's size rounded up to 64")
    anyres_grid: int | None = Field(None, ge=1, le=8, description="LLaVA any-res grid: every tiling up to N x N tiles")

    def given(self) -> dict[str, int]:
        """The keys the config sets (what `make_tiny_model` receives; the rest keep `tiny_config`'s defaults)."""
        return self.model_dump(exclude_none=True)


def _tiny_defaults() -> dict[str, Any]:
    """`tiny_config`'s keyword defaults (the one owner of the default shape)."""
    params = inspect.signature(tiny_config).parameters
    out = {k: p.default for k, p in params.items() if p.kind is p.KEYWORD_ONLY}
    out["layers"] = out.pop("text_layers")
    return out


def check_tiny_shape(family: str, shape: dict[str, Any]) -> None:
    """Refuse a tiny-model shape that cannot build or run (ValueError naming the keys and what is allowed)."""
    spec = get_family(family)
    s = {**_tiny_defaults(), **{k: v for k, v in shape.items() if v is not None}}
    if "text_layers" in shape:
        s["layers"] = shape["text_layers"]
    hidden, heads, kv = s["hidden"], s["heads"], s["kv_heads"]
    if hidden % heads:
        raise ValueError(f"tiny.heads ({heads}) must divide tiny.hidden ({hidden})")
    if (hidden // heads) % 2:
        raise ValueError(
            f"tiny.hidden / tiny.heads (the head size, {hidden // heads}) must be even (rotary embeddings)"
        )
    if heads % kv:
        raise ValueError(f"tiny.kv_heads ({kv}) must divide tiny.heads ({heads})")
    vision = s["vision_hidden"]
    vision_heads = max(1, vision // 16)
    if vision % vision_heads:
        raise ValueError(f"tiny.vision_hidden ({vision}) must be a multiple of its {vision_heads} heads "
                         "(one head per 16 channels): e.g. a multiple of 16")
    if spec.is_qwen and (vision // vision_heads) % 4:
        raise ValueError(f"tiny.vision_hidden ({vision}): the Qwen vision head size ({vision // vision_heads}) must "
                         "be a multiple of 4: e.g. a multiple of 16")
    if spec.is_qwen and s["anyres_grid"] is not None:
        raise ValueError(
            f"tiny.anyres_grid applies to the LLaVA families, not {spec.name} (Qwen sizes images by pixels)"
        )
    if not spec.is_qwen:
        size, patch = s["image_size"] or 32, s["patch_size"] or 8
        if patch > size:
            raise ValueError(f"tiny.patch_size ({patch}) must not exceed tiny.image_size ({size}, the vision crop)")
    vocab = s["vocab_size"]
    if vocab is not None and vocab < tokenizer_size():
        raise ValueError(f"tiny.vocab_size ({vocab}) is smaller than the tokenizer ({tokenizer_size()} tokens)")


def tokenizer_size() -> int:
    """Tokens of the tiny models' tokenizer (the same for every family)."""
    from tokenizers import Tokenizer

    return Tokenizer.from_str(_trained_bpe_json()).get_vocab_size(with_added_tokens=True)


def tiny_config(
    family: str,
    *,
    text_layers: int = 2,
    hidden: int = 64,
    heads: int = 4,
    kv_heads: int = 2,
    intermediate: int = 128,
    vision_layers: int = 2,
    vision_hidden: int = 64,
    image_size: int | None = None,
    patch_size: int | None = None,
    vocab_size: int | None = None,
    anyres_grid: int | None = None,
    **overrides: Any,
):
    """A tiny `PretrainedConfig` for `family` whose forward takes milliseconds on CPU.

    `image_size` is the vision tower's crop for LLaVA (default 32) and, for Qwen, the side of the
    largest image budget in pixels (default 112; stored on the processor, not the model).
    `layers` is accepted for `text_layers` (the CLI's name). Other `overrides` must be attributes of
    the family's top-level config (e.g. `vision_feature_layer=-2`); anything else is an error, so a
    misspelt shape key never passes silently. `anyres_grid` (LLaVA only) sets the any-res grid
    pinpoints to every rows x cols tiling up to anyres_grid x anyres_grid tiles of `image_size`.
    """
    from transformers import AutoConfig

    spec = get_family(family)
    if anyres_grid is not None and spec.is_qwen:
        raise ValueError(f"anyres_grid applies to the LLaVA families, not {spec.name} (Qwen sizes images by pixels)")
    if "layers" in overrides:
        text_layers = overrides.pop("layers")
    unknown = [k for k in overrides if not hasattr(AutoConfig.for_model(spec.model_type), k)]
    if unknown:
        raise ValueError(
            f"unknown tiny-model setting(s) {', '.join(sorted(unknown))} for {spec.name}; shape keys: "
            "layers/text_layers, hidden, heads, kv_heads, intermediate, vision_layers, vision_hidden, "
            "image_size, patch_size, vocab_size, anyres_grid, or an attribute of the family's config"
        )
    check_tiny_shape(spec.name, {"layers": text_layers, "hidden": hidden, "heads": heads, "kv_heads": kv_heads,
                                 "vision_hidden": vision_hidden, "image_size": image_size, "patch_size": patch_size,
                                 "vocab_size": vocab_size, "anyres_grid": anyres_grid})
    tokenizer = build_tokenizer(family)
    ids = _token_ids(tokenizer)
    vocab = vocab_size if vocab_size is not None else _round_up(len(tokenizer))
    if vocab < len(tokenizer):
        raise ValueError(f"vocab_size {vocab} is smaller than the tokenizer ({len(tokenizer)} tokens)")
    head_dim = hidden // heads
    text_common = {
        "vocab_size": vocab,
        "hidden_size": hidden,
        "intermediate_size": intermediate,
        "num_hidden_layers": text_layers,
        "num_attention_heads": heads,
        "num_key_value_heads": kv_heads,
        "max_position_embeddings": 4096,
        "bos_token_id": ids[BOS],
        "eos_token_id": ids[EOT],
        "pad_token_id": ids[PAD],
    }
    if spec.is_qwen:
        kwargs = _qwen_kwargs(spec, ids, text_common, head_dim, patch_size, vision_layers, vision_hidden, hidden)
    else:
        kwargs = _llava_kwargs(spec, ids, text_common, image_size or 32, patch_size or 8, vision_layers,
                               vision_hidden, anyres_grid)
    kwargs.update(overrides)
    return AutoConfig.for_model(spec.model_type, **kwargs)


def _llava_kwargs(spec: FamilySpec, ids: dict[str, int], text_common: dict[str, Any], size: int, patch: int,
                  vision_layers: int, vision_hidden: int, anyres_grid: int | None) -> dict[str, Any]:
    """Config kwargs of a tiny LLaVA-1.5 / LLaVA-NeXT (Llama + CLIP) or LLaVA-OneVision (Qwen2 + SigLIP)."""
    if spec.name == "llava_onevision":
        text = {"model_type": "qwen2", **text_common}
        vision = {"model_type": "siglip_vision_model", "vision_use_head": False}
        extra: dict[str, Any] = {
            "image_token_index": ids["<image>"],
            "video_token_index": ids["<video>"],
            "vision_feature_select_strategy": "full",
            "vision_aspect_ratio": "anyres_max_9",
        }
    else:
        text = {"model_type": "llama", **text_common}
        vision = {"model_type": "clip_vision_model", "projection_dim": vision_hidden}
        extra = {"image_token_index": ids["<image>"], "vision_feature_select_strategy": "default"}
    vision.update(
        hidden_size=vision_hidden, intermediate_size=2 * vision_hidden, num_hidden_layers=vision_layers,
        num_attention_heads=max(1, vision_hidden // 16), image_size=size, patch_size=patch,
    )
    kwargs = {"text_config": text, "vision_config": vision, "vision_feature_layer": -1,
              "image_seq_length": (size // patch) ** 2, **extra}
    if spec.name == "llava":
        if anyres_grid is not None:
            raise ValueError("anyres_grid applies to llava_next and llava_onevision; llava (1.5) has no any-res tiles")
    else:
        kwargs["image_grid_pinpoints"] = _llava_pinpoints(size, anyres_grid)
    return kwargs


def _qwen_kwargs(spec: FamilySpec, ids: dict[str, int], text_common: dict[str, Any], head_dim: int,
                 patch_size: int | None, vision_layers: int, vision_hidden: int, hidden: int) -> dict[str, Any]:
    """Config kwargs of a tiny Qwen2-VL / Qwen2.5-VL / Qwen3-VL."""
    patch = patch_size or (16 if spec.name == "qwen3_vl" else 14)
    rope = {"rope_type": "default", "rope_theta": 10000.0, "mrope_section": _mrope_section(head_dim)}
    vision = {
        "depth": vision_layers, "hidden_size": vision_hidden, "num_heads": max(1, vision_hidden // 16),
        "patch_size": patch, "spatial_merge_size": 2, "temporal_patch_size": 2,
    }
    if spec.name == "qwen2_vl":
        vision.update(embed_dim=vision_hidden, hidden_size=hidden, mlp_ratio=2)
    elif spec.name == "qwen2_5_vl":
        vision.update(intermediate_size=2 * vision_hidden, out_hidden_size=hidden,
                      fullatt_block_indexes=[vision_layers - 1], window_size=4 * patch * 2)
    else:
        rope["mrope_interleaved"] = True
        vision.update(intermediate_size=2 * vision_hidden, out_hidden_size=hidden,
                      num_position_embeddings=64, deepstack_visual_indexes=[0])
    text = {**text_common, "rope_parameters": rope}
    if spec.name == "qwen3_vl":
        text["head_dim"] = head_dim
    return {
        "text_config": text,
        "vision_config": vision,
        "image_token_id": ids["<|image_pad|>"],
        "video_token_id": ids["<|video_pad|>"],
        "vision_start_token_id": ids["<|vision_start|>"],
        "vision_end_token_id": ids["<|vision_end|>"],
    }


def make_tiny_model(family: str, out_dir: str | Path, *, seed: int = 0, **shape: Any) -> Path:
    """Build a randomly initialised tiny `family` model and save model + tokenizer + processor to `out_dir`.

    `shape` takes the keyword arguments of `tiny_config`. Returns `out_dir` as a Path.
    """
    import torch
    from transformers import AutoModelForImageTextToText

    from arctic_vl.models.processors import build_processor

    spec = get_family(family)
    config = tiny_config(spec.name, **shape)
    # Seed inside a fork of the RNG so building a model does not shift the caller's random stream.
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = AutoModelForImageTextToText.from_config(config)
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    model.generation_config.pad_token_id = config.get_text_config().pad_token_id
    model.save_pretrained(out, safe_serialization=True)
    processor = build_processor(spec.name, config, build_tokenizer(spec.name), image_size=shape.get("image_size"))
    processor.save_pretrained(out)
    return out


def make_tiny_model_cli(argv: list[str]) -> int:
    """`arctic_vl make-tiny-model FAMILY OUT_DIR [...]`: write a tiny checkpoint; returns the exit code."""
    parser = argparse.ArgumentParser(prog="arctic_vl make-tiny-model", description=make_tiny_model.__doc__)
    parser.add_argument("family", choices=sorted(FAMILIES))
    parser.add_argument("out_dir", type=Path)
    parser.add_argument("--layers", type=int, default=2, help="language-model layers")
    parser.add_argument("--hidden", type=int, default=64)
    parser.add_argument("--heads", type=int, default=4)
    parser.add_argument("--kv-heads", type=int, default=2)
    parser.add_argument("--vision-layers", type=int, default=2)
    parser.add_argument("--vision-hidden", type=int, default=64)
    parser.add_argument("--image-size", type=int, default=None)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    # the ranges of `model.tiny` (TinyModelConfig) bound the command line too: `--layers 0` or a width of a
    # million is refused by option name, before anything is built or written
    options = {"layers": "--layers", "hidden": "--hidden", "heads": "--heads", "kv_heads": "--kv-heads",
               "vision_layers": "--vision-layers", "vision_hidden": "--vision-hidden", "image_size": "--image-size",
               "intermediate": "--hidden (the MLP is 2 x hidden)"}
    given = {k: getattr(args, k) for k in options if k != "intermediate"}
    try:
        TinyModelConfig.model_validate({**given, "intermediate": 2 * args.hidden})
    except ValidationError as e:
        problems = "; ".join(f"{options.get(str(err['loc'][0]), err['loc'][0])} {err['input']!r}: {err['msg']}"
                             for err in e.errors(include_url=False))
        raise ConfigError(f"make-tiny-model: {problems}") from None
    if not 0 <= args.seed < 2**32:
        raise ConfigError(f"make-tiny-model: --seed {args.seed}: must be in 0..2**32-1")
    try:
        check_tiny_shape(args.family, given)
    except ValueError as e:
        raise ConfigError(f"make-tiny-model: {e}") from None
    output_directory(args.out_dir, "OUT_DIR")
    try:
        out = make_tiny_model(
            args.family, args.out_dir, seed=args.seed, text_layers=args.layers, hidden=args.hidden,
            heads=args.heads, kv_heads=args.kv_heads, intermediate=2 * args.hidden,
            vision_layers=args.vision_layers, vision_hidden=args.vision_hidden, image_size=args.image_size,
        )
    except ValueError as e:  # a shape that cannot build: the user's to fix
        raise ConfigError(f"make-tiny-model: {e}") from None
    print(f"wrote tiny {args.family} model to {out}")
    return 0
