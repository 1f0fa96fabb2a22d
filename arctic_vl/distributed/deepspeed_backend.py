"""`deepspeed`: DeepSpeed ZeRO stages 0-3 with the engine's own optimizer, scheduler and loss normalisation.

The DeepSpeed config is DERIVED from the engine config, so the two can never disagree:

    train_micro_batch_size_per_gpu  <- data.micro_batch_size
    gradient_accumulation_steps     <- trainer.gradient_accumulation_steps
    train_batch_size                <- micro x accumulation x world size
    gradient_clipping               <- trainer.max_grad_norm (0: off)
    bf16.enabled                    <- trainer.bf16
    zero_optimization.stage         <- distributed.zero_stage, offload_* from distributed.offload_*

and `distributed.config` (extra DeepSpeed keys, from the pass-through list `PASS_THROUGH` below) is merged over
that, key by key; every other key is refused at validation, naming it and why (DeepSpeed would import a module
it names, replace one of the engine's own components, or run a feature the engine does not drive). The optimizer is the
torch optimizer built from `optimizer.param_groups` (per-group LRs, names, weight decay survive), handed to
DeepSpeed as a client optimizer; the LR schedule is the engine's scheduler, stepped here after each
optimizer step and saved by the checkpointer, so resume is exact.

Loss scaling: the loop already hands `backward` the loss of a micro-batch divided by the token count of the
whole accumulated global batch and multiplied by world_size (DeepSpeed, like DDP, averages gradients over
processes). DeepSpeed would divide once more by gradient_accumulation_steps (`engine.backward` with
`scale_wrt_gas=True`); we call it with `scale_wrt_gas=False`. The accumulation boundary is set explicitly
per micro-batch (the epoch's last step may hold fewer micro-batches than configured).

Resume never unpickles: DeepSpeed loads its own `*_model_states.pt` / `*_optim_states.pt` with
`torch.load(weights_only=False)`; `load_state` runs it with every `torch.load` forced to `weights_only=True`,
allowing only the few DeepSpeed types those files hold (`DS_SAFE_GLOBALS`). A file that holds anything else
fails to load, named, instead of running code.
"""

from __future__ import annotations

import contextlib
import copy
import os
import pickle
import socket
from collections.abc import Iterator
from pathlib import Path
from typing import Any, Literal

import torch
from pydantic import Field

from arctic_vl.distributed.backends import DDP, DistributedConfig, norms_by_group
from arctic_vl.distributed.noise import quiet_deprecated_collectives
from arctic_vl.errors import CheckpointError, ConfigError
from arctic_vl.plugins import register_config_check
from arctic_vl.registry import DISTRIBUTED

#: keys of `distributed.config` that would replace the engine's own components
_OWNED_KEYS = {"optimizer": "optimizer", "scheduler": "scheduler"}
#: sub-folder of a step-N checkpoint holding DeepSpeed's own (sharded) files
DS_TAG = "deepspeed"

_ZERO_KEYS = {
    "stage", "contiguous_gradients", "reduce_scatter", "reduce_bucket_size", "use_multi_rank_bucket_allreduce",
    "allgather_partitions", "allgather_bucket_size", "overlap_comm", "compute_grad_norm", "load_from_fp32_weights",
    "sub_group_size", "ignore_unused_parameters", "legacy_stage1", "round_robin_gradients", "parameter_alignment",
    "zero_hpz_partition_size", "zero_quantized_weights", "zero_quantized_nontrainable_weights",
    "zero_quantized_gradients", "memory_efficient_linear", "override_module_apply", "log_trace_cache_warnings",
    "enable_sanity_checks", "save_muon_momentum_buffer_in_memory", "stage3_gather_fp16_weights_on_model_save",
    # ZeRO-3 knobs, under both the field names and the `stage3_` names DeepSpeed accepts
    *(f"{prefix}{key}" for prefix in ("", "stage3_") for key in (
        "prefetch_bucket_size", "param_persistence_threshold", "model_persistence_threshold", "max_live_parameters",
        "max_reuse_distance", "gather_16bit_weights_on_model_save", "module_granularity_threshold",
        "use_all_reduce_for_fetch_params", "allgather_sequential")),
    # {classes, names, name_suffixes}: DeepSpeed matches these strings against class NAMES, never imports
    "leaf_module",
}

