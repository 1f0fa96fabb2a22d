"""Loading semantics: `extends`, `--set`, relative paths, `Engine(dict)`, and the `validate` / `schema` verbs."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from arctic_vl.config.loader import LocatedConfig, load_file, merge
from arctic_vl.config.schema import load_config

BASE = """\
model:
  family: llava_next
  tiny: {layers: 2, hidden: 64}
  freeze: [vision]
data:
  sources:
    - data/train.json
  eval_sources:
    - path: data/eval.json
      image_root: images
  micro_batch_size: 2
trainer:
  max_steps: 5
  seed: 1
  output_dir: runs/base
optimizer:
  lr: 1.0e-3
  weight_decay: 0.1
callbacks:
  - type: throughput
  - type: progress
"""


def touch(root: Path, *names: str) -> None:
    """Create the files (and, for names ending in /, folders) a config names: they must exist to validate."""
    for name in names:
        path = root / name
        if name.endswith("/"):
            path.mkdir(parents=True, exist_ok=True)
        else:
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_text("[]\n")


@pytest.fixture
def tree(tmp_path: Path, write) -> Path:
    """tmp/base/base.yaml (paths under base/), tmp/exp/ for children; cwd is elsewhere (tmp/cwd)."""
    write("base/base.yaml", BASE)
    touch(tmp_path / "base", "data/train.json", "data/eval.json", "images/")
    return tmp_path


def test_extends_deep_merge_and_replacement(tree, write, monkeypatch):
    child = write("exp/child.yaml", """\
        extends: ../base/base.yaml
        model:
          tiny: {layers: 4}
        data:
          sources: [mine.json]
        trainer:
          max_steps: 7
        optimizer:
          lr: 0.5
        callbacks:
          - type: progress
        """)
    (tree / "cwd").mkdir()
    touch(tree, "exp/mine.json")
    monkeypatch.chdir(tree / "cwd")
    cfg = load_config(child)
    # mappings merge deeply
    assert cfg.model.tiny.given() == {"layers": 4, "hidden": 64}
    assert cfg.model.family == "llava_next" and cfg.model.freeze == ["vision"]
    assert (cfg.trainer.max_steps, cfg.trainer.seed) == (7, 1)
    assert (cfg.optimizer.lr, cfg.optimizer.weight_decay) == (0.5, 0.1)
    assert cfg.data.micro_batch_size == 2
    # lists replace
    assert cfg.data.sources == [str(tree / "exp" / "mine.json")]
    assert [c.type for c in cfg.callbacks] == ["progress"]
    # the base's own paths resolve against the base's directory, the child's against the child's
    (ev,) = cfg.data.eval_sources
    assert ev.path == str(tree / "base" / "data" / "eval.json")
    assert ev.image_root == str(tree / "base" / "images")
    assert cfg.trainer.output_dir == str(tree / "base" / "runs" / "base")
    assert cfg.source == str(child)


def test_base_paths_resolve_against_base_dir(tree, write, monkeypatch):
    child = write("exp/deeper/child.yaml", "extends: ../../base/base.yaml\ntrainer:\n  output_dir: out\n")
    monkeypatch.chdir(tree)
    cfg = load_config(child)
    assert cfg.data.sources == [str(tree / "base" / "data" / "train.json")]
    assert cfg.trainer.output_dir == str(tree / "exp" / "deeper" / "out")


def test_changed_type_replaces_section_whole(tmp_path, write):
    base = write("base.yaml", "scheduler:\n  type: cosine\n  warmup_ratio: 0.1\n  min_lr_ratio: 0.2\n")
    child = write("child.yaml", "extends: base.yaml\nscheduler:\n  type: linear\n")
    same = write("same.yaml", "extends: base.yaml\nscheduler:\n  type: cosine\n  min_lr_ratio: 0.5\n")
    assert load_file(child).data["scheduler"] == {"type": "linear"}
    assert load_file(same).data["scheduler"] == {"type": "cosine", "warmup_ratio": 0.1, "min_lr_ratio": 0.5}
    assert load_file(base).data["scheduler"]["warmup_ratio"] == 0.1
    # the same rule without files
    merged = merge(LocatedConfig({"a": {"type": "x", "k": 1}, "b": [1, 2]}),
                   LocatedConfig({"a": {"type": "y"}, "b": [3]}))
    assert merged.data == {"a": {"type": "y"}, "b": [3]}


def test_multi_level_and_list_extends(tmp_path, write):
    write("a/grand.yaml", "trainer:\n  seed: 1\n  max_steps: 1\n  epochs: 3\ndata:\n  sources: [g.json]\n")
    write("b/parent.yaml", "extends: ../a/grand.yaml\ntrainer:\n  max_steps: 2\n")
    write("other.yaml", "trainer:\n  epochs: 9\n  seed: 8\n")
    child = write("c/child.yaml", "extends: [../b/parent.yaml, ../other.yaml]\ntrainer:\n  seed: 3\n")
    located = load_file(child)
    assert located.data["trainer"] == {"seed": 3, "max_steps": 2, "epochs": 9}
    assert "extends" not in located.data
    # every value remembers the file (and line) that set it, and the directory its paths resolve against
    assert located.where(("trainer", "seed")).endswith("c/child.yaml:3")
    assert located.where(("trainer", "max_steps")).endswith("b/parent.yaml:3")
    assert located.where(("trainer", "epochs")).endswith("other.yaml:2")
    assert located.base_dir(("data", "sources", 0)) == tmp_path / "a"


def test_set_overrides(tmp_path, write, monkeypatch):
    cfg_file = write("exp/run.yaml", BASE.replace("model:\n", "model:\n  seed: 5\n"))
    work = tmp_path / "work"
    touch(tmp_path, "exp/data/train.json", "exp/data/eval.json", "exp/images/", "work/a.json", "work/sub/b.json")
    monkeypatch.chdir(work)
    cfg = load_config(cfg_file, [
        "trainer.max_steps=9",              # scalar
        "model.tiny.layers=3",              # nested, merges into the mapping
        "data.sources=[a.json, sub/b.json]",  # a list, in YAML syntax; paths against the cwd
        "trainer.max_grad_norm=0.5",        # a key the file does not have
        "scheduler.type=linear",            # a whole section the file does not have
        "optimizer={weight_decay: 0.0}",    # a mapping merges into the section
        "callbacks.0.type=tensorboard",     # a list item by index
        "model.freeze=[]",
    ])
    assert cfg.trainer.max_steps == 9
    assert cfg.model.tiny.given() == {"layers": 3, "hidden": 64}
    assert cfg.data.sources == [str(work / "a.json"), str(work / "sub" / "b.json")]
    assert cfg.trainer.max_grad_norm == 0.5
    assert cfg.scheduler.type == "linear"
    assert (cfg.optimizer.lr, cfg.optimizer.weight_decay) == (1e-3, 0.0)
    assert [c.type for c in cfg.callbacks] == ["tensorboard", "progress"]
    assert cfg.model.freeze == [] and cfg.model.seed == 5
    # values the file set still resolve against the file
    assert cfg.trainer.output_dir == str(tmp_path / "exp" / "runs" / "base")
    assert cfg._located.where(("trainer", "max_steps")) == "--set trainer.max_steps=9"


def test_set_later_wins_and_strings_stay_strings(good_yaml):
    cfg = load_config(good_yaml, ["trainer.seed=1", "trainer.seed=2", "data.system_prompt='007'",
                                  "model.attn_implementation=eager"])
    assert cfg.trainer.seed == 2
    assert cfg.data.system_prompt == "007"
    assert cfg.model.attn_implementation == "eager"


def test_engine_from_dict(in_tmp):
    from arctic_vl import Engine

    engine = Engine({"model": {"family": "llava_next"}, "data": {"sources": ["train.json"]},
                     "trainer": {"max_steps": 3}}, ["trainer.seed=4"])
    c = engine.config
    assert (c.trainer.max_steps, c.trainer.seed) == (3, 4)
    assert c.data.sources == [str(in_tmp / "train.json")]
    assert c.source is None
    assert engine.describe_model().startswith("tiny llava_next")
    # an EngineConfig is accepted as is, and round-trips through its dict
    assert Engine(c).config is c
    assert Engine(c.to_dict()).config.to_dict() == c.to_dict()


def test_validate_prints_resolved_config(good_yaml, cli):
    rc, out, err = cli("validate", str(good_yaml), "--set", "trainer.seed=11")
    assert rc == 0, err
    assert "# model: tiny llava_next" in out
    assert "# config OK" in out
    resolved = yaml.safe_load("\n".join(ln for ln in out.splitlines() if not ln.startswith("#")))
    assert set(resolved) >= {"model", "data", "trainer", "optimizer", "scheduler", "checkpoint", "callbacks",
                             "distributed", "eval"}
    assert resolved["data"]["sources"] == [str(good_yaml.parent / "train.json")]  # made absolute
    assert resolved["trainer"]["seed"] == 11 and resolved["trainer"]["max_steps"] == 2
    assert resolved["scheduler"]["type"] == "cosine"  # defaults filled in
    # the printed config is itself a valid config that resolves to the same thing
    again = good_yaml.parent / "again.yaml"
    again.write_text(yaml.safe_dump(resolved))
    assert load_config(again).to_dict() == load_config(good_yaml, ["trainer.seed=11"]).to_dict()


def test_schema_is_json_schema(good_yaml, cli):
    rc, out, err = cli("schema")
    assert rc == 0, err
    schema = json.loads(out)
    assert schema["type"] == "object" and schema["additionalProperties"] is False
    assert set(schema["required"]) == {"model", "data"}
    props = schema["properties"]
    for section in ("model", "data", "trainer", "optimizer", "scheduler", "checkpoint", "distributed"):
        assert props[section]["anyOf"], section
    assert props["callbacks"]["type"] == "array"
    assert "extends" in props and "eval" in props
    defs = schema["$defs"]
    assert defs["model.hf_vlm"]["properties"]["type"] == {"const": "hf_vlm"}
    assert defs["trainer.sft"]["additionalProperties"] is False
    assert "max_steps" in defs["trainer.sft"]["properties"]

    def refs(node):
        if isinstance(node, dict):
            if "$ref" in node:
                yield node["$ref"]
            for v in node.values():
                yield from refs(v)
        elif isinstance(node, list):
            for v in node:
                yield from refs(v)

    for ref in refs(schema):
        assert ref.startswith("#/$defs/") and ref[len("#/$defs/"):] in defs, ref
    good = load_config(good_yaml).to_dict()
    try:
        import jsonschema
    except ImportError:
        return
    jsonschema.validate(good, schema)
    with pytest.raises(jsonschema.ValidationError):
        jsonschema.validate({**good, "trainr": {}}, schema)


def test_help_is_quick_and_does_not_import_torch():
    code = "import sys, arctic_vl.cli; rc = arctic_vl.cli.main(['--help']); print(rc, 'torch' in sys.modules)"
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.splitlines()[-1] == "0 False"
    assert "usage: arctic_vl" in proc.stdout and "validate CONFIG" in proc.stdout


# ------------------------------------------------------------------ issue 19 (10): from a tiny recipe to a checkpoint


@pytest.fixture(scope="module")
def qwen3_checkpoint(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A small local Qwen3-VL checkpoint (the dense recipe's family)."""
    from arctic_vl.models.tiny import make_tiny_model

    return make_tiny_model("qwen3_vl", tmp_path_factory.mktemp("qwen3"), seed=0, layers=1, hidden=32, heads=2,
                           kv_heads=1, intermediate=64, vision_layers=1, vision_hidden=32)


