"""GKD: generalized knowledge distillation from a frozen teacher, with optional on-policy completions.

Divergence (TRL's convention): with P_T, P_S the teacher's and student's next-token distributions (logits
divided by `loss_temperature`, default 1 as in TRL and ms-swift, before the softmax),

    beta = 0:       KL(P_T || P_S)                                  (forward KL)
    beta = 1:       KL(P_S || P_T)                                  (reverse KL)
    0 < beta < 1:   beta KL(P_T || M) + (1 - beta) KL(P_S || M),    M = beta P_T + (1 - beta) P_S

(not continuous at the ends: as beta -> 0 the mixture term vanishes, it does not become the forward KL).

Loss of a step = (sum over its label tokens of divergence + sft_alpha x cross entropy) / (label tokens of the
whole accumulated batch on all processes); metrics `kl_loss`, `sft_loss`, `token_accuracy` per label token, and
per step `student_generated`, `teacher_generated`, `dataset_completions`: how many of the step's micro-batches
took their completions from each source. Evaluation adds `eval_kl_loss`, `eval_sft_loss` and
`eval_token_accuracy` (per eval label token, all processes) to the dense-caption metrics.

Completions (TRL's and ms-swift's rule): for each micro-batch a draw u from an RNG seeded by (seed, step,
micro-batch) decides: u < lmbda -> the STUDENT generates every sample's completion; otherwise, with
`seq_kd: true`, the TEACHER does; otherwise the dataset's answers are kept. Completions are sampled at
`temperature` (sampling only: the divergence uses `loss_temperature`), up to `max_completion_length` tokens,
with torch's RNG forked and seeded by the same triple, and both models score them. Every rank draws the same u,
and a resumed run redraws it exactly. Under ZeRO-3 the teacher is kept whole on every process (a plain module
outside the engine, not partitioned, no collectives in its forward), so it generates on its own; the student
generates with `synced_gpus` (under `lockstep_generation`), and every process makes the same number of
`generate` calls (a padding row, or a process with fewer rows, generates on a stand-in prompt and discards it),
so none waits on a peer.
"""

from __future__ import annotations

import functools
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
    INDICES,
    NUM_TOKENS,
    TRAINERS,
    ConfigError,
    LossOutput,
    ModelPath,
    StepCounts,
    Trainer,
    chunked_head_sums,
    epoch_seed,
    final_hidden,
    label_positions,
    load_model,
    slice_rows,
)

from .evaluation import generate
from .trainer import DenseEvalConfig, DenseTrainerMixin

_ONPOLICY_SALT = 0x67B0
#: where a micro-batch's completions come from -> its per-step count in metrics.jsonl
SOURCE_METRICS = {"student": "student_generated", "teacher": "teacher_generated", "dataset": "dataset_completions"}


