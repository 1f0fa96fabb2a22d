"""The memory-lean LM loss equals the full-logits loss (values and gradients), and bench/memory.py runs."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from arctic_vl import final_hidden
from arctic_vl.trainers import loss as loss_mod
from tests.e2e_utils import REPO, subprocess_env


def _tiny_model() -> torch.nn.Module:
    from transformers import AutoModelForImageTextToText

    from arctic_vl.models.tiny import tiny_config

    torch.manual_seed(0)
    return AutoModelForImageTextToText.from_config(tiny_config("llava_next", vocab_size=1024)).eval()


def _batch() -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(10, 1000, (2, 40), generator=g)
    labels = ids.clone()
    labels[0, :25] = -100  # a prompt, then the answer
    labels[1, :10] = -100
    labels[1, 30:] = -100  # padding at the end
    mask = torch.ones_like(ids)
    mask[1, 30:] = 0
    return {"input_ids": ids, "attention_mask": mask, "labels": labels}


def _loss_and_grads(
    model: torch.nn.Module, batch: dict, lean: bool, chunk: int
) -> tuple[float, dict[str, torch.Tensor]]:
    model.zero_grad(set_to_none=True)
    if lean:
        hidden, head, _ = final_hidden(model, batch)
        total, n = loss_mod.lm_loss_sum(hidden, head, batch["labels"], chunk)
    else:
        logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
        total = F.cross_entropy(logits[:, :-1].flatten(0, 1).float(), batch["labels"][:, 1:].flatten(),
                                ignore_index=-100, reduction="sum")
        n = loss_mod.count_label_tokens(batch["labels"])
    (total / n).backward()
    return float(total.detach() / n), {k: p.grad.clone() for k, p in model.named_parameters() if p.grad is not None}


@pytest.mark.parametrize("threshold, chunk", [(loss_mod.LEAN_THRESHOLD, 2048), (0, 16)],
                         ids=["small-unchunked", "chunked-recompute"])
def test_lean_loss_and_grads_equal_full(monkeypatch: pytest.MonkeyPatch, threshold: int, chunk: int):
    monkeypatch.setattr(loss_mod, "LEAN_THRESHOLD", threshold)  # 0: force the chunked, recomputed path
    model, batch = _tiny_model(), _batch()
    assert loss_mod.count_label_tokens(batch["labels"]) == 15 + 20
    full_loss, full_grads = _loss_and_grads(model, batch, lean=False, chunk=chunk)
    lean_loss, lean_grads = _loss_and_grads(model, batch, lean=True, chunk=chunk)
    assert abs(full_loss - lean_loss) <= 1e-5
    assert sorted(full_grads) == sorted(lean_grads) and "lm_head.weight" in lean_grads
    worst = max((full_grads[k] - lean_grads[k]).abs().max().item() for k in full_grads)
    assert worst <= 1e-5, worst
    assert full_grads["lm_head.weight"].abs().max().item() > 1e-4, "gradients are not trivially zero"


def test_bench_memory_smoke():
    proc = subprocess.run([sys.executable, str(REPO / "bench" / "memory.py"), "--vocab", "4096", "--tokens", "128",
                           "--chunk", "32", "64"], capture_output=True, text=True, timeout=240, env=subprocess_env(),
                          cwd=Path(REPO))
    assert proc.returncode == 0, proc.stderr[-3000:]
    peaks = [float(x) for x in re.findall(r"peak ([0-9.]+) MiB", proc.stdout)]
    losses = [float(x) for x in re.findall(r"loss ([0-9.]+)", proc.stdout)]
    ratios = {int(c): float(r) for c, r in re.findall(r"^chunk (\d+): ratio=([0-9.]+)", proc.stdout, re.M)}
    assert len(peaks) == 3 and all(p > 0 for p in peaks), proc.stdout  # full, then lean at each chunk size
    assert max(losses) - min(losses) <= 1e-4, "every side computes the same loss"
    assert ratios.keys() == {32, 64}
    assert ratios[32] == pytest.approx(peaks[1] / peaks[0], rel=0.02)  # peaks are printed rounded
    assert ratios[64] == pytest.approx(peaks[2] / peaks[0], rel=0.02)
