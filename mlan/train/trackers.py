"""Experiment trackers beside `metrics.jsonl`: TensorBoard, MLflow (local file store), Weights & Biases (offline).

One small interface (`Tracker.log(metrics, step)`, `Tracker.close()`) so the trainer does not know which backends
run. Each backend is an optional extra (`pip install 'mlan[tensorboard]'`, `mlan[mlflow]`, `mlan[wandb]`) imported
only when a recipe asks for it (`train.trackers`), and each writes under the run folder without any network: the
run never depends on a server being up, and the files can be uploaded later (`mlflow server
--backend-store-uri RUN/mlflow`, `wandb sync RUN/wandb/offline-run-*`).
"""
from __future__ import annotations

import os
import time
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any, Protocol

from mlan.recipe import RecipeError

TRACKERS = ("tensorboard", "mlflow", "wandb")
EXPERIMENT = "mlan"  # MLflow experiment and W&B project every run is filed under
_EXTRA = {"tensorboard": "tensorboard", "mlflow": "mlflow-skinny", "wandb": "wandb"}


class TrackerError(RecipeError):
    """A tracker `train.trackers` names cannot start (its package is missing): a recipe the machine cannot run, so
    the worker reports it as one line and exits 2, like any recipe error."""


class Tracker(Protocol):
    def log(self, metrics: Mapping[str, float], step: int) -> None: ...

    def close(self) -> None: ...


def _missing(name: str, err: ImportError) -> TrackerError:
    return TrackerError(f"train.trackers: {name!r} needs the `{_EXTRA[name]}` package "
                        f"(pip install 'mlan[{name}]'): {err}")


class TensorBoardTracker:
    """Scalars in `RUN/tensorboard/` (event files)."""

    def __init__(self, run_dir: Path):
        try:  # lazy (each tracker): an optional extra, absent unless installed; see the module docstring
            from torch.utils.tensorboard import SummaryWriter
        except ImportError as err:
            raise _missing("tensorboard", err) from err
        self.dir = Path(run_dir) / "tensorboard"
        self._writer = SummaryWriter(str(self.dir))

    def log(self, metrics: Mapping[str, float], step: int) -> None:
        for key, value in metrics.items():
            self._writer.add_scalar(key, value, global_step=step)

    def close(self) -> None:
        self._writer.close()


class MlflowTracker:
    """One MLflow run in the local file store `RUN/mlflow/` (experiment `mlan`, run name = the run folder's name).

    MLflow 3 keeps the file store in maintenance mode behind `MLFLOW_ALLOW_FILE_STORE`; it is the store that needs
    no database package and no server, so this tracker opts in for its process.
    """

    def __init__(self, run_dir: Path, params: Mapping[str, Any]):
        try:
            from mlflow.entities import Metric, Param
            from mlflow.tracking import MlflowClient
        except ImportError as err:
            raise _missing("mlflow", err) from err
        os.environ.setdefault("MLFLOW_ALLOW_FILE_STORE", "true")
        self.uri = (Path(run_dir).resolve() / "mlflow").as_uri()
        self._client = MlflowClient(tracking_uri=self.uri)
        experiment = self._client.get_experiment_by_name(EXPERIMENT)
        experiment_id = experiment.experiment_id if experiment else self._client.create_experiment(EXPERIMENT)
        self.run_id = self._client.create_run(experiment_id, run_name=Path(run_dir).name).info.run_id
        self._metric = Metric
        self._client.log_batch(self.run_id, params=[Param(k, str(v)[:500]) for k, v in params.items()])

    def log(self, metrics: Mapping[str, float], step: int) -> None:
        now = int(time.time() * 1000)
        self._client.log_batch(self.run_id, metrics=[self._metric(k, float(v), now, step) for k, v in metrics.items()])

    def close(self) -> None:
        self._client.set_terminated(self.run_id)


class WandbTracker:
    """One W&B run in offline mode under `RUN/wandb/` (project `mlan`): nothing leaves the machine."""

    def __init__(self, run_dir: Path, params: Mapping[str, Any]):
        try:
            import wandb
        except ImportError as err:
            raise _missing("wandb", err) from err
        self._run = wandb.init(project=EXPERIMENT, name=Path(run_dir).name, dir=str(run_dir), mode="offline",
                               config=dict(params), save_code=False,
                               settings=wandb.Settings(silent=True, x_disable_stats=True))

    @property
    def dir(self) -> Path:
        return Path(self._run.dir).parent  # RUN/wandb/offline-run-…

    def log(self, metrics: Mapping[str, float], step: int) -> None:
        self._run.log(dict(metrics), step=step)

    def close(self) -> None:
        self._run.finish()


def make_trackers(names: Iterable[str], run_dir: Path, params: Mapping[str, Any] | None = None) -> list[Tracker]:
    """The trackers named (each at most once, in TRACKERS order); `params` go to MLflow params / W&B config."""
    wanted = set(names)
    unknown = wanted - set(TRACKERS)
    if unknown:
        raise TrackerError(f"train.trackers: unknown {sorted(unknown)}; expected some of {', '.join(TRACKERS)}")
    params = dict(params or {})
    out: list[Tracker] = []
    try:
        for name in TRACKERS:
            if name == "tensorboard" and name in wanted:
                out.append(TensorBoardTracker(run_dir))
            elif name == "mlflow" and name in wanted:
                out.append(MlflowTracker(run_dir, params))
            elif name == "wandb" and name in wanted:
                out.append(WandbTracker(run_dir, params))
    except BaseException:
        for tracker in out:
            tracker.close()
        raise
    return out
