"""Data policies end to end: max_length vs images, bad records (error / skip), inspect-data, evaluate.

Everything goes through the real entry points (`Engine.train`, `arctic_vl train|inspect-data|evaluate`)
with the tiny LLaVA-NeXT and the synthetic shapes data; expectations are exact numbers computed from
the records themselves (token lengths from the same encoder, counts per skip reason).
"""

from __future__ import annotations

import json
import math
import re
from pathlib import Path

import pytest

from tests.e2e_utils import read_metrics, run_cli, write_yaml

LONG_TEXT = " ".join(["one two three four five six seven eight nine"] * 12)


def _records(path: Path, records: list[dict | str]) -> Path:
    """A JSONL file; a str entry is written as is (an invalid line)."""
    path.write_text("".join((r if isinstance(r, str) else json.dumps(r)) + "\n" for r in records))
    return path


def _config(path: Path, model: Path, sources: list, **data) -> Path:
    return write_yaml(path, {
        "model": {"name_or_path": str(model)},
        "data": {"sources": sources, "micro_batch_size": 1, "shuffle": False, **data},
        "trainer": {"output_dir": "out", "max_steps": 2, "progress_bar": False},
        "optimizer": {"lr": 1e-3},
    })


# ------------------------------------------------------------------------------------------ truncation
@pytest.fixture(scope="module")
def truncation_case(tiny_llava: Path, synthetic_data: Path, tmp_path_factory: pytest.TempPathFactory):
    """Three records and a max_length that cuts A after its image, B inside its image, and leaves C whole."""
    from arctic_vl.data.encoding import SampleEncoder
    from arctic_vl.models.loading import family_of_dir, load_processor

    image = str(synthetic_data / "images" / "train-000000.png")
    a = {"messages": [{"role": "user", "content": "<image>\nWhat colour is the shape?"},
                      {"role": "assistant", "content": "red"},
                      {"role": "user", "content": LONG_TEXT}, {"role": "assistant", "content": LONG_TEXT}],
         "images": [image]}
    c = {"messages": [{"role": "user", "content": "What comes after one?"}, {"role": "assistant", "content": "two"}]}
    encoder = SampleEncoder(load_processor(tiny_llava), family_of_dir(tiny_llava))
    size = (64, 64)

    def encode(record: dict):
        return encoder.encode_text(record["messages"], [size] * len(record.get("images", [])))

    enc = {"a": encode(a), "c": encode(c)}
    ((_, a_end),) = enc["a"].image_spans
    first_answer = next(i for i, t in enumerate(enc["a"].labels) if t != -100)
    max_length = first_answer + 6  # past A's image and its first answer ("red<|im_end|>")
    assert a_end < first_answer < max_length < len(enc["a"].input_ids)
    assert len(enc["c"].input_ids) < max_length
    # B: text before its image, as many words as put the cut inside the image
    for words in range(1, 200):
        b = {"messages": [{"role": "user", "content": " ".join(LONG_TEXT.split()[:words]) + "\n<image>\nWhat shape?"},
                          {"role": "assistant", "content": "circle"}], "images": [image]}
        enc["b"] = encode(b)
        ((b_start, b_end),) = enc["b"].image_spans
        if b_start + 10 < max_length < b_end - 10:
            break
    else:
        raise AssertionError("no B record whose image straddles the cut")
    path = _records(tmp_path_factory.mktemp("trunc") / "records.jsonl", [a, b, c])
    lengths = {k: len(e.input_ids) for k, e in enc.items()}
    return path, max_length, lengths


