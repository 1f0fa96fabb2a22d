"""generalized_jsd_loss in float64 against the definitions: forward KL, reverse KL, the mixture formula."""

from __future__ import annotations

import pytest
import torch
from dense_caption.gkd import generalized_jsd_loss

from arctic_vl import IGNORE_INDEX


def _kl(p: torch.Tensor, q: torch.Tensor) -> torch.Tensor:
    """KL(p || q) per position, from probabilities (the textbook sum, no log-softmax tricks)."""
    return (p * (p.log() - q.log())).sum(-1)


@pytest.fixture
def logits() -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(0)
    s = torch.randn(3, 7, 11, generator=g, dtype=torch.float64) * 2
    t = torch.randn(3, 7, 11, generator=g, dtype=torch.float64) * 2
    labels = torch.randint(0, 11, (3, 7), generator=g)
    labels[0, :3] = IGNORE_INDEX
    labels[2, 5:] = IGNORE_INDEX
    return s, t, labels


def _reference(s, t, labels, beta, temperature):
    ps, pt = torch.softmax(s / temperature, -1), torch.softmax(t / temperature, -1)
    if beta == 0:
        per = _kl(pt, ps)
    elif beta == 1:
        per = _kl(ps, pt)
    else:
        m = beta * pt + (1 - beta) * ps
        per = beta * _kl(pt, m) + (1 - beta) * _kl(ps, m)
    mask = labels != IGNORE_INDEX
    return per[mask].sum() / mask.sum()


@pytest.mark.parametrize("beta", [0.0, 0.1, 0.5, 0.9, 1.0])
@pytest.mark.parametrize("temperature", [1.0, 0.7, 2.0])
def test_matches_the_definitions(logits, beta: float, temperature: float) -> None:
    s, t, labels = logits
    got = generalized_jsd_loss(s, t, labels, beta=beta, temperature=temperature)
    assert got.dtype == torch.float64
    torch.testing.assert_close(got, _reference(s, t, labels, beta, temperature), rtol=1e-12, atol=1e-12)


def test_ends_are_forward_and_reverse_kl(logits) -> None:
    s, t, labels = logits
    mask = labels != IGNORE_INDEX
    ps, pt = torch.softmax(s, -1), torch.softmax(t, -1)
    torch.testing.assert_close(generalized_jsd_loss(s, t, labels, beta=0.0), _kl(pt, ps)[mask].mean(),
                               rtol=1e-12, atol=0)
    torch.testing.assert_close(generalized_jsd_loss(s, t, labels, beta=1.0), _kl(ps, pt)[mask].mean(),
                               rtol=1e-12, atol=0)


def test_ignored_positions_do_not_count_and_no_labels_means_all(logits) -> None:
    s, t, labels = logits
    changed = s.clone()
    changed[labels == IGNORE_INDEX] += 100 * torch.randn_like(changed[labels == IGNORE_INDEX])
    assert generalized_jsd_loss(changed, t, labels) == generalized_jsd_loss(s, t, labels)
    every = torch.zeros_like(labels)
    torch.testing.assert_close(generalized_jsd_loss(s, t), generalized_jsd_loss(s, t, every), rtol=1e-12, atol=0)
    assert float(generalized_jsd_loss(s, t, torch.full_like(labels, IGNORE_INDEX))) == 0.0


@pytest.mark.parametrize("beta", [0.0, 0.5, 1.0])
def test_teacher_equal_to_student_gives_zero(logits, beta: float) -> None:
    s, _, labels = logits
    assert float(generalized_jsd_loss(s, s.clone(), labels, beta=beta)) == pytest.approx(0.0, abs=1e-15)
