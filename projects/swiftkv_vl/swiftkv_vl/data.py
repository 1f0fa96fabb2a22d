"""`swiftkv_vl` data: the core's `vlm` data with the origin README's two image settings.

    data:
      type: swiftkv_vl
      max_images_per_sample: 2        # a record with more images is a bad record (reason too_many_images)
      image_processing_batch_size: 1  # images per image-processor call while a sample loads (peak memory)

A record over `max_images_per_sample` follows `data.on_bad_record` like every bad record: exit 2 naming the file,
record and field, or counted and skipped (never cut: cutting images would leave the text's image placeholders
without features). `image_processing_batch_size` splits a sample's images into processor calls of that many and
concatenates the tensors: the same tensors as one call for processors that treat images independently (LLaVA-NeXT);
OneVision switches to its multi-image mode on a call with several images, so it refuses the setting.
"""

from __future__ import annotations

from typing import Any

import torch
from pydantic import Field

from arctic_vl import DATA, BadRecord, ConfigError, VLMDataConfig, VLMDataFactory

#: the bad-record reason of a record with more images than `max_images_per_sample`
TOO_MANY_IMAGES = "too_many_images"


class SwiftKVDataConfig(VLMDataConfig):
    """The `data:` section of `swiftkv_vl`: the core's `vlm` settings plus the per-sample image limits."""

    type: str = "swiftkv_vl"
    max_images_per_sample: int | None = Field(None, ge=1, description="records with more images are bad records "
                                              f"(reason {TOO_MANY_IMAGES}; data.on_bad_record: error or skip)")
    image_processing_batch_size: int | None = Field(None, ge=1, description="images per image-processor call when "
                                                    "a sample loads (None: all of a sample's images in one call)")


@DATA.register("swiftkv_vl")
class SwiftKVDataFactory(VLMDataFactory):
    """The core `vlm` data factory with `max_images_per_sample` and `image_processing_batch_size`."""

    config_class = SwiftKVDataConfig
    config: SwiftKVDataConfig

    def check(self, conv: Any) -> Any:
        """A record with more than `max_images_per_sample` images is a BadRecord (the core applies on_bad_record)."""
        limit = self.config.max_images_per_sample
        if limit is not None and len(conv.images) > limit:
            raise BadRecord(TOO_MANY_IMAGES, "images", f"{len(conv.images)} images; data.max_images_per_sample "
                            f"allows {limit}")
        return conv

    def encoder(self, model_bundle: Any) -> Any:
        """The core's sample encoder; with `image_processing_batch_size`, its images go to the processor in calls of
        that many (the tensors concatenated along the image axis)."""
        encoder = super().encoder(model_bundle)
        size = self.config.image_processing_batch_size
        if size is None:
            return encoder
        family = getattr(getattr(encoder, "family", None), "name", None)
        if family == "llava_onevision":
            raise ConfigError("data.image_processing_batch_size: llava_onevision processes a sample's images "
                              "differently when it gets several at once (multi-image mode); leave it unset")
        encoder.encode_images = ChunkedImages(encoder, size)  # this encoder only; the cache key does not change
        return encoder


class ChunkedImages:
    """`encoder.encode_images` in calls of `size` images, the tensors concatenated (picklable: DataLoader workers)."""

    def __init__(self, encoder: Any, size: int):
        self.encoder = encoder
        self.size = size

    def __call__(self, images: list[Any]) -> dict[str, torch.Tensor]:
        """The vision tensors of `images`, as the encoder's own `encode_images` gives them."""
        whole = type(self.encoder).encode_images
        if len(images) <= self.size:
            return whole(self.encoder, images)
        parts = [whole(self.encoder, images[i:i + self.size]) for i in range(0, len(images), self.size)]
        return {k: torch.cat([p[k] for p in parts]) for k in parts[0]}
