"""Evaluation: loss on `data.eval_sources`, and greedy exact-match accuracy with `eval.generate: true`."""

from __future__ import annotations

import contextlib
import math
import re
from collections import defaultdict
from collections.abc import Iterator
from contextlib import nullcontext
from typing import Any

import torch

from arctic_vl.batch import NUM_SAMPLES
from arctic_vl.batchkit import prompt_item
from arctic_vl.constants import IGNORE_INDEX
from arctic_vl.models.forward import model_inputs, unwrap_peft, vision_keepalive


def _last_label_span(labels: list[int]) -> tuple[int, int] | None:
    end = None
    for i in range(len(labels) - 1, -1, -1):
        if labels[i] != IGNORE_INDEX and end is None:
            end = i + 1
        elif labels[i] == IGNORE_INDEX and end is not None:
            return i + 1, end
    return (0, end) if end is not None else None


def normalize_answer(text: str) -> str:
    """Case- and whitespace-insensitive, trailing punctuation ignored: what 'exact match' compares."""
    return re.sub(r"\s+", " ", text).strip().strip(".!").strip().lower()


def _stop_ids(processor: Any, model: torch.nn.Module) -> list[int]:
    tok = getattr(processor, "tokenizer", processor)
    ids = set()
    for token in ("<|im_end|>", "<|endoftext|>", "</s>"):
        tid = tok.convert_tokens_to_ids(token)
        if isinstance(tid, int) and tid != tok.unk_token_id and tid is not None and tid >= 0:
            ids.add(tid)
    if tok.eos_token_id is not None:
        ids.add(tok.eos_token_id)
    return sorted(ids)


