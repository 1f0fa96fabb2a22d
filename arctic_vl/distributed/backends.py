"""Process setup and the few collective operations the training loop needs.

`single` is one process; `ddp` is torch DistributedDataParallel (gloo on CPU, nccl on GPU), launched by
`torchrun` or `deepspeed`. The DeepSpeed ZeRO backend lives in `deepspeed_backend.py`.
"""

from __future__ import annotations

import contextlib
import os
import re
from collections.abc import Iterator
from typing import Any, Literal

import torch
from pydantic import Field

from arctic_vl.errors import ConfigError
from arctic_vl.registry import DISTRIBUTED, Component, ComponentConfig


class DistributedConfig(ComponentConfig):
    """The `distributed:` section: the device to train on (all `single` has; the other backends add theirs)."""

    type: str = "single"
    device: Literal["auto", "cpu", "cuda"] = Field("auto", description="auto: cuda when available")


class DistributedBackend(Component):
    """One process; subclasses add process groups. Owns backward, clipping and the optimizer step.

    The loop calls `setup`, `prepare(step_module, optimizer, scheduler)`, then per step `no_sync`,
    `backward`, `group_grad_norms`, `step`, and the collectives `all_reduce_sum` / `barrier`; checkpoints go
    through `save_state` / `load_state` (engine-owned sharded state) and `full_state_dict` (export).
    """

    config_class = DistributedConfig

    def __init__(self, config: DistributedConfig, engine_config: Any = None):
        self.config = config
        #: the whole run's config, for backends that derive their own settings from it (DeepSpeed)
        self.engine_config = engine_config
        self.rank, self.world_size, self.local_rank = 0, 1, 0
        self.device = torch.device("cpu")

    # -- set-up -------------------------------------------------------------------------------------
    def setup(self) -> None:
        """Pick the device (`device: auto` takes CUDA when available); one process needs no process group."""
        self.device = self._pick_device()

    def _pick_device(self) -> torch.device:
        want = self.config.device
        if want == "cuda" or (want == "auto" and torch.cuda.is_available()):
            torch.cuda.set_device(self.local_rank)
            return torch.device("cuda", self.local_rank)
        return torch.device("cpu")

    def prepare(self, model: torch.nn.Module, optimizer: Any, scheduler: Any) -> tuple[Any, Any, Any]:
        """Move/wrap the model; returns (model, optimizer, scheduler) as the loop should use them."""
        return model, optimizer, scheduler

    def teardown(self, clean: bool = False) -> None:
        """Release what `setup` made (one process: nothing). `clean`: every process got here the same way (the
        run or evaluation finished), so they may wait for each other first; False on an error path, where a
        peer may be gone and waiting would hang."""

    @property
    def is_main(self) -> bool:
        """True on rank 0, the process that writes files and logs."""
        return self.rank == 0

    # -- the step -----------------------------------------------------------------------------------
    @contextlib.contextmanager
    def no_sync(self, model: Any, sync: bool) -> Iterator[None]:
        """Skip gradient all-reduce on all but the last micro-batch of a step."""
        yield

    def backward(self, model: Any, loss: torch.Tensor) -> None:
        """Backpropagate `loss` (already scaled for the whole accumulated batch)."""
        loss.backward()

    def step(self, model: Any, optimizer: Any, scheduler: Any, max_grad_norm: float | None, *,
             skip_nonfinite: bool = False, loss_finite: bool = True) -> tuple[float, bool]:
        """Clip, step the optimizer and the scheduler, zero grads; (gradient norm before clipping, stepped).

        With `skip_nonfinite`, a step whose loss (`loss_finite`, the global loss) or gradient norm is not
        finite leaves the weights and the optimizer state untouched: grads are dropped, the scheduler steps.
        (Under DDP the gradients are already averaged, so every rank sees the same norm and decides alike.)
        """
        params = [p for g in optimizer.param_groups for p in g["params"]]
        norm = torch.nn.utils.get_total_norm([p.grad for p in params if p.grad is not None])
        finite = loss_finite and bool(torch.isfinite(norm))
        stepped = finite or not skip_nonfinite
        if stepped:
            if max_grad_norm:
                torch.nn.utils.clip_grads_with_norm_(params, max_grad_norm, norm)
            optimizer.step()
        scheduler.step()
        optimizer.zero_grad(set_to_none=True)
        return float(norm), stepped

    def group_grad_norms(self, model: Any, optimizer: Any) -> dict[str, float]:
        """The gradient norm of each optimizer parameter group, by group name (decay and no-decay halves of a
        configured group together), before clipping. Call between backward and `step`."""
        return norms_by_group((group.get("name", "default"), [p.grad for p in group["params"]])
                               for group in optimizer.param_groups)

    def group_weight_norms(self, model: Any, optimizer: Any) -> dict[str, float]:
        """The weight norm of each optimizer parameter group, by group name (decay and no-decay halves together)."""
        return norms_by_group((group.get("name", "default"), group["params"]) for group in optimizer.param_groups)

    def unwrap(self, model: Any) -> torch.nn.Module:
        """The loop's own module inside what `prepare` returned (one process: `model` itself)."""
        return model

    # -- collectives --------------------------------------------------------------------------------
    def all_reduce_sum(self, values: list[float]) -> list[float]:
        """Element-wise sums of `values` over all ranks, on every rank (one process: a copy)."""
        return list(values)

    def barrier(self) -> None:
        """Wait until every rank gets here (one process: return at once)."""

    def broadcast_object(self, obj: Any) -> Any:
        """Rank 0's `obj` (picklable), on every rank."""
        return obj

    def all_gather_object(self, obj: Any) -> list[Any]:
        """Every rank's `obj` (picklable), in rank order, on every rank."""
        return [obj]

    @property
    def shards_parameters(self) -> bool:
        """True when the prepared model's parameters are partitioned over ranks (ZeRO-3): every forward is then
        a collective, so all ranks must run the same modules the same number of times (evaluation too)."""
        return False

    # -- checkpoint hooks (DeepSpeed keeps its own sharded state) ---------------------------------------
    def save_state(self, model: Any, optimizer: Any, path: str) -> bool:
        """Save engine-owned state under `path`; False means the checkpointer saves model/optimizer itself."""
        return False

    def load_state(self, model: Any, optimizer: Any, path: str) -> bool:
        """Load engine-owned state saved by `save_state` from `path`; False means the checkpointer loads it itself."""
        return False

    def full_state_dict(self, model: Any) -> dict[str, torch.Tensor] | None:
        """Full weights on rank 0 for export (ZeRO-3 gathers); None: use the module as is."""
        return None


