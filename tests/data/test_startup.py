"""Start-up that does not grow with the data: one rendering per record, parallel encoding, the encoded cache.

The proof of correctness is that every path gives the records and encodings the serial, uncached path gives
(the encoding tests check that path against each family's real processor); a changed data file, tokenizer or
chat template misses the cache, so a stale entry is never used.
"""

from __future__ import annotations

import json
from pathlib import Path
from types import SimpleNamespace

import pytest


@pytest.fixture(scope="module")
def bundle(tiny_llava: Path):
    from arctic_vl.models.loading import family_of_dir, load_processor

    return SimpleNamespace(processor=load_processor(tiny_llava), family=family_of_dir(tiny_llava), model=None)


def _records(synthetic_data: Path, n: int) -> list[dict]:
    records = json.loads((synthetic_data / "train.llava.json").read_text())
    return [{**r, "image": str(synthetic_data / r["image"])} if r.get("image") else r for r in records[:n]]


def _build(bundle, sources: list, tmp_path: Path, **data):
    from arctic_vl.data.factory import VLMDataConfig, VLMDataFactory

    config = VLMDataConfig(sources=sources, max_length=256, cache_dir=str(tmp_path / "cache"), on_bad_record="skip",
                           **data)
    return VLMDataFactory(config).build(bundle, seed=5)


def _content(data) -> list:
    return [(c.source, c.index, c.messages, c.images, c.image_sizes, e.input_ids, e.labels, e.image_spans)
            for c, e in zip(data.train.conversations, data.train.encoded)]


def test_parallel_and_cached_equal_serial(bundle, synthetic_data, tmp_path, monkeypatch):
    """200 records (two bad), weighted twice: 2 worker processes, and a warm cache, give exactly the serial,
    uncached result, with the same bad-record report and fingerprint."""
    import arctic_vl.data.parallel as parallel

    records = _records(synthetic_data, 200)
    records[7] = {"conversations": [{"from": "robot", "value": "x"}]}  # malformed_turns
    records[150]["image"] = str(tmp_path / "missing.png")  # missing_image
    data_file = tmp_path / "train.json"
    data_file.write_text(json.dumps(records))
    sources = [{"path": str(data_file), "weight": 2.0}]
    monkeypatch.setattr(parallel, "MIN_PARALLEL_ITEMS", 64)
    serial = _build(bundle, sources, tmp_path, cache=False, preprocess_workers=1)
    forked = _build(bundle, sources, tmp_path, cache=False, preprocess_workers=2)
    cold = _build(bundle, sources, tmp_path, preprocess_workers=2)
    warm = _build(bundle, sources, tmp_path, preprocess_workers=1)
    assert len(serial.train) == 2 * 198
    for other in (forked, cold, warm):
        assert _content(other) == _content(serial)
        assert other.report.by_reason() == serial.report.by_reason() == {"malformed_turns": 1, "missing_image": 1}
        assert other.report.examples == serial.report.examples
        assert other.fingerprint == serial.fingerprint
    assert [d.stats["cache"]["sources"] for d in (serial, cold, warm)] == [
        {str(data_file): "off"}, {str(data_file): "miss"}, {str(data_file): "hit"}]


def test_a_changed_file_tokenizer_or_template_misses_the_cache(bundle, synthetic_data, tmp_path):
    import copy

    data_file = tmp_path / "train.json"
    data_file.write_text(json.dumps(_records(synthetic_data, 12)))
    sources = [str(data_file)]

    def state(b) -> str:
        return _build(b, sources, tmp_path).stats["cache"]["sources"][str(data_file)]

    assert [state(bundle), state(bundle)] == ["miss", "hit"]
    records = _records(synthetic_data, 12)
    records[5]["conversations"][1]["value"] = "blue"  # one answer, same file size class
    data_file.write_text(json.dumps(records))
    assert [state(bundle), state(bundle)] == ["miss", "hit"]
    templated = SimpleNamespace(**vars(bundle))
    templated.processor = copy.deepcopy(bundle.processor)
    templated.processor.chat_template = bundle.processor.chat_template.replace("<|im_end|>", "<|endoftext|>")
    assert state(templated) == "miss"
    data = _build(templated, sources, tmp_path)  # and the entry it wrote holds that template's labels
    assert all(e.labels[-1] == bundle.processor.tokenizer.convert_tokens_to_ids("<|endoftext|>")
               for e in data.train.encoded if e.labels[-1] != -100)
    retokenized = SimpleNamespace(**vars(bundle))
    retokenized.processor = copy.deepcopy(bundle.processor)
    retokenized.processor.tokenizer.add_tokens(["shape"])  # a tokenizer change: other ids for the same text
    assert state(retokenized) == "miss"
    assert state(bundle) == "hit"  # the original entry is still there and still right
    image = Path(records[0]["image"])
    image.touch()  # an image file rewritten since: the entry's image sizes may be stale
    assert state(bundle) == "miss"
