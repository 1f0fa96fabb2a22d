"""Padding-free packing: per-sample losses equal unpacked ones, the plan is sound, runs train and resume exactly."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import torch
import torch.nn.functional as F

from arctic_vl.data.sampling import PackingPlanner, best_fit_decreasing
from tests.e2e_utils import TRAIN_CHILD, read_metrics, run_python, train_child, write_yaml

FAMILIES = ("llava", "llava_next", "llava_onevision", "qwen2_vl", "qwen2_5_vl", "qwen3_vl")
IGNORE = -100


# ------------------------------------------------------------------------------------------------ helpers
@pytest.fixture(scope="module")
def tiny_models(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """One tiny checkpoint per family (built lazily, once per module)."""
    from arctic_vl.models.tiny import make_tiny_model

    cache: dict[str, Path] = {}

    class Lazy(dict):
        def __missing__(self, family: str) -> Path:
            cache[family] = make_tiny_model(family, tmp_path_factory.mktemp(family), seed=0)
            return cache[family]

    return Lazy()


def _data(model_dir: Path, synthetic: Path, attn: str, *, packing: bool = True, n: int = 24) -> tuple[Any, Any, Any]:
    """(model in eval mode, data bundle, encoder) for the first `n` synthetic records."""
    from arctic_vl.data.factory import VLMDataConfig, VLMDataFactory
    from arctic_vl.models.base import ModelBundle
    from arctic_vl.models.loading import family_of_dir, load_model, load_processor

    model = load_model(model_dir, attn_implementation=attn).eval()
    bundle = ModelBundle(model, load_processor(model_dir), family_of_dir(model_dir))
    cfg = VLMDataConfig(sources=[{"path": str(synthetic / "train.llava.json"), "sample": f"first:{n}"}],
                        max_length=512, packing=packing, micro_batch_size=2)
    factory = VLMDataFactory(cfg)
    data = factory.build(bundle, seed=0)
    return model, data, factory.encoder(bundle)


def _token_ce(model: torch.nn.Module, batch: dict[str, Any]) -> torch.Tensor:
    """Next-token CE at every position (B, T-1), 0 where the next label is ignored (fp32)."""
    from arctic_vl import final_hidden

    with torch.no_grad():
        hidden, head, _ = final_hidden(model, batch)
        logits = head(hidden[:, :-1]).float()
    targets = batch["labels"][:, 1:]
    ce = F.cross_entropy(logits.transpose(1, 2), targets.clamp(min=0), reduction="none")
    return ce * (targets != IGNORE)


def _alone(model: torch.nn.Module, data: Any, index: int) -> float:
    """Summed CE of one sample run on its own (the ordinary padding collator, batch of one)."""
    return float(_token_ce(model, data.collate([data.train[index]])).sum())


def _packed(model: torch.nn.Module, data: Any, rows: list[list[int]]) -> dict[int, float]:
    """Summed CE of every sample inside a packed micro-batch with `rows`, by sample index."""
    items = [data.train[(r, i)] for r, row in enumerate(rows) for i in row]
    batch = data.collate(items)
    ce = _token_ce(model, batch)
    out = {}
    for r, row in enumerate(rows):
        at = 0
        for i in row:
            n = data.train.lengths[i]
            out[i] = float(ce[r, at:at + n - 1].sum())  # position t predicts t+1: the sample's own span
            at += n
    return out


# ---------------------------------------------------------------------------------- losses: packed == alone
@pytest.mark.parametrize("attn", ["sdpa", "eager"])
@pytest.mark.parametrize("family", FAMILIES)
def test_packed_per_sample_losses_equal_unpacked(family, attn, tiny_models, synthetic_data):
    torch.manual_seed(0)
    model, data, _ = _data(tiny_models[family], synthetic_data, attn)
    conv = data.train.conversations
    with_image = [i for i in range(len(conv)) if conv[i].images][:5]
    text_only = [i for i in range(len(conv)) if not conv[i].images][:2]
    assert len(with_image) == 5 and len(text_only) == 2
    # two rows of different lengths (the shorter is padded), images and text-only samples mixed
    rows = [[with_image[0], text_only[0], with_image[1], with_image[2]], [with_image[3], text_only[1], with_image[4]]]
    packed = _packed(model, data, rows)
    for i in packed:
        alone = _alone(model, data, i)
        assert alone > 1.0  # a random model: a real loss, not an empty sum
        assert abs(packed[i] - alone) <= 1e-5 * max(1.0, abs(alone)), (family, attn, i, packed[i], alone)
    # the loop's per-token normalisation: the packed batch counts exactly the samples' own label tokens
    from arctic_vl import count_label_tokens

    batch = data.collate([data.train[(r, i)] for r, row in enumerate(rows) for i in row])
    alone_units = sum(count_label_tokens(data.collate([data.train[i]])["labels"]) for row in rows for i in row)
    assert count_label_tokens(batch["labels"]) == alone_units
    assert "attention_mask" not in batch


@pytest.mark.parametrize("family", ["llava_onevision", "qwen2_5_vl"])
def test_single_row_mode_for_flash_attention(family, tiny_models, synthetic_data):
    """flash_attention_2 isolates packed samples only in a one-row batch: `single_row` merges a micro-batch's
    rows into one padding-free row; the per-sample losses stay those of the samples run alone (here via sdpa)."""
    from arctic_vl.data.collate import PackedCollator

    model, data, encoder = _data(tiny_models[family], synthetic_data, "sdpa")
    flat = PackedCollator(encoder, 512, data.collate.fallback, data.collate.rope_index, single_row=True)
    rows = [[0, 1, 2], [3, 4]]
    batch = flat([data.train[(r, i)] for r, row in enumerate(rows) for i in row])
    order = [i for row in rows for i in row]
    assert batch["input_ids"].shape == (1, sum(data.train.lengths[i] for i in order))
    assert batch["_num_slots"] == 2 * 512
    ce, at = _token_ce(model, batch), 0
    for i in order:
        n = data.train.lengths[i]
        alone = _alone(model, data, i)
        assert abs(float(ce[0, at:at + n - 1].sum()) - alone) <= 1e-5 * max(1.0, alone)
        at += n


def test_isolation_is_what_makes_losses_equal(tiny_models, synthetic_data):
    """Control: the same packed row as ONE sequence (positions 0..T-1: plain causal attention, samples see each
    other) changes the losses. RoPE sees only relative positions, so within a sample nothing else differs."""
    model, data, _ = _data(tiny_models["llava_next"], synthetic_data, "sdpa")
    rows = [[0, 1, 2]]
    batch = data.collate([data.train[(0, i)] for i in rows[0]])
    leaky = dict(batch, position_ids=torch.arange(batch["input_ids"].shape[1])[None])
    isolated = _token_ce(model, batch)
    seen = _token_ce(model, leaky)
    n0 = data.train.lengths[0]
    assert torch.allclose(isolated[0, :n0 - 1], seen[0, :n0 - 1], atol=1e-6)  # the first sample sees no one anyway
    assert float((isolated[0, n0:] - seen[0, n0:]).abs().max()) > 1e-3


def test_boundary_labels_do_not_leak(tiny_models, synthetic_data):
    _, data, encoder = _data(tiny_models["llava_next"], synthetic_data, "sdpa")
    samples = [data.train[(0, i)] for i in (0, 1, 2)]
    lengths = [len(s["input_ids"]) for s in samples]
    # a sample whose first token carries a label: packed, that label is dropped (alone, the shift drops it)
    samples[1]["labels"] = samples[1]["input_ids"].clone()
    from arctic_vl.data.collate import pack_collate

    batch = pack_collate(encoder, [samples])
    starts = [0, lengths[0], lengths[0] + lengths[1]]
    assert [int(batch["labels"][0, s]) for s in starts] == [IGNORE] * 3
    assert batch["position_ids"][0, starts].tolist() == [0, 0, 0]
    assert batch["position_ids"][0, starts[1] - 1] == lengths[0] - 1
    assert int((batch["labels"][0, starts[1] + 1:starts[2]] != IGNORE).sum()) == lengths[1] - 1


# ------------------------------------------------------------------------------------------- Qwen mRoPE
@pytest.mark.parametrize("family", ["qwen2_vl", "qwen2_5_vl", "qwen3_vl"])
def test_qwen_mrope_positions_are_per_sample(family, tiny_models, synthetic_data):
    model, data, _ = _data(tiny_models[family], synthetic_data, "sdpa")
    conv = data.train.conversations
    row = [i for i in range(len(conv)) if conv[i].images][:3]
    row.insert(1, next(i for i in range(len(conv)) if not conv[i].images))
    batch = data.collate([data.train[(0, i)] for i in row])
    positions = batch["position_ids"]
    assert positions.shape == (4, 1, sum(data.train.lengths[i] for i in row))
    at = 0
    for i in row:
        alone = data.collate([data.train[i]])
        ref, _ = model.model.get_rope_index(alone["input_ids"], mm_token_type_ids=alone["mm_token_type_ids"],
                                            image_grid_thw=alone.get("image_grid_thw"))
        n = data.train.lengths[i]
        assert torch.equal(positions[1:, 0, at:at + n], ref[:, 0]), i
        assert torch.equal(positions[0, 0, at:at + n], torch.arange(n))
        at += n
    # the trap: positions of the whole concatenation differ from the per-sample ones after the first sample
    whole, _ = model.model.get_rope_index(batch["input_ids"], mm_token_type_ids=batch["mm_token_type_ids"],
                                          image_grid_thw=batch["image_grid_thw"])
    first = data.train.lengths[row[0]]
    assert torch.equal(whole[:, 0, :first], positions[1:, 0, :first])
    assert not torch.equal(whole[:, 0, first:], positions[1:, 0, first:])


# -------------------------------------------------------------------------------------------------- plan
def test_best_fit_decreasing_packs_tightly():
    assert best_fit_decreasing([5, 3, 7, 2, 3], range(5), 10) == [[2, 1], [0, 4, 3]]
    lengths = [60, 50, 40, 30, 20, 10, 90]
    rows = best_fit_decreasing(lengths, range(7), 100)
    assert sorted(sum(lengths[i] for i in r) for r in rows) == [100, 100, 100]
    from arctic_vl.errors import DataError

    with pytest.raises(DataError, match="longer than the packing capacity 100"):
        best_fit_decreasing([101, 5], range(2), 100)


@pytest.mark.parametrize("world_size,mbs", [(1, 1), (2, 2), (3, 1)])
def test_plan_covers_each_sample_once_never_splits_never_overflows(world_size, mbs):
    g = torch.Generator().manual_seed(1)
    lengths = [int(x) for x in torch.randint(8, 200, (301,), generator=g)]
    planner = PackingPlanner(lengths, 256, mbs, seed=3)
    for epoch in (0, 1):
        plan = planner(epoch, world_size)
        seen = []
        for step in plan:
            assert len(step) == world_size
            for keys in step:
                rows: dict[int, int] = {}
                for r, i in keys:
                    if i == -1:
                        continue
                    seen.append(i)
                    rows[r] = rows.get(r, 0) + lengths[i]
                assert len(rows) <= mbs
                assert max(rows.values(), default=0) <= 256
        assert sorted(seen) == list(range(301)), "every sample exactly once per epoch"
    stats = planner.stats(0)
    assert stats["efficiency"] > 0.95 and stats["tokens"] == sum(lengths)
    assert stats["rows"] == len(planner.rows(0))


def test_plan_is_deterministic_in_seed_and_epoch():
    lengths = [(i * 37) % 150 + 10 for i in range(200)]
    a = PackingPlanner(lengths, 300, 2, seed=5)
    b = PackingPlanner(lengths, 300, 2, seed=5)
    assert a(0, 2) == b(0, 2) and a(1, 2) == b(1, 2)
    assert a(0, 2) != a(1, 2), "a new epoch draws a new order"
    assert PackingPlanner(lengths, 300, 2, seed=6)(0, 2) != a(0, 2)
    # the rows do not depend on the world size: the same packs dealt differently
    flat = lambda plan: sorted(tuple(sorted(i for _, i in keys)) for step in plan for keys in step)  # noqa: E731
    assert flat(a(0, 1)) == flat(a(0, 1))
    unshuffled = PackingPlanner(lengths, 300, 1, seed=5, shuffle=False)
    assert unshuffled(0, 1) == unshuffled(1, 1)


def test_packing_config_errors(tmp_path, synthetic_data, tiny_llava):
    from arctic_vl.engine import Engine
    from arctic_vl.errors import ConfigError, DataError

    with pytest.raises(ConfigError, match="packing: true needs max_length"):
        Engine({"model": {"name_or_path": str(tiny_llava)},
                "data": {"sources": [str(synthetic_data / "train.llava.json")], "packing": True, "max_length": None}})
    # a sample kept whole past max_length (on_image_truncation: keep) cannot be packed: a DataError naming it
    from arctic_vl.data.factory import VLMDataConfig, VLMDataFactory
    from arctic_vl.models.base import ModelBundle
    from arctic_vl.models.loading import family_of_dir, load_model, load_processor

    bundle = ModelBundle(load_model(tiny_llava), load_processor(tiny_llava), family_of_dir(tiny_llava))
    cfg = VLMDataConfig(sources=[{"path": str(synthetic_data / "train.llava.json"), "sample": "first:8"}],
                        max_length=16, packing=True, on_image_truncation="keep")
    with pytest.raises(DataError, match=r"train.llava.json: record \d+: \d+ tokens do not fit a packed row"):
        VLMDataFactory(cfg).build(bundle, seed=0)


# ---------------------------------------------------------------------------------------- end to end


def _packed_run(root: Path, data: Path, workers: int = 0) -> Path:
    return write_yaml(root / "run.yaml", {
        "model": {"family": "qwen2_vl", "tiny": {"layers": 2, "hidden": 64}},
        # 60 samples of ~40-70 tokens packed into rows of <= 192 tokens, 2 rows a micro-batch
        "data": {"sources": [{"path": str(data / "train.llava.json"), "sample": "first:60"}],
                 "micro_batch_size": 2, "max_length": 192, "packing": True, "num_workers": workers},
        "trainer": {"output_dir": "out", "max_steps": 8, "gradient_accumulation_steps": 1,
                    "progress_bar": False, "seed": 3},
        "optimizer": {"lr": 3e-3},
        "checkpoint": {"every_n_steps": 2, "keep_last": 1},
    })


def test_packed_run_trains_and_resumes_exactly(tmp_path, synthetic_data):
    import json

    from arctic_vl.engine import Engine

    (tmp_path / "ref").mkdir()
    ref = _packed_run(tmp_path / "ref", synthetic_data)
    Engine(ref).train()  # the uninterrupted reference, in this process (saves an interpreter start)
    reference = read_metrics(ref.parent / "out")
    info = json.loads((ref.parent / "out" / "run_info.json").read_text())["data"]["packing"]
    assert info["samples"] == 60 and info["efficiency"] > 0.8
    assert info["rows"] * 192 >= info["tokens"] > (info["rows"] - 1) * 192 * 0.8 and info["samples_per_row"] > 2
    assert [m["step"] for m in reference] == list(range(1, 9))
    assert reference[-1]["loss"] < reference[0]["loss"]
    assert all(0.5 < m["packing_efficiency"] <= 1.0 for m in reference)
    # rows a step: about 2 x 192 tokens (more samples than one unpacked micro-batch of 2 would hold)
    assert sum(m["samples"] for m in reference[:4]) > 4 * 2 * 2
    assert (ref.parent / "out" / "final" / "config.json").is_file()

    (tmp_path / "kill").mkdir()
    # the killed run collates in a DataLoader worker (per-sample mRoPE there): the losses must not change
    killed = _packed_run(tmp_path / "kill", synthetic_data, workers=1)
    assert train_child(killed, "kill_step", "5") == -9
    proc = run_python(TRAIN_CHILD, "plain", "0", str(killed), cwd=killed.parent)
    assert proc.returncode == 0, proc.stderr[-3000:]
    got = read_metrics(killed.parent / "out")
    assert [m["step"] for m in got] == list(range(1, 9))
    assert [m["samples"] for m in got] == [m["samples"] for m in reference]
    assert max(abs(a["loss"] - b["loss"]) for a, b in zip(got, reference)) <= 1e-6


def _register_alternating_capacity() -> str:
    """A data factory whose batcher packs even epochs into rows of 160 tokens and odd ones into 320."""
    from arctic_vl.data.factory import VLMDataFactory
    from arctic_vl.data.sampling import PackingPlanner
    from arctic_vl.registry import DATA

    class Alternating:
        def __init__(self, lengths: list[int], seed: int):
            self.planners = [PackingPlanner(lengths, 160, 1, seed), PackingPlanner(lengths, 320, 1, seed)]

        def __call__(self, epoch: int, world_size: int) -> list:
            return self.planners[epoch % 2](epoch, world_size)

    @DATA.register("vlm_alternating_capacity")
    class AlternatingCapacity(VLMDataFactory):
        def build(self, model_bundle: Any, *, seed: int) -> Any:
            bundle = super().build(model_bundle, seed=seed)
            bundle.batcher = Alternating(bundle.train.lengths, seed)
            return bundle

    return "vlm_alternating_capacity"


def test_epochs_with_varying_micro_batch_counts(tmp_path, synthetic_data, tiny_llava):
    """An epoch-length run whose batcher gives each epoch its own number of micro-batches (the loop asks per
    epoch): every epoch trains on every sample exactly once and the run length is the sum of the epochs."""
    import json
    import math

    from arctic_vl.engine import Engine

    config = write_yaml(tmp_path / "run.yaml", {
        "model": {"name_or_path": str(tiny_llava)},
        "data": {"type": _register_alternating_capacity(),
                 "sources": [{"path": str(synthetic_data / "train.llava.json"), "sample": "first:30"}],
                 "micro_batch_size": 1, "max_length": 160, "packing": True},
        "trainer": {"output_dir": "out", "epochs": 3, "gradient_accumulation_steps": 2, "progress_bar": False,
                    "seed": 11},
        "checkpoint": {"export_final": False},
    })
    engine = Engine(config)
    trainer = engine._build()
    rows = [len(trainer.plan(e)) for e in range(3)]
    trainer.dist.teardown()
    assert rows[0] == rows[2] > rows[1] + 5, rows
    summary = engine.train()
    metrics = read_metrics(tmp_path / "out")
    info = json.loads((tmp_path / "out" / "run_info.json").read_text())["data"]
    for epoch in range(3):
        steps = [m for m in metrics if m["epoch"] == epoch]
        assert len(steps) == math.ceil(rows[epoch] / 2)
        assert sum(m["samples"] for m in steps) == 30, f"epoch {epoch}: every sample once"
        assert sum(m["tokens"] for m in steps) == info["train_tokens"]
    assert summary["steps"] == len(metrics) == sum(math.ceil(r / 2) for r in rows)
