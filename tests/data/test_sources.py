"""Record formats, sampling, weights, mixing, image references and the bad-record policy."""

from __future__ import annotations

import json
import pickle
from collections import Counter
from pathlib import Path

import pydantic
import pytest

from arctic_vl.data.bad_records import BadRecordReport
from arctic_vl.data.images import DatasetImage, ImageBytes, image_size, open_image
from arctic_vl.data.records import Conversation, render_dense_answer, to_norm1000
from arctic_vl.data.sources import SourceSpec, parse_sample, read_source, read_sources
from arctic_vl.errors import ConfigError, DataError


def read(path, base_dir: Path, *, on_bad_record="error", report=None, seed=0, **spec) -> list[Conversation]:
    report = BadRecordReport() if report is None else report
    return read_source(SourceSpec(path=str(path), **spec), base_dir=base_dir, seed=seed,
                       on_bad_record=on_bad_record, report=report)


def llava(i: int, image: str | list | None = "img.png", question: str = "<image>\nWhat?") -> dict:
    rec = {"id": i, "conversations": [{"from": "human", "value": question}, {"from": "gpt", "value": f"a{i}"}]}
    if image is not None:
        rec["image"] = image
    return rec


# ---------------------------------------------------------------- formats


def test_llava_and_messages_give_equal_conversations(synthetic_dir):
    a = read("train.llava.json", synthetic_dir)
    b = read("train.messages.jsonl", synthetic_dir)
    assert len(a) == len(b) == 40
    for x, y in zip(a, b):
        assert (x.messages, x.images, x.meta, x.index) == (y.messages, y.images, y.meta, y.index)
    assert sum(1 for c in a if not c.images) == 6  # text-only records: round(40 * 0.15)
    assert a[0].source == str(synthetic_dir / "train.llava.json")
    assert all(Path(p).is_absolute() and Path(p).is_file() for c in a for p in c.images)


def test_dense_caption_conversation_and_meta(tmp_path, png, jsonl):
    png(tmp_path / "d.png", (200, 100))
    objects = [{"desc": "box", "bbox_2d": [10, 20, 110, 80]}, {"desc": "tri", "poly": [0, 0, 200, 0, 100, 100]},
               {"desc": "cable", "line": [1, 1, 3, 99]}]
    jsonl(tmp_path / "d.jsonl", [{"images": ["d.png"], "width": 200, "height": 100, "objects": objects,
                                  "summary": "three things", "group": "g1"}])
    (conv,) = read("d.jsonl", tmp_path)
    assert conv.messages == [
        {"role": "user", "content": "<image>Describe every object with its location."},
        {"role": "assistant", "content": '[{"desc":"box","bbox_2d":[50,200,550,800]},'
                                         '{"desc":"tri","poly":[0,0,1000,0,500,1000]},'
                                         '{"desc":"cable","line":[5,10,15,990]}]'}]
    assert conv.meta == {"group": "g1", "objects": objects, "width": 200, "height": 100, "summary": "three things"}


def test_norm1000_rounds_half_up_exactly():
    assert to_norm1000([1, 1, 15, 8], 16, 16) == [63, 63, 938, 500]  # 62.5 -> 63, 937.5 -> 938
    assert to_norm1000([1, 2, 3, 0], 3, 3) == [333, 667, 1000, 0]
    assert to_norm1000([0.5, 2.5], 8, 8) == [63, 313]  # 62.5, 312.5 from float pixels
    assert to_norm1000([7, 7], 7, 14) == [1000, 500]
    assert render_dense_answer([{"desc": "é", "line": [0, 1, 2, 3]}], 4, 4) == '[{"desc":"é","line":[0,250,500,750]}]'


def test_llava_without_placeholder_gets_one_per_image_in_first_user_turn(tmp_path, png):
    png(tmp_path / "a.png")
    png(tmp_path / "b.png")
    rec = {"conversations": [{"from": "system", "value": "Be brief."}, {"from": "human", "value": "Compare."},
                             {"from": "gpt", "value": "same"}, {"from": "human", "value": "Sure?"},
                             {"from": "gpt", "value": "yes"}], "image": ["a.png", "b.png"]}
    (tmp_path / "x.json").write_text(json.dumps([rec]))
    (conv,) = read("x.json", tmp_path)
    assert [m["content"] for m in conv.messages] == ["Be brief.", "<image>\n<image>\nCompare.", "same", "Sure?", "yes"]
    assert [m["role"] for m in conv.messages] == ["system", "user", "assistant", "user", "assistant"]
    assert conv.images == [str(tmp_path / "a.png"), str(tmp_path / "b.png")]


