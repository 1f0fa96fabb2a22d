"""Plugin record formats and data source kinds: registered in-process, used from YAML like the built-in ones.

The `qa` format below is what a plugin package would register (`@RECORD_FORMATS.register("qa")`): a JSONL
schema of {question, answer, picture?}. It is validated at config time, auto-detected, and its bad records
stop the run (exit 2, naming file, record, line, field, reason) or are counted by reason in the summary.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from arctic_vl import (
    DATA_SOURCES,
    MISSING_FIELD,
    RECORD_FORMATS,
    BadRecord,
    BadRecordReport,
    DataSource,
    RawRecord,
    RecordFile,
    RecordFormat,
    SourceSpec,
)
from arctic_vl.data.sources import read_source
from arctic_vl.errors import DataError
from tests.e2e_utils import write_yaml

EMPTY_ANSWER = "empty_answer"


class QAFormat(RecordFormat):
    """{question, answer, picture?}: one question about an optional picture."""

    looks_like = "a 'question' and an 'answer' field"
    reasons = (EMPTY_ANSWER,)

    def detect(self, record: Any) -> bool:
        return isinstance(record, dict) and "question" in record and "answer" in record

    def convert(self, record: Any, resolve: Any) -> tuple[list[dict[str, str]], list[Any], dict[str, Any]]:
        for key in ("question", "answer"):
            if key not in record:
                raise BadRecord(MISSING_FIELD, key, "required field is missing")
        if not str(record["answer"]).strip():
            raise BadRecord(EMPTY_ANSWER, "answer", "must be a non-empty string")
        images = [resolve(record["picture"], "picture")] if record.get("picture") else []
        messages = [{"role": "user", "content": record["question"]}, {"role": "assistant", "content": record["answer"]}]
        return messages, images, {k: v for k, v in record.items() if k not in ("question", "answer", "picture")}


def _unregister(registry: Any, name: str) -> None:
    registry._classes.pop(name, None)  # other tests must see only the core's names again
    registry._origin.pop(name, None)


@pytest.fixture
def qa_format() -> Iterator[str]:
    RECORD_FORMATS.register("qa")(QAFormat)
    try:
        yield "qa"
    finally:
        _unregister(RECORD_FORMATS, "qa")


def _qa(path: Path, image: str | None, bad: bool = True) -> Path:
    """Six good records; with `bad`, an empty answer at record 2 (line 3) and a missing answer at record 4."""
    rows: list[dict[str, Any]] = [{"question": f"What is {i} + 1?", "answer": str(i + 1), "id": i} for i in range(6)]
    rows[0]["picture"] = image
    if bad:
        rows.insert(2, {"question": "Blank?", "answer": " "})
        rows.insert(4, {"question": "No answer?"})
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def _config(path: Path, model: Path, source: dict, **data: Any) -> Path:
    return write_yaml(path, {
        "model": {"name_or_path": str(model)},
        "data": {"sources": [source], "micro_batch_size": 1, "shuffle": False, **data},
        "trainer": {"output_dir": "out", "max_steps": 1, "progress_bar": False},
        "checkpoint": {"export_final": False},
    })


def test_plugin_format_read_by_name_and_auto_detected(qa_format, tmp_path, synthetic_data):
    image = str(synthetic_data / "images" / "train-000000.png")
    path = _qa(tmp_path / "qa.jsonl", image, bad=False)

    def read(**spec: Any) -> list:
        return read_source(SourceSpec(path=str(path), **spec), base_dir=tmp_path, seed=0, on_bad_record="error",
                           report=BadRecordReport())

    named, detected = read(format="qa"), read()
    assert [(c.messages, c.images, c.meta) for c in named] == [(c.messages, c.images, c.meta) for c in detected]
    assert len(named) == 6 and [c.meta["id"] for c in named] == list(range(6))
    # the shared conversation rules apply to a plugin's messages: the image token is placed, the header read
    assert named[0].messages[0]["content"] == "<image>\nWhat is 0 + 1?"
    assert named[0].images == [image] and named[0].image_sizes == [(64, 64)]
    assert named[1].images == [] and named[1].image_sizes == []


def test_plugin_format_bad_records_error_exits_2(qa_format, tmp_path, tiny_llava, cli):
    path = _qa(tmp_path / "qa.jsonl", None)
    config = _config(tmp_path / "run.yaml", tiny_llava, {"path": str(path), "format": "qa"})
    rc, _, err = cli("train", str(config))
    assert rc == 2, err[-2000:]
    assert f"{path}: record 2 (line 3): field answer: must be a non-empty string" in err
    assert "reason: empty_answer; format: qa" in err and "Traceback" not in err


def test_plugin_format_bad_records_skipped_and_counted(qa_format, tmp_path, tiny_llava, cli):
    from arctic_vl.engine import Engine

    path = _qa(tmp_path / "qa.jsonl", None)
    config = _config(tmp_path / "run.yaml", tiny_llava, {"path": str(path)}, on_bad_record="skip")  # auto-detected
    rc, out, _ = cli("inspect-data", str(config))
    assert rc == 0
    assert "train: 6 samples (0 with images, 6 text-only)" in out
    assert "skipped 2" in out and f"{EMPTY_ANSWER}: 1" in out and f"{MISSING_FIELD}: 1" in out
    summary = Engine(config).train()
    assert summary["skipped_records"] == {EMPTY_ANSWER: 1, MISSING_FIELD: 1}
    assert json.loads((tmp_path / "out" / "summary.json").read_text())["skipped_records"] == summary["skipped_records"]


def test_unknown_format_is_a_config_error_at_its_line(qa_format, in_tmp, cli):
    (in_tmp / "bad.yaml").write_text("model:\n  family: llava_next\ndata:\n  sources:\n    - path: train.json\n"
                                     "      format: qaa\n")
    rc, _, err = cli("validate", "bad.yaml")
    assert rc == 2
    line = next(x for x in err.splitlines() if "bad.yaml:6" in x)
    assert "data.sources[0].format" in line and "unknown format 'qaa'" in line
    # the core's formats first, then the plugins' (installed ones too) by name, then the source kinds
    assert "'auto', 'llava', 'messages', 'dense_caption', " in line and ", 'qa' or 'hf_disk'" in line
    assert "Did you mean 'qa'?" in line
    (in_tmp / "good.yaml").write_text((in_tmp / "bad.yaml").read_text().replace("qaa", "qa"))
    assert cli("validate", "good.yaml")[0] == 0


def test_undeclared_reason_is_a_format_bug(qa_format, tmp_path):
    class Sloppy(QAFormat):
        def convert(self, record: Any, resolve: Any) -> Any:
            raise BadRecord("whatever", "question", "nope")

    RECORD_FORMATS.register("sloppy")(Sloppy)
    try:
        path = _qa(tmp_path / "qa.jsonl", None, bad=False)
        with pytest.raises(TypeError, match="reason 'whatever', which it does not declare"):
            read_source(SourceSpec(path=str(path), format="sloppy"), base_dir=tmp_path, seed=0,
                        on_bad_record="skip", report=BadRecordReport())
    finally:
        _unregister(RECORD_FORMATS, "sloppy")


def test_plugin_data_source_kind(tmp_path):
    """A source kind for `.tsv` files of question<TAB>answer lines, read through the same reader."""

    class TsvFile(DataSource):
        description = "a .tsv file of question<TAB>answer lines"

        def claims(self, path: Path) -> bool:
            return path.is_file() and path.suffix == ".tsv"

        def load(self, path: Path, record_format: str, image_root: Path | None) -> list[RecordFile]:
            raws = []
            for n, line in enumerate(path.read_text().splitlines(), start=1):
                question, _, answer = line.partition("\t")
                raws.append(RawRecord(index=len(raws), line=n, value={"messages": [
                    {"role": "user", "content": question}, {"role": "assistant", "content": answer}]}))
            return [RecordFile(path, self.resolve_format(path, raws, record_format), raws, image_root or path.parent)]

    DATA_SOURCES.register("tsv")(TsvFile)
    try:
        (tmp_path / "d.tsv").write_text("one?\t1\ntwo?\t2\n<image> three?\t3\n")
        report = BadRecordReport()
        convs = read_source(SourceSpec(path="d.tsv", sample="first:2"), base_dir=tmp_path, seed=0,
                            on_bad_record="skip", report=report)
        assert [c.messages[1]["content"] for c in convs] == ["1", "2"] and report.total == 0
        with pytest.raises(DataError, match=r"d.tsv: record 2 \(line 3\): field messages: 1 <image> placeholders"):
            read_source(SourceSpec(path="d.tsv"), base_dir=tmp_path, seed=0, on_bad_record="error", report=report)
    finally:
        _unregister(DATA_SOURCES, "tsv")


def _factory_with_hooks(on_bad_record: str, synthetic_data: Path, cache_dir: Path):
    """A VLMDataFactory subclass whose `check` rejects records with an odd index and tags the rest, and whose
    `source_spec` keeps only the first 12 records of any source."""
    from arctic_vl import BadRecord, VLMDataConfig, VLMDataFactory

    class EvenOnly(VLMDataFactory):
        def source_spec(self, spec):
            spec = super().source_spec(spec)
            return spec.model_copy(update={"sample": "first:12"}) if spec.sample == "all" else spec

        def check(self, conv):
            if conv.index % 2:
                raise BadRecord("odd_record", "index", f"{conv.index} is odd; this factory trains even ones")
            conv.meta = {**conv.meta, "checked": True}
            return conv

    cfg = VLMDataConfig(sources=[str(synthetic_data / "train.llava.json")], max_length=512,
                        on_bad_record=on_bad_record, cache=True, cache_dir=str(cache_dir))
    return EvenOnly(cfg)


@pytest.mark.parametrize("cached", [False, True])
def test_factory_hooks_check_every_build_and_follow_the_policy(synthetic_data, tiny_llava, tmp_path, cached):
    """`source_spec` and `check` (the hooks bbu_detection builds on) apply on a cache miss and on a hit alike:
    skip counts the rejected records by reason; error exits 2 naming the file, the record and the field."""
    from arctic_vl.models.base import ModelBundle
    from arctic_vl.models.loading import family_of_dir, load_model, load_processor

    bundle = ModelBundle(load_model(tiny_llava), load_processor(tiny_llava), family_of_dir(tiny_llava))
    cache = tmp_path / "cache"
    if cached:  # fill the cache first: the second build reads encodings from it and must still check
        _factory_with_hooks("skip", synthetic_data, cache).build(bundle, seed=0)
    data = _factory_with_hooks("skip", synthetic_data, cache).build(bundle, seed=0)
    indices = sorted(c.index for c in data.train.conversations)
    assert indices == [0, 2, 4, 6, 8, 10] and all(c.meta["checked"] for c in data.train.conversations)
    assert data.report.by_reason().get("odd_record") == 6
    with pytest.raises(DataError, match=r"train\.llava\.json: record 1: field index: 1 is odd.*\[reason: odd_record\]"):
        _factory_with_hooks("error", synthetic_data, cache).build(bundle, seed=0)
