"""`arctic_vl dense-caption VERB`: Stage-A summaries, Stage-B verdicts, and the data that trains them.

    arctic_vl dense-caption stage-a CONFIG --images PATH [PATH ...] --out summaries.jsonl
    arctic_vl dense-caption stage-b CONFIG --summaries summaries.jsonl --out verdicts.jsonl [--max-retries 2]
    arctic_vl dense-caption make-stage-data DENSE.jsonl --out-dir DIR [--group-size 2 --seed 0]

The training items as the workers build them (grouped, mode drawn, augmented, encoded): the core's
`arctic_vl inspect-data CONFIG [--n 2 --epoch 0]`, which builds the data with this project's factory.

The model is the run's `OUTPUT_DIR/final` (or `--model DIR`); prompts, `images_per_sample` and the image key
prefix come from the run's `data` section, so inference asks exactly what training taught.

Stage-A: a group is a directory (its images, sorted by name), an image file (a group of one), or a line of a
`.jsonl` file `{"group": ID, "images": [paths relative to the file]}`. Each group is cut into chunks of
`images_per_sample` images, and each chunk is answered in summary mode: plain text for one image, a JSON
object keyed per image for several. Output: one line per image, groups and images in input order:
`{"group", "image", "index", "summary"}`, with `"summary": null` and an `"error"` when the answer was empty
or malformed (reported, never dropped). The report on stdout counts them. Other fields of a group line are
carried into its output lines as `meta`.

Stage-B: per group (in the order of the summaries file), a text-only prompt with the group's summaries and the
criterion; the answer must be two lines: `pass` or `fail`, then `reason: ...`. An invalid answer is retried
with sampling (temperature 0.7, torch RNG seeded by the group's position and the attempt) at most
`--max-retries` times, then written with `"verdict": null` and the error. Output: one line per group. When the
Stage-A lines carry a known verdict (`meta.verdict`, from a groups file of make-stage-data), the report gives the
agreement with it.

make-stage-data: from dense-caption records, seeded groups of `--group-size` records, written as
`groups.jsonl` (Stage-A input, with the verdict the synthetic criterion gives) and `stage_b.messages.jsonl`
(text-only Stage-B chats built from the records' summaries, a training source).
"""

from __future__ import annotations

import argparse
import json
import random
from collections import Counter
from pathlib import Path
from typing import Any

import torch

from .answers import image_key, parse_summaries

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".bmp", ".webp")
#: the synthetic shapes' criterion (make-stage-data); `stage-b --criterion` must name what training used
DEFAULT_CRITERION = "every image shows a circle"


# ------------------------------------------------------------------------------------------- prompts
def stage_b_prompt(summaries: list[str], prefix: str, criterion: str) -> str:
    """The Stage-B question about one group (shared by the training data and inference)."""
    lines = ["Image summaries:"]
    lines += [f"{image_key(prefix, i)}: {s}" for i, s in enumerate(summaries)]
    lines.append(f"Criterion: {criterion}.")
    lines.append("Answer pass or fail on the first line, then reason: on the second.")
    return "\n".join(lines)


def parse_verdict(text: str) -> tuple[str | None, str | None, str | None]:
    """(verdict, reason, error): line 1 `pass`/`fail`, line 2 `reason: ...` (non-empty)."""
    lines = [ln.strip() for ln in text.strip().splitlines() if ln.strip()]
    if len(lines) != 2:
        return None, None, f"expected 2 lines, got {len(lines)}"
    verdict = lines[0].lower()
    if verdict not in ("pass", "fail"):
        return None, None, f"line 1 must be pass or fail, got {lines[0][:40]!r}"
    if not lines[1].lower().startswith("reason:") or not lines[1][7:].strip():
        return None, None, f"line 2 must be 'reason: ...', got {lines[1][:40]!r}"
    return verdict, lines[1][7:].strip(), None


