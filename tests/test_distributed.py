"""DDP and DeepSpeed ZeRO across 2 CPU processes (gloo): same losses as one process, text-only ranks, resume, export.

One data file of 24 samples (LLaVA json, mixed image and text-only, different lengths), read without
shuffling: micro-batch k of a 2-process run at micro-batch 2 holds samples [4k, 4k+4), shared out between
the ranks by tokens (`data.balance_ranks`: each rank about the same number), exactly the samples of
micro-batch k of a 1-process run at micro-batch 4, so the losses are equal whichever rank holds which. The
file is arranged so that on step 2 (micro-batches 2 and 3: one image and three text-only samples each) the
balanced split leaves rank 1 only text-only samples while rank 0 holds the image: the ZeRO-3 trap of a vision
tower that runs on one rank only.

Launches are few (about 12 s each): the 1-process reference runs in this process; then ddp (torchrun),
ZeRO-2 (deepspeed launcher), and ZeRO-3 (torchrun) killed with SIGKILL at step 3 and rerun to the end.
"""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from tests.e2e_utils import (
    KILL_AT_CALLBACK,
    TERM_AT_CALLBACK,
    read_metrics,
    run_cli,
    subprocess_env,
    write_eval_file,
    write_yaml,
)

BIN = Path(sys.executable).parent
SEED = 7
N = 24
#: dataset positions that hold text-only samples: three of each micro-batch of step 2 (8-11, 12-15) and two more
TEXT_POSITIONS = {3, 9, 10, 11, 13, 14, 15, 21}
MAX_STEPS = 5  # 3 steps an epoch: crosses an epoch
GROUPS = ("vision", "aligner", "llm")  # each its own optimizer group: per-group norms are compared

# Rank 0 kills itself (SIGKILL) at the end of a step; the launcher then stops the other rank.
KILL_CHILD = KILL_AT_CALLBACK + r"""
from arctic_vl.cli import main
sys.exit(main(["train", sys.argv[1], "--set", "callbacks=[{type: kill_at, step: %s}]" % sys.argv[2]]))
"""


@pytest.fixture(scope="module")
def setup(tiny_llava: Path, synthetic_data: Path, tmp_path_factory: pytest.TempPathFactory) -> dict:
    records = json.loads((synthetic_data / "train.llava.json").read_text())
    images = [r for r in records if r.get("image")]
    texts = [r for r in records if not r.get("image")]
    arranged = [texts.pop(0) if i in TEXT_POSITIONS else images.pop(0) for i in range(N)]
    data_file = synthetic_data / "distributed_mixed.json"  # next to images/ (relative image paths)
    data_file.write_text(json.dumps(arranged))  # data.shuffle: false trains it in file order
    root = tmp_path_factory.mktemp("distributed")

    def config(name: str, distributed: dict, micro: int, evaluate: bool = False, **trainer: object) -> Path:
        """`evaluate`: a final evaluation with generation on uneven question types (see write_eval_file)."""
        data = {"sources": [str(data_file)], "micro_batch_size": micro, "max_length": 4096, "shuffle": False}
        extra = {}
        if evaluate:
            data["eval_sources"] = [str(write_eval_file(synthetic_data))]
            extra["eval"] = {"generate": True, "max_new_tokens": 4}
        return write_yaml(root / f"{name}.yaml", {
            "model": {"name_or_path": str(tiny_llava)},
            "data": data,
            "trainer": {"output_dir": str(root / name), "max_steps": MAX_STEPS, "gradient_accumulation_steps": 2,
                        "progress_bar": False, "seed": SEED, "group_grad_norms": True, "weight_norms": True,
                        **trainer},
            "optimizer": {"lr": 3e-3, "param_groups": [{"name": p, "parts": [p]} for p in GROUPS]},
            "scheduler": {"type": "cosine", "warmup_steps": 1},
            "checkpoint": {"every_n_steps": 2, "keep_last": 2},
            "distributed": distributed,
            **extra,
        })

    return {"root": root, "config": config, "tiny": tiny_llava}


