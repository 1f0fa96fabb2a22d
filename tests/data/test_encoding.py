"""SampleEncoder: text once, pixels lazily, collation; checked against each family's real processor."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from arctic_vl.constants import IGNORE_INDEX
from arctic_vl.data.collate import pad_collate
from arctic_vl.data.encoding import SampleEncoder, _split_parts
from arctic_vl.errors import ConfigError, DataError
from arctic_vl.models.families import FAMILIES, get_family
from arctic_vl.models.loading import load_model, load_processor

torch.set_num_threads(1)  # two cores shared by several engineers

SYSTEM = "You are a helpful assistant."


@pytest.fixture(scope="module")
def tiny_dirs(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    from arctic_vl.models.tiny import make_tiny_model

    root = tmp_path_factory.mktemp("encoding_models")
    return {family: make_tiny_model(family, root / family, seed=0) for family in FAMILIES}


def _image(width: int, height: int, seed: int) -> Image.Image:
    rng = np.random.default_rng(seed)
    return Image.fromarray(rng.integers(0, 256, (height, width, 3), dtype=np.uint8))


def _samples() -> list[tuple[list[dict], list[Image.Image]]]:
    """A 2-image two-turn sample, a 1-image sample of another size, a text-only sample."""
    return [
        (
            [
                {"role": "user", "content": "<image>\nWhat colour is the circle? <image>"},
                {"role": "assistant", "content": "red"},
                {"role": "user", "content": "Which shape is blue?"},
                {"role": "assistant", "content": "circle"},
            ],
            [_image(50, 40, 1), _image(70, 30, 2)],
        ),
        (
            [{"role": "user", "content": "<image>Describe the image."},
             {"role": "assistant", "content": "A blue star at the top left."}],
            [_image(90, 64, 3)],
        ),
        ([{"role": "user", "content": "How many stars?"}, {"role": "assistant", "content": "three"}], []),
    ]


def _reference_text(processor, messages: list[dict], system: str | None) -> str:
    conversation = [{"role": m["role"], "content": _split_parts(m["content"])} for m in messages]
    if system is not None:
        conversation.insert(0, {"role": "system", "content": [{"type": "text", "text": system}]})
    return processor.apply_chat_template(conversation, tokenize=False)


def _labelled_runs(tokenizer, labels: list[int]) -> list[str]:
    """Decoded text of each contiguous run of trained tokens."""
    runs, current = [], []
    for token in [*labels, IGNORE_INDEX]:
        if token == IGNORE_INDEX:
            if current:
                runs.append(tokenizer.decode(current))
            current = []
        else:
            current.append(token)
    return runs


@pytest.mark.parametrize("family", sorted(FAMILIES))
def test_mixed_batch_matches_processor_and_runs(family, tiny_dirs):
    processor = load_processor(tiny_dirs[family])
    encoder = SampleEncoder(processor, get_family(family), system_prompt=SYSTEM)
    expected_runs = [["red<|im_end|>", "circle<|im_end|>"], ["A blue star at the top left.<|im_end|>"],
                     ["three<|im_end|>"]]
    texts, nested, items = [], [], []
    for (messages, images), runs in zip(_samples(), expected_runs):
        enc = encoder.encode_text(messages, [im.size for im in images])
        text = _reference_text(processor, messages, SYSTEM)
        ref = processor(text=[text], images=[images] if images else None, return_tensors="pt")
        assert enc.input_ids == ref["input_ids"][0].tolist()
        assert len(enc.labels) == len(enc.input_ids)
        assert _labelled_runs(processor.tokenizer, enc.labels) == runs
        # Labelled positions hold exactly their own ids.
        assert all(lab in (IGNORE_INDEX, tok) for lab, tok in zip(enc.labels, enc.input_ids))
        assert len(enc.image_spans) == len(images)
        for start, end in enc.image_spans:
            assert set(enc.input_ids[start:end]) == {processor.image_token_id}
        assert sum(e - s for s, e in enc.image_spans) == enc.input_ids.count(processor.image_token_id)
        vision = encoder.encode_images(images)
        assert set(vision) == {k for k in ref if k not in ("input_ids", "attention_mask", "mm_token_type_ids")}
        for key, value in vision.items():
            assert torch.equal(value, ref[key]), key
        items.append({"input_ids": torch.tensor(enc.input_ids), "labels": torch.tensor(enc.labels), **vision})
        texts.append(text)
        nested.append(images)

    batch = pad_collate(encoder, items)
    ref = processor(text=texts, images=nested, padding=True, return_tensors="pt")
    assert set(batch) == set(ref) | {"labels"}
    for key in ref:
        assert torch.equal(batch[key], ref[key]), key
    lengths = [len(item["input_ids"]) for item in items]
    for row, n in enumerate(lengths):
        assert batch["attention_mask"][row].tolist() == [1] * n + [0] * (batch["input_ids"].shape[1] - n)
        assert (batch["labels"][row, n:] == IGNORE_INDEX).all()
        assert (batch["input_ids"][row, n:] == processor.tokenizer.pad_token_id).all()

    model = load_model(tiny_dirs[family]).eval()
    with torch.no_grad():
        out = model(**batch)
        assert torch.isfinite(out.loss)
        # Each row of the mixed batch gives the logits its sample gives alone.
        for row, (item, n) in enumerate(zip(items, lengths)):
            alone = model(**pad_collate(encoder, [item])).logits[0]
            torch.testing.assert_close(out.logits[row, :n], alone, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("family", sorted(FAMILIES))
def test_image_token_count_matches_processor_expansion(family, tiny_dirs):
    processor = load_processor(tiny_dirs[family])
    encoder = SampleEncoder(processor, get_family(family))
    placeholder = get_family(family).image_placeholder
    counts = set()
    for k, (width, height) in enumerate([(32, 32), (50, 40), (40, 90), (130, 20), (200, 150), (17, 300)]):
        ids = processor(text=[placeholder], images=[[_image(width, height, k)]])["input_ids"][0]
        assert encoder.image_token_count(width, height) == ids.count(processor.image_token_id), (width, height)
        counts.add(encoder.image_token_count(width, height))
    if family == "llava":  # LLaVA-1.5 resizes every image to one crop: the count does not depend on the size
        assert len(counts) == 1
    else:
        assert len(counts) > 1  # the sizes really exercise size-dependent expansion
    # Two images in one sample (OneVision drops anyres tiling there).
    sizes = [(50, 40), (90, 64)]
    ids = processor(text=[placeholder * 2], images=[[_image(w, h, 9) for w, h in sizes]])["input_ids"][0]
    expected = sum(encoder.image_token_count(w, h, images_in_sample=2) for w, h in sizes)
    assert ids.count(processor.image_token_id) == expected


def test_qwen_pixel_budget_applies_to_counts_and_pixels(tiny_dirs):
    processor = load_processor(tiny_dirs["qwen2_5_vl"])
    spec = get_family("qwen2_5_vl")
    default = SampleEncoder(processor, spec)
    small = SampleEncoder(processor, spec, max_pixels=56 * 56)
    large = SampleEncoder(processor, spec, min_pixels=112 * 112, max_pixels=224 * 224)
    image = _image(160, 120, 5)
    assert small.image_token_count(160, 120) < default.image_token_count(160, 120) < large.image_token_count(160, 120)
    for encoder in (default, small, large):
        enc = encoder.encode_text([{"role": "user", "content": "<image>"}, {"role": "assistant", "content": "red"}],
                                  [image.size])
        grid = encoder.encode_images([image])["image_grid_thw"]
        tokens = int(grid.prod()) // 4
        assert tokens == encoder.image_token_count(160, 120) == enc.input_ids.count(processor.image_token_id)
    # The caller's processor keeps its own budget.
    assert processor.image_processor.size["longest_edge"] == 112 * 112


def test_llava_pinpoints_apply_to_counts_and_pixels(tiny_dirs):
    processor = load_processor(tiny_dirs["llava_next"])
    pinpoints = [[32, 32], [32, 64], [64, 32]]
    encoder = SampleEncoder(processor, get_family("llava_next"), image_grid_pinpoints=pinpoints)
    default = SampleEncoder(processor, get_family("llava_next"))
    image = _image(64, 64, 6)
    assert encoder.image_token_count(64, 64) < default.image_token_count(64, 64)
    # 32x32 best fit: one base tile + one anyres tile.
    assert encoder.encode_images([image])["pixel_values"].shape[:2] == (1, 2)
    assert default.encode_images([image])["pixel_values"].shape[:2] == (1, 5)
    assert processor.image_processor.image_grid_pinpoints == [[32, 64], [64, 32], [64, 64]]
    with pytest.raises(ConfigError, match="Qwen"):
        SampleEncoder(processor, get_family("llava_next"), max_pixels=1000)
    with pytest.raises(ConfigError, match="LLaVA"):
        SampleEncoder(load_processor(tiny_dirs["qwen2_vl"]), get_family("qwen2_vl"), image_grid_pinpoints=pinpoints)


def test_errors_and_system_prompt(tiny_dirs):
    processor = load_processor(tiny_dirs["qwen2_vl"])
    encoder = SampleEncoder(processor, get_family("qwen2_vl"), system_prompt=SYSTEM)
    turns = [{"role": "user", "content": "<image>What?"}, {"role": "assistant", "content": "red"}]
    with pytest.raises(DataError) as err:
        encoder.encode_text(turns, [])
    assert err.value.reason == "image_token_mismatch"
    with pytest.raises(DataError) as err:
        encoder.encode_text(turns, [(32, 32), (32, 32)])
    assert err.value.reason == "image_token_mismatch"
    with pytest.raises(DataError) as err:
        encoder.encode_text(
            [{"role": "user", "content": "<|image_pad|>What?"}, {"role": "assistant", "content": "x"}], []
        )
    assert err.value.reason == "image_token_mismatch"
    for bad in ([{"role": "human", "content": "hi"}, {"role": "assistant", "content": "x"}],
                [{"role": "user", "content": "hi"}], [], [{"role": "assistant", "content": 3}]):
        with pytest.raises(DataError) as err:
            encoder.encode_text(bad, [])
        assert err.value.reason == "malformed_turns"

    text_only = [{"role": "user", "content": "How many?"}, {"role": "assistant", "content": "two"}]
    enc = encoder.encode_text(text_only, [])
    assert processor.tokenizer.decode(enc.input_ids).startswith(f"<|im_start|>system\n{SYSTEM}<|im_end|>\n")
    assert _labelled_runs(processor.tokenizer, enc.labels) == ["two<|im_end|>"]
    own = encoder.encode_text([{"role": "system", "content": "Be brief."}, *text_only], [])
    assert processor.tokenizer.decode(own.input_ids).startswith("<|im_start|>system\nBe brief.<|im_end|>\n")
    assert SYSTEM not in processor.tokenizer.decode(own.input_ids)


@pytest.mark.parametrize("family", ["llava_next", "qwen3_vl"])
def test_text_only_batch_has_no_vision_keys(family, tiny_dirs):
    processor = load_processor(tiny_dirs[family])
    encoder = SampleEncoder(processor, get_family(family))
    items = []
    for content in ("How many?", "Which shape is at the top left?"):
        enc = encoder.encode_text([{"role": "user", "content": content}, {"role": "assistant", "content": "one"}], [])
        assert encoder.encode_images([]) == {}
        items.append({"input_ids": torch.tensor(enc.input_ids), "labels": torch.tensor(enc.labels), "_index": 7})
    batch = pad_collate(encoder, items)
    expected = {"input_ids", "attention_mask", "labels"} | ({"mm_token_type_ids"} if family == "qwen3_vl" else set())
    assert set(batch) == expected
    if family == "qwen3_vl":
        assert int(batch["mm_token_type_ids"].sum()) == 0
    with torch.no_grad():
        assert torch.isfinite(load_model(tiny_dirs[family])(**batch).loss)


def test_encoder_pickles_for_dataloader_workers(tiny_dirs):
    import pickle

    processor = load_processor(tiny_dirs["qwen3_vl"])
    encoder = SampleEncoder(processor, get_family("qwen3_vl"), max_pixels=4 * 64 * 64, system_prompt=SYSTEM)
    clone = pickle.loads(pickle.dumps(encoder))
    messages, images = _samples()[1]
    sizes = [im.size for im in images]
    assert clone.encode_text(messages, sizes) == encoder.encode_text(messages, sizes)
    a, b = clone.encode_images(images), encoder.encode_images(images)
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_labels_cover_content_with_leading_space_and_every_assistant_turn(tiny_dirs):
    processor = load_processor(tiny_dirs["llava_onevision"])
    encoder = SampleEncoder(processor, get_family("llava_onevision"))
    turns = [
        {"role": "system", "content": "Answer in one word."},
        {"role": "user", "content": "<image>What colour?"},
        {"role": "assistant", "content": " red star."},
        {"role": "user", "content": "Where?"},
        {"role": "assistant", "content": "left"},
    ]
    enc = encoder.encode_text(turns, [(40, 40)])
    assert _labelled_runs(processor.tokenizer, enc.labels) == [" red star.<|im_end|>", "left<|im_end|>"]
    # Nothing but those tokens is trained: not the headers, newlines, system or user text.
    trained = processor.tokenizer(" red star.<|im_end|>left<|im_end|>")["input_ids"]
    assert sum(lab != IGNORE_INDEX for lab in enc.labels) == len(trained)