# ------------------------------------------------------------------------------------------ the model
class Runner:
    """The trained model, its processor and encoder, and the run's data settings."""

    def __init__(self, config: str, overrides: list[str], model_dir: str | None):
        from arctic_vl import (
            DATA,
            ConfigError,
            Engine,
            ModelBundle,
            family_of_dir,
            load_model,
            load_processor,
        )

        engine = Engine(config, overrides)
        self.cfg = engine.config
        data = self.cfg.data
        if data.type != "dense_caption":
            raise ConfigError(f"dense-caption: {config}: data.type must be 'dense_caption', got {data.type!r}")
        path = Path(model_dir) if model_dir else engine.output_dir / "final"
        if not (path / "config.json").is_file():
            raise ConfigError(f"dense-caption: {path} holds no trained model; train first (arctic_vl {config}) "
                              "or pass --model DIR")
        self.model_dir = path
        torch.manual_seed(self.cfg.trainer.seed)
        self.model = load_model(path).eval()
        processor = load_processor(path)
        self.bundle = ModelBundle(self.model, processor, family_of_dir(path))
        self.factory = DATA.get("dense_caption")(data, self.cfg)
        self.encoder = self.factory.encoder(self.bundle)
        self.tokenizer = processor.tokenizer
        from arctic_vl import Collator

        self.collate = Collator(self.encoder)

    def answer(self, messages: list[dict[str, str]], images: list[Any], max_new_tokens: int, *,
               do_sample: bool = False, temperature: float = 1.0) -> str:
        """The model's reply to `messages` (ending with the user turn), greedy unless sampling."""
        from .evaluation import generate, stop_token_ids

        # the encoder labels assistant turns: give it an empty one and cut the prompt before it
        enc = self.encoder.encode_text([*messages, {"role": "assistant", "content": "x"}], [im.size for im in images])
        start = next(k for k, label in enumerate(enc.labels) if label != -100)
        item = {"input_ids": torch.tensor(enc.input_ids[:start]), "labels": torch.full((start,), -100), "_index": 0,
                **(self.encoder.encode_images(images) if images else {})}
        ids = generate(self.model, self.collate([item]), self.tokenizer, max_new_tokens, do_sample=do_sample,
                       temperature=temperature)
        stop = set(stop_token_ids(self.tokenizer))
        return self.tokenizer.decode([t for t in ids if t not in stop], skip_special_tokens=True)


# ------------------------------------------------------------------------------------------- stage A
def read_groups(paths: list[str]) -> list[tuple[str, list[Path], dict[str, Any]]]:
    """(group id, image paths, the line's other fields) from directories, image files and groups JSONL files,
    in the order given."""
    from arctic_vl import ConfigError

    groups = []
    for raw in paths:
        p = Path(raw)
        if p.is_dir():
            images = sorted(f for f in p.iterdir() if f.suffix.lower() in IMAGE_SUFFIXES)
            if not images:
                raise ConfigError(f"stage-a: {p}: no images ({', '.join(IMAGE_SUFFIXES)})")
            groups.append((p.name, images, {}))
        elif p.suffix == ".jsonl" and p.is_file():
            for n, line in enumerate(p.read_text(encoding="utf-8").splitlines(), start=1):
                if not line.strip():
                    continue
                try:
                    rec = json.loads(line)
                    gid, imgs = str(rec["group"]), rec["images"]
                    if not isinstance(imgs, list) or not imgs or not all(isinstance(i, str) for i in imgs):
                        raise ValueError("images must be a non-empty list of paths")
                except (json.JSONDecodeError, KeyError, TypeError, ValueError) as e:
                    raise ConfigError(f"stage-a: {p}:{n}: a group line needs {{group, images: [paths]}} "
                                      f"({e})") from None
                extra = {k: v for k, v in rec.items() if k not in ("group", "images")}
                groups.append((gid, [(p.parent / i).resolve() for i in imgs], extra))
        elif p.is_file() and p.suffix.lower() in IMAGE_SUFFIXES:
            groups.append((p.stem, [p], {}))
        else:
            raise ConfigError(f"stage-a: {p}: not a directory, an image ({', '.join(IMAGE_SUFFIXES)}) "
                              "or a groups .jsonl")
    return groups


