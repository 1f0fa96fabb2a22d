"""arctic_vl plugin entry point (`arctic_vl.plugins` group: `bbu_detection = "bbu_detection.plugin"`).

Importing this module registers the model factory `bbu_detection`, the data factory `bbu_detection`, the trainer
`bbu_detection`, and the CLI verbs `predict` and `bbu-synthetic-data`.
"""

from __future__ import annotations

from arctic_vl import register_cli_verb

from . import data, factory, trainer  # noqa: F401  (their imports register the components)

__all__ = ["predict_cli", "register", "synthetic_cli"]


def predict_cli(argv: list[str]) -> int:
    """`arctic_vl predict CONFIG --images DIR_OR_FILES --out preds.jsonl [--score-threshold S]`."""
    from .predict import main

    return main(argv)


def synthetic_cli(argv: list[str]) -> int:
    """`arctic_vl bbu-synthetic-data OUT --n N --seed S`."""
    from .synthetic import main

    return main(argv)


def register() -> None:
    """Add the CLI verbs (idempotent); the components registered themselves on import."""
    register_cli_verb("predict", predict_cli,
                      help="boxes, scores and captions of a bbu_detection run's final model")
    register_cli_verb("bbu-synthetic-data", synthetic_cli,
                      help="teacher/student detection records from the shapes data")


register()