DISTRIBUTED.bind_base(DistributedBackend)


def norms_by_group(groups: Any) -> dict[str, float]:
    """{group name: L2 norm} of (name, tensors) pairs, the halves of a group (`name/no_decay`) together; float64
    sums of squares, so the result does not depend on how the tensors are split."""
    squares: dict[str, float] = {}
    for name, tensors in groups:
        key = str(name).split("/", 1)[0]
        sq = sum(float(t.detach().double().square().sum()) for t in tensors if t is not None)
        squares[key] = squares.get(key, 0.0) + sq
    return {name: sq ** 0.5 for name, sq in squares.items()}


@DISTRIBUTED.register("single")
class Single(DistributedBackend):
    """One process, one device."""


class DDPConfig(DistributedConfig):
    """The `distributed:` section of `ddp`: unused-parameter detection and the collective timeout."""

    type: str = "ddp"
    find_unused_parameters: bool = Field(
        True, description="needed when some parameters get no grad on a step "
        "(e.g. text-only batches, vision_feature_layer=-1)"
    )
    timeout_minutes: int = Field(30, ge=1, le=525_600, description="collective timeout (at most a year)")


def unused_parameters_error(error: RuntimeError, model: Any, config: Any) -> Exception:
    """PyTorch DDP's error for parameters that got no gradient, as a ConfigError naming the config key to set
    and the parameters (DDP's indices count the module's trainable parameters); any other error as it is."""
    text = str(error)
    if "finished reduction in the prior iteration" not in text and "did not receive grad" not in text:
        return error
    names = [n for n, p in getattr(model, "module", model).named_parameters() if p.requires_grad]
    found = re.search(r"did not receive grad for rank \d+: ([\d, ]+)", text)
    unused = [names[int(i)].removeprefix("model.") for i in re.findall(r"\d+", found.group(1))
              if int(i) < len(names)] if found else []
    which = f" ({len(unused)} of them, e.g. {', '.join(unused[:4])})" if unused else ""
    hint = "" if getattr(config, "find_unused_parameters", True) else (
        "distributed.find_unused_parameters is false, but ")
    return ConfigError(
        f"{hint}some trainable parameters got no gradient in a step{which}: DDP waits for every parameter "
        "it was given. Set distributed.find_unused_parameters: true (the default; needed whenever a step leaves "
        "some weights out, e.g. CLIP's post_layernorm with vision_feature_layer -1), or freeze the unused "
        "parameters (model.freeze)")


