"""`arctic_vl swiftkv-eval CONFIG`: how close the distilled SwiftKV student is to its teacher.

On the config's `data.eval_sources` (held-out samples) it reports:

* `top1_agreement`: at every label position of the reference conversation (teacher forcing), whether the
  student's most likely next token equals the teacher's, averaged over label tokens;
* `teacher_exact_match`, `student_exact_match`: greedy answers to the last question compared with the reference
  answer (arctic_vl's exact-match rule: case, whitespace and trailing punctuation ignored), overall and by
  question type (record field `qtype`);
* `answer_agreement`: the share of questions where student and teacher give the same answer.

The student is the run's newest weights (`arctic_vl.newest_weights`: `OUTPUT_DIR/final` when it holds the last
step, else the latest checkpoint, on the student the model factory converts from the teacher), SwiftKV on: its
generation takes the SwiftKV prefill path; which weights (path and step) is logged first and reported. The
teacher is loaded from the model section's teacher directory. Both see exactly the same batches.
"""

from __future__ import annotations

import argparse
import json
from collections import defaultdict
from pathlib import Path
from typing import Any

import torch

from arctic_vl import IGNORE_INDEX, ConfigError, answer_start, label_positions, model_inputs, prompt_item


def _stop_ids(tok: Any) -> list[int]:
    ids = {tok.eos_token_id} if tok.eos_token_id is not None else set()
    for token in ("<|im_end|>", "<|endoftext|>", "</s>"):
        tid = tok.convert_tokens_to_ids(token)
        if isinstance(tid, int) and tid >= 0 and tid != tok.unk_token_id:
            ids.add(tid)
    return sorted(ids)


@torch.no_grad()
def _greedy(model: torch.nn.Module, inputs: dict[str, torch.Tensor], start: int, stop: list[int], tok: Any,
            max_new_tokens: int) -> str:
    out = model.generate(**inputs, max_new_tokens=max_new_tokens, do_sample=False, eos_token_id=stop,
                         pad_token_id=tok.pad_token_id)
    return tok.decode([t for t in out[0, start:].tolist() if t not in stop], skip_special_tokens=True)


@torch.no_grad()
def compare(student: torch.nn.Module, teacher: torch.nn.Module, dataset: Any, collate: Any, tok: Any, *,
            max_samples: int | None = None, micro_batch_size: int = 8, max_new_tokens: int = 16,
            generate: bool = True) -> dict[str, Any]:
    """Top-1 agreement (teacher forcing) and exact-match accuracies of student and teacher on `dataset`."""
    from arctic_vl import normalize_answer

    student.eval()
    teacher.eval()
    n = len(dataset) if max_samples is None else min(max_samples, len(dataset))
    agree, label_tokens = 0, 0
    for s in range(0, n, micro_batch_size):
        batch = collate([dataset[i] for i in range(s, min(n, s + micro_batch_size))])
        inputs = model_inputs(batch)
        mask, _ = label_positions(batch["labels"])
        t_top = teacher(**inputs, use_cache=False).logits[:, :-1].argmax(-1)[mask]
        s_top = student(**inputs, use_cache=False).logits[:, :-1].argmax(-1)[mask]
        agree += int((t_top == s_top).sum())
        label_tokens += int(mask.sum())
    results: dict[str, Any] = {"questions": n, "label_tokens": label_tokens,
                               "top1_agreement": agree / max(label_tokens, 1)}
    if not generate:
        return results
    stop = _stop_ids(tok)
    correct: dict[str, dict[str, float]] = {"teacher": defaultdict(float), "student": defaultdict(float)}
    total: dict[str, float] = defaultdict(float)
    same = 0
    for i in range(n):
        enc = dataset.encoded[i]
        start = answer_start(enc.labels, last=True)
        if start is None:
            continue
        end = start
        while end < len(enc.labels) and enc.labels[end] != IGNORE_INDEX:
            end += 1
        reference = tok.decode([t for t in enc.input_ids[start:end] if t not in stop], skip_special_tokens=True)
        batch = collate([prompt_item(dataset[i], start=start)])
        inputs = model_inputs(batch)
        qtype = str(dataset.conversations[i].meta.get("qtype", "all"))
        answers = {name: _greedy(model, inputs, start, stop, tok, max_new_tokens)
                   for name, model in (("teacher", teacher), ("student", student))}
        total[qtype] += 1
        same += normalize_answer(answers["teacher"]) == normalize_answer(answers["student"])
        for name, answer in answers.items():
            correct[name][qtype] += float(normalize_answer(answer) == normalize_answer(reference))
    questions = sum(total.values())
    for name in ("teacher", "student"):
        results[f"{name}_exact_match"] = sum(correct[name].values()) / max(questions, 1)
        results[f"{name}_exact_match_by_type"] = {k: correct[name][k] / total[k] for k in sorted(total)}
    results["answer_agreement"] = same / max(questions, 1)
    results["generated_questions"] = int(questions)
    return results