#: what `distributed.config` may pass to DeepSpeed: top-level key -> None (a plain value) or its allowed sub-keys.
#: Each is a number, flag, dtype name or name pattern that DeepSpeed 0.19 reads as a plain value (checked in its
#: source: none is resolved to an import, a file to load or a component that replaces the engine's own)
PASS_THROUGH: dict[str, set[str] | None] = {
    "train_batch_size": None, "train_micro_batch_size_per_gpu": None, "gradient_accumulation_steps": None,
    # (these four, bf16.enabled and zero_optimization.stage must agree with the engine config)
    "gradient_clipping": None,
    "zero_optimization": _ZERO_KEYS,
    "bf16": {"enabled", "immediate_grad_update", "check_grad_overflow", "bf16_master_weights_and_grads",
             "bf16_optimizer_states"},
    "fp16": {"enabled", "auto_cast", "loss_scale", "initial_scale_power", "loss_scale_window", "hysteresis",
             "consecutive_hysteresis", "min_loss_scale", "fp16_master_weights_and_grads"},
    "torch_autocast": {"enabled", "dtype"},
    "activation_checkpointing": {"partition_activations", "number_checkpoints", "contiguous_memory_optimization",
                                 "synchronize_checkpoint_boundary", "profile", "cpu_checkpointing"},
    "data_types": {"grad_accum_dtype"},
    "communication_data_type": None, "seq_parallel_communication_data_type": None, "prescale_gradients": None,
    "gradient_predivide_factor": None, "sparse_gradients": None, "disable_allgather": None,
    "zero_allow_untested_optimizer": None, "zero_force_ds_cpu_optimizer": None,
    "steps_per_print": None, "wall_clock_breakdown": None, "memory_breakdown": None, "dump_state": None,
    "comms_logger": {"enabled", "verbose", "prof_all", "debug", "prof_ops"},
}

#: keys refused with a specific reason (everything else not in PASS_THROUGH is refused as unknown)
_REFUSED: dict[str, str] = {
    "torch_autocast.lower_precision_safe_modules": (
        "DeepSpeed imports the module named in each entry (importlib.import_module); a config never names Python "
        "code. Leave it out: DeepSpeed's default (torch Linear and Conv layers) applies"),
    "zero_optimization.offload_optimizer": "set distributed.offload_optimizer (none or cpu) instead",
    "zero_optimization.offload_param": "set distributed.offload_param (none or cpu) instead",
    "zero_optimization.cpu_offload": "set distributed.offload_optimizer: cpu instead",
    "zero_optimization.cpu_offload_param": "set distributed.offload_param: cpu instead",
    "zero_optimization.cpu_offload_use_pin_memory": "set distributed.offload_optimizer / offload_param instead",
    "checkpoint": "the engine writes, verifies and loads checkpoints itself (checkpoint: section)",
    "nebula": "the engine writes, verifies and loads checkpoints itself (checkpoint: section)",
    "datastates": "the engine writes, verifies and loads checkpoints itself (checkpoint: section)",
    "tensorboard": "the engine logs metrics itself: use the tensorboard callback",
    "wandb": "the engine logs metrics itself: use a callback",
    "csv_monitor": "the engine logs metrics itself: metrics.jsonl",
    "comet": "the engine logs metrics itself: use a callback",
    "amp": "apex AMP is not used: set trainer.bf16",
}


