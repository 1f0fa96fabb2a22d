"""The README says what the code does (issue 19: 17 and the items it documents): where cheap, each claim is checked
against the code or the shipped configs it describes."""

from __future__ import annotations

import re
import typing
from pathlib import Path

import pytest

from tests.e2e_utils import REPO

README = (REPO / "README.md").read_text()
#: how the README names a family
FAMILY_NAMES = {"LLaVA-1.5": "llava", "LLaVA-NeXT": "llava_next", "LLaVA-OneVision": "llava_onevision",
                "Qwen2-VL": "qwen2_vl", "Qwen2.5-VL": "qwen2_5_vl", "Qwen3-VL": "qwen3_vl"}


def _figures_rows() -> list[str]:
    section = README.split("## Figures", 1)[1].split("\n## ", 1)[0]
    return [line for line in section.splitlines() if line.startswith("| ")]


@pytest.mark.parametrize("project", ["bbu_detection", "dense_caption"])
def test_figures_name_each_recipes_family(project):
    """`| dense_caption: tiny Qwen3-VL ...`: the family the figures name is the one the recipe's config trains."""
    from arctic_vl.config.loader import load_file

    (row,) = [r for r in _figures_rows() if r.startswith(f"| {project}: tiny ")]
    named = re.match(rf"\| {project}: tiny (\S+)", row).group(1)
    recipe = re.search(r"`arctic_vl (projects/\S+\.yaml)", row).group(1)
    assert FAMILY_NAMES[named] == load_file(REPO / recipe).data["model"]["family"]


def test_install_says_which_torch_build_the_pin_gets():
    """The README's pin is constraints.txt's; it says a CUDA build is what the pin installs off these machines and how
    to get the CPU build; the line CI runs names no other index (no host a CI machine cannot reach)."""
    pin = re.search(r"^torch==(\S+)$", (REPO / "constraints.txt").read_text(), re.M).group(1)
    quick = README.split("## Quick start", 1)[1].split("\n## ", 1)[0]
    assert f"`torch=={pin}` is the CUDA build" in " ".join(quick.split())
    assert f"pip install torch=={pin} --index-url https://download.pytorch.org/whl/cpu" in quick
    commands = re.search(r"```bash\n(.*?)```", quick, re.S).group(1).splitlines()
    ci_line = [c for c in commands if "pytest" in c]
    assert ci_line and all("--index-url" not in c and "http" not in c for c in commands)
    assert "CPU torch pinned" not in README


def test_exports_processor_claim_matches_the_code(tmp_path: Path):
    """The Qwen and OneVision families save transformers' own processor class (AutoProcessor needs torchvision for
    it, as the README says) and `arctic_vl.load_processor`, which the README names, loads it without torchvision."""
    import importlib.util
    import json

    import arctic_vl
    from arctic_vl.models.processors import PROCESSOR_CLASSES
    from arctic_vl.models.tiny import make_tiny_model

    assert "`arctic_vl.load_processor(final)` loads them everywhere" in " ".join(README.split())
    assert "load_processor" in arctic_vl.__all__
    out = make_tiny_model("qwen2_vl", tmp_path / "q", seed=0, layers=1, hidden=32, heads=2, kv_heads=1,
                          intermediate=64, vision_layers=1, vision_hidden=32)
    saved = json.loads((out / "processor_config.json").read_text())["processor_class"]
    assert saved == "Qwen2VLProcessor", "transformers' own class, whose video processor needs torchvision"
    assert importlib.util.find_spec("torchvision") is None
    processor = arctic_vl.load_processor(out)
    assert type(processor) is PROCESSOR_CLASSES["qwen2_vl"] and processor.image_token == "<|image_pad|>"


def test_resume_policy_values_are_the_documented_ones():
    from arctic_vl.trainers.base import RESUME_MAY_CHANGE, TrainerConfig

    values = typing.get_args(TrainerConfig.model_fields["resume"].annotation)
    assert values == ("auto", "never", "must")
    row = next(line for line in README.splitlines() if line.startswith("| `arctic_vl CONFIG` / `train CONFIG`"))
    assert all(f"`{v}`" in row for v in values) and "trainer.resume" in row
    assert "trainer.resume" in RESUME_MAY_CHANGE


def test_the_readme_step_line_claims_hold():
    """The step line and result table the README describes (format from trainers/report.py)."""
    from arctic_vl.trainers.report import MAX_RESULT_ROWS, format_step_line

    flat = " ".join(README.split())
    assert f"at most {MAX_RESULT_ROWS} rows" in flat
    line = format_step_line(1, 2, {"loss": 1.0, "lr": 0.1, "kl_loss": 0.5}, ["kl_loss"])
    assert line == "step 1/2 loss 1.0000 (kl_loss 0.5000) lr 1.00e-01"
