"""DeepSpeed's known noise, silenced at its source, each by its exact text, so that nothing else it says is hidden.

- `import deepspeed` (which transformers does on every load: its accelerate integration asks whether ZeRO-3 is
  on) logs "Setting accelerator to CPU. If you have GPU ..." on every machine without CUDA: a filter on
  DeepSpeed's logger drops that one record. It is installed on `import arctic_vl`, before anything imports
  DeepSpeed (the logger is created by name, so a filter added first stays).
- DeepSpeed 0.19 calls `torch.distributed.all_gather_into_tensor` / `reduce_scatter_tensor`, which torch 2.13
  deprecates with a FutureWarning; the warnings registry is reset each step, so it repeats once per step under
  ZeRO-3. One filter, for those two messages only (DeepSpeed's calls, nothing a user can act on).
"""

from __future__ import annotations

import logging
import warnings

#: the start of DeepSpeed's record about picking its CPU accelerator
ACCELERATOR_NOTICE = "Setting accelerator to CPU."
#: torch's FutureWarning about the collectives DeepSpeed calls
DEPRECATED_COLLECTIVES = r"`torch\.distributed\.(all_gather_into_tensor|reduce_scatter_tensor)` is deprecated"


class _DropAcceleratorNotice(logging.Filter):
    def filter(self, record: logging.LogRecord) -> bool:
        return not record.getMessage().startswith(ACCELERATOR_NOTICE)


def quiet_accelerator_notice() -> None:
    """Drop DeepSpeed's "Setting accelerator to CPU" record (idempotent; every other record passes)."""
    log = logging.getLogger("DeepSpeed")
    if not any(isinstance(f, _DropAcceleratorNotice) for f in log.filters):
        log.addFilter(_DropAcceleratorNotice())


def quiet_deprecated_collectives() -> None:
    """Ignore torch's FutureWarning for the two collectives DeepSpeed calls (added once)."""
    if not any(f[0] == "ignore" and f[2] is FutureWarning and getattr(f[1], "pattern", None) == DEPRECATED_COLLECTIVES
               for f in warnings.filters):
        warnings.filterwarnings("ignore", message=DEPRECATED_COLLECTIVES, category=FutureWarning)
