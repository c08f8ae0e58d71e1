"""The embedded default under stress: concurrent writers on a new sqlite store, and training
killed with kill -9 (the kernel alone, then the whole `dvc repro`), then recovered by a rerun."""

from __future__ import annotations

import json
import os
import signal
import sqlite3
import subprocess
import sys
import time
from pathlib import Path

import nbformat
import yaml
from mlflow.tracking import MlflowClient

from .conftest import ROOT, run, set_params

WRITERS = ROOT / "benchmarks" / "concurrent_writers.py"


def test_eight_writers_on_a_new_embedded_store_lose_nothing(tmp_path):
    # A new database: MLflow alone lets concurrent processes race creating its tables (most fail).
    env = {k: v for k, v in os.environ.items() if not k.startswith("MLFLOW_")}
    result = subprocess.run([sys.executable, str(WRITERS), "--writers", "8", "--steps", "200", "--root", str(tmp_path)],
                            env=env, capture_output=True, text=True, timeout=400)
    summary = json.loads(result.stdout[result.stdout.index("{"):])
    assert result.returncode == 0, f"{json.dumps(summary, indent=2)}\n{result.stderr[-3000:]}"
    assert summary["tracking_uri"] == f"sqlite:///{tmp_path / 'mlflow.db'}"
    assert summary["runs_complete"] == 8 and summary["runs_found"] == 8 and summary["lost"] == 0
    with sqlite3.connect(tmp_path / "mlflow.db") as db:
        assert db.execute("PRAGMA journal_mode").fetchone()[0] == "wal"


def train_runs(client: MlflowClient):
    experiment = client.get_experiment_by_name("mnist-lifecycle")
    if experiment is None:
        return []
    return client.search_runs([experiment.experiment_id], "tags.stage = 'train'",
                              order_by=["attributes.start_time ASC"])


def wait_for_training(client: MlflowClient, known: set[str], process: subprocess.Popen, timeout: float = 300):
    """The new train run once it has logged its first epoch: training is under way."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        assert process.poll() is None, f"dvc repro ended ({process.returncode}) before training got under way"
        for train_run in train_runs(client):
            if train_run.info.run_id not in known and "val_accuracy" in train_run.data.metrics:
                return train_run
        time.sleep(0.2)
    raise AssertionError(f"no train run logged an epoch within {timeout} s")


def wait_gone(pid: int, timeout: float = 30) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            os.kill(pid, 0)
        except ProcessLookupError:
            return
        time.sleep(0.1)
    raise AssertionError(f"process {pid} still alive {timeout} s after its parents were killed")


def train_outputs(path: Path) -> dict[str, bool]:
    names = ["data/model/mlflow_model", "data/model/model.json", "data/model/metrics.json",
             "data/model/history.csv", "data/executed/02_train.ipynb"]
    return {name: (path / name).exists() for name in names}


def partial_files(path: Path) -> list[str]:
    return sorted(str(p.relative_to(path)) for p in (path / "data").rglob("*.partial*"))


def test_killed_training_is_closed_and_a_rerun_recovers(finished_project):
    path, env = finished_project  # after `dvc repro`: one finished train run
    set_params(path, "train", epochs=3)  # a few seconds of training left after the first epoch
    client = MlflowClient(tracking_uri=f"sqlite:///{path / 'mlflow.db'}")
    locked_train = yaml.safe_load((path / "dvc.lock").read_text())["stages"]["train"]
    (trained_before,) = (r.info.run_id for r in train_runs(client))

    # 1. kill -9 the papermill kernel mid-training: the stage runner survives and records the failure.
    repro = subprocess.Popen(["dvc", "repro"], cwd=path, env=env, stdout=subprocess.PIPE,
                             stderr=subprocess.PIPE, text=True)
    killed_kernel = wait_for_training(client, {trained_before}, repro)
    os.kill(int(killed_kernel.data.tags["kernel_pid"]), signal.SIGKILL)
    _, stderr = repro.communicate(timeout=300)
    assert repro.returncode != 0
    assert "stage train: the kernel died" in stderr
    assert client.get_run(killed_kernel.info.run_id).info.status == "FAILED"
    assert yaml.safe_load((path / "dvc.lock").read_text())["stages"]["train"] == locked_train
    outputs = train_outputs(path)
    assert not outputs["data/model/model.json"] and not outputs["data/model/metrics.json"]
    assert not outputs["data/model/mlflow_model"]
    # The executed notebook is whole (it shows where the kernel died); nothing half-written is left.
    nbformat.read(path / "data/executed/02_train.ipynb", as_version=4)
    assert partial_files(path) == []

    # 2. kill -9 the whole `dvc repro` (its process group: dvc, the stage runner) mid-training.
    repro = subprocess.Popen(["dvc", "repro"], cwd=path, env=env, stdout=subprocess.DEVNULL,
                             stderr=subprocess.DEVNULL, start_new_session=True)
    killed_all = wait_for_training(client, {trained_before, killed_kernel.info.run_id}, repro)
    os.killpg(repro.pid, signal.SIGKILL)
    repro.wait()
    wait_gone(int(killed_all.data.tags["kernel_pid"]))  # the kernel follows its stage runner
    assert client.get_run(killed_all.info.run_id).info.status == "RUNNING"  # nobody was left to close it
    assert yaml.safe_load((path / "dvc.lock").read_text())["stages"]["train"] == locked_train
    assert not any(train_outputs(path).values()), train_outputs(path)

    # 3. The next `dvc repro` closes the abandoned run and trains again (the later stages are
    #    the same as in test_pipeline.py, so they are left out here).
    run(["dvc", "repro", "train"], path, env)
    statuses = {r.info.run_id: r.info.status for r in train_runs(client) if r.info.run_id != trained_before}
    assert statuses.pop(killed_kernel.info.run_id) == "FAILED"
    assert statuses.pop(killed_all.info.run_id) == "KILLED"
    assert list(statuses.values()) == ["FINISHED"]
    (finished,) = statuses
    assert json.loads((path / "data/model/model.json").read_text())["run_id"] == finished
    assert all(train_outputs(path).values())
    assert "Data and pipelines are up to date" in run(["dvc", "status", "train"], path, env).stdout
    assert partial_files(path) == []
