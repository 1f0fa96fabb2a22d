"""Synthetic coloured-shapes data: a learnable VQA + dense-caption task for smoke runs and CI.

Images are a plain background with 1-3 large, non-overlapping solid shapes (circle, square, triangle) in
four clearly distinct colours, sometimes with a thin black line segment. Each image gets one single-word
question (`colour`, `shape`, `count`, `position`); a share of records are text-only (`text`: small
arithmetic and number order). Answers are balanced across classes within each question type, and many
colour/shape/position questions are about a single-object image, so a tiny model learns them in minutes.

The same samples are written in all three record formats (LLaVA json, messages JSONL, dense-caption JSONL;
text-only records have no dense-caption form). Output is byte-identical for a seed.
"""

from __future__ import annotations

import argparse
import json
import math
import random
from pathlib import Path
from typing import Any

from PIL import Image, ImageDraw

from arctic_vl.config.paths import output_directory
from arctic_vl.data.records import IMAGE_TOKEN
from arctic_vl.errors import ConfigError

BACKGROUND = (245, 245, 245)
PALETTE = {"red": (220, 40, 40), "green": (40, 170, 60), "blue": (40, 80, 220), "yellow": (235, 200, 30)}
SHAPES = ("circle", "square", "triangle")
LINE_COLOUR = ("black", (30, 30, 30))  # not in PALETTE, so colour questions stay unambiguous
COUNT_WORDS = ("zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine")
POSITIONS = ("left", "right", "top", "bottom")
IMAGE_QTYPES = ("colour", "shape", "count", "position")
QTYPES = (*IMAGE_QTYPES, "text")
SINGLE_OBJECT_SHARE = 0.6  # colour/shape/position questions on a one-shape image: the easy, learnable case
LINE_SHARE = 0.3  # images that also get a black line segment (a `line` object in dense captions)


def _answers(qtype: str) -> tuple[str, ...]:
    return {"colour": tuple(PALETTE), "shape": SHAPES, "count": COUNT_WORDS[1:4], "position": POSITIONS}[qtype]


def _overlaps(a: tuple[int, ...], b: tuple[int, ...], gap: int) -> bool:
    return not (a[2] + gap <= b[0] or b[2] + gap <= a[0] or a[3] + gap <= b[1] or b[3] + gap <= a[1])


def _place(rng: random.Random, size: int, s: int, margin: int, taken: list[tuple[int, ...]],
           where: str | None) -> tuple[int, int, int, int] | None:
    """A free s x s box; `where` keeps its centre in the left/right 40% or top/bottom 40% of the image."""
    lo_x, hi_x = margin, size - margin - s
    lo_y, hi_y = lo_x, hi_x
    if where == "left":
        hi_x = min(hi_x, math.floor(0.4 * size - s / 2))
    elif where == "right":
        lo_x = max(lo_x, math.ceil(0.6 * size - s / 2))
    elif where == "top":
        hi_y = min(hi_y, math.floor(0.4 * size - s / 2))
    elif where == "bottom":
        lo_y = max(lo_y, math.ceil(0.6 * size - s / 2))
    if lo_x > hi_x or lo_y > hi_y:
        return None
    for _ in range(50):
        x0, y0 = rng.randint(lo_x, hi_x), rng.randint(lo_y, hi_y)
        box = (x0, y0, x0 + s, y0 + s)
        if not any(_overlaps(box, t, margin) for t in taken):
            return box
    return None


