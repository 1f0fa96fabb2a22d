"""Image-only processors for the families whose HF processor needs torchvision for its video part.

LlavaOnevision / Qwen2-VL / Qwen2.5-VL / Qwen3-VL processors build a video processor, which needs
torchvision (never installed here). The subclasses below name every argument of `__init__`, so
`ProcessorMixin.get_attributes()` (read from the signature) sees only the image processor and the
tokenizer, and pass `video_processor=None` to the parent. They are registered with AutoProcessor at
import, so a saved processor loads back with `AutoProcessor.from_pretrained` once this module is imported.
"""

from __future__ import annotations

from typing import Any

from transformers import (
    AutoProcessor,
    LlavaNextConfig,
    LlavaNextProcessor,
    LlavaOnevisionConfig,
    LlavaOnevisionProcessor,
    Qwen2_5_VLConfig,
    Qwen2_5_VLProcessor,
    Qwen2VLConfig,
    Qwen2VLProcessor,
    Qwen3VLConfig,
    Qwen3VLProcessor,
)

from arctic_vl.models.families import get_family


class LlavaOnevisionImageOnlyProcessor(LlavaOnevisionProcessor):
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


class Qwen2VLImageOnlyProcessor(Qwen2VLProcessor):
    """Qwen2VLProcessor without the video processor."""

    def __init__(self, image_processor=None, tokenizer=None, chat_template=None):
        super().__init__(image_processor, tokenizer, video_processor=None, chat_template=chat_template)


class Qwen2_5_VLImageOnlyProcessor(Qwen2_5_VLProcessor):
    """Qwen2_5_VLProcessor without the video processor."""

    def __init__(self, image_processor=None, tokenizer=None, chat_template=None):
        super().__init__(image_processor, tokenizer, video_processor=None, chat_template=chat_template)


class Qwen3VLImageOnlyProcessor(Qwen3VLProcessor):
    """Qwen3VLProcessor without the video processor."""

    def __init__(self, image_processor=None, tokenizer=None, chat_template=None):
        super().__init__(image_processor, tokenizer, video_processor=None, chat_template=chat_template)


# family name -> the processor class arctic_vl builds and loads for it.
PROCESSOR_CLASSES: dict[str, type] = {
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
# LlavaNext builds offline as is; registered for symmetry so the mapping lists all five.
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
