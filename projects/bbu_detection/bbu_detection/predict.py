"""`arctic_vl predict CONFIG --images DIR_OR_FILES --out preds.jsonl`: detections of a trained run's newest weights.

The model holds the run's newest weights (`arctic_vl.newest_weights`: its export OUTPUT_DIR/final, the HF VLM
and `detection_head/`, when that holds the last step, else the latest checkpoint of a run killed or stopped
before its end), built through the config's model factory exactly as `arctic_vl evaluate` builds it; which
weights is logged (stderr) before the images are read. Each image becomes one record of the run's own data
factory: one user turn (`--prompt`, the synthetic data's prompt by default) and the assistant's answer, of which
the head reads only what comes before (see `bbu_detection.forward`), as in training. One line per image::

    {"image": "a.png", "width": 112, "height": 112,
     "objects": [{"bbox_2d": [x1, y1, x2, y2], "score": 0.93, "desc": "red circle"}, ...]}

with boxes in pixels of the ORIGINAL image, the queries whose objectness probability is >= --score-threshold,
by falling score, each captioned by greedy decoding.
"""

from __future__ import annotations

import argparse
import json
import tempfile
from pathlib import Path
from typing import Any

import torch

from arctic_vl import DATA, ConfigError, DataError, Engine, image_size, output_file

from .boxes import cxcywh_to_pixel_xyxy
from .data import TARGETS
from .forward import pair_forward
from .synthetic import PROMPT

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".bmp", ".webp", ".gif", ".tif", ".tiff")


def image_files(items: list[str]) -> list[Path]:
    """The files named, and the images in any directory named (sorted); a missing path is a ConfigError."""
    out: list[Path] = []
    for item in items:
        path = Path(item)
        if path.is_dir():
            out += sorted(p for p in path.iterdir() if p.suffix.lower() in IMAGE_SUFFIXES)
        elif path.is_file():
            out.append(path)
        else:
            raise ConfigError(f"--images: {item} is neither an image file nor a directory")
    if not out:
        raise ConfigError(f"--images: no image files in {', '.join(items)} (suffixes: {', '.join(IMAGE_SUFFIXES)})")
    return out


