"""small-cpu.yaml end to end at 3 steps: the CLI trains, `final/` reloads with from_pretrained after
`import swiftkv_vl` alone and generates with SwiftKV on, and `arctic_vl swiftkv-eval` compares it with its teacher."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from tests import e2e_utils
from tests.e2e_utils import read_metrics, run_cli, run_python

synthetic_data = e2e_utils.synthetic_data  # a session fixture shared with the core's tests

torch.set_num_threads(1)

CONFIG = Path(__file__).resolve().parents[1] / "configs" / "small-cpu.yaml"

RELOAD = r"""
import json, sys
import swiftkv_vl  # registers llama_swiftkv / qwen2_swiftkv with transformers: nothing else is needed
import torch
from transformers import AutoProcessor, LlavaNextForConditionalGeneration
final = sys.argv[1]
model = LlavaNextForConditionalGeneration.from_pretrained(final).eval()
processor = AutoProcessor.from_pretrained(final)
ids = processor.tokenizer("What comes after one?", return_tensors="pt")
lm = model.model.language_model
calls = []
lm.layers[3].register_forward_hook(lambda m, a, o: calls.append(a[0].shape[1]))
swiftkv_vl.set_swiftkv(model, True)  # also installs the prefill shortcut for generate()
out = model.generate(**ids, max_new_tokens=4, do_sample=False, min_new_tokens=4)
print(json.dumps({"lm": type(lm).__name__, "swiftkv": model.config.text_config.swiftkv,
                  "new_tokens": out.shape[1] - ids["input_ids"].shape[1], "layer3_lengths": calls,
                  "prompt": ids["input_ids"].shape[1]}))
"""


@pytest.fixture(scope="module")
def trained(synthetic_data: Path, tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, list[str]]:
    out = tmp_path_factory.mktemp("e2e") / "run"
    overrides = ["--set", "trainer.max_steps=3", "--set", f"trainer.output_dir={out}",
                 "--set", f"data.sources=[{synthetic_data / 'train.llava.json'}]",
                 "--set", f"data.eval_sources=[{synthetic_data / 'heldout.llava.json'}]"]
    proc = run_cli(str(CONFIG), *overrides, cwd=out.parent)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return out, overrides


def test_cli_run_exports_swiftkv_composite(trained):
    out, _ = trained
    metrics = read_metrics(out)
    assert [m["step"] for m in metrics] == [1, 2, 3]
    for m in metrics:
        assert m["kl"] >= 0 and m["hidden_mse"] >= 0 and m["loss"] == pytest.approx(m["kl"] + m["hidden_mse"], rel=1e-6)
        assert {"kl_image", "kl_text", "hidden_mse_image", "hidden_mse_text"} <= set(m)
    config = json.loads((out / "final" / "config.json").read_text())
    assert config["model_type"] == "llava_next"
    text = config["text_config"]
    assert (text["model_type"], text["num_key_value_layers"], text["key_value_group_size"], text["swiftkv"]) == \
        ("llama_swiftkv", 2, 1, True)
    assert (text["hidden_size"], text["num_hidden_layers"], text["num_attention_heads"], text["num_key_value_heads"]) \
        == (64, 4, 2, 1)
    assert (out / "teacher" / "config.json").is_file() and (out / "final" / "tokenizer.json").is_file()


def test_final_reloads_after_import_and_generates(trained):
    out, _ = trained
    proc = run_python(RELOAD, str(out / "final"))
    assert proc.returncode == 0, proc.stderr[-3000:]
    got = json.loads(proc.stdout.strip().splitlines()[-1])
    assert got["lm"] == "LlamaSwiftKVModel" and got["swiftkv"] is True and got["new_tokens"] == 4
    # the SwiftKV prefill: the prompt runs only the last token through layers >= M, then one token per step
    assert got["layer3_lengths"] == [1, 1, 1, 1], got


def test_swiftkv_eval_verb(trained, capsys):
    from arctic_vl.cli import main

    out, overrides = trained
    capsys.readouterr()
    assert main(["swiftkv-eval", str(CONFIG), *overrides, "--max-samples", "6"]) == 0
    results = json.loads(capsys.readouterr().out)
    assert results["questions"] == 6 and results["generated_questions"] == 6 and results["label_tokens"] >= 6
    for key in ("top1_agreement", "teacher_exact_match", "student_exact_match", "answer_agreement"):
        assert 0.0 <= results[key] <= 1.0, key
    # 3 small steps from an init that equals the teacher up to layer M: the student still mostly agrees
    assert results["top1_agreement"] >= 0.5, results
    assert results["student"] == str(out / "final") and results["teacher"] == str(out / "teacher")


def test_swiftkv_eval_of_a_killed_run_uses_its_latest_checkpoint(trained, capsys, tmp_path):
    """No final/ (killed before its export): the student is the step-3 checkpoint's SwiftKV weights on the student
    converted from the teacher, with exactly final/'s figures; a run without weights is exit 2 naming it."""
    import shutil

    from arctic_vl.cli import main

    out, overrides = trained
    args = ["--max-samples", "4"]
    capsys.readouterr()
    assert main(["swiftkv-eval", str(CONFIG), *overrides, *args]) == 0
    final = json.loads(capsys.readouterr().out)
    assert (final["weights"], final["step"]) == ("final", 3)
    killed = tmp_path / "killed"
    shutil.copytree(out, killed, ignore=shutil.ignore_patterns("final"))
    assert main(["swiftkv-eval", str(CONFIG), *overrides, "--set", f"trainer.output_dir={killed}", *args]) == 0
    got = json.loads(capsys.readouterr().out)
    assert (got["weights"], got["step"], got["student"]) == ("checkpoint", 3, str(killed / "checkpoints" / "step-3"))
    for key in ("label_tokens", "top1_agreement", "teacher_exact_match", "student_exact_match", "answer_agreement"):
        assert got[key] == final[key], key
    none = tmp_path / "never_trained"
    assert main(["swiftkv-eval", str(CONFIG), *overrides, "--set", f"trainer.output_dir={none}", *args]) == 2
    assert f"{none}: no trained weights" in capsys.readouterr().err
