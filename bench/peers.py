"""arctic-vl vs transformers.Trainer: the same tiny model trained on the same data in the same order.

Every side starts from the same saved checkpoint (the shapes recipe's tiny LLaVA-NeXT,
configs/shapes-llava-cpu.yaml) and trains on the same shapes records (`bench/packing.py`'s realistic mix), with
the same settings: AdamW (lr, betas, eps; no weight decay), constant LR, no warm-up, gradient clipping at 1.0,
fp32, one process, ``--threads`` torch threads, ``--workers`` DataLoader workers, no evaluation, no checkpoint
until the end.

* ``hf``: `transformers.Trainer` on the HF model class loaded with `from_pretrained` (sdpa), its full-logits
  loss, `train_sampling_strategy="sequential"` (a SequentialSampler) over the engine's encoded dataset, batches
  made by the engine's padding collator: the same tokens, the same masked labels, the same order.
* ``padded``: `arctic_vl.Engine` with `data.shuffle: false` (micro-batches in dataset order: the same batches as
  the HF side, so the final losses must agree to 4 decimals).
* ``packed``: the same with `data.packing: true`, ``--pack-rows`` rows of ``--pack-length`` tokens a micro-batch
  (other batches, so another loss trajectory; same samples per epoch).
* ``padded_compiled`` / ``packed_compiled``: the same with `trainer.compile: true` (the first steps compile: they
  fall in the untimed warm-up; raise ``--warmup`` if a cold compile cache makes later steps recompile).

Throughput is timed the same way on every side: wall time from the end of step ``--warmup`` to the end of the
last step (a step-end callback on both sides), so start-up, the first steps and the final save are excluded.
Real tokens are the non-padding tokens of the timed steps' samples. The process's CPU time (every thread: the
prefetch thread counts) is taken over the same window: samples per CPU second is the cost of a side that other
processes on a shared machine do not inflate. Sides alternate within each round (the order rotates); the median
of the rounds is reported with min and max, and the ratios to the HF side: of the medians, and the median of the
per-round ratios (wall and CPU time).

    python bench/peers.py                              # 256 records, batch 8, 3 rounds (a few minutes)
    python bench/peers.py --samples 24 --micro-batch-size 4 --rounds 1 --warmup 1 --pack-length 256 \
        --sides hf padded packed                       # smoke (no compile)
"""

from __future__ import annotations

import argparse
import json
import math
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # a checkout without arctic_vl installed

SIDES = ("hf", "padded", "packed", "padded_compiled", "packed_compiled")


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--samples", type=int, default=256, help="training records (one epoch is trained)")
    p.add_argument("--questions", type=int, nargs="+", default=[1, 3], help="question turns per image record, mixed")
    p.add_argument("--micro-batch-size", type=int, default=8, help="samples per step (hf, padded)")
    p.add_argument("--max-length", type=int, default=1024, help="data.max_length (no sample is cut at the default)")
    p.add_argument("--pack-length", type=int, default=1024, help="packed: tokens per row")
    p.add_argument("--pack-rows", type=int, default=1, help="packed: rows per step")
    p.add_argument("--lr", type=float, default=1e-3)
    p.add_argument("--warmup", type=int, default=3, help="untimed steps at the start of each run")
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--threads", type=int, default=1, help="torch threads (every side)")
    p.add_argument("--workers", type=int, default=0, help="DataLoader workers (every side)")
    p.add_argument("--sides", nargs="+", choices=SIDES, default=list(SIDES))
    p.add_argument("--seed", type=int, default=0)
    return p.parse_args(argv)


class StepClock:
    """Wall time and this process's CPU time (all its threads) at the end of every optimizer step (the same
    measurement on every side). CPU time is what a side costs even when other processes share the cores."""

    def __init__(self) -> None:
        self.ends: list[tuple[float, float]] = []

    def tick(self) -> None:
        self.ends.append((time.perf_counter(), time.process_time()))

    def window(self, warmup: int) -> tuple[float, float]:
        """(wall seconds, CPU seconds) from the end of step `warmup` to the end of the last step."""
        if len(self.ends) <= warmup:
            raise SystemExit(f"only {len(self.ends)} steps ran; lower --warmup ({warmup}) or raise --samples")
        first, last = self.ends[max(warmup - 1, 0)], self.ends[-1]
        return last[0] - first[0], last[1] - first[1]


CLOCK = StepClock()


def _register_clock() -> str:
    from arctic_vl import CALLBACKS, Callback

    if "bench_step_clock" not in CALLBACKS.names():
        @CALLBACKS.register("bench_step_clock")
        class _Clock(Callback):
            def on_step_end(self, trainer: Any, info: Any) -> None:
                CLOCK.tick()

    return "bench_step_clock"


