"""The optional MLflow copy of a run's log (``run.mlflow: true``): the same parameters,
metrics, figures and final scores as TensorBoard, in MLflow's tracking store.

The store is ``run.mlflow_uri``, by default MLflow's file store at ``<output_dir>/mlruns``
(no server, no network: ``mlflow ui --backend-store-uri <output_dir>/mlruns`` shows it). MLflow
3 keeps the file store in maintenance mode and refuses it unless ``MLFLOW_ALLOW_FILE_STORE``
is set; it is set here (when not set by the user), because a grid's jobs write at once from
many processes and often many nodes of a shared file system, where SQLite's locking fails.
A database or a server URI (``sqlite:///…``, ``http://…``) works as well.

The experiment is the run's task, the MLflow run is named after the run folder, and its id is
kept in ``mlflow.json`` in the run folder, so a resumed run logs into the same MLflow run
(steps logged after the checkpoint it resumes from are logged again; MLflow keeps both).
"""

from __future__ import annotations

import json
import os
import time
from pathlib import Path

from xdtrain.errors import UserError
from xdtrain.fileio import atomic_write

RECORD = "mlflow.json"
INSTALL = "pip install 'xdtrain[mlflow]'"


def tracking_uri(config) -> str:
    """The tracking store of a run: ``run.mlflow_uri``, else ``<output_dir>/mlruns``."""
    if config.run.mlflow_uri:
        return config.run.mlflow_uri
    return (Path(config.run.output_dir).expanduser().resolve() / "mlruns").as_uri()


def check_installed() -> None:
    """Raises UserError when MLflow is not installed."""
    try:
        import mlflow  # noqa: F401
    except ImportError:
        raise UserError(
            f"run.mlflow: true needs MLflow, which is not installed: {INSTALL}"
        ) from None


class MlflowLog:
    """One MLflow run, written through ``MlflowClient`` (no global active run, so two runs
    in one process never mix). Only rank 0 creates one."""

    def __init__(self, folder: Path, config, params: dict[str, object], resume: bool):
        check_installed()
        os.environ.setdefault("MLFLOW_ALLOW_FILE_STORE", "true")
        from mlflow import MlflowClient

        self.folder = Path(folder)
        uri = tracking_uri(config)
        self.client = MlflowClient(tracking_uri=uri)
        record = self.folder / RECORD
        saved = json.loads(record.read_text()) if resume and record.exists() else None
        if saved and saved.get("tracking_uri") == uri:
            self.run_id = saved["run_id"]
            self.client.update_run(self.run_id, status="RUNNING")
            return
        experiment = self.client.get_experiment_by_name(config.task)
        experiment_id = (
            experiment.experiment_id if experiment else self.client.create_experiment(config.task)
        )
        run = self.client.create_run(
            experiment_id, run_name=self.folder.name, tags={"run_folder": str(self.folder)}
        )
        self.run_id = run.info.run_id
        from mlflow.entities import Param

        values = [Param(k, str(v)[:6000]) for k, v in params.items()]
        for start in range(0, len(values), 100):  # the store's batch limit
            self.client.log_batch(self.run_id, params=values[start : start + 100])
        atomic_write(record, json.dumps({"tracking_uri": uri, "run_id": self.run_id}) + "\n")

    def metrics(self, prefix: str, values: dict[str, float], step: int) -> None:
        """Numbers of one metrics.jsonl row, as ``<prefix>/<name>`` (MLflow's names allow
        ``/``; other characters it refuses are replaced by ``_``)."""
        from mlflow.entities import Metric

        now = int(time.time() * 1000)
        batch = [Metric(_name(f"{prefix}/{k}"), float(v), now, step) for k, v in values.items()]
        for start in range(0, len(batch), 1000):
            self.client.log_batch(self.run_id, metrics=batch[start : start + 1000])

    def artifact(self, path: Path, folder: str) -> None:
        self.client.log_artifact(self.run_id, str(path), folder)

    def finish(self, status: str = "FINISHED") -> None:
        self.client.set_terminated(self.run_id, status=status)


def _name(text: str) -> str:
    """A metric name MLflow accepts: letters, digits, ``_ - . / space``; others become _."""
    return "".join(c if c.isalnum() or c in "_-./ " else "_" for c in text)
