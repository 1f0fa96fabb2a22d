"""Experiment trackers: Weights & Biases (`wandb`) and MLflow (`mlflow`), both optional dependencies.

Install with `pip install 'arctic-vl[trackers]'`; a config naming a tracker whose package is missing is an
error at validation (exit 2), not at the end of a long run. Both log, on the main process only, the resolved
config (wandb: the run config; MLflow: flattened params and a `config.yaml` artifact), every metrics.jsonl
line under `train/` at its step, evaluations during training under `eval/` and standalone evaluations
(`arctic_vl evaluate`) under `eval_standalone/` at the step of the weights evaluated. A resumed run, and a
standalone evaluation of it, log into the same tracker run: its id is kept in OUTPUT_DIR/trackers.json.
"""

from __future__ import annotations

import importlib.util
import json
import time
import uuid
from pathlib import Path
from typing import Any, Literal

from pydantic import Field, model_validator

from arctic_vl.callbacks.base import Callback, StepInfo
from arctic_vl.callbacks.builtin import flat_scalars
from arctic_vl.config.paths import ConfigPath
from arctic_vl.config.run_files import no_follow_opener, refuse_link, replace_file
from arctic_vl.registry import CALLBACKS, ComponentConfig

#: OUTPUT_DIR/trackers.json: tracker name -> what reopens its run (wandb run id, MLflow run id)
TRACKERS_FILE = "trackers.json"


def require_package(package: str, callback: str) -> None:
    """A ValueError (a validation error of the callback's section) when `package` is not installed."""
    if importlib.util.find_spec(package) is None:
        raise ValueError(f"callback type {callback!r} needs the {package!r} package, which is not installed: "
                         f"pip install 'arctic-vl[trackers]' (or pip install {package})")


def saved_run(output_dir: Path, tracker: str) -> dict[str, Any]:
    """What trackers.json keeps for `tracker` ({} for a new run)."""
    path = output_dir / TRACKERS_FILE
    return dict(json.loads(path.read_text()).get(tracker, {})) if path.is_file() else {}


def save_run(output_dir: Path, tracker: str, info: dict[str, Any]) -> None:
    """Record what reopens `tracker`'s run in OUTPUT_DIR/trackers.json (written to a temporary file, then replaced;
    a symbolic link there is refused, never followed: `arctic_vl.config.run_files`)."""
    path = output_dir / TRACKERS_FILE
    refuse_link(path)
    data = {}
    if path.is_file():
        with open(path, encoding="utf-8", opener=no_follow_opener) as fh:  # (not someone's file, hard-linked here)
            data = json.loads(fh.read())
    data[tracker] = info
    replace_file(path, json.dumps(data, indent=1))


def step_scalars(metrics: dict[str, Any]) -> dict[str, float]:
    """The numbers of a metrics.jsonl line under `train/` (the step is the tracker's own axis)."""
    return {f"train/{k}": v for k, v in flat_scalars(metrics).items() if k != "step"}


def eval_scalars(trainer: Any, results: dict[str, Any]) -> dict[str, float]:
    """The numbers of evaluation results under `eval/` (`eval_standalone/` for `arctic_vl evaluate`)."""
    prefix = "eval_standalone" if trainer.standalone_evaluation else "eval"
    return {f"{prefix}/{k}": v for k, v in flat_scalars(results).items()}


def flat_params(config: dict[str, Any], prefix: str = "") -> dict[str, str]:
    """A nested config as `section.key` -> value text (MLflow params are flat strings)."""
    out: dict[str, str] = {}
    for key, value in config.items():
        name = f"{prefix}{key}"
        if isinstance(value, dict) and value:
            out.update(flat_params(value, f"{name}."))
        else:
            out[name] = json.dumps(value) if not isinstance(value, str) else value
    return out


# ----------------------------------------------------------------------------------------------- wandb
class WandbConfig(ComponentConfig):
    """Options of the `wandb` callback: the W&B project, run name, tags and mode (checks wandb is installed)."""

    type: str = "wandb"
    project: str = Field("arctic-vl", description="W&B project")
    entity: str | None = Field(None, description="W&B entity (team or user); default: yours")
    name: str | None = Field(None, description="run name; default: the output directory's name")
    group: str | None = None
    tags: list[str] = Field(default_factory=list)
    mode: Literal["online", "offline", "disabled"] | None = Field(
        None, description="default: the WANDB_MODE environment variable, else online")
    dir: ConfigPath | None = Field(None, description="where wandb writes its files; default: OUTPUT_DIR")

    @model_validator(mode="after")
    def _installed(self) -> WandbConfig:
        require_package("wandb", "wandb")
        return self


