"""ZeRO-3 lockstep at a real vocabulary: every rank calls every module the same number of times.

ZeRO-3 gathers a module's weights with a collective on every call (forward, and a checkpointed chunk's
recompute in backward) and reduces gradients in the order they become ready: a branch taken from one rank's
own data (a chunk count from its label count, an empty micro-batch, a generation that stops early, a vision
tower skipped on a text-only rank) leaves the ranks in different collectives, which hangs or aborts the run.

Each row below trains one trainer (the core's `sft`, every project's, and alternating_attn's model under `sft`)
on 2 processes under ZeRO-3 with a 150k vocabulary (so a long answer takes the chunked, recomputed LM loss) and
deliberately unequal batches: one rank a 200-word answer while the other has a one-word one, a text-only sample,
and a padding sample with no labels (7 samples on 2 ranks). A callback counts every module call per rank and step
(a global forward pre-hook: it fires for recomputed chunks too); the counts must be equal on both ranks, step by
step and in the final evaluation. The `sft` row is the reproduction of the reported hang: its per-step losses and
gradient norms must also equal one process's (1e-5).
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

from tests.e2e_utils import read_metrics, subprocess_env, write_yaml

BIN = Path(sys.executable).parent
VOCAB = 150016  # Qwen2-VL's vocabulary: 200 label tokens x VOCAB is far above the lean-loss threshold
LONG = " ".join(("the red square sits left of a blue circle near " * 20).split())

#: A child that registers the counting callback and trains CONFIG (torchrun runs it on every rank).
COUNT_CHILD = r"""
import json, os, sys
from collections import Counter
import torch
from arctic_vl.callbacks.base import Callback
from arctic_vl.registry import CALLBACKS, ComponentConfig

class CountConfig(ComponentConfig):
    type: str = "count_calls"
    out: str

@CALLBACKS.register("count_calls")
class CountCalls(Callback):
    config_class = CountConfig

    def on_train_start(self, trainer):
        names = {}
        roots = [("", trainer.dist.unwrap(trainer.model))]
        roots += [(k, v) for k, v in vars(trainer).items() if isinstance(v, torch.nn.Module) and k != "model"]
        for prefix, root in roots:
            for n, m in root.named_modules(prefix=prefix):
                names.setdefault(id(m), n)
        self.calls, self.steps = Counter(), {}
        def hook(module, args):
            self.calls[names.get(id(module), type(module).__name__)] += 1
        self.handle = torch.nn.modules.module.register_module_forward_pre_hook(hook)

    def on_step_end(self, trainer, info):
        self.steps[str(info.step)], self.calls = dict(self.calls), Counter()
        self.dump()

    def on_train_end(self, trainer, summary):
        self.steps["end"] = dict(self.calls)  # the final evaluation (generation included)
        self.handle.remove()
        self.dump()

    def dump(self):
        with open(f"{self.config.out}.rank{os.environ['RANK']}.json", "w") as f:
            json.dump(self.steps, f)

