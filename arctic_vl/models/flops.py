"""Model FLOPs of a training step (language model AND vision tower) and the device's bf16 peak, for `mfu`.

The convention (docs/flops.md states it in full):

* dense matmuls: 2 FLOPs per weight per token forward, 2 more for the input gradient and 2 for the weight
  gradient: 6 per weight per token for a trained weight, 4 for a frozen weight that a gradient still passes
  through (a trained part sits before it: vision -> aligner -> llm), 2 for a frozen weight that no gradient
  reaches (a frozen vision tower when nothing before it trains). Every `nn.Linear` / `nn.Conv*` weight counts
  (LoRA adapters too: a LoRA base weight is frozen, its adapters trained); embeddings are lookups: not counted.
  The language model's linears run on every real token, its output layer only on the label positions (the
  memory-lean loss computes logits there only); the vision tower's on every patch, the aligner's on its input
  tokens (Qwen: patches / merge^2; LLaVA: the tower's patch features).
* attention scores and values: forward 4 * heads * head_dim * L^2 per layer per sequence of L tokens (QK^T and
  AV, each 2 * L^2 * d), no causal halving (Megatron's and PaLM's convention), times 3 with backward. L is each
  real segment's length: a packed row's samples one by one, a padded row's real tokens; the vision tower's per
  image frame (Qwen) or per tile (LLaVA).

Activation recomputation is not counted (model FLOPs, not hardware FLOPs).
"""

from __future__ import annotations

import itertools
import time
from dataclasses import dataclass, field
from typing import Any

import torch

#: bf16 dense (no sparsity) peak TFLOPS per GPU, from the vendors' data sheets; matched in this order against
#: `torch.cuda.get_device_name()` (more specific names first).
PEAK_BF16_TFLOPS: tuple[tuple[str, float], ...] = (
    ("H200", 989.0),  # NVIDIA H200 SXM data sheet: 1,979 TFLOPS with sparsity
    ("H100 PCIe", 756.0),  # H100 PCIe: 1,513 with sparsity
    ("H100 NVL", 835.0),  # H100 NVL (per GPU): 1,671 with sparsity
    ("H100", 989.0),  # H100 SXM5: 1,979 with sparsity
    ("GH200", 989.0),
    ("B200", 2250.0),  # B200 (HGX): 4.5 PFLOPS with sparsity
    ("A100", 312.0),  # A100 SXM and PCIe: 312 dense
    ("A800", 312.0),
    ("L40S", 362.05),  # L40S: 733 with sparsity
    ("L4", 121.0),  # L4: 242 with sparsity
    ("A10G", 70.0),  # AWS A10G (A10 variant): 70 dense (NVIDIA lists 125 for the A10; the G runs lower clocks)
    ("A10", 125.0),
    ("RTX 4090", 165.2),  # 330.3 with sparsity (FP32 accumulate: 165.2)
    ("V100", 125.0),  # no bf16: its fp16 tensor core peak
)

_ORDER = ("vision", "aligner", "llm")


def known_peak_tflops(device_name: str) -> float | None:
    """The table's bf16 dense peak for a GPU name (`torch.cuda.get_device_name()`), or None when unknown."""
    for key, tflops in PEAK_BF16_TFLOPS:
        if key.lower() in device_name.lower():
            return tflops
    return None


def probe_peak_tflops(device: torch.device | str = "cpu", dtype: torch.dtype = torch.float32,
                      *, n: int = 256, seconds: float = 0.2) -> float:
    """Measured matmul TFLOPS on `device` at `dtype` (n x n @ n x n repeated for about `seconds`): the CPU's
    stand-in peak. Short by design: one warm-up, then as many products as fit the budget (at least 3)."""
    a = torch.randn(n, n, device=device).to(dtype)
    b = torch.randn(n, n, device=device).to(dtype)
    torch.mm(a, b)  # warm-up: one-time allocation and kernel selection are not the peak
    reps, t0 = 0, time.perf_counter()
    while reps < 3 or time.perf_counter() - t0 < seconds:
        torch.mm(a, b)
        reps += 1
    elapsed = max(time.perf_counter() - t0, 1e-9)
    return 2.0 * n ** 3 * reps / elapsed / 1e12


def device_peak_tflops(device: torch.device, dtype: torch.dtype, configured: float | None = None) -> tuple[float, str]:
    """(peak TFLOPS per device, where it came from): `configured` (trainer.peak_tflops) when given, else the
    table for a known GPU, else a matmul probe at `dtype` (CPU, or a GPU the table does not know)."""
    if configured is not None:
        return float(configured), "trainer.peak_tflops"
    if device.type == "cuda":
        name = torch.cuda.get_device_name(device)
        peak = known_peak_tflops(name)
        if peak is not None:
            return peak, f"table ({name})"
        return probe_peak_tflops(device, dtype, n=4096), f"matmul probe ({name} not in the table)"
    return probe_peak_tflops(device, dtype), "matmul probe"


def _numel(p: torch.Tensor) -> int:
    return int(getattr(p, "ds_numel", p.numel()))  # a ZeRO-3 partitioned weight keeps its full size there


