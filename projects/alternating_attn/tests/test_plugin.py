"""The plugin: registration, validate-time variant checks, `inspect-weights`, and the factory's build."""

from __future__ import annotations

import re
from pathlib import Path

import pytest
import torch
from alternating_attn.variants import VARIANT_MODEL_TYPES
from PIL import Image

#: what the composite keeps outside its language model (vision tower, projector, image newline)
NON_LLM = ("model.vision_tower.", "model.multi_modal_projector.", "model.image_newline")


def _report(out: str) -> dict[str, object]:
    """The WeightReport as printed: counts and each listed section's entries."""
    counts = re.search(r"copied: (\d+), skipped: (\d+), missing: (\d+), unexpected: (\d+)", out)
    assert counts, out
    parsed: dict[str, object] = dict(zip(("copied", "skipped", "missing", "unexpected"), map(int, counts.groups())))
    section = None
    for line in out.splitlines():
        head = re.match(r"^(copied|skipped|missing|unexpected)( \(first \d+ of \d+\))?:$", line)
        if head:
            section = head.group(1)
            parsed[f"{section}_names"] = []
        elif section and line.startswith("  "):
            parsed[f"{section}_names"].append(line.strip())  # type: ignore[union-attr]
    return parsed


def test_plugins_lists_factory_and_verb(cli):
    code, out, _ = cli("plugins")
    assert code == 0
    block = out[out.index("alternating_attn (alternating_attn.plugin"):]
    block = block.split("\n\n")[0]
    assert block.splitlines()[0].endswith(": ok")
    assert "  model: alternating_attn" in block
    assert "  cli: inspect-weights" in block


def test_composite_model_types_map_to_llava_onevision():
    from arctic_vl import load_plugins
    from arctic_vl.models.families import family_for_model_type

    load_plugins()
    for model_type in VARIANT_MODEL_TYPES.values():
        family = family_for_model_type(model_type)
        assert family is not None and family.name == "llava_onevision", model_type


def test_validate_rejects_variant_mismatch_unless_forced(cli, write_config, tiny_onevision):
    config = write_config(model={"type": "alternating_attn", "name_or_path": str(tiny_onevision),
                                 "variant": "alternating"})
    code, out, err = cli("validate", config)
    assert code == 2, out + err
    # file and line of the `variant:` key (line 4: data, sources, -, then model's type/name_or_path come later)
    lines = config.read_text().splitlines()
    variant_line = next(i for i, ln in enumerate(lines, 1) if ln.strip().startswith("variant:"))
    assert f"{config}:{variant_line}" in err
    assert "model.variant" in err and "'llava_onevision'" in err and "force: true" in err

    config = write_config(model={"type": "alternating_attn", "name_or_path": str(tiny_onevision),
                                 "variant": "alternating", "force": True})
    code, out, err = cli("validate", config)
    assert code == 0, err
    assert (f"# model: llava_qwen_with_alternating_attn (variant alternating) from {tiny_onevision}, "
            "converted from llava_onevision (force: true)") in out

    config = write_config(model={"type": "alternating_attn", "name_or_path": str(tiny_onevision)})
    code, out, err = cli("validate", config)
    assert code == 0, err
    assert "# model: llava_onevision (variant base)" in out  # auto follows the checkpoint


@pytest.mark.parametrize(("model", "message"), [
    ({"family": "qwen2_vl"}, "model.family: family 'qwen2_vl'"),
    ({"family": "llava_onevision", "init_from_backbone": "nowhere"}, "model.init_from_backbone: init_from_backbone:"),
    ({"family": "llava_onevision", "variant": "sideways"}, "model.variant: Input should be 'auto', 'alternating'"),
    ({"family": "llava_onevision", "skip_parts": ["head"]},
     "model.skip_parts[0]: Input should be 'vision', 'aligner' or 'llm' (got 'head')"),
    ({"family": "llava_onevision", "variant": "alternating", "attn_implementation": "flash_attention_2"},
     "cannot express the alternating mask"),
])
def test_validate_names_field_and_allowed_values(cli, write_config, model, message):
    config = write_config(model={"type": "alternating_attn", **model})
    code, out, err = cli("validate", config)
    assert code == 2, out + err
    assert message in err
    assert str(config) in err