def test_auto_detects_jsonl_named_json_and_explicit_format(tmp_path, png, jsonl):
    png(tmp_path / "img.png")
    jsonl(tmp_path / "data.json", [llava(0), llava(1)])
    assert [c.messages[1]["content"] for c in read("data.json", tmp_path)] == ["a0", "a1"]
    jsonl(tmp_path / "m.jsonl", [{"messages": [{"role": "user", "content": "hi"},
                                               {"role": "assistant", "content": "yo"}]}])
    assert read("m.jsonl", tmp_path, format="messages")[0].images == []
    with pytest.raises(DataError, match="reason: missing_field"):  # llava reader on a messages file
        read("m.jsonl", tmp_path, format="llava")
    (tmp_path / "odd.jsonl").write_text('{"text": "no known fields"}\n')
    with pytest.raises(ConfigError, match="cannot tell the record format"):
        read("odd.jsonl", tmp_path)


# ---------------------------------------------------------------- images and paths


def test_relative_absolute_and_image_root_paths(tmp_path, png, jsonl):
    png(tmp_path / "images" / "a.png")
    png(tmp_path / "elsewhere" / "b.png")
    jsonl(tmp_path / "sub" / "d.jsonl", [llava(0, "../images/a.png"), llava(1, str(tmp_path / "elsewhere/b.png"))])
    convs = read("sub/d.jsonl", tmp_path)
    assert [c.images for c in convs] == [[str(tmp_path / "images/a.png")], [str(tmp_path / "elsewhere/b.png")]]
    jsonl(tmp_path / "r.jsonl", [llava(0, "b.png")])
    (conv,) = read("r.jsonl", tmp_path, image_root="elsewhere")  # image_root relative to base_dir
    assert conv.images == [str(tmp_path / "elsewhere/b.png")]


def test_image_refs_size_open_and_errors(tmp_path, png):
    path = str(png(tmp_path / "a.png", (5, 3), (1, 2, 3)))
    assert image_size(path) == (5, 3)
    data = (tmp_path / "a.png").read_bytes()
    ref = ImageBytes(data, name="a")
    assert image_size(ref) == (5, 3)
    assert open_image(pickle.loads(pickle.dumps(ref))).getpixel((4, 2)) == (1, 2, 3)
    with pytest.raises(DataError) as e:
        image_size(str(tmp_path / "nope.png"))
    assert e.value.reason == "missing_image"
    (tmp_path / "bad.png").write_bytes(b"not an image")
    with pytest.raises(DataError) as e:
        open_image(str(tmp_path / "bad.png"))
    assert e.value.reason == "unreadable_image"


def test_image_headers_are_read_once(synthetic_dir, tiny_llava, monkeypatch):
    """Building the data opens each image once (its header, when the source is read); no pixel decode."""
    from types import SimpleNamespace

    import PIL.Image

    from arctic_vl.data.factory import VLMDataConfig, VLMDataFactory
    from arctic_vl.models.loading import family_of_dir, load_processor

    bundle = SimpleNamespace(processor=load_processor(tiny_llava), family=family_of_dir(tiny_llava), model=None)
    opened: list[str] = []
    real_open = PIL.Image.open
    monkeypatch.setattr(PIL.Image, "open", lambda fp, *a, **k: opened.append(str(fp)) or real_open(fp, *a, **k))
    config = VLMDataConfig(sources=[str(synthetic_dir / "train.llava.json")], max_length=None, cache=False)
    data = VLMDataFactory(config).build(bundle, seed=0)
    images = [str(ref) for conv in data.train.conversations for ref in conv.images]
    assert len(images) == 34 and sorted(opened) == sorted(images)
    assert all(conv.image_sizes == [(64, 64)] * len(conv.images) for conv in data.train.conversations)


