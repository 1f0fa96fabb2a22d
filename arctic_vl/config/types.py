"""Value types shared by the config classes of every layer. Imports nothing of the project.

`Seed`: a random seed every consumer accepts. The same seed goes to `random.seed`, `numpy.random.seed`
(which takes 0 .. 2**32-1), `torch.manual_seed` and the per-epoch rule `epoch_seed` (seed * 100003 + epoch,
which must stay below 2**63 for `torch.Generator.manual_seed`); so a seed is an integer in 0 .. 2**32-1,
and a boolean (YAML `yes`/`on`) is not a seed.
"""

from __future__ import annotations

from typing import Annotated, Any

from pydantic import BeforeValidator, Field

#: the largest seed (numpy's limit; far inside torch's)
MAX_SEED = 2**32 - 1


def _not_a_bool(value: Any) -> Any:
    if isinstance(value, bool):
        raise ValueError(f"a seed is an integer 0..{MAX_SEED}, not a boolean")
    return value


#: a random seed: an integer 0 .. 2**32-1
Seed = Annotated[int, BeforeValidator(_not_a_bool), Field(ge=0, le=MAX_SEED)]