@pytest.fixture(scope="module")
def reference(setup: dict) -> list[dict]:
    """One process, micro-batch 4, in this process."""
    from arctic_vl.engine import Engine

    engine = Engine(setup["config"]("single", {"type": "single"}, 4))
    trainer = engine._build()
    # the arrangement above really puts text-only samples where the test needs them
    assert [not c.images for c in trainer.data.train.conversations] == [i in TEXT_POSITIONS for i in range(N)]
    lengths = trainer.data.train.lengths
    assert len(set(lengths)) > 5, "samples of different lengths"
    # the 2-process plan: token-balanced (not the plain halves), and rank 1 holds only text on step 2
    from arctic_vl.data.sampling import BalancedBatcher, EpochBatchSampler

    plan = BalancedBatcher(lengths, 2, SEED, shuffle=False)(0, 2)
    assert plan != EpochBatchSampler.plan(N, 2, 2, SEED, 0, False)
    assert all(set(plan[b][1]) <= TEXT_POSITIONS and not set(plan[b][0]) <= TEXT_POSITIONS for b in (2, 3))
    for b, step in enumerate(plan):
        tokens = [sum(lengths[i] for i in part) for part in step]
        halves = [sum(lengths[i] for i in range(4 * b + 2 * r, 4 * b + 2 * r + 2)) for r in (0, 1)]
        assert max(tokens) <= max(halves), (b, tokens, halves)  # never worse than the plain split
    trainer.train()
    trainer.dist.teardown()
    metrics = read_metrics(setup["root"] / "single")
    # the last step's weight norms are the norms of the weights the run ended with, group by group
    for g in GROUPS:  # the decay and no-decay halves of the group
        params = [p for group in trainer.optimizer.param_groups if group["name"].split("/")[0] == g
                  for p in group["params"]]
        flat = torch.cat([p.detach().double().flatten() for p in params])
        assert metrics[-1][f"weight_norm/{g}"] == pytest.approx(float(flat.norm()), rel=1e-12), g
    return metrics


def _launch(launcher: str, program: list[str], *, timeout: int = 300) -> subprocess.CompletedProcess:
    from arctic_vl.distributed.deepspeed_backend import free_port

    port = str(free_port())
    if launcher == "torchrun":
        cmd = [str(BIN / "torchrun"), "--nproc_per_node", "2", "--master_port", port]
    else:  # without --num_gpus only one rank starts on CPU
        cmd = [str(BIN / "deepspeed"), "--num_gpus", "2", "--master_port", port]
    return subprocess.run(cmd + program, capture_output=True, text=True, timeout=timeout, env=subprocess_env())


def _assert_matches(run: list[dict], reference: list[dict]) -> None:
    assert [m["step"] for m in run] == list(range(1, MAX_STEPS + 1)), "each step exactly once"
    assert [m["samples"] for m in run] == [m["samples"] for m in reference]
    assert [m["label_tokens"] for m in run] == [m["label_tokens"] for m in reference]
    loss_diff = max(abs(a["loss"] - b["loss"]) for a, b in zip(run, reference))
    assert loss_diff <= 1e-5, f"max loss difference {loss_diff}"
    # the gradient norm catches a loss scaled by a constant (Adam would hide it from the losses)
    norm_rel = max(abs(a["grad_norm"] - b["grad_norm"]) / b["grad_norm"] for a, b in zip(run, reference))
    assert norm_rel <= 1e-5, f"max relative grad-norm difference {norm_rel}"
    # per-group monitors (issue 19 item 7): present under every backend, ZeRO 1-3 included, equal to one process's
    for a, b in zip(run, reference):
        assert [a[f"lr/{g}"] for g in GROUPS] == [b[f"lr/{g}"] for g in GROUPS] == [b["lr"]] * 3, a["step"]
        for key in [f"{kind}/{g}" for kind in ("grad_norm", "weight_norm") for g in GROUPS]:
            assert a[key] == pytest.approx(b[key], rel=1e-5, abs=1e-9), (a["step"], key)
        assert a["grad_norm"] == pytest.approx(sum(a[f"grad_norm/{g}"] ** 2 for g in GROUPS) ** 0.5, rel=1e-5)


def test_reference_learns(reference):
    assert reference[-1]["loss"] < reference[0]["loss"] - 0.5
    assert [m["epoch"] for m in reference] == [0, 0, 0, 1, 1]


