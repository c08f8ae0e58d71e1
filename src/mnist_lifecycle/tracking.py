"""MLflow helpers shared by the notebooks, the stage runner and the model server.

Tracking defaults to an embedded sqlite database (`mlflow.db`) with local artifacts
(`mlartifacts/`) in the project root, safe for concurrent processes on one machine (see
sqlite_store_opening); set `MLFLOW_TRACKING_URI` to use a tracking server instead.
"""

from __future__ import annotations

import contextlib
import fcntl
import os
import socket
import sqlite3
import subprocess
from collections.abc import Iterator
from pathlib import Path

import mlflow
from mlflow.tracking import MlflowClient

from . import config

EXPERIMENT_NAME = "mnist-lifecycle"  # overridden by $MLFLOW_EXPERIMENT_NAME, as in MLflow itself


def sqlite_file(tracking_uri: str) -> Path | None:
    """The database file of an `sqlite:///` tracking URI (None for anything else)."""
    if not tracking_uri.startswith("sqlite:///"):
        return None
    return Path(tracking_uri.removeprefix("sqlite:///").split("?", 1)[0])


@contextlib.contextmanager
def sqlite_store_opening(tracking_uri: str) -> Iterator[None]:
    """Around a process's first use of an sqlite file store: one process at a time, WAL mode.

    MLflow creates a new database's tables without a lock: processes opening a new file together
    fail ("table ... already exists"). The exclusive lock on `<db>.lock` (same host only, like
    sqlite itself) serializes that. Write-ahead logging, a persistent property of the file, lets
    readers run beside the one writer and commits with one sync instead of several: concurrent
    writers wait less on MLflow's 20 s busy timeout. Nothing happens for other URIs.
    """
    path = sqlite_file(tracking_uri)
    if path is None:
        yield
        return
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path.with_name(path.name + ".lock"), "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        with contextlib.closing(sqlite3.connect(path, timeout=60)) as db:
            db.execute("PRAGMA journal_mode=WAL")
        yield


def configure(root: Path) -> str:
    """Point MLflow at the tracking store and experiment; returns the experiment id."""
    tracking_uri = config.use_default_tracking_uri(root)
    name = os.environ.get("MLFLOW_EXPERIMENT_NAME", EXPERIMENT_NAME)
    with sqlite_store_opening(tracking_uri):
        experiment = mlflow.get_experiment_by_name(name)  # opens the store: creates a new one's tables
    if experiment is None:
        # Against the embedded store, keep artifacts beside the database whatever the cwd;
        # a tracking server chooses (or proxies) the artifact location itself.
        local = mlflow.get_tracking_uri().startswith("sqlite:")
        location = (config.tracking_root(root) / "mlartifacts").as_uri() if local else None
        try:
            return mlflow.create_experiment(name, artifact_location=location)
        except mlflow.exceptions.MlflowException:
            experiment = mlflow.get_experiment_by_name(name)  # created meanwhile by another writer
            if experiment is None:
                raise
    mlflow.set_experiment(experiment_id=experiment.experiment_id)
    return experiment.experiment_id


def git_commit(root: Path) -> str:
    """HEAD's commit, with `-dirty` when tracked files have uncommitted changes."""
    def git(*args: str) -> str:
        result = subprocess.run(["git", *args], cwd=root, capture_output=True, text=True)
        return result.stdout.strip() if result.returncode == 0 else ""

    commit = git("rev-parse", "HEAD") or "unknown"
    return commit + ("-dirty" if git("status", "--porcelain", "--untracked-files=no") else "")


def provenance_tags(root: Path, stage: str, params) -> dict[str, str]:
    return {
        "stage": stage,
        "git_commit": git_commit(root),
        "params_hash": config.params_hash(params),
        "host": socket.gethostname(),
        "pid": str(os.getpid()),
        "mlflow.source.name": f"notebooks/{config.NOTEBOOKS[stage]}.ipynb",
    }


def start_stage_run(root: Path, stage: str, params, extra_tags: dict[str, str] | None = None):
    """Start the stage's MLflow run with provenance tags and the parameters.

    Runs a killed process left RUNNING on this host are closed first (see close_abandoned_runs).
    Under a sweep the run is nested (tag `mlflow.parentRunId`) in the sweep's run, named by
    $MNIST_PARENT_RUN_ID.
    """
    experiment_id = configure(root)
    close_abandoned_runs(experiment_id)
    tags = provenance_tags(root, stage, params)
    if os.environ.get(config.INVOCATION_ENV):
        tags["stage_invocation"] = os.environ[config.INVOCATION_ENV]
    run = mlflow.start_run(experiment_id=experiment_id, run_name=stage, tags={**tags, **(extra_tags or {})},
                           parent_run_id=os.environ.get(config.PARENT_RUN_ENV) or None)
    mlflow.log_params(config.as_dict(params))
    return run


def close_abandoned_runs(experiment_id: str) -> list[str]:
    """Mark KILLED the runs this host left RUNNING whose process is gone (kill -9, power loss).

    The `pid` tag is the process that ran the notebook (the kernel under papermill).
    """
    client = MlflowClient()
    host = socket.gethostname()
    closed = []
    for run in client.search_runs(
        [experiment_id], filter_string=f"attributes.status = 'RUNNING' and tags.host = '{host}'"
    ):
        pid = run.data.tags.get("pid")
        if pid and pid.isdigit() and not _process_alive(int(pid)):
            client.set_terminated(run.info.run_id, status="KILLED")
            closed.append(run.info.run_id)
    return closed


def _process_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def log_dataset(prepared_dir: Path, split: str) -> None:
    """Record a prepared split as an input of the active run, identified by its content digest."""
    from .data import dataset_digest, load_split

    images, labels = load_split(prepared_dir, split)
    dataset = mlflow.data.from_numpy(
        images, targets=labels, source=str(prepared_dir / f"{split}_images.npy"),
        name=f"mnist-{split}", digest=dataset_digest(prepared_dir, split)[:16],
    )
    mlflow.log_input(dataset, context=split)
