"""swiftkv_distill_loss_sums against a naive full-logits reference."""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path

if importlib.util.find_spec("swiftkv_vl") is None:  # running from a checkout without the plugin installed
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import pytest
import torch
import torch.nn.functional as F
from swiftkv_vl.loss import swiftkv_distill_loss_sums

from arctic_vl import IGNORE_INDEX

torch.set_num_threads(1)

B, T, D, V = 3, 9, 16, 50
TEMP = 2.0


def _batch(seed: int = 0) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    labels = torch.randint(0, V, (B, T), generator=g)
    labels[0, :4] = IGNORE_INDEX  # prompt
    labels[2, :] = IGNORE_INDEX
    labels[2, 5:7] = torch.tensor([3, 4])
    attention_mask = torch.ones(B, T, dtype=torch.long)
    attention_mask[1, -3:] = 0  # right padding
    labels[1, -3:] = IGNORE_INDEX
    return {
        "student_hidden": torch.randn(B, T, D, generator=g),
        "teacher_hidden": torch.randn(B, T, D, generator=g),
        "lm_head_weight": torch.randn(V, D, generator=g) * 0.5,
        "labels": labels,
        "attention_mask": attention_mask,
        "sample_weight": torch.tensor([1.0, 0.5, 2.0]),
        "student_mid": torch.randn(B, T, D, generator=g),
        "teacher_mid": torch.randn(B, T, D, generator=g),
        "has_image": torch.tensor([True, False, True]),
    }