def test_ddp_two_processes_equal_one(setup, reference):
    proc = _launch("torchrun", [str(BIN / "arctic_vl"), str(setup["config"]("ddp", {"type": "ddp"}, 2))])
    assert proc.returncode == 0, proc.stderr[-3000:]
    _assert_matches(read_metrics(setup["root"] / "ddp"), reference)
    info = json.loads((setup["root"] / "ddp" / "run_info.json").read_text())
    assert info["world_size"] == 2
    # a different process count refuses to resume, naming both counts (one process, no launcher)
    from arctic_vl.distributed.deepspeed_backend import free_port

    proc = run_cli("train", str(setup["root"] / "ddp.yaml"), "--set", f"trainer.max_steps={MAX_STEPS + 1}",
                   MASTER_PORT=str(free_port()))
    assert proc.returncode == 2, proc.stderr[-2000:]
    assert "saved by 2 processes and this run has 1" in proc.stderr and "Traceback" not in proc.stderr


TERM_CHILD = TERM_AT_CALLBACK + r"""
from arctic_vl.cli import main
sys.exit(main(["train", sys.argv[1], "--set", "callbacks=[{type: term_at, step: 3, ranks: %s, stagger_ms: 20}]"
               % sys.argv[2]]))
"""


@pytest.mark.parametrize("ranks", ["[0]", "[0, 1]"])
def test_sigterm_to_one_or_both_processes_saves_and_resumes_exactly(setup, reference, tmp_path, ranks):
    """SIGTERM to rank 0 only, or to both 20 ms apart: the processes agree to stop at the same step boundary,
    save that step's checkpoint together and exit 0 (no hang in a checkpoint collective); the rerun resumes
    from it and every step's loss equals the uninterrupted run's."""
    name = "term-" + ("one" if ranks == "[0]" else "both")
    config = setup["config"](name, {"type": "ddp"}, 2)
    child = tmp_path / "term_child.py"
    child.write_text(TERM_CHILD)
    proc = _launch("torchrun", [str(child), str(config), ranks], timeout=240)
    assert proc.returncode == 0, proc.stderr[-3000:]
    out = setup["root"] / name
    stopped_at = [m["step"] for m in read_metrics(out)][-1]
    assert stopped_at == 3, "every process stops at the step boundary after the signal, none runs step 4"
    assert (out / "checkpoints" / f"step-{stopped_at}").is_dir() and not (out / "final").exists()
    assert "stopped by" in proc.stderr and "Traceback" not in proc.stderr
    proc = _launch("torchrun", [str(BIN / "arctic_vl"), str(config)])
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert f"step-{stopped_at}" in proc.stderr
    _assert_matches(read_metrics(out), reference)


def test_zero2_two_processes_equal_one(setup, reference):
    config = setup["config"]("zero2", {"type": "deepspeed", "zero_stage": 2}, 2)
    proc = _launch("deepspeed", [str(BIN / "arctic_vl"), str(config)])
    assert proc.returncode == 0, proc.stderr[-3000:]
    _assert_matches(read_metrics(setup["root"] / "zero2"), reference)
    # only rank 0 writes: one metrics line per step (checked above), one export
    assert (setup["root"] / "zero2" / "final" / "config.json").is_file()


