"""Start-up bench: seconds from `Engine._build` to the first batch, cold (serial and parallel) vs a warm cache.

The data is the synthetic shapes set (LLaVA json, 85% with a 64x64 image, written by `make_synthetic_data`) and the
model a tiny LLaVA-NeXT. Sides, each in a fresh interpreter so nothing is warm in memory:
  cold-1   no cache, one process reads and tokenizes (`data.preprocess_workers: 1`)
  cold-N   no cache, N processes (`--workers`, default: the cores)
  warm     the encoded-records cache written by a first run (not timed), one process
Each side runs `--rounds` times in alternating order; the median is printed, with the ratios cold-1/cold-N (the
parallel speed-up) and cold-1/warm. The start-up is `Engine(...)` + `Engine._build()` (model load, data read, encode
or cache load, trainer) plus the first batch of the loader: what a run waits before step 1 once the interpreter has
imported torch, transformers' model classes and the plugins (printed apart as `imports`); the data build
(`VLMDataFactory.build`) is printed apart too, and the speed-ups are of it. The data build's CPU seconds (the
process and its encoding workers) are printed beside: on a shared machine the parallel wall-time speed-up needs idle
cores, which the CPU seconds show were (not) there.

    python bench/startup.py --records 20000                  # the figure in the README
    python bench/startup.py --records 300 --rounds 1         # smoke
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]

CHILD = r"""
import json, resource, sys, time
t0 = time.perf_counter()
import torch
torch.set_num_threads(1)
import transformers.models.llava_next.modeling_llava_next  # the model classes: imports, not start-up
from arctic_vl.engine import Engine
from arctic_vl.plugins import load_plugins
from arctic_vl.data.factory import VLMDataFactory
load_plugins()
t1 = time.perf_counter()
real_build, data_time, data_cpu = VLMDataFactory.build, [], []
def cpu():  # this process and its finished children (the encoding pool's workers)
    kids = resource.getrusage(resource.RUSAGE_CHILDREN)
    return time.process_time() + kids.ru_utime + kids.ru_stime
def build(self, *a, **k):
    t, c = time.perf_counter(), cpu()
    out = real_build(self, *a, **k)
    data_time.append(time.perf_counter() - t)
    data_cpu.append(cpu() - c)
    return out
VLMDataFactory.build = build
engine = Engine(sys.argv[1], sys.argv[2:])
trainer = engine._build()
next(iter(trainer.loader(0, 0)))
t2 = time.perf_counter()
trainer.dist.teardown()
print(json.dumps({"imports": t1 - t0, "startup": t2 - t1, "data": data_time[0], "data_cpu": data_cpu[0],
                  "samples": len(trainer.data.train),
                  "cache": trainer.data.stats.get("cache", {}).get("sources")}))
"""


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--records", type=int, default=20000)
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--workers", type=int, default=len(os.sched_getaffinity(0)))
    p.add_argument("--dir", type=Path, default=None, help="work directory (default: a temporary one)")
    return p.parse_args(argv)


def run_child(config: Path, *overrides: str) -> dict:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "TOKENIZERS_PARALLELISM": "false",
           "PYTHONPATH": os.pathsep.join([str(REPO), os.environ.get("PYTHONPATH", "")])}
    proc = subprocess.run([sys.executable, "-c", CHILD, str(config), *overrides], capture_output=True, text=True,
                          env=env, cwd=config.parent)
    if proc.returncode != 0:
        raise SystemExit(f"child failed:\n{proc.stderr[-3000:]}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    import yaml

    from arctic_vl.data.synthetic import make_synthetic_data
    from arctic_vl.models.tiny import make_tiny_model

    with tempfile.TemporaryDirectory() as tmp:
        root = args.dir or Path(tmp)
        data = root / "data"
        if not (data / "train.llava.json").is_file():
            make_synthetic_data(data, n=args.records, seed=0, heldout=50)
        model = root / "model"
        if not (model / "config.json").is_file():
            make_tiny_model("llava_next", model, seed=0)
        config = root / "run.yaml"
        config.write_text(yaml.safe_dump({
            "model": {"name_or_path": str(model)},
            "data": {"sources": [str(data / "train.llava.json")], "max_length": 1024,
                     "cache_dir": str(root / "cache")},
            "trainer": {"output_dir": str(root / "out"), "max_steps": 1, "progress_bar": False},
        }))
        sides = {"cold-1": ["data.cache=false", "data.preprocess_workers=1"],
                 f"cold-{args.workers}": ["data.cache=false", f"data.preprocess_workers={args.workers}"],
                 "warm": ["data.preprocess_workers=1"]}
        first = run_child(config, "data.preprocess_workers=1")  # writes the cache (or finds it)
        print(f"samples={first['samples']} cache={first['cache']} (first run: {first['startup']:.2f}s)")
        times: dict[str, list[float]] = {k: [] for k in sides}
        data_times: dict[str, list[float]] = {k: [] for k in sides}
        data_cpus: dict[str, list[float]] = {k: [] for k in sides}
        imports = []
        for r in range(args.rounds):
            order = list(sides) if r % 2 == 0 else list(reversed(sides))
            for name in order:
                out = run_child(config, *sides[name])
                times[name].append(out["startup"])
                data_times[name].append(out["data"])
                data_cpus[name].append(out["data_cpu"])
                imports.append(out["imports"])
                print(f"round {r + 1} {name}: start-up {out['startup']:.2f}s, data {out['data']:.2f}s "
                      f"({out['data_cpu']:.2f} CPU s) "
                      f"(cache {list(out['cache'].values())})", flush=True)
        med = {k: statistics.median(v) for k, v in times.items()}
        dmed = {k: statistics.median(v) for k, v in data_times.items()}
        print("start-up: " + " ".join(f"{k}={v:.2f}s" for k, v in med.items())
              + f" (imports before it: {statistics.median(imports):.2f}s)")
        cmed = {k: statistics.median(v) for k, v in data_cpus.items()}
        print("data build: " + " ".join(f"{k}={v:.2f}s" for k, v in dmed.items()) + " | CPU seconds (all processes): "
              + " ".join(f"{k}={v:.2f}" for k, v in cmed.items()))
        cold1, coldn = dmed["cold-1"], dmed[f"cold-{args.workers}"]
        print(f"parallel_speedup={cold1 / coldn:.2f} warm_speedup={cold1 / dmed['warm']:.2f} "
              f"(data build; start-up warm {med['warm']:.2f}s)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
