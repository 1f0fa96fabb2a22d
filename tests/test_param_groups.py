"""`optimizer.param_groups` end to end from YAML: per-group LRs after warmup, lr 0 freezes, unmatched
parameters are exit 2 naming them, and grouping by part works on PEFT (LoRA) parameter names."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import loguru  # noqa: F401  (imported before any capsys capture: its default sink binds the stderr it sees first)
import pytest
import torch
from safetensors.torch import load_file

from arctic_vl.callbacks.base import Callback
from arctic_vl.registry import CALLBACKS, ComponentConfig
from tests.e2e_utils import write_yaml

# The shared session fixtures: pytest finds fixtures by module-global name (assigned, not imported,
# so ruff's redefinition check accepts the test arguments that use them).

#: output_dir -> per step: {group name: (lr, weight_decay, parameter names)}
RECORDED: dict[str, list[dict[str, tuple[float, float, set[str]]]]] = {}


class RecordConfig(ComponentConfig):
    type: str = "record_param_groups"


@CALLBACKS.register("record_param_groups")
class RecordParamGroups(Callback):
    """Records the optimizer's param groups (as the scheduler has set them) after every step."""

    config_class = RecordConfig

    def on_step_end(self, trainer: Any, info: Any) -> None:
        names = {id(p): n for n, p in trainer.bundle.model.named_parameters()}
        RECORDED.setdefault(str(trainer.output_dir), []).append({
            g["name"]: (g["lr"], g["weight_decay"], {names[id(p)] for p in g["params"]})
            for g in trainer.optimizer.param_groups
        })


def _config(tmp_path: Path, tiny_llava: Path, synthetic_data: Path, model: dict, groups: list[dict]) -> Path:
    return write_yaml(tmp_path / "run.yaml", {
        "model": {"name_or_path": str(tiny_llava), **model},
        "data": {"sources": [{"path": str(synthetic_data / "train.llava.json"), "sample": "first:12"}],
                 "micro_batch_size": 4},
        "trainer": {"output_dir": "out", "max_steps": 3, "progress_bar": False},
        "optimizer": {"lr": 5e-3, "weight_decay": 0.01, "param_groups": groups},
        "scheduler": {"type": "constant", "warmup_steps": 2},
        "callbacks": [{"type": "record_param_groups"}],
    })


def _weights(model_dir: Path) -> dict[str, torch.Tensor]:
    from arctic_vl.models.loading import load_model

    return load_model(model_dir).state_dict()


def test_unmatched_trainable_params_exit_2_naming_them(tiny_llava: Path, synthetic_data: Path, tmp_path: Path, cli):
    config = _config(tmp_path, tiny_llava, synthetic_data, {}, [{"name": "llm", "parts": ["llm"], "lr": 1e-3}])
    rc, _, err = cli("train", str(config))
    assert rc == 2, err[-2000:]
    assert "optimizer.param_groups" in err and "match no group" in err
    assert "model.image_newline" in err or "model.vision_tower." in err
    assert "Traceback" not in err
    assert not (tmp_path / "out" / "metrics.jsonl").exists(), "refused before the first step"


