"""`bbu_detection` trainer: LM loss split into teacher and student spans, plus the detection losses.

The loss of an optimizer step (every term exact over the whole accumulated batch on all processes):

    teacher_lm_weight * CE(teacher span tokens) / teacher tokens
  + student_lm_weight * CE(student span tokens) / student tokens
  + bbox_weight       * L1 of matched boxes     / ground-truth objects
  + giou_weight       * (1 - GIoU) of matches   / ground-truth objects
  + objectness_weight * focal over all queries  / ground-truth objects   (loss_normalization: batch: / samples)
  + caption_weight    * CE(caption tokens)      / caption tokens         (loss_normalization: batch: / samples)
  (+ the three box terms of every earlier decoder layer with aux_loss)

Each normaliser is this process's count from `step_counts` summed over the step's micro-batches and processes
by the core loop before the first forward; the core divides the summed `loss_sum` by its `units` (the label
tokens), so each term is returned scaled by units / its own normaliser. `loss_normalization: batch` divides the
objectness and caption terms by the step's samples (all micro-batches, all processes) as the origin documents
do. During the first `detection_freeze_epochs` epochs the head's parameter groups get LR 0 (a core LR phase,
`scheduler.phases`) and the detection terms weight 0: the head neither learns nor teaches (its losses are still
computed and logged, and every module still runs: ZeRO-3).
"""

from __future__ import annotations

from typing import Any, Literal

import torch
from pydantic import Field

from arctic_vl import IGNORE_INDEX, TRAINERS, ConfigError, LossOutput, LRPhase, StepCounts, Trainer, TrainerConfig

from .data import SPANS, TARGETS
from .forward import pair_forward
from .losses import detection_loss_sums, span_lm_loss_sums
from .matcher import MatcherWeights
from .spans import STUDENT, TEACHER

#: step_counts names
GT_OBJECTS, CAPTION_TOKENS, TEACHER_TOKENS, STUDENT_TOKENS, SAMPLES = (
    "gt_objects", "caption_tokens", "teacher_tokens", "student_tokens", "samples"
)
#: the model parts of the head's parameter groups (what `detection_freeze_epochs` freezes)
HEAD_GROUP_PARTS = ("detection", "adapter")


class DetectionTrainerConfig(TrainerConfig):
    """The `trainer:` section of `bbu_detection`: the core trainer options, the loss weights and the matcher's costs."""

    type: str = "bbu_detection"
    teacher_lm_weight: float = Field(
        1.0, ge=0, description="weight of the teacher-span LM loss (all assistant turns but the last)"
    )
    student_lm_weight: float = Field(
        1.0, ge=0, description="weight of the student-span LM loss (the last assistant turn)"
    )
    bbox_weight: float = Field(5.0, ge=0, description="L1 of matched boxes (normalised cxcywh)")
    giou_weight: float = Field(2.0, ge=0, description="1 - GIoU of matched boxes")
    objectness_weight: float = Field(2.0, ge=0, description="sigmoid focal loss of the objectness logits")
    caption_weight: float = Field(1.0, ge=0, description="caption decoder cross entropy")
    aux_loss: bool = Field(
        True, description="box, GIoU and objectness losses on every decoder layer, each matched on its own"
    )
    focal_alpha: float = Field(0.25, ge=0, le=1)
    focal_gamma: float = Field(2.0, ge=0)
    cost_bbox: float = Field(5.0, ge=0, description="matching cost weight of the L1 distance")
    cost_giou: float = Field(2.0, ge=0, description="matching cost weight of 1 - GIoU")
    cost_objectness: float = Field(2.0, ge=0, description="matching cost weight of the focal objectness cost")
    detection_freeze_epochs: int = Field(0, ge=0, description="epochs at the start during which the head (its "
                                         "detection and adapter groups) does not train: shorthand for the phase "
                                         "scheduler.phases: [{parts: [detection, adapter], until_epoch: N, "
                                         "lr_factor: 0}], plus the detection terms' weight 0 over those steps")
    loss_normalization: Literal["objects", "batch"] = Field(
        "objects", description="what the objectness and caption terms are divided by: objects = ground-truth "
        "objects and caption tokens (this project); batch = the step's samples on all processes (the origin "
        "documents' choice, to reproduce their runs)")
    caption_match_iou: float = Field(0.5, gt=0, le=1, description="evaluation: IoU at which a prediction's caption "
                                     "is compared with the object's")


