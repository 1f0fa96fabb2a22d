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


# ------------------------------------------------------------------- inspect-data shows what trains
PROJECTS = REPO / "projects"
#: every shipped config that runs on tiny models and the synthetic data (the family configs with a tiny checkpoint
#: swapped in); qwen2_5_vl+packing: the same config with packing on (packed rows, mRoPE positions)
INSPECTED = (*FAMILY_CONFIGS, "qwen2_5_vl+packing", "shapes-llava-cpu", "bbu_detection/small-cpu",
             "dense_caption/small-cpu", "dense_caption/small-cpu-gkd", "dense_caption/small-cpu-stage-b",
             "swiftkv_vl/small-cpu")


@pytest.fixture(scope="module")
def bbu_records(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The bbu_detection project's synthetic teacher/student records (24 train, 8 held out)."""
    from bbu_detection.synthetic import make_detection_data

    out = tmp_path_factory.mktemp("bbu")
    make_detection_data(out, n=24, heldout=8, seed=0)
    return out


def _inspected_run(name: str, tmp_path: Path, tiny_dirs: dict[str, Path], synthetic_data: Path,
                   bbu_records: Path) -> tuple[Path, list[str]]:
    """(config path, overrides) of shipped config `name` at toy size: local data, a tiny model, a fresh run dir."""
    out = [f"trainer.output_dir={tmp_path / 'run'}"]
    llava = [f"data.sources=[{{path: {synthetic_data / 'train.llava.json'}, sample: 'first:8'}}]",
             "data.eval_sources=[]"]
    dense = [f"data.sources=[{{path: {synthetic_data / 'train.dense.jsonl'}, sample: 'first:24'}}]",
             "data.eval_sources=[]", "data.micro_batch_size=4"]
    family = name.split("+")[0]
    if family in FAMILY_CONFIGS:
        extra = ["data.packing=true", "data.max_length=512", "data.micro_batch_size=2"] if "+packing" in name else []
        return CONFIGS / f"{family}.yaml", [f"model.name_or_path={tiny_dirs[family]}", *llava, *out, *extra]
    if name == "shapes-llava-cpu":
        return CONFIGS / "shapes-llava-cpu.yaml", [*llava, *out, "data.micro_batch_size=4"]
    project, config = name.split("/")
    path = PROJECTS / project / "configs" / f"{config}.yaml"
    if project == "bbu_detection":
        return path, [f"data.sources=[{bbu_records / 'train.bbu.jsonl'}]", "data.eval_sources=[]", *out]
    if project == "swiftkv_vl":
        return path, [*llava, *out, "data.micro_batch_size=4"]
    if config == "small-cpu":
        return path, [*dense, *out]
    model = [f"model.name_or_path={tiny_dirs['qwen3_vl']}"]  # small-cpu's final/ in the recipe
    if config == "small-cpu-gkd":
        return path, [*model, *dense, *out]
    from dense_caption.inference import make_stage_data

    stage = make_stage_data(synthetic_data / "train.dense.jsonl", tmp_path / "stage", 2, 0)["out_dir"]
    sources = (f"data.sources=[{{path: {synthetic_data / 'train.dense.jsonl'}, sample: 'first:8'}}, "
               f"{{path: {Path(stage) / 'stage_b.messages.jsonl'}, sample: 'first:8'}}]")
    return path, [*model, sources, "data.eval_sources=[]", "data.micro_batch_size=4", *out]


@pytest.mark.parametrize("name", INSPECTED)
def test_inspect_data_shows_the_first_training_batch(name, tmp_path, tiny_dirs, synthetic_data, bbu_records, cli):
    """What `inspect-data` shows is what trains: its items are the first micro-batch the training loader yields
    at epoch 0 (same tokens, same labels, after the factory's own augmentation and rendering), for the core's
    factory and every project's."""
    from arctic_vl.commands.inspect_data import inspect, render_tokens
    from arctic_vl.engine import Engine

    path, overrides = _inspected_run(name, tmp_path, tiny_dirs, synthetic_data, bbu_records)
    sets = [a for o in overrides for a in ("--set", o)]
    rc, out, err = cli("inspect-data", str(path), *sets, "--n", "2")
    assert rc == 0, err
    engine = Engine(path, overrides)
    try:
        trainer = engine._build()
        first = trainer.plan(0)[0][0]
        batch = next(iter(trainer.loader(0, 0)))
    finally:
        engine.release_lock()
    shown = inspect(path, overrides, n=len(first))
    assert [item.key for item in shown.items] == list(first)
    ids, labels = batch["input_ids"], batch["labels"]
    rows: dict[int, list] = {}
    for b, item in enumerate(shown.items):  # packed: items of a row are laid end to end in it
        rows.setdefault(item.key[0] if isinstance(item.key, tuple) else b, []).append(item)
    for r, items in rows.items():
        want_ids = [t for item in items for t in item.input_ids]
        want_labels = [t for item in items for t in item.labels]
        n = len(want_ids)
        assert ids[r, :n].tolist() == want_ids and labels[r, :n].tolist() == want_labels, (name, r)
        assert (labels[r, n:] == -100).all()  # the rest of the row is padding
    # and the CLI prints the first trained item exactly
    tokenizer = trainer.bundle.processor.tokenizer
    image_ids = {tokenizer.convert_tokens_to_ids(trainer.bundle.family.image_token)}
    first_item = shown.items[0]
    assert render_tokens(tokenizer, first_item.input_ids, first_item.labels, image_ids) in out
    assert f"--- {first_item.where}: {len(first_item.input_ids)} tokens" in out


def test_inspect_data_reads_no_weights(tmp_path, tiny_dirs, synthetic_data, cli):
    """The model a data build is handed is made from its config (meta device): a checkpoint directory without its
    weight files still inspects, LoRA and freezing of the shipped config included."""
    import shutil

    model = tmp_path / "no-weights"
    shutil.copytree(tiny_dirs["qwen2_5_vl"], model, ignore=shutil.ignore_patterns("*.safetensors*"))
    assert not list(model.glob("*.safetensors"))
    sets = ["--set", f"model.name_or_path={model}", "--set", f"trainer.output_dir={tmp_path / 'run'}",
            "--set", f"data.sources=[{{path: {synthetic_data / 'train.llava.json'}, sample: 'first:4'}}]",
            "--set", "data.eval_sources=[]"]
    rc, out, err = cli("inspect-data", str(CONFIGS / "qwen2_5_vl.yaml"), *sets)
    assert rc == 0, err
    assert "train: 4 samples" in out and "[[" in out