def predict(config: str | Path, images: list[Path], *, score_threshold: float = 0.5, prompt: str = PROMPT,
            overrides: list[str] | tuple[str, ...] = (), batch_size: int = 8) -> list[dict[str, Any]]:
    """Detections for `images` by the run of `config` (its newest weights, `Engine.newest_weights`); one dict per
    image, in order. A run without weights is a ConfigError (exit 2) naming its directory.

    Each image goes through the run's own data factory (one record: the prompt and an empty answer), so the
    tokens, the image encoding and the memory the head reads are exactly those of training. An image that factory
    rejects (e.g. an aspect ratio the processor refuses) is a DataError naming it and why (exit 2).
    """
    if batch_size < 1:
        raise ConfigError(f"predict: --batch-size {batch_size}: must be >= 1")
    engine = Engine(config, overrides)
    cfg = engine.config
    if cfg.model.type != "bbu_detection":
        raise ConfigError(f"predict: model.type must be bbu_detection, got {cfg.model.type!r}")
    weights = engine.newest_weights()
    if weights.kind == "final" and not (weights.path / "detection_head" / "config.json").is_file():
        raise ConfigError(f"{weights.path}: no trained bbu_detection model (final/detection_head/); train the "
                          "config first")
    paths = [p.resolve() for p in images]
    for path in paths:
        try:
            image_size(str(path))
        except DataError as e:
            raise DataError(f"--images: {path}: {e}", source=str(path), reason=e.reason) from None
    want = getattr(cfg.distributed, "device", "auto")
    device = torch.device("cuda" if want != "cpu" and torch.cuda.is_available() else "cpu")
    bundle = engine.build_model(weights, device)
    model = bundle.model.eval()
    with tempfile.TemporaryDirectory() as tmp:
        records = Path(tmp) / "predict.bbu.jsonl"
        records.write_text("".join(json.dumps({
            "id": str(i), "images": [str(path)], "objects": [],
            "messages": [{"role": "user", "content": f"<image>\n{prompt}"}, {"role": "assistant", "content": "-"}],
        }) + "\n" for i, path in enumerate(paths)))
        # skip, then name every image that made no sample (below): the record file is a temporary one
        data_cfg = cfg.data.model_copy(update={"sources": [str(records)], "eval_sources": [], "on_bad_record": "skip"})
        try:
            data = DATA.get(cfg.data.type)(data_cfg, cfg).build(bundle, seed=cfg.trainer.seed)
        except DataError as e:  # every image rejected: record k of the temporary file is image k
            named = ", ".join(f"record {k} = {p}" for k, p in enumerate(paths[:5]))
            raise DataError(f"--images: no image can be used ({named}{', ...' if len(paths) > 5 else ''}): {e}",
                            reason=e.reason) from None
    found: dict[int, dict[str, Any]] = {}
    dataset, head = data.train, model.detection_head
    tok = getattr(bundle.processor, "tokenizer", bundle.processor)
    for s in range(0, len(dataset), batch_size):
        indices = list(range(s, min(s + batch_size, len(dataset))))
        batch = {k: v.to(device) if isinstance(v, torch.Tensor) else v
                 for k, v in data.collate([dataset[i] for i in indices]).items()}
        with torch.no_grad():
            out = pair_forward(model, batch, int(bundle.processor.image_token_id)).detection
        boxes, scores, states = out.boxes[-1].float(), out.logits[-1].float().sigmoid(), out.states[-1]
        for row, (i, target) in enumerate(zip(indices, batch[TARGETS])):
            width, height = target.size
            keep = (scores[row] >= score_threshold).nonzero().flatten()
            keep = keep[scores[row][keep].argsort(descending=True)]
            texts = head.generate_captions(states[row, keep], out.caption_context(torch.full_like(keep, row), keep))
            pixel = cxcywh_to_pixel_xyxy(boxes[row, keep].cpu(), width, height)
            objects = [{"bbox_2d": [round(v, 2) for v in box], "score": round(float(scores[row, q]), 4),
                        "desc": tok.decode(ids, skip_special_tokens=True).strip()}
                       for box, q, ids in zip(pixel.tolist(), keep.tolist(), texts)]
            k = int(dataset.conversations[i].meta["id"])
            found[k] = {"image": str(images[k]), "width": width, "height": height, "objects": objects}
    missing = [str(images[k]) for k in range(len(images)) if k not in found]
    if missing:  # e.g. an image whose tokens exceed data.max_length: the data factory dropped it (counted)
        raise DataError(f"--images: no prediction for {', '.join(missing[:3])}: {data.report.format()}")
    return [found[k] for k in range(len(images))]


def main(argv: list[str]) -> int:
    """The `predict` verb; exit 0, or 2 for a bad config or input (through the CLI)."""
    p = argparse.ArgumentParser(prog="arctic_vl predict", description=__doc__.split("\n\n")[0])
    p.add_argument("config", help="the run's YAML config (its trainer.output_dir holds final/ and checkpoints/)")
    p.add_argument("--images", nargs="+", required=True, help="image files and/or directories of images")
    p.add_argument("--out", required=True, help="JSONL file to write, one line per image")
    p.add_argument("--score-threshold", type=float, default=0.5, help="keep queries with objectness >= this")
    p.add_argument("--prompt", default=PROMPT, help=f"the user turn after the image (default: {PROMPT!r})")
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE")
    args = p.parse_args(argv)
    if not 0 <= args.score_threshold <= 1:
        p.error("--score-threshold must be in [0, 1]")
    if args.batch_size < 1:
        p.error("--batch-size must be >= 1")
    if not args.prompt.strip():
        p.error("--prompt must not be empty")
    out = output_file(args.out, "predict: --out")  # before the model loads: a bad --out costs nothing
    rows = predict(args.config, image_files(args.images), score_threshold=args.score_threshold, prompt=args.prompt,
                   overrides=args.overrides, batch_size=args.batch_size)
    out.write_text("".join(json.dumps(r) + "\n" for r in rows))
    print(f"wrote {len(rows)} images, {sum(len(r['objects']) for r in rows)} objects to {out}")
    return 0