def test_hf_disk_round_trip_with_image_features(tmp_path, synthetic_dir):
    datasets = pytest.importorskip("datasets")
    msgs = [json.loads(line) for line in (synthetic_dir / "train.messages.jsonl").read_text().splitlines()]
    rows = {"messages": [r["messages"] for r in msgs], "qtype": [r["qtype"] for r in msgs],
            "images": [[str(synthetic_dir / p) for p in r.get("images", [])] for r in msgs]}
    features = datasets.Features({"messages": datasets.List({"role": datasets.Value("string"),
                                                            "content": datasets.Value("string")}),
                                  "qtype": datasets.Value("string"), "images": datasets.List(datasets.Image())})
    ds = datasets.Dataset.from_dict(rows, features=features)
    ds.save_to_disk(str(tmp_path / "hf"))
    convs = read("hf", tmp_path)
    ref = read("train.messages.jsonl", synthetic_dir)
    assert len(convs) == 40
    assert [c.messages for c in convs] == [c.messages for c in ref]
    assert [c.meta["qtype"] for c in convs] == [c.meta["qtype"] for c in ref]
    with_image = next(i for i, c in enumerate(convs) if c.images)
    img = convs[with_image].images[0]
    assert isinstance(img, DatasetImage)
    assert img == DatasetImage(str(tmp_path / "hf"), with_image, "images", 0)
    assert len(pickle.dumps(img)) < 200  # cheap to ship to workers
    assert list(open_image(pickle.loads(pickle.dumps(img))).getdata()) == \
        list(open_image(ref[with_image].images[0]).getdata())
    assert [len(c.images) for c in convs] == [len(c.images) for c in ref]


def test_hf_disk_llava_columns_with_path_strings(tmp_path, png):
    datasets = pytest.importorskip("datasets")
    png(tmp_path / "hf" / "pics" / "a.png")
    recs = [llava(0, "pics/a.png"), llava(1, None, "no image")]
    ds = datasets.Dataset.from_list([{**r, "image": r.get("image")} for r in recs])
    ds.save_to_disk(str(tmp_path / "hf"))
    convs = read("hf", tmp_path, format="hf_disk")
    assert [c.images for c in convs] == [[str(tmp_path / "hf/pics/a.png")], []]
    assert convs[1].messages[0]["content"] == "no image"


# ---------------------------------------------------------------- sampling, weights, mixing


def test_parse_sample_and_spec_validation():
    assert parse_sample("all") == ("all", None)
    assert parse_sample("first:7") == ("first", 7)
    assert parse_sample("random:12") == ("random", 12)
    for bad in ("first", "first:0", "random:-1", "last:3", "first:10%", "random:x", "ALL"):
        with pytest.raises(ConfigError):
            parse_sample(bad)
    with pytest.raises(pydantic.ValidationError, match="sample"):
        SourceSpec(path="x", sample="first:")
    with pytest.raises(pydantic.ValidationError, match="weight"):
        SourceSpec(path="x", weight=0)
    with pytest.raises(pydantic.ValidationError, match="extra"):
        SourceSpec(path="x", sampling="all")


def test_first_and_random_sampling(synthetic_dir):
    assert [c.index for c in read("train.llava.json", synthetic_dir, sample="first:5")] == [0, 1, 2, 3, 4]
    r1 = [c.index for c in read("train.llava.json", synthetic_dir, sample="random:5", seed=1)]
    assert r1 == [c.index for c in read("train.llava.json", synthetic_dir, sample="random:5", seed=1)]
    r2 = [c.index for c in read("train.llava.json", synthetic_dir, sample="random:5", seed=2)]
    assert len(r1) == len(set(r1)) == 5 and r1 == sorted(r1) and r1 != r2
    assert len(read("train.llava.json", synthetic_dir, sample="random:500")) == 40  # N > size: all


def test_first_n_counts_good_records_and_skips_unpicked(tmp_path, png, jsonl):
    png(tmp_path / "img.png")
    jsonl(tmp_path / "d.jsonl", [llava(0), "{broken", llava(2), llava(3), llava(4, "missing.png")])
    report = BadRecordReport()
    convs = read("d.jsonl", tmp_path, sample="first:3", on_bad_record="skip", report=report)
    assert [c.index for c in convs] == [0, 2, 3]
    assert report.by_reason() == {"invalid_json": 1}  # record 4 was never needed, never checked


