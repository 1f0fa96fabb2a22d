"""`scheduler.phases`: per-part LR factors over spans of the run (issue 19 item 5): the LR of each group per
step, validation naming the phase and field, LR 0 that moves no weight (weight decay included), the per-group
LRs in metrics.jsonl."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from pydantic import ValidationError

from arctic_vl.errors import ConfigError
from arctic_vl.optim.schedulers import Constant, Cosine, LRPhase, SchedulerConfig
from tests.e2e_utils import read_metrics, write_yaml


def _optimizer(fused: bool = False) -> tuple[torch.optim.Optimizer, list[torch.nn.Parameter]]:
    torch.manual_seed(0)
    params = [torch.nn.Parameter(torch.randn(3, 4)) for _ in range(3)]
    groups = [{"params": [params[0]], "lr": 1.0, "name": "vision", "parts": ["vision"], "weight_decay": 0.1},
              {"params": [params[1]], "lr": 2.0, "name": "llm", "parts": ["llm"], "weight_decay": 0.1},
              {"params": [params[2]], "lr": 4.0, "name": "head", "parts": ["detection", "adapter"],
               "weight_decay": 0.1}]
    return torch.optim.AdamW(groups, lr=1.0, weight_decay=0.1, fused=fused or None), params


def _lrs(scheduler, optimizer, steps: int) -> list[list[float]]:
    out = []
    for _ in range(steps):
        out.append([g["lr"] for g in optimizer.param_groups])
        optimizer.step()
        scheduler.step()
    return out


def test_phases_multiply_each_groups_scheduled_lr_over_their_spans():
    opt, _ = _optimizer()
    phases = [{"parts": ["vision"], "until_epoch": 1, "lr_factor": 0},  # epoch 1 starts at step 3
              {"parts": ["llm"], "from": 0.75, "lr_factor": 0.1},  # steps int(0.75 * 8) = 6 and 7
              {"parts": ["head"], "from_step": 2, "until_step": 4, "lr_factor": 0.5},  # by group name
              {"parts": ["llm"], "from_epoch": 2, "until": 0.875, "lr_factor": 3}]  # step 6 only: factors multiply
    sched = Constant(SchedulerConfig(type="constant", phases=phases)).build(opt, 8, epoch_start=lambda k: 3 * k)
    got = _lrs(sched, opt, 8)
    assert [s[0] for s in got] == [0, 0, 0, 1, 1, 1, 1, 1]
    assert [s[1] for s in got] == pytest.approx([2, 2, 2, 2, 2, 2, 2 * 0.1 * 3, 2 * 0.1])
    assert [s[2] for s in got] == [4, 4, 2, 2, 4, 4, 4, 4]
    # over a decaying schedule the factor multiplies that step's scheduled LR
    opt, _ = _optimizer()
    cos = Cosine(SchedulerConfig(phases=[{"parts": ["llm"], "from": 0.5, "lr_factor": 0.1}]))
    got = _lrs(cos.build(opt, 4), opt, 4)
    assert [s[1] for s in got] == pytest.approx([2 * cos.factor(i, 4) * (0.1 if i >= 2 else 1) for i in range(4)])
    assert [s[0] for s in got] == pytest.approx([cos.factor(i, 4) for i in range(4)])


def test_a_phase_is_validated_naming_its_field():
    phase = LRPhase.model_validate({"parts": ["llm"], "from": 0.75, "lr_factor": 0.1})
    assert phase.model_dump()["from"] == 0.75 and LRPhase.model_validate(phase.model_dump()) == phase  # as in YAML
    with pytest.raises(ValidationError, match="give one start, not from and from_step"):
        LRPhase.model_validate({"parts": ["llm"], "from": 0.5, "from_step": 3, "lr_factor": 0})
    with pytest.raises(ValidationError, match=r"from_epoch \(2\) must be before until_epoch \(1\)"):
        LRPhase.model_validate({"parts": ["llm"], "from_epoch": 2, "until_epoch": 1, "lr_factor": 0})
    with pytest.raises(ValidationError, match="give a start"):
        LRPhase.model_validate({"parts": ["llm"], "lr_factor": 0})
    with pytest.raises(ValidationError, match="lr_factor"):
        LRPhase.model_validate({"parts": ["llm"], "from": 0.5, "lr_factor": -1})
    with pytest.raises(ValidationError, match="from"):
        LRPhase.model_validate({"parts": ["llm"], "from": 1.5, "lr_factor": 0})
    opt, _ = _optimizer()
    with pytest.raises(ConfigError, match=r"scheduler.phases\[0\].parts: optimizer parameter group 'head' holds "
                       r"parts adapter, detection, only some of them in the phase \(detection\); give detection "
                       "its own optimizer.param_groups entry"):
        Constant(SchedulerConfig(phases=[{"parts": ["detection"], "from": 0.5, "lr_factor": 0}])).build(opt, 4)
    with pytest.raises(ConfigError, match=r"scheduler.phases\[1\].parts: aligner match no optimizer parameter "
                       "group with trainable parameters"):
        Constant(SchedulerConfig(phases=[{"parts": ["llm"], "from": 0.5, "lr_factor": 0},
                                         {"parts": ["aligner"], "from": 0.5, "lr_factor": 0}])).build(opt, 4)
    with pytest.raises(ConfigError, match=r"scheduler.phases\[0\].until_epoch: this trainer cannot map epochs"):
        Constant(SchedulerConfig(phases=[{"parts": ["llm"], "until_epoch": 1, "lr_factor": 0}])).build(opt, 4)


@pytest.mark.parametrize("fused", [False, True])
def test_lr_factor_0_moves_no_weight_and_weight_decay_neither(fused):
    """AdamW at LR 0 with weight decay 0.1: the frozen group's weights stay bit for bit; after the phase they move."""
    opt, params = _optimizer(fused)
    sched = Constant(SchedulerConfig(phases=[{"parts": ["vision"], "until_step": 3, "lr_factor": 0}])).build(opt, 5)
    start = [p.detach().clone() for p in params]
    for step in range(5):
        for p in params:
            p.grad = torch.randn_like(p)
        opt.step()
        sched.step()
        if step < 2:
            assert torch.equal(params[0], start[0]), step
            assert not torch.equal(params[1], start[1])
    assert not torch.equal(params[0], start[0])


