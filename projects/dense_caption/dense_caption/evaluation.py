"""Dense-caption evaluation: greedy answers to the held-out images, parsed, matched and scored.

`dense_evaluate(trainer, model)` returns the eval loss (mean over label tokens, as the core's), `eval_<name>` for
each of the loss's side metrics the trainer names in `eval_loss_metrics` (GKD: kl_loss, sft_loss, token_accuracy;
per label token) and, with `eval.generate: true`, the metrics of `metrics.DenseScores`: `box_f1_50`,
`json_valid_rate`, P/R/F1 per geometry type, description exact match, parse failures (with a few examples) and
answers cut by `eval.max_new_tokens`. Every process scores its share of the eval items; sums and counts are summed over
processes. With partitioned weights (ZeRO-3) every process makes the same number of `generate` calls (`synced_gpus`;
a process with fewer answers to give generates stand-ins and discards them), so none waits on a peer.
"""

from __future__ import annotations

import math
from contextlib import nullcontext
from typing import Any

import torch

from arctic_vl import RunFailed, lockstep_generation, model_inputs

from .answers import parse_dense_answer, to_geometry
from .metrics import DenseScores

MAX_EXAMPLES = 3


def stop_token_ids(tokenizer: Any) -> list[int]:
    """Ids that end an answer: the tokenizer's eos and the chat end-of-turn tokens it knows."""
    ids = {tokenizer.eos_token_id} if tokenizer.eos_token_id is not None else set()
    for token in ("<|im_end|>", "<|endoftext|>", "</s>"):
        tid = tokenizer.convert_tokens_to_ids(token)
        if isinstance(tid, int) and tid >= 0 and tid != tokenizer.unk_token_id:
            ids.add(tid)
    return sorted(ids)


@torch.no_grad()
def generate(model: torch.nn.Module, batch: dict[str, Any], tokenizer: Any, max_new_tokens: int, *,
             do_sample: bool = False, temperature: float = 1.0, synced_gpus: bool = False) -> list[int]:
    """The completion of a one-row batch (prompt only), without the prompt; stops at an end-of-turn token.

    `synced_gpus`: partitioned weights (ZeRO-3): every process must call this as often as the others, and the
    images are encoded inside the prompt's forward, as in training (`arctic_vl.lockstep_generation`)."""
    inputs = model_inputs(batch)
    stop = stop_token_ids(tokenizer)
    kwargs: dict[str, Any] = {"do_sample": do_sample}
    if do_sample:
        kwargs.update(temperature=temperature, top_k=0, top_p=1.0)
    if synced_gpus:
        kwargs["synced_gpus"] = True
    with lockstep_generation(model, inputs) if synced_gpus else nullcontext():
        out = model.generate(**inputs, max_new_tokens=max_new_tokens, eos_token_id=stop,
                             pad_token_id=tokenizer.pad_token_id, **kwargs)
    return out[0, inputs["input_ids"].shape[1]:].tolist()


def eval_loss(trainer: Any, model: torch.nn.Module, indices: list[int]
              ) -> tuple[float, float, dict[str, tuple[float, float]]]:
    """Summed loss, label tokens and (sum, count) of the side metrics named by `trainer.eval_loss_metrics`, over
    this process's eval items (the trainer's own `loss`)."""
    dataset, collate = trainer.data.eval, trainer.data.collate
    ev = trainer.eval_config
    bs = ev.micro_batch_size or trainer.data.micro_batch_size
    total, units = 0.0, 0.0
    side = {k: (0.0, 0.0) for k in getattr(trainer, "eval_loss_metrics", ())}
    for s in range(0, len(indices), bs):
        # samples whose pixels did not decode are dropped here and handled by on_bad_record, as in training
        batch = trainer.to_device(trainer.data.accept(collate([dataset[i] for i in indices[s:s + bs]])))
        trainer.data.raise_pending(0)
        counts = trainer.local_counts([batch])  # each batch normalised on its own, as the core's evaluation
        with trainer.autocast():
            out = trainer.loss(model, batch, counts)
        total += float(out.loss_sum)
        units += counts.units
        for k, (ks, kc) in side.items():
            ms, mc = out.metrics.get(k, (0.0, 0.0))
            side[k] = (ks + ms, kc + mc)
    return total, units, side


