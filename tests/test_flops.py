"""Model FLOPs per step (issue 23 item 5): the formula against a hand count of a tiny Qwen2-VL (language model and
vision tower, padded and packed rows, frozen towers), the GPU peak table, and `mfu` in metrics.jsonl."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from pydantic import ValidationError

from arctic_vl.models.flops import FlopsModel, device_peak_tflops, known_peak_tflops, probe_peak_tflops
from tests.e2e_utils import read_metrics, write_yaml


def _qwen():
    from transformers import AutoModelForImageTextToText

    from arctic_vl.models.families import get_family, part_of
    from arctic_vl.models.tiny import tiny_config

    spec = get_family("qwen2_vl")
    config = tiny_config("qwen2_vl")
    torch.manual_seed(0)
    model = AutoModelForImageTextToText.from_config(config)
    return model, config, spec, lambda name: part_of(spec, name)


def _hand_weights(config) -> dict[str, int]:
    """Matmul weights (no biases, no embeddings) by part, counted from the config values."""
    t, v = config.get_text_config(), config.vision_config
    h, heads, kv, inter = t.hidden_size, t.num_attention_heads, t.num_key_value_heads, t.intermediate_size
    hd = h // heads
    layer = h * h + 2 * h * kv * hd + h * h + 3 * h * inter  # q, k, v, o; gate, up, down
    e, m = v.embed_dim, v.spatial_merge_size
    patch = e * v.in_channels * v.temporal_patch_size * v.patch_size ** 2  # the Conv3d patch embedding
    block = 3 * e * e + e * e + 2 * e * (e * v.mlp_ratio)  # qkv, proj; fc1, fc2
    merged = e * m * m
    return {"llm": t.num_hidden_layers * layer, "head": t.vocab_size * h, "vision": patch + v.depth * block,
            "aligner": merged * merged + t.hidden_size * merged}


GRID = [[1, 4, 4], [2, 2, 2]]  # image 1: one 4x4 frame; image 2: two 2x2 frames
PATCHES = 16 + 8
VISION_SEG_SQ = 16 ** 2 + 4 ** 2 + 4 ** 2  # the tower attends per frame


def _expected(config, weights, tokens, text_seg_sq, labels, *, mult=None, attn=(3, 3)):
    t, v = config.get_text_config(), config.vision_config
    mult = mult or {"llm": 6, "head": 6, "vision": 6, "aligner": 6}
    llm = (mult["llm"] * weights["llm"] * tokens + mult["head"] * weights["head"] * labels
           + attn[0] * 4 * t.num_hidden_layers * t.hidden_size * text_seg_sq)  # heads * head_dim = hidden here
    vision = (mult["vision"] * weights["vision"] * PATCHES
              + mult["aligner"] * weights["aligner"] * (PATCHES // v.spatial_merge_size ** 2)
              + attn[1] * 4 * v.depth * v.embed_dim * VISION_SEG_SQ)
    return llm, vision


def test_padded_batch_flops_match_a_hand_count():
    model, config, spec, part_of = _qwen()
    ids = torch.full((2, 12), 5)
    mask = torch.ones(2, 12, dtype=torch.long)
    mask[1, 7:] = 0  # real lengths 12 and 7
    labels = torch.full((2, 12), -100)
    labels[0, 6:] = 7  # 6 label positions after the shift
    labels[1, 3:7] = 7  # 4
    batch = {"input_ids": ids, "attention_mask": mask, "labels": labels, "image_grid_thw": torch.tensor(GRID)}
    got = FlopsModel.from_model(model, part_of, spec).batch_flops(batch)
    llm, vision = _expected(config, _hand_weights(config), 19, 12 ** 2 + 7 ** 2, 10)
    assert (got.llm, got.vision) == (llm, vision)
    assert got.total == llm + vision and 0 < vision < got.total


def test_packed_row_counts_each_segment_and_drops_the_row_padding():
    model, config, spec, part_of = _qwen()
    pos = torch.cat([torch.arange(5), torch.arange(7), torch.arange(3)])[None]  # samples of 5 and 7, padding 3
    ids = torch.tensor([[9] * 12 + [0] * 3])
    labels = torch.full((1, 15), -100)
    labels[0, 1:5] = 7
    labels[0, 6:12] = 7  # 4 + 6 label positions
    qwen_pos = torch.cat([pos[None]] * 4)  # (4, B, T) as the packing collator gives Qwen
    batch = {"input_ids": ids, "labels": labels, "position_ids": qwen_pos, "image_grid_thw": torch.tensor(GRID),
             "_num_tokens": 12}
    got = FlopsModel.from_model(model, part_of, spec).batch_flops(batch)
    assert (got.llm, got.vision) == _expected(config, _hand_weights(config), 12, 5 ** 2 + 7 ** 2, 10)


@pytest.mark.parametrize("frozen", [("vision",), ("vision", "aligner")])
def test_frozen_parts_count_forward_only_below_the_first_trained_part(frozen):
    model, config, spec, part_of = _qwen()
    for name, p in model.named_parameters():
        p.requires_grad_(part_of(name) not in frozen)
    batch = {"input_ids": torch.full((1, 9), 5), "attention_mask": torch.ones(1, 9, dtype=torch.long),
             "labels": torch.full((1, 9), 7), "image_grid_thw": torch.tensor(GRID)}
    got = FlopsModel.from_model(model, part_of, spec).batch_flops(batch)
    # no gradient reaches the frozen tower (nothing before it trains): forward only (2 per weight, attention x1)
    mult = {"llm": 6, "head": 6, "vision": 2, "aligner": 2 if "aligner" in frozen else 6}
    assert (got.llm, got.vision) == _expected(config, _hand_weights(config), 9, 81, 8, mult=mult, attn=(3, 1))


def test_peak_table_config_and_probe():
    assert known_peak_tflops("NVIDIA H100 80GB HBM3") == 989.0
    assert known_peak_tflops("NVIDIA H100 PCIe") == 756.0
    assert known_peak_tflops("NVIDIA A100-SXM4-80GB") == 312.0
    assert known_peak_tflops("NVIDIA A10G") == 70.0
    assert known_peak_tflops("Some Future Chip") is None
    assert device_peak_tflops(torch.device("cpu"), torch.float32, 2.5) == (2.5, "trainer.peak_tflops")
    assert probe_peak_tflops(n=32, seconds=0.01) > 0


def test_peak_tflops_must_be_positive():
    from arctic_vl.trainers.base import TrainerConfig

    with pytest.raises(ValidationError, match="peak_tflops"):
        TrainerConfig.model_validate({"peak_tflops": 0})


def test_metrics_carry_mfu(tiny_llava: Path, synthetic_data: Path, tmp_path: Path):
    from arctic_vl import Engine

    cfg = {"model": {"name_or_path": str(tiny_llava)},
           "data": {"sources": [{"path": str(synthetic_data / "train.llava.json"), "sample": "first:4"}],
                    "micro_batch_size": 2},
           "trainer": {"output_dir": str(tmp_path / "out"), "max_steps": 2, "progress_bar": False,
                       "peak_tflops": 0.5},
           "checkpoint": {"every_n_steps": None, "export_final": False}}
    Engine(write_yaml(tmp_path / "run.yaml", cfg)).train()
    m = read_metrics(tmp_path / "out")
    assert len(m) == 2
    for x in m:
        assert x["flops_per_step"] > 0 and 0 < x["vision_flops_share"] < 1
        assert x["tflops"] == pytest.approx(x["flops_per_step"] / (x["step_time_s"] + x["data_time_s"]) / 1e12)
        assert x["mfu"] == pytest.approx(x["tflops"] / 0.5)


def test_llava_next_vision_counts_the_tiles_each_image_runs():
    from transformers import AutoModelForImageTextToText

    from arctic_vl.models.families import get_family, part_of
    from arctic_vl.models.tiny import tiny_config

    spec, config = get_family("llava_next"), tiny_config("llava_next")
    torch.manual_seed(0)
    model = AutoModelForImageTextToText.from_config(config)
    v, size = config.vision_config, config.vision_config.image_size
    # any-res: a 32x64 image is 2 tiles + the base view, a 64x64 one 4 + 1; the tensor pads both to 5 tiles
    tiles = (2 + 1) + (4 + 1)
    batch = {"input_ids": torch.full((1, 4), 5), "attention_mask": torch.ones(1, 4, dtype=torch.long),
             "labels": torch.full((1, 4), 7), "pixel_values": torch.zeros(2, 5, 3, size, size),
             "image_sizes": torch.tensor([[32, 64], [64, 64]])}
    got = FlopsModel.from_model(model, lambda n: part_of(spec, n), spec).batch_flops(batch)
    e, patches = v.hidden_size, (size // v.patch_size) ** 2
    seq = patches + 1  # CLIP's class token
    tower = e * 3 * v.patch_size ** 2 + v.num_hidden_layers * (4 * e * e + 2 * e * v.intermediate_size)
    projector = e * config.text_config.hidden_size + config.text_config.hidden_size ** 2
    expected = (6 * tower * tiles * seq + 6 * projector * tiles * patches
                + 3 * 4 * v.num_hidden_layers * e * tiles * seq ** 2)
    assert got.vision == expected