def pass_through_problems(extra: dict[str, Any]) -> list[tuple[tuple[str, ...], str]]:
    """(key path under distributed.config, what is wrong) for every key outside PASS_THROUGH and every value
    that is not plain data."""
    problems: list[tuple[tuple[str, ...], str]] = []
    for key, value in extra.items():
        if key in _OWNED_KEYS:
            problems.append(((key,), f"not allowed; the engine's own {key} (the `{key}:` section) is used so that "
                                     "parameter groups, per-group learning rates and resume stay exact"))
        elif key not in PASS_THROUGH:
            problems.append(((key,), "refused: " + _REFUSED.get(
                key, f"not a pass-through key; allowed: {', '.join(sorted(PASS_THROUGH))}")))
        elif PASS_THROUGH[key] is None:
            problems.extend(((key,), p) for p in _plain(value))
        elif not isinstance(value, dict):
            problems.append(((key,), f"must be a mapping of {', '.join(sorted(PASS_THROUGH[key] or ()))}"))
        else:
            allowed = PASS_THROUGH[key] or set()
            for sub, sub_value in value.items():
                name = f"{key}.{sub}"
                if name in _REFUSED:
                    problems.append(((key, sub), f"refused: {_REFUSED[name]}"))
                elif sub not in allowed:
                    problems.append(((key, sub), f"refused: not a pass-through key; allowed under {key}: "
                                                 f"{', '.join(sorted(allowed))}"))
                else:
                    check = _leaf_module if name == "zero_optimization.leaf_module" else _plain
                    problems.extend(((key, sub), p) for p in check(sub_value))
    return problems


def check_pass_through(extra: dict[str, Any]) -> None:
    """Refuse every `distributed.config` key outside PASS_THROUGH (ConfigError naming the first and why)."""
    problems = pass_through_problems(extra)
    if problems:
        keys, why = problems[0]
        raise ConfigError(f"distributed.config.{'.'.join(keys)}: {why}")


def _plain(value: Any) -> list[str]:
    """A pass-through value is a scalar or a flat list of scalars: never a mapping DeepSpeed would interpret."""
    items = value if isinstance(value, list) else [value]
    if all(v is None or isinstance(v, (bool, int, float, str)) for v in items):
        return []
    return [f"must be a number, flag, string or a list of them, got {value!r}"]


def _leaf_module(value: Any) -> list[str]:
    keys = {"classes", "names", "name_suffixes"}
    if isinstance(value, dict) and set(value) <= keys and \
            all(isinstance(v, list) and all(isinstance(s, str) for s in v) for v in value.values()):
        return []
    return [f"must be a mapping of {', '.join(sorted(keys))} to lists of names (class and module names, matched by "
            "name)"]


class DeepSpeedConfig(DistributedConfig):
    """The `distributed:` section of `deepspeed`: ZeRO stage, CPU offload, extra DeepSpeed keys, timeout."""

    type: str = "deepspeed"
    zero_stage: int = Field(2, ge=0, le=3, description="ZeRO stage: 0 none, 1 optimizer, 2 +gradients, 3 +parameters")
    offload_optimizer: Literal["none", "cpu"] = Field("none", description="keep optimizer state (and its step) on CPU")
    offload_param: Literal["none", "cpu"] = Field("none", description="ZeRO-3 only: keep parameters on CPU")
    config: dict[str, Any] = Field(
        default_factory=dict,
        description="extra DeepSpeed config keys, merged over the derived ones (nested dicts merge key by key)",
    )
    timeout_minutes: int = Field(30, ge=1, le=525_600, description="collective timeout (at most a year)")


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
    check_pass_through(config.config)
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
    # A passed-through value that contradicts the engine config would silently change the math.
    checks = [(("train_micro_batch_size_per_gpu",), micro, "data.micro_batch_size"),
              (("gradient_accumulation_steps",), gas, "trainer.gradient_accumulation_steps"),
              (("gradient_clipping",), derived["gradient_clipping"], "trainer.max_grad_norm"),
              (("bf16", "enabled"), derived["bf16"]["enabled"], "trainer.bf16"),
              (("zero_optimization", "stage"), config.zero_stage, "distributed.zero_stage")]
    if world_size is not None:
        checks.append((("train_batch_size",), micro * gas * world_size, "data.micro_batch_size x accumulation"))
    elif "train_batch_size" in config.config:
        merged.pop("train_batch_size")  # checked against the real process count at start
    for keys, want, owner in checks:
        got: Any = merged
        for k in keys:
            got = got.get(k) if isinstance(got, dict) else None
        if got != want or (type(got) is not type(want) and isinstance(want, bool)):
            raise ConfigError(f"distributed.config.{'.'.join(keys)}: {got!r} contradicts the engine config "
                              f"(derived {want!r}); set {owner} instead")
    return merged


