"""`deepspeed`: DeepSpeed ZeRO stages 0-3 with the engine's own optimizer, scheduler and loss normalisation.

The DeepSpeed config is DERIVED from the engine config, so the two can never disagree:

    train_micro_batch_size_per_gpu  <- data.micro_batch_size
    gradient_accumulation_steps     <- trainer.gradient_accumulation_steps
    train_batch_size                <- micro x accumulation x world size
    gradient_clipping               <- trainer.max_grad_norm (0: off)
    bf16.enabled                    <- trainer.bf16
    zero_optimization.stage         <- distributed.zero_stage, offload_* from distributed.offload_*

and `distributed.config` (any extra DeepSpeed keys) is merged over that, key by key. The optimizer is the
torch optimizer built from `optimizer.param_groups` (per-group LRs, names, weight decay survive), handed to
DeepSpeed as a client optimizer; the LR schedule is the engine's scheduler, stepped here after each
optimizer step and saved by the checkpointer, so resume is exact.

Loss scaling: the loop already hands `backward` the loss of a micro-batch divided by the token count of the
whole accumulated global batch and multiplied by world_size (DeepSpeed, like DDP, averages gradients over
processes). DeepSpeed would divide once more by gradient_accumulation_steps (`engine.backward` with
`scale_wrt_gas=True`); we call it with `scale_wrt_gas=False`. The accumulation boundary is set explicitly
per micro-batch (the epoch's last step may hold fewer micro-batches than configured).
"""

from __future__ import annotations

import contextlib
import copy
import os
import socket
from collections.abc import Iterator
from typing import Any, Literal

import torch
from pydantic import Field

from arctic_vl.distributed.backends import DDP, DistributedConfig
from arctic_vl.errors import ConfigError
from arctic_vl.plugins import register_config_check
from arctic_vl.registry import DISTRIBUTED

#: keys of `distributed.config` that would replace the engine's own components
_OWNED_KEYS = {"optimizer": "optimizer", "scheduler": "scheduler"}
#: sub-folder of a step-N checkpoint holding DeepSpeed's own (sharded) files
DS_TAG = "deepspeed"


class DeepSpeedConfig(DistributedConfig):
    type: str = "deepspeed"
    zero_stage: int = Field(2, ge=0, le=3, description="ZeRO stage: 0 none, 1 optimizer, 2 +gradients, 3 +parameters")
    offload_optimizer: Literal["none", "cpu"] = Field("none", description="keep optimizer state (and its step) on CPU")
    offload_param: Literal["none", "cpu"] = Field("none", description="ZeRO-3 only: keep parameters on CPU")
    config: dict[str, Any] = Field(
        default_factory=dict,
        description="extra DeepSpeed config keys, merged over the derived ones (nested dicts merge key by key)",
    )
    timeout_minutes: int = Field(30, ge=1)


def merge(base: dict[str, Any], extra: dict[str, Any]) -> dict[str, Any]:
    """`extra` over `base`, recursing into dicts present in both (a copy; neither input changes)."""
    out = copy.deepcopy(base)
    for key, value in extra.items():
        if isinstance(value, dict) and isinstance(out.get(key), dict):
            out[key] = merge(out[key], value)
        else:
            out[key] = copy.deepcopy(value)
    return out


def derive_ds_config(config: DeepSpeedConfig, engine_config: Any, world_size: int | None) -> dict[str, Any]:
    """The DeepSpeed config for this run: derived from the engine config, then `config.config` merged over it.

    Pure (no process group, no import of deepspeed), so `arctic_vl validate` can check it before any launch;
    `world_size` None (validation: the launcher decides it) derives and checks everything but train_batch_size.
    """
    for key, section in _OWNED_KEYS.items():
        if key in config.config:
            raise ConfigError(
                f"distributed.config.{key}: not allowed; the engine's own {section} (the `{section}:` section) is "
                "used so that parameter groups, per-group learning rates and resume stay exact"
            )
    if config.offload_param != "none" and config.zero_stage != 3:
        raise ConfigError(f"distributed.offload_param: {config.offload_param!r} needs zero_stage 3 "
                          f"(got zero_stage {config.zero_stage})")
    if config.offload_optimizer != "none" and config.zero_stage == 0:
        raise ConfigError("distributed.offload_optimizer: needs zero_stage 1, 2 or 3 (got zero_stage 0)")
    trainer = engine_config.trainer
    micro = int(getattr(engine_config.data, "micro_batch_size", 1))
    gas = int(trainer.gradient_accumulation_steps)
    zero: dict[str, Any] = {"stage": config.zero_stage}
    if config.offload_optimizer != "none":
        zero["offload_optimizer"] = {"device": config.offload_optimizer}
    if config.offload_param != "none":
        zero["offload_param"] = {"device": config.offload_param}
    derived: dict[str, Any] = {
        "train_micro_batch_size_per_gpu": micro,
        "gradient_accumulation_steps": gas,
        "train_batch_size": micro * gas * (world_size or 1),
        "gradient_clipping": float(trainer.max_grad_norm or 0.0),
        "bf16": {"enabled": bool(trainer.bf16)},
        "zero_optimization": zero,
        # the engine's torch optimizer is a "client" optimizer: ZeRO must be told it may wrap it
        "zero_allow_untested_optimizer": True,
        # with offload DeepSpeed would insist on its CPU Adam (a C++ build); torch AdamW steps on CPU instead
        "zero_force_ds_cpu_optimizer": False,
        "steps_per_print": 2**31 - 1,  # the loop logs; DeepSpeed's own progress lines would duplicate it
        "wall_clock_breakdown": False,
    }
    merged = merge(derived, config.config)
    # A passed-through batch size that contradicts the data section would silently change the math.
    checks = [("train_micro_batch_size_per_gpu", micro), ("gradient_accumulation_steps", gas)]
    if world_size is not None:
        checks.append(("train_batch_size", micro * gas * world_size))
    elif "train_batch_size" in config.config:
        merged.pop("train_batch_size")  # checked against the real process count at start
    for key, want in checks:
        if merged.get(key) != want:
            raise ConfigError(f"distributed.config.{key}: {merged.get(key)!r} contradicts the engine config "
                              f"(derived {want}); set data.micro_batch_size / trainer.gradient_accumulation_steps instead")
    return merged