def test_group_lrs_after_warmup_and_lr0_freezes(tiny_llava: Path, synthetic_data: Path, tmp_path: Path):
    from arctic_vl.engine import Engine

    config = _config(tmp_path, tiny_llava, synthetic_data, {}, [
        {"name": "vision", "parts": ["vision"], "lr": 0},
        {"name": "aligner", "parts": ["aligner"], "lr": 1e-3, "weight_decay": 0.1},
        {"name": "llm", "parts": ["llm"], "lr": 2e-3},
    ])
    summary = Engine(config).train()
    steps = RECORDED[str(tmp_path / "out")]
    assert len(steps) == 3
    assert sorted(steps[0]) == ["aligner", "aligner/no_decay", "llm", "llm/no_decay"], "lr 0: no vision group"
    want = {"aligner": (1e-3, 0.1), "aligner/no_decay": (1e-3, 0.0), "llm": (2e-3, 0.01), "llm/no_decay": (2e-3, 0.0)}
    for name, (lr, wd) in want.items():
        assert steps[0][name][0] == pytest.approx(lr * 2 / 3), "after 1 of 2 warmup steps"
        assert steps[1][name][:2] == pytest.approx((lr, wd)), "warmup done"
        assert steps[2][name][:2] == pytest.approx((lr, wd))
    assert "model.multi_modal_projector.linear_1.weight" in steps[0]["aligner"][2]
    assert "model.multi_modal_projector.linear_1.bias" in steps[0]["aligner/no_decay"][2]
    assert "lm_head.weight" in steps[0]["llm"][2]
    # lr 0 froze the vision tower: not in the checkpoint, bit-identical in final/
    saved = load_file(str(Path(summary["checkpoint"]) / "model.safetensors"))
    assert saved and not any(".vision_tower." in k for k in saved)
    base, final = _weights(tiny_llava), _weights(tmp_path / "out" / "final")
    vision = [k for k in base if k.startswith("model.vision_tower.")]
    assert len(vision) > 10 and all(torch.equal(base[k], final[k]) for k in vision)
    for k in ("model.multi_modal_projector.linear_1.weight", "lm_head.weight"):
        assert (base[k] - final[k]).abs().max().item() > 1e-4, f"{k} trained"


def test_param_groups_on_lora_names(tiny_llava: Path, synthetic_data: Path, tmp_path: Path):
    from arctic_vl.engine import Engine

    config = _config(tmp_path, tiny_llava, synthetic_data,
                     {"freeze": ["vision"], "lora": {"r": 2, "alpha": 4, "parts": ["llm"]}}, [
        {"name": "lora_b", "regex": r"\.lora_B\.", "lr": 3e-3},  # first match wins: before the llm part group
        {"name": "llm", "parts": ["llm"], "lr": 2e-3},
        {"name": "aligner", "parts": ["aligner"], "lr": 1e-3},
    ])
    Engine(config).train()
    steps = RECORDED[str(tmp_path / "out")]
    last = steps[-1]
    assert {k: v[0] for k, v in last.items()} == pytest.approx(
        {"lora_b": 3e-3, "llm": 2e-3, "aligner": 1e-3, "aligner/no_decay": 1e-3})
    assert last["lora_b"][2] and all(".lora_B." in n for n in last["lora_b"][2])
    assert last["llm"][2] and all(".lora_A." in n for n in last["llm"][2])
    aligner = last["aligner"][2] | last["aligner/no_decay"][2]
    assert "base_model.model.model.image_newline" in aligner
    assert "base_model.model.model.multi_modal_projector.modules_to_save.default.linear_2.weight" in aligner
    assert sum(len(v[2]) for v in last.values()) == 2 * 7 * 2 + 5, "every trainable parameter in one group"


def test_adamw_is_fused_on_cpu_by_default_with_the_loop_update():
    """The default AdamW takes torch's fused kernel on CPU (`optimizer.fused: false` keeps the per-tensor loop);
    both make the same update, weight decay and no-decay groups included."""
    from arctic_vl.optim.optimizers import AdamW, AdamWConfig

    def run(fused: bool | None) -> tuple[torch.optim.Optimizer, list[torch.Tensor]]:
        g = torch.Generator().manual_seed(0)
        weights = [torch.randn(16, 8, generator=g).requires_grad_(), torch.randn(8, generator=g).requires_grad_()]
        groups = [{"params": weights[:1], "weight_decay": 0.1}, {"params": weights[1:], "weight_decay": 0.0}]
        opt = AdamW(AdamWConfig(lr=1e-2, weight_decay=0.1, fused=fused)).build(groups)
        for _ in range(5):
            for w in weights:
                w.grad = torch.randn(w.shape, generator=g)
            opt.step()
        return opt, weights

    default, w_default = run(None)
    loop, w_loop = run(False)
    assert default.defaults["fused"] is True and not loop.defaults["fused"]
    for a, b in zip(w_default, w_loop, strict=True):
        torch.testing.assert_close(a, b, rtol=0, atol=1e-6)
        assert not torch.equal(a, torch.zeros_like(a))