def arctic_side(root: Path, model_dir: Path, sources: list[str], args: argparse.Namespace, packed: bool,
                compiled: bool = False) -> dict:
    """One arctic-vl run; (seconds, samples, real tokens) of the timed steps and the final loss."""
    from arctic_vl import Engine

    out = root / f"run-{'packed' if packed else 'padded'}-{time.monotonic_ns()}"
    data: dict[str, Any] = {"sources": sources, "max_length": args.max_length, "shuffle": False,
                            "num_workers": args.workers, "micro_batch_size": args.micro_batch_size}
    if packed:
        data.update(packing=True, max_length=args.pack_length, micro_batch_size=args.pack_rows)
    config = {
        "model": {"name_or_path": str(model_dir)},
        "data": data,
        "trainer": {"output_dir": str(out), "epochs": 1, "seed": args.seed, "progress_bar": False,
                    "log_every_n_steps": 10_000, "max_grad_norm": 1.0, "nan_guard": {"enabled": False},
                    "compile": compiled},
        "optimizer": {"type": "adamw", "lr": args.lr, "weight_decay": 0.0},
        "scheduler": {"type": "constant"},
        "checkpoint": {"every_n_steps": None, "export_final": False},
        "callbacks": [{"type": _register_clock()}],
    }
    CLOCK.ends.clear()
    summary = Engine(config).train()
    metrics = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    timed = metrics[args.warmup:]
    seconds, cpu = CLOCK.window(args.warmup)
    return {"seconds": seconds, "cpu_seconds": cpu, "samples": sum(m["samples"] for m in timed),
            "tokens": sum(m["tokens"] for m in timed), "final_loss": summary["final_loss"], "steps": len(metrics)}


def hf_side(root: Path, model_dir: Path, dataset: Any, collate: Any, args: argparse.Namespace) -> dict:
    """One transformers.Trainer run over the same dataset in dataset order."""
    import transformers
    from transformers import PrinterCallback, Trainer, TrainerCallback, TrainingArguments

    model = transformers.LlavaNextForConditionalGeneration.from_pretrained(model_dir, attn_implementation="sdpa")

    class Items(torch.utils.data.Dataset):
        def __len__(self) -> int:
            return len(dataset)

        def __getitem__(self, i: int) -> dict[str, Any]:
            return dataset[i]

    def hf_collate(samples: list[dict[str, Any]]) -> dict[str, Any]:
        batch = collate(samples)
        return {k: v for k, v in batch.items() if not k.startswith("_")}

    class Clock(TrainerCallback):
        def on_step_end(self, *a: Any, **kw: Any) -> None:
            CLOCK.tick()

    steps = math.ceil(len(dataset) / args.micro_batch_size)
    training = TrainingArguments(
        output_dir=str(root / f"hf-{time.monotonic_ns()}"), per_device_train_batch_size=args.micro_batch_size,
        max_steps=steps, learning_rate=args.lr, weight_decay=0.0, adam_beta1=0.9, adam_beta2=0.999,
        adam_epsilon=1e-8, optim="adamw_torch", lr_scheduler_type="constant", warmup_steps=0, max_grad_norm=1.0,
        logging_steps=1, save_strategy="no", report_to=[], use_cpu=True, dataloader_num_workers=args.workers,
        seed=args.seed, train_sampling_strategy="sequential", remove_unused_columns=False, disable_tqdm=True,
    )
    CLOCK.ends.clear()
    trainer = Trainer(model=model, args=training, train_dataset=Items(), data_collator=hf_collate,
                      callbacks=[Clock()])
    trainer.remove_callback(PrinterCallback)  # console printing is not what is compared (arctic-vl logs nothing)
    trainer.train()
    losses = [e["loss"] for e in trainer.state.log_history if "loss" in e]
    lengths = dataset.lengths
    timed = range(args.warmup * args.micro_batch_size, min(len(dataset), steps * args.micro_batch_size))
    seconds, cpu = CLOCK.window(args.warmup)
    return {"seconds": seconds, "cpu_seconds": cpu, "samples": len(timed), "tokens": sum(lengths[i] for i in timed),
            "final_loss": losses[-1], "steps": len(losses)}


def shared_data(root: Path, model_dir: Path, sources: list[str], args: argparse.Namespace) -> tuple[Any, Any]:
    """The engine's encoded training set and padding collator (what the HF side trains on)."""
    from arctic_vl.data.factory import VLMDataConfig, VLMDataFactory
    from arctic_vl.models.base import ModelBundle
    from arctic_vl.models.loading import family_of_dir, load_processor

    bundle = ModelBundle(None, load_processor(model_dir), family_of_dir(model_dir))
    cfg = VLMDataConfig(sources=sources, max_length=args.max_length, micro_batch_size=args.micro_batch_size,
                        shuffle=False)
    data = VLMDataFactory(cfg).build(bundle, seed=args.seed)
    return data.train, data.collate


