"""Configurations of the SwiftKV language models (Llama and Qwen2 flavours).

A SwiftKV config is the teacher's config plus three fields:

* ``num_key_value_layers`` (M): layers ``0 .. M-1`` compute their own K/V as usual.
* ``key_value_group_size`` (G): layers ``M ..`` are split into groups of G consecutive
  layers; all layers of a group read the K/V made by the group's first layer from
  ``norm_swiftkv(input of layer M)``.
* ``swiftkv``: when ``False`` the model is exactly the teacher; when ``True`` it runs the
  SwiftKV student path.

Every other field (and therefore every teacher parameter name) is kept, so a teacher
checkpoint loads into the SwiftKV model with only the new ``*_swiftkv`` parameters missing.
"""

from __future__ import annotations

from huggingface_hub.dataclasses import strict
from transformers import LlamaConfig, Qwen2Config

__all__ = ["LlamaSwiftKVConfig", "Qwen2SwiftKVConfig", "check_swiftkv_layout"]


def check_swiftkv_layout(
    num_hidden_layers: int, num_key_value_layers: int, key_value_group_size: int
) -> None:
    """Raise ``ValueError`` unless ``0 < M < L``, ``G >= 1`` and ``(L - M) % G == 0``."""
    L, M, G = num_hidden_layers, num_key_value_layers, key_value_group_size
    if not 0 < M < L:
        raise ValueError(
            f"SwiftKV needs 0 < num_key_value_layers < num_hidden_layers, got num_key_value_layers={M} "
            f"with num_hidden_layers={L}: at least one layer must compute its own K/V and at least one "
            "layer must read the SwiftKV K/V."
        )
    if G < 1:
        raise ValueError(f"key_value_group_size must be >= 1, got {G}.")
    if (L - M) % G != 0:
        raise ValueError(
            f"SwiftKV needs (num_hidden_layers - num_key_value_layers) % key_value_group_size == 0, got "
            f"({L} - {M}) % {G} = {(L - M) % G}: the {L - M} SwiftKV layers cannot be split into groups of {G}."
        )


class _SwiftKVFieldsMixin:
    """The shared validation of the three SwiftKV fields (the fields themselves are declared on each
    dataclass config below, because ``@strict`` collects annotations per class)."""

    num_hidden_layers: int
    num_key_value_layers: int | None
    key_value_group_size: int

    def _resolve_and_check_swiftkv(self) -> None:
        # A default of half the layers (the SwiftKV paper's main setting) keeps ``Config()``
        # constructible, which transformers relies on (e.g. to compute the diff for to_json).
        if self.num_key_value_layers is None:
            self.num_key_value_layers = self.num_hidden_layers // 2
        check_swiftkv_layout(self.num_hidden_layers, self.num_key_value_layers, self.key_value_group_size)

    def validate_swiftkv(self) -> None:
        """``@strict`` class validator: re-checked whenever transformers validates the config (e.g. on save)."""
        check_swiftkv_layout(self.num_hidden_layers, self.num_key_value_layers, self.key_value_group_size)

    @property
    def num_swiftkv_groups(self) -> int:
        """Number of K/V groups among the layers ``>= num_key_value_layers``."""
        return (self.num_hidden_layers - self.num_key_value_layers) // self.key_value_group_size


@strict
class LlamaSwiftKVConfig(_SwiftKVFieldsMixin, LlamaConfig):
    r"""Llama config with SwiftKV.

    Args:
        num_key_value_layers (`int`, *optional*):
            M, the number of leading layers that compute their own K/V. Defaults to half the layers.
        key_value_group_size (`int`, defaults to 1):
            G, the number of consecutive layers ``>= M`` that share one SwiftKV K/V.
        swiftkv (`bool`, defaults to `False`):
            Run the SwiftKV student path (`True`) or the unchanged teacher (`False`).

    Raises ``ValueError`` unless ``0 < M < num_hidden_layers`` and ``(num_hidden_layers - M) % G == 0``.
    """

    model_type = "llama_swiftkv"

    num_key_value_layers: int | None = None
    key_value_group_size: int = 1
    swiftkv: bool = False

    def __post_init__(self, **kwargs):
        # Checked before the parent's post-init so that a bad layout surfaces as a plain ValueError.
        self._resolve_and_check_swiftkv()
        super().__post_init__(**kwargs)


@strict
class Qwen2SwiftKVConfig(_SwiftKVFieldsMixin, Qwen2Config):
    r"""Qwen2 config with SwiftKV (same extra fields as [`LlamaSwiftKVConfig`]).

    Args:
        num_key_value_layers (`int`, *optional*):
            M, the number of leading layers that compute their own K/V. Defaults to half the layers.
        key_value_group_size (`int`, defaults to 1):
            G, the number of consecutive layers ``>= M`` that share one SwiftKV K/V.
        swiftkv (`bool`, defaults to `False`):
            Run the SwiftKV student path (`True`) or the unchanged teacher (`False`).
    """

    model_type = "qwen2_swiftkv"

    num_key_value_layers: int | None = None
    key_value_group_size: int = 1
    swiftkv: bool = False

    def __post_init__(self, **kwargs):
        self._resolve_and_check_swiftkv()
        super().__post_init__(**kwargs)