@dataclass
class StepFlops:
    """Model FLOPs of some micro-batches, by part (`vision` includes the aligner)."""

    llm: float = 0.0
    vision: float = 0.0

    @property
    def total(self) -> float:
        """Language model + vision tower + aligner."""
        return self.llm + self.vision

    def __iadd__(self, other: StepFlops) -> StepFlops:
        self.llm += other.llm
        self.vision += other.vision
        return self


@dataclass
class FlopsModel:
    """What the FLOPs of a batch depend on, read once from the model: weights per part by multiplier (6 / 4 / 2
    FLOPs per weight per token), the output layer's, and the attention shapes of both towers."""

    weights: dict[str, dict[int, int]] = field(default_factory=dict)  # part -> multiplier -> weights
    head_weights: dict[int, int] = field(default_factory=dict)  # the output layer (label positions only)
    llm_layers: int = 0
    llm_attn_dim: int = 0  # heads * head_dim
    llm_attn_mult: int = 3
    vision_layers: int = 0
    vision_attn_dim: int = 0
    vision_attn_mult: int = 3
    family: str | None = None  # "qwen" | "llava" | None (text only)
    merge: int = 1  # Qwen's spatial merge: the aligner sees patches / merge^2
    patch_size: int = 14
    cls_token: int = 0  # LLaVA: CLIP's class token joins every tile's patches (the projector drops it)
    grid_pinpoints: Any = None
    vision_image_size: int = 0

    @classmethod
    def from_model(cls, model: torch.nn.Module, part_of: Any, family: Any = None) -> FlopsModel:
        """Read the weights (with their trainability) and the configs of `model`; `part_of(name)` is
        `ModelBundle.part_of`, `family` its `FamilySpec` (None: a language model only)."""
        config = getattr(model, "config", None)
        head = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
        head_ids = {id(p) for p in head.parameters()} if head is not None else set()
        trains = {part: False for part in _ORDER}
        named = list(model.named_parameters())
        for name, p in named:
            part = part_of(name) or "llm"
            trains[part if part in trains else "llm"] |= p.requires_grad
        grad_reaches = {}  # a gradient flows through a part when it, or a part before it, trains
        seen = False
        for part in _ORDER:
            seen = seen or trains[part]
            grad_reaches[part] = seen
        self = cls(weights={part: {} for part in _ORDER})
        mm_types = (torch.nn.Linear, torch.nn.Conv1d, torch.nn.Conv2d, torch.nn.Conv3d)
        names = {id(p): n for n, p in named}
        for module in model.modules():
            if not isinstance(module, mm_types) or module.weight is None or id(module.weight) not in names:
                continue
            w = module.weight
            part = part_of(names[id(w)]) or "llm"
            part = part if part in self.weights else "llm"
            mult = 6 if w.requires_grad else (4 if grad_reaches[part] else 2)
            target = self.head_weights if id(w) in head_ids else self.weights[part]
            target[mult] = target.get(mult, 0) + _numel(w)
        self.llm_attn_mult = 3 if grad_reaches["llm"] else 1
        self.vision_attn_mult = 3 if grad_reaches["vision"] else 1
        text = config.get_text_config() if config is not None and hasattr(config, "get_text_config") else config
        if text is not None:
            self.llm_layers = int(text.num_hidden_layers)
            heads = int(text.num_attention_heads)
            head_dim = getattr(text, "head_dim", None) or text.hidden_size // heads
            self.llm_attn_dim = heads * int(head_dim)
        vision = getattr(config, "vision_config", None) if family is not None else None
        if vision is not None:
            self.family = "qwen" if family.is_qwen else "llava"
            self.vision_layers = int(getattr(vision, "depth", None) or vision.num_hidden_layers)
            width = getattr(vision, "embed_dim", None) if self.family == "qwen" else None
            self.vision_attn_dim = int(width or vision.hidden_size)
            self.patch_size = int(vision.patch_size)
            self.merge = int(getattr(vision, "spatial_merge_size", 1) or 1)
            if self.family == "llava":
                self.cls_token = 1 if "clip" in str(getattr(vision, "model_type", "")) else 0
                self.grid_pinpoints = getattr(config, "image_grid_pinpoints", None)
                self.vision_image_size = int(vision.image_size)
        return self

    # ------------------------------------------------------------------------------ per batch
    def batch_flops(self, batch: dict[str, Any]) -> StepFlops:
        """The model FLOPs (forward + backward) of one micro-batch (a `Batch`: real segment lengths from
        `attention_mask` or packed `position_ids`; images from `image_grid_thw` or `pixel_values`)."""
        segments = text_segments(batch)
        tokens = sum(segments)
        labels = batch.get("labels")
        label_positions = int((labels[:, 1:] != -100).sum()) if labels is not None else tokens
        out = StepFlops()
        out.llm = (sum(m * n for m, n in self.weights["llm"].items()) * tokens
                   + sum(m * n for m, n in self.head_weights.items()) * label_positions
                   + self.llm_attn_mult * 4 * self.llm_layers * self.llm_attn_dim * sum(s * s for s in segments))
        patches, aligner_tokens, vision_segments = self.image_units(batch)
        if patches:
            out.vision = (sum(m * n for m, n in self.weights["vision"].items()) * patches
                          + sum(m * n for m, n in self.weights["aligner"].items()) * aligner_tokens
                          + self.vision_attn_mult * 4 * self.vision_layers * self.vision_attn_dim
                          * sum(s * s for s in vision_segments))
        return out

    def image_units(self, batch: dict[str, Any]) -> tuple[int, int, list[int]]:
        """(patches through the vision tower, tokens into the aligner, the tower's attention segment lengths)."""
        if self.family == "qwen" and batch.get("image_grid_thw") is not None:
            grid = [tuple(int(x) for x in row) for row in batch["image_grid_thw"].tolist()]
            patches = sum(t * h * w for t, h, w in grid)
            # the tower attends within each frame of each image (cu_seqlens by frame)
            return patches, patches // (self.merge ** 2), [h * w for t, h, w in grid for _ in range(t)]
        if self.family == "llava" and batch.get("pixel_values") is not None:
            pv = batch["pixel_values"]
            per_tile = (int(pv.shape[-1]) // self.patch_size) * (int(pv.shape[-2]) // self.patch_size)
            tiles = self._llava_tiles(pv, batch.get("image_sizes"))
            seq = per_tile + self.cls_token
            return tiles * seq, tiles * per_tile, [seq] * tiles
        return 0, 0, []

    def _llava_tiles(self, pv: torch.Tensor, image_sizes: Any) -> int:
        """Tiles the tower runs: each image's any-res tile count from its size (the padded tiles of the tensor
        are dropped before the tower), or every tile of the tensor without a grid."""
        if pv.dim() == 4:
            return int(pv.shape[0])
        if image_sizes is None or not self.grid_pinpoints:
            return int(pv.shape[0]) * int(pv.shape[1])
        from transformers.models.llava_next.modeling_llava_next import image_size_to_num_patches

        return sum(min(int(image_size_to_num_patches(tuple(int(x) for x in size), self.grid_pinpoints,
                                                     self.vision_image_size)), int(pv.shape[1]))
                   for size in image_sizes.tolist())


def text_segments(batch: dict[str, Any]) -> list[int]:
    """Real attention segment lengths of a batch: each packed row's samples (where `position_ids` restart at 0;
    no `attention_mask`), else each padded row's real tokens (`attention_mask` sums)."""
    mask = batch.get("attention_mask")
    if mask is not None:
        return [int(n) for n in mask.sum(dim=1).tolist() if n]
    pos = batch.get("position_ids")
    if pos is None:
        ids = batch["input_ids"]
        return [int(ids.shape[1])] * int(ids.shape[0])
    if pos.dim() == 3:  # Qwen (4, B, T): row 0 the text positions
        pos = pos[0]
    total = batch.get("_num_tokens")
    excess = int(pos.numel()) - total if isinstance(total, int) else 0
    ids, labels = batch["input_ids"].tolist(), batch.get("labels")
    labels = labels.tolist() if labels is not None else None
    out: list[int] = []
    for r, row in enumerate(pos.tolist()):
        starts = [t for t, p in enumerate(row) if p == 0 or t == 0] + [len(row)]
        segs = list(itertools.pairwise(starts))
        a, b = segs[-1]
        # row padding is a segment of its own, last in its row (one repeated pad id, no label): not model work
        if len(segs) > 1 and excess >= b - a and len(set(ids[r][a:b])) == 1 \
                and (labels is None or all(x == -100 for x in labels[r][a:b])):
            segs.pop()
            excess -= b - a
        out.extend(b - a for a, b in segs)
    return out


class FlopsMeter:
    """The trainer's side of MFU: the model's `FlopsModel` and the device's peak, read once at set-up; per step
    the local FLOPs of the micro-batches (summed over processes by the loop) and the metrics they give."""

    def __init__(self, model: torch.nn.Module, part_of: Any, family: Any, device: torch.device,
                 dtype: torch.dtype, peak_tflops: float | None = None):
        self.model = FlopsModel.from_model(model, part_of, family)
        self.peak_tflops, self.peak_source = device_peak_tflops(device, dtype, peak_tflops)

    def local(self, micro: list[dict[str, Any]]) -> list[float]:
        """[language-model FLOPs, vision FLOPs] of this process's micro-batches (to sum over processes)."""
        total = StepFlops()
        for batch in micro:
            total += self.model.batch_flops(batch)
        return [total.llm, total.vision]

    def metrics(self, llm: float, vision: float, step_time_s: float, world_size: int) -> dict[str, float]:
        """`flops_per_step` (every process), `tflops` (per device per second), `mfu` and `vision_flops_share`."""
        total = llm + vision
        achieved = total / max(step_time_s, 1e-9) / max(world_size, 1) / 1e12
        return {"flops_per_step": total, "tflops": achieved, "mfu": achieved / self.peak_tflops,
                "vision_flops_share": vision / total if total else 0.0}
