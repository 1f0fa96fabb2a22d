"""The batch toolkit: prompt_item, answer_start, slice_rows, render_tokens on exact values."""

import pytest
import torch

from arctic_vl import IGNORE_INDEX, answer_start, prompt_item, render_tokens, slice_rows

IG = IGNORE_INDEX


def test_answer_start_first_and_last_trained_run():
    labels = [IG, IG, 5, 6, IG, IG, 8, 9, IG]
    assert answer_start(labels) == 2
    assert answer_start(labels, last=True) == 6
    assert answer_start(torch.tensor(labels), last=True) == 6
    assert answer_start([IG, IG]) is None
    assert answer_start([4, 5], last=True) == 0


def test_prompt_item_cuts_at_the_answer_and_keeps_other_fields():
    item = {"input_ids": torch.tensor([1, 2, 3, 4, 5, 6]), "labels": torch.tensor([IG, IG, 3, IG, 5, 6]),
            "pixel_values": torch.ones(2, 3), "_index": 7}
    first = prompt_item(item)
    assert first["input_ids"].tolist() == [1, 2] and first["labels"].tolist() == [IG, IG]
    assert first["labels"].dtype == torch.long and first["_index"] == 7
    assert first["pixel_values"] is item["pixel_values"]
    last = prompt_item(item, last=True)
    assert last["input_ids"].tolist() == [1, 2, 3, 4] and last["labels"].tolist() == [IG] * 4
    assert prompt_item(item, start=3)["input_ids"].tolist() == [1, 2, 3]
    assert item["input_ids"].tolist() == [1, 2, 3, 4, 5, 6]  # the item itself is untouched
    with pytest.raises(ValueError, match="no trained label"):
        prompt_item({"input_ids": [1, 2], "labels": [IG, IG]})


class _Tok:
    def decode(self, ids, skip_special_tokens=False):
        return "".join(f"t{i}" for i in ids)

    def convert_ids_to_tokens(self, tid):
        return "<image>"


def test_render_tokens_brackets_trained_runs_and_counts_images():
    ids = [1, 9, 9, 9, 2, 3, 4, 5]
    labels = [IG, IG, IG, IG, IG, 3, 4, IG]
    assert render_tokens(_Tok(), ids, labels, {9}) == "t1<<image> x 3>t2[[t3t4]]t5"


def test_slice_rows_qwen_keeps_each_rows_patches():
    # image token 9, merge 2: image 0 grid 1x2x2 (4 patches, 1 token), image 1 grid 1x4x2 (8 patches, 2 tokens)
    ids = torch.tensor([[1, 9, 2, 0], [3, 4, 5, 6], [9, 9, 7, 8]])
    batch = {"input_ids": ids, "labels": ids.clone(), "attention_mask": torch.tensor([[1, 1, 1, 0], [1] * 4, [1] * 4]),
             "mm_token_type_ids": (ids == 9).long(), "pixel_values": torch.arange(12.0)[:, None],
             "image_grid_thw": torch.tensor([[1, 2, 2], [1, 4, 2]]), "_indices": [5, -1, 7], "_num_tokens": 11,
             "_num_samples": 2, "_dropped": [("a", 0, "r", "m")] * 3}
    last = slice_rows(batch, [2], image_token_id=9, merge_size=2)
    assert last["input_ids"].tolist() == [[9, 9, 7, 8]] and last["_indices"] == [7]
    assert last["pixel_values"][:, 0].tolist() == list(range(4, 12)) and last["image_grid_thw"].tolist() == [[1, 4, 2]]
    assert set(last) == {"input_ids", "labels", "attention_mask", "mm_token_type_ids", "pixel_values",
                         "image_grid_thw", "_indices"}
    middle = slice_rows(batch, [1], image_token_id=9)
    assert middle["pixel_values"].shape == (0, 1) and middle["image_grid_thw"].tolist() == []
    both = slice_rows(batch, [2, 0], image_token_id=9)
    assert both["pixel_values"][:, 0].tolist() == [*range(4, 12), *range(4)]
    assert both["image_grid_thw"].tolist() == [[1, 4, 2], [1, 2, 2]] and both["_indices"] == [7, 5]
    with pytest.raises(ValueError, match="image_token_id"):
        slice_rows(batch, [0])


def test_slice_rows_llava_and_packed_positions():
    batch = {"input_ids": torch.tensor([[1, 2], [3, 4]]), "pixel_values": torch.tensor([[0.0], [1.0], [2.0]]),
             "image_sizes": torch.tensor([[10, 10], [20, 20], [30, 30]]), "batch_num_images": torch.tensor([1, 2]),
             "position_ids": torch.arange(16).reshape(4, 2, 2)}
    row = slice_rows(batch, [1])
    assert row["pixel_values"][:, 0].tolist() == [1.0, 2.0] and row["image_sizes"].tolist() == [[20, 20], [30, 30]]
    assert row["batch_num_images"].tolist() == [2]
    assert row["position_ids"].tolist() == [[[2, 3]], [[6, 7]], [[10, 11]], [[14, 15]]]
