"""End to end from the shipped YAML configs: each variant trains a few steps, exports final/, and final/ reloads
in a fresh interpreter after `import alternating_attn` with the right variant and the trained logits."""

from __future__ import annotations

import json
import signal
from pathlib import Path

import pytest
import torch
import yaml
from alternating_attn.variants import VARIANT_MODEL_TYPES
from safetensors.torch import load_file

from tests.e2e_utils import read_metrics, run_python, synthetic_data  # noqa: F401

CONFIGS = Path(__file__).resolve().parents[1] / "configs"
MIX = Path(__file__).resolve().parents[1] / "data" / "synthetic_mix.yaml"
VARIANTS = ("alternating", "alternating_cross", "base")
PROMPT = "<|im_start|>user\n<image>\nWhat colour is the shape?<|im_end|>\n<|im_start|>assistant\n"

# A fresh interpreter: only `import alternating_attn` makes the composite types known to transformers.
# The package itself imports neither torch nor transformers; its import hook registers once transformers is imported.
RELOAD = r"""
import json, sys
import alternating_attn
assert "transformers" not in sys.modules and "torch" not in sys.modules, "import alternating_attn must stay light"
import torch
torch.set_num_threads(1)
from PIL import Image
from transformers import AutoModelForImageTextToText
from arctic_vl.models.processors import LlavaOnevisionImageOnlyProcessor  # HF's needs torchvision (video part)
out = {}
for final in sys.argv[2:]:
    model = AutoModelForImageTextToText.from_pretrained(final).eval()
    processor = LlavaOnevisionImageOnlyProcessor.from_pretrained(final)
    inputs = processor(images=[Image.new("RGB", (64, 64), (40, 80, 220))], text=sys.argv[1], return_tensors="pt")
    with torch.no_grad():
        logits = model(**inputs).logits
    torch.save(logits, final + "/reload_logits.pt")
    out[final] = {"class": type(model).__name__, "model_type": model.config.model_type,
                  "variant": getattr(model.config.text_config, "attention_variant", None),
                  "language_model": type(model.model.language_model).__name__}
print(json.dumps(out))
"""


@pytest.fixture
def keep_sigterm():
    """In-process training installs a SIGTERM handler; give pytest its own back."""
    before = signal.getsignal(signal.SIGTERM)
    yield
    signal.signal(signal.SIGTERM, before)


