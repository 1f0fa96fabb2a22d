"""dense_caption: dense-caption SFT on Qwen-VL models with geometry-aware augmentation, GKD and Stage-A/B.

Importing the package is cheap; the arctic_vl plugin (entry point `dense_caption`) lives in
`dense_caption.plugin` and registers the `dense_caption` data factory, the `dense_caption` and `gkd` trainers
and the `dense-caption` CLI verb.
"""

from __future__ import annotations

__all__: list[str] = []