@TRAINERS.register("bbu_detection")
class DetectionTrainer(Trainer):
    """Joint LM + detection training of a `bbu_detection` model on `bbu_detection` data."""

    config_class = DetectionTrainerConfig
    config: DetectionTrainerConfig

    def __init__(self, config: DetectionTrainerConfig, *args: Any, **kwargs: Any):
        super().__init__(config, *args, **kwargs)
        if "head_config" not in self.bundle.extras:
            raise ConfigError("trainer.type bbu_detection needs model.type bbu_detection")
        self.matcher = MatcherWeights(config.cost_bbox, config.cost_giou, config.cost_objectness,
                                      config.focal_alpha, config.focal_gamma)
        if config.detection_freeze_epochs:  # a core LR phase (scheduler.phases): the head's groups at LR 0
            if not hasattr(self.scheduler_factory, "with_phases"):
                raise ConfigError("trainer.detection_freeze_epochs needs a scheduler with phases (the core's "
                                  f"cosine, linear, constant); got {type(self.scheduler_factory).__name__}")
            self.scheduler_factory = self.scheduler_factory.with_phases(
                [LRPhase(parts=list(HEAD_GROUP_PARTS), until_epoch=config.detection_freeze_epochs, lr_factor=0.0)])

    @property
    def image_token_id(self) -> int:
        """The processor's image token id."""
        return int(self.bundle.processor.image_token_id)

    # ------------------------------------------------------------------------------------ normalisers
    def step_counts(self, micro: list[dict[str, Any]]) -> dict[str, float]:
        """Ground-truth objects, caption tokens, teacher and student label tokens and samples (a rank's padding
        samples not counted) of this process's micro-batches."""
        objects = captions = teacher = student = 0
        for b in micro:
            for t in b[TARGETS]:
                if t.real:
                    objects += t.count
                    captions += sum(len(c) for c in t.captions)
            trained = (b["labels"][:, 1:] != IGNORE_INDEX)
            spans = b[SPANS][:, 1:]
            teacher += int((trained & (spans == TEACHER)).sum())
            student += int((trained & (spans == STUDENT)).sum())
        return {GT_OBJECTS: float(objects), CAPTION_TOKENS: float(captions), TEACHER_TOKENS: float(teacher),
                STUDENT_TOKENS: float(student), SAMPLES: float(sum(t.real for b in micro for t in b[TARGETS]))}

    def head_frozen(self) -> bool:
        """True while the optimizer step being computed is inside `detection_freeze_epochs`."""
        return self.state.step < self._frozen_steps()

    def _frozen_steps(self) -> int:
        epochs = self.config.detection_freeze_epochs
        return self.epoch_start_step(epochs) if epochs else 0

    # --------------------------------------------------------------------------------------- the loss
    def loss(self, model: torch.nn.Module, batch: dict[str, Any], counts: StepCounts) -> LossOutput:
        """The step's loss sum (see the module docstring); `counts` are the step's global normalisers."""
        cfg = self.config
        out = pair_forward(model, batch, self.image_token_id)
        t_sum, s_sum, n_t, n_s = span_lm_loss_sums(out.hidden, out.lm_head, batch["labels"], batch[SPANS],
                                                   cfg.loss_chunk_size)
        targets = batch[TARGETS]
        device = out.detection.boxes.device
        gt = [t.boxes.to(device) if t.real else t.boxes[:0].to(device) for t in targets]
        captions = [t.captions if t.real else [] for t in targets]
        real = torch.tensor([t.real for t in targets], device=device)
        det = detection_loss_sums(model.detection_head, out.detection, gt, captions, real, self.matcher, cfg.aux_loss)

        def per(name: str) -> float:
            return max(float(counts.get(name, 0.0) or 0.0), 1.0)

        objects = per(GT_OBJECTS)
        by_batch = cfg.loss_normalization == "batch"
        focal_norm = per(SAMPLES) if by_batch else objects
        caption_norm = per(SAMPLES) if by_batch else per(CAPTION_TOKENS)
        lm = cfg.teacher_lm_weight * t_sum / per(TEACHER_TOKENS) + cfg.student_lm_weight * s_sum / per(STUDENT_TOKENS)
        detection = (cfg.bbox_weight * (det.l1 + det.l1_aux) + cfg.giou_weight * (det.giou + det.giou_aux)) / objects \
            + cfg.objectness_weight * (det.focal + det.focal_aux) / focal_norm \
            + cfg.caption_weight * det.caption / caption_norm
        on = 0.0 if model.training and self.head_frozen() else 1.0
        total = (lm + on * detection) * counts.units
        n_obj = float(det.objects)
        metrics = {
            "teacher_lm_loss": (float(t_sum.detach()), float(n_t)),
            "student_lm_loss": (float(s_sum.detach()), float(n_s)),
            "loss_bbox": (float(det.l1.detach()), n_obj),
            "loss_giou": (float(det.giou.detach()), n_obj),
            "loss_objectness": (float(det.focal.detach()), n_obj),
            "loss_caption": (float(det.caption.detach()), float(det.caption_tokens)),
            "gt_objects_per_sample": (n_obj, float(int(real.sum()))),
        }
        return LossOutput(total, self.count(batch), metrics)

    # ---------------------------------------------------------------------------------------- evaluation
    def evaluate(self, model: torch.nn.Module) -> dict[str, Any]:
        """The core's evaluation (eval loss) plus COCO AP / AP50 / AP75 / AR100 and caption exact match."""
        from .evaluation import evaluate_detection

        results = super().evaluate(model)
        results.update(evaluate_detection(self, model))
        return results
