"""The synthetic coloured-shapes dataset: determinism, balance, consistency between formats and pixels."""

from __future__ import annotations

import json
from collections import Counter
from pathlib import Path

import pytest
from PIL import Image

from arctic_vl.data.bad_records import BadRecordReport
from arctic_vl.data.sources import SourceSpec, read_source
from arctic_vl.data.synthetic import PALETTE, main, make_synthetic_data
from arctic_vl.errors import ConfigError


def files(root: Path) -> dict[str, bytes]:
    return {str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


def load(path: Path) -> list[dict]:
    text = path.read_text()
    return json.loads(text) if path.suffix == ".json" else [json.loads(line) for line in text.splitlines()]


@pytest.fixture(scope="module")
def big(tmp_path_factory) -> tuple[Path, dict]:
    out = tmp_path_factory.mktemp("big")
    return out, make_synthetic_data(out, n=400, seed=3, heldout=0)


def test_same_seed_same_bytes_other_seed_differs(tmp_path):
    a = make_synthetic_data(tmp_path / "a", n=30, seed=5, heldout=8)
    make_synthetic_data(tmp_path / "b", n=30, seed=5, heldout=8)
    make_synthetic_data(tmp_path / "c", n=30, seed=6, heldout=8)
    fa, fb, fc = files(tmp_path / "a"), files(tmp_path / "b"), files(tmp_path / "c")
    assert fa == fb
    assert fa["train.llava.json"] != fc["train.llava.json"]
    # heldout does not depend on the train size
    make_synthetic_data(tmp_path / "d", n=31, seed=5, heldout=8)
    assert files(tmp_path / "d")["heldout.dense.jsonl"] == fa["heldout.dense.jsonl"]
    assert a["train"]["n"] == 30 and a["heldout"]["n"] == 8


def test_counts_per_split(synthetic_dir):
    names = sorted(p.name for p in synthetic_dir.iterdir())
    assert names == ["heldout.dense.jsonl", "heldout.llava.json", "heldout.messages.jsonl", "images",
                     "train.dense.jsonl", "train.llava.json", "train.messages.jsonl"]
    train = load(synthetic_dir / "train.llava.json")
    assert Counter(r["qtype"] for r in train) == {"colour": 9, "shape": 9, "count": 8, "position": 8, "text": 6}
    assert len(load(synthetic_dir / "train.dense.jsonl")) == 34
    assert len(list((synthetic_dir / "images").iterdir())) == 34 + 8  # 10 held-out, round(1.5) = 2 of them text-only


def test_default_heldout_size(tmp_path):
    result = make_synthetic_data(tmp_path, n=20, seed=0)
    assert (result["train"]["n"], result["heldout"]["n"]) == (20, 50)
    assert result["train"]["qtypes"] == {"colour": 5, "shape": 4, "count": 4, "position": 4, "text": 3}


def test_answers_balanced_per_question_type(big):
    out, result = big
    assert result["train"]["qtypes"] == {"colour": 85, "shape": 85, "count": 85, "position": 85, "text": 60}
    recs = load(out / "train.messages.jsonl")
    answers = {q: Counter(r["messages"][1]["content"] for r in recs if r["qtype"] == q)
               for q in result["train"]["qtypes"]}
    assert sorted(answers["colour"].values()) == [21, 21, 21, 22]
    assert set(answers["colour"]) == set(PALETTE)
    assert sorted(answers["shape"].values()) == [28, 28, 29]
    assert answers["count"].keys() == {"one", "two", "three"} and sorted(answers["count"].values()) == [28, 28, 29]
    assert set(answers["position"]) == {"left", "right", "top", "bottom"}
    assert all(len(r["messages"][1]["content"].split()) == 1 for r in recs)
    single = sum(1 for r in recs if r["qtype"] == "colour" and r["messages"][0]["content"].endswith("the shape?"))
    assert single > 85 // 2  # most colour questions are about one-shape images


def test_answers_match_the_pixels_and_the_geometry(big):
    out, _ = big
    qa = {r["id"]: r for r in load(out / "train.messages.jsonl")}
    geometry_kinds = Counter()
    for d in load(out / "train.dense.jsonl"):
        r = qa[d["id"]]
        question, answer = r["messages"][0]["content"], r["messages"][1]["content"]
        shapes = [o for o in d["objects"] if "line" not in o]
        geometry_kinds.update(k for o in d["objects"] for k in ("bbox_2d", "poly", "line") if k in o)
        assert r["images"] == d["images"]
        im = Image.open(out / d["images"][0])
        for o in shapes:  # each shape's centre pixel has its described colour
            xs, ys = (o.get("bbox_2d") or o["poly"])[0::2], (o.get("bbox_2d") or o["poly"])[1::2]
            cy = (min(ys) + 2 * max(ys)) // 3 if "poly" in o else (min(ys) + max(ys)) // 2
            assert im.getpixel(((min(xs) + max(xs)) // 2, cy)) == PALETTE[o["desc"].split()[0]]
        named = [o for o in shapes if o["desc"] in question or len(shapes) == 1
                 or o["desc"].split()[1] in question or o["desc"].split()[0] in question]
        if r["qtype"] == "count":
            assert answer == ["one", "two", "three"][len(shapes) - 1]
        elif r["qtype"] == "colour":
            assert len(named) == 1 and named[0]["desc"].split()[0] == answer
        elif r["qtype"] == "shape":
            assert len(named) == 1 and named[0]["desc"].split()[1] == answer
        else:
            (o,) = named if len(shapes) == 1 else [o for o in shapes if o["desc"] in question]
            xs, ys = (o.get("bbox_2d") or o["poly"])[0::2], (o.get("bbox_2d") or o["poly"])[1::2]
            cx, cy = (min(xs) + max(xs)) / 2, (min(ys) + max(ys)) / 2
            assert {"left": cx <= 25.6, "right": cx >= 38.4, "top": cy <= 25.6, "bottom": cy >= 38.4}[answer]
    assert set(geometry_kinds) == {"bbox_2d", "poly", "line"}


def test_text_questions_are_correct(big):
    out, _ = big
    words = ["zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine"]
    texts = [r for r in load(out / "train.llava.json") if r["qtype"] == "text"]
    assert len(texts) == 60 and all("image" not in r for r in texts)
    for r in texts:
        q, a = r["conversations"][0]["value"].rstrip("?").split(), r["conversations"][1]["value"]
        if "plus" in q:
            assert words.index(a) == words.index(q[2]) + words.index(q[4])
        else:
            assert words.index(a) == words.index(q[-1]) + (1 if q[2] == "after" else -1)


def test_dense_records_read_back_clean(synthetic_dir):
    report = BadRecordReport()
    convs = read_source(SourceSpec(path="heldout.dense.jsonl"), base_dir=synthetic_dir, seed=0,
                        on_bad_record="skip", report=report)
    assert report.total == 0 and len(convs) == 8
    assert all(c.meta["qtype"] == "dense" and c.meta["width"] == 64 for c in convs)


def test_main_and_validation(tmp_path, capsys):
    assert main([str(tmp_path / "o"), "--n", "12", "--seed", "1", "--heldout", "4", "--image-size", "32"]) == 0
    printed = json.loads(capsys.readouterr().out)
    assert (printed["train"]["n"], printed["heldout"]["n"], printed["image_size"]) == (12, 4, 32)
    assert Image.open(tmp_path / "o" / load(tmp_path / "o" / "train.dense.jsonl")[0]["images"][0]).size == (32, 32)
    with pytest.raises(ConfigError, match="image_size"):
        make_synthetic_data(tmp_path, n=4, seed=0, image_size=16)


def _single_object_shares(out: Path, split: str) -> dict[str, float]:
    """Per qtype, the share of colour/shape/position records whose image holds one shape."""
    recs = load(out / f"{split}.dense.jsonl")
    qtypes = {r["id"]: r["qtype"] for r in load(out / f"{split}.llava.json")}
    shares = {}
    for q in ("colour", "shape", "position"):
        n_shapes = [sum("line" not in o for o in r["objects"]) for r in recs if qtypes[r["id"]] == q]
        shares[q] = sum(n == 1 for n in n_shapes) / len(n_shapes)
    return shares


def test_single_object_fraction_sets_the_train_mix_only(tmp_path):
    default = make_synthetic_data(tmp_path / "d", n=600, seed=2, heldout=300)
    low = make_synthetic_data(tmp_path / "low", n=600, seed=2, heldout=300, single_object_fraction=0.1)
    make_synthetic_data(tmp_path / "none", n=200, seed=2, heldout=0, single_object_fraction=0.0)
    # the default mix is the documented 0.6 single-shape share
    assert all(0.5 < s < 0.7 for s in _single_object_shares(tmp_path / "d", "train").values())
    assert all(s < 0.2 for s in _single_object_shares(tmp_path / "low", "train").values())
    assert all(s == 0.0 for s in _single_object_shares(tmp_path / "none", "train").values())
    # multi-shape questions name their target: "the circle", "the red object", "the red circle"
    qs = [r["conversations"][0]["value"] for r in load(tmp_path / "none" / "train.llava.json")
          if r["qtype"] == "colour"]
    assert qs and not any(q.endswith("the shape?") for q in qs)
    # balance and counts per qtype do not depend on the mix; the held-out split is the default one, byte for byte
    assert low["train"]["qtypes"] == default["train"]["qtypes"]
    assert files(tmp_path / "low")["heldout.llava.json"] == files(tmp_path / "d")["heldout.llava.json"]
    assert files(tmp_path / "low")["heldout.dense.jsonl"] == files(tmp_path / "d")["heldout.dense.jsonl"]
    assert files(tmp_path / "low")["train.llava.json"] != files(tmp_path / "d")["train.llava.json"]
    with pytest.raises(ConfigError, match="single_object_fraction"):
        make_synthetic_data(tmp_path / "bad", n=10, seed=0, single_object_fraction=1.5)
    assert main([str(tmp_path / "cli"), "--n", "200", "--seed", "2", "--heldout", "0",
                 "--single-object-fraction", "0"]) == 0
    assert files(tmp_path / "cli")["train.llava.json"] == files(tmp_path / "none")["train.llava.json"]