def _gkd_chunk(rows: torch.Tensor, head: torch.nn.Module, targets: torch.Tensor, teacher_rows: torch.Tensor, *,
               teacher_head: torch.nn.Module, beta: float, temperature: float,
               ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(divergence sum, cross-entropy sum, correct tokens) of label rows; rows whose target is IGNORE_INDEX (the
    core's lockstep padding) count nothing."""
    s_logits = head(rows).float()
    with torch.no_grad():
        t_logits = teacher_head(teacher_rows).float()
    real = targets != IGNORE_INDEX
    kl = (generalized_jsd_per_token(s_logits, t_logits, beta, temperature) * real).sum()
    ce = F.cross_entropy(s_logits, targets, reduction="sum")
    correct = ((s_logits.argmax(-1) == targets) & real).sum().float()
    return kl, ce, correct


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
    """Mean generalized JSD over positions whose label is not IGNORE_INDEX (all positions without labels).

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
    temperature: float = Field(1.0, gt=0, description="sampling temperature of generated completions (student with "
                               "lmbda, teacher with seq_kd); not used by the divergence")
    loss_temperature: float = Field(1.0, gt=0, description="logits / loss_temperature in the divergence (1 as in TRL "
                                    "and ms-swift)")
    sft_alpha: float = Field(0.0, ge=0, description="weight of the cross entropy on the labels added to the divergence")
    lmbda: float = Field(0.0, ge=0, le=1, description="chance that the student generates a micro-batch's completions")
    seq_kd: bool = Field(False, description="when the student does not generate, the teacher does (else: the dataset's "
                         "answers)")
    max_completion_length: int = Field(256, ge=1, description="tokens of an on-policy completion")


@TRAINERS.register("gkd")
class GKDTrainer(DenseTrainerMixin, Trainer):
    """Distil the frozen teacher into the student (module docstring); dense-caption evaluation."""

    config_class = GKDTrainerConfig
    config: GKDTrainerConfig
    # a jump in eval kl_loss is the sign of a teacher / template mismatch (ms-swift's reading)
    eval_loss_metrics = ("kl_loss", "sft_loss", "token_accuracy")

    def __init__(self, *args: Any, **kwargs: Any):
        super().__init__(*args, **kwargs)
        self.teacher_dir = self._teacher_dir()
        dtype = DTYPES[self.run_config.get("model", {}).get("dtype") or "float32"]
        # Kept whole on every process (never handed to the distributed backend): see the module docstring.
        self.teacher = load_model(self.teacher_dir, dtype=dtype).to(self.device).eval().requires_grad_(False)
        if self.is_main:
            cfg = self.config
            logger.info(f"gkd: teacher {self.teacher_dir} (frozen), beta {cfg.beta}, sft_alpha {cfg.sft_alpha}, "
                        f"lmbda {cfg.lmbda}, seq_kd {cfg.seq_kd}, temperature {cfg.temperature} (sampling), "
                        f"loss_temperature {cfg.loss_temperature}")
            if cfg.temperature != 1.0 and "loss_temperature" not in cfg.model_fields_set:
                # configs written before the two keys were split meant both by `temperature`
                unused = "" if cfg.lmbda > 0 or cfg.seq_kd else " (unused: lmbda 0 and seq_kd false generate nothing)"
                logger.warning(f"gkd: trainer.temperature {cfg.temperature} is the sampling temperature only{unused}; "
                               f"the divergence uses trainer.loss_temperature {cfg.loss_temperature} (TRL's and "
                               "ms-swift's objective). Earlier versions divided the divergence's logits by "
                               "`temperature` too: set loss_temperature to keep that objective.")

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
    def completion_source(self, step: int, micro: int) -> str:
        """Where micro-batch `micro` of optimizer step `step` takes its completions from (same on every rank):
        'student' with probability lmbda, else 'teacher' with seq_kd, else 'dataset'."""
        if self.config.lmbda > 0:
            rng = np.random.default_rng([epoch_seed(self.config.seed, step), _ONPOLICY_SALT, micro])
            if rng.random() < self.config.lmbda:
                return "student"
        return "teacher" if self.config.seq_kd else "dataset"

    def train_step(self, micro: list[dict[str, Any]], data_time: float) -> dict[str, Any]:
        """Replace the completions of the micro-batches whose source is a model, then the core's step (which
        counts the label tokens of the batches as they now are); adds the step's per-source counts."""
        step = self.state.step + 1
        used = dict.fromkeys(SOURCE_METRICS, 0)
        for n, batch in enumerate(micro):
            source = self.completion_source(step, n)
            if source != "dataset":
                self.replace_completions(batch, source, seed=epoch_seed(self.config.seed, step) * 1009 + n)
            used[source] += 1
        metrics = super().train_step(micro, data_time)
        # the draw is the same on every process: these count micro-batch positions once, not once per process
        metrics.update({SOURCE_METRICS[k]: v for k, v in used.items()})
        return metrics

    @torch.no_grad()
    def replace_completions(self, batch: dict[str, Any], source: str, *, seed: int) -> None:
        """Replace each sample's answer by `source`'s ('student' or 'teacher') sampled completion of its prompt,
        in place (text tensors only)."""
        student = source == "student"
        generator = self.dist.unwrap(self.model).model if student else self.teacher
        # partitioned student weights: every process generates in lockstep (the teacher is whole everywhere)
        lockstep = student and self.dist.shards_parameters
        tok = getattr(self.bundle.processor, "tokenizer", self.bundle.processor)
        pad = tok.pad_token_id if tok.pad_token_id is not None else tok.eos_token_id
        image_id = getattr(self.bundle.processor, "image_token_id", None)
        rows: list[tuple[torch.Tensor, torch.Tensor]] = []
        jobs: list[tuple[int, int, bool]] = []  # (row, prompt length, keep its completion)
        for r in range(batch["input_ids"].shape[0]):
            labels = batch["labels"][r]
            real = int(batch["attention_mask"][r].sum()) if "attention_mask" in batch else labels.numel()
            trained = (labels[:real] != IGNORE_INDEX).nonzero()
            rows.append((batch["input_ids"][r, :real], labels[:real]))
            if len(trained):
                jobs.append((r, int(trained[0]), True))
            elif lockstep:  # a padding sample: a stand-in call on its own tokens, its completion discarded
                jobs.append((r, real, False))
        if lockstep:  # the same number of generate calls on every process: a rank-dependent count would hang
            calls = int(max(self.dist.all_gather_object(len(jobs))))
            jobs += [(jobs[-1][0], jobs[-1][1], False)] * (calls - len(jobs))
        was_training = generator.training
        generator.eval()
        with torch.random.fork_rng(devices=[] if self.device.type == "cpu" else [self.device]):
            torch.manual_seed(seed)
            for r, start, keep in jobs:
                prompt = batch["input_ids"][r:r + 1, :start]
                one = self._row_inputs(batch, r, prompt)
                completion = generate(generator, one, tok, self.config.max_completion_length, do_sample=True,
                                      temperature=self.config.temperature, synced_gpus=lockstep)
                if not keep:
                    continue
                ids = torch.cat([prompt[0], torch.tensor(completion, dtype=torch.long, device=prompt.device)])
                lab = torch.cat([torch.full((start,), IGNORE_INDEX, dtype=torch.long, device=prompt.device),
                                 ids[start:]])
                rows[r] = (ids, lab)
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
        real_rows = [i != -1 for i in batch.get(INDICES, [0] * B)]
        batch[NUM_TOKENS] = int(sum(int(mask[r].sum()) for r in range(B) if real_rows[r]))

    def _row_inputs(self, batch: dict[str, Any], r: int, prompt: torch.Tensor) -> dict[str, Any]:
        """Model inputs of row `r` alone, cut to its prompt (its images only)."""
        processor = self.bundle.processor
        row = slice_rows(batch, [r], image_token_id=getattr(processor, "image_token_id", None),
                         merge_size=int(getattr(getattr(processor, "image_processor", None), "merge_size", 2)))
        one: dict[str, Any] = {"input_ids": prompt, "attention_mask": torch.ones_like(prompt)}
        if "mm_token_type_ids" in row:
            one["mm_token_type_ids"] = row["mm_token_type_ids"][:, :prompt.shape[1]]
        for key in ("pixel_values", "image_grid_thw", "image_sizes", "batch_num_images"):
            if key in row:
                one[key] = row[key]
        return one

    # -------------------------------------------------------------------------------------- loss
    def loss(self, model: torch.nn.Module, batch: dict[str, Any], counts: StepCounts) -> LossOutput:
        """Summed generalized JSD (`beta`, `loss_temperature`) from the frozen teacher over the label tokens, plus
        `sft_alpha` x the summed cross entropy; metrics: kl_loss, sft_loss, token_accuracy, augmentation counts."""
        cfg = self.config
        mask, targets = label_positions(batch["labels"])
        hidden, head, _ = final_hidden(model, batch)
        with torch.no_grad():
            t_hidden, t_head, _ = final_hidden(self.teacher, batch, dummy_vision=False)
        # Both output layers run at label positions only, in the core's lockstep chunks: the student's head the same
        # number of times on every rank (ZeRO-3), logits recomputed in backward at large vocabularies, and a rank
        # without labels still runs it on a padding row (its zero gradients in the same order as the others').
        chunk = functools.partial(_gkd_chunk, teacher_head=t_head, beta=cfg.beta, temperature=cfg.loss_temperature)
        kl_sum, ce_sum, correct = chunked_head_sums(chunk, hidden[:, :-1][mask], head, targets,
                                                    t_hidden[:, :-1][mask], chunk_size=cfg.loss_chunk_size)
        n = int(targets.numel())
        loss_sum = kl_sum + cfg.sft_alpha * ce_sum if cfg.sft_alpha else kl_sum
        metrics = {"kl_loss": (float(kl_sum.detach()), float(n)), "sft_loss": (float(ce_sum.detach()), float(n)),
                   "token_accuracy": (float(correct), float(n))}
        metrics.update(self.augmentation_metrics(batch))
        return LossOutput(loss_sum, n, metrics)

    def summary(self, checkpoint: Any, **extra: Any) -> dict[str, Any]:
        """The core summary plus the run's augmentation totals and the teacher's directory."""
        out = super().summary(checkpoint, **extra)
        out["augmentation"] = self.augmentation_summary()
        out["teacher"] = str(self.teacher_dir)
        return out
