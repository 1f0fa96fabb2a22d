"""`arctic_vl inspect-data`: what the model will see, without loading weights or decoding pixels."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from arctic_vl.constants import IGNORE_INDEX
from arctic_vl.engine import Engine


def render_tokens(tokenizer: Any, input_ids: list[int], labels: list[int], image_token_ids: set[int]) -> str:
    """Tokens as text; trained (labelled) runs wrapped in [[...]], each image's run shown as <image x N>."""
    out, i = [], 0
    while i < len(input_ids):
        tid = input_ids[i]
        if tid in image_token_ids:
            j = i
            while j < len(input_ids) and input_ids[j] == tid:
                j += 1
            out.append(f"<{tokenizer.convert_ids_to_tokens(tid)} x {j - i}>")
            i = j
            continue
        trained = labels[i] != IGNORE_INDEX
        j = i
        while j < len(input_ids) and (labels[j] != IGNORE_INDEX) == trained and input_ids[j] not in image_token_ids:
            j += 1
        text = tokenizer.decode(input_ids[i:j], skip_special_tokens=False)
        out.append(f"[[{text}]]" if trained else text)
        i = j
    return "".join(out)


def inspect_data(config: str, overrides: list[str], n: int = 1) -> str:
    """Counts per split and skip reason, a warning when the chat template trains no end-of-turn token, and the
    first `n` samples of the first source (in file order, not the training mix) rendered with their labels."""
    from arctic_vl.data.bad_records import BadRecordReport
    from arctic_vl.data.encoding import unended_warning

    engine = Engine(config, overrides)
    model_factory = engine.model_factory()
    model_factory.prepare(engine.output_dir, engine.config.trainer.seed)
    processor, family = model_factory.load_processor(engine.output_dir)
    bundle = type("ProcessorOnly", (), {"processor": processor, "family": family})()
    factory = engine.data_factory()
    encoder = factory.encoder(bundle)
    lines = [f"model: {engine.describe_model()}"]
    tokenizer = getattr(processor, "tokenizer", processor)
    image_ids = {tokenizer.convert_tokens_to_ids(family.image_token)}
    for split, specs in (("train", factory.config.sources), ("eval", factory.config.eval_sources)):
        if not specs:
            continue
        report = BadRecordReport()
        # file order: the first samples shown are the first records of the first source
        kept, encoded = factory.load(specs, encoder, seed=engine.config.trainer.seed, report=report, shuffle=False)
        tokens = sum(len(e.input_ids) for e in encoded)
        trained = sum(sum(1 for t in e.labels if t != IGNORE_INDEX) for e in encoded)
        with_images = sum(1 for c in kept if c.images)
        lines.append(f"{split}: {len(kept)} samples ({with_images} with images, {len(kept) - with_images} text-only), "
                     f"{tokens} tokens, {trained} trained tokens; skipped {report.total}"
                     + (f" ({report.format()})" if report.total else ""))
        if split == "train":
            warning = unended_warning(encoder, kept, encoded)
            if warning:
                lines.append(f"warning: {warning}")
            for conv, enc in list(zip(kept, encoded))[:n]:
                sizes = ", ".join(f"{Path(str(r)).name}" for r in conv.images)
                lines.append(f"--- {conv.source} {conv.where}: {len(enc.input_ids)} tokens"
                             + (f", images: {sizes}" if sizes else ""))
                lines.append(render_tokens(tokenizer, enc.input_ids, enc.labels, image_ids))
    return "\n".join(lines)
