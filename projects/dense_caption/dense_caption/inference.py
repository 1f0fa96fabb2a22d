"""`arctic_vl dense-caption VERB`: Stage-A summaries, Stage-B verdicts, and the data that trains them.

    arctic_vl dense-caption stage-a CONFIG --images PATH [PATH ...] --out summaries.jsonl
    arctic_vl dense-caption stage-b CONFIG --summaries summaries.jsonl --out verdicts.jsonl [--max-retries 2]
    arctic_vl dense-caption make-stage-data DENSE.jsonl --out-dir DIR [--group-size 2 --seed 0]

The training items as the workers build them (grouped, mode drawn, augmented, encoded): the core's
`arctic_vl inspect-data CONFIG [--n 2 --epoch 0]`, which builds the data with this project's factory.

The model is the run's newest weights (`arctic_vl.newest_weights`: `OUTPUT_DIR/final` when it holds the last
step, else the latest checkpoint, on the base model rebuilt as training builds it), logged with its step before
anything is read; or `--model DIR`, an HF directory. Prompts, `images_per_sample` and the image key
prefix come from the run's `data` section, so inference asks exactly what training taught.

Stage-A: a group is a directory (its images, sorted by name), an image file (a group of one), or a line of a
`.jsonl` file `{"group": ID, "images": [paths relative to the file]}`. Each group is cut into chunks of
`images_per_sample` images, and each chunk is answered in summary mode: plain text for one image, a JSON
object keyed per image for several. Output: one line per image, groups and images in input order:
`{"group", "image_id", "image", "index", "summary"}` (`image_id`: the file name without its suffix, as the
origin documents write it), with `"summary": null` and an `"error"` when the answer was empty or malformed
(reported, never dropped). The report on stdout counts them. Other fields of a group line are carried into its
output lines as `meta` (Stage-B reads `meta.verdict` as the expected verdict).

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

from arctic_vl import ITEM_INDEX, prompt_item, read_json_lines

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
        if model_dir:
            path = Path(model_dir)
            if not (path / "config.json").is_file():
                raise ConfigError(f"dense-caption: --model {path} holds no HF model (no config.json)")
            self.weights = None
        else:
            try:
                self.weights = engine.newest_weights()
            except ConfigError as e:
                raise ConfigError(f"dense-caption: {e} (arctic_vl {config}), or pass --model DIR") from None
            path = self.weights.path
        self.model_dir = path
        torch.manual_seed(self.cfg.trainer.seed)
        if self.weights is None or self.weights.kind == "final":
            self.model = load_model(path).eval()
            processor = load_processor(path)
            self.bundle = ModelBundle(self.model, processor, family_of_dir(path))
        else:  # a checkpoint: the base model as training rebuilds it (LoRA included) with its trainable weights
            self.bundle = engine.build_model(self.weights)
            self.model = self.bundle.model.eval()
            processor = self.bundle.processor
        #: the step of the weights answering (None for --model DIR): in the reports next to `model`
        self.step = self.weights.step if self.weights is not None else None
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
        item = prompt_item({"input_ids": torch.tensor(enc.input_ids), "labels": torch.tensor(enc.labels), ITEM_INDEX: 0,
                            **(self.encoder.encode_images(images) if images else {})})
        ids = generate(self.model, self.collate([item]), self.tokenizer, max_new_tokens, do_sample=do_sample,
                       temperature=temperature)
        stop = set(stop_token_ids(self.tokenizer))
        return self.tokenizer.decode([t for t in ids if t not in stop], skip_special_tokens=True)


# ------------------------------------------------------------------------------------------- input lines
def _object(value: Any, what: str) -> dict[str, Any]:
    from arctic_vl import MALFORMED_RECORD, BadRecord

    if not isinstance(value, dict):
        raise BadRecord(MALFORMED_RECORD, "<record>", f"must be a JSON object ({what}), got {type(value).__name__}")
    return value


def _field(rec: dict[str, Any], key: str, what: str) -> Any:
    from arctic_vl import MISSING_FIELD, BadRecord

    if key not in rec:
        raise BadRecord(MISSING_FIELD, key, f"required ({what})")
    return rec[key]


def _image_paths(value: Any, base: Path, key: str = "images") -> list[Path]:
    """A record's list of image paths (relative to `base`), resolved; BadRecord naming the field otherwise."""
    from arctic_vl import MALFORMED_RECORD, BadRecord, ConfigError, resolve_user_path

    if not isinstance(value, list) or not value or not all(isinstance(i, str) and i.strip() for i in value):
        raise BadRecord(MALFORMED_RECORD, key, f"must be a non-empty list of image paths, got {value!r:.80}")
    try:
        return [resolve_user_path(i, base) for i in value]
    except ConfigError as e:  # a NUL byte, a symbolic link loop
        raise BadRecord(MALFORMED_RECORD, key, str(e)) from None


