"""The configs a new user starts from: one per family under configs/, the base they extend, the README's example
config, and the README's verb table."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

from tests.e2e_utils import REPO

CONFIGS = REPO / "configs"
FAMILY_CONFIGS = ("llava", "llava_next", "llava_onevision", "qwen2_vl", "qwen2_5_vl", "qwen3_vl")


@pytest.fixture(scope="module")
def tiny_dirs(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """One small tiny checkpoint per family, built when first asked for."""
    from arctic_vl.models.tiny import make_tiny_model

    class Lazy(dict):
        def __missing__(self, family: str) -> Path:
            self[family] = make_tiny_model(family, tmp_path_factory.mktemp(family), seed=0, layers=1, hidden=32,
                                           heads=2, kv_heads=1, intermediate=64, vision_layers=1, vision_hidden=32)
            return self[family]

    return Lazy()


def test_every_family_has_a_config():
    from arctic_vl.models.families import FAMILIES

    assert set(FAMILY_CONFIGS) == set(FAMILIES)
    shipped = {p.stem for p in CONFIGS.glob("*.yaml")}
    assert shipped == {*FAMILY_CONFIGS, "base", "shapes-llava-cpu"}


@pytest.mark.parametrize("family", FAMILY_CONFIGS)
def test_family_config_validates_and_encodes_with_a_local_checkpoint(family, tiny_dirs, synthetic_data, cli):
    """With the user's checkpoint directory set (a tiny one of the family here) and data that exist, the
    config validates, and inspect-data encodes samples with the family's processor (the data keys fit it)."""
    from arctic_vl.config.loader import load_file

    path = CONFIGS / f"{family}.yaml"
    text = path.read_text()
    assert "\nextends: base.yaml\n" in text
    model = load_file(path).data["model"]
    assert model["name_or_path"].startswith("../checkpoints/"), "a local directory the user fills"
    assert model["lora"]["parts"] and model["freeze"], "LoRA and freezing are spelled out"
    assert "# lora:" in text and "# freeze:" in text
    sets = ["--set", f"model.name_or_path={tiny_dirs[family]}",
            "--set", f"data.sources=[{{path: {synthetic_data / 'train.llava.json'}, sample: 'first:4'}}]",
            "--set", f"data.eval_sources=[{synthetic_data / 'heldout.llava.json'}]"]
    rc, out, err = cli("validate", str(path), *sets)
    assert rc == 0, err
    assert f"# model: {family} from {tiny_dirs[family]}" in out
    assert "lora:" in out and "freeze:\n  - vision" in out and "tensorboard" in out  # base.yaml merged in
    rc, out, err = cli("inspect-data", str(path), *sets)
    assert rc == 0, err
    assert "train: 4 samples" in out and "[[" in out


def test_family_config_refuses_the_placeholder_checkpoint(cli):
    """Without a checkpoint at the placeholder path, validation says where to put it (exit 2)."""
    path = CONFIGS / "qwen2_5_vl.yaml"
    line = next(i for i, t in enumerate(path.read_text().splitlines(), 1) if t.strip().startswith("name_or_path:"))
    rc, _, err = cli("validate", str(path))
    assert rc == 2 and "Traceback" not in err
    assert f"qwen2_5_vl.yaml:{line}: model.name_or_path:" in err and "checkpoints/Qwen2.5-VL-7B-Instruct" in err


def test_readme_example_config_extends_base_and_validates(tmp_path, tiny_llava, cli):
    """The README's config, placed where its relative paths point (two folders below configs/), validates."""
    readme = (REPO / "README.md").read_text()
    section = readme.split("## A config reads like the run it describes", 1)[1]
    example = re.search(r"```yaml\n(.*?)```", section, re.S).group(1)
    assert example.startswith("extends: ../../configs/base.yaml")
    (tmp_path / "configs").mkdir()
    (tmp_path / "configs" / "base.yaml").write_text((CONFIGS / "base.yaml").read_text())
    run = tmp_path / "projects" / "mine" / "run.yaml"
    for rel in ("data/train.llava.json", "data/chat.messages.jsonl", "data/heldout.llava.json"):
        (run.parent / rel).parent.mkdir(parents=True, exist_ok=True)
        (run.parent / rel).write_text("[]\n")
    (tmp_path / "projects" / "models").mkdir()
    (tmp_path / "projects" / "models" / "tiny-llava").symlink_to(tiny_llava)
    run.write_text(example)
    rc, out, err = cli("validate", str(run))
    assert rc == 0, err
    assert "# model: llava_next from" in out and "warmup_ratio: 0.03" in out


def test_readme_verb_table_lists_every_core_verb():
    from arctic_vl.cli import COMMANDS

    readme = (REPO / "README.md").read_text()
    table = readme.split("## Command line", 1)[1].split("\n\n", 2)[1]
    listed = {v for row in table.splitlines() for v in re.findall(r"`([a-z][a-z-]*)[^`]*`", row.split("|")[1])}
    assert set(COMMANDS) <= listed, sorted(set(COMMANDS) - listed)
