"""GKD: generalized knowledge distillation from a frozen teacher, with optional on-policy completions.

Divergence (TRL's convention): with P_T, P_S the teacher's and student's next-token distributions (logits
divided by `temperature` before the softmax),

    beta = 0:       KL(P_T || P_S)                                  (forward KL)
    beta = 1:       KL(P_S || P_T)                                  (reverse KL)
    0 < beta < 1:   beta KL(P_T || M) + (1 - beta) KL(P_S || M),    M = beta P_T + (1 - beta) P_S

(not continuous at the ends: as beta -> 0 the mixture term vanishes, it does not become the forward KL).

Loss of a step = (sum over its label tokens of divergence + sft_alpha x cross entropy) / (label tokens of the
whole accumulated batch on all processes); metrics `kl_loss`, `sft_loss`, `token_accuracy` per label token.

On-policy (`lmbda`): for each micro-batch a draw u from an RNG seeded by (seed, step, micro-batch) decides:
u < lmbda -> the completion of every sample is generated (by the student, or by the teacher with
`seq_kd: true`; sampled at `temperature`, up to `max_completion_length` tokens, with torch's RNG forked and
seeded by the same triple) and both models score it. Every rank draws the same u, and a resumed run redraws
it exactly. Under ZeRO-3 the teacher is kept whole on every process (a plain module outside the engine, not
partitioned, no collectives in its forward), so it cannot hang; the student generates with `synced_gpus`.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from loguru import logger
from pydantic import Field

from arctic_vl import (
    DTYPES,
    IGNORE_INDEX,
    TRAINERS,
    ConfigError,
    LossOutput,
    ModelPath,
    StepCounts,
    Trainer,
    epoch_seed,
    final_hidden,
    label_positions,
    load_model,
)

from .evaluation import generate
from .trainer import DenseEvalConfig, DenseTrainerMixin

_ONPOLICY_SALT = 0x67B0


def generalized_jsd_per_token(student_logits: torch.Tensor, teacher_logits: torch.Tensor, beta: float = 0.5,
                              temperature: float = 1.0) -> torch.Tensor:
    """The divergence of the module docstring at every position: (..., vocab) logits -> (...) values."""
    s = F.log_softmax(student_logits / temperature, dim=-1)
    t = F.log_softmax(teacher_logits / temperature, dim=-1)
    if beta == 0:
        return (t.exp() * (t - s)).sum(-1)
    if beta == 1:
        return (s.exp() * (s - t)).sum(-1)
    b = torch.tensor(beta, dtype=s.dtype, device=s.device)
    m = torch.logsumexp(torch.stack([t + torch.log(b), s + torch.log1p(-b)]), dim=0)  # log M
    kl_t = (t.exp() * (t - m)).sum(-1)
    kl_s = (s.exp() * (s - m)).sum(-1)
    return beta * kl_t + (1 - beta) * kl_s


def generalized_jsd_loss(student_logits: torch.Tensor, teacher_logits: torch.Tensor,
                         labels: torch.Tensor | None = None, beta: float = 0.5,
                         temperature: float = 1.0) -> torch.Tensor:
    """Mean generalized JSD over positions whose label is not -100 (all positions without labels).

    Logits are (batch, positions, vocab); `labels` (batch, positions) are aligned position by position with
    them (already shifted). Returns a 0-dim tensor (0 when no position is labelled).
    """
    per = generalized_jsd_per_token(student_logits, teacher_logits, beta, temperature)
    if labels is None:
        return per.mean()
    mask = labels != IGNORE_INDEX
    if not mask.any():
        return per.sum() * 0.0
    return per[mask].mean()


class GKDTrainerConfig(DenseEvalConfig):
    """The `trainer:` section of `gkd`: distil a frozen teacher into the student (generalized JSD, optional
    on-policy completions and cross entropy), with the dense-caption evaluation settings."""

    type: str = "gkd"
    teacher: ModelPath | None = Field(None, description="local model directory of the frozen teacher (default: the "
                                      "student's base model)")
    beta: float = Field(0.5, ge=0, le=1, description="0 forward KL, 1 reverse KL, between: generalized JSD")
    temperature: float = Field(1.0, gt=0, description="logits / temperature in the divergence and on-policy sampling")
    sft_alpha: float = Field(0.0, ge=0, description="weight of the cross entropy on the labels added to the divergence")
    lmbda: float = Field(0.0, ge=0, le=1, description="chance that a micro-batch's completions are generated on-policy")
    seq_kd: bool = Field(False, description="on-policy completions come from the teacher instead of the student")
    max_completion_length: int = Field(256, ge=1, description="tokens of an on-policy completion")


@TRAINERS.register("gkd")
class GKDTrainer(DenseTrainerMixin, Trainer):
    """Distil the frozen teacher into the student (module docstring); dense-caption evaluation."""

    config_class = GKDTrainerConfig
    config: GKDTrainerConfig

    def __init__(self, *args: Any, **kwargs: Any):
        super().__init__(*args, **kwargs)
        self.teacher_dir = self._teacher_dir()
        dtype = DTYPES[self.run_config.get("model", {}).get("dtype") or "float32"]
        # Kept whole on every process (never handed to the distributed backend): see the module docstring.
        self.teacher = load_model(self.teacher_dir, dtype=dtype).to(self.device).eval().requires_grad_(False)
        if self.is_main:
            logger.info(f"gkd: teacher {self.teacher_dir} (frozen), beta {self.config.beta}, "
                        f"sft_alpha {self.config.sft_alpha}, lmbda {self.config.lmbda}, seq_kd {self.config.seq_kd}")

    def _teacher_dir(self) -> Path:
        if self.config.teacher is not None:
            path = Path(self.config.teacher)
        else:
            model_dir = getattr(self.model_factory, "model_dir", None)
            if model_dir is None:
                raise ConfigError(f"trainer.teacher: model.type {self.run_config.get('model', {}).get('type')!r} "
                                  "has no base model directory to default to; name the teacher's local directory")
            path = Path(model_dir(self.output_dir))
        if not (path / "config.json").is_file():
            raise ConfigError(f"trainer.teacher: {path} is not a local model directory (no config.json)")
        return path

    # --------------------------------------------------------------------------------- on-policy
    def on_policy_draw(self, step: int, micro: int) -> bool:
        """Whether micro-batch `micro` of optimizer step `step` gets on-policy completions (same on every rank)."""
        if self.config.lmbda <= 0:
            return False
        rng = np.random.default_rng([epoch_seed(self.config.seed, step), _ONPOLICY_SALT, micro])
        return bool(rng.random() < self.config.lmbda)

    def train_step(self, micro: list[dict[str, Any]], data_time: float) -> dict[str, Any]:
        """Draw on-policy completions for the micro-batches whose draw says so, then the core's step (which
        counts the label tokens of the batches as they now are)."""
        step = self.state.step + 1
        on_policy = 0
        for n, batch in enumerate(micro):
            if self.on_policy_draw(step, n):
                self.replace_completions(batch, seed=epoch_seed(self.config.seed, step) * 1009 + n)
                on_policy += 1
        metrics = super().train_step(micro, data_time)
        if self.config.lmbda > 0:
            metrics["on_policy_micro_batches"] = on_policy
        return metrics

    @torch.no_grad()
    def replace_completions(self, batch: dict[str, Any], *, seed: int) -> None:
        """Replace each sample's answer by a sampled completion of its prompt, in place (text tensors only)."""
        generator = self.teacher if self.config.seq_kd else self.dist.unwrap(self.model).model
        tok = getattr(self.bundle.processor, "tokenizer", self.bundle.processor)
        pad = tok.pad_token_id if tok.pad_token_id is not None else tok.eos_token_id
        image_id = getattr(self.bundle.processor, "image_token_id", None)
        rows = []
        was_training = generator.training
        generator.eval()
        with torch.random.fork_rng(devices=[] if self.device.type == "cpu" else [self.device]):
            torch.manual_seed(seed)
            for r in range(batch["input_ids"].shape[0]):
                labels = batch["labels"][r]
                real = int(batch["attention_mask"][r].sum()) if "attention_mask" in batch else labels.numel()
                trained = (labels[:real] != IGNORE_INDEX).nonzero()
                if len(trained) == 0:  # a padding sample: nothing to complete
                    rows.append((batch["input_ids"][r, :real], labels[:real]))
                    continue
                start = int(trained[0])
                prompt = batch["input_ids"][r:r + 1, :start]
                one = self._row_inputs(batch, r, prompt)
                completion = generate(generator, one, tok, self.config.max_completion_length, do_sample=True,
                                      temperature=self.config.temperature, synced_gpus=self.dist.world_size > 1)
                ids = torch.cat([prompt[0], torch.tensor(completion, dtype=torch.long, device=prompt.device)])
                lab = torch.cat([torch.full((start,), IGNORE_INDEX, dtype=torch.long, device=prompt.device),
                                 ids[start:]])
                rows.append((ids, lab))
        generator.train(was_training)
        length = max(len(ids) for ids, _ in rows)
        B = len(rows)
        input_ids = torch.full((B, length), pad, dtype=torch.long, device=self.device)
        labels = torch.full((B, length), IGNORE_INDEX, dtype=torch.long, device=self.device)
        mask = torch.zeros((B, length), dtype=torch.long, device=self.device)
        for r, (ids, lab) in enumerate(rows):
            input_ids[r, :len(ids)], labels[r, :len(lab)], mask[r, :len(ids)] = ids, lab, 1
        batch["input_ids"], batch["labels"], batch["attention_mask"] = input_ids, labels, mask
        if "mm_token_type_ids" in batch and image_id is not None:
            batch["mm_token_type_ids"] = (input_ids == image_id).long()
        real_rows = [i != -1 for i in batch.get("_indices", [0] * B)]
        batch["_num_tokens"] = int(sum(int(mask[r].sum()) for r in range(B) if real_rows[r]))

    def _row_inputs(self, batch: dict[str, Any], r: int, prompt: torch.Tensor) -> dict[str, Any]:
        """Model inputs of row `r` alone, cut to its prompt (its images only)."""
        one: dict[str, Any] = {"input_ids": prompt, "attention_mask": torch.ones_like(prompt)}
        if "mm_token_type_ids" in batch:
            one["mm_token_type_ids"] = batch["mm_token_type_ids"][r:r + 1, :prompt.shape[1]]
        grid = batch.get("image_grid_thw")
        if grid is not None:  # Qwen: images in row order; image k has t*h*w patches and t*h*w / merge^2 tokens
            image_id = self.bundle.processor.image_token_id
            merge = int(getattr(self.bundle.processor.image_processor, "merge_size", 2))
            patches = grid.prod(-1).tolist()
            tokens = [p // merge**2 for p in patches]
            first = 0  # the first image of row r: skip the image tokens of the rows before it
            before = int((batch["input_ids"][:r] == image_id).sum())
            while before > 0:
                before -= tokens[first]
                first += 1
            last, mine = first, int((batch["input_ids"][r] == image_id).sum())
            while mine > 0:
                mine -= tokens[last]
                last += 1
            start = sum(patches[:first])
            one["pixel_values"] = batch["pixel_values"][start:start + sum(patches[first:last])]
            one["image_grid_thw"] = grid[first:last]
        elif "pixel_values" in batch:  # LLaVA: one entry per image, samples in order (one image per sample)
            for key in ("pixel_values", "image_sizes", "batch_num_images"):
                if key in batch:
                    one[key] = batch[key][r:r + 1]
        return one

    # -------------------------------------------------------------------------------------- loss
    def loss(self, model: torch.nn.Module, batch: dict[str, Any], counts: StepCounts) -> LossOutput:
        """Summed generalized JSD (`beta`, `temperature`) from the frozen teacher over the label tokens, plus
        `sft_alpha` x the summed cross entropy; metrics: kl_loss, sft_loss, token_accuracy, augmentation counts."""
        cfg = self.config
        mask, targets = label_positions(batch["labels"])
        hidden, head, _ = final_hidden(model, batch)
        with torch.no_grad():
            t_hidden, t_head, _ = final_hidden(self.teacher, batch, dummy_vision=False)
            t_logits = t_head(t_hidden[:, :-1][mask]).float()
        s_logits = head(hidden[:, :-1][mask]).float()
        n = int(targets.numel())
        if n == 0:
            zero = hidden.sum() * 0.0
            return LossOutput(zero, 0, {"kl_loss": (0.0, 0.0), "sft_loss": (0.0, 0.0), "token_accuracy": (0.0, 0.0)})
        kl_sum = generalized_jsd_per_token(s_logits, t_logits, cfg.beta, cfg.temperature).sum()
        ce_sum = F.cross_entropy(s_logits, targets, reduction="sum")
        loss_sum = kl_sum + cfg.sft_alpha * ce_sum if cfg.sft_alpha else kl_sum
        correct = float((s_logits.argmax(-1) == targets).sum())
        metrics = {"kl_loss": (float(kl_sum.detach()), float(n)), "sft_loss": (float(ce_sum.detach()), float(n)),
                   "token_accuracy": (correct, float(n))}
        metrics.update(self.augmentation_metrics(batch))
        return LossOutput(loss_sum, n, metrics)

    def summary(self, checkpoint: Any, **extra: Any) -> dict[str, Any]:
        """The core summary plus the run's augmentation totals and the teacher's directory."""
        out = super().summary(checkpoint, **extra)
        out["augmentation"] = self.augmentation_summary()
        out["teacher"] = str(self.teacher_dir)
        return out
