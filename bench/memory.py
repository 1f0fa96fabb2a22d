"""Peak memory of one training step (forward + backward): memory-lean LM loss vs the full-logits path.

Both sides run the same tiny LLaVA-NeXT language path with a large vocabulary (150k by default, like
Qwen) on the same text batch, in turn, each in its own fresh subprocess:

* ``full``: ``model(**batch).logits`` (every position, whole vocabulary) then cross entropy at the label
  positions: the standard path;
* ``lean``: what the ``sft`` trainer does (``arctic_vl.trainers.loss``): final hidden states, the output
  layer applied at label positions only, in chunks whose logits are recomputed in backward.

Measuring on CPU: torch's allocations are invisible to tracemalloc, so each side reads the process's
resident-set high-water mark (VmHWM), reset just before the measured step (``/proc/self/clear_refs``).
``MALLOC_MMAP_THRESHOLD_`` is fixed so that large tensors are mmapped and freed back at once, making
RSS follow live tensor memory. One warm-up step runs first (one-time allocations are not the loss's).
With ``--device cuda`` the peak is ``torch.cuda.max_memory_allocated`` instead.

    python bench/memory.py                                           # 150k vocab, 2048 tokens, chunks 256 and 2048
    python bench/memory.py --vocab 4096 --tokens 128 --chunk 32 64   # smoke size

The lean side runs at every ``--chunk`` (default: 256 and the trainer's default `trainer.loss_chunk_size`, what a
run gets unless it sets one). Prints each side's peak (MiB above the state before the step), its loss, and
``chunk N: ratio=lean/full`` per chunk size.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Any

MiB = 1024 * 1024


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--vocab", type=int, default=150_000, help="vocabulary size (output layer rows)")
    p.add_argument("--tokens", type=int, default=2048, help="sequence length (one sequence)")
    p.add_argument("--label-frac", type=float, default=0.5,
                   help="fraction of positions with a label (the assistant's answer; the rest is prompt)")
    p.add_argument("--chunk", type=int, nargs="+", default=None,
                   help="label positions per output-layer chunk (trainer.loss_chunk_size); default: 256 and the "
                   "trainer's default")
    p.add_argument("--hidden", type=int, default=64)
    p.add_argument("--layers", type=int, default=2)
    p.add_argument("--device", choices=["cpu", "cuda"], default="cpu")
    p.add_argument("--side", choices=["full", "lean"], default=None, help=argparse.SUPPRESS)  # child mode
    return p.parse_args(argv)


# --------------------------------------------------------------------------------------------- one side
def _rss_hwm_bytes() -> int:
    with open("/proc/self/status") as fh:
        for line in fh:
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) * 1024
    raise RuntimeError("no VmHWM in /proc/self/status")


def _rss_bytes() -> int:
    with open("/proc/self/statm") as fh:
        return int(fh.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def _reset_hwm() -> None:
    with open("/proc/self/clear_refs", "w") as fh:
        fh.write("5")  # 5: reset the peak RSS (VmHWM) to the current RSS


def build(args: argparse.Namespace) -> tuple[Any, dict[str, Any]]:
    """The tiny model with `args.vocab` rows and a text batch whose last `label_frac` positions are labels."""
    import torch
    from transformers import AutoModelForImageTextToText

    from arctic_vl.models.tiny import tiny_config

    config = tiny_config("llava_next", text_layers=args.layers, hidden=args.hidden, intermediate=2 * args.hidden,
                         vocab_size=args.vocab)
    torch.manual_seed(0)
    model = AutoModelForImageTextToText.from_config(config).to(args.device)
    g = torch.Generator().manual_seed(1)
    ids = torch.randint(10, args.vocab, (1, args.tokens), generator=g)
    labels = ids.clone()
    labels[:, : int(args.tokens * (1 - args.label_frac))] = -100
    batch = {"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": labels}
    return model, {k: v.to(args.device) for k, v in batch.items()}


def step(model: Any, batch: dict[str, Any], side: str, chunk: int) -> float:
    """One forward + backward; returns the mean loss over label tokens."""
    import torch.nn.functional as F

    from arctic_vl import IGNORE_INDEX, final_hidden, lm_loss_sum

    labels = batch["labels"]
    if side == "full":
        logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
        loss_sum = F.cross_entropy(logits[:, :-1].flatten(0, 1).float(), labels[:, 1:].flatten(),
                                   ignore_index=IGNORE_INDEX, reduction="sum")
        n = int((labels[:, 1:] != IGNORE_INDEX).sum())
    else:
        hidden, head, _ = final_hidden(model, batch)
        loss_sum, n = lm_loss_sum(hidden, head, labels, chunk)
    loss = loss_sum / n
    loss.backward()
    return float(loss.detach())


def run_side(args: argparse.Namespace) -> dict[str, Any]:
    import gc

    import torch

    torch.set_num_threads(1)
    model, batch = build(args)
    step(model, batch, args.side, args.chunk)  # warm-up: one-time allocations (autograd, thread pools)
    model.zero_grad(set_to_none=True)
    gc.collect()
    if args.device == "cuda":
        torch.cuda.synchronize()
        before = torch.cuda.memory_allocated()
        torch.cuda.reset_peak_memory_stats()
        loss = step(model, batch, args.side, args.chunk)
        torch.cuda.synchronize()
        peak = torch.cuda.max_memory_allocated() - before
    else:
        before = _rss_bytes()
        _reset_hwm()
        loss = step(model, batch, args.side, args.chunk)
        peak = _rss_hwm_bytes() - before
    return {"side": args.side, "peak_mib": peak / MiB, "loss": loss}


# -------------------------------------------------------------------------------------------- both sides
def default_chunk() -> int:
    """`trainer.loss_chunk_size` when a config does not set it."""
    from arctic_vl.trainers.base import TrainerConfig

    return int(TrainerConfig.model_fields["loss_chunk_size"].default)


def child_argv(args: argparse.Namespace, side: str, chunk: int) -> list[str]:
    return [sys.executable, str(Path(__file__).resolve()), "--side", side, "--vocab", str(args.vocab),
            "--tokens", str(args.tokens), "--label-frac", str(args.label_frac), "--chunk", str(chunk),
            "--hidden", str(args.hidden), "--layers", str(args.layers), "--device", args.device]


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if args.side is not None:
        args.chunk = args.chunk[0]
        print(json.dumps(run_side(args)))
        return 0
    chunks = args.chunk or sorted({256, default_chunk()})
    env = {**os.environ, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1", "TOKENIZERS_PARALLELISM": "false",
           # a fixed mmap threshold: big tensors come from (and go back to) the OS directly, so RSS is live memory
           "MALLOC_MMAP_THRESHOLD_": str(128 * 1024), "MALLOC_TRIM_THRESHOLD_": str(128 * 1024)}
    results = {}
    with tempfile.TemporaryDirectory() as cwd:
        for side, chunk in [("full", chunks[0]), *(("lean", c) for c in chunks)]:
            proc = subprocess.run(child_argv(args, side, chunk), capture_output=True, text=True, env=env, cwd=cwd)
            if proc.returncode != 0:
                print(proc.stderr[-3000:], file=sys.stderr)
                return 1
            results[(side, chunk)] = json.loads(proc.stdout.strip().splitlines()[-1])
    full = results[("full", chunks[0])]
    label_tokens = int(args.tokens * args.label_frac)
    print(f"vocab {args.vocab}, {args.tokens} tokens ({label_tokens} labelled), hidden {args.hidden}, "
          f"layers {args.layers}, device {args.device}")
    print(f"full logits + CE          : peak {full['peak_mib']:.2f} MiB  loss {full['loss']:.6f}")
    for c in chunks:
        lean = results[("lean", c)]
        note = " (trainer default)" if c == default_chunk() else ""
        print(f"lean (sft loss) chunk {c:>5}: peak {lean['peak_mib']:.2f} MiB  loss {lean['loss']:.6f}{note}")
    for c in chunks:
        ratio = results[("lean", c)]["peak_mib"] / max(full["peak_mib"], 1e-9)
        print(f"chunk {c}: ratio={ratio:.3f} (lean / full peak step memory)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
