"""Forward helpers every trainer uses: the backbone's final hidden states without logits, and the ZeRO-3
vision keep-alive for batches without images.

`final_hidden` runs the backbone (`model.model`) instead of the ForConditionalGeneration wrapper, so no
full-vocabulary logits are made; the LM loss (`arctic_vl.trainers.loss.lm_loss_sum`) projects only the
label positions.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from typing import Any

import torch


def unwrap_peft(model: torch.nn.Module) -> torch.nn.Module:
    """The transformers model inside a PEFT wrapper (LoRA layers stay injected in it)."""
    get_base = getattr(model, "get_base_model", None)
    return get_base() if callable(get_base) else model


def model_inputs(batch: dict[str, Any]) -> dict[str, Any]:
    """The batch minus labels and the loop's bookkeeping keys (those start with `_`)."""
    return {k: v for k, v in batch.items() if k != "labels" and not k.startswith("_")}


def final_hidden(model: torch.nn.Module, batch: dict[str, Any], *, dummy_vision: bool | None = None,
                 **kwargs: Any) -> tuple[torch.Tensor, torch.nn.Module, Any]:
    """Final (normed) hidden states (B, T, D), the output layer, and the backbone's outputs.

    Runs the backbone (`model.model`) instead of the ForConditionalGeneration wrapper so no logits are made.
    `dummy_vision` (None: when more than one process trains) runs the vision tower on a dummy image for a
    batch without images; see `vision_keepalive`.
    """
    hf = unwrap_peft(model)
    backbone = getattr(hf, "model", None)
    head = hf.get_output_embeddings()
    if backbone is None or head is None:
        raise TypeError(
            f"{type(hf).__name__} has no backbone `.model` and output embeddings; cannot compute a lean loss"
        )
    inputs = model_inputs(batch)
    if dummy_vision is None:
        dummy_vision = _multi_process()
    keep = dummy_vision and inputs.get("pixel_values") is None and inputs.get("pixel_values_videos") is None
    with vision_keepalive(backbone) if keep else contextlib.nullcontext():
        outputs = backbone(**inputs, use_cache=False, return_dict=True, **kwargs)
    return outputs.last_hidden_state, head, outputs


# ---------------------------------------------------------------------------------- ZeRO-3 keep-alive
def _multi_process() -> bool:
    import torch.distributed as dist

    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


def dummy_image_inputs(backbone: torch.nn.Module) -> dict[str, Any] | None:
    """Keyword arguments for `backbone.get_image_features` describing one tiny blank image, built from the
    model config alone (no processor): LLaVA style (`image_sizes`: one native-resolution tile plus the
    any-res patches its grid asks for) or Qwen style (`image_grid_thw`: one merge window of patches).
    None for a backbone with neither.
    """
    import inspect
    import sys

    get = getattr(backbone, "get_image_features", None)
    vcfg = getattr(getattr(backbone, "config", None), "vision_config", None)
    if get is None or vcfg is None:
        return None
    params = inspect.signature(get).parameters
    param = next((p for p in backbone.parameters() if p.is_floating_point()), None)
    device = param.device if param is not None else torch.device("cpu")
    dtype = param.dtype if param is not None else torch.float32
    channels = int(getattr(vcfg, "num_channels", None) or getattr(vcfg, "in_channels", None)
                   or getattr(vcfg, "in_chans", None) or 3)
    if "image_grid_thw" in params:
        patch = int(vcfg.patch_size)
        temporal = int(getattr(vcfg, "temporal_patch_size", 2))
        merge = int(getattr(vcfg, "spatial_merge_size", 2))
        grid = torch.tensor([[1, merge, merge]], dtype=torch.long, device=device)
        pixels = torch.zeros(merge * merge, channels * temporal * patch * patch, dtype=dtype, device=device)
        return {"pixel_values": pixels, "image_grid_thw": grid}
    if "image_sizes" in params:
        size = int(vcfg.image_size)
        # the family's helper, from the backbone's own module or a base class's (a plugin's subclass of a
        # transformers model, e.g. alternating_attn's OneVision, lives in another module)
        helpers = (getattr(sys.modules.get(cls.__module__), "image_size_to_num_patches", None)
                   for cls in type(backbone).__mro__)
        count = next((h for h in helpers if h is not None), None)
        pinpoints = getattr(backbone.config, "image_grid_pinpoints", None)
        if count is None:  # LLaVA-1.5: no any-res tiles, one crop per image (images, C, H, W)
            return {"pixel_values": torch.zeros(1, channels, size, size, dtype=dtype, device=device)}
        n = count(image_size=(size, size), grid_pinpoints=pinpoints, patch_size=size) if pinpoints else 1
        pixels = torch.zeros(1, n, channels, size, size, dtype=dtype, device=device)
        return {"pixel_values": pixels, "image_sizes": torch.tensor([[size, size]], device=device)}
    return None


