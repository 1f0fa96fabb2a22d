"""The batch toolkit: prompt_item, answer_start, render_tokens on exact values."""

import pytest
import torch

from arctic_vl import IGNORE_INDEX, answer_start, prompt_item, render_tokens

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