def test_weights_subsample_and_repeat(synthetic_dir):
    assert len(read("train.llava.json", synthetic_dir, weight=0.5)) == 20
    assert len(read("train.llava.json", synthetic_dir, weight=0.0125)) == 1  # 0.5 rounds half up
    convs = read("train.llava.json", synthetic_dir, sample="first:10", weight=2.5)
    assert len(convs) == 25
    counts = Counter(c.index for c in convs)
    assert sorted(counts.values()) == [2] * 5 + [3] * 5
    again = read("train.llava.json", synthetic_dir, sample="first:10", weight=2.5)
    assert [c.index for c in again] == [c.index for c in convs]


def test_read_sources_mixes_by_weight_deterministically(synthetic_dir):
    specs = [SourceSpec(path="train.llava.json", weight=0.5), SourceSpec(path="heldout.messages.jsonl", weight=3)]

    def mix(seed):
        return read_sources(specs, base_dir=synthetic_dir, seed=seed, on_bad_record="error",
                            report=BadRecordReport())

    a = mix(0)
    assert Counter(Path(c.source).name for c in a) == {"train.llava.json": 20, "heldout.messages.jsonl": 30}
    assert [(c.source, c.index) for c in a] == [(c.source, c.index) for c in mix(0)]
    assert [(c.source, c.index) for c in a] != [(c.source, c.index) for c in mix(1)]
    assert {Path(c.source).name for c in a[:10]} == {"train.llava.json", "heldout.messages.jsonl"}  # interleaved
    with pytest.raises(ConfigError):
        read_sources([], base_dir=synthetic_dir, seed=0, on_bad_record="error", report=BadRecordReport())


def test_shuffle_false_keeps_file_order_through_the_factory(synthetic_dir, tiny_llava):
    """`data.shuffle: false`: sources in the order listed, records in file order, and the epoch plan trains them in
    that order. Weight 2.5 without shuffle: the file twice in order, then a seeded half of it in file order."""
    from types import SimpleNamespace

    from arctic_vl.data.factory import VLMDataConfig, VLMDataFactory
    from arctic_vl.data.sampling import EpochBatchSampler
    from arctic_vl.models.loading import family_of_dir, load_processor

    bundle = SimpleNamespace(processor=load_processor(tiny_llava), family=family_of_dir(tiny_llava), model=None)
    heldout, train = synthetic_dir / "heldout.messages.jsonl", synthetic_dir / "train.llava.json"
    sources = [SourceSpec(path=str(heldout), sample="first:4", weight=2.5),
               SourceSpec(path=str(train), sample="first:5")]

    def order(shuffle: bool) -> list[tuple[str, int]]:
        config = VLMDataConfig(sources=sources, shuffle=shuffle, micro_batch_size=2, max_length=None)
        data = VLMDataFactory(config).build(bundle, seed=3)
        plan = EpochBatchSampler.plan(len(data.train), 2, 1, 3, 0, data.shuffle)
        trained = [i for step in plan for i in step[0]]
        return [(Path(data.train.conversations[i].source).name, data.train.conversations[i].index) for i in trained]

    got = order(False)
    h = "heldout.messages.jsonl"
    assert got[:8] == [(h, 0), (h, 1), (h, 2), (h, 3)] * 2  # whole copies, in file order
    rest = [i for name, i in got[8:10]]
    assert [name for name, _ in got[8:10]] == [h, h] and rest == sorted(rest) and len(set(rest)) == 2
    assert got[10:] == [("train.llava.json", i) for i in range(5)]
    assert sorted(order(True)) == sorted(got) and order(True) != got  # the same samples, mixed

def test_yaml_list_of_files(tmp_path, synthetic_dir):
    (tmp_path / "mix.yaml").write_text(
        f"datasets:\n  - json_path: {synthetic_dir}/train.llava.json\n    sampling_strategy: first:3\n"
        f"  - json_path: ../{synthetic_dir.name}/heldout.messages.jsonl\n    sampling_strategy: random:2\n")
    (tmp_path / "cfg").mkdir()
    convs = read("../mix.yaml", tmp_path / "cfg")
    assert [Path(c.source).name for c in convs] == ["train.llava.json"] * 3 + ["heldout.messages.jsonl"] * 2
    assert [c.index for c in convs[:3]] == [0, 1, 2]
    assert len(read("../mix.yaml", tmp_path / "cfg", sample="first:4", weight=2)) == 8
    (tmp_path / "bad.yaml").write_text("datasets:\n  - json_path: a.json\n    sampling: all\n")
    with pytest.raises(ConfigError, match=r"datasets\[0\]: unknown key\(s\) \['sampling'\]"):
        read("bad.yaml", tmp_path)