@torch.no_grad()
def dense_evaluate(trainer: Any, model: torch.nn.Module, *, line_tolerance: float = 0.1) -> dict[str, Any]:
    """Eval loss, and with `eval.generate` the dense-caption metrics, on `data.eval_sources`."""
    dataset, dist = trainer.data.eval, trainer.dist
    ev = trainer.eval_config
    was_training = model.training
    model.eval()
    n = len(dataset) if ev.max_samples is None else min(ev.max_samples, len(dataset))
    mine = list(range(dist.rank, n, dist.world_size))
    if dist.world_size > 1:  # padding items (-1: no labels) so every process runs as many eval forwards
        mine += [-1] * (-(-n // dist.world_size) - len(mine))
    loss_sum, units, side = eval_loss(trainer, model, mine)
    scores, examples, truncated = DenseScores(), [], 0
    if ev.generate:
        scores, examples, truncated = _dense_scores(trainer, model, mine, line_tolerance)
    names = sorted(side)
    reduced = dist.all_reduce_sum([loss_sum, units, float(truncated), *(v for k in names for v in side[k]),
                                   *scores.vector()])
    results: dict[str, Any] = {"eval_loss": reduced[0] / reduced[1] if reduced[1] else math.nan,
                               "eval_label_tokens": int(reduced[1])}
    for j, k in enumerate(names):
        s, c = reduced[3 + 2 * j], reduced[4 + 2 * j]
        results[f"eval_{k}"] = s / c if c else math.nan
    if ev.generate:
        results.update(DenseScores.from_vector(reduced[3 + 2 * len(names):]).results())
        results["truncated_answers"] = int(reduced[2])
        results["parse_failure_examples"] = examples  # this process's first few
    if was_training:
        model.train()
    return results


def _dense_scores(trainer: Any, model: torch.nn.Module, mine: list[int], line_tolerance: float
                  ) -> tuple[DenseScores, list[dict[str, Any]], int]:
    """Greedy answers to this process's dense eval items (-1: padding), parsed and scored; (scores, a few
    parse-failure examples, answers cut by max_new_tokens), this process's alone."""
    dataset, dist, ev = trainer.data.eval, trainer.dist, trainer.eval_config
    scores, examples, truncated = DenseScores(), [], 0
    # partitioned weights: every process generates once per position of `mine` (as long on every process), an
    # item with nothing to score (padding, pass-through, undecodable) on a stand-in prompt, its answer discarded
    lockstep, stand_in = dist.shards_parameters, None
    tok = getattr(trainer.bundle.processor, "tokenizer", trainer.bundle.processor)
    stop = set(stop_token_ids(tok))
    prefix = dataset.config.image_key_prefix
    for i in mine:
        batch, target = None, None
        if i != -1 and i < dataset.n_groups:  # not padding, not a pass-through conversation (no dense truth)
            item, target = dataset.prompt_item(i)
            batch = trainer.to_device(trainer.data.accept(trainer.data.collate([item])))
            trainer.data.raise_pending(0)
        if target is None:  # nothing to score (an undecodable image is counted in the run's skipped records)
            if lockstep:
                stand_in = stand_in or _stand_in_prompt(trainer)
                with trainer.autocast():
                    generate(model, stand_in, tok, ev.max_new_tokens, synced_gpus=True)
            continue
        stand_in = stand_in or batch
        with trainer.autocast():
            ids = generate(model, batch, tok, ev.max_new_tokens, synced_gpus=lockstep)
        if not any(t in stop for t in ids):
            truncated += 1
        text = tok.decode([t for t in ids if t not in stop], skip_special_tokens=True)
        parsed = parse_dense_answer(text, len(target.records), prefix, dataset.config.answer_format)
        scores.answers += 1
        scores.valid_answers += parsed.ok
        scores.invalid_objects += parsed.invalid_objects
        if not parsed.ok and len(examples) < MAX_EXAMPLES:
            examples.append({"item": dataset.where(i), "error": parsed.error, "answer": text[:200]})
        per_image = parsed.images if parsed.ok else [[] for _ in target.records]
        for preds, gts, conv in zip(per_image, target.objects, target.coords):
            geoms = []
            for obj in preds:
                try:
                    geoms.append((to_geometry(obj, conv), obj.desc))
                except ValueError:
                    scores.invalid_objects += 1
            scores.add_image(geoms, gts, conv.width, conv.height, line_tolerance)
    return scores, examples, truncated


def _stand_in_prompt(trainer: Any) -> dict[str, Any]:
    """The prompt of the first eval item whose images decode (a stand-in for lockstep generation)."""
    dataset = trainer.data.eval
    for i in range(dataset.n_groups):
        item, target = dataset.prompt_item(i)
        if target is not None:
            return trainer.to_device(trainer.data.collate([item]))
    raise RunFailed("evaluation under ZeRO-3: no eval item has images that decode, so no process can generate "
                    "in lockstep with the others")
