"""arctic_vl plugin entry point (`arctic_vl.plugins` group: `alternating_attn = "alternating_attn.plugin"`).

Importing this module registers, without importing transformers:

* the model factory `alternating_attn` (see `alternating_attn.factory`);
* the composite model types with the core's family table, as LLaVA-OneVision models, so the data layer encodes
  for them and `final/` directories load with the LLaVA-OneVision processor;
* the CLI verb `arctic_vl inspect-weights CONFIG`.
"""

from __future__ import annotations

import argparse

from arctic_vl import register_cli_verb, register_model_type

from .factory import FAMILY, AlternatingModelFactory, inspect_weights
from .variants import VARIANT_MODEL_TYPES

__all__ = ["AlternatingModelFactory", "inspect_weights_cli", "register"]


def inspect_weights_cli(argv: list[str]) -> int:
    """`arctic_vl inspect-weights CONFIG [--set K=V ...] [--first N]`: print the WeightReport, train nothing."""
    parser = argparse.ArgumentParser(
        prog="arctic_vl inspect-weights",
        description="Build the configured model, copy the init_from_backbone weights and print what was copied, "
                    "skipped, missing and unexpected (counts, then the first N of each list). Trains nothing.",
    )
    parser.add_argument("config", help="YAML config whose model.type is alternating_attn")
    parser.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                        help="override a config value (repeatable)")
    parser.add_argument("--first", type=int, default=20, help="entries shown per list (default 20)")
    args = parser.parse_args(argv)
    if args.first < 0:
        parser.error("--first must be >= 0")
    print(inspect_weights(args.config, args.overrides, first=args.first))
    return 0


def register() -> None:
    """Map the composite model types onto the LLaVA-OneVision family and add the CLI verb (idempotent).

    Called by the plugin loader after import; the factory registered itself when `factory` was imported.
    """
    for model_type in VARIANT_MODEL_TYPES.values():
        if model_type != FAMILY:
            register_model_type(model_type, FAMILY)
    register_cli_verb("inspect-weights", inspect_weights_cli,
                      help="print the init_from_backbone WeightReport of an alternating_attn config; no training")


register()