def _recipe_child(tmp_path: Path, model: str, trainer: str = "") -> Path:
    from tests.e2e_utils import REPO

    touch(tmp_path, "train.jsonl", "eval.jsonl")
    child = tmp_path / "child.yaml"
    child.write_text(f"extends: {REPO / 'projects/dense_caption/configs/small-cpu.yaml'}\nmodel: {model}\n"
                     f"data: {{sources: [train.jsonl], eval_sources: [eval.jsonl]}}\n{trainer}")
    return child


def test_child_of_a_tiny_recipe_switches_to_a_checkpoint_with_nulls(tmp_path, qwen3_checkpoint):
    """A null in the child unsets the inherited key (its default applies): the dense small-cpu recipe's tiny
    qwen3_vl becomes a local checkpoint with `family: null, tiny: null`; a null where the field may hold None
    stays that value (`max_grad_norm: null`: no clipping, not the default 1.0)."""
    child = _recipe_child(tmp_path, f"{{family: null, tiny: null, name_or_path: {qwen3_checkpoint}}}",
                          "trainer: {max_grad_norm: null}\n")
    cfg = load_config(child)
    assert cfg.model.name_or_path == str(qwen3_checkpoint)
    assert cfg.model.family is None and cfg.model.tiny.given() == {}
    assert cfg.model.freeze == ["vision"]  # the rest of the recipe's model section is inherited
    assert cfg.trainer.max_grad_norm is None and cfg.trainer.max_steps == 2500
    assert cfg.to_dict()["model"]["tiny"] == {}