# ---------------------------------------------------------------- bad records

BAD = {  # reason -> (record, field named in the message)
    "invalid_json": ('{"conversations": [', "<line>"),
    "missing_field": ({"image": "img.png"}, "conversations"),
    "malformed_record": (llava(0, 42), "image"),
    "malformed_turns": ({"conversations": [{"from": "human", "value": "<image>"}], "image": "img.png"},
                        "conversations"),
    "image_token_mismatch": (llava(0, ["img.png", "img.png"], "<image> one only"), "conversations"),
    "missing_image": (llava(0, "gone.png"), "image"),
    "unreadable_image": (llava(0, "junk.png"), "image"),
}


@pytest.fixture
def bad_dir(tmp_path, png):
    png(tmp_path / "img.png")
    (tmp_path / "junk.png").write_bytes(b"\x89PNG but not really")
    return tmp_path


@pytest.mark.parametrize("reason", sorted(BAD))
def test_each_bad_record_kind_raises_naming_file_index_line_field(bad_dir, jsonl, reason):
    record, field = BAD[reason]
    jsonl(bad_dir / "d.jsonl", [llava(0), "", record])  # the blank line is skipped: record 1 on line 3
    with pytest.raises(DataError) as e:
        read("d.jsonl", bad_dir)
    assert (e.value.source, e.value.index, e.value.reason) == (str(bad_dir / "d.jsonl"), 1, reason)
    msg = str(e.value)
    assert msg.startswith(f"{bad_dir / 'd.jsonl'}: record 1 (line 3): field {field}")
    assert f"reason: {reason}" in msg


def test_skip_counts_exact_numbers_per_reason(bad_dir, jsonl):
    records = [llava(0)]
    for k, reason in enumerate(sorted(BAD)):
        records += [BAD[reason][0]] * (k + 1) + [llava(100 + k)]
    jsonl(bad_dir / "d.jsonl", records)
    report = BadRecordReport()
    convs = read("d.jsonl", bad_dir, on_bad_record="skip", report=report)
    assert len(convs) == 8
    assert report.by_reason() == {reason: k + 1 for k, reason in enumerate(sorted(BAD))}
    assert report.total == 28
    text = report.format()
    assert text.startswith("skipped 28 bad records:\n  image_token_mismatch: 1\n  invalid_json: 2\n")
    assert f"  {bad_dir / 'd.jsonl'}: 28" in text
    assert len(report.examples) == 1 + 2 + 3 * 5  # at most 3 examples per reason


def test_dense_caption_bad_geometry(tmp_path, png, jsonl):
    png(tmp_path / "img.png")

    def rec(**obj):
        return {"images": ["img.png"], "width": 10, "height": 8, "objects": [{"desc": "x", **obj}]}

    records = [rec(bbox_2d=[0, 0, 10, 8]),  # good: the full image
               rec(bbox_2d=[0, 0, 11, 8]), rec(poly=[0, 0, 5, 9, 1, 1]), rec(line=[-1, 0, 3, 3]),
               rec(bbox_2d=[5, 0, 5, 8]),  # geometry_out_of_range x4
               rec(poly=[0, 0, 5, 5]), rec(line=[1, 1, 2]), rec(bbox_2d=[0, 0, 1, 1], line=[0, 0, 1, 1]),
               {**rec(line=[0, 0, 1, 1]), "objects": [{"line": [0, 0, 1, 1], "desc": ""}]},
               {**rec(line=[0, 0, 1, 1]), "width": "10"}, rec(bbox_2d=[0, 0, True, 1])]  # malformed x6
    jsonl(tmp_path / "d.jsonl", records)
    report = BadRecordReport()
    convs = read("d.jsonl", tmp_path, on_bad_record="skip", report=report)
    assert [c.index for c in convs] == [0]
    assert report.by_reason() == {"geometry_out_of_range": 4, "malformed_record": 6}
    with pytest.raises(DataError, match=r"record 1 \(line 2\): field objects\[0\]\.bbox_2d: "
                                        r"\[0, 0, 11, 8\] is outside \[0, 10\] x \[0, 8\]"):
        read("d.jsonl", tmp_path, sample="first:2")


