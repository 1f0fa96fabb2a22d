"""Detection metrics on `data.eval_sources`: COCO AP@[.5:.95], AP50, AP75, AR@100 (pycocotools' COCOeval) and
caption exact match on matched objects.

Each held-out sample's student image is one COCO image with one category ("object"); every query is a
detection with its objectness probability as score (COCOeval keeps the top 100 per image). Boxes are compared
in pixels of the original image. Caption exact match: predictions are matched to ground-truth objects greedily by
score at IoU >= `trainer.caption_match_iou` (one prediction per object, as COCOeval matches at IoU 0.5); over
the matched pairs, the share whose greedy caption equals the object's `desc` (`normalize_answer`: case,
spaces and final punctuation ignored).

Every process evaluates the same number of batches (its share, padded with repeats that are not counted) and
decodes captions for the same number of steps, so ZeRO-3's parameter gathers line up; the per-image results are
gathered to every process and COCOeval runs on the whole set.
"""

from __future__ import annotations

import contextlib
import io
import math
from typing import Any

import torch

from arctic_vl import normalize_answer

from .boxes import box_iou, cxcywh_to_pixel_xyxy
from .data import TARGETS
from .forward import pair_forward

METRIC_KEYS = ("AP", "AP50", "AP75", "AR100")


def _gather(obj: Any, world_size: int) -> list[Any]:
    if world_size == 1:
        return [obj]
    import torch.distributed as tdist

    out: list[Any] = [None] * world_size
    tdist.all_gather_object(out, obj)
    return out


def greedy_match(pred: torch.Tensor, scores: torch.Tensor, gt: torch.Tensor, iou: float) -> list[tuple[int, int]]:
    """(prediction, object) pairs: predictions by falling score, each to the unmatched object of highest IoU >= iou."""
    if pred.shape[0] == 0 or gt.shape[0] == 0:
        return []
    ious = box_iou(pred, gt)
    taken: set[int] = set()
    pairs = []
    for p in scores.argsort(descending=True).tolist():
        best, best_iou = -1, iou
        for g in range(gt.shape[0]):
            if g not in taken and float(ious[p, g]) >= best_iou:
                best, best_iou = g, float(ious[p, g])
        if best >= 0:
            taken.add(best)
            pairs.append((p, best))
    return pairs


def coco_metrics(images: list[dict[str, Any]]) -> dict[str, float]:
    """AP, AP50, AP75, AR100 of per-image records.

    Each record: {width, height, gt: [[x1,y1,x2,y2]], pred: [[x1,y1,x2,y2]], scores}.
    """
    from pycocotools.coco import COCO
    from pycocotools.cocoeval import COCOeval

    gt: dict[str, Any] = {"images": [], "annotations": [], "categories": [{"id": 1, "name": "object"}]}
    dets = []
    for i, im in enumerate(images, start=1):
        gt["images"].append({"id": i, "width": im["width"], "height": im["height"]})
        for x1, y1, x2, y2 in im["gt"]:
            gt["annotations"].append({"id": len(gt["annotations"]) + 1, "image_id": i, "category_id": 1,
                                      "bbox": [x1, y1, x2 - x1, y2 - y1], "area": (x2 - x1) * (y2 - y1),
                                      "iscrowd": 0})
        for (x1, y1, x2, y2), s in zip(im["pred"], im["scores"]):
            dets.append({"image_id": i, "category_id": 1, "bbox": [x1, y1, x2 - x1, y2 - y1], "score": s})
    if not gt["annotations"] or not dets:
        return dict.fromkeys(METRIC_KEYS, 0.0)
    with contextlib.redirect_stdout(io.StringIO()):  # COCOeval prints its table; the caller reports the numbers
        coco = COCO()
        coco.dataset = gt
        coco.createIndex()
        result = coco.loadRes(dets)
        ev = COCOeval(coco, result, iouType="bbox")
        ev.evaluate()
        ev.accumulate()
        ev.summarize()
    stats = [float(v) for v in ev.stats]
    # -1 is COCOeval's "no ground truth in this area range": report 0 for an empty split instead
    return {k: max(stats[i], 0.0) for k, i in zip(METRIC_KEYS, (0, 1, 2, 8))}


@torch.no_grad()
def evaluate_detection(trainer: Any, model: torch.nn.Module) -> dict[str, Any]:
    """COCO metrics and caption exact match of `model` (a DetectionVLM) on the trainer's eval data."""
    dataset, collate, dist = trainer.data.eval, trainer.data.collate, trainer.dist
    if dataset is None:
        return {}
    ecfg = trainer.eval_config
    n = len(dataset) if ecfg.max_samples is None else min(ecfg.max_samples, len(dataset))
    share = math.ceil(n / dist.world_size)
    mine = [dist.rank + dist.world_size * k for k in range(share)]  # >= n: a repeat, evaluated but not counted
    bs = ecfg.micro_batch_size or trainer.data.micro_batch_size
    head = model.detection_head
    tok = getattr(trainer.bundle.processor, "tokenizer", trainer.bundle.processor)
    iou = trainer.config.caption_match_iou
    was_training = model.training
    model.eval()
    records: list[dict[str, Any]] = []
    try:
        for s in range(0, len(mine), bs):
            chunk = mine[s:s + bs]
            batch = trainer.to_device(collate([dataset[i % n] for i in chunk]))
            with trainer.autocast():
                out = pair_forward(model, batch, trainer.image_token_id).detection
            boxes, scores, states = out.boxes[-1].float(), out.logits[-1].float().sigmoid(), out.states[-1]
            per_image, wanted = [], []
            for row, (index, target) in enumerate(zip(chunk, batch[TARGETS])):
                width, height = target.size
                pred = cxcywh_to_pixel_xyxy(boxes[row].cpu(), width, height)
                gt = cxcywh_to_pixel_xyxy(target.boxes.cpu(), width, height)
                pairs = greedy_match(pred, scores[row].cpu(), gt, iou)
                wanted += [(row, p) for p, _ in pairs]
                per_image.append((index, target, pred, gt, pairs))
            rows = torch.tensor([r for r, _ in wanted], dtype=torch.long, device=states.device)
            queries = torch.tensor([p for _, p in wanted], dtype=torch.long, device=states.device)
            texts = head.generate_captions(states[rows, queries], out.caption_context(rows, queries),
                                           fixed_steps=True)
            k = 0
            for row, (index, target, pred, gt, pairs) in enumerate(per_image):
                if index >= n:
                    k += len(pairs)
                    continue
                exact = 0
                for _, g in pairs:
                    want = tok.decode(target.captions[g][:-1], skip_special_tokens=True)
                    got = tok.decode(texts[k], skip_special_tokens=True)
                    exact += int(normalize_answer(got) == normalize_answer(want))
                    k += 1
                records.append({"index": index, "width": target.size[0], "height": target.size[1],
                                "gt": gt.tolist(), "pred": pred.tolist(), "scores": scores[row].cpu().tolist(),
                                "matched": len(pairs), "exact": exact})
    finally:
        model.train(was_training)
    gathered = sorted((r for part in _gather(records, dist.world_size) for r in part), key=lambda r: r["index"])
    results: dict[str, Any] = coco_metrics(gathered)
    matched = sum(r["matched"] for r in gathered)
    results["caption_exact_match"] = sum(r["exact"] for r in gathered) / matched if matched else 0.0
    results["caption_matched_objects"] = matched
    results["eval_images"] = len(gathered)
    results["eval_objects"] = sum(len(r["gt"]) for r in gathered)
    return results
