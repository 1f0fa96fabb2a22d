"""One-shot GPU figures: bf16 step time and MFU of two model families, packed vs padded, peak memory, ZeRO-3.

Two families (``qwen2_vl`` and ``llava``: LLaVA-1.5's fixed tokens per image) are built from config with random
weights at a ~0.5B layout by default (text 20 x 1024, 16 heads, 4 KV heads, MLP 4096, vocab 32k; vision 12 x
768), and train the same image+text samples (lengths drawn once from ``--lengths``, one image each) in turn:

* ``padded``: micro-batches of ``--micro-batch-size`` samples, right-padded (``arctic_vl.data.collate.pad_collate``);
* ``packed``: samples packed first-fit into rows of ``--max-length`` tokens, one row a micro-batch
  (``pack_collate``: per-sample positions, Qwen's per-sample mRoPE); flash-attention varlen when ``flash_attn``
  imports on a GPU, else sdpa (transformers' block-diagonal mask from the position restarts).

A step is forward + backward (the ``sft`` trainer's memory-lean loss) over every micro-batch of the sample set and
one AdamW step, under bf16 autocast. FLOPs per step are ``arctic_vl.models.flops`` (docs/flops.md); MFU divides
them by the step time and the device's peak (the table of known GPUs, else a matmul probe). Then per family:
peak memory of one packed step of ``--mem-tokens`` tokens (8k; CUDA only) and, with deepspeed importable on a GPU,
the packed step under 1-GPU ZeRO-3. What cannot run here (no GPU, no flash_attn, no deepspeed) is printed as
skipped, never a crash. Prints a line per family and side, then ``<family>: packed/padded time=... mfu=...``.

    python bench/gpu.py                      # on a GPU: the ~0.5B layout (a few minutes)
    python bench/gpu.py --toy                # any machine: toy size (seconds)
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # a checkout without arctic_vl installed

TOY = {"layers": 1, "hidden": 32, "heads": 2, "kv_heads": 1, "intermediate": 64, "vision_layers": 1,
       "vision_hidden": 32, "vocab": 1024, "image_size": 56, "samples": 6, "lengths": (20, 60), "max_length": 160,
       "micro_batch_size": 2, "steps": 1, "warmup": 0, "mem_tokens": 256}


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    """The command line (``--toy`` replaces the layout and sizes with the smoke test's)."""
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--families", nargs="+", default=["qwen2_vl", "llava"], choices=["qwen2_vl", "llava"])
    p.add_argument("--layers", type=int, default=20)
    p.add_argument("--hidden", type=int, default=1024)
    p.add_argument("--heads", type=int, default=16)
    p.add_argument("--kv-heads", type=int, default=4)
    p.add_argument("--intermediate", type=int, default=4096)
    p.add_argument("--vision-layers", type=int, default=12)
    p.add_argument("--vision-hidden", type=int, default=768)
    p.add_argument("--vocab", type=int, default=32000)
    p.add_argument("--image-size", type=int, default=336, help="pixels per image side (Qwen: 24 x 24 patches)")
    p.add_argument("--samples", type=int, default=32, help="samples per step (the same set on both sides)")
    p.add_argument("--lengths", type=int, nargs=2, default=(256, 2048), metavar=("MIN", "MAX"),
                   help="text tokens per sample (plus its image's tokens)")
    p.add_argument("--max-length", type=int, default=8192, help="tokens per packed row")
    p.add_argument("--micro-batch-size", type=int, default=4, help="samples per padded micro-batch")
    p.add_argument("--steps", type=int, default=3, help="timed steps per side")
    p.add_argument("--warmup", type=int, default=1, help="untimed steps per side first")
    p.add_argument("--mem-tokens", type=int, default=8192, help="tokens of the peak-memory step (one packed row)")
    p.add_argument("--device", default="auto", help="auto | cuda | cpu")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--toy", action="store_true", help="toy layout and sizes (the smoke test; any device)")
    args = p.parse_args(argv)
    if args.toy:
        for k, v in TOY.items():
            setattr(args, k, v)
    if args.device == "auto":
        args.device = "cuda" if torch.cuda.is_available() else "cpu"
    return args


def build(family: str, args: argparse.Namespace, attn: str) -> tuple[torch.nn.Module, Any, Any]:
    """(model with random weights on the device, its FamilySpec, its config) at the requested layout."""
    from transformers import AutoModelForImageTextToText

    from arctic_vl.models.families import get_family
    from arctic_vl.models.tiny import tiny_config

    spec = get_family(family)
    shape: dict[str, Any] = {"text_layers": args.layers, "hidden": args.hidden, "heads": args.heads,
                             "kv_heads": args.kv_heads, "intermediate": args.intermediate,
                             "vision_layers": args.vision_layers, "vision_hidden": args.vision_hidden,
                             "vocab_size": args.vocab}
    if family == "llava":
        shape.update(image_size=args.image_size, patch_size=14)  # LLaVA-1.5's CLIP-L/14: 576 tokens at 336
    config = tiny_config(family, **shape)
    torch.manual_seed(args.seed)
    model = AutoModelForImageTextToText.from_config(config, attn_implementation=attn)
    return model.to(args.device).train(), spec, config


def make_samples(family: str, config: Any, args: argparse.Namespace) -> list[dict[str, torch.Tensor]]:
    """One image and a random-length text per sample: prompt (no labels), image tokens, answer (labels)."""
    g = torch.Generator().manual_seed(args.seed)
    specials = {v for k, v in config.to_dict().items()
                if k.endswith(("token_id", "token_index")) and isinstance(v, int)}
    if family == "qwen2_vl":
        v = config.vision_config
        side = max(2, args.image_size // v.patch_size // 2 * 2)  # even: the 2 x 2 merge
        image_tokens, image_id = side * side // 4, config.image_token_id
        pixel_dim = v.in_channels * v.temporal_patch_size * v.patch_size ** 2
    else:
        v = config.vision_config
        image_tokens, image_id = (v.image_size // v.patch_size) ** 2, config.image_token_index
    samples = []
    for _ in range(args.samples):
        n = int(torch.randint(args.lengths[0], args.lengths[1] + 1, (1,), generator=g))
        ids = torch.randint(3, config.get_text_config().vocab_size, (n,), generator=g)
        for s in specials:  # random text never forms a special token
            ids[ids == s] = 3 if s != 3 else 4
        cut = n // 2
        ids = torch.cat([ids[:cut], torch.full((image_tokens,), image_id), ids[cut:]])
        labels = ids.clone()
        labels[:cut + image_tokens] = -100
        sample = {"input_ids": ids, "labels": labels}
        if family == "qwen2_vl":
            sample["pixel_values"] = torch.randn(side * side, pixel_dim, generator=g)
            sample["image_grid_thw"] = torch.tensor([[1, side, side]])
        else:
            sample["pixel_values"] = torch.randn(1, 3, v.image_size, v.image_size, generator=g)
        samples.append(sample)
    return samples


def first_fit(samples: list[dict[str, torch.Tensor]], max_length: int) -> list[list[dict[str, torch.Tensor]]]:
    """Rows of at most `max_length` tokens, each sample in the first row it fits (in sample order)."""
    rows: list[list[dict[str, torch.Tensor]]] = []
    room: list[int] = []
    for s in samples:
        n = len(s["input_ids"])
        if n > max_length:
            raise SystemExit(f"a sample of {n} tokens does not fit --max-length {max_length}")
        at = next((i for i, r in enumerate(room) if r >= n), None)
        if at is None:
            rows.append([])
            room.append(max_length)
            at = len(rows) - 1
        rows[at].append(s)
        room[at] -= n
    return rows


def micro_batches(side: str, model: torch.nn.Module, spec: Any, config: Any, samples: list[dict[str, Any]],
                  args: argparse.Namespace) -> list[dict[str, Any]]:
    """The step's micro-batches on the device: padded groups of samples, or one packed row each."""
    from arctic_vl.data.collate import RopeIndex, pack_collate, pad_collate

    image_id = getattr(config, "image_token_id", None) or config.image_token_index
    encoder = SimpleNamespace(family=spec, pad_token_id=0, image_token_id=image_id)
    if side == "padded":
        groups = [samples[i:i + args.micro_batch_size] for i in range(0, len(samples), args.micro_batch_size)]
        batches = [(pad_collate(encoder, g), g) for g in groups]
    else:
        rope = RopeIndex(model) if spec.is_qwen else None
        batches = [(pack_collate(encoder, [row], rope), row) for row in first_fit(samples, args.max_length)]
    out = []
    for batch, group in batches:
        batch = {k: v.to(args.device) for k, v in batch.items()}
        batch["_num_tokens"] = int(sum(len(s["input_ids"]) for s in group))
        out.append(batch)
    return out


def train_step(model: torch.nn.Module, optimizer: Any, batches: list[dict[str, Any]], args: argparse.Namespace,
               engine: Any = None) -> float:
    """Forward + backward over every micro-batch and one optimizer step (bf16 autocast); the summed loss."""
    from arctic_vl.models.forward import final_hidden
    from arctic_vl.trainers.loss import lm_loss_sum

    total = 0.0
    for batch in batches:
        with torch.autocast(args.device, dtype=torch.bfloat16):
            hidden, head, _ = final_hidden(engine.module if engine is not None else model, batch)
            loss, n = lm_loss_sum(hidden, head, batch["labels"], 2048)
        loss = loss / max(n, 1)
        if engine is not None:  # DeepSpeed steps after every micro-batch, updating at the accumulation boundary
            engine.backward(loss)
            engine.step()
        else:
            loss.backward()
        total += float(loss.detach())
    if engine is None:
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
    return total


def sync(device: str) -> None:
    """Wait for the device's queued work (timings on CUDA)."""
    if device == "cuda":
        torch.cuda.synchronize()


def timed(model: torch.nn.Module, optimizer: Any, batches: list[dict[str, Any]], args: argparse.Namespace,
          engine: Any = None) -> float:
    """Median seconds per step over `--steps` after `--warmup`."""
    for _ in range(args.warmup):
        train_step(model, optimizer, batches, args, engine)
    times = []
    for _ in range(args.steps):
        sync(args.device)
        t0 = time.perf_counter()
        train_step(model, optimizer, batches, args, engine)
        sync(args.device)
        times.append(time.perf_counter() - t0)
    return sorted(times)[len(times) // 2]


def zero3(family: str, args: argparse.Namespace, attn: str, samples: list[dict[str, Any]], meter: Any) -> str:
    """The packed step under DeepSpeed ZeRO-3 on this one GPU: its time and MFU, or why it was skipped."""
    if args.device != "cuda":
        return "skipped (needs a GPU)"
    try:
        import deepspeed
    except ImportError:
        return "skipped (deepspeed does not import)"
    os.environ.setdefault("MASTER_ADDR", "127.0.0.1")
    os.environ.setdefault("MASTER_PORT", "29517")
    os.environ.setdefault("RANK", "0")
    os.environ.setdefault("LOCAL_RANK", "0")
    os.environ.setdefault("WORLD_SIZE", "1")
    try:
        model, spec, config = build(family, args, attn)
        batches = micro_batches("packed", model, spec, config, samples, args)
        flops = sum(meter.batch_flops(b).total for b in batches)  # the weights' sizes are read before partitioning
        ds = {"train_micro_batch_size_per_gpu": 1, "gradient_accumulation_steps": len(batches),
              "bf16": {"enabled": False},
              "zero_optimization": {"stage": 3}, "optimizer": {"type": "AdamW", "params": {"lr": 1e-5}},
              "gradient_clipping": 0.0}
        engine, *_ = deepspeed.initialize(model=model, model_parameters=model.parameters(), config=ds)
        t = timed(model, None, batches, args, engine)
        peak = meter_peak(args)
        result = f"step {t * 1e3:.1f} ms, mfu {flops / t / peak / 1e12:.3f}"
        del engine, model
        return result
    except Exception as e:  # the figure is optional: say why it is missing, keep the others
        return f"failed ({type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''})"


_PEAK: dict[str, float] = {}


def meter_peak(args: argparse.Namespace) -> float:
    """The device's peak TFLOPS (table or bf16 matmul probe), measured once."""
    from arctic_vl.models.flops import device_peak_tflops

    if "peak" not in _PEAK:
        _PEAK["peak"], source = device_peak_tflops(torch.device(args.device), torch.bfloat16)
        print(f"device {args.device}: peak {_PEAK['peak']:.3g} TFLOPS bf16 ({source})", flush=True)
    return _PEAK["peak"]


def run_family(family: str, args: argparse.Namespace, flash: bool) -> None:
    """Both sides of one family, its peak memory step and its ZeRO-3 step; prints their lines."""
    from arctic_vl.models.families import part_of
    from arctic_vl.models.flops import FlopsModel

    peak = meter_peak(args)
    results = {}
    for side in ("padded", "packed"):
        attn = "flash_attention_2" if side == "packed" and flash else "sdpa"
        model, spec, config = build(family, args, attn)
        meter = FlopsModel.from_model(model, lambda n, spec=spec: part_of(spec, n), spec)
        samples = make_samples(family, config, args)
        batches = micro_batches(side, model, spec, config, samples, args)
        flops = [meter.batch_flops(b) for b in batches]
        total = sum(f.total for f in flops)
        optimizer = torch.optim.AdamW(model.parameters(), lr=1e-5)
        t = timed(model, optimizer, batches, args)
        tokens = sum(b["_num_tokens"] for b in batches)
        slots = sum(b["input_ids"].numel() for b in batches)
        mfu = total / t / peak / 1e12
        results[side] = (t, mfu)
        params = sum(p.numel() for p in model.parameters())
        print(f"{family} {side} ({attn}): {params / 1e6:.1f}M params, {len(batches)} micro-batches, {tokens} tokens "
              f"in {slots} slots ({tokens / slots:.1%}), step {t * 1e3:.1f} ms, {tokens / t:.0f} tokens/s, "
              f"{total / 1e12:.4g} TFLOPs/step (vision {sum(f.vision for f in flops) / total:.1%}), mfu {mfu:.3f}",
              flush=True)
        if side == "packed":
            memory = peak_memory(model, optimizer, spec, config, args)
            print(f"{family} peak memory at {args.mem_tokens} tokens: {memory}", flush=True)
            print(f"{family} zero3 (1 GPU, packed): {zero3(family, args, attn, samples, meter)}", flush=True)
        del model, optimizer, batches
        if args.device == "cuda":
            torch.cuda.empty_cache()
    (tp, mp), (tq, mq) = results["padded"], results["packed"]
    print(f"{family}: packed/padded time={tq / tp:.3f} speed={tp / tq:.3f} mfu={mq / max(mp, 1e-12):.3f}", flush=True)


def peak_memory(model: torch.nn.Module, optimizer: Any, spec: Any, config: Any, args: argparse.Namespace) -> str:
    """Peak allocated GiB of one packed step of `--mem-tokens` tokens (CUDA), or why it is not measured."""
    if args.device != "cuda":
        return "skipped (CUDA only: torch.cuda.max_memory_allocated)"
    one = argparse.Namespace(**{**vars(args), "samples": 1, "lengths": (args.mem_tokens, args.mem_tokens)})
    sample = make_samples(spec.name, config, one)[0]
    extra = len(sample["input_ids"]) - args.mem_tokens  # the image's tokens: trim text to hit the figure
    keep = torch.ones(len(sample["input_ids"]), dtype=torch.bool)
    keep[len(keep) - extra:] = False
    sample = {**sample, "input_ids": sample["input_ids"][keep], "labels": sample["labels"][keep]}
    batches = micro_batches("packed", model, spec, config, [sample], one)
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    train_step(model, optimizer, batches, args)
    torch.cuda.synchronize()
    return f"{torch.cuda.max_memory_allocated() / 2 ** 30:.2f} GiB"


def main(argv: list[str] | None = None) -> int:
    """Run every family; report what was skipped."""
    args = parse_args(argv)
    torch.set_num_threads(max(1, int(os.environ.get("OMP_NUM_THREADS", "1"))))
    flash = False
    if args.device == "cuda":
        try:
            import flash_attn  # noqa: F401

            flash = True
        except ImportError:
            print("flash_attn does not import: packed runs use sdpa (block-diagonal mask)", flush=True)
    else:
        print(f"device {args.device}: no GPU; flash-attention, peak memory and ZeRO-3 are skipped", flush=True)
    for family in args.families:
        run_family(family, args, flash)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