@DISTRIBUTED.register("ddp")
class DDP(DistributedBackend):
    """torch DistributedDataParallel; env from torchrun/deepspeed (RANK, WORLD_SIZE, LOCAL_RANK, MASTER_*)."""

    config_class = DDPConfig

    def setup(self) -> None:
        """Read RANK/WORLD_SIZE/LOCAL_RANK, pick the device, join the process group (nccl on CUDA, else gloo)."""
        import datetime

        import torch.distributed as dist

        self.rank = int(os.environ.get("RANK", 0))
        self.world_size = int(os.environ.get("WORLD_SIZE", 1))
        self.local_rank = int(os.environ.get("LOCAL_RANK", 0))
        self.device = self._pick_device()
        if not dist.is_initialized():
            os.environ.setdefault("MASTER_ADDR", "127.0.0.1")
            os.environ.setdefault("MASTER_PORT", "29500")
            backend = "nccl" if self.device.type == "cuda" else "gloo"
            dist.init_process_group(backend, rank=self.rank, world_size=self.world_size,
                                    timeout=datetime.timedelta(minutes=self.config.timeout_minutes))

    def prepare(self, model: torch.nn.Module, optimizer: Any, scheduler: Any) -> tuple[Any, Any, Any]:
        """Wrap the model in DistributedDataParallel (one process: left as is); optimizer and scheduler unchanged."""
        from torch.nn.parallel import DistributedDataParallel

        if self.world_size == 1:
            return model, optimizer, scheduler
        wrapped = DistributedDataParallel(
            model, device_ids=[self.local_rank] if self.device.type == "cuda" else None,
            find_unused_parameters=self.config.find_unused_parameters,
        )
        return wrapped, optimizer, scheduler

    @contextlib.contextmanager
    def no_sync(self, model: Any, sync: bool) -> Iterator[None]:
        """Skip DDP's all-reduce unless `sync`; DDP's unused-parameter error becomes a ConfigError naming the fix."""
        try:
            if sync or not hasattr(model, "no_sync"):
                yield
            else:
                with model.no_sync():
                    yield
        except RuntimeError as e:  # the forward and backward of a micro-batch run inside this block
            raise unused_parameters_error(e, model, self.config) from None

    def unwrap(self, model: Any) -> torch.nn.Module:
        """The module inside DistributedDataParallel (or `model` when not wrapped)."""
        return getattr(model, "module", model)

    def all_reduce_sum(self, values: list[float]) -> list[float]:
        """Element-wise sums of `values` over all ranks (float64, on the device for nccl), on every rank."""
        import torch.distributed as dist

        if self.world_size == 1:
            return list(values)
        t = torch.tensor(values, dtype=torch.float64, device=self.device if self.device.type == "cuda" else "cpu")
        dist.all_reduce(t)
        return t.tolist()

    def barrier(self) -> None:
        """torch.distributed barrier, when a process group is up."""
        import torch.distributed as dist

        if dist.is_initialized():
            dist.barrier()

    def broadcast_object(self, obj: Any) -> Any:
        """Rank 0's `obj` (picklable), on every rank."""
        import torch.distributed as dist

        if self.world_size == 1:
            return obj
        box = [obj]
        dist.broadcast_object_list(box, src=0)
        return box[0]

    def all_gather_object(self, obj: Any) -> list[Any]:
        """Every rank's `obj` (picklable), in rank order, on every rank."""
        import torch.distributed as dist

        if self.world_size == 1:
            return [obj]
        out: list[Any] = [None] * self.world_size
        dist.all_gather_object(out, obj)
        return out

    def teardown(self, clean: bool = False) -> None:
        """Destroy the process group, when one is up; after a clean finish, first a barrier, so no process
        tears its group down while a peer's last collective (gloo's worker threads) is still in flight, which
        can abort that peer at exit ("terminate called without an active exception")."""
        import torch.distributed as dist

        if dist.is_initialized():
            if clean and self.world_size > 1:
                dist.barrier()
            dist.destroy_process_group()