def ds_safe_globals() -> list[Any]:
    """The non-tensor types DeepSpeed 0.19 writes into its checkpoint files, allowed for a weights-only load.

    Found with `torch.serialization.get_unsafe_globals_in_checkpoint` on ZeRO 0-3 checkpoints in fp32 and bf16:
    ZeRO's stage enum, the (static) loss scaler and the fragment addresses of flat optimizer partitions;
    fp16's dynamic loss scaler is the loss scaler's subclass. Each is rebuilt from plain fields: no code runs.
    """
    from deepspeed.runtime.fp16.loss_scaler import DynamicLossScaler, LossScaler
    from deepspeed.runtime.zero.config import ZeroStageEnum
    from deepspeed.utils.tensor_fragment import fragment_address

    return [ZeroStageEnum, LossScaler, DynamicLossScaler, fragment_address]


@contextlib.contextmanager
def weights_only_loads() -> Iterator[None]:
    """While active, every `torch.load` (DeepSpeed's `weights_only=False` ones included) is weights-only with
    `ds_safe_globals` allowed; a file that needs anything else is a CheckpointError naming it."""
    real = torch.load

    def load(f: Any, *args: Any, **kwargs: Any) -> Any:
        kwargs["weights_only"] = True
        try:
            return real(f, *args, **kwargs)
        except pickle.UnpicklingError as e:
            first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
            raise CheckpointError(
                f"{f}: refused to load: it holds Python objects a weights-only load does not allow ({first}). "
                "Checkpoint files are never unpickled (that could run code planted in them); if this checkpoint "
                "is yours, it was written by another DeepSpeed version than this one"
            ) from None
        except (RuntimeError, OSError, EOFError) as e:
            reason = getattr(e, "strerror", None) or (str(e).strip().splitlines() or [type(e).__name__])[0]
            raise CheckpointError(f"{f}: cannot load: {reason}") from None

    with torch.serialization.safe_globals(ds_safe_globals()):
        torch.load = load
        try:
            yield
        finally:
            torch.load = real


@contextlib.contextmanager
def _saves_name_their_file() -> Iterator[None]:
    """While active, a failing `torch.save` (DeepSpeed writing a shard) carries the file it was writing as the
    exception's `filename`, so the checkpointer's message names it (torch's own message does not)."""
    real = torch.save

    def save(obj: Any, f: Any, *args: Any, **kwargs: Any) -> Any:
        try:
            return real(obj, f, *args, **kwargs)
        except (OSError, RuntimeError) as e:
            if isinstance(f, (str, os.PathLike)) and not getattr(e, "filename", None):
                e.filename = os.fspath(f)  # type: ignore[attr-defined]
            raise

    torch.save = save
    try:
        yield
    finally:
        torch.save = real


#: DeepSpeed's C++ op for shared-memory collectives between the processes of a CPU machine (JIT-compiled)
SHM_OP = "deepspeed_shm_comm"


def shared_memory_op_notice(world_size: int, extensions_dir: str | os.PathLike[str] | None = None) -> str | None:
    """Before DeepSpeed joins its process group: what it will build, said once, only when it will build.

    On CPU DeepSpeed JIT-compiles its shared-memory collectives op (a C++ build: a minute or two, silent) at every
    start whose op is not in the torch extensions cache yet. One process shares no memory with another: the op is
    switched off there (no build at all). Returns the message for a build that will happen, else None.
    `extensions_dir`: the cache to look in (default: torch's, `TORCH_EXTENSIONS_DIR`)."""
    import deepspeed.ops
    from deepspeed.accelerator import get_accelerator

    builder = get_accelerator().create_op_builder("ShareMemCommBuilder")
    if builder is None or not deepspeed.ops.__compatible_ops__.get(SHM_OP, False):
        return None
    if world_size == 1:
        deepspeed.ops.__compatible_ops__[SHM_OP] = False
        return None
    from deepspeed.git_version_info import installed_ops

    if installed_ops.get(SHM_OP, False):  # built into this DeepSpeed install
        return None
    if extensions_dir is None:
        from torch.utils.cpp_extension import _get_build_directory

        cache = Path(_get_build_directory(SHM_OP, verbose=False))
    else:
        cache = Path(extensions_dir) / SHM_OP
    if (cache / f"{SHM_OP}.so").is_file():
        return None
    return (f"DeepSpeed is compiling its C++ shared-memory collectives op ({SHM_OP}) for CPU: the first start "
            f"on this machine waits a minute or two, silently; later starts reuse the build (in {cache.parent})")


