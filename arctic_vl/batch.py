"""The batch contract: what a trainer's `loss(model, batch)` receives, and how a step is normalised.

A batch is a plain dict (what the data factory's collator returns, moved to the device by the loop). Keys
that start with `_` are bookkeeping: the loop and the trainer read them, the model never sees them
(`model_inputs(batch)` drops them together with `labels`).

Normalisation: the loss of an optimizer step is `sum over micro-batches of LossOutput.loss_sum` divided by
`StepCounts.units`, the trainer's `count(batch)` summed over every micro-batch of the step on every process
(counted before the first forward). A trainer with a second normaliser returns it from `step_counts(micro)`;
the loop sums it over processes the same way and passes the global values to `loss(..., counts=...)`.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, TypedDict

if TYPE_CHECKING:
    import torch

#: bookkeeping keys the collators add (never model inputs)
INDICES = "_indices"
NUM_SAMPLES = "_num_samples"
NUM_TOKENS = "_num_tokens"
NUM_SLOTS = "_num_slots"
DROPPED = "_dropped"
BOOKKEEPING_KEYS: tuple[str, ...] = (INDICES, NUM_SAMPLES, NUM_TOKENS, NUM_SLOTS, DROPPED)


class Batch(TypedDict, total=False):
    """One micro-batch as `Trainer.loss` receives it (B rows of T tokens; tensors on the training device).

    Text (always):
        input_ids (B, T) int64: token ids, right-padded with the tokenizer's pad id.
        labels (B, T) int64: UNSHIFTED: `labels[b, t]` is the token at position t when it is trained, else
            `IGNORE_INDEX` (-100): prompt, padding, image tokens. The loss predicts `labels[:, 1:]` from
            positions `:-1` (`label_positions`, `lm_loss_sum` do the shift). Exactly the assistant tokens
            and each assistant turn's end-of-turn token are trained.
        attention_mask (B, T) int64: 1 real token, 0 padding. Absent in a packed batch.
        position_ids: packed batches only: (B, T) int64 positions restarting at 0 per sample, or for the
            Qwen families (4, B, T): row 0 those text positions, rows 1-3 the per-sample mRoPE t/h/w.
        mm_token_type_ids (B, T) int64: Qwen families: 1 at image tokens, 0 elsewhere.
    Vision (only when some sample of the batch has an image; in sample order):
        pixel_values: LLaVA (images, tiles, 3, H, W) float; Qwen (patches, 3 * temporal * P * P) float.
        image_sizes (images, 2) int64: LLaVA (height, width) of each original image.
        image_grid_thw (images, 3) int64: Qwen (t, h, w) grid of each image, in patches.
        batch_num_images (B,) int64: LLaVA-OneVision's images per sample.
    Bookkeeping (plain Python values, never given to the model):
        _indices list[int]: dataset index of each sample; -1 is a padding sample that trains nothing (a
            rank whose share of the epoch's last global batch is empty gets one).
        _num_samples int: real samples in the batch.
        _num_tokens int: real (non-padding) tokens of real samples.
        _num_slots int: packed batches only: rows x max_length (for the packing efficiency).
        _dropped list[tuple[str, int, str, str]]: only when samples of the batch turned out bad as they were
            loaded (pixels that do not decode): (source, record index, reason, message) of each. They are not in
            the batch (a batch that lost them all is one padding sample); `DataBundle.accept` applies
            `on_bad_record` to them before the loop uses the batch.
    """

    input_ids: torch.Tensor
    labels: torch.Tensor
    attention_mask: torch.Tensor
    position_ids: torch.Tensor
    mm_token_type_ids: torch.Tensor
    pixel_values: torch.Tensor
    image_sizes: torch.Tensor
    image_grid_thw: torch.Tensor
    batch_num_images: torch.Tensor
    _indices: list[int]
    _num_samples: int
    _num_tokens: int
    _num_slots: int
    _dropped: list[tuple[str, int, str, str]]


@dataclass(frozen=True)
class StepCounts:
    """The global normalisers of the optimizer step being computed, summed over all micro-batches and processes.

    `units`: the sum of `Trainer.count(batch)` (label tokens for the LM loss): the loop divides the step's
    summed `loss_sum` by it. `extra`: the trainer's own normalisers from `Trainer.step_counts(micro)`, by name.
    Evaluation calls `loss` batch by batch, each with that batch's own counts.
    """

    units: float
    extra: dict[str, float] = field(default_factory=dict)

    def __getitem__(self, name: str) -> float:
        """`counts["units"]` or one of the trainer's extra normalisers by name."""
        if name == "units":
            return self.units
        return self.extra[name]

    def get(self, name: str, default: Any = None) -> Any:
        """Like `dict.get` over `units` and the extra normalisers."""
        try:
            return self[name]
        except KeyError:
            return default