def main(argv: list[str] | None = None) -> dict[str, Any]:
    args = parse_args(argv)
    torch.set_num_threads(args.threads)
    from transformers.utils import logging as hf_logging

    from arctic_vl.models.tiny import make_tiny_model
    from bench.common import recipe_shape, shapes_sources

    hf_logging.set_verbosity_error()
    root = Path(tempfile.mkdtemp(prefix="bench-peers-"))
    model_dir = make_tiny_model("llava_next", root / "model", seed=args.seed, **recipe_shape())
    sources = shapes_sources(root, args.samples, args.questions, args.seed)
    dataset, collate = shared_data(root, model_dir, sources, args)
    print(f"{len(dataset)} records ({sum(dataset.lengths)} tokens, {min(dataset.lengths)}-{max(dataset.lengths)} "
          f"each), micro-batch {args.micro_batch_size}, packed {args.pack_rows} x {args.pack_length}, "
          f"{args.threads} thread(s), {args.workers} worker(s), timed after step {args.warmup}")
    runs: dict[str, list[dict]] = {s: [] for s in args.sides}
    for r in range(args.rounds):
        order = args.sides[r % len(args.sides):] + args.sides[:r % len(args.sides)]
        for side in order:
            if side == "hf":
                res = hf_side(root, model_dir, dataset, collate, args)
            else:
                res = arctic_side(root, model_dir, sources, args, packed=side.startswith("packed"),
                                  compiled=side.endswith("_compiled"))
            res["samples_per_s"], res["tokens_per_s"] = res["samples"] / res["seconds"], res["tokens"] / res["seconds"]
            res["samples_per_cpu_s"] = res["samples"] / res["cpu_seconds"]
            runs[side].append(res)
            print(f"round {r} {side:>15}: {res['steps']} steps, {res['samples_per_s']:.1f} samples/s, "
                  f"{res['tokens_per_s']:,.0f} real tokens/s, {res['samples_per_cpu_s']:.1f} samples per CPU "
                  f"second, final loss {res['final_loss']:.6f}")
    summary: dict[str, Any] = {}
    for side, rs in runs.items():
        sps = [x["samples_per_s"] for x in rs]
        tps = [x["tokens_per_s"] for x in rs]
        summary[side] = {"samples_per_s": statistics.median(sps), "tokens_per_s": statistics.median(tps),
                         "final_loss": rs[-1]["final_loss"], "min": min(sps), "max": max(sps)}
        print(f"{side:>15}: samples/s median {statistics.median(sps):.1f} (min {min(sps):.1f}, max {max(sps):.1f}), "
              f"real tokens/s {statistics.median(tps):,.0f}, final loss {rs[-1]['final_loss']:.6f}")
    if "hf" in summary:
        base = summary["hf"]
        for side in summary:
            if side == "hf":
                continue
            # Ratios within a round (the two runs back to back, under the same load), then their median.
            walls = [o["samples_per_s"] / h["samples_per_s"] for o, h in zip(runs[side], runs["hf"], strict=True)]
            cpus = [o["samples_per_cpu_s"] / h["samples_per_cpu_s"]
                    for o, h in zip(runs[side], runs["hf"], strict=True)]
            summary[side]["ratio"], summary[side]["cpu_ratio"] = statistics.median(walls), statistics.median(cpus)
            print(f"{side}/hf: samples/s ratio={summary[side]['samples_per_s'] / base['samples_per_s']:.3f}, "
                  f"real tokens/s ratio={summary[side]['tokens_per_s'] / base['tokens_per_s']:.3f} (medians); per "
                  f"round: median {statistics.median(walls):.3f} (min {min(walls):.3f}, max {max(walls):.3f}); "
                  f"CPU-time ratio (samples per CPU second, robust to a loaded machine): median "
                  f"{statistics.median(cpus):.3f} (min {min(cpus):.3f}, max {max(cpus):.3f})")
        if "padded" in summary:
            diff = abs(summary["padded"]["final_loss"] - base["final_loss"])
            print(f"final loss padded {summary['padded']['final_loss']:.6f} vs hf {base['final_loss']:.6f}: "
                  f"|diff| {diff:.2e} ({'equal' if diff < 5e-5 else 'NOT equal'} to 4 decimals)")
    return summary


if __name__ == "__main__":
    main()
