"""Packing bench: real tokens per second of SFT training steps, packing vs padding to the longest in the batch.

Same model, same samples, one process, two mixes:

* ``realistic``: the synthetic shapes data (`make_synthetic_data`) at its natural lengths, images included,
  encoded by the engine's own data factory for the shapes recipe's model (configs/shapes-llava-cpu.yaml: a
  tiny LLaVA-NeXT, vision tower frozen). ``--real-questions 1 3`` mixes records asking one question and records
  asking three (the two kinds the generator writes: held-out and recipe-training records), which gives about
  the padding rate of a LLaVA instruction mix; ``--real-questions 3`` is the recipe's training data alone.
  Padding: micro-batches of ``--micro-batch-size`` samples; packing: ``--real-rows`` rows of
  ``--real-max-length`` tokens (default one row of 1024).
* ``skewed``: 80% short (32-96 tokens) and 20% long (384-512 tokens) conversations of random token ids (the
  assistant half trained), where padding wastes two thirds of every batch: ``--micro-batch-size`` samples
  padded to the longest vs ``--micro-batch-size`` rows of up to ``--max-length`` tokens.

Padding uses `EpochBatchSampler.plan` (seeded order) and `pad_collate`, packing `PackingPlanner` and
`PackedCollator`: the engine's two paths, with its default attention (sdpa; packed rows attend per sample,
`arctic_vl.models.attention`). A side's pass = collate + forward + backward (the engine's lean SFT loss) over
all samples (items are read once up front: image decoding is not timed). The two sides alternate each round;
each mix prints min / median / max of the per-round packed/padded tokens-per-second ratios and
``<mix>: ratio=...`` (the median), and the ratio of the two sides' CPU seconds (the same work measured in this
process's CPU time, which other processes on a shared machine do not inflate).

    python bench/packing.py                                 # both mixes, full size (several minutes on 1 core)
    python bench/packing.py --mix realistic --real-questions 3
    python bench/packing.py --samples 20 --hidden 32 --layers 1 --heads 2 --rounds 1 --short 8 16 --long 40 48 \
        --max-length 64 --micro-batch-size 2 --real-samples 12 --real-max-length 256   # smoke
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
    p.add_argument("--mix", choices=["both", "realistic", "skewed"], default="both")
    p.add_argument("--family", default="llava_next", help="skewed mix: model family (its language model runs)")
    p.add_argument("--layers", type=int, default=4, help="skewed mix: text layers")
    p.add_argument("--hidden", type=int, default=256, help="skewed mix: text hidden size")
    p.add_argument("--heads", type=int, default=4, help="skewed mix: attention heads")
    p.add_argument("--samples", type=int, default=160, help="skewed mix: samples per pass")
    p.add_argument("--long-share", type=float, default=0.2, help="skewed mix: share of long samples")
    p.add_argument("--short", type=int, nargs=2, default=(32, 96), metavar=("MIN", "MAX"), help="short lengths")
    p.add_argument("--long", type=int, nargs=2, default=(384, 512), metavar=("MIN", "MAX"), help="long lengths")
    p.add_argument("--max-length", type=int, default=512, help="skewed mix: tokens per packed row")
    p.add_argument("--micro-batch-size", type=int, default=8,
                   help="samples per padded micro-batch (both mixes); skewed mix: also rows per packed one")
    p.add_argument("--real-samples", type=int, default=240, help="realistic mix: records per pass")
    p.add_argument("--real-questions", type=int, nargs="+", default=[1, 3],
                   help="realistic mix: question turns per image record, one shapes data set each, mixed")
    p.add_argument("--real-max-length", type=int, default=1024, help="realistic mix: tokens per packed row")
    p.add_argument("--real-rows", type=int, default=1, help="realistic mix: packed rows per micro-batch")
    p.add_argument("--rounds", type=int, default=3, help="timed rounds (each runs both sides once)")
    p.add_argument("--warmup", type=int, default=1, help="untimed micro-batches per side before timing")
    p.add_argument("--attn", choices=["sdpa", "eager"], default="sdpa")
    p.add_argument("--threads", type=int, default=1, help="torch CPU threads")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--min-ratio", type=float, default=None, help="exit 1 if a mix's median ratio is below this")
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
    """The skewed mix's model (random tiny-family weights at the requested size), its encoder and its path."""
    from arctic_vl.data.encoding import SampleEncoder
    from arctic_vl.models.loading import family_of_dir, load_model, load_processor
    from arctic_vl.models.tiny import make_tiny_model

    path = make_tiny_model(args.family, workdir / "model", seed=args.seed, layers=args.layers, hidden=args.hidden,
                           heads=args.heads, kv_heads=max(1, args.heads // 2), intermediate=4 * args.hidden)
    model = load_model(path, attn_implementation=args.attn)
    encoder = SampleEncoder(load_processor(path), family_of_dir(path))
    return model, encoder, path


def realistic_side(args: argparse.Namespace, workdir: Path) -> tuple[torch.nn.Module, Any, Any, dict[int, dict]]:
    """The recipe model (vision frozen) and the shapes data through the engine's data factory, padded and packed:
    (model, padded bundle, packed bundle, every sample's item by index)."""
    from arctic_vl.data.factory import VLMDataConfig, VLMDataFactory
    from arctic_vl.models.base import ModelBundle
    from arctic_vl.models.loading import family_of_dir, load_model, load_processor
    from arctic_vl.models.tiny import make_tiny_model
    from bench.common import recipe_shape, shapes_sources

    path = make_tiny_model("llava_next", workdir / "recipe-model", seed=args.seed, **recipe_shape())
    model = load_model(path, attn_implementation=args.attn)
    for name, param in model.named_parameters():
        if ".vision_tower." in f".{name}":
            param.requires_grad_(False)
    sources = shapes_sources(workdir, args.real_samples, args.real_questions, args.seed)
    bundle = ModelBundle(model, load_processor(path), family_of_dir(path))

    def data(**kw: Any) -> Any:
        cfg = VLMDataConfig(sources=sources, max_length=args.real_max_length, **kw)
        return VLMDataFactory(cfg).build(bundle, seed=args.seed)

    padded = data(micro_batch_size=args.micro_batch_size)
    packed = data(micro_batch_size=args.real_rows, packing=True)
    items = {i: padded.train[i] for i in range(len(padded.train))}
    return model, padded, packed, items


def padded_batches(samples: list[dict], mbs: int, seed: int) -> list[list[int]]:
    """The engine's unpacked plan: a seeded order cut into micro-batches of `mbs` samples."""
    from arctic_vl.data.sampling import EpochBatchSampler

    return [step[0] for step in EpochBatchSampler.plan(len(samples), mbs, 1, seed, 0, True)]


def packed_batches(samples: list[dict], max_length: int, mbs: int, seed: int
                   ) -> tuple[list[list[tuple[int, int]]], Any]:
    from arctic_vl.data.sampling import PackingPlanner

    planner = PackingPlanner([len(s["input_ids"]) for s in samples], max_length, mbs, seed)
    return [step[0] for step in planner(0, 1)], planner


def run_side(model: torch.nn.Module, batches: list[Any], make_batch: Any) -> tuple[float, int, float]:
    """(wall seconds, real tokens, CPU seconds of this process) for collate + forward + backward over `batches`."""
    from arctic_vl import final_hidden, lm_loss_sum

    tokens, start, cpu = 0, time.perf_counter(), time.process_time()
    for keys in batches:
        batch, n = make_batch(keys)
        hidden, head, _ = final_hidden(model, batch)
        loss, count = lm_loss_sum(hidden, head, batch["labels"])
        (loss / max(count, 1)).backward()
        tokens += n
    model.zero_grad(set_to_none=True)
    return time.perf_counter() - start, tokens, time.process_time() - cpu


def compare(name: str, model: torch.nn.Module, sides: dict[str, tuple[list[Any], Any]], tokens: int,
            args: argparse.Namespace) -> float:
    """Alternate the padded and packed passes for `args.rounds` rounds; print each round and the median ratio."""
    (pad_plan, padded), (pack_plan, packed) = sides["padding"], sides["packing"]
    for _ in range(args.warmup):
        run_side(model, pad_plan[:1], padded)
        run_side(model, pack_plan[:1], packed)
    ratios, cpu_ratios = [], []
    for r in range(args.rounds):
        t_pad, n_pad, c_pad = run_side(model, pad_plan, padded)
        t_pack, n_pack, c_pack = run_side(model, pack_plan, packed)
        assert n_pad == n_pack == tokens, (n_pad, n_pack, tokens)
        ratios.append(t_pad / t_pack)
        cpu_ratios.append(c_pad / c_pack)
        print(f"{name} round {r}: padding {n_pad / t_pad:,.0f} tok/s ({t_pad:.2f} s), packing "
              f"{n_pack / t_pack:,.0f} tok/s ({t_pack:.2f} s), ratio {ratios[-1]:.2f} (CPU-time ratio "
              f"{cpu_ratios[-1]:.2f})")
    ratio = statistics.median(ratios)
    print(f"{name}: ratio={ratio:.3f} (packing / padding real tokens per second; min {min(ratios):.3f}, median "
          f"{ratio:.3f}, max {max(ratios):.3f} of {len(ratios)} rounds; CPU-time ratio, robust to a loaded machine: "
          f"median {statistics.median(cpu_ratios):.3f})")
    return ratio


def skewed(args: argparse.Namespace) -> float:
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
    print(f"skewed mix: model {args.family}: {params / 1e6:.2f}M parameters, {args.layers} layers, hidden "
          f"{args.hidden}, attn {args.attn}, {args.threads} thread(s)")
    print(f"samples {stats['samples']} ({stats['tokens']} tokens): padding {len(pad_plan)} micro-batches of "
          f"{args.micro_batch_size}, efficiency {stats['unpacked_padding_efficiency']:.1%}; "
          f"packing {stats['rows']} rows "
          f"of <= {args.max_length} in {len(pack_plan)} micro-batches, efficiency {stats['efficiency']:.1%}")
    return compare("skewed", model, {"padding": (pad_plan, padded), "packing": (pack_plan, packed)},
                   stats["tokens"], args)


def realistic(args: argparse.Namespace) -> float:
    from arctic_vl.data.sampling import EpochBatchSampler

    with tempfile.TemporaryDirectory() as tmp:
        model, pad_data, pack_data, items = realistic_side(args, Path(tmp))
    model.train()
    lengths = pad_data.train.lengths
    longest = max(lengths)
    if longest > args.real_max_length:
        raise SystemExit(f"--real-max-length {args.real_max_length} is below the longest sample ({longest})")

    def padded(keys: list[int]) -> tuple[dict, int]:
        batch = pad_data.collate([dict(items[i]) for i in keys])
        return batch, batch["_num_tokens"]

    def packed(keys: list[tuple[int, int]]) -> tuple[dict, int]:
        batch = pack_data.collate([{**items[i], "_row": r} for r, i in keys])
        return batch, batch["_num_tokens"]

    pad_plan = [step[0] for step in EpochBatchSampler.plan(len(lengths), args.micro_batch_size, 1, args.seed, 0, True)]
    pack_plan = [step[0] for step in pack_data.batcher(0, 1)]
    stats = pack_data.batcher.stats(0)
    pad_eff = sum(lengths) / sum(len(k) * max(lengths[i] for i in k) for k in pad_plan)
    params = sum(p.numel() for p in model.parameters())
    print(f"realistic mix: shapes data ({'+'.join(map(str, args.real_questions))} questions per image record), "
          f"recipe model llava_next {params / 1e6:.2f}M parameters (vision frozen), attn {args.attn}, "
          f"{args.threads} thread(s)")
    print(f"samples {len(lengths)} ({sum(lengths)} tokens, {min(lengths)}-{longest} each): padding {len(pad_plan)} "
          f"micro-batches of {args.micro_batch_size}, efficiency {pad_eff:.1%}; packing {stats['rows']} rows of <= "
          f"{args.real_max_length} in {len(pack_plan)} micro-batches of {args.real_rows}, efficiency "
          f"{stats['efficiency']:.1%}")
    return compare("realistic", model, {"padding": (pad_plan, padded), "packing": (pack_plan, packed)},
                   sum(lengths), args)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    torch.set_num_threads(args.threads)
    if args.mix != "realistic" and args.long[1] > args.max_length:
        print(f"--max-length {args.max_length} must be >= the longest sample ({args.long[1]})", file=sys.stderr)
        return 2
    ratios = {}
    if args.mix in ("both", "realistic"):
        ratios["realistic"] = realistic(args)
    if args.mix in ("both", "skewed"):
        ratios["skewed"] = skewed(args)
    low = {k: v for k, v in ratios.items() if args.min_ratio is not None and v < args.min_ratio}
    if low:
        print(f"below --min-ratio {args.min_ratio}: {low}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