def _reference(b: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Full (B, T, V) logits, F.kl_div per token, explicit loops over the masks."""
    s_logits = b["student_hidden"] @ b["lm_head_weight"].T
    t_logits = (b["teacher_hidden"] @ b["lm_head_weight"].T).detach()  # the teacher is a target, not trained
    kl_tok = (
        F.kl_div(
            F.log_softmax(s_logits / TEMP, -1),
            F.log_softmax(t_logits / TEMP, -1),
            reduction="none",
            log_target=True,
        ).sum(-1)
        * TEMP**2
    )  # (B, T)
    mse_tok = ((b["student_mid"] - b["teacher_mid"]) ** 2).mean(-1)
    out = {k: torch.zeros(()) for k in ("kl_image", "kl_text", "mse_image", "mse_text")}
    counts = {k: 0 for k in ("lab_image", "lab_text", "hid_image", "hid_text")}
    for s in range(B):
        kind = "image" if b["has_image"][s] else "text"
        w = b["sample_weight"][s]
        for t in range(T):
            if t + 1 < T and b["labels"][s, t + 1] != IGNORE_INDEX:
                out[f"kl_{kind}"] = out[f"kl_{kind}"] + w * kl_tok[s, t]
                counts[f"lab_{kind}"] += 1
            if b["attention_mask"][s, t]:
                out[f"mse_{kind}"] = out[f"mse_{kind}"] + w * mse_tok[s, t]
                counts[f"hid_{kind}"] += 1
    return {
        "kl_sum": out["kl_image"] + out["kl_text"],
        "kl_sum_image": out["kl_image"],
        "kl_sum_text": out["kl_text"],
        "mse_sum": out["mse_image"] + out["mse_text"],
        "mse_sum_image": out["mse_image"],
        "mse_sum_text": out["mse_text"],
        "label_tokens": torch.tensor(float(counts["lab_image"] + counts["lab_text"])),
        "label_tokens_image": torch.tensor(float(counts["lab_image"])),
        "label_tokens_text": torch.tensor(float(counts["lab_text"])),
        "hidden_tokens": torch.tensor(float(counts["hid_image"] + counts["hid_text"])),
        "hidden_tokens_image": torch.tensor(float(counts["hid_image"])),
        "hidden_tokens_text": torch.tensor(float(counts["hid_text"])),
    }


def _call(b: dict[str, torch.Tensor], chunk_size: int = 1024) -> dict[str, torch.Tensor]:
    return swiftkv_distill_loss_sums(
        b["student_hidden"],
        b["teacher_hidden"],
        b["lm_head_weight"],
        b["labels"],
        b["attention_mask"],
        b["sample_weight"],
        temperature=TEMP,
        student_mid=b["student_mid"],
        teacher_mid=b["teacher_mid"],
        has_image=b["has_image"],
        chunk_size=chunk_size,
    )


@pytest.mark.parametrize("chunk_size", [1, 4, 1024])
def test_matches_full_logits_reference(chunk_size):
    b = _batch()
    ref, got = _reference(b), _call(b, chunk_size)
    assert set(got) == set(ref)
    for key in ref:
        assert abs(got[key].item() - ref[key].item()) < 1e-4 * max(1.0, abs(ref[key].item())), key
    # counts by hand: sample 0 labels at t=4..8 -> positions 3..7 (5); sample 1: t=1..5 (5); sample 2: t=5,6 (2)
    assert (got["label_tokens"].item(), got["label_tokens_image"].item()) == (12.0, 7.0)
    assert (got["hidden_tokens"].item(), got["hidden_tokens_text"].item()) == (24.0, 6.0)
    assert got["kl_sum"].item() > 0 and got["mse_sum"].item() > 0


def test_gradients_match_reference():
    b = _batch(1)
    grads = []
    for fn in (_reference, lambda x: _call(x, chunk_size=5)):
        leaves = {
            k: b[k].clone().requires_grad_(True) for k in ("student_hidden", "lm_head_weight", "student_mid")
        }
        out = fn({**b, **leaves})
        (out["kl_sum"] / out["label_tokens"] + 0.7 * out["mse_sum"] / out["hidden_tokens"]).backward()
        grads.append({k: v.grad for k, v in leaves.items()})
    for k in grads[0]:
        assert (grads[0][k] - grads[1][k]).abs().max().item() < 1e-5, k
        assert grads[0][k].abs().sum().item() > 0


def test_padding_and_unlabelled_tokens_do_not_change_it():
    b = _batch(2)
    base = _call(b)
    # Garbage at positions that are neither scored by KL (next label is IGNORE_INDEX) nor by MSE (padding).
    changed = {k: v.clone() for k, v in b.items()}
    for key in ("student_hidden", "teacher_hidden", "student_mid", "teacher_mid"):
        changed[key][1, -3:] = 1e3  # padding of sample 1 (and its last real token's successor)
    changed["student_hidden"][0, :3] = -1e3  # sample 0, t=0..2 predict prompt tokens (labels IGNORE_INDEX)
    changed["teacher_hidden"][0, 8] = 1e3  # last position predicts nothing
    # Extra right padding for every sample: unlabelled, masked.
    pad = 4
    for key in ("student_hidden", "teacher_hidden", "student_mid", "teacher_mid"):
        changed[key] = torch.cat([changed[key], torch.randn(B, pad, D) * 1e3], dim=1)
    changed["labels"] = torch.cat([changed["labels"], torch.full((B, pad), IGNORE_INDEX)], dim=1)
    changed["attention_mask"] = torch.cat(
        [changed["attention_mask"], torch.zeros(B, pad, dtype=torch.long)], 1
    )
    got = _call(changed)
    for key in base:
        assert abs(got[key].item() - base[key].item()) < 1e-5 * max(1.0, abs(base[key].item())), key


def test_sums_over_micro_batches_give_the_token_average_of_the_whole_batch():
    """Normalising accumulated sums once == the per-token mean over the concatenated batch."""
    b = _batch(3)
    full = _call(b)
    parts = [_call({k: v if k == "lm_head_weight" else v[i : i + 1] for k, v in b.items()}) for i in range(B)]
    for key in ("kl_sum", "mse_sum", "label_tokens", "hidden_tokens", "kl_sum_image", "mse_sum_text"):
        assert abs(sum(p[key] for p in parts).item() - full[key].item()) < 1e-4
    per_token_mean = full["kl_sum"] / full["label_tokens"]
    naive_mean_of_means = sum(p["kl_sum"] / p["label_tokens"] for p in parts) / B
    assert abs(per_token_mean.item() - naive_mean_of_means.item()) > 1e-3  # the two really differ here


def test_defaults_and_errors():
    b = _batch(4)
    got = swiftkv_distill_loss_sums(
        b["student_hidden"],
        b["teacher_hidden"],
        b["lm_head_weight"],
        b["labels"],
        None,
        None,
        temperature=1.0,
    )
    assert got["mse_sum"].item() == 0.0 and got["hidden_tokens"].item() == 0.0
    assert got["kl_sum_image"].item() == 0.0 and got["kl_sum_text"].item() == got["kl_sum"].item()
    same = swiftkv_distill_loss_sums(
        b["student_hidden"],
        b["student_hidden"],
        b["lm_head_weight"],
        b["labels"],
        None,
        None,
        temperature=1.0,
    )
    assert abs(same["kl_sum"].item()) < 1e-5  # KL(p || p) = 0
    with pytest.raises(ValueError, match="temperature"):
        swiftkv_distill_loss_sums(
            b["student_hidden"],
            b["teacher_hidden"],
            b["lm_head_weight"],
            b["labels"],
            None,
            None,
            temperature=0.0,
        )