def test_empty_after_skipping_is_an_error(tmp_path, jsonl):
    jsonl(tmp_path / "d.jsonl", ["nope", {"conversations": []}])
    report = BadRecordReport()
    with pytest.raises(DataError, match="no usable records") as e:
        read("d.jsonl", tmp_path, on_bad_record="skip", report=report)
    assert e.value.reason == "empty_source"
    assert report.by_reason() == {"invalid_json": 1, "malformed_turns": 1}
    with pytest.raises(ConfigError, match="not found"):
        read("missing.jsonl", tmp_path)


def test_report_merge():
    a, b = BadRecordReport(), BadRecordReport()
    a.add("f1", 0, "invalid_json", "m0")
    b.add("f2", 3, "invalid_json", "m1")
    b.add("f2", 4, "missing_image", "m2")
    a.merge(b)
    assert (a.total, a.by_reason(), a.by_source()) == (3, {"invalid_json": 2, "missing_image": 1},
                                                       {"f1": 1, "f2": 2})
    assert BadRecordReport().format() == "no bad records"


@pytest.mark.parametrize("name, text", [("e.jsonl", ""), ("b.jsonl", "\n \n"), ("l.json", "[]")])
def test_a_source_without_records_says_so(tmp_path, name, text):
    """An empty file is named as empty (exit 2), not as a file whose record format cannot be told."""
    (tmp_path / name).write_text(text)
    with pytest.raises(DataError, match=rf"{name}: the file holds no records"):
        read(tmp_path / name, tmp_path)


# ------------------------------------------------------------- issue 24: inputs that crashed instead of being named

HUGE_INT = "9" * 5000  # past Python's 4300-digit int conversion limit
DEEP = "[" * 100_000 + "]" * 100_000  # past the recursion limit of json's decoder


@pytest.mark.parametrize("text, says", [(f'{{"id": {HUGE_INT}}}', "a number with more than 4300 digits"),
                                        (DEEP, "nested deeper than")])
def test_json_past_the_parsers_limits_is_an_invalid_json_record(bad_dir, text, says):
    """issue 24 item 4: a JSONL line with a 5000-digit integer or 100000-deep nesting is a bad record naming its
    line (error mode) or one counted invalid_json (skip mode); in a .json list it is an exit-2 file error."""
    (bad_dir / "d.jsonl").write_text("\n".join([json.dumps(llava(0)), text, json.dumps(llava(2))]) + "\n")
    with pytest.raises(DataError) as e:
        read("d.jsonl", bad_dir)
    assert (e.value.index, e.value.reason) == (1, "invalid_json")
    assert str(e.value).startswith(f"{bad_dir / 'd.jsonl'}: record 1 (line 2): field <line>: not valid JSON ({says}")
    report = BadRecordReport()
    convs = read("d.jsonl", bad_dir, on_bad_record="skip", report=report)
    assert [c.index for c in convs] == [0, 2] and report.by_reason() == {"invalid_json": 1}
    (bad_dir / "l.json").write_text(f"[{json.dumps(llava(0))}, {text}]")
    with pytest.raises(DataError) as e:
        read("l.json", bad_dir)
    assert e.value.reason == "invalid_json" and str(e.value).startswith(f"{bad_dir / 'l.json'}: not valid JSON ({says}")


def test_a_utf8_bom_is_accepted_in_every_data_file(bad_dir):
    """issue 24 item 4: a BOM at the start of a JSONL, a .json list or a data-list YAML changes nothing."""
    bom = "\ufeff"
    (bad_dir / "d.jsonl").write_text(bom + "".join(json.dumps(llava(i)) + "\n" for i in range(3)), encoding="utf-8")
    (bad_dir / "l.json").write_text(bom + json.dumps([llava(i) for i in range(3)]), encoding="utf-8")
    (bad_dir / "list.yaml").write_text(bom + "datasets:\n  - json_path: d.jsonl\n", encoding="utf-8")
    plain = [(c.messages, c.index) for c in read("d.jsonl", bad_dir)]
    assert len(plain) == 3 and plain[0][1] == 0
    assert [(c.messages, c.index) for c in read("l.json", bad_dir)] == plain
    assert [(c.messages, c.index) for c in read("list.yaml", bad_dir)] == plain