def _group_line(value: Any, base: Path) -> tuple[str, list[Path], dict[str, Any]]:
    """A Stage-A groups line: (group id, its images, its other fields)."""
    from arctic_vl import MALFORMED_RECORD, BadRecord

    rec = _object(value, "a group line {group, images: [paths]}")
    gid = _field(rec, "group", "the group's id")
    if not isinstance(gid, str | int) or isinstance(gid, bool) or not str(gid).strip():
        raise BadRecord(MALFORMED_RECORD, "group", f"must be a non-empty string or an integer, got {gid!r:.80}")
    images = _image_paths(_field(rec, "images", "the group's image paths"), base)
    return str(gid), images, {k: v for k, v in rec.items() if k not in ("group", "images")}


def _summary_line(value: Any) -> tuple[str, int, str | None, dict[str, Any]]:
    """A Stage-A output line: (group id, image index, summary or None, the group's meta)."""
    from arctic_vl import MALFORMED_RECORD, BadRecord

    rec = _object(value, "a Stage-A line {group, index, summary}")
    gid, index = _field(rec, "group", "the group's id"), _field(rec, "index", "the image's index in its group")
    if not isinstance(gid, str | int) or isinstance(gid, bool):
        raise BadRecord(MALFORMED_RECORD, "group", f"must be a string or an integer, got {gid!r:.80}")
    if not isinstance(index, int) or isinstance(index, bool) or index < 0:
        raise BadRecord(MALFORMED_RECORD, "index", f"must be an integer >= 0, got {index!r:.80}")
    summary, meta = rec.get("summary"), rec.get("meta") or {}
    if summary is not None and not isinstance(summary, str):
        raise BadRecord(MALFORMED_RECORD, "summary", f"must be a string or null, got {type(summary).__name__}")
    if not isinstance(meta, dict):
        raise BadRecord(MALFORMED_RECORD, "meta", f"must be an object, got {type(meta).__name__}")
    return str(gid), index, summary, meta


def _dense_line(value: Any, base: Path) -> tuple[dict[str, Any], list[str], str]:
    """A dense-caption record for make-stage-data: (the record, its image paths resolved, its summary)."""
    from arctic_vl import MALFORMED_RECORD, BadRecord

    rec = _object(value, "a dense-caption record")
    images = _image_paths(_field(rec, "images", "the record's image paths"), base)
    summary = _field(rec, "summary", "the Stage-B prompt is built from the summaries")
    if not isinstance(summary, str) or not summary.strip():
        raise BadRecord(MALFORMED_RECORD, "summary", f"must be a non-empty string, got {summary!r:.80}")
    objects = rec.get("objects", [])
    if isinstance(objects, dict):  # the keyed form {"object_1": {...}, ...}, as the training records accept it
        objects = list(objects.values())
    if not isinstance(objects, list) or not all(isinstance(o, dict) for o in objects):
        raise BadRecord(MALFORMED_RECORD, "objects", "must be a list of objects {desc, bbox_2d|poly|quad|line}, "
                                                     "or an object keyed object_1, object_2, ...")
    return {**rec, "objects": objects}, [str(i) for i in images], summary


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
            for _, (gid, imgs, extra) in read_json_lines(p, lambda v, base=p.parent: _group_line(v, base),
                                                         what="a groups .jsonl of {group, images: [paths]}"):
                groups.append((gid, imgs, extra))
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
                    # image_id: the file's name without its suffix, as the origin documents' Stage-A lines
                    line: dict[str, Any] = {"group": gid, "image_id": Path(p).stem, "image": str(p), "index": c + j}
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
    return {**report, "errors": dict(errors), "out": str(out), "model": str(runner.model_dir), "step": runner.step}


# ------------------------------------------------------------------------------------------- stage B
def read_summaries(path: Path) -> list[tuple[str, list[str | None], dict[str, Any]]]:
    """Stage-A output grouped by group id (groups in first-seen order, images by index), with the group's meta."""
    from arctic_vl import ConfigError

    groups: dict[str, dict[int, str | None]] = {}
    metas: dict[str, dict[str, Any]] = {}
    lines = read_json_lines(path, _summary_line, what="Stage-A output (stage-a --out): lines {group, index, summary}")
    for _, (gid, index, summary, meta) in lines:
        groups.setdefault(gid, {})[index] = summary
        metas.setdefault(gid, meta)
    if not groups:
        raise ConfigError(f"stage-b: --summaries {path}: holds no Stage-A lines")
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
    result: dict[str, Any] = {**report, "out": str(out), "model": str(runner.model_dir), "step": runner.step}
    if report["with_expected"]:
        result["agreement"] = report["agree"] / report["with_expected"]
    return result


