"""Teacher and student spans of the LM labels: every assistant turn but the last is teacher, the last is student.

The core's encoder trains exactly the assistant tokens and each assistant turn's end-of-turn token; between two
assistant turns there is always an untrained stretch (the next turn's role header), so the k-th contiguous run of
labels is the k-th assistant turn. A run count below the number of assistant turns means `data.max_length` cut
the conversation before its last turn: it has no student span.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from arctic_vl import IGNORE_INDEX

NONE, TEACHER, STUDENT = 0, 1, 2


def label_runs(labels: Sequence[int]) -> list[tuple[int, int]]:
    """[start, end) of each contiguous run of trained labels."""
    runs, start = [], None
    for i, label in enumerate(labels):
        if label != IGNORE_INDEX and start is None:
            start = i
        elif label == IGNORE_INDEX and start is not None:
            runs.append((start, i))
            start = None
    if start is not None:
        runs.append((start, len(labels)))
    return runs


def span_ids(labels: Sequence[int], assistant_turns: int) -> list[int]:
    """Per token: TEACHER (1) on teacher-turn labels, STUDENT (2) on the last turn's, NONE (0) elsewhere."""
    runs = label_runs(labels)
    if len(runs) > assistant_turns:
        raise ValueError(f"{len(runs)} trained spans for {assistant_turns} assistant turns: the chat template "
                         "splits an assistant turn; teacher/student spans cannot be told apart")
    out = [NONE] * len(labels)
    for k, (start, end) in enumerate(runs):
        kind = STUDENT if k == assistant_turns - 1 else TEACHER
        out[start:end] = [kind] * (end - start)
    return out


def span_labels(labels: torch.Tensor, spans: torch.Tensor, kind: int) -> torch.Tensor:
    """`labels` with every position outside the `kind` span set to IGNORE_INDEX."""
    return torch.where(spans == kind, labels, torch.full_like(labels, IGNORE_INDEX))
