"""The plugin is discovered through its entry point, and `arctic_vl validate` rejects impossible settings (exit 2).

Validation is pure: the teachers here are directories holding only a config.json.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml

torch.set_num_threads(1)

CONFIGS = Path(__file__).resolve().parents[1] / "configs"


def _teacher(tmp_path: Path, name: str = "teacher", model_type: str = "llava_next", text_type: str = "llama",
             layers: int = 4) -> Path:
    d = tmp_path / name
    d.mkdir()
    (d / "config.json").write_text(json.dumps(
        {"model_type": model_type, "text_config": {"model_type": text_type, "num_hidden_layers": layers}}))
    return d


def _config(tmp_path: Path, model: dict, trainer: dict | None = None) -> Path:
    (tmp_path / "train.json").write_text("[]\n")
    path = tmp_path / "run.yaml"
    path.write_text(yaml.safe_dump({"model": {"type": "swiftkv_vl", **model}, "data": {"sources": ["train.json"]},
                                    "trainer": {"type": "swiftkv_vl", **(trainer or {})}}, sort_keys=False))
    return path


def _validate(path: Path, capsys: pytest.CaptureFixture[str], *overrides: str) -> tuple[int, str, str]:
    from arctic_vl.cli import main

    capsys.readouterr()
    args = ["validate", str(path)]
    for o in overrides:
        args += ["--set", o]
    rc = main(args)
    out, err = capsys.readouterr()
    return rc, out, err


def _line_of(path: Path, key: str) -> int:
    return next(i for i, line in enumerate(path.read_text().splitlines(), 1) if line.strip().startswith(f"{key}:"))


def test_plugin_is_discovered_and_lists_its_types():
    proc = subprocess.run([sys.executable, "-c", "import sys; from arctic_vl.cli import main; sys.exit(main())",
                           "plugins"], capture_output=True, text=True, timeout=120,
                          env={**__import__("os").environ, "OMP_NUM_THREADS": "1"})
    assert proc.returncode == 0, proc.stderr[-2000:]
    block = proc.stdout.split("swiftkv_vl (swiftkv_vl.plugin")[1].split("\n\n")[0]
    first, *rest = block.splitlines()
    assert first.endswith(": ok"), first
    assert "  model: swiftkv_vl" in rest and "  trainer: swiftkv_vl" in rest and "  cli: swiftkv-eval" in rest


def test_valid_config_describes_teacher_and_layout(tmp_path, capsys):
    path = _config(tmp_path, {"teacher": "teacher", "num_key_value_layers": 2, "key_value_group_size": 2})
    _teacher(tmp_path)  # relative `teacher` resolves against the config file, not the cwd
    rc, out, err = _validate(path, capsys)
    assert rc == 0, err
    assert f"teacher: {tmp_path / 'teacher'}" in out
    assert "# model: swiftkv_vl: teacher llava_next (llama, 4 layers)" in out
    assert "num_key_value_layers (M)=2, key_value_group_size (G)=2" in out


@pytest.mark.parametrize(
    ("model", "field", "needle"),
    [
        ({"num_key_value_layers": 1, "key_value_group_size": 2}, "key_value_group_size",
         "key_value_group_size (2) must divide the 3 SwiftKV layers"),
        ({"num_key_value_layers": 4}, "num_key_value_layers", "must be below the teacher's 4 language-model layers"),
        ({"num_key_value_layers": 0}, "num_key_value_layers", "greater than or equal to 1"),
        ({"num_key_value_layers": 2, "key_value_group_size": 0}, "key_value_group_size", "greater than or equal to 1"),
    ],
    ids=["group-does-not-divide", "m-not-below-l", "m-below-1", "g-below-1"],
)
def test_impossible_layout_exits_2_naming_file_line_field(tmp_path, capsys, model, field, needle):
    _teacher(tmp_path)
    path = _config(tmp_path, {"teacher": "teacher", **model})
    rc, out, err = _validate(path, capsys)
    assert rc == 2, (out, err)
    assert f"{path}:{_line_of(path, field)}: model.{field}: " in err, err
    assert needle in err and "Traceback" not in err


@pytest.mark.parametrize(
    ("model_type", "text_type", "needle"),
    [("qwen2_vl", "qwen2", "teacher model_type 'qwen2_vl'"),
     ("llava_next", "mistral", "teacher language model 'mistral' inside llava_next")],
    ids=["unsupported-family", "unsupported-language-model"],
)
def test_unsupported_teacher_exits_2(tmp_path, capsys, model_type, text_type, needle):
    _teacher(tmp_path, model_type=model_type, text_type=text_type)
    path = _config(tmp_path, {"teacher": "teacher", "num_key_value_layers": 2})
    rc, _, err = _validate(path, capsys)
    assert rc == 2
    assert f"{path}:{_line_of(path, 'teacher')}: model.teacher: " in err and needle in err
    assert "allowed: llava_next, llava_onevision" in err or "allowed: llama, llama_swiftkv" in err


def test_missing_teacher_and_tiny_layout_exit_2(tmp_path, capsys):
    path = _config(tmp_path, {"teacher": "nowhere", "num_key_value_layers": 2})
    rc, _, err = _validate(path, capsys)
    assert rc == 2 and f"teacher directory {tmp_path / 'nowhere'} does not exist" in err
    path = _config(tmp_path, {"teacher_tiny": {"layers": 3}, "num_key_value_layers": 1, "key_value_group_size": 3})
    rc, _, err = _validate(path, capsys)
    assert rc == 2 and "key_value_group_size (3) must divide the 2 SwiftKV layers" in err and "allowed: 1, 2" in err
    path = _config(tmp_path, {"num_key_value_layers": 1})
    rc, _, err = _validate(path, capsys)
    assert rc == 2 and "give teacher (a local model directory) or teacher_tiny" in err


def test_trainer_settings_checked_against_the_model(tmp_path, capsys):
    _teacher(tmp_path)
    path = _config(tmp_path, {"teacher": "teacher", "num_key_value_layers": 2}, {"hidden_loss_layer": 2})
    rc, _, err = _validate(path, capsys)
    assert rc == 2, err
    assert f"{path}:{_line_of(path, 'hidden_loss_layer')}: trainer.hidden_loss_layer: 2" in err
    assert "allowed 3..4 or -2..-1" in err
    assert _validate(path, capsys, "trainer.hidden_loss_layer=-2")[0] == 0
    assert _validate(path, capsys, "trainer.hidden_loss_mult=0")[0] == 0  # no MSE: any layer is fine
    rc, _, err = _validate(path, capsys, "data.packing=true")
    assert rc == 2 and "data.packing: the swiftkv_vl trainer weights each sample" in err
    rc, _, err = _validate(path, capsys, "trainer.temperature=0")
    assert rc == 2 and "trainer.temperature: Input should be greater than 0" in err
    # the swiftkv_vl trainer distils a SwiftKV student: another model type is refused, naming both sections
    path.write_text(path.read_text().replace("type: swiftkv_vl\n  teacher: teacher\n  num_key_value_layers: 2\n",
                                             "family: llava_next\n"))
    rc, _, err = _validate(path, capsys)
    assert rc == 2 and f"{path}:{_line_of(path, 'type')}: trainer.type: " in err  # the only `type:` left
    assert "trainer.type: 'swiftkv_vl' distils a SwiftKV student" in err and "got 'hf_vlm'" in err


def test_shipped_configs_validate(capsys, tmp_path):
    """small-cpu.yaml validates anywhere (tiny teacher); distill-sft-teacher.yaml names the teacher it needs.
    (The data files a config names must exist to validate: empty stand-ins for data/shapes here.)"""
    for name in ("train.json", "heldout.json"):
        (tmp_path / name).write_text("[]\n")
    data = (f"data.sources=[{tmp_path / 'train.json'}]", f"data.eval_sources=[{tmp_path / 'heldout.json'}]")
    rc, out, err = _validate(CONFIGS / "small-cpu.yaml", capsys, *data)
    assert rc == 0, err
    assert "teacher llava_next (llama, 4 layers) from teacher_tiny" in out
    rc, out, err = _validate(CONFIGS / "distill-sft-teacher.yaml", capsys, *data)
    if rc == 2:  # the SFT teacher is not trained in this checkout
        assert "runs/shapes-llava-cpu/final does not exist" in err
    else:
        assert rc == 0 and "teacher llava_next (llama, 4 layers) from" in out