def test_unknown_phase_part_is_exit_2_naming_the_file_and_field(tiny_llava: Path, tmp_path: Path, cli,
                                                               synthetic_data: Path):
    cfg = {"model": {"name_or_path": str(tiny_llava)},
           "data": {"sources": [str(synthetic_data / "train.llava.json")]},
           "optimizer": {"param_groups": [{"name": "towers", "parts": ["vision", "aligner"]},
                                          {"name": "lm", "parts": ["llm"]}]},
           "scheduler": {"phases": [{"parts": ["towers"], "until": 0.5, "lr_factor": 0},
                                    {"parts": ["decoder"], "from": 0.5, "lr_factor": 0.1}]}}
    code, _, err = cli("validate", str(write_yaml(tmp_path / "run.yaml", cfg)))
    assert code == 2 and "Traceback" not in err
    assert "run.yaml" in err and "scheduler.phases[1].parts[0]: 'decoder' is neither a part" in err, err
    assert "towers, lm" in err
    cfg["scheduler"]["phases"][0] = {"parts": ["towers"], "until": 0.5, "from": 0.6, "lr_factor": 0}
    code, _, err = cli("validate", str(write_yaml(tmp_path / "run.yaml", cfg)))
    assert code == 2 and "run.yaml:20: scheduler.phases[0].from: from (0.6) must be before until (0.5)" in err, err


def test_group_lrs_per_step_in_metrics(tiny_llava: Path, synthetic_data: Path, tmp_path: Path):
    from arctic_vl import Engine

    cfg = {"model": {"name_or_path": str(tiny_llava)},
           "data": {"sources": [{"path": str(synthetic_data / "train.llava.json"), "sample": "first:8"}],
                    "micro_batch_size": 2},
           "trainer": {"output_dir": str(tmp_path / "out"), "max_steps": 4, "progress_bar": False},
           "optimizer": {"lr": 1e-3, "param_groups": [{"name": "towers", "parts": ["vision", "aligner"]},
                                                      {"name": "lm", "parts": ["llm"], "lr": 2e-3}]},
           "scheduler": {"type": "constant",
                         "phases": [{"parts": ["vision", "aligner"], "until_step": 1, "lr_factor": 0},
                                    {"parts": ["lm"], "from": 0.75, "lr_factor": 0.1}]},
           "checkpoint": {"every_n_steps": None, "export_final": False}}
    Engine(write_yaml(tmp_path / "run.yaml", cfg)).train()
    m = read_metrics(tmp_path / "out")
    assert [x["lr/towers"] for x in m] == [0, 1e-3, 1e-3, 1e-3]
    assert [x["lr/lm"] for x in m] == pytest.approx([2e-3, 2e-3, 2e-3, 2e-4])