def test_validate_rejects_backbone_of_unknown_type(cli, write_config, tmp_path):
    (tmp_path / "llama").mkdir()
    (tmp_path / "llama" / "config.json").write_text('{"model_type": "llama"}')
    config = write_config(model={"type": "alternating_attn", "family": "llava_onevision",
                                 "init_from_backbone": "llama"})
    code, _, err = cli("validate", config)
    assert code == 2
    assert "has model_type 'llama'; allowed: qwen2, qwen2_alternating, llava_qwen_with_alternating_attn" in err


def test_inspect_weights_from_qwen2_backbone_copies_every_llm_parameter(cli, write_config, tiny_onevision,
                                                                        qwen2_backbone):
    config = write_config(model={"type": "alternating_attn", "name_or_path": str(tiny_onevision),
                                 "variant": "alternating_cross", "force": True,
                                 "init_from_backbone": str(qwen2_backbone)})
    code, out, err = cli("inspect-weights", config, "--first", "1000")
    assert code == 0, err
    assert out.startswith("# model: llava_qwen_with_alternating_cross_attn (variant alternating_cross)")
    report = _report(out)
    assert report["skipped"] == 0 and report["unexpected"] == 0

    from transformers import LlavaOnevisionForConditionalGeneration, Qwen2ForCausalLM

    composite = LlavaOnevisionForConditionalGeneration.from_pretrained(tiny_onevision)
    names = list(composite.state_dict())
    storages = {}  # tied tensors are one parameter: the report counts each storage once
    for name, tensor in composite.state_dict().items():
        storages.setdefault(tensor.data_ptr(), name)
    llm = [n for n in storages.values() if not n.startswith(NON_LLM)]
    non_llm = [n for n in names if n.startswith(NON_LLM)]
    assert report["copied"] == len(llm) > 0
    assert sorted(report["copied_names"]) == sorted(llm)
    assert sorted(report["missing_names"]) == sorted(non_llm)  # only vision / aligner / newline are missing
    assert "model.image_newline" in report["missing_names"]

    # The factory's build gives the same report and really holds the backbone's tensors.
    from arctic_vl import Engine

    factory = Engine(config).model_factory()
    model, weight_report = factory.build_model(Path(factory.config.name_or_path))
    assert type(model).__name__ == "LlavaQwenAlternatingCrossForConditionalGeneration"
    assert sorted(weight_report.copied) == sorted(llm)
    backbone = Qwen2ForCausalLM.from_pretrained(qwen2_backbone).state_dict()
    state = model.state_dict()
    for name in llm:
        source = name if name == "lm_head.weight" else name.replace("model.language_model.", "model.")
        assert torch.equal(state[name], backbone[source]), name
    # The parts not copied come from the converted OneVision checkpoint (force: true), not from a random init.
    checkpoint_state = composite.state_dict()
    for name in non_llm:
        assert torch.equal(state[name], checkpoint_state[name]), name


def test_onevision_backbone_with_no_skipped_parts_reproduces_its_logits(cli, write_config, tiny_onevision,
                                                                        tiny_onevision_other):
    config = write_config(model={"type": "alternating_attn", "name_or_path": str(tiny_onevision),
                                 "variant": "base", "init_from_backbone": str(tiny_onevision_other),
                                 "skip_parts": []})
    code, out, err = cli("inspect-weights", config)
    assert code == 0, err
    report = _report(out)
    assert report["missing"] == 0 and report["skipped"] == 0 and report["unexpected"] == 0
    assert report["copied"] > 0

    from transformers import LlavaOnevisionForConditionalGeneration

    from arctic_vl import Engine, load_processor

    bundle = Engine(config).model_factory().build()
    assert bundle.extras["weight_report"].missing == []
    assert type(bundle.model) is LlavaOnevisionForConditionalGeneration
    expected_model = LlavaOnevisionForConditionalGeneration.from_pretrained(tiny_onevision_other)
    processor = load_processor(tiny_onevision_other)
    image = Image.new("RGB", (64, 48), (200, 30, 30))
    inputs = processor(images=[image], text="<|im_start|>user\n<image>\nWhat colour?<|im_end|>\n",
                       return_tensors="pt")
    bundle.model.eval()
    expected_model.eval()
    with torch.no_grad():
        got = bundle.model(**inputs).logits
        expected = expected_model(**inputs).logits
        start = LlavaOnevisionForConditionalGeneration.from_pretrained(tiny_onevision).eval()(**inputs).logits
    assert (got - expected).abs().max().item() <= 1e-6
    assert (start - expected).abs().max().item() > 1e-2  # the copy, not the start checkpoint, made them equal


