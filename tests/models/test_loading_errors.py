"""Broken or lying model directories: each is a ConfigError (exit 2) naming the directory, the file and what is
wrong, checked before `from_pretrained` where that is cheap, never a library traceback."""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import pytest

from arctic_vl.errors import ConfigError
from arctic_vl.models.loading import load_model, load_processor


@pytest.fixture(scope="module")
def source(tmp_path_factory: pytest.TempPathFactory) -> Path:
    from arctic_vl.models.tiny import make_tiny_model

    return make_tiny_model("llava_next", tmp_path_factory.mktemp("tiny_llava_next"), seed=0)


@pytest.fixture
def model_dir(source: Path, tmp_path: Path) -> Path:
    """A fresh copy of the tiny LLaVA-NeXT checkpoint to break."""
    return Path(shutil.copytree(source, tmp_path / "model"))


def _edit_config(d: Path, edit) -> None:
    cfg = json.loads((d / "config.json").read_text())
    edit(cfg)
    (d / "config.json").write_text(json.dumps(cfg))


def _shard(d: Path) -> dict[str, str]:
    """Split model.safetensors into two shards with an index (as save_pretrained does for big models)."""
    from safetensors.torch import load_file, save_file

    tensors = load_file(str(d / "model.safetensors"))
    (d / "model.safetensors").unlink()
    names = sorted(tensors)
    half = len(names) // 2
    weight_map = {}
    for i, part in enumerate((names[:half], names[half:])):
        shard = f"model-0000{i + 1}-of-00002.safetensors"
        save_file({k: tensors[k] for k in part}, str(d / shard), metadata={"format": "pt"})
        weight_map.update(dict.fromkeys(part, shard))
    (d / "model.safetensors.index.json").write_text(json.dumps({"metadata": {}, "weight_map": weight_map}))
    return weight_map


def _set_index(d: Path, shard_name: str) -> None:
    index = json.loads((d / "model.safetensors.index.json").read_text())
    first = sorted(set(index["weight_map"].values()))[0]
    index["weight_map"] = {k: (shard_name if v == first else v) for k, v in index["weight_map"].items()}
    (d / "model.safetensors.index.json").write_text(json.dumps(index))


def _truncate(path: Path, n: int = 100) -> None:
    data = path.read_bytes()
    path.write_bytes(data[:-n])


def test_an_intact_directory_and_its_shards_load(model_dir):
    """The checks pass on what save_pretrained writes, sharded or not (the tests below break one thing each)."""
    import torch

    whole = load_model(model_dir)
    _shard(model_dir)
    sharded = load_model(model_dir)
    a, b = whole.state_dict(), sharded.state_dict()
    assert sorted(a) == sorted(b) and all(torch.equal(a[k], b[k]) for k in a)


BROKEN = {
    # name: (how the directory is broken, the message's file, the message's text)
    "missing_shard": (lambda d: (_shard(d), (d / "model-00002-of-00002.safetensors").unlink()),
                      "model-00002-of-00002.safetensors", "missing: model.safetensors.index.json puts"),
    "truncated_weights": (lambda d: _truncate(d / "model.safetensors"),
                          "model.safetensors", "truncated: its header puts tensor data up to byte"),
    "truncated_header": (lambda d: (d / "model.safetensors").write_bytes((d / "model.safetensors").read_bytes()[:200]),
                         "model.safetensors", "its header claims"),
    "truncated_shard": (lambda d: (_shard(d), _truncate(d / "model-00001-of-00002.safetensors")),
                        "model-00001-of-00002.safetensors", "truncated"),
    "no_weights": (lambda d: (d / "model.safetensors").unlink(), "no weights", "no model.safetensors"),
    "hidden_size_lies": (lambda d: _edit_config(d, lambda c: c["text_config"].update(hidden_size=128)),
                         "model.safetensors", "does not fit the model config.json describes"),
    "fewer_layers_than_the_weights": (
        lambda d: _edit_config(d, lambda c: c["text_config"].update(num_hidden_layers=1)),
        "model.safetensors", "has no place in the model config.json describes"),
    "model_type_lies": (lambda d: _edit_config(d, lambda c: c.update(model_type="llava")),
                        "model.safetensors", "config.json does not match the weights"),
    "broken_config": (lambda d: (d / "config.json").write_text('{"model_type": "llava_next",'),
                      "config.json", "not valid JSON"),
    "broken_tokenizer": (lambda d: (d / "tokenizer.json").write_text((d / "tokenizer.json").read_text()[:500]),
                         "tokenizer.json", "not valid JSON"),
    "broken_processor_config": (lambda d: (d / "processor_config.json").write_text("{nope"),
                                "processor_config.json", "not valid JSON (Expecting property name"),
    "index_outside_parent": (lambda d: (_shard(d), _set_index(d, "../elsewhere.safetensors")),
                             "model.safetensors.index.json", "not a file name inside the model directory"),
    "index_absolute": (lambda d: (_shard(d), _set_index(d, "/etc/passwd")),
                       "model.safetensors.index.json", "not a file name inside the model directory"),
    "index_key_in_the_wrong_shard": (
        lambda d: (_shard(d), _set_index(d, "model-00002-of-00002.safetensors")),
        "model.safetensors.index.json", "which does not hold it"),
}