def free_port() -> int:
    """A TCP port free right now on this host (for one-process runs started without a launcher)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


class _TupleLoss(torch.nn.Module):
    """Returns (loss tensor, the step's output): DeepSpeed hooks its backward bookkeeping onto tensors it can find
    in the forward output (tensors, tuples, lists, dicts); the loop's step module returns a named tuple, but a
    backend's caller may hand it any module whose output has a `loss_sum`."""

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
        """The engine's forward on `batch`; returns the trainer's LossOutput."""
        _, out = self.engine(batch, counts)
        return out

    def train(self, mode: bool = True) -> DeepSpeedModel:
        """Set the engine's train (or eval) mode; returns self, like `nn.Module.train`."""
        self.engine.train(mode)
        return self

    def eval(self) -> DeepSpeedModel:
        """`train(False)`."""
        return self.train(False)


@DISTRIBUTED.register("deepspeed")
class DeepSpeed(DDP):
    """DeepSpeed ZeRO; launched by `deepspeed --num_gpus N` or `torchrun --nproc_per_node N` (or one process)."""

    config_class = DeepSpeedConfig

    def __init__(self, config: DeepSpeedConfig, engine_config: Any = None):
        super().__init__(config, engine_config)
        self.ds_config: dict[str, Any] = {}

    def setup(self) -> None:
        """Join DeepSpeed's process group; with no launcher, set up a one-process environment (a free port) first."""
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
        quiet_deprecated_collectives()
        import deepspeed

        notice = shared_memory_op_notice(self.world_size)
        if notice and self.rank == 0:
            from loguru import logger

            logger.info(notice)
        deepspeed.init_distributed(dist_backend="nccl" if self.device.type == "cuda" else "gloo",
                                   timeout=datetime.timedelta(minutes=self.config.timeout_minutes),
                                   rank=self.rank, world_size=self.world_size)

    def prepare(self, model: torch.nn.Module, optimizer: Any, scheduler: Any) -> tuple[Any, Any, Any]:
        """`deepspeed.initialize` with the derived config; returns (DeepSpeedModel, ZeRO's optimizer, the scheduler)."""
        import deepspeed

        if self.engine_config is None:
            raise ConfigError("distributed.type deepspeed needs the engine config to derive the DeepSpeed config")
        self.ds_config = derive_ds_config(self.config, self.engine_config, self.world_size)
        # the model's own parameters of each group, in the same order on every rank: ZeRO's optimizer holds flat
        # partitions instead, and the monitors (`group_grad_norms`, `group_weight_norms`) read per parameter
        self._groups = [(str(g.get("name", "default")), list(g["params"])) for g in optimizer.param_groups]
        engine, ds_optimizer, _, _ = deepspeed.initialize(model=_TupleLoss(model), optimizer=optimizer,
                                                          config=self.ds_config)
        # The scheduler stays the engine's: it steps in `step` and the checkpointer saves it. Its optimizer's
        # param_groups are the very dicts ZeRO reads the LR from, so its updates reach DeepSpeed.
        return DeepSpeedModel(engine, model), ds_optimizer, scheduler

    # -- the step -----------------------------------------------------------------------------------
    @contextlib.contextmanager
    def no_sync(self, model: DeepSpeedModel, sync: bool) -> Iterator[None]:
        """Mark whether this micro-batch ends the step (`sync`): DeepSpeed reduces and steps at that boundary."""
        model.engine.set_gradient_accumulation_boundary(sync)
        yield

    def backward(self, model: DeepSpeedModel, loss: torch.Tensor) -> None:
        """The engine's backward, not divided by the accumulation steps: the loop's loss is already normalised
        for the whole accumulated batch."""
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
        """Each group's norm of the reduced (averaged over processes) gradient, before clipping. ZeRO 1-2 keep each
        rank's part of a reduced gradient, ZeRO-3 too: DeepSpeed assembles the whole one (`get_full_hp_grad`,
        `get_fp32_grad_for_param`, the bodies of `deepspeed.utils.safe_get_full_grad`), a collective, so every
        rank walks the same parameters in the same order. Call between the step's last backward and `step`."""
        return norms_by_group((name, [_full_grad(p) for p in params]) for name, params in self._groups)

    def group_weight_norms(self, model: DeepSpeedModel, optimizer: Any) -> dict[str, float]:
        """Each group's weight norm: ZeRO 0-2 hold every weight on every rank; ZeRO-3 gathers each partitioned
        one (`safe_get_full_fp32_param`, a collective: same parameters in the same order on every rank)."""
        if model.engine.zero_optimization_stage() != 3:
            return norms_by_group(self._groups)
        from deepspeed.utils import safe_get_full_fp32_param

        return norms_by_group((name, [safe_get_full_fp32_param(p) for p in params]) for name, params in self._groups)

    def unwrap(self, model: Any) -> torch.nn.Module:
        """The loop's model+loss module inside a DeepSpeedModel (or `model` as is)."""
        return model.step_module if isinstance(model, DeepSpeedModel) else model

    @property
    def shards_parameters(self) -> bool:
        """ZeRO-3 once `prepare` has partitioned the model."""
        return bool(self.ds_config) and self.config.zero_stage == 3

    # -- checkpoints ----------------------------------------------------------------------------------
    def save_state(self, model: DeepSpeedModel, optimizer: Any, path: str) -> bool:
        """Every rank writes its shard under `path/deepspeed/` (trainable weights and optimizer state)."""
        with _saves_name_their_file():
            model.engine.save_checkpoint(path, tag=DS_TAG, save_latest=False, exclude_frozen_parameters=True)
        return True

    def load_state(self, model: DeepSpeedModel, optimizer: Any, path: str) -> bool:
        """Load this rank's shard; frozen weights are rebuilt by the model factory (not saved)."""
        from pathlib import Path

        # (the loop has already refused a different process count, naming both)
        if not (Path(path) / DS_TAG).is_dir():
            raise ConfigError(f"{path}: no DeepSpeed state in {DS_TAG}/ (was it saved with distributed.type "
                              f"{self.config.type}?)")
        with weights_only_loads():  # DeepSpeed's own loader would unpickle its files
            load_path, _ = model.engine.load_checkpoint(path, tag=DS_TAG, load_module_strict=False,
                                                        load_optimizer_states=True, load_lr_scheduler_states=False)
        if load_path is None:
            raise CheckpointError(f"{Path(path) / DS_TAG}: DeepSpeed found no checkpoint it could load there")
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


def _full_grad(param: torch.nn.Parameter) -> torch.Tensor | None:
    """The whole reduced gradient of `param` under ZeRO 1-3, on every rank (a collective).

    `safe_get_full_grad` returns `param.grad` first when it is set, which some ranks may hold and others not
    (a rank-local, unreduced gradient): that would break the lockstep, so the ZeRO paths are taken directly."""
    if hasattr(param, "ds_id"):  # ZeRO-3
        return param._z3_optimizer.get_fp32_grad_for_param(param)
    if hasattr(param, "_hp_mapping"):  # ZeRO 1 and 2
        return param.get_full_hp_grad()
    from deepspeed.utils import safe_get_full_grad

    return safe_get_full_grad(param)


def _check_config(cfg: Any, located: Any) -> None:
    """`arctic_vl validate` (and every start) derives the DeepSpeed config once, before any launcher runs; every
    refused pass-through key is reported at its own line."""
    if not isinstance(cfg.distributed, DeepSpeedConfig):
        return
    problems = pass_through_problems(cfg.distributed.config)
    if problems:
        lines = [f"{located.where(('distributed', 'config', *keys))}: distributed.config.{'.'.join(keys)}: {why}"
                 for keys, why in problems]
        raise ConfigError("invalid config:\n  " + "\n  ".join(lines) if len(lines) > 1 else lines[0])
    try:
        derive_ds_config(cfg.distributed, cfg, None)
    except ConfigError as e:
        keys = str(e).split(":", 1)[0].removeprefix("distributed.").split(".")
        raise ConfigError(f"{located.where(('distributed', *keys))}: {e}") from None


register_config_check(_check_config)