def test_zero3_sigkill_resume_and_export(setup, reference, tmp_path):
    config = setup["config"]("zero3", {"type": "deepspeed", "zero_stage": 3}, 2, evaluate=True)
    child = tmp_path / "kill_child.py"
    child.write_text(KILL_CHILD)
    proc = _launch("torchrun", [str(child), str(config), "3"])
    assert proc.returncode != 0, "rank 0 was killed"
    out = setup["root"] / "zero3"
    assert [m["step"] for m in read_metrics(out)] == [1, 2, 3]
    shards = sorted(p.name for p in (out / "checkpoints" / "step-2" / "deepspeed").iterdir())
    assert "zero_pp_rank_0_mp_rank_00_optim_states.pt" in shards
    assert "zero_pp_rank_1_mp_rank_00_optim_states.pt" in shards
    assert not (out / "final").exists()

    proc = _launch("torchrun", [str(BIN / "arctic_vl"), str(config)])
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "resuming from" in proc.stderr and "step-2" in proc.stderr
    _assert_matches(read_metrics(out), reference)  # step 3 rewritten once, from the step-2 checkpoint

    # final/ loads with plain transformers and holds the trained weights (gathered from the ZeRO-3 shards)
    from transformers import LlavaNextForConditionalGeneration

    exported = LlavaNextForConditionalGeneration.from_pretrained(out / "final").state_dict()
    single = LlavaNextForConditionalGeneration.from_pretrained(setup["root"] / "single" / "final").state_dict()
    base = LlavaNextForConditionalGeneration.from_pretrained(setup["tiny"]).state_dict()
    assert exported.keys() == single.keys()
    worst = max(float((exported[k] - single[k]).abs().max()) for k in single)
    assert worst < 1e-4, f"ZeRO-3 export differs from the 1-process weights by {worst}"
    moved = max(float((exported[k] - base[k]).abs().max()) for k in base)
    assert moved > 1e-3, "the export holds trained weights, not the initial ones"
    assert all(v.numel() > 0 for v in exported.values()), "no partitioned (empty) tensors"

    # the final evaluation under ZeRO-3 (every forward a collective; ranks with other question types, one
    # answering a text-only question while the other encodes an image) equals one process on the export
    (two,) = [json.loads(x) for x in (out / "eval.jsonl").read_text().splitlines()]
    from arctic_vl.engine import Engine

    one = Engine(config, ["distributed={type: single}"]).evaluate()
    assert two["eval_questions_by_type"] == one["eval_questions_by_type"] == {"colour": 3, "count": 1, "text": 1}
    for key in ("eval_label_tokens", "exact_match", "exact_match_by_type"):
        assert two[key] == one[key], key
    assert two["eval_loss"] == pytest.approx(one["eval_loss"], rel=1e-5, abs=0)
    shutil.rmtree(out / "checkpoints")


# ----------------------------------------------------------------------------- in-process, no launch
def test_deepspeed_config_is_derived_and_checked(tmp_path):
    from arctic_vl.config.schema import load_config
    from arctic_vl.distributed.deepspeed_backend import derive_ds_config
    from arctic_vl.errors import ConfigError

    (tmp_path / "x.json").write_text("[]\n")  # the data a config names must exist to validate
    base = {"model": {"family": "llava_next"}, "data": {"sources": [str(tmp_path / "x.json")], "micro_batch_size": 3},
            "trainer": {"gradient_accumulation_steps": 4, "max_grad_norm": 0.5, "bf16": True}}
    cfg = load_config({**base, "distributed": {"type": "deepspeed", "zero_stage": 3, "offload_param": "cpu",
                                               "config": {"zero_optimization": {"reduce_bucket_size": 1000}}}})
    ds = derive_ds_config(cfg.distributed, cfg, 4)
    assert ds["train_micro_batch_size_per_gpu"] == 3 and ds["gradient_accumulation_steps"] == 4
    assert ds["train_batch_size"] == 48 and ds["gradient_clipping"] == 0.5 and ds["bf16"] == {"enabled": True}
    assert ds["zero_optimization"] == {"stage": 3, "offload_param": {"device": "cpu"}, "reduce_bucket_size": 1000}
    for bad, says in (({"config": {"optimizer": {"type": "Adam"}}}, "distributed.config.optimizer: not allowed"),
                      ({"config": {"gradient_accumulation_steps": 2}}, "contradicts the engine config (derived 4)"),
                      ({"zero_stage": 2, "offload_param": "cpu"}, "needs zero_stage 3")):
        path = write_yaml(tmp_path / "bad.yaml", {**base, "distributed": {"type": "deepspeed", **bad}})
        with pytest.raises(ConfigError) as err:
            load_config(path)
        assert says in str(err.value) and "bad.yaml:" in str(err.value), str(err.value)  # names file and line