def test_read_json_lines_applies_the_bad_record_rules(tmp_path):
    """The verbs' JSONL reader (dense-caption stage data, groups, summaries): BOM, digit limit, non-UTF-8 lines,
    a line that is no object: named by line and field (error) or counted (skip)."""
    from arctic_vl import MALFORMED_RECORD, BadRecord, read_json_lines

    def record(v):
        if not isinstance(v, dict):
            raise BadRecord(MALFORMED_RECORD, "<record>", f"must be an object, got {type(v).__name__}")
        return v["k"]

    path = tmp_path / "in.jsonl"
    path.write_bytes(b'\xef\xbb\xbf{"k": 1}\n[1, 2]\n\xff\xfe\n{"k": ' + HUGE_INT.encode() + b'}\n\n{"k": 5}\n')
    with pytest.raises(DataError) as e:
        read_json_lines(path, record, skip_option="--on-bad-record skip")
    assert str(e.value) == (f"{path}: line 2: field <record>: must be an object, got list [reason: malformed_record] "
                            "(--on-bad-record skip drops such lines and counts them)")
    report = BadRecordReport()
    assert read_json_lines(path, record, on_bad_record="skip", report=report) == [(1, 1), (6, 5)]
    assert report.by_reason() == {"malformed_record": 1, "invalid_json": 2}
    with pytest.raises(DataError, match=r"missing\.jsonl: not found; expected a JSON Lines file"):
        read_json_lines(tmp_path / "missing.jsonl")


def test_parse_json_names_every_failure():
    from arctic_vl import JsonTextError, parse_json

    assert parse_json("\ufeff[1, 2]") == [1, 2] and parse_json(b'{"a": 1}') == {"a": 1}
    for text, says in [(HUGE_INT, "more than 4300 digits"), (DEEP, "nested deeper"), ("[1,", "Expecting value"),
                       (b"\xff", "not UTF-8 text: byte 0xff")]:
        with pytest.raises(JsonTextError, match=says):
            parse_json(text)


def test_overflowing_and_degenerate_dense_geometry_is_malformed(tmp_path, png, jsonl):
    """issue 24 items 5 and 12: a coordinate too large for a float, a self-intersecting polygon, a polygon with
    no area and one that doubles back are malformed records naming the object, not an OverflowError or a sample."""
    png(tmp_path / "img.png")

    def rec(**obj):
        return {"images": ["img.png"], "width": 10, "height": 8, "objects": [{"desc": "x", "bbox_2d": [0, 0, 1, 1]},
                                                                              {"desc": "y", **obj}]}

    big = int("9" * 400)
    cases = [(rec(bbox_2d=[1, 1, big, 5]), "objects[1].bbox_2d", "finite numbers"),
             (rec(poly=[0, 0, 6, 4, 6, 0, 0, 2]), "objects[1].poly", "self-intersecting: edge 0"),
             (rec(poly=[0, 0, 2, 2, 4, 4]), "objects[1].poly", "encloses no area"),
             (rec(poly=[1, 1, 1, 1, 1, 1]), "objects[1].poly", "encloses no area (1 distinct points)"),
             (rec(poly=[0, 0, 6, 0, 6, 6, 6, 3]), "objects[1].poly", "doubles back on itself at point 2"),
             (rec(line=[0, 0, big, 1]), "objects[1].line", "finite numbers")]
    good = [rec(poly=[0, 0, 6, 0, 6, 6, 0, 6, 0, 0]), rec(poly=[0, 0, 6, 0, 6, 0, 3, 5])]  # closed; a repeated point
    jsonl(tmp_path / "d.jsonl", [c[0] for c in cases] + good)
    report = BadRecordReport()
    convs = read("d.jsonl", tmp_path, on_bad_record="skip", report=report)
    assert [c.index for c in convs] == [6, 7]
    assert report.by_reason() == {"malformed_record": 6}
    for k, (record, field, says) in enumerate(cases):
        jsonl(tmp_path / f"{k}.jsonl", [good[0], record])
        with pytest.raises(DataError) as e:
            read(f"{k}.jsonl", tmp_path)
        assert e.value.reason == "malformed_record" and "record 1 (line 2): field " + field + ": " in str(e.value)
        assert says in str(e.value), str(e.value)