def evaluate_run(config: str | Path, overrides: list[str] | tuple[str, ...] = (), *,
                 max_samples: int | None = None, generate: bool = True) -> dict[str, Any]:
    """Load the run's student (its newest weights) and its teacher and compare them on `data.eval_sources`; the
    results name the student's weights (`student`, `step`, `weights`: final|checkpoint)."""
    from arctic_vl import DATA, Engine, ModelBundle, family_of_dir, load_model, load_processor

    from . import register_auto, set_swiftkv
    from .factory import SwiftKVModelConfig, SwiftKVModelFactory

    engine = Engine(config, overrides)
    cfg = engine.config
    if not isinstance(cfg.model, SwiftKVModelConfig):
        raise ConfigError(f"swiftkv-eval: model.type must be 'swiftkv_vl', got {cfg.model.type!r}")
    if not getattr(cfg.data, "eval_sources", None):
        raise ConfigError("swiftkv-eval: data.eval_sources is empty; name the held-out data files there")
    try:
        weights = engine.newest_weights()
    except ConfigError as e:
        raise ConfigError(f"swiftkv-eval: {e}: arctic_vl {config}") from None
    register_auto()
    torch.manual_seed(cfg.trainer.seed)
    teacher_dir = SwiftKVModelFactory(cfg.model, cfg).teacher_dir(engine.output_dir)
    teacher = load_model(teacher_dir)
    if weights.kind == "final":
        student = set_swiftkv(load_model(weights.path), True)
    else:  # the student as training builds it (converted from the teacher), with the checkpoint's SwiftKV weights
        student = set_swiftkv(engine.build_model(weights).model, True)
    bundle = ModelBundle(teacher, load_processor(teacher_dir), family_of_dir(teacher_dir))
    data = DATA.get(cfg.data.type)(cfg.data, cfg).build(bundle, seed=cfg.trainer.seed)
    ev = cfg.eval
    results = compare(student, teacher, data.eval, data.collate, bundle.processor.tokenizer,
                      max_samples=max_samples or ev.max_samples,
                      micro_batch_size=ev.micro_batch_size or cfg.data.micro_batch_size,
                      max_new_tokens=ev.max_new_tokens, generate=generate)
    results = {"student": str(weights.path), "step": weights.step, "weights": weights.kind,
               "teacher": str(teacher_dir), **results}
    return results


def main(argv: list[str]) -> int:
    """`arctic_vl swiftkv-eval CONFIG [--set K=V ...] [--max-samples N] [--no-generate] [--out FILE]`."""
    p = argparse.ArgumentParser(prog="arctic_vl swiftkv-eval", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("config", help="the distillation run's YAML config")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE")
    p.add_argument("--max-samples", type=int, default=None,
                   help="first N held-out samples (default: eval.max_samples or all)")
    p.add_argument("--no-generate", action="store_true", help="top-1 agreement only (no greedy answers)")
    p.add_argument("--out", type=Path, default=None, help="also write the results as JSON here")
    args = p.parse_args(argv)
    if args.max_samples is not None and args.max_samples < 1:
        p.error("--max-samples must be >= 1")
    if args.out is not None:  # before the model loads: a bad --out costs nothing
        from arctic_vl import output_file

        output_file(args.out, "swiftkv-eval: --out")
    results = evaluate_run(args.config, args.overrides, max_samples=args.max_samples, generate=not args.no_generate)
    text = json.dumps(results, indent=1)
    print(text)
    if args.out is not None:
        args.out.write_text(text + "\n")
    return 0
