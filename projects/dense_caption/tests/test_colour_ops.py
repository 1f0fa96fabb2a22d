"""The colour ops `color_jitter` (the origin YAML's) and `clahe` (scikit-image's `equalize_adapthist` the oracle)."""

from __future__ import annotations

import numpy as np
import pytest
from dense_caption.augment import AugmentationConfig, Augmenter, clahe_channel, clahe_image
from PIL import Image

skimage_exposure = pytest.importorskip("skimage.exposure")


def _run(ops: list[dict], image: Image.Image, index: int = 0) -> Image.Image:
    cfg = AugmentationConfig.model_validate({"enabled": True, "ops": ops})
    return Augmenter(cfg)(*image.size, [], seed=0, index=index, image=image).image


def test_color_jitter_origin_params_validate_and_change_pixels() -> None:
    """The origin YAML's `{brightness: [0.85, 1.15], prob: 0.3}`, and each part with a fixed factor: exact values."""
    AugmentationConfig.model_validate({"enabled": True, "ops": [
        {"name": "color_jitter", "params": {"brightness": [0.85, 1.15], "prob": 0.3}}]})
    grey = Image.new("RGB", (8, 8), (100, 100, 100))
    assert np.asarray(_run([{"name": "color_jitter", "params": {"brightness": [1.5, 1.5]}}], grey))[0, 0].tolist() \
        == [150, 150, 150]
    red = Image.new("RGB", (8, 8), (200, 40, 40))
    # saturation 0.5: half way to the grey L = (299 R + 587 G + 114 B) / 1000 = 87.84 -> 88 (PIL's Color enhancer)
    assert np.asarray(_run([{"name": "color_jitter", "params": {"saturation": [0.5, 0.5]}}], red))[0, 0].tolist() \
        == [144, 64, 64]
    pure = Image.new("RGB", (8, 8), (255, 0, 0))
    # a third of the hue circle: red -> green
    assert np.asarray(_run([{"name": "color_jitter", "params": {"hue": [1 / 3, 1 / 3]}}], pure))[0, 0].tolist() \
        == [0, 255, 0]
    # prob 0.3 applies to some samples and not others (seeded per index)
    applied = [Augmenter(AugmentationConfig.model_validate({"enabled": True, "ops": [
        {"name": "color_jitter", "params": {"brightness": [0.85, 1.15], "prob": 0.3}}]}))(
        8, 8, [], seed=0, index=i).applied.get("color_jitter", 0) for i in range(40)]
    assert 0 < sum(applied) < 40


def test_color_jitter_and_clahe_bad_params_are_config_errors(tmp_path) -> None:
    from arctic_vl import ConfigError, load_config

    (tmp_path / "train.jsonl").write_text("")
    (tmp_path / "run.yaml").write_text(
        "model: {family: qwen2_vl}\n"
        "data:\n"
        "  type: dense_caption\n"
        "  sources: [train.jsonl]\n"
        "  augmentation:\n"
        "    enabled: true\n"
        "    ops:\n"
        "      - name: color_jitter\n"
        "        params: {hue: [0.1, 0.7], prob: 0.3}\n"
        "      - name: color_jitter\n"
        "        params: {brightnes: [0.8, 1.2]}\n"
        "      - name: clahe\n"
        "        params: {clip_limit: 2.0}\n"
    )
    with pytest.raises(ConfigError) as e:
        load_config(tmp_path / "run.yaml")
    text = str(e.value)
    assert "run.yaml:9: data.augmentation.ops[0].params.hue: params: hue: both ends must be in [-0.5, 0.5], " \
           "got [0.1, 0.7]" in text
    assert "run.yaml:11: data.augmentation.ops[1].params.brightnes: brightnes: unknown parameter" in text
    assert "color_jitter takes: prob (default 1.0), brightness (default None), contrast (default None), " \
           "saturation (default None), hue (default None)" in text
    assert "run.yaml:13: data.augmentation.ops[2].params.clip_limit: clip_limit: Input should be less than or " \
           "equal to 1 (got 2.0)" in text
    assert "clahe takes: prob (default 1.0), clip_limit (default 0.01), tile_grid (default (8, 8))" in text


def _images(shape: tuple[int, int]) -> list[np.ndarray]:
    rng = np.random.default_rng(shape[0] * 1000 + shape[1])
    h, w = shape
    yy, xx = np.mgrid[:h, :w]
    return [rng.integers(0, 256, shape).astype(np.uint8),  # noise
            (128 + 100 * np.sin(xx / 7) * np.cos(yy / 5)).astype(np.uint8),  # texture
            np.clip(xx * 255 / w * 0.3 + 60 + (yy > h // 2) * 90, 0, 255).astype(np.uint8),  # low-contrast ramps
            rng.integers(90, 110, shape).astype(np.uint8)]  # a narrow band of levels


@pytest.mark.parametrize("shape,grid,clip", [((64, 80), (8, 8), 0.01), ((57, 93), (4, 3), 0.03),
                                             ((120, 100), (2, 5), 0.5), ((33, 47), (8, 8), 1.0),
                                             ((64, 64), (1, 1), 0.02)])
def test_clahe_matches_scikit_image(shape, grid, clip) -> None:
    """One channel: equal to skimage's float output within 1e-9 everywhere; RGB through the op: within half a
    level (0.5 / 255, the uint8 rounding) of skimage's (HSV value) result on every pixel."""
    kernel = (max(shape[0] // grid[1], 1), max(shape[1] // grid[0], 1))
    for im in _images(shape):
        ref = skimage_exposure.equalize_adapthist(im, kernel_size=kernel, clip_limit=clip)
        assert np.abs(clahe_channel(im, clip, grid) - ref).max() <= 1e-9
        grey = np.asarray(clahe_image(Image.fromarray(im, "L"), clip, grid)) / 255
        assert np.abs(grey - ref).max() <= 0.5 / 255 + 1e-9
    rgb = np.random.default_rng(1).integers(0, 256, (*shape, 3)).astype(np.uint8)
    ref = skimage_exposure.equalize_adapthist(rgb, kernel_size=kernel, clip_limit=clip)
    out = np.asarray(_run([{"name": "clahe", "params": {"clip_limit": clip, "tile_grid": list(grid)}}],
                          Image.fromarray(rgb))) / 255
    assert np.abs(out - ref).max() <= 0.5 / 255 + 1e-9


def test_clahe_raises_local_contrast_and_keeps_constant_images() -> None:
    im = np.random.default_rng(0).integers(100, 116, (64, 64)).astype(np.uint8)  # 16 levels
    out = np.asarray(clahe_image(Image.fromarray(im, "L"), 0.05, (4, 4)))
    assert out.std() > 4 * im.std()
    flat = Image.new("RGB", (16, 16), (10, 20, 30))
    assert np.array_equal(np.asarray(clahe_image(flat, 0.01, (8, 8))), np.asarray(flat))
