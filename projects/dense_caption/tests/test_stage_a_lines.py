"""Stage-A output lines: `image_id` as the origin documents write it, `meta` from the group line."""

from __future__ import annotations

import json
from types import SimpleNamespace

from dense_caption.inference import stage_a
from PIL import Image


class _Runner:
    """A stand-in model: answers the summary prompt with a fixed text (what stage_a does around it is tested)."""

    def __init__(self, k: int):
        self.cfg = SimpleNamespace(data=SimpleNamespace(images_per_sample=k, summary_system_prompt=None,
                                                        system_prompt=None, summary_prompt="Summarise.",
                                                        image_key_prefix="image_"))
        self.model_dir, self.step = "model", 7

    def answer(self, messages, images, max_new_tokens):
        return "a red circle" if len(images) == 1 else '{"image_1":"one","image_2":"two"}'


def test_stage_a_lines_carry_image_id_and_meta(tmp_path) -> None:
    paths = []
    for name in ("cam_front.png", "cam_back.jpg"):
        Image.new("RGB", (8, 8)).save(tmp_path / name)
        paths.append(tmp_path / name)
    out = tmp_path / "a.jsonl"
    report = stage_a(_Runner(2), [("g1", paths, {"verdict": "pass", "site": "A"}), ("g2", paths[:1], {})], out, 8)
    rows = [json.loads(x) for x in out.read_text().splitlines()]
    assert rows == [
        {"group": "g1", "image_id": "cam_front", "image": str(paths[0]), "index": 0,
         "meta": {"verdict": "pass", "site": "A"}, "summary": "one"},
        {"group": "g1", "image_id": "cam_back", "image": str(paths[1]), "index": 1,
         "meta": {"verdict": "pass", "site": "A"}, "summary": "two"},
        {"group": "g2", "image_id": "cam_front", "image": str(paths[0]), "index": 0, "summary": "a red circle"}]
    assert report["images"] == 3 and report["summaries"] == 3