@pytest.fixture(scope="module")
def mix_file(synthetic_data: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:  # noqa: F811
    """The shipped YAML list file with its json_paths pointed at the test's synthetic data (same file names)."""
    doc = yaml.safe_load(MIX.read_text())
    for entry in doc["datasets"]:
        entry["json_path"] = str(synthetic_data / Path(entry["json_path"]).name)
    out = tmp_path_factory.mktemp("mix") / "synthetic_mix.yaml"
    out.write_text(yaml.safe_dump(doc))
    return out


def _overrides(variant: str, out_dir: Path, synthetic: Path, mix: Path) -> list[str]:
    source = mix if variant == "alternating_cross" else synthetic / "train.llava.json"
    sets = [f"data.sources=[{source}]", "data.eval_sources=[]", "data.micro_batch_size=4",
            "trainer.max_steps=3", f"trainer.output_dir={out_dir}", "checkpoint.every_n_steps=null",
            "eval.every_n_steps=null", "callbacks=[{type: throughput, every_n_steps: 1}]"]
    return [arg for s in sets for arg in ("--set", s)]


def test_shipped_configs_use_the_yaml_list_and_throughput():
    cross = yaml.safe_load((CONFIGS / "alternating_cross.yaml").read_text())
    assert cross["data"]["sources"] == ["../data/synthetic_mix.yaml"]
    strategies = [e["sampling_strategy"] for e in yaml.safe_load(MIX.read_text())["datasets"]]
    assert strategies == ["all", "random:1000"]
    for variant in VARIANTS:
        config = yaml.safe_load((CONFIGS / f"{variant}.yaml").read_text())
        assert config["model"]["type"] == "alternating_attn" and config["model"]["variant"] == variant
        assert {"type": "throughput", "every_n_steps": 10} in config["callbacks"]


def test_inspect_data_with_the_factory(cli, synthetic_data, mix_file, tmp_path):  # noqa: F811
    code, out, err = cli("inspect-data", CONFIGS / "alternating_cross.yaml",
                         *_overrides("alternating_cross", tmp_path / "run", synthetic_data, mix_file))
    assert code == 0, err
    assert "\nmodel: llava_qwen_with_alternating_cross_attn (variant alternating_cross)" in "\n" + out
    # all 200 records of the LLaVA json + random:1000 of the 200 in the messages JSONL (capped at the file)
    assert "train: 400 samples (340 with images, 60 text-only)" in out
    assert "<<image> x " in out and "[[" in out  # image tokens expanded, trained tokens marked


def test_each_variant_trains_exports_and_reloads(cli, keep_sigterm, synthetic_data, mix_file, tmp_path):  # noqa: F811
    finals = {}
    for variant in VARIANTS:
        out_dir = tmp_path / variant
        code, out, err = cli(CONFIGS / f"{variant}.yaml", *_overrides(variant, out_dir, synthetic_data, mix_file))
        assert code == 0, err[-3000:]
        summary = json.loads(out[out.index("{"):])
        assert summary["steps"] == 3 and summary["export"] == str(out_dir / "final")
        metrics = read_metrics(out_dir)
        assert [m["step"] for m in metrics] == [1, 2, 3]
        assert all(m["loss"] == m["loss"] and m["loss"] > 0 for m in metrics)  # finite, positive
        saved = json.loads((out_dir / "final" / "config.json").read_text())
        assert saved["model_type"] == VARIANT_MODEL_TYPES[variant]
        finals[variant] = out_dir / "final"

    proc = run_python(RELOAD, PROMPT, *map(str, finals.values()))
    assert proc.returncode == 0, proc.stderr[-3000:]
    reloaded = json.loads(proc.stdout.strip().splitlines()[-1])

    from alternating_attn.modeling_alternating import composite_model_class
    from transformers import AutoConfig

    for variant, final in finals.items():
        info = reloaded[str(final)]
        assert info["model_type"] == VARIANT_MODEL_TYPES[variant]
        assert info["class"] == composite_model_class(variant).__name__
        if variant == "base":
            assert info["variant"] is None and info["language_model"] == "Qwen2Model"
        else:
            assert info["variant"] == variant and info["language_model"] == "AlternatingQwen2Model"

        # The trained weights, as the loop left them in its last checkpoint, must give the reloaded logits.
        run = final.parent
        trained = {k.removeprefix("model."): v for k, v in load_file(run / "checkpoints" / "step-3" /
                                                                        "model.safetensors").items()}
        model = composite_model_class(variant)(AutoConfig.from_pretrained(final)).eval()
        missing, unexpected = model.load_state_dict(trained, strict=False)
        assert unexpected == []
        assert set(missing) <= {n for n, _ in model.named_buffers()}, missing
        initial = load_file(run / "base_model" / "model.safetensors")
        initial_embed = next(v for k, v in initial.items() if k.endswith("embed_tokens.weight"))  # any key layout
        assert not torch.equal(trained["model.language_model.embed_tokens.weight"], initial_embed)  # it trained

        from PIL import Image

        from arctic_vl import load_processor

        processor = load_processor(final)
        inputs = processor(images=[Image.new("RGB", (64, 64), (40, 80, 220))], text=PROMPT, return_tensors="pt")
        with torch.no_grad():
            expected = model(**inputs).logits
        got = torch.load(final / "reload_logits.pt", weights_only=True)
        assert (got - expected).abs().max().item() <= 1e-6, variant
