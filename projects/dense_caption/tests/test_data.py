"""The dense_caption data factory: answers from (augmented) geometry, modes, grouping, checks naming the record."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from arctic_vl import IGNORE_INDEX, DataError, Engine


def _records(shapes: Path, n: int = 12) -> list[dict]:
    return [json.loads(line) for line in (shapes / "train.dense.jsonl").read_text().splitlines()[:n]]


def _write(tmp: Path, shapes: Path, records: list[dict]) -> Path:
    path = tmp / "dense.jsonl"
    for r in records:
        r["images"] = [str(shapes / i) for i in r["images"]]
    path.write_text("".join(json.dumps(r) + "\n" for r in records))
    return path


def _build(tmp: Path, model: Path, data: dict, **trainer):
    cfg = {"model": {"name_or_path": str(model)}, "data": {"type": "dense_caption", "micro_batch_size": 4, **data},
           "trainer": {"type": "dense_caption", "output_dir": str(tmp / "run"), "seed": 3, **trainer}}
    engine = Engine(cfg)
    trainer = engine._build()
    return trainer.data, trainer.bundle


def _decode_answer(bundle, item) -> str:
    tok = bundle.processor.tokenizer
    ids = [t for t, lab in zip(item["input_ids"].tolist(), item["labels"].tolist()) if lab != IGNORE_INDEX]
    return tok.decode(ids[:-1])  # without the end-of-turn token


def test_pixel_answers_use_the_processors_resize(tmp_path, shapes, tiny_qwen25) -> None:
    """qwen2_5_vl: pixels of the image the model sees; with a 48x48 budget a 64px image is seen at 48x48."""
    src = _write(tmp_path, shapes, _records(shapes))
    data, bundle = _build(tmp_path, tiny_qwen25,
                          {"sources": [str(src)], "max_pixels": 48 * 48, "object_order": "record"})
    rec = data.train.records[0]
    item = data.train[0]
    assert item["image_grid_thw"].tolist() == [[1, 6, 6]]  # 48 / 8
    answer = json.loads(_decode_answer(bundle, item))
    import math
    from fractions import Fraction

    for obj, (geom, desc) in zip(answer, rec.objects):
        expect = [math.floor(Fraction(v) * 48 / 64 + Fraction(1, 2)) for v in geom.coords()]
        assert obj[geom.key] == expect and obj["desc"] == desc


def test_norm1000_answers_for_qwen2_vl(tmp_path, shapes, tiny_qwen2) -> None:
    from arctic_vl import to_norm1000

    src = _write(tmp_path, shapes, _records(shapes))
    data, bundle = _build(tmp_path, tiny_qwen2, {"sources": [str(src)], "object_order": "record"})
    for i in range(3):
        rec = data.train.records[i]
        answer = json.loads(_decode_answer(bundle, data.train[i]))
        assert answer == [{g.key: to_norm1000(g.coords(), 64, 64), "desc": d} for g, d in rec.objects]


def test_reading_order_and_augmented_answer_follow_the_image(tmp_path, shapes, tiny_qwen25) -> None:
    src = _write(tmp_path, shapes, _records(shapes))
    aug = {"enabled": True, "ops": [{"name": "hflip", "params": {"prob": 1.0}}]}
    data, bundle = _build(tmp_path, tiny_qwen25, {"sources": [str(src)], "augmentation": aug})
    for i in range(4):
        rec = data.train.records[i]
        answer = json.loads(_decode_answer(bundle, data.train[i]))
        flipped = []
        for g, d in rec.objects:
            c = g.coords()
            if g.key == "bbox_2d":
                c = [64 - c[2], c[1], 64 - c[0], c[3]]
            else:
                c = [64 - v if k % 2 == 0 else v for k, v in enumerate(c)]
            flipped.append((min(c[1::2]), min(c[0::2]), {g.key: [round(v) for v in c], "desc": d}))
        assert answer == [o for *_, o in sorted(flipped, key=lambda t: (t[0], t[1]))]


def test_groups_summary_mode_and_epoch_draws(tmp_path, shapes, tiny_qwen25) -> None:
    src = _write(tmp_path, shapes, _records(shapes))
    data, bundle = _build(tmp_path, tiny_qwen25, {"sources": [str(src)], "images_per_sample": 2, "summary_ratio": 0.5,
                                                  "image_key_prefix": "img_"})
    ds = data.train
    assert len(ds) == 6
    modes = {e: [(ds.set_epoch(e), ds.mode(i))[1] for i in range(6)] for e in range(4)}
    assert {m for ms in modes.values() for m in ms} == {"dense", "summary"}
    ds.set_epoch(0)
    groups0 = [ds.group(i) for i in range(6)]
    assert sorted(r for g in groups0 for r in g) == list(range(12))
    ds.set_epoch(1)
    assert [ds.group(i) for i in range(6)] != groups0
    for e in range(2):
        ds.set_epoch(e)
        for i in range(6):
            item = ds[i]
            assert item["image_grid_thw"].shape[0] == 2
            answer = json.loads(_decode_answer(bundle, item))
            recs = [ds.records[r] for r in ds.group(i)]
            assert list(answer) == ["img_1", "img_2"]
            if ds.mode(i) == "summary":
                assert answer == {"img_1": recs[0].summary, "img_2": recs[1].summary}
            else:
                assert [len(v) for v in answer.values()] == [len(r.objects) for r in recs]


def test_missing_summary_and_image_size_mismatch_name_the_record(tmp_path, shapes, tiny_qwen25) -> None:
    records = _records(shapes)
    del records[3]["summary"]
    records[5]["width"] = 80
    src = _write(tmp_path, shapes, records)
    with pytest.raises(DataError, match=r"dense.jsonl: record 3 \(line 4\): summary_ratio 0.2 draws summary mode"):
        _build(tmp_path, tiny_qwen25, {"sources": [str(src)], "summary_ratio": 0.2})
    with pytest.raises(DataError, match=r"record 5 \(line 6\): width x height 80 x 64 but the image .* is 64x64"):
        _build(tmp_path, tiny_qwen25, {"sources": [str(src)]})
    data, _ = _build(tmp_path, tiny_qwen25, {"sources": [str(src)], "summary_ratio": 0.2, "on_bad_record": "skip"})
    assert data.report.by_reason() == {"image_size_mismatch": 1, "missing_summary": 1}
    assert len(data.train) == 10


def test_health_check_names_the_record(tmp_path, shapes, tiny_qwen25, monkeypatch) -> None:
    src = _write(tmp_path, shapes, _records(shapes))
    data, _ = _build(tmp_path, tiny_qwen25, {"sources": [str(src)]})
    real = data.train.encoder.encode_text

    def shifted(messages, sizes):
        enc = real(messages, sizes)
        enc.labels = [IGNORE_INDEX, *enc.labels[:-1]]  # labels one token off the answer
        return enc

    monkeypatch.setattr(data.train.encoder, "encode_text", shifted)
    with pytest.raises(DataError, match=r"health check: the trained tokens .* are not exactly the answer") as e:
        data.train[2]
    assert str(e.value).startswith(data.train.where(2) + ": ")


def test_items_are_identical_across_workers(tmp_path, shapes, tiny_qwen25) -> None:
    """Workers 0 and 2 build the same batches (draws depend on seed, epoch and index only)."""
    src = _write(tmp_path, shapes, _records(shapes))
    aug = {"enabled": True, "bypass_prob": 0.2, "ops": [
        {"name": "hflip"}, {"name": "rotate", "params": {"max_deg": 20, "prob": 0.5}}, {"name": "expand_to_fit_affine"},
        {"name": "random_crop", "params": {"size": [0.6, 1.0], "min_coverage": 0.5, "prob": 0.5}},
        {"name": "pad_to_multiple", "params": {"multiple": 16}}, {"name": "contrast", "params": {"prob": 0.5}}]}
    data, _ = _build(tmp_path, tiny_qwen25, {"sources": [str(src)], "augmentation": aug, "summary_ratio": 0.3})

    def batches(workers: int, epoch: int) -> list[dict]:
        data.train.set_epoch(epoch)
        loader = torch.utils.data.DataLoader(data.train, batch_size=4, collate_fn=data.collate, num_workers=workers)
        return list(loader)

    for epoch in (0, 1):
        a, b = batches(0, epoch), batches(2, epoch)
        for x, y in zip(a, b):
            assert x.keys() == y.keys()
            for k in x:
                if isinstance(x[k], torch.Tensor):
                    assert torch.equal(x[k], y[k]), k
                else:
                    assert x[k] == y[k], k
    assert any(b["_augmentation"].get("op.rotate") for b in batches(0, 0))


def test_gkd_row_inputs_hold_that_rows_images(tmp_path, shapes, tiny_qwen25) -> None:
    """On-policy generation cuts one row out of a Qwen batch: its own pixels and grid, as if collated alone."""
    from types import SimpleNamespace

    from dense_caption.gkd import GKDTrainer

    src = _write(tmp_path, shapes, _records(shapes))
    data, bundle = _build(tmp_path, tiny_qwen25, {"sources": [str(src)], "images_per_sample": 2, "max_pixels": 48 * 48,
                                                  "augmentation": {"enabled": True, "ops": [
                                                      {"name": "resize_by_scale", "params": {"lo": 0.5, "hi": 1.0,
                                                                                             "multiple": 16}}]}})
    items = [data.train[i] for i in range(3)]
    batch = data.collate([dict(it) for it in items])
    fake = SimpleNamespace(bundle=bundle)
    for r in range(3):
        alone = data.collate([dict(items[r])])
        one = GKDTrainer._row_inputs(fake, batch, r, batch["input_ids"][r:r + 1, :5])
        assert torch.equal(one["pixel_values"], alone["pixel_values"])
        assert torch.equal(one["image_grid_thw"], alone["image_grid_thw"])


def test_pixels_that_do_not_decode_are_dropped_and_counted(tmp_path, shapes, tiny_qwen25) -> None:
    """A record whose PNG header reads but whose pixels do not: the item comes back tagged, the collator drops
    it and `accept` applies on_bad_record (skip: counted once per record; error: a DataError naming it)."""
    from arctic_vl import ITEM_BAD, UNREADABLE_IMAGE

    records = _records(shapes, 6)
    png = (shapes / records[4]["images"][0]).read_bytes()
    broken = tmp_path / "broken.png"
    broken.write_bytes(png[: len(png) * 6 // 10])
    src = _write(tmp_path, shapes, records)
    lines = src.read_text().splitlines()
    lines[4] = json.dumps({**json.loads(lines[4]), "images": [str(broken)]})
    src.write_text("\n".join(lines) + "\n")
    for policy in ("skip", "error"):
        data, _ = _build(tmp_path / policy, tiny_qwen25, {"sources": [str(src)], "on_bad_record": policy})
        assert len(data.train) == 6  # the header reads: found only when the item is built
        j = next(k for k, rec in enumerate(data.train.records) if rec.index == 4)  # the dataset's item of record 4
        assert data.train[j][ITEM_BAD][:3] == (str(src), 4, UNREADABLE_IMAGE)
        others = [k for k in range(6) if k != j][:2]
        for _ in range(2):  # two epochs drop it twice; it is counted once
            batch = data.accept(data.collate([data.train[i] for i in (others[0], j, others[1])]))
            assert batch["_num_samples"] == 2 and batch["_indices"] == others and "_dropped" not in batch
        if policy == "skip":
            assert data.report.by_reason() == {UNREADABLE_IMAGE: 1}
        else:
            with pytest.raises(DataError, match=r"dense.jsonl: record 4 \(line 5\): .*found when loading the sample"):
                data.raise_pending(0)


def test_passed_through_grounding_records_are_rendered_and_leftovers_refused(tmp_path, shapes, tiny_qwen2) -> None:
    """A messages record beside the dense ones (passed through) trains on its ms-swift `objects` rendered in the
    family's convention (Qwen2-VL: 0 to 1000 in its box tokens), never on `<bbox>`; one with no `objects` is a bad
    record (skip: counted; error: DataError naming it)."""
    dense = _write(tmp_path, shapes, _records(shapes, 2))
    image = str(shapes / "images" / "train-000000.png")  # 64 x 64
    chat = [{"role": "user", "content": "<image>Find the <ref-object>"}, {"role": "assistant", "content": "<bbox>"}]
    swift = tmp_path / "swift.jsonl"
    swift.write_text(json.dumps({"messages": chat, "images": [image],
                                 "objects": {"ref": ["circle"], "bbox": [[8, 16, 32, 48]]}}) + "\n"
                     + json.dumps({"messages": chat, "images": [image]}) + "\n")
    data, bundle = _build(tmp_path, tiny_qwen2, {"sources": [str(dense), str(swift)], "on_bad_record": "skip",
                                                 "shuffle": False})
    assert data.report.by_reason() == {"unrendered_placeholder": 1} and len(data.train.plain) == 1
    item = data.train[data.train.n_groups]
    assert _decode_answer(bundle, item) == "<|box_start|>(125,250),(500,750)<|box_end|>"
    assert "<|object_ref_start|>circle<|object_ref_end|>" in bundle.processor.tokenizer.decode(item["input_ids"])
    with pytest.raises(DataError, match=r"swift.jsonl: record 1 \(line 2\): field messages\[0\]\.content: holds the "
                                        r"placeholder <ref-object>.*reason: unrendered_placeholder"):
        _build(tmp_path / "error", tiny_qwen2, {"sources": [str(dense), str(swift)]})