def shard(n: int, rank: int, world_size: int) -> list[int | None]:
    """This rank's eval samples of the first `n`: every world_size-th from `rank`, padded with None to the
    same count on every rank (ceil(n / world_size)), so all ranks run the same number of forwards."""
    mine: list[int | None] = list(range(rank, n, world_size))
    if world_size > 1:
        mine += [None] * (-(-n // world_size) - len(mine))
    return mine


def merge_counts(per_rank: list[dict[str, list[float]]]) -> dict[str, list[float]]:
    """{question type: [correct, total]} of every rank summed by type (ranks may have seen different types)."""
    merged: dict[str, list[float]] = {}
    for counts in per_rank:
        for qtype, (correct, total) in counts.items():
            acc = merged.setdefault(qtype, [0.0, 0.0])
            acc[0] += correct
            acc[1] += total
    return dict(sorted(merged.items()))


@torch.no_grad()
def evaluate(trainer: Any, model: torch.nn.Module) -> dict[str, Any]:
    """Eval loss (mean over label tokens) and, if configured, exact match per question type (meta `qtype`).

    Samples are split over ranks (padded to equal counts: a padding sample trains no token and answers no
    question); losses are summed and exact-match counts gathered by question type over all ranks, so the
    figures equal a one-process evaluation of the same samples.
    """
    dataset, dist, cfg = trainer.data.eval, trainer.dist, trainer.eval_config
    was_training = model.training
    model.eval()
    n = len(dataset) if cfg.max_samples is None else min(cfg.max_samples, len(dataset))
    mine = shard(n, dist.rank, dist.world_size)
    bs = cfg.micro_batch_size or trainer.data.micro_batch_size
    batches = [mine[s:s + bs] for s in range(0, len(mine), bs)]
    from tqdm.auto import tqdm

    bar = tqdm(total=len(batches) + (len(mine) if cfg.generate else 0), desc="eval", dynamic_ncols=True,
               leave=False, disable=not (trainer.is_main and trainer.config.progress_bar))
    loss_sum, units = _loss(trainer, model, dataset, batches, bar)
    counts = _exact_match(trainer, model, dataset, mine, bar) if cfg.generate else {}
    bar.close()
    loss_sum, units = dist.all_reduce_sum([loss_sum, float(units)])
    results: dict[str, Any] = {"eval_loss": loss_sum / units if units else math.nan, "eval_label_tokens": int(units)}
    if cfg.generate:
        merged = merge_counts(dist.all_gather_object(counts))
        correct, total = sum(c for c, _ in merged.values()), sum(t for _, t in merged.values())
        results["exact_match"] = correct / max(total, 1)
        results["exact_match_by_type"] = {k: c / t for k, (c, t) in merged.items()}
        results["eval_questions"] = int(total)
        results["eval_questions_by_type"] = {k: int(t) for k, (_, t) in merged.items()}
    if was_training:
        model.train()
    return results


def _item(dataset: Any, index: int | None, fallback: int) -> dict[str, Any]:
    """Sample `index`, or for padding (None) sample `fallback` with every label ignored."""
    if index is not None:
        return dataset[index]
    item = dataset[fallback]
    item["labels"] = torch.full_like(torch.as_tensor(item["labels"]), IGNORE_INDEX)
    return item


def _loss(trainer: Any, model: torch.nn.Module, dataset: Any, batches: list[list[int | None]], bar: Any
          ) -> tuple[float, int]:
    """This rank's summed loss and units over its batches (each batch normalised on its own)."""
    loss_sum, units = 0.0, 0
    for indices in batches:
        batch = trainer.to_device(trainer.data.accept(trainer.data.collate([_item(dataset, i, 0) for i in indices])))
        trainer.data.raise_pending(0)  # a sample whose pixels did not decode, under on_bad_record: error
        counts = trainer.local_counts([batch])  # each batch is normalised on its own here
        with trainer.autocast():
            out = trainer.loss(model, batch, counts)
        loss_sum += float(out.loss_sum)
        units += counts.units
        bar.update(1)
    return loss_sum, units


def _exact_match(trainer: Any, model: torch.nn.Module, dataset: Any, mine: list[int | None], bar: Any
                 ) -> dict[str, list[float]]:
    """{question type: [correct, total]} over this rank's samples (padding generates, and counts nothing)."""
    stop = _stop_ids(trainer.bundle.processor, model)
    tok = getattr(trainer.bundle.processor, "tokenizer", trainer.bundle.processor)
    counts: dict[str, list[float]] = defaultdict(lambda: [0.0, 0.0])
    for i in mine:
        answered = generate_answer(trainer, model, dataset, 0 if i is None else i, stop, tok,
                                   trainer.eval_config.max_new_tokens)
        bar.update(1)
        if i is None or answered is None:  # padding, or a sample dropped as it loaded (counted in the report)
            continue
        pred, answer = answered
        qtype = str(dataset.conversations[i].meta.get("qtype", "all"))
        counts[qtype][0] += float(normalize_answer(pred) == normalize_answer(answer))
        counts[qtype][1] += 1
    return dict(counts)


def generate_answer(trainer: Any, model: torch.nn.Module, dataset: Any, index: int, stop: list[int], tok: Any,
                    max_new_tokens: int) -> tuple[str, str] | None:
    """Greedy answer to the sample's last user turn, and the reference answer (the last assistant turn); None
    for a sample dropped as it loaded (its pixels did not decode)."""
    enc = dataset.encoded[index]
    span = _last_label_span(enc.labels)
    if span is None:
        return "", ""
    start, end = span
    answer_ids = [t for t in enc.input_ids[start:end] if t not in stop]
    item = prompt_item(dataset[index], start=start)
    batch = trainer.to_device(trainer.data.accept(trainer.data.collate([item])))
    trainer.data.raise_pending(0)
    if not batch[NUM_SAMPLES]:
        return None
    inputs = model_inputs(batch)
    lockstep = trainer.dist.shards_parameters
    with trainer.autocast(), lockstep_generation(model, inputs) if lockstep else nullcontext():
        out = model.generate(**inputs, max_new_tokens=max_new_tokens, do_sample=False, eos_token_id=stop,
                             pad_token_id=tok.pad_token_id, synced_gpus=lockstep)
    new = [t for t in out[0, start:].tolist() if t not in stop]
    return tok.decode(new, skip_special_tokens=True), tok.decode(answer_ids, skip_special_tokens=True)


@contextlib.contextmanager
def lockstep_generation(model: torch.nn.Module, inputs: dict[str, Any]) -> Iterator[None]:
    """Generation with partitioned parameters (ZeRO-3), where every module's forward gathers its weights with
    a collective and all ranks must run the same modules in the same order (`synced_gpus` keeps them decoding
    until all are done).

    The images are encoded inside the prompt's forward, as in training: transformers may encode them before
    it, calling the vision tower outside the backbone's forward, where ZeRO-3 has not gathered the backbone's
    own weights (LLaVA's image_newline) and the other ranks, whose prompts may have no image, call no such
    thing. A prompt without an image runs the vision tower once on a dummy image (`vision_keepalive`), where
    a prompt with one encodes its images.
    """
    hf = unwrap_peft(model)
    hf._supports_mm_encoder_outputs = lambda: False  # an instance attribute hides transformers' method
    keep = inputs.get("pixel_values") is None
    try:
        with vision_keepalive(hf.model, once=True) if keep else nullcontext():
            yield
    finally:
        del hf._supports_mm_encoder_outputs