def _scene(rng: random.Random, size: int, shapes: list[str], colours: list[str],
           where: str | None) -> list[dict[str, Any]]:
    """Non-overlapping objects; the first one is the question's target (placed first, under `where`)."""
    margin = max(1, size // 32)
    lo, hi = (0.28, 0.38) if len(shapes) < 3 else (0.24, 0.30)
    for _ in range(100):
        taken: list[tuple[int, ...]] = []
        for i in range(len(shapes)):
            box = _place(rng, size, round(size * rng.uniform(lo, hi)), margin, taken, where if i == 0 else None)
            if box is None:
                break
            taken.append(box)
        if len(taken) == len(shapes):
            break
    else:  # pragma: no cover - sizes are chosen so this cannot happen for image_size >= 32
        raise RuntimeError("could not lay out the shapes")
    objects = [{"shape": sh, "colour": c, "box": b} for sh, c, b in zip(shapes, colours, taken)]
    if rng.random() < LINE_SHARE:
        line = _line(rng, size, margin, taken)
        if line is not None:
            objects.append({"shape": "line", "colour": LINE_COLOUR[0], "points": line})
    return objects


def _line(rng: random.Random, size: int, margin: int, taken: list[tuple[int, ...]]) -> list[int] | None:
    """A horizontal, vertical or diagonal segment clear of every shape."""
    width = max(2, size // 24)
    for _ in range(30):
        length = round(size * rng.uniform(0.3, 0.45))
        dx, dy = rng.choice(((1, 0), (0, 1), (1, 1), (1, -1)))
        x0 = rng.randint(margin + width, size - margin - width - (length if dx else 0))
        y_lo = margin + width + (length if dy < 0 else 0)
        y0 = rng.randint(y_lo, size - margin - width - (length if dy > 0 else 0))
        x1, y1 = x0 + dx * length, y0 + dy * length
        box = (min(x0, x1) - width, min(y0, y1) - width, max(x0, x1) + width, max(y0, y1) + width)
        if not any(_overlaps(box, t, margin) for t in taken):
            return [x0, y0, x1, y1]
    return None


def _draw(objects: list[dict[str, Any]], size: int) -> Image.Image:
    im = Image.new("RGB", (size, size), BACKGROUND)
    draw = ImageDraw.Draw(im)
    for obj in objects:
        if obj["shape"] == "line":
            draw.line(obj["points"], fill=LINE_COLOUR[1], width=max(2, size // 24))
            continue
        x0, y0, x1, y1 = obj["box"]
        fill = PALETTE[obj["colour"]]
        if obj["shape"] == "circle":
            draw.ellipse((x0, y0, x1 - 1, y1 - 1), fill=fill)
        elif obj["shape"] == "square":
            draw.rectangle((x0, y0, x1 - 1, y1 - 1), fill=fill)
        else:
            draw.polygon(_triangle(obj["box"]), fill=fill)
    return im


def _triangle(box: tuple[int, ...]) -> list[int]:
    x0, y0, x1, y1 = box
    return [x0 + (x1 - x0) // 2, y0, x0, y1, x1, y1]


def dense_objects(objects: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Scene objects as dense-caption objects (pixel coordinates), in reading order (top, then left)."""
    out = []
    for obj in objects:
        desc = f"{obj['colour']} {obj['shape']}"
        if obj["shape"] == "line":
            out.append((min(obj["points"][1::2]), min(obj["points"][0::2]), {"desc": desc, "line": obj["points"]}))
        elif obj["shape"] == "triangle":
            out.append((obj["box"][1], obj["box"][0], {"desc": desc, "poly": _triangle(obj["box"])}))
        else:
            out.append((obj["box"][1], obj["box"][0], {"desc": desc, "bbox_2d": list(obj["box"])}))
    return [o for _, _, o in sorted(out, key=lambda t: (t[0], t[1]))]


def _image_question(rng: random.Random, qtype: str, answer: str, size: int,
                    single_share: float = SINGLE_OBJECT_SHARE) -> tuple[str, list[dict[str, Any]]]:
    """(question, scene) for an image question whose answer is `answer`; a colour/shape/position
    question is about a one-shape image with probability `single_share`."""
    single = qtype != "count" and rng.random() < single_share
    k = COUNT_WORDS.index(answer) if qtype == "count" else (1 if single else rng.choice((2, 3)))
    shapes = rng.sample(SHAPES, k)  # distinct shapes and colours: every object can be named uniquely
    colours = rng.sample(list(PALETTE), k)
    if qtype == "colour" and answer in colours:  # move the answer colour to the target (first) object
        colours.remove(answer)
    if qtype == "colour":
        colours = [answer, *colours][:k]
    if qtype == "shape":
        shapes = [answer, *[s for s in shapes if s != answer]][:k]
    where = answer if qtype == "position" else None
    objects = _scene(rng, size, shapes, colours, where)
    target = objects[0]
    if qtype == "colour":
        q = "What colour is the shape?" if single else f"What colour is the {target['shape']}?"
    elif qtype == "shape":
        q = "What shape is shown?" if single else f"What shape is the {target['colour']} object?"
    elif qtype == "count":
        q = "How many shapes are there?"
    else:
        name = "shape" if single else f"{target['colour']} {target['shape']}"
        q = (f"Is the {name} on the left or the right?" if answer in ("left", "right")
             else f"Is the {name} at the top or the bottom?")
    return q, objects


def _scene_questions(objects: list[dict[str, Any]], size: int) -> list[tuple[str, str]]:
    """Every (question, answer) the scene answers unambiguously, in the wording of `_image_question`.

    Used for the extra turns of `questions_per_image`: more supervised answers per image (the vision
    tower learns from answer tokens only, so this is the cheap way to give it more signal per step).
    """
    shapes = [o for o in objects if o["shape"] != "line"]
    single = len(shapes) == 1
    out = [("How many shapes are there?", COUNT_WORDS[len(shapes)])]
    for obj in shapes:
        out.append(("What colour is the shape?" if single else f"What colour is the {obj['shape']}?", obj["colour"]))
        out.append(("What shape is shown?" if single else f"What shape is the {obj['colour']} object?", obj["shape"]))
        x0, y0, x1, y1 = obj["box"]
        name = "shape" if single else f"{obj['colour']} {obj['shape']}"
        cx, cy = (x0 + x1) / 2, (y0 + y1) / 2
        # the same 40% bands `_place` uses, so every answer is as clear as the planned ones
        if cx <= 0.4 * size or cx >= 0.6 * size:
            out.append((f"Is the {name} on the left or the right?", "left" if cx <= 0.4 * size else "right"))
        if cy <= 0.4 * size or cy >= 0.6 * size:
            out.append((f"Is the {name} at the top or the bottom?", "top" if cy <= 0.4 * size else "bottom"))
    return out


def _text_question(rng: random.Random) -> tuple[str, str]:
    """A text-only question with a deterministic single-word answer."""
    kind = rng.randrange(3)
    if kind == 0:
        a, b = rng.randint(0, 4), rng.randint(0, 5)
        return f"What is {COUNT_WORDS[a]} plus {COUNT_WORDS[b]}?", COUNT_WORDS[a + b]
    if kind == 1:
        a = rng.randint(0, 8)
        return f"What comes after {COUNT_WORDS[a]}?", COUNT_WORDS[a + 1]
    a = rng.randint(1, 9)
    return f"What comes before {COUNT_WORDS[a]}?", COUNT_WORDS[a - 1]


def _plan(rng: random.Random, n: int, text_fraction: float) -> list[tuple[str, str | None]]:
    """(qtype, answer) per record: image qtypes in equal shares, answers balanced within each qtype."""
    n_text = math.floor(n * text_fraction + 0.5)
    n_image = n - n_text
    plan: list[tuple[str, str | None]] = [("text", None)] * n_text
    for j, qtype in enumerate(IMAGE_QTYPES):
        count = n_image // len(IMAGE_QTYPES) + (1 if j < n_image % len(IMAGE_QTYPES) else 0)
        classes = _answers(qtype)
        answers = [classes[i % len(classes)] for i in range(count)]
        rng.shuffle(answers)
        plan += [(qtype, a) for a in answers]
    rng.shuffle(plan)
    return plan


def _write_split(out: Path, split: str, n: int, seed: int, size: int, text_fraction: float,
                 questions_per_image: int = 1, single_share: float = SINGLE_OBJECT_SHARE) -> dict[str, Any]:
    rng = random.Random(f"arctic_vl-synthetic:{seed}:{split}")  # splits independent of each other's size
    llava, messages, dense = [], [], []
    qtype_counts = dict.fromkeys(QTYPES, 0)
    for i, (qtype, answer) in enumerate(_plan(rng, n, text_fraction)):
        rid = f"{split}-{i:06d}"
        qtype_counts[qtype] += 1
        if qtype == "text":
            question, answer = _text_question(rng)
            llava.append({"id": rid, "qtype": qtype, "conversations": [
                {"from": "human", "value": question}, {"from": "gpt", "value": answer}]})
            messages.append({"id": rid, "qtype": qtype, "messages": [
                {"role": "user", "content": question}, {"role": "assistant", "content": answer}]})
            continue
        question, objects = _image_question(rng, qtype, answer, size, single_share)
        image = f"images/{rid}.png"
        _draw(objects, size).save(out / image, format="PNG")
        prompt = f"{IMAGE_TOKEN}\n{question}"
        turns = [(prompt, answer)]
        if questions_per_image > 1:  # extra turns about the same image; the record's qtype is the first's
            extra = [qa for qa in _scene_questions(objects, size) if qa[0] != question]
            rng.shuffle(extra)
            turns += extra[:questions_per_image - 1]
        llava.append({"id": rid, "qtype": qtype, "image": image, "conversations": [
            t for q, a in turns for t in ({"from": "human", "value": q}, {"from": "gpt", "value": a})]})
        messages.append({"id": rid, "qtype": qtype, "messages": [
            t for q, a in turns for t in ({"role": "user", "content": q}, {"role": "assistant", "content": a})],
            "images": [image]})
        objs = dense_objects(objects)
        dense.append({"id": rid, "qtype": "dense", "images": [image], "width": size, "height": size,
                      "objects": objs, "summary": ", ".join(o["desc"] for o in objs)})
    paths = {"llava": out / f"{split}.llava.json", "messages": out / f"{split}.messages.jsonl",
             "dense": out / f"{split}.dense.jsonl"}
    paths["llava"].write_text("[\n" + ",\n".join(json.dumps(r) for r in llava) + "\n]\n", encoding="utf-8")
    paths["messages"].write_text("".join(json.dumps(r) + "\n" for r in messages), encoding="utf-8")
    paths["dense"].write_text("".join(json.dumps(r) + "\n" for r in dense), encoding="utf-8")
    return {"n": n, "n_images": len(dense), "n_text": qtype_counts["text"], "qtypes": qtype_counts,
            **{k: str(p) for k, p in paths.items()}}


def make_synthetic_data(out_dir: str | Path, *, n: int, seed: int, heldout: int | None = None,
                        image_size: int = 64, text_fraction: float = 0.15,
                        questions_per_image: int = 1,
                        single_object_fraction: float = SINGLE_OBJECT_SHARE) -> dict[str, Any]:
    """Write train (n records) and heldout (default max(n // 10, 50); 0 for none) splits in all three
    formats plus `images/`; return counts and paths per split.

    `questions_per_image` > 1 gives each TRAIN image record up to that many question turns about its
    scene (the first is the planned, balanced one); held-out records always ask one question, so
    exact match per question type stays comparable.

    `single_object_fraction` is the share of TRAIN colour/shape/position questions asked about a
    one-shape image (the rest have two or three shapes and name the target by shape or colour); the
    held-out split always uses the default mix, so its figures do not depend on the training mix.
    """
    if n < 1:
        raise ConfigError(f"n must be >= 1, got {n}")
    if image_size < 32:
        raise ConfigError(f"image_size must be >= 32 so shapes stay recognisable, got {image_size}")
    if not 0 <= text_fraction < 1:
        raise ConfigError(f"text_fraction must be in [0, 1), got {text_fraction}")
    if questions_per_image < 1:
        raise ConfigError(f"questions_per_image must be >= 1, got {questions_per_image}")
    if not 0 <= single_object_fraction <= 1:
        raise ConfigError(f"single_object_fraction must be in [0, 1], got {single_object_fraction}")
    heldout = max(n // 10, 50) if heldout is None else heldout
    if heldout < 0:
        raise ConfigError(f"heldout must be >= 0, got {heldout}")
    out = Path(out_dir)
    (out / "images").mkdir(parents=True, exist_ok=True)
    result: dict[str, Any] = {"out_dir": str(out.resolve()), "seed": seed, "image_size": image_size,
                              "train": _write_split(out, "train", n, seed, image_size, text_fraction,
                                                    questions_per_image, single_object_fraction)}
    if heldout:
        result["heldout"] = _write_split(out, "heldout", heldout, seed, image_size, text_fraction)
    return result


def main(argv: list[str] | None = None) -> int:
    """`arctic_vl make-synthetic-data OUT_DIR --n N --seed S [--heldout N --image-size N]`."""
    p = argparse.ArgumentParser(prog="arctic_vl make-synthetic-data",
                                description="Write the synthetic coloured-shapes dataset in all record formats.")
    p.add_argument("out_dir")
    p.add_argument("--n", type=int, required=True, help="train records")
    p.add_argument("--seed", type=int, required=True)
    p.add_argument("--heldout", type=int, default=None, help="held-out records (default max(n // 10, 50))")
    p.add_argument("--image-size", type=int, default=64)
    p.add_argument("--text-fraction", type=float, default=0.15, help="share of text-only records")
    p.add_argument("--questions-per-image", type=int, default=1,
                   help="question turns per train image record (extra ones about the same scene)")
    p.add_argument("--single-object-fraction", type=float, default=SINGLE_OBJECT_SHARE,
                   help="share of train colour/shape/position questions about a one-shape image "
                        f"(default {SINGLE_OBJECT_SHARE}; the held-out split always uses the default)")
    args = p.parse_args(argv)
    output_directory(args.out_dir, "OUT_DIR")
    result = make_synthetic_data(args.out_dir, n=args.n, seed=args.seed, heldout=args.heldout,
                                 image_size=args.image_size, text_fraction=args.text_fraction,
                                 questions_per_image=args.questions_per_image,
                                 single_object_fraction=args.single_object_fraction)
    print(json.dumps(result, indent=2))
    return 0
