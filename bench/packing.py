"""Packing bench: real tokens per second of SFT training steps, packing vs padding to the longest in the batch.

Same model, same samples, one process. The samples mix 80% short (32-96 tokens) and 20% long (384-512 tokens)
conversations (random token ids, the assistant half trained). Padding: the samples in a seeded order, micro-batches
of ``--micro-batch-size`` samples each padded to its longest (`pad_collate`, the engine's unpacked path).
Packing: `PackingPlanner` rows of up to ``--max-length`` tokens, ``--micro-batch-size`` rows a micro-batch
(`PackedCollator`, the engine's packed path). Both micro-batches hold at most micro_batch_size x max_length slots.
A side's pass = collate + forward + backward (the engine's lean SFT loss) over all samples; the two sides alternate
each round and the median of the per-round packed/padded tokens-per-second ratios is printed as ``ratio=...``.

    /tmp/venv/bin/python bench/packing.py                  # full size (a few minutes on 1 core)
    /tmp/venv/bin/python bench/packing.py --samples 20 --hidden 32 --layers 1 --rounds 1 --short 8 16 --long 40 48 \
        --max-length 64 --micro-batch-size 2               # smoke
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # a checkout without arctic_vl installed


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--family", default="llava_next", help="model family (its language model is what runs)")
    p.add_argument("--layers", type=int, default=4, help="text layers")
    p.add_argument("--hidden", type=int, default=256, help="text hidden size")
    p.add_argument("--heads", type=int, default=4, help="attention heads")
    p.add_argument("--samples", type=int, default=160, help="samples per pass")
    p.add_argument("--long-share", type=float, default=0.2, help="share of long samples")
    p.add_argument("--short", type=int, nargs=2, default=(32, 96), metavar=("MIN", "MAX"), help="short lengths")
    p.add_argument("--long", type=int, nargs=2, default=(384, 512), metavar=("MIN", "MAX"), help="long lengths")
    p.add_argument("--max-length", type=int, default=512, help="tokens per packed row (>= the longest sample)")
    p.add_argument("--micro-batch-size", type=int, default=8, help="samples (padding) / rows (packing) per micro-batch")
    p.add_argument("--rounds", type=int, default=3, help="timed rounds (each runs both sides once)")
    p.add_argument("--warmup", type=int, default=1, help="untimed micro-batches per side before timing")
    p.add_argument("--attn", choices=["sdpa", "eager"], default="sdpa")
    p.add_argument("--threads", type=int, default=1, help="torch CPU threads")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--min-ratio", type=float, default=None, help="exit 1 if the median ratio is below this")
    return p.parse_args(argv)


def make_samples(args: argparse.Namespace, vocab: int, first_id: int) -> list[dict[str, torch.Tensor]]:
    """Token-id conversations: a prompt (no labels) then an answer half (labels), lengths per the 80/20 mix."""
    g = torch.Generator().manual_seed(args.seed)
    n_long = round(args.samples * args.long_share)
    kinds = torch.randperm(args.samples, generator=g) < n_long
    samples = []
    for is_long in kinds.tolist():
        lo, hi = args.long if is_long else args.short
        n = int(torch.randint(lo, hi + 1, (1,), generator=g))
        ids = torch.randint(first_id, vocab, (n,), generator=g)
        labels = ids.clone()
        labels[: n // 2] = -100
        samples.append({"input_ids": ids, "labels": labels})
    return samples


def build(args: argparse.Namespace, workdir: Path) -> tuple[torch.nn.Module, Any, Any]:
    """The model (random tiny-family weights at the requested size), its encoder and the data bundle pieces."""
    from arctic_vl.data.encoding import SampleEncoder
    from arctic_vl.models.loading import family_of_dir, load_model, load_processor
    from arctic_vl.models.tiny import make_tiny_model

    path = make_tiny_model(args.family, workdir / "model", seed=args.seed, layers=args.layers, hidden=args.hidden,
                           heads=args.heads, kv_heads=max(1, args.heads // 2), intermediate=4 * args.hidden)
    model = load_model(path, attn_implementation=args.attn)
    encoder = SampleEncoder(load_processor(path), family_of_dir(path))
    return model, encoder, path


def padded_batches(samples: list[dict], mbs: int, seed: int) -> list[list[int]]:
    """The engine's unpacked plan: a seeded order cut into micro-batches of `mbs` samples."""
    from arctic_vl.data.sampling import EpochBatchSampler

    return [step[0] for step in EpochBatchSampler.plan(len(samples), mbs, 1, seed, 0, True)]


