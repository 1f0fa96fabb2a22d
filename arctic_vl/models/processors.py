"""Image-only processors for the families whose HF processor needs torchvision for its video part.

LlavaOnevision / Qwen2-VL / Qwen2.5-VL / Qwen3-VL processors build a video processor, which needs
torchvision (never installed here). The subclasses below name every argument of `__init__`, so
`ProcessorMixin.get_attributes()` (read from the signature) sees only the image processor and the
tokenizer, and pass `video_processor=None` to the parent.

On save they write the name of transformers' OWN processor class (e.g. `Qwen2VLProcessor`) into
processor_config.json and tokenizer_config.json: an exported checkpoint is a plain HF directory that
`AutoProcessor.from_pretrained` loads wherever torchvision is installed, while
`arctic_vl.models.loading.load_processor` maps that name back to the image-only class here.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

from transformers import (
    AutoProcessor,
    LlavaConfig,
    LlavaNextConfig,
    LlavaNextProcessor,
    LlavaOnevisionConfig,
    LlavaOnevisionProcessor,
    LlavaProcessor,
    Qwen2_5_VLConfig,
    Qwen2_5_VLProcessor,
    Qwen2VLConfig,
    Qwen2VLProcessor,
    Qwen3VLConfig,
    Qwen3VLProcessor,
)

from arctic_vl.models.families import get_family


class _SavesAsHFProcessor:
    """Mixin for the image-only subclasses: saved files name the HF parent class, not ours.

    A checkpoint that named `Qwen2VLImageOnlyProcessor` would load nowhere but here (plain transformers
    does not know the name); the parent's name loads with plain `AutoProcessor` where torchvision is
    installed, and `load_processor` picks the image-only class where it is not. The saved attributes are
    the parent's (ours only drops `video_processor`, which is never saved here), so the files are valid
    for the parent class.
    """

    def hf_processor_class(self) -> str:
        """The transformers processor class this one stands in for (the nearest non-arctic_vl base)."""
        for base in type(self).__mro__[1:]:
            if base.__module__.startswith("transformers.") and base.__name__.endswith("Processor"):
                return base.__name__
        raise TypeError(f"{type(self).__name__} has no transformers processor base")

    def to_dict(self) -> dict[str, Any]:
        output = super().to_dict()  # type: ignore[misc]
        output["processor_class"] = self.hf_processor_class()
        return output

    def save_pretrained(self, save_directory: str | os.PathLike[str], *args: Any, **kwargs: Any) -> Any:
        result = super().save_pretrained(save_directory, *args, **kwargs)  # type: ignore[misc]
        # ProcessorMixin stamps the tokenizer with `type(self).__name__`; restamp it with the HF name.
        self.tokenizer._set_processor_class(self.hf_processor_class())  # type: ignore[attr-defined]
        tokenizer_config = Path(save_directory) / "tokenizer_config.json"
        if tokenizer_config.is_file():
            data = json.loads(tokenizer_config.read_text(encoding="utf-8"))
            if "processor_class" in data:
                data["processor_class"] = self.hf_processor_class()
                tokenizer_config.write_text(json.dumps(data, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")
        return result


class LlavaOnevisionImageOnlyProcessor(_SavesAsHFProcessor, LlavaOnevisionProcessor):
    """LlavaOnevisionProcessor without the video processor."""

    def __init__(
        self,
        image_processor=None,
        tokenizer=None,
        num_image_tokens=None,
        vision_feature_select_strategy=None,
        chat_template=None,
        image_token="<image>",
        video_token="<video>",
        vision_aspect_ratio="anyres_max_9",
    ):
        super().__init__(
            image_processor=image_processor,
            tokenizer=tokenizer,
            video_processor=None,
            num_image_tokens=num_image_tokens,
            vision_feature_select_strategy=vision_feature_select_strategy,
            chat_template=chat_template,
            image_token=image_token,
            video_token=video_token,
            vision_aspect_ratio=vision_aspect_ratio,
        )


class Qwen2VLImageOnlyProcessor(_SavesAsHFProcessor, Qwen2VLProcessor):
    """Qwen2VLProcessor without the video processor."""

    def __init__(self, image_processor=None, tokenizer=None, chat_template=None):
        super().__init__(image_processor, tokenizer, video_processor=None, chat_template=chat_template)


class Qwen2_5_VLImageOnlyProcessor(_SavesAsHFProcessor, Qwen2_5_VLProcessor):
    """Qwen2_5_VLProcessor without the video processor."""

    def __init__(self, image_processor=None, tokenizer=None, chat_template=None):
        super().__init__(image_processor, tokenizer, video_processor=None, chat_template=chat_template)


class Qwen3VLImageOnlyProcessor(_SavesAsHFProcessor, Qwen3VLProcessor):
    """Qwen3VLProcessor without the video processor."""

    def __init__(self, image_processor=None, tokenizer=None, chat_template=None):
        super().__init__(image_processor, tokenizer, video_processor=None, chat_template=chat_template)


# family name -> the processor class arctic_vl builds and loads for it.
PROCESSOR_CLASSES: dict[str, type] = {
    "llava": LlavaProcessor,
    "llava_next": LlavaNextProcessor,
    "llava_onevision": LlavaOnevisionImageOnlyProcessor,
    "qwen2_vl": Qwen2VLImageOnlyProcessor,
    "qwen2_5_vl": Qwen2_5_VLImageOnlyProcessor,
    "qwen3_vl": Qwen3VLImageOnlyProcessor,
}

for _config_class, _processor_class in (
    (LlavaOnevisionConfig, LlavaOnevisionImageOnlyProcessor),
    (Qwen2VLConfig, Qwen2VLImageOnlyProcessor),
    (Qwen2_5_VLConfig, Qwen2_5_VLImageOnlyProcessor),
    (Qwen3VLConfig, Qwen3VLImageOnlyProcessor),
):
    AutoProcessor.register(_config_class, _processor_class, exist_ok=True)
# Llava and LlavaNext build offline as they are; registered for symmetry so the mapping lists all six.
AutoProcessor.register(LlavaConfig, LlavaProcessor, exist_ok=True)
AutoProcessor.register(LlavaNextConfig, LlavaNextProcessor, exist_ok=True)


def build_processor(family: str, config: Any, tokenizer: Any, *, image_size: int | None = None):
    """The processor for a (tiny) model of `family` with `config`, using PIL image processors.

    For LLaVA the image processor crops to the vision tower's `image_size` and uses the config's
    `image_grid_pinpoints`; for Qwen `image_size` bounds the image budget (max_pixels = image_size^2,
    default 112^2) so tiny models see few tokens.
    """
    from transformers.models.llava_next.image_processing_pil_llava_next import LlavaNextImageProcessorPil
    from transformers.models.llava_onevision.image_processing_pil_llava_onevision import (
        LlavaOnevisionImageProcessorPil,
    )
    from transformers.models.qwen2_vl.image_processing_pil_qwen2_vl import Qwen2VLImageProcessorPil

    spec = get_family(family)
    cls = PROCESSOR_CLASSES[spec.name]
    template = tokenizer.chat_template
    if spec.name == "llava":  # LLaVA-1.5: one CLIP crop per image, no any-res tiles
        from transformers.models.clip.image_processing_pil_clip import CLIPImageProcessorPil

        vision = config.vision_config
        crop = vision.image_size
        image_processor = CLIPImageProcessorPil(size={"shortest_edge": crop}, crop_size={"height": crop, "width": crop})
        return cls(
            image_processor=image_processor, tokenizer=tokenizer, patch_size=vision.patch_size,
            vision_feature_select_strategy=config.vision_feature_select_strategy, chat_template=template,
            image_token=spec.image_token, num_additional_image_tokens=1,
        )
    if spec.name in ("llava_next", "llava_onevision"):
        vision = config.vision_config
        crop = vision.image_size
        common = {
            "size": {"height": crop, "width": crop} if spec.name == "llava_onevision" else {"shortest_edge": crop},
            "image_grid_pinpoints": [list(p) for p in config.image_grid_pinpoints],
        }
        if spec.name == "llava_next":
            image_processor = LlavaNextImageProcessorPil(crop_size={"height": crop, "width": crop}, **common)
            has_cls = vision.model_type == "clip_vision_model"
            return cls(
                image_processor=image_processor, tokenizer=tokenizer, patch_size=vision.patch_size,
                vision_feature_select_strategy=config.vision_feature_select_strategy,
                chat_template=template, image_token=spec.image_token,
                num_additional_image_tokens=1 if has_cls else 0,
            )
        image_processor = LlavaOnevisionImageProcessorPil(**common)
        return cls(
            image_processor=image_processor, tokenizer=tokenizer,
            num_image_tokens=(crop // vision.patch_size) ** 2,
            vision_feature_select_strategy=config.vision_feature_select_strategy,
            chat_template=template, vision_aspect_ratio=config.vision_aspect_ratio,
        )
    vision = config.vision_config
    factor = vision.patch_size * vision.spatial_merge_size
    side = image_size or 112
    image_processor = Qwen2VLImageProcessorPil(
        patch_size=vision.patch_size,
        merge_size=vision.spatial_merge_size,
        temporal_patch_size=vision.temporal_patch_size,
        min_pixels=(2 * factor) ** 2,
        max_pixels=max(side * side, (2 * factor) ** 2),
    )
    return cls(image_processor=image_processor, tokenizer=tokenizer, chat_template=template)