def stage_a(runner: Runner, groups: list[tuple[str, list[Path], dict[str, Any]]], out: Path,
            max_new_tokens: int) -> dict[str, Any]:
    """Summaries per image of each group, written to `out`; returns the report."""
    from arctic_vl import open_image

    data = runner.cfg.data
    k = data.images_per_sample
    system = data.summary_system_prompt or data.system_prompt
    report: Counter[str] = Counter()
    errors: Counter[str] = Counter()
    with open(out, "w", encoding="utf-8") as fh:
        for gid, paths, extra in groups:
            report["groups"] += 1
            for c in range(0, len(paths), k):
                chunk = paths[c:c + k]
                images = [open_image(str(p)) for p in chunk]
                messages = ([{"role": "system", "content": system}] if system else []) + [
                    {"role": "user", "content": "<image>" * len(chunk) + data.summary_prompt}]
                text = runner.answer(messages, images, max_new_tokens)
                summaries, error = parse_summaries(text, len(chunk), data.image_key_prefix)
                for j, p in enumerate(chunk):
                    line: dict[str, Any] = {"group": gid, "image": str(p), "index": c + j}
                    if extra:
                        line["meta"] = extra  # the group line's other fields, carried to Stage-B
                    report["images"] += 1
                    if summaries is None:
                        line.update(summary=None, error=error, raw=text[:300])
                        errors["empty" if text.strip() == "" else "malformed"] += 1
                    else:
                        line["summary"] = summaries[j]
                        report["summaries"] += 1
                    fh.write(json.dumps(line, ensure_ascii=False) + "\n")
    return {**report, "errors": dict(errors), "out": str(out), "model": str(runner.model_dir)}


# ------------------------------------------------------------------------------------------- stage B
def read_summaries(path: Path) -> list[tuple[str, list[str | None], dict[str, Any]]]:
    """Stage-A output grouped by group id (groups in first-seen order, images by index), with the group's meta."""
    from arctic_vl import ConfigError

    groups: dict[str, dict[int, str | None]] = {}
    metas: dict[str, dict[str, Any]] = {}
    for n, line in enumerate(path.read_text(encoding="utf-8").splitlines(), start=1):
        if not line.strip():
            continue
        try:
            rec = json.loads(line)
            groups.setdefault(str(rec["group"]), {})[int(rec["index"])] = rec.get("summary")
            metas.setdefault(str(rec["group"]), rec.get("meta") or {})
        except (json.JSONDecodeError, KeyError, TypeError, ValueError) as e:
            raise ConfigError(f"stage-b: {path}:{n}: not a Stage-A line {{group, index, summary}} ({e})") from None
    return [(g, [by[i] for i in sorted(by)], metas[g]) for g, by in groups.items()]


def stage_b(runner: Runner, groups: list[tuple[str, list[str | None], dict[str, Any]]], out: Path, criterion: str,
            max_retries: int, max_new_tokens: int) -> dict[str, Any]:
    """A verdict per group, written to `out`; returns the report."""
    prefix = runner.cfg.data.image_key_prefix
    report: Counter[str] = Counter()
    with open(out, "w", encoding="utf-8") as fh:
        for g, (gid, summaries, meta) in enumerate(groups):
            report["groups"] += 1
            line: dict[str, Any] = {"group": gid}
            if any(s is None for s in summaries):
                line.update(verdict=None, error="Stage-A has no summary for some image of the group", attempts=0)
                report["missing_summaries"] += 1
                fh.write(json.dumps(line, ensure_ascii=False) + "\n")
                continue
            messages = [{"role": "user", "content": stage_b_prompt([str(s) for s in summaries], prefix, criterion)}]
            error, text = None, ""
            for attempt in range(max_retries + 1):
                with torch.random.fork_rng(devices=[]):
                    torch.manual_seed(g * 1000 + attempt)
                    text = runner.answer(messages, [], max_new_tokens, do_sample=attempt > 0, temperature=0.7)
                verdict, reason, error = parse_verdict(text)
                if error is None:
                    line.update(verdict=verdict, reason=reason, attempts=attempt + 1)
                    report[verdict] += 1
                    if meta.get("verdict") in ("pass", "fail"):  # a known answer (make-stage-data writes one)
                        report["with_expected"] += 1
                        report["agree"] += int(meta["verdict"] == verdict)
                    report["retried"] += int(attempt > 0)
                    break
            else:
                line.update(verdict=None, error=error, raw=text[:300], attempts=max_retries + 1)
                report["invalid"] += 1
            fh.write(json.dumps(line, ensure_ascii=False) + "\n")
    result: dict[str, Any] = {**report, "out": str(out), "model": str(runner.model_dir)}
    if report["with_expected"]:
        result["agreement"] = report["agree"] / report["with_expected"]
    return result


# ------------------------------------------------------------------------------------------ the data
def has_circle(record: dict[str, Any]) -> bool:
    """The synthetic criterion: some object of the record is a circle."""
    return any("circle" in str(o.get("desc", "")) for o in record.get("objects", []))