@pytest.mark.parametrize("kind", sorted(BROKEN))
def test_a_broken_model_directory_names_the_directory_file_and_problem(model_dir, kind):
    breaker, name, text = BROKEN[kind]
    breaker(model_dir)
    with pytest.raises(ConfigError) as e:
        load_model(model_dir)
        load_processor(model_dir)
    message = str(e.value)
    assert f"model directory {model_dir}" in message and name in message and text in message, message


def test_an_index_shard_that_links_out_of_the_directory_is_refused(model_dir, tmp_path):
    """A shard whose name stays inside but which is a symbolic link to weights elsewhere: refused, named."""
    _shard(model_dir)
    shard = model_dir / "model-00001-of-00002.safetensors"
    outside = tmp_path / "elsewhere.safetensors"
    shutil.move(shard, outside)
    os.symlink(outside, shard)
    with pytest.raises(ConfigError, match=r"model-00001-of-00002.safetensors' is a symbolic link out of the model "
                                          r"directory .*refusing to load weights from outside"):
        load_model(model_dir)


def test_a_hugging_face_cache_snapshot_loads(model_dir, tmp_path):
    """The one allowed link out: hub/models--x/snapshots/REV/FILE -> ../../blobs/HASH (the HF cache layout)."""
    _shard(model_dir)
    repo = tmp_path / "hub" / "models--x"
    snapshot, blobs = repo / "snapshots" / "abc", repo / "blobs"
    snapshot.mkdir(parents=True)
    blobs.mkdir()
    for i, f in enumerate(sorted(model_dir.iterdir())):
        shutil.copy(f, blobs / f"blob{i}")
        os.symlink(f"../../blobs/blob{i}", snapshot / f.name)
    assert load_model(snapshot) is not None


def test_a_truncated_export_under_evaluate_exits_2_naming_it(tmp_path, cli, synthetic_data):
    """`arctic_vl evaluate` on a run whose final/model.safetensors was truncated: exit 2 naming the file."""
    import yaml

    config = tmp_path / "run.yaml"
    config.write_text(yaml.safe_dump({
        "model": {"family": "llava_next"},
        "data": {"sources": [{"path": str(synthetic_data / "train.llava.json"), "sample": "first:8"}],
                 "eval_sources": [{"path": str(synthetic_data / "heldout.llava.json"), "sample": "first:4"}],
                 "micro_batch_size": 4, "max_length": 256},
        "trainer": {"output_dir": "out", "max_steps": 1, "progress_bar": False},
    }))
    rc, _, err = cli("train", str(config))
    assert rc == 0, err[-2000:]
    _truncate(tmp_path / "out" / "final" / "model.safetensors")
    rc, _, err = cli("evaluate", str(config))
    assert rc == 2 and "Traceback" not in err, err[-2000:]
    assert f"model directory {tmp_path / 'out' / 'final'}: model.safetensors: truncated" in err, err[-2000:]
