"""SwiftKV prefill bench: a LLaVA-NeXT model with a SwiftKV Llama, teacher (SwiftKV off) vs student (on).

Both sides do the same job, the one generate() does for a prompt: vision tower + prefill that fills the KV cache
of every layer + logits of the last position only (``logits_to_keep=1`` with a ``DynamicCache``). With SwiftKV on
the prompt runs layers < M and the SwiftKV K/V projections only; the last token alone runs layers >= M. Same
weights on both sides (one model, switched with ``set_swiftkv``). The two sides alternate, and the median of the
per-round student/teacher time ratios is printed as ``ratio=...``.

    /tmp/venv/bin/python bench/swiftkv_prefill.py                      # full size (about a minute on 1 core)
    /tmp/venv/bin/python bench/swiftkv_prefill.py --layers 4 --hidden 64 --prompt-len 96 --rounds 2   # smoke
"""

from __future__ import annotations

import argparse
import importlib.util
import statistics
import sys
import time
from pathlib import Path

if importlib.util.find_spec("swiftkv_vl") is None:  # a checkout without the plugin installed
    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "projects" / "swiftkv_vl"))

import torch
from swiftkv_vl import LlamaSwiftKVConfig, init_swiftkv_from_teacher, set_swiftkv
from transformers import CLIPVisionConfig, DynamicCache, LlavaNextConfig, LlavaNextForConditionalGeneration

IMAGE_SIZE = 32  # vision tile size; the image is 32x64 -> base tile + 2 tiles (anyres)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--layers", type=int, default=8, help="text layers L (>= 2)")
    p.add_argument("--kv-layers", type=int, default=None, help="M, layers with their own K/V (default L/2)")
    p.add_argument("--group", type=int, default=1, help="G, SwiftKV layers per K/V group")
    p.add_argument("--hidden", type=int, default=384, help="text hidden size")
    p.add_argument("--heads", type=int, default=6, help="attention heads")
    p.add_argument("--kv-heads", type=int, default=2, help="key/value heads (GQA)")
    p.add_argument("--intermediate", type=int, default=None, help="MLP size (default 8/3 * hidden, rounded)")
    p.add_argument("--vocab", type=int, default=4096, help="vocabulary size")
    p.add_argument("--prompt-len", type=int, default=768, help="prompt tokens, image tokens included")
    p.add_argument("--rounds", type=int, default=7, help="timed rounds (each runs both sides once)")
    p.add_argument("--threads", type=int, default=1, help="torch CPU threads")
    p.add_argument("--dtype", choices=["float32", "bfloat16"], default="float32")
    p.add_argument("--attn", choices=["sdpa", "eager"], default="sdpa")
    p.add_argument("--max-ratio", type=float, default=None, help="exit 1 if the median ratio is above this")
    p.add_argument("--seed", type=int, default=0)
    return p.parse_args(argv)


