"""What several benches share: the shapes recipe's model shape and the realistic shapes data mix."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import yaml

REPO = Path(__file__).resolve().parents[1]
RECIPE = REPO / "configs" / "shapes-llava-cpu.yaml"


def recipe_shape() -> dict[str, Any]:
    """`model.tiny` of the shapes recipe (configs/shapes-llava-cpu.yaml): the model its CPU users train."""
    return dict(yaml.safe_load(RECIPE.read_text())["model"]["tiny"])


def shapes_sources(root: Path, samples: int, questions: list[int], seed: int) -> list[str]:
    """Shapes data sets (no held-out split) of about `samples` records in all, one per entry of `questions`
    (question turns per image record), written under `root`; their LLaVA json paths, to be mixed."""
    from arctic_vl.data.synthetic import make_synthetic_data

    per = -(-samples // len(questions))
    paths = []
    for k, q in enumerate(questions):
        out = root / f"shapes-q{q}-{k}"
        make_synthetic_data(out, n=per, seed=seed + k, heldout=0, questions_per_image=q)
        paths.append(str(out / "train.llava.json"))
    return paths