@pytest.mark.parametrize("family", ["llava", "llava_next", "llava_onevision", "qwen2_vl", "qwen2_5_vl", "qwen3_vl"])
def test_text_only_batch_runs_the_vision_tower(family, tmp_path):
    """The keep-alive touches every vision/aligner parameter an image batch touches, with zero effect."""
    from arctic_vl import final_hidden, lm_loss_sum
    from arctic_vl.models.families import FAMILIES, part_of
    from arctic_vl.models.loading import load_model
    from arctic_vl.models.tiny import make_tiny_model

    model = load_model(make_tiny_model(family, tmp_path / family, seed=0), dtype=torch.float32,
                       attn_implementation="sdpa")
    ids = torch.randint(20, 200, (2, 12), generator=torch.Generator().manual_seed(0))
    batch = {"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": ids.clone()}
    if FAMILIES[family].is_qwen:
        batch["mm_token_type_ids"] = torch.zeros_like(ids)
    vision = [n for n, _ in model.named_parameters() if part_of(FAMILIES[family], n) in ("vision", "aligner")]
    losses, grads = [], []
    for keep in (False, True):
        model.zero_grad(set_to_none=True)
        hidden, head, _ = final_hidden(model, batch, dummy_vision=keep)
        loss, _ = lm_loss_sum(hidden, head, batch["labels"])
        loss.backward()
        params = dict(model.named_parameters())
        losses.append(float(loss.detach()))
        grads.append({n: params[n].grad for n in vision if params[n].grad is not None})
    assert losses[0] == losses[1], "the dummy image changes nothing"
    assert not grads[0], "without the keep-alive a text-only batch leaves the vision tower out"
    missing = set(vision) - set(grads[1])
    # CLIP's post_layernorm feeds only its pooled output, which the LLaVA path never uses
    assert all("post_layernorm" in n for n in missing), sorted(missing)
    assert len(grads[1]) >= len(vision) - 2
    assert all(float(g.abs().max()) == 0.0 for g in grads[1].values())


def test_unused_parameters_name_the_config_key(tiny_llava, tmp_path):
    """find_unused_parameters: false on a model whose step leaves weights out (CLIP's post_layernorm with
    vision_feature_layer -1): PyTorch's raw DDP error becomes a ConfigError naming the key and the weights."""
    import torch.distributed as dist
    from PIL import Image
    from torch.nn.parallel import DistributedDataParallel

    from arctic_vl import final_hidden, lm_loss_sum
    from arctic_vl.distributed.backends import DDP, DDPConfig
    from arctic_vl.errors import ConfigError
    from arctic_vl.models.loading import load_model, load_processor

    model, processor = load_model(tiny_llava), load_processor(tiny_llava)
    text = "<|im_start|>user\n<image>\nWhat colour?<|im_end|>\n<|im_start|>assistant\nred<|im_end|>\n"
    batch = dict(processor(images=[Image.new("RGB", (40, 40), (200, 0, 0))], text=[text], return_tensors="pt"))
    batch["labels"] = batch["input_ids"].clone()

    class Step(torch.nn.Module):  # the loop's model + loss module, as DDP wraps it
        def __init__(self):
            super().__init__()
            self.model = model

        def forward(self, b):
            hidden, head, _ = final_hidden(self.model, b, dummy_vision=False)
            return lm_loss_sum(hidden, head, b["labels"])[0]

    dist.init_process_group("gloo", store=dist.FileStore(str(tmp_path / "store"), 1), rank=0, world_size=1)
    try:
        wrapped = DistributedDataParallel(Step(), find_unused_parameters=False)
        backend = DDP(DDPConfig(type="ddp", find_unused_parameters=False))
        with pytest.raises(ConfigError) as err:
            for _ in range(2):  # DDP notices on the step after the one that left weights out
                with backend.no_sync(wrapped, sync=True):
                    wrapped(batch).backward()
        with pytest.raises(RuntimeError, match="something else"), backend.no_sync(wrapped, sync=True):
            raise RuntimeError("something else")  # other errors pass through as they are
    finally:
        dist.destroy_process_group()
    msg = str(err.value)
    assert msg.startswith("distributed.find_unused_parameters is false, but some trainable parameters got no gradient")
    assert "Set distributed.find_unused_parameters: true" in msg
    assert "post_layernorm.weight" in msg and "(2 of them" in msg