def build(args: argparse.Namespace) -> tuple[LlavaNextForConditionalGeneration, dict[str, torch.Tensor], int]:
    """The model (SwiftKV params initialised from the teacher) and a prompt of exactly ``--prompt-len`` tokens."""
    intermediate = args.intermediate or (8 * args.hidden // 3 + 63) // 64 * 64
    text = LlamaSwiftKVConfig(
        vocab_size=args.vocab,
        hidden_size=args.hidden,
        intermediate_size=intermediate,
        num_hidden_layers=args.layers,
        num_attention_heads=args.heads,
        num_key_value_heads=args.kv_heads,
        max_position_embeddings=max(2048, 2 * args.prompt_len),
        num_key_value_layers=args.kv_layers if args.kv_layers is not None else args.layers // 2,
        key_value_group_size=args.group,
        bos_token_id=1,
        eos_token_id=2,
        pad_token_id=0,
    )
    vision = CLIPVisionConfig(
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=2,
        image_size=IMAGE_SIZE,
        patch_size=8,
    )
    image_token = args.vocab - 1
    config = LlavaNextConfig(
        text_config=text,
        vision_config=vision,
        image_token_index=image_token,
        image_grid_pinpoints=[
            [IMAGE_SIZE, IMAGE_SIZE],
            [IMAGE_SIZE, 2 * IMAGE_SIZE],
            [2 * IMAGE_SIZE, IMAGE_SIZE],
        ],
        vision_feature_layer=-2,
    )
    config._attn_implementation = args.attn
    config.text_config._attn_implementation = args.attn
    torch.manual_seed(args.seed)
    model = LlavaNextForConditionalGeneration(config).to(getattr(torch, args.dtype)).eval()
    init_swiftkv_from_teacher(model)

    gen = torch.Generator().manual_seed(args.seed)
    pixel_values = torch.randn(1, 3, 3, IMAGE_SIZE, IMAGE_SIZE, generator=gen).to(model.dtype)
    image_sizes = torch.tensor([[IMAGE_SIZE, 2 * IMAGE_SIZE]])
    with torch.no_grad():  # the image-token count comes from the model (anyres packing), never by hand
        features = model.model.get_image_features(pixel_values, image_sizes, return_dict=True).pooler_output
    n_image = sum(f.shape[0] for f in features)
    n_text = args.prompt_len - n_image - 1
    if n_text < 1:
        raise SystemExit(
            f"--prompt-len {args.prompt_len} leaves no room for text next to {n_image} image tokens"
        )
    text_ids = torch.randint(3, image_token, (1, n_text), generator=gen)
    input_ids = torch.cat([torch.tensor([[1]]), torch.full((1, n_image), image_token), text_ids], dim=1)
    return model, {"input_ids": input_ids, "pixel_values": pixel_values, "image_sizes": image_sizes}, n_image


@torch.no_grad()
def prefill(
    model: LlavaNextForConditionalGeneration, inputs: dict[str, torch.Tensor], swiftkv: bool
) -> float:
    """One prefill as generate() does it; returns seconds. Checks the cache covers the whole prompt."""
    set_swiftkv(model, swiftkv)
    cache = DynamicCache(config=model.config.text_config)
    start = time.perf_counter()
    out = model(**inputs, past_key_values=cache, use_cache=True, logits_to_keep=1)
    elapsed = time.perf_counter() - start
    prompt_len = inputs["input_ids"].shape[1]
    assert out.logits.shape[1] == 1 and cache.get_seq_length() == prompt_len
    assert all(layer.keys.shape[2] == prompt_len for layer in cache.layers)
    return elapsed


def main(argv: list[str] | None = None) -> float:
    args = parse_args(argv)
    torch.set_num_threads(args.threads)
    model, inputs, n_image = build(args)
    text = model.config.text_config
    n_params = sum(p.numel() for p in model.parameters())
    print(
        f"LLaVA-NeXT + SwiftKV Llama: L={text.num_hidden_layers} M={text.num_key_value_layers} "
        f"G={text.key_value_group_size} hidden={text.hidden_size} heads={text.num_attention_heads}/"
        f"{text.num_key_value_heads} vocab={text.vocab_size} params={n_params / 1e6:.1f}M dtype={args.dtype} "
        f"attn={args.attn} threads={args.threads}"
    )
    print(f"prompt: {inputs['input_ids'].shape[1]} tokens ({n_image} image tokens from one 32x64 image)")

    prefill(model, inputs, False)  # warm-up both sides (allocator, kernels)
    prefill(model, inputs, True)
    teacher_s, student_s, ratios = [], [], []
    for r in range(args.rounds):
        # Alternate which side goes first so that drift in machine load hits both equally.
        order = (False, True) if r % 2 == 0 else (True, False)
        times = {on: prefill(model, inputs, on) for on in order}
        teacher_s.append(times[False])
        student_s.append(times[True])
        ratios.append(times[True] / times[False])
    ratio = statistics.median(ratios)
    print(
        f"teacher (swiftkv off) median {statistics.median(teacher_s) * 1e3:.1f} ms, "
        f"student (swiftkv on) median {statistics.median(student_s) * 1e3:.1f} ms, rounds={args.rounds}"
    )
    print(f"ratio={ratio:.3f} (student/teacher prefill time, median over rounds)")
    if args.max_ratio is not None and ratio > args.max_ratio:
        print(f"FAIL: ratio {ratio:.3f} > --max-ratio {args.max_ratio}")
        raise SystemExit(1)
    return ratio


if __name__ == "__main__":
    main()
