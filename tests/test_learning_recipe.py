"""The learning recipe's pieces: its config, the synthetic-data and tiny-model options it uses, and a
toy-size smoke run of bench/learning.py (the recipe next to its blind baseline)."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest

from tests.e2e_utils import REPO, run_python

RECIPE = REPO / "configs" / "shapes-llava-cpu.yaml"


def test_recipe_config_is_a_plain_llava_next_with_a_llama(synthetic_data: Path):
    from arctic_vl.config.loader import load_file
    from arctic_vl.config.schema import load_config
    from arctic_vl.models.tiny import tiny_config

    raw = load_file(RECIPE).data["data"]
    sources = [(RECIPE.parent / s).resolve() for s in raw["sources"] + raw["eval_sources"]]
    assert all(p.is_relative_to(REPO / "data") for p in sources), "sources point at data/ next to the configs"
    # the data must exist to validate: the synthetic set of the tests stands in for data/shapes
    cfg = load_config(RECIPE, [f"data.sources=[{synthetic_data / 'train.llava.json'}]",
                               f"data.eval_sources=[{synthetic_data / 'heldout.llava.json'}]"])
    assert cfg.model.type == "hf_vlm" and cfg.model.family == "llava_next"
    text = tiny_config("llava_next", **cfg.model.tiny.given()).text_config
    assert text.model_type == "llama"  # swiftkv_vl distils a teacher trained with this recipe
    assert cfg.eval.generate and cfg.eval.max_samples is None  # final figures on the whole held-out split


def test_questions_per_image_adds_turns_the_scene_answers(tmp_path: Path):
    from arctic_vl.data.synthetic import make_synthetic_data

    make_synthetic_data(tmp_path, n=60, seed=1, heldout=20, questions_per_image=4)
    train = json.loads((tmp_path / "train.llava.json").read_text())
    dense = {d["id"]: d for d in map(json.loads, (tmp_path / "train.dense.jsonl").read_text().splitlines())}
    turns = [len(r["conversations"]) // 2 for r in train if "image" in r]
    assert max(turns) == 4 and min(turns) >= 2  # every scene answers at least a count and a colour question
    checked = 0
    for r in train:
        if "image" not in r:
            assert len(r["conversations"]) == 2
            continue
        objects = [o for o in dense[r["id"]]["objects"] if "line" not in o]
        descs = [o["desc"] for o in objects]
        conv = r["conversations"]
        for q, a in zip(conv[2::2], conv[3::2]):
            q, a = q["value"], a["value"]
            if q == "How many shapes are there?":
                assert a == ["one", "two", "three"][len(objects) - 1]
            elif m := re.fullmatch(r"What colour is the (\w+)\?", q):
                assert f"{a} {m.group(1)}" in descs or (
                    m.group(1) == "shape" and descs == [f"{a} {descs[0].split()[1]}"]
                )
            elif m := re.fullmatch(r"What shape is the (\w+) object\?", q):
                assert f"{m.group(1)} {a}" in descs
            elif q == "What shape is shown?":
                assert descs[0].split()[1] == a and len(descs) == 1
            else:
                assert re.fullmatch(r"Is the .+ (on the left or the right|at the top or the bottom)\?", q), q
                assert a in ("left", "right", "top", "bottom")
            checked += 1
    assert checked > 60
    heldout = json.loads((tmp_path / "heldout.llava.json").read_text())
    assert all(len(r["conversations"]) == 2 for r in heldout), "held-out records keep one question"


def test_anyres_grid_one_tile(tmp_path: Path):
    from arctic_vl.data.encoding import SampleEncoder
    from arctic_vl.models.families import FAMILIES
    from arctic_vl.models.loading import load_processor
    from arctic_vl.models.tiny import make_tiny_model, tiny_config

    assert tiny_config("llava_next", image_size=64, anyres_grid=1).image_grid_pinpoints == [[64, 64]]
    assert tiny_config("llava_next", image_size=32, anyres_grid=2).image_grid_pinpoints == [
        [32, 32], [32, 64], [64, 32], [64, 64]]
    with pytest.raises(ValueError, match="anyres_grid applies to the LLaVA families"):
        tiny_config("qwen2_vl", anyres_grid=1)
    path = make_tiny_model("llava_next", tmp_path, layers=1, hidden=32, heads=2, kv_heads=1, intermediate=64,
                           vision_layers=1, vision_hidden=32, image_size=64, patch_size=16, anyres_grid=1)
    encoder = SampleEncoder(load_processor(path), FAMILIES["llava_next"])
    # a 64x64 image: base tile 4x4 + one 4x4 tile with a newline per row = 16 + 16 + 4
    assert encoder.image_token_count(64, 64) == 36


BENCH = r"""
import runpy, sys
sys.argv = ["bench/learning.py", *sys.argv[1:]]
runpy.run_path("bench/learning.py", run_name="__main__")
"""


def test_learning_bench_smoke(synthetic_data: Path, tmp_path: Path):
    sets = [f"data.sources=[{synthetic_data / 'train.llava.json'}]",
            f"data.eval_sources=[{synthetic_data / 'heldout.llava.json'}]",
            "trainer.max_steps=2", "eval.max_samples=6", "data.micro_batch_size=4",
            "model.tiny.layers=1", "model.tiny.hidden=32", "model.tiny.heads=2", "model.tiny.kv_heads=1",
            "model.tiny.intermediate=64", "model.tiny.vision_layers=1", "model.tiny.vision_hidden=32"]
    args = [a for s in sets for a in ("--set", s)]
    proc = run_python(BENCH, str(RECIPE), *args, "--out", str(tmp_path / "runs"), "--json", str(tmp_path / "rows.json"),
                      cwd=REPO, timeout=600)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-3000:]
    rows = json.loads((tmp_path / "rows.json").read_text())
    assert [r["name"] for r in rows] == ["recipe", "recipe-blind"]
    assert all(r["steps"] == 2 and r["questions"] == 6 and 0 <= r["exact_match"] <= 1 for r in rows)
    delta = 100 * (rows[0]["exact_match"] - rows[1]["exact_match"])
    assert f"delta_vs_blind={delta:.1f} points" in proc.stdout
    header = proc.stdout.splitlines()[0].split()
    assert rows[0]["by_type"] and all(t[:8] in header for t in rows[0]["by_type"])  # a column per question type


def test_data_command_is_the_same_everywhere():
    """The recipe's config, docs/learning.md and the swiftkv_vl teacher-distillation config name one data
    command (they all read data/shapes), and it is the one that makes the multi-turn training mix."""
    def commands(path: Path) -> set[str]:
        found = re.findall(r"arctic_vl make-synthetic-data data/shapes [^#`\n]*", path.read_text())
        return {c.strip() for c in found}

    recipe = commands(RECIPE)
    assert recipe == {
        "arctic_vl make-synthetic-data data/shapes --n 30000 --seed 0 --heldout 500 --questions-per-image 3"
    }
    assert commands(REPO / "docs" / "learning.md") == recipe
    assert commands(REPO / "projects" / "swiftkv_vl" / "configs" / "distill-sft-teacher.yaml") == recipe