# ------------------------------------------------------------------------------------------ the data
def has_circle(record: dict[str, Any]) -> bool:
    """The synthetic criterion: some object of the record is a circle."""
    return any("circle" in str(o.get("desc", "")) for o in record.get("objects", []))


def make_stage_data(dense: Path, out_dir: Path, group_size: int, seed: int, prefix: str = "image_",
                    criterion: str = DEFAULT_CRITERION, on_bad_record: str = "error") -> dict[str, Any]:
    """groups.jsonl and stage_b.messages.jsonl from dense-caption records (see the module docstring).

    The records are read as training data is (`read_json_lines`): a line that is not UTF-8, not JSON, or no
    record with `images` and `summary` stops it (exit 2, naming the line and field) or, with
    `on_bad_record="skip"`, is counted in the result's `skipped`. Arguments are checked before anything is read."""
    from arctic_vl import BadRecordReport, ConfigError, DataError, output_directory

    if group_size < 1:
        raise ConfigError(f"make-stage-data: --group-size {group_size}: must be >= 1 (records per group)")
    if on_bad_record not in ("error", "skip"):
        raise ConfigError(f"make-stage-data: --on-bad-record {on_bad_record!r}: must be error or skip")
    out_dir = output_directory(out_dir, "make-stage-data: --out-dir")
    report = BadRecordReport()
    records = [r for _, r in read_json_lines(dense, lambda v: _dense_line(v, dense.parent), what="dense-caption "
                                             "records (JSONL)", on_bad_record=on_bad_record,  # type: ignore[arg-type]
                                             report=report, skip_option="--on-bad-record skip")]
    if len(records) < group_size:
        raise DataError(f"make-stage-data: {dense}: {len(records)} usable records, fewer than --group-size "
                        f"{group_size}{': ' + report.format() if report.total else ''}", source=str(dense))
    order = list(range(len(records)))
    random.Random(f"dense_caption-stage:{seed}").shuffle(order)
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
    return {"groups": sum(counts.values()), **counts, "out_dir": str(out_dir),
            "skipped": dict(Counter({reason: n for (_, reason), n in report.counts.items()}))}


# ---------------------------------------------------------------------------------------------- CLI
def _check_args(p: argparse.ArgumentParser, args: argparse.Namespace) -> None:
    """Refuse bad arguments (argparse's exit 2) and unusable output paths (ConfigError, exit 2) up front."""
    from arctic_vl import output_file

    if args.verb == "make-stage-data":
        if args.group_size < 1:
            p.error("--group-size must be >= 1")
        if not args.dense.is_file():
            p.error(f"DENSE {args.dense}: {'is a directory' if args.dense.is_dir() else 'not found'}; "
                    "name a dense-caption JSONL file")
        return
    if args.max_new_tokens < 1:
        p.error("--max-new-tokens must be >= 1")
    if args.model is not None and not Path(args.model).is_dir():
        p.error(f"--model {args.model}: not a directory (a trained model directory, e.g. OUTPUT_DIR/final)")
    if args.verb == "stage-b":
        if args.max_retries < 0:
            p.error("--max-retries must be >= 0")
        if not args.summaries.is_file():
            p.error(f"--summaries {args.summaries}: {'is a directory' if args.summaries.is_dir() else 'not found'}; "
                    "name the Stage-A output file (stage-a --out)")
    output_file(args.out, f"dense-caption {args.verb}: --out")


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
        q.add_argument("--model", default=None,
                       help="an HF model directory (default: the run's newest weights: final/, or its latest "
                            "checkpoint when that is newer)")
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
    m.add_argument("--on-bad-record", choices=("error", "skip"), default="error",
                   help="a bad record line stops (error, exit 2) or is skipped and counted (skip)")
    args = p.parse_args(argv)
    _check_args(p, args)  # every argument and output path before any model loads
    if args.verb == "make-stage-data":
        result = make_stage_data(args.dense, args.out_dir, args.group_size, args.seed,
                                 on_bad_record=args.on_bad_record)
    elif args.verb == "stage-a":
        groups = read_groups(args.images)  # bad input is found before the model loads
        result = stage_a(Runner(args.config, args.overrides, args.model), groups, args.out, args.max_new_tokens)
    else:
        summaries = read_summaries(args.summaries)
        result = stage_b(Runner(args.config, args.overrides, args.model), summaries, args.out, args.criterion,
                         args.max_retries, args.max_new_tokens)
    print(json.dumps(result, indent=1))
    return 0
