"""Plugin record formats and data source kinds: registered in-process, used from YAML like the built-in ones.

The `qa` format below is what a plugin package would register (`@RECORD_FORMATS.register("qa")`): a JSONL
schema of {question, answer, picture?}. It is validated at config time, auto-detected, and its bad records
stop the run (exit 2, naming file, record, line, field, reason) or are counted by reason in the summary.
"""

from __future__ import annotations

import json
import re
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from arctic_vl import (
    DATA_SOURCES,
    IGNORE_INDEX,
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


# --------------------------------------------------------------------------- ms-swift grounding records
GROUNDING_FAMILIES = ("qwen2_vl", "qwen2_5_vl", "qwen3_vl", "llava", "llava_next", "llava_onevision")


def _grounding_records(image: str) -> list[dict[str, Any]]:
    """ms-swift's grounding examples on a 200 x 100 image: pixel boxes with a ref, a norm1000 box, a norm1 point."""
    def chat(query: str, response: str) -> list[dict[str, str]]:
        return [{"role": "user", "content": query}, {"role": "assistant", "content": response}]

    return [
        {"messages": chat("<image>Find the <ref-object> in the image", "<bbox><bbox>"), "images": [image],
         "objects": {"ref": ["sheep"], "bbox": [[20, 10, 60, 50], [100, 30, 150, 90]]}},
        {"messages": chat("<image>Where is it?", "<bbox>"), "images": [image],
         "objects": {"ref": [], "bbox": [[100, 200, 300, 400]], "bbox_type": "norm1000"}},
        {"messages": chat("<image>Open the browser", "Action: click(start_box='<bbox>')"), "images": [image],
         "objects": {"ref": [], "bbox": [[0.25, 0.5]], "bbox_type": "norm1"}},
    ]


@pytest.mark.parametrize("family", GROUNDING_FAMILIES)
def test_ms_swift_grounding_records_train_on_the_family_coordinates(family, tmp_path, png, jsonl):
    """`<ref-object>` / `<bbox>` + `objects` are rendered as ms-swift renders them for the family: Qwen2-VL and
    Qwen3-VL in 0-1000, Qwen2.5-VL in pixels of the resized image the model sees (its processor's own grid), the
    LLaVA families in 0-1000 as `[(x1,y1),(x2,y2)]`; the trained tokens are exactly those numbers."""
    from fractions import Fraction
    from types import SimpleNamespace

    from PIL import Image

    from arctic_vl.data.factory import VLMDataConfig, VLMDataFactory
    from arctic_vl.models.loading import family_of_dir, load_processor
    from arctic_vl.models.tiny import make_tiny_model

    model = make_tiny_model(family, tmp_path / "model", seed=0, layers=1, hidden=32, heads=2, kv_heads=1,
                            intermediate=64, vision_layers=1, vision_hidden=32)
    image = png(tmp_path / "a.png", (200, 100))
    path = jsonl(tmp_path / "grounding.jsonl", _grounding_records(str(image)))
    factory = VLMDataFactory(VLMDataConfig(sources=[str(path)], cache=False, shuffle=False))
    encoder = factory.encoder(SimpleNamespace(processor=load_processor(model), family=family_of_dir(model)))
    report = BadRecordReport()
    _, encoded = factory.load(factory.config.sources, encoder, seed=0, report=report)
    assert report.total == 0 and len(encoded) == 3
    qwen = family.startswith("qwen")
    if family == "qwen2_5_vl":  # the resized image: the processor's own patch grid of it
        grid = encoder.encode_images([Image.open(image)])["image_grid_thw"][0].tolist()
        patch = encoder.processor.image_processor.patch_size
        extent = (grid[2] * patch, grid[1] * patch)
        assert extent != (200, 100)  # resized: pixels of the input would be wrong
    else:
        extent = (1000, 1000)

    def scaled(values: list[float], size: tuple[float, float]) -> str:
        ints = [int(Fraction(v) * extent[i % 2] / size[i % 2] + Fraction(1, 2)) for i, v in enumerate(values)]
        text = ",".join(f"({x},{y})" for x, y in zip(ints[0::2], ints[1::2]))
        return f"<|box_start|>{text}<|box_end|>" if qwen else f"[{text}]"

    answers = [scaled([20, 10, 60, 50], (200, 100)) + scaled([100, 30, 150, 90], (200, 100)),
               scaled([100, 200, 300, 400], (1000, 1000)),
               f"Action: click(start_box='{scaled([0.25, 0.5], (1, 1))}')"]
    if family != "qwen2_5_vl":  # the numbers themselves, worked by hand
        assert answers[0] == ("<|box_start|>(100,100),(300,500)<|box_end|><|box_start|>(500,300),(750,900)<|box_end|>"
                              if qwen else "[(100,100),(300,500)][(500,300),(750,900)]")
        assert "(100,200),(300,400)" in answers[1] and "(250,500)" in answers[2]
    tok = encoder.tokenizer
    for enc, answer in zip(encoded, answers):
        trained = tok.decode([t for t, label in zip(enc.input_ids, enc.labels) if label != IGNORE_INDEX])
        assert trained.startswith(answer) and trained[len(answer):].strip() in tok.all_special_tokens, trained
        text = tok.decode(enc.input_ids)
        assert "<bbox>" not in text and "<ref-object>" not in text
    ref = "<|object_ref_start|>sheep<|object_ref_end|>" if qwen else "sheep"
    assert f"Find the {ref} in the image" in tok.decode(encoded[0].input_ids)


def _placeholder_files(root: Path, image: str, write_jsonl: Any) -> dict[str, tuple[Path, int, str]]:
    """case -> (a file whose record 1 is bad for it, 1, reason); record 0 of each is good."""
    good = _grounding_records(image)[0]
    chat = [{"role": "user", "content": "<image>Where is the sheep?"}, {"role": "assistant", "content": "<bbox>"}]
    llava = {"image": image, "conversations": [{"from": "human", "value": "<image>Find the <ref-object>"},
                                               {"from": "gpt", "value": "There."}]}
    llava_good = {"image": image, "conversations": [{"from": "human", "value": "<image>Hi"},
                                                    {"from": "gpt", "value": "Hello."}]}
    return {
        "no_objects": (write_jsonl(root / "no_objects.jsonl", [good, {"messages": chat, "images": [image]}]), 1,
                       "unrendered_placeholder"),
        "llava": (write_jsonl(root / "llava.jsonl", [llava_good, llava]), 1, "unrendered_placeholder"),
        "more_bbox_than_boxes": (write_jsonl(root / "mismatch.jsonl", [good, {
            "messages": [chat[0], {"role": "assistant", "content": "<bbox> and <bbox>"}], "images": [image],
            "objects": {"ref": [], "bbox": [[1, 2, 3, 4]]}}]), 1, "grounding_mismatch"),
    }


def test_leftover_placeholders_are_bad_records_in_every_format(qa_format, tmp_path, tiny_llava, png, jsonl, cli):
    """A record still holding `<bbox>` / `<ref-object>` after rendering (no `objects`, any format, a plugin's
    too) or with more `<bbox>` than boxes is a bad record: counted under skip, exit 2 naming it under error."""
    image = str(png(tmp_path / "a.png", (200, 100)))
    files = _placeholder_files(tmp_path, image, jsonl)
    qa = tmp_path / "qa.jsonl"
    qa.write_text(json.dumps({"question": "2 + 2?", "answer": "4"}) + "\n"
                  + json.dumps({"question": "Find it", "answer": "<bbox>"}) + "\n")
    files["plugin_format"] = (qa, 1, "unrendered_placeholder")
    for case, (path, index, reason) in files.items():
        config = _config(tmp_path / f"{case}.yaml", tiny_llava, {"path": str(path)})
        rc, _, err = cli("inspect-data", str(config))
        assert rc == 2 and "Traceback" not in err, (case, err[-2000:])
        assert f"{path}: record {index} (line {index + 1}): field " in err and f"reason: {reason}" in err, (case, err)
        config = _config(tmp_path / f"{case}-skip.yaml", tiny_llava, {"path": str(path)}, on_bad_record="skip")
        rc, out, err = cli("inspect-data", str(config))
        assert rc == 0, (case, err)
        assert "train: 1 samples" in out and "skipped 1" in out and f"{reason}: 1" in out, (case, out)


def test_malformed_grounding_objects_are_bad_records(tmp_path, png, jsonl):
    """ms-swift `objects` that cannot be rendered are named bad records: the field and the reason."""
    image = str(png(tmp_path / "a.png", (200, 100)))
    chat = [{"role": "user", "content": "<image>Find the <ref-object>"}, {"role": "assistant", "content": "<bbox>"}]
    bad = [({"ref": ["a"], "bbox": [[1, 2, 3]]}, "objects.bbox[0]", "malformed_record"),
           ({"ref": ["a"], "bbox": [[0.1, 0.2, 1.5, 0.4]], "bbox_type": "norm1"}, "objects.bbox[0]",
            "geometry_out_of_range"),
           ({"ref": ["a"], "bbox": [[1, 2, 3, 4]], "bbox_type": "xyxy"}, "objects.bbox_type", "malformed_record"),
           ({"ref": ["a"], "bbox": [[1, 2, 3, 4]], "image_id": [1]}, "objects.image_id", "malformed_record"),
           ({"ref": ["a", "b"], "bbox": [[1, 2, 3, 4]]}, "messages", "grounding_mismatch"),
           ({"ref": ["a"], "box": [[1, 2, 3, 4]]}, "objects", "malformed_record")]
    good = {"ref": ["a"], "bbox": [[1, 2, 3, 4]]}
    path = jsonl(tmp_path / "bad.jsonl", [{"messages": chat, "images": [image], "objects": o}
                                          for o in [*(o for o, _, _ in bad), good]])
    report = BadRecordReport()
    kept = read_source(SourceSpec(path=str(path)), base_dir=tmp_path, seed=0, on_bad_record="skip", report=report)
    assert [c.index for c in kept] == [len(bad)] and report.total == len(bad)
    assert kept[0].meta["grounding"] == {"ref": ["a"], "bbox": [[1, 2, 3, 4]], "bbox_type": "real", "image_id": [0]}
    assert report.by_reason() == {"malformed_record": 4, "geometry_out_of_range": 1, "grounding_mismatch": 1}
    for i, (objects, field, reason) in enumerate(bad):
        one = jsonl(tmp_path / f"bad{i}.jsonl", [{"messages": chat, "images": [image], "objects": o}
                                                 for o in (good, objects)])
        with pytest.raises(DataError, match=rf"record 1 \(line 2\): field {re.escape(field)}: .*reason: {reason}"):
            read_source(SourceSpec(path=str(one)), base_dir=tmp_path, seed=0, on_bad_record="error",
                        report=BadRecordReport())