def test_inspect_weights_without_backbone_is_a_config_error(cli, write_config, tiny_onevision):
    config = write_config(model={"type": "alternating_attn", "name_or_path": str(tiny_onevision)})
    code, _, err = cli("inspect-weights", config)
    assert code == 2
    assert "model.init_from_backbone: not set" in err and str(config) in err


def _load_plot_script():
    import importlib.util

    path = Path(__file__).resolve().parents[1] / "scripts" / "plot_curves.py"
    spec = importlib.util.spec_from_file_location("plot_curves", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _record(qtype: str, question: str, answer: str) -> dict[str, object]:
    return {"qtype": qtype, "conversations": [{"from": "human", "value": f"<image>\n{question}"},
                                              {"from": "gpt", "value": answer}]}


def test_chance_levels_from_data(tmp_path):
    import json

    train = [_record("colour", "What colour?", a) for a in ("red", "red", "blue", "green")]
    train += [_record("position", "Left or right?", "left"), _record("position", "Top or bottom?", "top")]
    heldout = [_record("colour", "What colour?", "red"), _record("colour", "What colour?", "blue"),
               _record("position", "Left or right?", "right"), _record("position", "Top or bottom?", "top")]
    (tmp_path / "train.llava.json").write_text(json.dumps(train))
    (tmp_path / "heldout.llava.json").write_text(json.dumps(heldout))
    chance = _load_plot_script().chance_levels(tmp_path)
    assert chance["colour"] == {"uniform": pytest.approx(1 / 3), "blind": 0.5}  # always "red": 1 of 2
    assert chance["position"] == {"uniform": 0.5, "blind": 0.5}


def test_plot_curves_smoke(tmp_path, capsys):
    import json

    script = _load_plot_script()
    runs = []
    for i, name in enumerate(("a", "b")):
        run = tmp_path / name
        run.mkdir()
        (run / "metrics.jsonl").write_text("".join(
            json.dumps({"step": s, "loss": 3.0 / s + i}) + "\n" for s in range(1, 31)))
        final = {"step": 30, "eval_loss": 0.5 + i, "exact_match": 0.6, "exact_match_by_type": {"colour": 0.7 - i / 10}}
        # after it: a standalone evaluation, and an unmarked step-0 line as `evaluate` appended before it was marked
        later = [{**final, "standalone": True, "eval_loss": 9.0}, {**final, "step": 0, "eval_loss": 8.0}]
        (run / "eval.jsonl").write_text("".join(json.dumps(e) + "\n" for e in [final, *later]))
        runs += ["--run", f"{name}={run}"]
    out = tmp_path / "docs" / "curves.png"
    assert script.main([*runs, "--out", str(out), "--window", "5"]) == 0
    assert out.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and out.stat().st_size > 10_000
    printed = capsys.readouterr().out
    assert "| a | 30 | 0.500 | 0.70 | 0.60 |" in printed and "| b | 30 | 1.500 | 0.60 | 0.60 |" in printed
    assert script.smooth([1.0, 3.0, 5.0, 7.0], 2) == [1.0, 2.0, 4.0, 6.0]


def test_shipped_backbone_config_validates_and_describes_the_copy(cli, tiny_onevision_other, tmp_path):
    config = Path(__file__).resolve().parents[1] / "configs" / "from_backbone.yaml"
    (tmp_path / "data.json").write_text("[]\n")  # the data a config names must exist to validate
    data = f"[{tmp_path / 'data.json'}]"
    code, out, err = cli("validate", config, "--set", f"model.init_from_backbone={tiny_onevision_other}",
                         "--set", f"data.sources={data}", "--set", f"data.eval_sources={data}")
    assert code == 0, err
    assert (f"# model: llava_qwen_with_alternating_attn (variant alternating) from a tiny llava_onevision "
            f"(layers=4, hidden=64, heads=4, kv_heads=2, intermediate=128) written to OUTPUT_DIR/base_model; "
            f"init_from_backbone {tiny_onevision_other} (llava_onevision), skipping nothing") in out

