"""`sft`: supervised fine-tuning with the memory-lean LM loss."""

from __future__ import annotations

from typing import Any

import torch

from arctic_vl.batch import StepCounts
from arctic_vl.models.forward import final_hidden
from arctic_vl.registry import TRAINERS
from arctic_vl.trainers.base import LossOutput, Trainer, TrainerConfig
from arctic_vl.trainers.loss import lm_loss_sum


@TRAINERS.register("sft")
class SFTTrainer(Trainer):
    """Next-token cross entropy on the assistant tokens (labels), averaged over the step's label tokens."""

    config_class = TrainerConfig

    def loss(self, model: torch.nn.Module, batch: dict[str, Any], counts: StepCounts) -> LossOutput:
        """Summed next-token cross entropy over the label tokens (memory-lean, in chunks of `loss_chunk_size`)."""
        hidden, head, _ = final_hidden(model, batch)
        loss_sum, n = lm_loss_sum(hidden, head, batch["labels"], self.config.loss_chunk_size)
        return LossOutput(loss_sum, n)