@pytest.mark.parametrize("model, message", [
    ("{family: null, name_or_path: CKPT}", "model.tiny: tiny: only applies with family (an inline tiny model); "
                                           "with name_or_path, unset an inherited tiny shape with `tiny: null`"),
    ("{tiny: null, name_or_path: CKPT}", "model.name_or_path: give name_or_path or family, not both (a config that "
                                         "extends a tiny recipe and names a checkpoint unsets the inherited keys: "
                                         "`family: null, tiny: null`)"),
])
def test_child_that_keeps_a_tiny_key_is_told_how_to_unset_it(tmp_path, qwen3_checkpoint, model, message):
    from arctic_vl.errors import ConfigError

    child = _recipe_child(tmp_path, model.replace("CKPT", str(qwen3_checkpoint)))
    with pytest.raises(ConfigError) as e:
        load_config(child)
    assert message in str(e.value)


def test_null_for_a_field_that_cannot_be_null_means_its_default(tmp_path, write):
    """Nested models and list items too: `nan_guard: {lr_factor: null}` and a param group's `weight_decay: null`."""
    touch(tmp_path, "train.json")
    cfg = load_config(write("run.yaml", """\
        model: {family: llava_next, tiny: null, freeze: null}
        data: {sources: [train.json]}
        trainer: {nan_guard: {lr_factor: null}, log_every_n_steps: null}
        eval: {max_new_tokens: null, every_n_steps: null}
        """))
    assert cfg.model.tiny.given() == {} and cfg.model.freeze == []
    assert cfg.trainer.nan_guard.lr_factor == 0.5 and cfg.trainer.log_every_n_steps == 1
    assert cfg.eval.max_new_tokens == 16 and cfg.eval.every_n_steps is None