@pytest.mark.parametrize("policy", ["drop", "keep"])
def test_image_truncation_policy(policy: str, truncation_case, tiny_llava: Path, tmp_path: Path):
    from arctic_vl.engine import Engine

    path, max_length, lengths = truncation_case
    kept = 2 if policy == "drop" else 3
    config = _config(tmp_path / "run.yaml", tiny_llava, [str(path)], max_length=max_length,
                     on_image_truncation=policy)
    summary = Engine(config, [f"trainer.max_steps={kept}"]).train()
    tokens = sorted(m["tokens"] for m in read_metrics(tmp_path / "out"))  # one sample a step
    if policy == "drop":
        assert summary["skipped_records"] == {"too_long_image_cut": 1}
        # A is cut after its image to exactly max_length; C is untouched
        assert tokens == sorted([max_length, lengths["c"]])
    else:
        assert summary["skipped_records"] == {}
        # B is kept whole: its full length goes into the batch, longer than max_length
        assert tokens == sorted([max_length, lengths["b"], lengths["c"]]) and lengths["b"] > max_length
    proc = run_cli("inspect-data", str(config), "--set", f"data.max_length={max_length}",
                   "--set", f"data.on_image_truncation={policy}", cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr[-2000:]
    if policy == "drop":
        assert "train: 2 samples (1 with images, 1 text-only)" in proc.stdout
        assert "skipped 1" in proc.stdout and "too_long_image_cut: 1" in proc.stdout
        assert f"record 0 (line 1): {max_length} tokens" in proc.stdout
    else:
        assert "train: 3 samples (2 with images, 1 text-only)" in proc.stdout and "skipped 0" in proc.stdout


# ----------------------------------------------------------------------------------------- bad records
@pytest.fixture(scope="module")
def bad_files(synthetic_data: Path, tmp_path_factory: pytest.TempPathFactory) -> dict[str, tuple[Path, int]]:
    """reason -> (a file whose record `index` is bad for that reason, index); good records around it."""
    root = tmp_path_factory.mktemp("bad")
    (root / "images").mkdir()
    (root / "images" / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\n this is not an image")
    image = str(synthetic_data / "images" / "train-000000.png")
    good = {"messages": [{"role": "user", "content": "<image>\nWhat colour is the shape?"},
                         {"role": "assistant", "content": "red"}], "images": [image]}
    text = {"messages": [{"role": "user", "content": "What comes after one?"}, {"role": "assistant", "content": "two"}]}
    bad = {
        "missing_image": {**good, "images": ["images/nope.png"]},
        "unreadable_image": {**good, "images": ["images/broken.png"]},
        "malformed_turns": {"messages": [{"role": "robot", "content": "hello"}, {"role": "assistant", "content": "x"}]},
        "image_token_mismatch": {**good, "messages": [{"role": "user", "content": "<image><image>\nWhich?"},
                                                      {"role": "assistant", "content": "red"}]},
        "invalid_json": '{"messages": [{"role": "user", "content": "unclosed',
    }
    out: dict[str, tuple[Path, int]] = {}
    for reason, record in bad.items():
        out[reason] = (_records(root / f"{reason}.jsonl", [good, text, record, good]), 2)
    dense = json.loads((synthetic_data / "train.dense.jsonl").read_text().splitlines()[0])
    dense["images"] = [str(synthetic_data / p) for p in dense["images"]]
    wrong = json.loads(json.dumps(dense))
    first = wrong["objects"][0]
    key = next(k for k in ("bbox_2d", "poly", "line") if k in first)
    first[key][0] = dense["width"] + 40  # x beyond the image
    out["geometry_out_of_range"] = (_records(root / "geometry.jsonl", [dense, dense, wrong, dense]), 2)
    return out


REASONS = ["missing_image", "unreadable_image", "malformed_turns", "image_token_mismatch", "invalid_json",
           "geometry_out_of_range"]


def test_bad_record_error_names_file_record_and_reason(bad_files, tiny_llava: Path, tmp_path: Path, cli):
    for reason in REASONS:
        path, index = bad_files[reason]
        config = _config(tmp_path / f"{reason}.yaml", tiny_llava, [str(path)], on_bad_record="error")
        rc, _, err = cli("train", str(config))
        assert rc == 2, (reason, err[-2000:])
        assert str(path) in err and f"record {index}" in err and reason in err, (reason, err)
        assert "Traceback" not in err
        assert not (tmp_path / "out" / "checkpoints").exists()


def test_bad_records_skipped_and_counted_per_reason(bad_files, tiny_llava: Path, tmp_path: Path):
    sources = [str(bad_files[r][0]) for r in REASONS]
    config = _config(tmp_path / "run.yaml", tiny_llava, sources, on_bad_record="skip")
    proc = run_cli("train", str(config), cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr[-3000:]
    summary = json.loads((tmp_path / "out" / "summary.json").read_text())
    assert summary["skipped_records"] == {r: 1 for r in sorted(REASONS)}
    assert summary["steps"] == 2 and (tmp_path / "out" / "final" / "config.json").is_file()
    stats = json.loads((tmp_path / "out" / "run_info.json").read_text())["data"]
    assert stats["train_samples"] == 3 * len(REASONS)  # every file keeps its three good records


# ------------------------------------------------------------------------------------- inspect / eval
def test_inspect_data_marks_trained_text(synthetic_data: Path, tiny_llava: Path, tmp_path: Path):
    source = synthetic_data / "train.llava.json"
    records = json.loads(source.read_text())
    config = _config(tmp_path / "run.yaml", tiny_llava, [{"path": str(source), "sample": "first:10"}])
    proc = run_cli("inspect-data", str(config), cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr[-2000:]
    n_images = sum(1 for r in records[:10] if r.get("image"))
    assert f"train: 10 samples ({n_images} with images, {10 - n_images} text-only)" in proc.stdout
    assert "skipped 0" in proc.stdout
    # the first item of the training order (file order here: shuffle false), named by its index in the file
    shown = re.search(r"^--- (.+) record (\d+): (\d+) tokens", proc.stdout, re.MULTILINE)
    assert shown and shown.group(1) == str(source) and int(shown.group(2)) == 0
    record = records[0]
    question, answer = (t["value"] for t in record["conversations"])
    if record.get("image"):
        # tiny LLaVA-NeXT: a 64x64 image is a 32px base tile + a 2x2 grid of 32px tiles at 8px patches:
        # 16 base + 8x8 grid + 8 newline tokens = 88 image tokens. The placeholder's newline is the
        # placeholder's: the tiny ChatML template renders an image part as `<image>` with the text after it.
        assert question.startswith("<image>\n")
        question = "<<image> x 88>" + question.removeprefix("<image>\n")
    expected = f"<|im_start|>user\n{question}<|im_end|>\n<|im_start|>assistant\n[[{answer}<|im_end|>]]"
    assert expected in proc.stdout, proc.stdout
    assert proc.stdout.count("[[") == 1  # only the assistant turn is trained


def test_evaluate_reports_loss_and_exact_match_per_type(synthetic_data: Path, tiny_llava: Path, tmp_path: Path):
    heldout = synthetic_data / "heldout.llava.json"
    n = 20
    qtypes = [r["qtype"] for r in json.loads(heldout.read_text())[:n]]
    config = _config(tmp_path / "run.yaml", tiny_llava, [{"path": str(synthetic_data / "train.llava.json"),
                                                          "sample": "first:8"}],
                     eval_sources=[{"path": str(heldout), "sample": f"first:{n}"}])
    assert run_cli("train", str(config), cwd=tmp_path).returncode == 0
    proc = run_cli("evaluate", str(config), cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr[-2000:]
    plain = json.loads(proc.stdout[proc.stdout.index("{"):])
    assert math.isfinite(plain["eval_loss"]) and plain["eval_loss"] > 0 and "exact_match" not in plain
    assert plain["model"] == str(tmp_path / "out" / "final")
    proc = run_cli("evaluate", str(config), "--set", "eval.generate=true", "--set", "eval.max_new_tokens=3",
                   cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr[-2000:]
    res = json.loads(proc.stdout[proc.stdout.index("{"):])
    assert res["eval_loss"] == pytest.approx(plain["eval_loss"], abs=1e-6)  # the same model and samples
    assert res["eval_questions"] == n
    by_type = res["exact_match_by_type"]
    assert sorted(by_type) == sorted(set(qtypes))
    # the overall figure is the question-weighted mean of the per-type figures
    weighted = sum(by_type[t] * qtypes.count(t) for t in by_type) / n
    assert res["exact_match"] == pytest.approx(weighted, abs=1e-9)
    for t, v in by_type.items():  # a share of that type's questions: k / count
        assert 0.0 <= v <= 1.0 and abs(v * qtypes.count(t) - round(v * qtypes.count(t))) < 1e-9