def make_stage_data(dense: Path, out_dir: Path, group_size: int, seed: int, prefix: str = "image_",
                    criterion: str = DEFAULT_CRITERION) -> dict[str, Any]:
    """groups.jsonl and stage_b.messages.jsonl from dense-caption records (see the module docstring)."""
    from arctic_vl import DataError

    records = []
    for n, line in enumerate(dense.read_text(encoding="utf-8").splitlines(), start=1):
        if line.strip():
            try:
                rec = json.loads(line)
                images, summary = rec["images"], rec["summary"]
            except (json.JSONDecodeError, KeyError) as e:
                raise DataError(f"{dense}:{n}: a dense-caption record with images and summary is needed ({e})",
                                source=str(dense), index=n) from None
            records.append((rec, [str((dense.parent / i).resolve()) for i in images], summary))
    order = list(range(len(records)))
    random.Random(f"dense_caption-stage:{seed}").shuffle(order)
    out_dir.mkdir(parents=True, exist_ok=True)
    counts: Counter[str] = Counter()
    with open(out_dir / "groups.jsonl", "w") as groups, open(out_dir / "stage_b.messages.jsonl", "w") as chats:
        for g in range(0, len(order) - group_size + 1, group_size):
            members = [records[i] for i in order[g:g + group_size]]
            missing = [i for i, (rec, _, _) in enumerate(members) if not has_circle(rec)]
            verdict = "fail" if missing else "pass"
            reason = (f"{image_key(prefix, missing[0])} shows no circle" if missing else "every image shows a circle")
            gid = f"group-{g // group_size:05d}"
            groups.write(json.dumps({"group": gid, "images": [p for _, imgs, _ in members for p in imgs],
                                     "verdict": verdict}) + "\n")
            prompt = stage_b_prompt([s for _, _, s in members], prefix, criterion)
            chats.write(json.dumps({"id": gid, "messages": [
                {"role": "user", "content": prompt},
                {"role": "assistant", "content": f"{verdict}\nreason: {reason}"}]}) + "\n")
            counts[verdict] += 1
    return {"groups": sum(counts.values()), **counts, "out_dir": str(out_dir)}


# ---------------------------------------------------------------------------------------------- CLI
def main(argv: list[str]) -> int:
    """`arctic_vl dense-caption stage-a|stage-b|make-stage-data ...` (see the module docstring)."""
    p = argparse.ArgumentParser(prog="arctic_vl dense-caption", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = p.add_subparsers(dest="verb", required=True)
    a = sub.add_parser("stage-a", help="per-image summaries of image groups")
    b = sub.add_parser("stage-b", help="a pass/fail verdict with a reason per group")
    for q in (a, b):
        q.add_argument("config", help="the training run's YAML config")
        q.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE")
        q.add_argument("--model", default=None, help="model directory (default: the run's final/)")
        q.add_argument("--out", type=Path, required=True)
        q.add_argument("--max-new-tokens", type=int, default=128)
    a.add_argument("--images", nargs="+", required=True, help="directories, image files or groups .jsonl files")
    b.add_argument("--summaries", type=Path, required=True, help="Stage-A output")
    b.add_argument("--criterion", default=DEFAULT_CRITERION, help="what a group must satisfy (as in training)")
    b.add_argument("--max-retries", type=int, default=2, help="sampled retries of an invalid answer")
    m = sub.add_parser("make-stage-data", help="groups.jsonl + Stage-B training chats from dense-caption records")
    m.add_argument("dense", type=Path)
    m.add_argument("--out-dir", type=Path, required=True)
    m.add_argument("--group-size", type=int, default=2)
    m.add_argument("--seed", type=int, default=0)
    args = p.parse_args(argv)
    if args.verb == "make-stage-data":
        result = make_stage_data(args.dense, args.out_dir, args.group_size, args.seed)
    elif args.verb == "stage-a":
        groups = read_groups(args.images)  # bad input is found before the model loads
        result = stage_a(Runner(args.config, args.overrides, args.model), groups, args.out, args.max_new_tokens)
    else:
        if args.max_retries < 0:
            p.error("--max-retries must be >= 0")
        summaries = read_summaries(args.summaries)
        result = stage_b(Runner(args.config, args.overrides, args.model), summaries, args.out, args.criterion,
                         args.max_retries, args.max_new_tokens)
    print(json.dumps(result, indent=1))
    return 0
