"""Synthetic teacher/student detection records from the core's coloured-shapes data.

`arctic_vl bbu-synthetic-data OUT --n N --seed S` writes the shapes data set with `arctic_vl.make_synthetic_data`
under OUT/shapes, then one detection record per shapes image: 0 to `max_teachers` teacher turns (other images of
the same split with their answers) and the image itself as the student turn, whose `objects` are its shapes
(circle, square, triangle: the triangle's box bounds its polygon; black line segments are distractors, not objects).
Every answer lists the image's objects in reading order ("red circle, blue square"). Output is identical for a seed.
"""

from __future__ import annotations

import argparse
import json
import random
from pathlib import Path
from typing import Any

from arctic_vl import make_synthetic_data, output_directory

PROMPT = "Describe the objects."
SPLITS = ("train", "heldout")


def shape_objects(dense_objects: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Dense-caption objects of a shapes image -> detection objects (pixel bbox_2d, desc); lines are dropped."""
    out = []
    for obj in dense_objects:
        if "bbox_2d" in obj:
            out.append({"bbox_2d": [float(v) for v in obj["bbox_2d"]], "desc": obj["desc"]})
        elif "poly" in obj:
            xs, ys = obj["poly"][0::2], obj["poly"][1::2]
            out.append({"bbox_2d": [float(min(xs)), float(min(ys)), float(max(xs)), float(max(ys))], "desc": obj["desc"]})
    return out


def answer(objects: list[dict[str, Any]]) -> str:
    """What the assistant says about an image: its objects' descriptions, in the given order."""
    return ", ".join(o["desc"] for o in objects) if objects else "no objects"


def detection_records(dense: list[dict[str, Any]], image_prefix: str, rng: random.Random,
                      max_teachers: int) -> list[dict[str, Any]]:
    """One record per dense record: up to `max_teachers` other images as teacher turns, then it as the student."""
    records = []
    for i, student in enumerate(dense):
        others = [j for j in range(len(dense)) if j != i]
        k = rng.randint(0, min(max_teachers, len(others)))
        turns = [dense[j] for j in rng.sample(others, k)] + [student]
        messages, images = [], []
        for rec in turns:
            images.append(f"{image_prefix}{rec['images'][0]}")
            messages += [{"role": "user", "content": f"<image>\n{PROMPT}"},
                         {"role": "assistant", "content": answer(shape_objects(rec["objects"]))}]
        records.append({"id": student["id"], "images": images, "messages": messages,
                        "objects": shape_objects(student["objects"])})
    return records


def make_detection_data(out_dir: str | Path, *, n: int, seed: int, heldout: int = 50, image_size: int = 112,
                        max_teachers: int = 2) -> dict[str, Any]:
    """Write OUT/shapes (the shapes data) and OUT/{train,heldout}.bbu.jsonl; returns counts and paths."""
    out = Path(out_dir)
    shapes = make_synthetic_data(out / "shapes", n=n, seed=seed, heldout=heldout, image_size=image_size,
                                 text_fraction=0.0)
    result: dict[str, Any] = {"out_dir": str(out.resolve()), "seed": seed, "image_size": image_size}
    for split in SPLITS:
        if split not in shapes:
            continue
        dense_file = Path(shapes[split]["dense"])
        dense = [json.loads(line) for line in dense_file.read_text().splitlines() if line.strip()]
        records = detection_records(dense, "shapes/", random.Random(f"bbu_detection:{seed}:{split}"), max_teachers)
        path = out / f"{split}.bbu.jsonl"
        path.write_text("".join(json.dumps(r) + "\n" for r in records), encoding="utf-8")
        result[split] = {"records": len(records), "objects": sum(len(r["objects"]) for r in records),
                         "path": str(path)}
    return result


def main(argv: list[str]) -> int:
    """`arctic_vl bbu-synthetic-data OUT --n N --seed S [--heldout H --image-size PX --max-teachers K]`."""
    p = argparse.ArgumentParser(prog="arctic_vl bbu-synthetic-data",
                                description="Write teacher/student detection records from the synthetic shapes data.")
    p.add_argument("out_dir")
    p.add_argument("--n", type=int, required=True, help="train records (one per shapes image)")
    p.add_argument("--seed", type=int, required=True)
    p.add_argument("--heldout", type=int, default=50, help="held-out records")
    p.add_argument("--image-size", type=int, default=112, help="image side in pixels")
    p.add_argument("--max-teachers", type=int, default=2, help="most teacher turns before the student image")
    args = p.parse_args(argv)
    if args.max_teachers < 0:
        p.error("--max-teachers must be >= 0")
    output_directory(args.out_dir, "OUT")
    print(json.dumps(make_detection_data(args.out_dir, n=args.n, seed=args.seed, heldout=args.heldout,
                                         image_size=args.image_size, max_teachers=args.max_teachers), indent=1))
    return 0