def packed_batches(samples: list[dict], max_length: int, mbs: int, seed: int) -> tuple[list[list[tuple[int, int]]], Any]:
    from arctic_vl.data.sampling import PackingPlanner

    planner = PackingPlanner([len(s["input_ids"]) for s in samples], max_length, mbs, seed)
    return [step[0] for step in planner(0, 1)], planner


def run_side(model: torch.nn.Module, batches: list[Any], make_batch: Any) -> tuple[float, int]:
    """(seconds, real tokens) for collate + forward + backward over `batches`."""
    from arctic_vl import final_hidden, lm_loss_sum

    tokens, start = 0, time.perf_counter()
    for keys in batches:
        batch, n = make_batch(keys)
        hidden, head, _ = final_hidden(model, batch)
        loss, count = lm_loss_sum(hidden, head, batch["labels"])
        (loss / max(count, 1)).backward()
        tokens += n
    model.zero_grad(set_to_none=True)
    return time.perf_counter() - start, tokens


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    torch.set_num_threads(args.threads)
    if args.long[1] > args.max_length:
        print(f"--max-length {args.max_length} must be >= the longest sample ({args.long[1]})", file=sys.stderr)
        return 2
    from arctic_vl.data.collate import PackedCollator, RopeIndex, pad_collate

    with tempfile.TemporaryDirectory() as tmp:
        model, encoder, _ = build(args, Path(tmp))
    model.train()
    vocab = model.get_input_embeddings().weight.shape[0]
    samples = make_samples(args, vocab, first_id=32)  # ids below 32 are the tiny tokenizer's special tokens
    rope = RopeIndex(model) if encoder.family.is_qwen else None
    packer = PackedCollator(encoder, args.max_length, fallback=None, rope_index=rope)

    def padded(keys: list[int]) -> tuple[dict, int]:
        chosen = [samples[i] for i in keys]
        return pad_collate(encoder, chosen), sum(len(s["input_ids"]) for s in chosen)

    def packed(keys: list[tuple[int, int]]) -> tuple[dict, int]:
        batch = packer([{**samples[i], "_row": r, "_index": i} for r, i in keys])
        return batch, batch["_num_tokens"]

    pad_plan = padded_batches(samples, args.micro_batch_size, args.seed)
    pack_plan, planner = packed_batches(samples, args.max_length, args.micro_batch_size, args.seed)
    stats = planner.stats(0)
    params = sum(p.numel() for p in model.parameters())
    print(f"model {args.family}: {params / 1e6:.2f}M parameters, {args.layers} layers, hidden {args.hidden}, "
          f"attn {args.attn}, {args.threads} thread(s)")
    print(f"samples {stats['samples']} ({stats['tokens']} tokens): padding {len(pad_plan)} micro-batches of "
          f"{args.micro_batch_size}, efficiency {stats['unpacked_padding_efficiency']:.1%}; packing {stats['rows']} rows "
          f"of <= {args.max_length} in {len(pack_plan)} micro-batches, efficiency {stats['efficiency']:.1%}")
    for _ in range(args.warmup):
        run_side(model, pad_plan[:1], padded)
        run_side(model, pack_plan[:1], packed)
    ratios = []
    for r in range(args.rounds):
        t_pad, n_pad = run_side(model, pad_plan, padded)
        t_pack, n_pack = run_side(model, pack_plan, packed)
        assert n_pad == n_pack == stats["tokens"], (n_pad, n_pack, stats["tokens"])
        ratios.append((n_pack / t_pack) / (n_pad / t_pad))
        print(f"round {r}: padding {n_pad / t_pad:,.0f} tok/s ({t_pad:.2f} s), packing {n_pack / t_pack:,.0f} tok/s "
              f"({t_pack:.2f} s), ratio {ratios[-1]:.2f}")
    ratio = statistics.median(ratios)
    print(f"ratio={ratio:.3f} (packing / padding real tokens per second, median of {len(ratios)} rounds)")
    if args.min_ratio is not None and ratio < args.min_ratio:
        print(f"ratio {ratio:.3f} is below --min-ratio {args.min_ratio}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