def free_port() -> int:
    """A TCP port free right now on this host (for one-process runs started without a launcher)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


class _TupleLoss(torch.nn.Module):
    """Returns (loss tensor, LossOutput): DeepSpeed hooks its backward bookkeeping onto tensors it can find in
    the forward output (tensors, tuples, lists, dicts), and a dataclass hides the loss from it."""

    def __init__(self, inner: torch.nn.Module):
        super().__init__()
        self.inner = inner

    def forward(self, batch: dict[str, Any], counts: Any) -> tuple[torch.Tensor, Any]:
        out = self.inner(batch, counts)
        return out.loss_sum, out


class DeepSpeedModel:
    """What the loop holds as its model under DeepSpeed: calling it runs the engine's forward and returns the
    trainer's LossOutput; `engine` is the DeepSpeedEngine, `step_module` the loop's model+loss module."""

    def __init__(self, engine: Any, step_module: torch.nn.Module):
        self.engine = engine
        self.step_module = step_module

    def __call__(self, batch: dict[str, Any], counts: Any) -> Any:
        _, out = self.engine(batch, counts)
        return out

    def train(self, mode: bool = True) -> DeepSpeedModel:
        self.engine.train(mode)
        return self

    def eval(self) -> DeepSpeedModel:
        return self.train(False)


@DISTRIBUTED.register("deepspeed")
class DeepSpeed(DDP):
    """DeepSpeed ZeRO; launched by `deepspeed --num_gpus N` or `torchrun --nproc_per_node N` (or one process)."""

    config_class = DeepSpeedConfig

    def __init__(self, config: DeepSpeedConfig, engine_config: Any = None):
        super().__init__(config, engine_config)
        self.ds_config: dict[str, Any] = {}

    def setup(self) -> None:
        import datetime

        # One process without a launcher: DeepSpeed still wants the launcher's environment.
        if "RANK" not in os.environ:
            os.environ.update({"RANK": "0", "WORLD_SIZE": "1", "LOCAL_RANK": "0"})
            os.environ.setdefault("MASTER_ADDR", "127.0.0.1")
            os.environ.setdefault("MASTER_PORT", str(free_port()))
        os.environ.setdefault("MASTER_ADDR", "127.0.0.1")
        self.rank = int(os.environ["RANK"])
        self.world_size = int(os.environ.get("WORLD_SIZE", 1))
        self.local_rank = int(os.environ.get("LOCAL_RANK", 0))
        self.device = self._pick_device()
        import deepspeed

        deepspeed.init_distributed(dist_backend="nccl" if self.device.type == "cuda" else "gloo",
                                   timeout=datetime.timedelta(minutes=self.config.timeout_minutes),
                                   rank=self.rank, world_size=self.world_size)

    def prepare(self, model: torch.nn.Module, optimizer: Any, scheduler: Any) -> tuple[Any, Any, Any]:
        import deepspeed

        if self.engine_config is None:
            raise ConfigError("distributed.type deepspeed needs the engine config to derive the DeepSpeed config")
        self.ds_config = derive_ds_config(self.config, self.engine_config, self.world_size)
        engine, ds_optimizer, _, _ = deepspeed.initialize(model=_TupleLoss(model), optimizer=optimizer,
                                                          config=self.ds_config)
        # The scheduler stays the engine's: it steps in `step` and the checkpointer saves it. Its optimizer's
        # param_groups are the very dicts ZeRO reads the LR from, so its updates reach DeepSpeed.
        return DeepSpeedModel(engine, model), ds_optimizer, scheduler

    # -- the step -----------------------------------------------------------------------------------
    @contextlib.contextmanager
    def no_sync(self, model: DeepSpeedModel, sync: bool) -> Iterator[None]:
        # The loop's last micro-batch of a step is the boundary: reduction and the optimizer step happen there.
        model.engine.set_gradient_accumulation_boundary(sync)
        yield

    def backward(self, model: DeepSpeedModel, loss: torch.Tensor) -> None:
        # The loop's loss is already normalised for the whole accumulated batch: no division by the accumulation.
        model.engine.backward(loss, scale_wrt_gas=False)

    def step(self, model: DeepSpeedModel, optimizer: Any, scheduler: Any, max_grad_norm: float | None, *,
             skip_nonfinite: bool = False, loss_finite: bool = True) -> tuple[float, bool]:
        """DeepSpeed's own step (clipping inside), then the engine's scheduler; (grad norm, stepped).

        ZeRO 1-3 already skip a step whose gradient norm is not finite (their overflow check, which also
        drops the reduced gradients); `stepped` is DeepSpeed's `was_step_applied()`, so the loop's NaN guard
        counts such a step as skipped. (A non-finite step DeepSpeed applies anyway, e.g. ZeRO-0, is reported
        by the loop as a failure.)
        """
        engine = model.engine
        norm = None
        if engine.zero_optimization_stage() == 0 and not engine.bfloat16_enabled():
            # Plain fp32 DeepSpeed clips without keeping the norm; gradients are reduced and whole here.
            grads = [p.grad for p in engine.module.parameters() if p.grad is not None]
            norm = float(torch.nn.utils.get_total_norm(grads)) if grads else 0.0
        engine.step()
        scheduler.step()
        if norm is None:
            got = engine.get_global_grad_norm()
            norm = float(got) if got is not None else float("nan")
        return norm, bool(engine.was_step_applied())

    def group_grad_norms(self, model: DeepSpeedModel, optimizer: Any) -> dict[str, float]:
        """Not available under ZeRO (gradients are partitioned and reduced inside DeepSpeed's step): {}."""
        return {}

    def unwrap(self, model: Any) -> torch.nn.Module:
        return model.step_module if isinstance(model, DeepSpeedModel) else model

    @property
    def shards_parameters(self) -> bool:
        """ZeRO-3 once `prepare` has partitioned the model."""
        return bool(self.ds_config) and self.config.zero_stage == 3

    # -- checkpoints ----------------------------------------------------------------------------------
    def save_state(self, model: DeepSpeedModel, optimizer: Any, path: str) -> bool:
        """Every rank writes its shard under `path/deepspeed/` (trainable weights and optimizer state)."""
        model.engine.save_checkpoint(path, tag=DS_TAG, save_latest=False, exclude_frozen_parameters=True)
        return True

    def load_state(self, model: DeepSpeedModel, optimizer: Any, path: str) -> bool:
        """Load this rank's shard; frozen weights are rebuilt by the model factory (not saved)."""
        from pathlib import Path

        # (the loop has already refused a different process count, naming both)
        if not (Path(path) / DS_TAG).is_dir():
            raise ConfigError(f"{path}: no DeepSpeed state in {DS_TAG}/ (was it saved with distributed.type "
                              f"{self.config.type}?)")
        load_path, _ = model.engine.load_checkpoint(path, tag=DS_TAG, load_module_strict=False,
                                                    load_optimizer_states=True, load_lr_scheduler_states=False)
        if load_path is None:
            raise RuntimeError(f"{path}: DeepSpeed could not load {DS_TAG}/")
        return True

    def full_state_dict(self, model: Any) -> dict[str, torch.Tensor] | None:
        """ZeRO-3: gather every weight onto rank 0 (a collective: all ranks call it); other stages: None."""
        engine = model.engine if isinstance(model, DeepSpeedModel) else None
        if engine is None or engine.zero_optimization_stage() != 3:
            return None
        full = engine._zero3_consolidated_16bit_state_dict()
        if full is None:  # not rank 0
            return None
        prefix = "inner."
        return {k[len(prefix):]: v for k, v in full.items() if k.startswith(prefix)}


def _check_config(cfg: Any, located: Any) -> None:
    """`arctic_vl validate` (and every start) derives the DeepSpeed config once, before any launcher runs."""
    if isinstance(cfg.distributed, DeepSpeedConfig):
        try:
            derive_ds_config(cfg.distributed, cfg, None)
        except ConfigError as e:
            raise ConfigError(f"{located.where(('distributed',))}: {e}") from None


register_config_check(_check_config)