#: what an image batch feeds the language model from `get_image_features`: the aligner's features (and
#: Qwen3-VL's deepstack features). Summing only these keeps the backward graph shaped like an image batch's
#: (ZeRO-3 records the order modules run in, forward AND backward, and it must match on every rank).
_FEATURE_KEYS = ("pooler_output", "deepstack_features")


def _tensor_sum(obj: Any) -> torch.Tensor | None:
    """Sum of the floating tensors of a (nested) `get_image_features` output that reach the language model."""
    if isinstance(obj, torch.Tensor):
        return obj.float().sum() if obj.is_floating_point() else None
    if isinstance(obj, dict):  # ModelOutput is a dict
        fed = [obj[k] for k in _FEATURE_KEYS if obj.get(k) is not None]
        obj = fed or [obj.get("last_hidden_state")]
    if isinstance(obj, (list, tuple)):
        parts = [t for t in (_tensor_sum(o) for o in obj) if t is not None]
        return torch.stack(parts).sum() if parts else None
    return None


@contextlib.contextmanager
def vision_keepalive(backbone: torch.nn.Module, once: bool = False) -> Iterator[None]:
    """While a batch without images runs through `backbone`, run its vision tower and aligner on a dummy image.

    Under ZeRO-3 every module's forward gathers its parameters with a collective, and under ZeRO-2/DDP the
    gradient reduction expects the same parameters on every rank: a rank whose batch has no image would skip
    the vision tower and the others would wait for it forever. We hook the language model's forward (where
    the composite would have just encoded its images, so the order of modules matches an image batch, inside
    the backbone's own forward) and add 0 x (sum of the dummy features) to its input embeddings: every
    vision and aligner parameter joins the graph and gets an exactly-zero gradient; the loss is unchanged.
    `once`: only the first forward of the language model inside the block (generation: the prompt, where an
    image prompt encodes its images; the decoding steps that follow run no vision tower on any rank).
    """
    lm = getattr(backbone, "language_model", None)
    dummy = dummy_image_inputs(backbone)
    if dummy is None or not isinstance(lm, torch.nn.Module):
        yield
        return

    def pre_hook(module: torch.nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any]) -> tuple[Any, Any] | None:
        embeds = kwargs.get("inputs_embeds")
        if embeds is None:
            return None
        total = _tensor_sum(backbone.get_image_features(**dummy, return_dict=True))
        if total is None:
            return None
        kwargs["inputs_embeds"] = embeds + (total * 0.0).to(embeds.dtype)
        if once:
            handle.remove()
        return args, kwargs

    # prepend: run before ZeRO-3's own pre-forward hook of the language model, so the module order (and with
    # it every parameter gather) is exactly an image batch's: embeddings, vision, aligner, language model.
    handle = lm.register_forward_pre_hook(pre_hook, with_kwargs=True, prepend=True)
    try:
        yield
    finally:
        handle.remove()
