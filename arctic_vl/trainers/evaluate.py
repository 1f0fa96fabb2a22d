"""Evaluation: loss on `data.eval_sources`, and greedy exact-match accuracy with `eval.generate: true`."""

from __future__ import annotations

import math
import re
from collections import defaultdict
from typing import Any

import torch

from arctic_vl.constants import IGNORE_INDEX


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


@torch.no_grad()
def evaluate(trainer: Any, model: torch.nn.Module) -> dict[str, Any]:
    """Eval loss (mean over label tokens) and, if configured, exact match per question type (meta `qtype`)."""
    dataset, collate, dist = trainer.data.eval, trainer.data.collate, trainer.dist
    cfg = trainer.eval_config
    was_training = model.training
    model.eval()
    n = len(dataset) if cfg.max_samples is None else min(cfg.max_samples, len(dataset))
    mine = list(range(dist.rank, n, dist.world_size))
    bs = cfg.micro_batch_size or trainer.data.micro_batch_size
    loss_sum, units = 0.0, 0
    for s in range(0, len(mine), bs):
        batch = trainer.to_device(trainer.data.accept(collate([dataset[i] for i in mine[s:s + bs]])))
        trainer.data.raise_pending(0)  # a sample whose pixels did not decode, under on_bad_record: error
        counts = trainer.local_counts([batch])  # each batch is normalised on its own here
        with trainer.autocast():
            out = trainer.loss(model, batch, counts)
        loss_sum += float(out.loss_sum)
        units += counts.units
    results: dict[str, Any] = {}
    correct: dict[str, float] = defaultdict(float)
    total: dict[str, float] = defaultdict(float)
    if cfg.generate:
        stop = _stop_ids(trainer.bundle.processor, model)
        tok = getattr(trainer.bundle.processor, "tokenizer", trainer.bundle.processor)
        for i in mine:
            qtype = str(dataset.conversations[i].meta.get("qtype", "all"))
            answered = generate_answer(trainer, model, dataset, i, stop, tok, cfg.max_new_tokens)
            if answered is None:  # the sample was dropped as it loaded (counted in the report)
                continue
            pred, answer = answered
            ok = float(normalize_answer(pred) == normalize_answer(answer))
            correct[qtype] += ok
            total[qtype] += 1
    keys = sorted(total)
    reduced = dist.all_reduce_sum([loss_sum, float(units)] + [correct[k] for k in keys] + [total[k] for k in keys])
    results["eval_loss"] = reduced[0] / reduced[1] if reduced[1] else math.nan
    results["eval_label_tokens"] = int(reduced[1])
    if cfg.generate:
        m = len(keys)
        corr, tot = reduced[2:2 + m], reduced[2 + m:2 + 2 * m]
        results["exact_match"] = sum(corr) / max(sum(tot), 1)
        results["exact_match_by_type"] = {k: c / t for k, c, t in zip(keys, corr, tot)}
        results["eval_questions"] = int(sum(tot))
    if was_training:
        model.train()
    return results


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
    item = dataset[index]
    item["input_ids"] = item["input_ids"][:start]
    item["labels"] = item["labels"][:start]
    batch = trainer.to_device(trainer.data.accept(trainer.data.collate([item])))
    trainer.data.raise_pending(0)
    if not batch["_num_samples"]:
        return None
    inputs = {k: v for k, v in batch.items() if k != "labels" and not k.startswith("_")}
    with trainer.autocast():
        out = model.generate(**inputs, max_new_tokens=max_new_tokens, do_sample=False, eos_token_id=stop,
                             pad_token_id=tok.pad_token_id)
    new = [t for t in out[0, start:].tolist() if t not in stop]
    return tok.decode(new, skip_special_tokens=True), tok.decode(answer_ids, skip_special_tokens=True)