from arctic_vl.engine import Engine
config = sys.argv[1]
Engine(config, ["callbacks=[{type: count_calls, out: %s}]" % config[:-len(".yaml")]]).train()
"""


def _llava(image: str | None, answer: str) -> dict[str, Any]:
    prompt = ("<image>\n" if image else "") + "Describe."
    record: dict[str, Any] = {"conversations": [{"from": "human", "value": prompt}, {"from": "gpt", "value": answer}]}
    if image:
        record["image"] = image
    return record


@pytest.fixture(scope="module")
def data(synthetic_data: Path, tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """Seven samples a row (so one rank's last micro-batch is a padding sample without labels), long and short
    answers side by side, text-only samples among image ones; three eval samples (an odd count)."""
    records = json.loads((synthetic_data / "train.llava.json").read_text())
    images = [r["image"] for r in records if r.get("image")]
    texts = [r for r in records if not r.get("image")]
    llava = [_llava(images[0], LONG), _llava(images[1], "yes"), _llava(None, "no"), _llava(images[2], LONG),
             texts[0], _llava(images[3], "a"), _llava(images[4], LONG)]
    llava_file = synthetic_data / "lockstep.llava.json"  # next to images/ (relative image paths)
    llava_file.write_text(json.dumps(llava))
    eval_file = synthetic_data / "lockstep-eval.llava.json"
    eval_file.write_text(json.dumps([_llava(images[5], "two"), _llava(None, "no"), _llava(images[6], LONG)]))
    dense = (synthetic_data / "train.dense.jsonl").read_text().splitlines()
    dense_file = synthetic_data / "lockstep.dense.jsonl"
    dense_file.write_text("\n".join(dense[:7]) + "\n")
    dense_eval = synthetic_data / "lockstep-eval.dense.jsonl"
    dense_eval.write_text("\n".join((synthetic_data / "heldout.dense.jsonl").read_text().splitlines()[:3]) + "\n")
    from bbu_detection.synthetic import make_detection_data

    bbu = make_detection_data(tmp_path_factory.mktemp("bbu"), n=7, seed=0, heldout=3, image_size=56)
    return {"llava": llava_file, "llava_eval": eval_file, "dense": dense_file, "dense_eval": dense_eval,
            "bbu": Path(bbu["train"]["path"]), "bbu_eval": Path(bbu["heldout"]["path"])}


QWEN_TINY = {"layers": 2, "hidden": 32, "heads": 2, "kv_heads": 1, "intermediate": 64, "vision_layers": 1,
             "vision_hidden": 32, "vocab_size": VOCAB}


def _row(name: str, data: dict[str, Path]) -> dict[str, Any]:
    """The sections of row `name` (model, data, trainer and eval) besides what every row shares."""
    if name == "sft":
        return {"model": {"family": "qwen2_vl", "tiny": {**QWEN_TINY, "image_size": 56, "patch_size": 14}},
                "data": {"sources": [str(data["llava"])], "eval_sources": [str(data["llava_eval"])]},
                "trainer": {}, "eval": {"generate": True, "max_new_tokens": 3}}
    if name == "bbu_detection":
        return {"model": {"type": "bbu_detection", "family": "qwen2_5_vl",
                          "tiny": {**QWEN_TINY, "image_size": 56, "patch_size": 14},
                          "detection": {"num_queries": 4, "decoder_layers": 1, "caption_layers": 1, "d_model": 32,
                                        "heads": 2, "max_caption_tokens": 6}},
                "data": {"type": "bbu_detection", "sources": [str(data["bbu"])],
                         "eval_sources": [str(data["bbu_eval"])]},
                "trainer": {"type": "bbu_detection"}, "eval": {}}
    dense_model = {"family": "qwen3_vl", "tiny": {**QWEN_TINY, "patch_size": 8, "image_size": 64}}
    dense_data = {"type": "dense_caption", "sources": [str(data["dense"])], "eval_sources": [str(data["dense_eval"])],
                  "coords": "pixels"}
    if name == "dense_caption":
        return {"model": dense_model, "data": dense_data, "trainer": {"type": "dense_caption"},
                "eval": {"generate": True, "max_new_tokens": 6}}
    if name == "gkd":  # the student generates every micro-batch's completion: generation in lockstep
        return {"model": dense_model, "data": dense_data,
                "trainer": {"type": "gkd", "lmbda": 1.0, "max_completion_length": 6}, "eval": {}}
    if name == "alternating_attn":  # the core's sft trainer on the project's model (odd layers: modality masks)
        return {"model": {"type": "alternating_attn", "family": "llava_onevision", "variant": "alternating",
                          "tiny": {"layers": 2, "hidden": 32, "heads": 2, "kv_heads": 1, "intermediate": 64,
                                   "vision_layers": 1, "vision_hidden": 32, "vocab_size": VOCAB}},
                "data": {"sources": [str(data["llava"])]}, "trainer": {}, "eval": {}}
    assert name == "swiftkv_vl"
    return {"model": {"type": "swiftkv_vl", "num_key_value_layers": 1,
                      "teacher_tiny": {"family": "llava_next", "layers": 2, "hidden": 32, "heads": 2, "kv_heads": 1,
                                       "vision_layers": 1, "vision_hidden": 32, "image_size": 32, "patch_size": 8,
                                       "vocab_size": VOCAB}},
            "data": {"sources": [str(data["llava"])]}, "trainer": {"type": "swiftkv_vl"}, "eval": {}}


def _config(root: Path, name: str, data: dict[str, Path], distributed: dict[str, Any], micro: int) -> Path:
    row = _row(name, data)
    # not a folder named like the plugin package (`swiftkv_vl/`): next to the child script it is on sys.path
    # first and shadows the installed package as a namespace package
    folder = root / f"run-{name}"
    run = folder / distributed["type"]
    config = {
        "model": row["model"],
        "data": {"micro_batch_size": micro, "max_length": 512, "shuffle": False, **row["data"]},
        "trainer": {"output_dir": str(run), "epochs": 1, "gradient_accumulation_steps": 2, "progress_bar": False,
                    "seed": 3, **row["trainer"]},
        "optimizer": {"lr": 1e-3},
        "checkpoint": {"export_final": False},
        "distributed": distributed,
    }
    if row["eval"]:
        config["eval"] = row["eval"]
    folder.mkdir(parents=True, exist_ok=True)
    return write_yaml(folder / f"{distributed['type']}.yaml", config)


def _launch(config: Path, tmp: Path) -> subprocess.CompletedProcess:
    from arctic_vl.distributed.deepspeed_backend import free_port

    child = tmp / "count_child.py"
    child.write_text(COUNT_CHILD)
    cmd = [str(BIN / "torchrun"), "--nproc_per_node", "2", "--master_port", str(free_port()), str(child), str(config)]
    # a collective mismatch hangs (or aborts): the timeout turns a hang into a failure
    return subprocess.run(cmd, capture_output=True, text=True, timeout=420, env=subprocess_env())


@pytest.mark.parametrize("name", ["sft", "bbu_detection", "dense_caption", "gkd", "swiftkv_vl", "alternating_attn"])
def test_every_rank_calls_every_module_equally_under_zero3(name: str, data: dict[str, Path], tmp_path: Path) -> None:
    config = _config(tmp_path, name, data, {"type": "deepspeed", "zero_stage": 3}, micro=1)
    proc = _launch(config, tmp_path)
    assert proc.returncode == 0, proc.stderr[-4000:]
    base = str(config)[:-len(".yaml")]
    ranks = [json.loads(Path(f"{base}.rank{r}.json").read_text()) for r in (0, 1)]
    assert list(ranks[0]) == ["1", "2", "end"], "two optimizer steps and the end of the run"
    for step in ranks[0]:
        a, b = ranks[0][step], ranks[1][step]
        differ = {m: (a.get(m), b.get(m)) for m in sorted(set(a) | set(b)) if a.get(m) != b.get(m)}
        assert not differ, f"step {step}: module calls differ between ranks (rank 0, rank 1): {differ}"
    metrics = read_metrics(config.parent / "deepspeed")
    assert [m["step"] for m in metrics] == [1, 2]
    if name == "sft":  # a step's long answer really took the chunked loss path
        assert max(m["label_tokens"] for m in metrics) * VOCAB > (1 << 24)
        assert max(ranks[0][s].get("model.model.lm_head", ranks[0][s].get("model.lm_head", 0))
                   for s in ("1", "2")) >= 4, ranks[0]["1"]
        # ... and it equals one process at micro-batch 2 (the same global batches), loss and gradient norm
        from arctic_vl.engine import Engine

        single = _config(tmp_path, name, data, {"type": "single"}, micro=2)
        Engine(single).train()
        reference = read_metrics(single.parent / "single")
        assert [m["samples"] for m in metrics] == [m["samples"] for m in reference]
        assert [m["label_tokens"] for m in metrics] == [m["label_tokens"] for m in reference]
        for run, ref in zip(metrics, reference):
            assert abs(run["loss"] - ref["loss"]) <= 1e-5, (run["loss"], ref["loss"])
            assert abs(run["grad_norm"] - ref["grad_norm"]) <= 1e-5 * ref["grad_norm"]
