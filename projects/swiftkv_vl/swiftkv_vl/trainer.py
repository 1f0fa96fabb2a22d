"""`swiftkv_vl` trainer: distil the teacher (SwiftKV off) into the SwiftKV student (SwiftKV on) of the same model.

Per token t of sample s (DESIGN.md)::

    w_s * ( T^2 * KL(p_teacher(t)/T || p_student(t)/T) + hidden_loss_mult * MSE(h_student(t), h_teacher(t)) )

with w_s = vision_loss_weight for a sample with an image, text_loss_weight otherwise. KL is averaged over the
label tokens of the whole accumulated batch (all micro-batches of the step, all processes), the MSE over its
non-padding tokens. The core loop divides `loss_sum` by the global `count` (label tokens); the MSE sum is
rescaled by (global label tokens / global non-padding tokens), both summed over the step before the first
forward by the loop (`step_counts` -> the `counts` argument of `loss`), so both averages are exact.
"""

from __future__ import annotations

from typing import Any

import torch
from pydantic import Field

from arctic_vl import INDICES, TRAINERS, LossOutput, StepCounts, Trainer, TrainerConfig, final_hidden, unwrap_peft

#: the step_counts name of the MSE normaliser
HIDDEN_TOKENS = "hidden_tokens"


class SwiftKVTrainerConfig(TrainerConfig):
    """The `trainer:` section of `swiftkv_vl`: the core trainer options plus the distillation loss settings."""

    type: str = "swiftkv_vl"
    temperature: float = Field(2.0, gt=0, description="distillation temperature T (KL of softened distributions x T^2)")
    hidden_loss_mult: float = Field(1.0, ge=0, description="weight of the hidden-state MSE term (0: KL only)")
    hidden_loss_layer: int = Field(
        -1, description="index into the language model's hidden states for the MSE: 0 = embeddings, i = output of "
                        "layer i-1, L (or -1) = the final normed output; must be after num_key_value_layers "
                        "(M+1..L, or -(L-M)..-1): earlier layers are the frozen teacher's"
    )
    vision_loss_weight: float = Field(1.0, ge=0, description="w_s of samples with an image")
    text_loss_weight: float = Field(1.0, ge=0, description="w_s of text-only samples")
    ce_metrics: bool = Field(True, description="log the student's and the teacher's cross entropy on the labels "
                             "(temperature 1) each step: `student_ce`, `teacher_ce` and their gap `ce_gap`, per "
                             "label token of the step (one more no-grad logits pass per chunk each)")


def real_token_mask(batch: dict[str, Any]) -> torch.Tensor:
    """(B, T) bool: non-padding tokens of real samples (a rank's padding sample, index -1, counts nothing)."""
    ids = batch["input_ids"]
    mask = batch["attention_mask"].bool() if "attention_mask" in batch else torch.ones_like(ids, dtype=torch.bool)
    indices = batch.get(INDICES)
    if indices is not None and len(indices) == ids.shape[0]:  # one sample per row (packing is refused)
        real = torch.tensor([i != -1 for i in indices], dtype=torch.bool, device=ids.device)
        mask = mask & real[:, None]
    return mask


@TRAINERS.register("swiftkv_vl")
class SwiftKVTrainer(Trainer):
    """Teacher pass (SwiftKV off, eval mode, no grad) and student pass (SwiftKV on) on each micro-batch."""

    config_class = SwiftKVTrainerConfig
    config: SwiftKVTrainerConfig

    @property
    def image_token_id(self) -> int:
        """The processor's image token id."""
        return int(self.bundle.processor.image_token_id)

    def step_counts(self, micro: list[dict[str, Any]]) -> dict[str, float]:
        """The MSE normaliser: non-padding tokens of the step's micro-batches on this process."""
        return {HIDDEN_TOKENS: float(sum(int(real_token_mask(b).sum()) for b in micro))}

    def has_image(self, batch: dict[str, Any]) -> torch.Tensor:
        """(B,) bool: the sample's input_ids hold the image token."""
        return (batch["input_ids"] == self.image_token_id).any(-1)

    def _passes(self, model: torch.nn.Module, batch: dict[str, Any], want_mid: bool) -> tuple[Any, ...]:
        from . import set_swiftkv

        hf = unwrap_peft(model)
        kwargs = {"output_hidden_states": True} if want_mid else {}
        was_training = hf.training
        try:
            set_swiftkv(hf, False)  # the model with SwiftKV off IS the teacher, exactly
            hf.eval()
            with torch.no_grad():
                t_hidden, _, t_out = final_hidden(hf, batch, **kwargs)
        finally:
            set_swiftkv(hf, True)
            hf.train(was_training)
        s_hidden, head, s_out = final_hidden(hf, batch, **kwargs)
        t_mid = s_mid = None
        if want_mid:
            layer = self.config.hidden_loss_layer
            t_mid, s_mid = t_out.hidden_states[layer], s_out.hidden_states[layer]
        return s_hidden, t_hidden.detach(), head, s_mid, t_mid

    def loss(self, model: torch.nn.Module, batch: dict[str, Any], counts: StepCounts) -> LossOutput:
        """Distillation loss sum: KL to the teacher over label tokens (x T^2), plus the weighted hidden-state MSE."""
        from .loss import swiftkv_distill_loss_sums

        cfg = self.config
        want_mid = cfg.hidden_loss_mult > 0
        s_hidden, t_hidden, head, s_mid, t_mid = self._passes(model, batch, want_mid)
        image = self.has_image(batch)
        weight = torch.where(image, cfg.vision_loss_weight, cfg.text_loss_weight).float()
        sums = swiftkv_distill_loss_sums(
            s_hidden, t_hidden, head, batch["labels"], real_token_mask(batch), weight,
            temperature=cfg.temperature, student_mid=s_mid, teacher_mid=t_mid, has_image=image,
            chunk_size=cfg.loss_chunk_size, with_ce=cfg.ce_metrics,
        )
        label_tokens = float(sums["label_tokens"])
        loss_sum = sums["kl_sum"]
        if want_mid:
            # the step's global label and non-padding tokens (in evaluation: this batch's own)
            labels_all, hidden_all = counts.units, counts[HIDDEN_TOKENS]
            loss_sum = loss_sum + cfg.hidden_loss_mult * sums["mse_sum"] * (labels_all / max(hidden_all, 1.0))
        metrics: dict[str, tuple[float, float]] = {}
        for split in ("", "_image", "_text"):
            metrics[f"kl{split}"] = (float(sums[f"kl_sum{split}"].detach()), float(sums[f"label_tokens{split}"]))
            if want_mid:
                metrics[f"hidden_mse{split}"] = (float(sums[f"mse_sum{split}"].detach()),
                                                 float(sums[f"hidden_tokens{split}"]))
        if cfg.ce_metrics:  # student vs teacher on the task itself, beside the distillation terms
            s_ce, t_ce = float(sums["student_ce_sum"]), float(sums["teacher_ce_sum"])
            metrics.update(student_ce=(s_ce, label_tokens), teacher_ce=(t_ce, label_tokens),
                           ce_gap=(s_ce - t_ce, label_tokens))
        return LossOutput(loss_sum, int(label_tokens), metrics)