def test_polygon_check_agrees_with_shapely():
    """The hand-written simple-polygon test against shapely (the oracle) on random small-grid polygons, which hit
    crossings, touching corners, collinear edges and zero areas often."""
    import random

    shapely = pytest.importorskip("shapely")
    from arctic_vl.data.records import polygon_problem

    rng = random.Random(0)
    seen = Counter()
    for _ in range(3000):
        n = rng.randint(3, 7)
        coords = [rng.randint(0, 4) for _ in range(2 * n)]
        points = list(zip(coords[0::2], coords[1::2]))
        dedup = [p for i, p in enumerate(points) if i == 0 or p != points[i - 1]]
        if len(dedup) > 1 and dedup[-1] == dedup[0]:
            dedup.pop()
        poly = shapely.Polygon(dedup) if len(dedup) >= 3 else None
        oracle = poly is not None and poly.is_valid and poly.area > 0
        assert (polygon_problem(coords) is None) == oracle, (coords, polygon_problem(coords))
        seen[oracle] += 1
    assert seen[True] > 300 and seen[False] > 300  # both kinds really tested


def test_an_absurd_weight_is_refused_before_the_list_is_built(synthetic_dir, monkeypatch):
    """issue 24 item 8: weight 1e9 is refused by the spec (at validate); a weight x records above the bound is
    named with the count it would sample, before anything is allocated."""
    from arctic_vl.data import sources

    with pytest.raises(pydantic.ValidationError, match=r"weight 1e\+09 is absurd: at most 10000"):
        SourceSpec(path="x.jsonl", weight=1e9)
    monkeypatch.setattr(sources, "MAX_WEIGHTED_RECORDS", 100)
    with pytest.raises(ConfigError, match=r"weight 3 x 40 records would sample 120 records; a source may contribute "
                                          r"at most 100"):
        read("train.llava.json", synthetic_dir, weight=3)
    assert len(read("train.llava.json", synthetic_dir, weight=2.5)) == 100


def test_a_symlink_loop_in_a_data_list_is_named(tmp_path):
    """issue 24 item 7: a data-list YAML whose json_path goes through a symbolic link loop names the entry."""
    (tmp_path / "a").symlink_to(tmp_path / "b")
    (tmp_path / "b").symlink_to(tmp_path / "a")
    (tmp_path / "list.yaml").write_text("datasets:\n  - json_path: a/d.jsonl\n")
    with pytest.raises(ConfigError, match=r"list\.yaml: datasets\[0\]\.json_path: a/d\.jsonl: a symbolic link loop"):
        read("list.yaml", tmp_path)


def test_the_token_count_refusing_an_aspect_ratio_is_a_bad_record(tmp_path, png):
    """issue 24 item 6: Qwen2.5-VL refuses a 1x300 image in the up-front token count: the record is an
    unreadable_image bad record (skipped and counted, or named), as the pixel path already made it."""
    from arctic_vl.data.encoding import SampleEncoder, encode_conversations
    from arctic_vl.models.families import get_family
    from arctic_vl.models.loading import load_processor
    from arctic_vl.models.tiny import make_tiny_model

    model = make_tiny_model("qwen2_5_vl", tmp_path / "qwen", seed=0)
    encoder = SampleEncoder(load_processor(model), get_family("qwen2_5_vl"))
    png(tmp_path / "thin.png", (1, 300))
    png(tmp_path / "ok.png", (32, 32))
    (tmp_path / "d.jsonl").write_text("".join(json.dumps(llava(i, name)) + "\n"
                                              for i, name in enumerate(["ok.png", "thin.png", "ok.png"])))
    convs = read("d.jsonl", tmp_path)
    report = BadRecordReport()
    kept, encoded = encode_conversations(convs, encoder, report, max_length=None, on_bad_record="skip")
    assert [c.index for c in kept] == [0, 2] and len(encoded) == 2
    assert report.by_reason() == {"unreadable_image": 1}
    with pytest.raises(DataError) as e:
        encode_conversations(convs, encoder, BadRecordReport(), max_length=None, on_bad_record="error")
    assert e.value.reason == "unreadable_image" and e.value.index == 1
    assert "cannot use an image of size 1x300" in str(e.value) and "aspect ratio" in str(e.value)
