"""The wandb (offline) and mlflow (local file store) callbacks log what metrics.jsonl and eval.jsonl hold,
and the resolved config, from training and from a standalone evaluation, into one tracker run."""

from __future__ import annotations

import json
import struct
import sys
from pathlib import Path

import pytest
import yaml

from tests.e2e_utils import read_metrics, write_yaml


def wandb_records(run_file: Path) -> list:
    """The records of an offline wandb run file (`run-ID.wandb`: a LevelDB-style log of protobuf records)."""
    from wandb.proto import wandb_internal_pb2 as pb

    data, block, pos, records, part = run_file.read_bytes(), 32768, 7, [], b""  # 7: the file's header
    while pos + 7 <= len(data):
        left = block - pos % block
        if left < 7:  # a block's tail too short for a record header is padding
            pos += left
            continue
        _crc, length, kind = struct.unpack("<IHB", data[pos:pos + 7])
        if length == 0 and kind == 0:
            pos += left
            continue
        part += data[pos + 7:pos + 7 + length]
        pos += 7 + length
        if kind in (1, 4):  # a full record, or the last piece of one
            record = pb.Record()
            record.ParseFromString(part)
            records.append(record)
            part = b""
    return records


def wandb_history(run_dir: Path) -> tuple[list[dict], dict]:
    """(history rows, config) of every offline wandb run file under `run_dir`, in the order written."""
    rows, config = [], {}
    for run_file in sorted(run_dir.glob("wandb/offline-run-*/run-*.wandb")):
        for record in wandb_records(run_file):
            kind = record.WhichOneof("record_type")
            if kind == "history":
                rows.append({item.key or "/".join(item.nested_key): json.loads(item.value_json)
                             for item in record.history.item})
            elif kind == "run":
                config.update({u.key: json.loads(u.value_json) for u in record.run.config.update})
    return rows, config


@pytest.fixture(scope="module")
def tracked(tiny_llava: Path, synthetic_data: Path, tmp_path_factory: pytest.TempPathFactory) -> dict:
    """Two steps logged to both trackers, an evaluation at step 2, then a standalone evaluation of final/."""
    from arctic_vl.engine import Engine

    root = tmp_path_factory.mktemp("trackers")
    store = f"file://{root / 'mlruns'}"
    config = write_yaml(root / "run.yaml", {
        "model": {"name_or_path": str(tiny_llava)},
        "data": {"sources": [{"path": str(synthetic_data / "train.llava.json"), "sample": "first:8"}],
                 "eval_sources": [{"path": str(synthetic_data / "heldout.llava.json"), "sample": "first:4"}],
                 "micro_batch_size": 4},
        "trainer": {"output_dir": "out", "max_steps": 2, "progress_bar": False},
        "eval": {"every_n_steps": 2},
        "callbacks": [{"type": "wandb", "project": "test", "mode": "offline"},
                      {"type": "mlflow", "tracking_uri": store, "experiment": "test"}],
    })
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("MLFLOW_ALLOW_FILE_STORE", "true")  # MLflow 3 keeps the file store behind this switch
        mp.setenv("WANDB_SILENT", "true")
        Engine(config).train()
        standalone = Engine(config).evaluate()
    out = root / "out"
    return {"out": out, "store": store, "metrics": read_metrics(out), "standalone": standalone,
            "eval": [json.loads(x) for x in (out / "eval.jsonl").read_text().splitlines()],
            "config": yaml.safe_load((out / "config.yaml").read_text())}


def test_mlflow_logs_metrics_evaluations_and_config(tracked: dict, monkeypatch):
    from mlflow.tracking import MlflowClient

    monkeypatch.setenv("MLFLOW_ALLOW_FILE_STORE", "true")
    client = MlflowClient(tracking_uri=tracked["store"])
    run_id = json.loads((tracked["out"] / "trackers.json").read_text())["mlflow"]["run_id"]
    (run,) = client.search_runs([client.get_experiment_by_name("test").experiment_id])
    assert run.info.run_id == run_id and run.info.status == "FINISHED", "one run: training and the evaluation"
    for field in ("loss", "lr", "grad_norm", "tokens", "label_tokens", "samples", "tokens_per_s"):
        history = [(m.step, m.value) for m in client.get_metric_history(run_id, f"train/{field}")]
        assert history == [(m["step"], pytest.approx(m[field])) for m in tracked["metrics"]], field
    (final,) = tracked["eval"]
    assert [(m.step, m.value) for m in client.get_metric_history(run_id, "eval/eval_loss")] == [
        (2, pytest.approx(final["eval_loss"]))]
    assert [(m.step, m.value) for m in client.get_metric_history(run_id, "eval_standalone/eval_loss")] == [
        (2, pytest.approx(tracked["standalone"]["eval_loss"]))]
    params = run.data.params
    assert params["trainer.max_steps"] == "2"
    assert params["model.name_or_path"] == tracked["config"]["model"]["name_or_path"]
    artifact = Path(client.download_artifacts(run_id, "config.yaml"))
    assert yaml.safe_load(artifact.read_text()) == tracked["config"]


def test_wandb_offline_logs_metrics_evaluations_and_config(tracked: dict):
    rows, config = wandb_history(tracked["out"])
    train = [r for r in rows if "train/loss" in r]
    assert [r["_step"] for r in train] == [m["step"] for m in tracked["metrics"]]
    for row, m in zip(train, tracked["metrics"]):
        for field in ("loss", "lr", "grad_norm", "tokens", "label_tokens", "samples", "epoch"):
            assert row[f"train/{field}"] == pytest.approx(m[field]), field
    (final,) = tracked["eval"]
    (at_2,) = [r for r in rows if "eval/eval_loss" in r]
    assert at_2["_step"] == 2 and at_2["eval/eval_loss"] == pytest.approx(final["eval_loss"])
    (standalone,) = [r for r in rows if "eval_standalone/eval_loss" in r]
    assert standalone["eval_standalone/step"] == 2
    assert standalone["eval_standalone/eval_loss"] == pytest.approx(tracked["standalone"]["eval_loss"])
    run_id = json.loads((tracked["out"] / "trackers.json").read_text())["wandb"]["id"]
    files = sorted(p.name for p in tracked["out"].glob("wandb/offline-run-*/run-*.wandb"))
    assert files == [f"run-{run_id}.wandb"] * 2, "the evaluation resumed the training's run"
    assert {k: v for k, v in config.items() if k != "_wandb"} == tracked["config"]


@pytest.mark.parametrize("tracker, package", [("wandb", "wandb"), ("mlflow", "mlflow")])
def test_missing_tracker_package_is_a_config_error(tracker, package, in_tmp, cli, monkeypatch):
    (in_tmp / "run.yaml").write_text(f"model:\n  family: llava_next\ndata:\n  sources: [train.json]\n"
                                     f"callbacks:\n  - type: {tracker}\n")
    monkeypatch.setitem(sys.modules, package, None)  # what find_spec reports for a package not installed
    rc, _, err = cli("validate", "run.yaml")
    assert rc == 2 and "Traceback" not in err
    assert f"run.yaml:6: callbacks[0]: callback type '{tracker}' needs the '{package}' package" in err, err
    assert "pip install 'arctic-vl[trackers]'" in err