@CALLBACKS.register("wandb")
class Wandb(Callback):
    """Weights & Biases: the resolved config and every metrics line and evaluation (main process)."""

    config_class = WandbConfig

    def __init__(self, config: WandbConfig):
        super().__init__(config)
        self.run: Any = None

    def on_run_start(self, trainer: Any) -> None:
        """Start or resume (the id in trackers.json) the W&B run with the resolved config, on the main process."""
        if not trainer.is_main:
            return
        import wandb

        c = self.config
        saved = saved_run(trainer.output_dir, "wandb")
        run_id = saved.get("id") or uuid.uuid4().hex[:12]
        self.run = wandb.init(
            project=c.project, entity=c.entity, name=c.name or trainer.output_dir.name, group=c.group,
            tags=c.tags or None, mode=c.mode, dir=c.dir or str(trainer.output_dir), config=trainer.run_config,
            id=run_id, resume="allow", job_type="evaluate" if trainer.standalone_evaluation else "train",
        )
        # standalone evaluations have their own step axis: the run's own steps only go forward
        self.run.define_metric("eval_standalone/step")
        self.run.define_metric("eval_standalone/*", step_metric="eval_standalone/step")
        save_run(trainer.output_dir, "wandb", {"id": run_id, "project": c.project})

    def on_step_end(self, trainer: Any, info: StepInfo) -> None:
        """Log the step's metrics under `train/` at its step."""
        if self.run is not None:
            self.run.log(step_scalars(info.metrics), step=info.step)

    def on_evaluate(self, trainer: Any, results: dict[str, Any]) -> None:
        """Log the results under `eval/` at the step; a standalone evaluation on its own `eval_standalone/step` axis."""
        if self.run is None:
            return
        if trainer.standalone_evaluation:
            self.run.log({"eval_standalone/step": trainer.state.step, **eval_scalars(trainer, results)})
        else:
            self.run.log(eval_scalars(trainer, results), step=trainer.state.step)

    def on_run_end(self, trainer: Any, failed: bool) -> None:
        """Finish the W&B run with exit code 1 if the run failed, else 0."""
        if self.run is not None:
            self.run.finish(exit_code=1 if failed else 0)
            self.run = None


# ---------------------------------------------------------------------------------------------- mlflow
def mlflow_key(name: str) -> str:
    """`name` as an MLflow metric key: the namespace (`train/`, `eval/`) kept, any further `/` written `.`.

    MLflow's file store keeps each metric in a file at its key's path, so `train/lr` and a per-group
    `train/lr/vision` cannot both exist (one would be a file and a directory): they are logged as `train/lr` and
    `train/lr.vision`.
    """
    space, sep, rest = name.partition("/")
    return f"{space}{sep}{rest.replace('/', '.')}" if sep else name


class MlflowConfig(ComponentConfig):
    """Options of the `mlflow` callback: tracking URI, experiment, run name and tags (checks mlflow is installed)."""

    type: str = "mlflow"
    tracking_uri: str | None = Field(
        None, description="e.g. http://host:5000, sqlite:///mlflow.db, file:///abs/mlruns; default: the "
        "MLFLOW_TRACKING_URI environment variable, else MLflow's default")
    experiment: str = Field("arctic-vl", description="experiment name (created if missing)")
    run_name: str | None = Field(None, description="default: the output directory's name")
    tags: dict[str, str] = Field(default_factory=dict)

    @model_validator(mode="after")
    def _installed(self) -> MlflowConfig:
        require_package("mlflow", "mlflow")
        return self


@CALLBACKS.register("mlflow")
class Mlflow(Callback):
    """MLflow: the resolved config (params + config.yaml artifact) and every metrics line and evaluation."""

    config_class = MlflowConfig

    def __init__(self, config: MlflowConfig):
        super().__init__(config)
        self.client: Any = None
        self.run_id: str | None = None

    def on_run_start(self, trainer: Any) -> None:
        """Reopen the saved run (same tracking URI) or create one with the config as params; upload config.yaml."""
        if not trainer.is_main:
            return
        from mlflow.tracking import MlflowClient

        c = self.config
        self.client = MlflowClient(tracking_uri=c.tracking_uri)
        uri = self.client.tracking_uri
        saved = saved_run(trainer.output_dir, "mlflow")
        if saved.get("run_id") and saved.get("tracking_uri") == uri:
            self.run_id = saved["run_id"]
            self.client.update_run(self.run_id, status="RUNNING")
        else:
            experiment = self.client.get_experiment_by_name(c.experiment)
            experiment_id = experiment.experiment_id if experiment else self.client.create_experiment(c.experiment)
            run = self.client.create_run(experiment_id, run_name=c.run_name or trainer.output_dir.name, tags=c.tags)
            self.run_id = run.info.run_id
            # params are write-once in MLflow: the first start's; config.yaml is rewritten on every start
            self._log_params(flat_params(trainer.run_config))
            save_run(trainer.output_dir, "mlflow", {"run_id": self.run_id, "tracking_uri": uri})
        self.client.log_dict(self.run_id, trainer.run_config, "config.yaml")

    def _log_params(self, params: dict[str, str]) -> None:
        from mlflow.entities import Param

        items = [Param(k[:250], v[:6000]) for k, v in params.items()]
        for s in range(0, len(items), 100):  # MLflow takes at most 100 params a batch
            self.client.log_batch(self.run_id, params=items[s:s + 100])

    def _log(self, values: dict[str, float], step: int) -> None:
        from mlflow.entities import Metric

        now = int(time.time() * 1000)
        metrics = [Metric(mlflow_key(k), v, now, step) for k, v in values.items()]
        for s in range(0, len(metrics), 1000):
            self.client.log_batch(self.run_id, metrics=metrics[s:s + 1000])

    def on_step_end(self, trainer: Any, info: StepInfo) -> None:
        """Log the step's metrics under `train/` at its step."""
        if self.run_id is not None:
            self._log(step_scalars(info.metrics), info.step)

    def on_evaluate(self, trainer: Any, results: dict[str, Any]) -> None:
        """Log the results under `eval/` (`eval_standalone/` for `arctic_vl evaluate`) at the weights' step."""
        if self.run_id is not None:
            self._log(eval_scalars(trainer, results), trainer.state.step)

    def on_run_end(self, trainer: Any, failed: bool) -> None:
        """Mark the MLflow run FAILED or FINISHED."""
        if self.run_id is not None:
            self.client.set_terminated(self.run_id, status="FAILED" if failed else "FINISHED")
            self.run_id = None
