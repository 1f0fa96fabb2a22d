"""Engine overhead: the engine's training loop against a bare PyTorch loop on the same batches.

Both sides train the same tiny LLaVA-NeXT (same initial weights) on the same synthetic batches, from
the same DataLoader pipeline. The bare loop is forward (HF loss), backward, AdamW step, zero_grad. The
engine side is `Engine(config).train()` with everything a user gets (token counting, loss
normalisation, metrics.jsonl, callbacks). After `--warmup` steps we time `--steps` steps on each side;
the sides alternate `--rounds` times and the median ratio engine/bare is printed.

    python bench/overhead.py                      # 20 warm-up + 200 timed steps, 3 rounds
    python bench/overhead.py --steps 5 --warmup 2 --rounds 1 --hidden 32   # smoke size
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch


def build(workdir: Path, args: argparse.Namespace) -> tuple[Path, Path]:
    from arctic_vl.data.synthetic import make_synthetic_data
    from arctic_vl.models.tiny import make_tiny_model

    data = workdir / "data"
    make_synthetic_data(data, n=max(64, 4 * args.batch), seed=0, heldout=50)
    model = make_tiny_model("llava_next", workdir / "model", seed=0, layers=args.layers, hidden=args.hidden,
                            intermediate=4 * args.hidden, heads=4, kv_heads=2)
    return data, model


def config(data: Path, model: Path, out: Path, args: argparse.Namespace) -> dict:
    return {
        "model": {"name_or_path": str(model)},
        "data": {"sources": [str(data / "train.llava.json")], "micro_batch_size": args.batch, "max_length": 512},
        "trainer": {"output_dir": str(out), "max_steps": args.warmup + args.steps, "progress_bar": False,
                    "max_grad_norm": None, "log_every_n_steps": 10**9, "seed": 0},
        "optimizer": {"lr": 1e-3},
        "scheduler": {"type": "constant"},
        "checkpoint": {"every_n_steps": None, "export_final": False},
        "callbacks": [{"type": "bench_clock", "start_step": args.warmup}],
    }


def register_clock() -> dict:
    """A callback that notes the time at the end of the warm-up and of the last step."""
    from arctic_vl.callbacks.base import Callback
    from arctic_vl.registry import CALLBACKS, ComponentConfig

    marks: dict = {}

    class ClockConfig(ComponentConfig):
        type: str = "bench_clock"
        start_step: int

    @CALLBACKS.register("bench_clock")
    class Clock(Callback):
        config_class = ClockConfig

        def on_step_end(self, trainer, info) -> None:
            if info.step == self.config.start_step:
                marks["start"] = time.perf_counter()
            marks["end"] = time.perf_counter()
            marks["steps"] = info.step - self.config.start_step

    return marks


def engine_run(cfg: dict, marks: dict) -> float:
    from arctic_vl.engine import Engine

    Engine(cfg).train()
    return (marks["end"] - marks["start"]) / marks["steps"]


def bare_run(cfg: dict, args: argparse.Namespace) -> float:
    """The same model, data pipeline and batches: forward, backward, AdamW step, zero_grad."""
    from arctic_vl.engine import Engine

    engine = Engine(cfg)
    trainer = engine._build()  # the same model factory, dataset and collator the engine uses
    model = trainer.bundle.model
    model.train()
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-3, weight_decay=0.0)
    batches = iter(trainer.loader(0, 0))
    start = None
    for step in range(args.warmup + args.steps):
        batch = next(batches, None)
        if batch is None:
            batches = iter(trainer.loader(step, 0))
            batch = next(batches)
        inputs = {k: v for k, v in batch.items() if not k.startswith("_")}
        loss = model(**inputs).loss
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        if step + 1 == args.warmup:
            start = time.perf_counter()
    return (time.perf_counter() - start) / args.steps


def main(argv: list[str] | None = None) -> float:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--steps", type=int, default=200)
    p.add_argument("--warmup", type=int, default=20)
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--batch", type=int, default=4)
    p.add_argument("--layers", type=int, default=4)
    p.add_argument("--hidden", type=int, default=128)
    p.add_argument("--threads", type=int, default=1)
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)
    marks = register_clock()
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        data, model = build(work, args)
        from arctic_vl.models.loading import load_model

        params = sum(p.numel() for p in load_model(model).parameters())
        print(f"model: tiny llava_next, {params / 1e6:.2f}M parameters; "
              f"{args.warmup} warm-up + {args.steps} timed steps, "
              f"micro-batch {args.batch}, {args.rounds} rounds")
        ratios = []
        for r in range(args.rounds):
            e = engine_run(config(data, model, work / f"engine{r}", args), marks)
            b = bare_run(config(data, model, work / f"bare{r}", args), args)
            ratios.append(e / b)
            print(f"round {r + 1}: engine {1000 * e:.2f} ms/step, bare {1000 * b:.2f} ms/step, ratio {e / b:.3f}")
    ratio = statistics.median(ratios)
    print(f"median ratio engine/bare: {ratio:.3f}")
    return ratio


if __name__ == "__main__":
    main()
    sys.exit(0)
