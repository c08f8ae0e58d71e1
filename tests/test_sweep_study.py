"""Sweep studies on Optuna, on real MNIST (smoke size) in copies of the project: a study in a real
PostgreSQL shared by two worker processes, one killed with kill -9 mid-trial; a seeded search whose
median pruner stops losing trials. In a module of its own, so that pytest-xdist runs it beside
test_sweep.py."""

import csv
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml
from mlflow.tracking import MlflowClient

from .conftest import run
from .servers import postgres_cluster
from .test_sweep import SMOKE, write_sweep


def _trial_processes(marker: str) -> list[int]:
    """Processes whose environment names `marker` (a worker's output directory): its stage
    runners and their kernels."""
    found = []
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                if marker.encode() in (entry / "environ").read_bytes() + (entry / "cmdline").read_bytes():
                    found.append(int(entry.name))
            except OSError:  # gone, or not ours to read
                pass
    return found


def test_two_workers_share_a_postgresql_study_and_one_killed_mid_trial_is_retried(finished_project, tmp_path):
    """Two worker processes (two machines, as far as the study knows) on one grid in PostgreSQL:
    each point completes once; the worker killed with kill -9 mid-trial leaves no process and no
    MLflow run behind, and its trial is failed by heartbeat and run again by the other worker."""
    import optuna
    from optuna.trial import TrialState

    path, env = finished_project  # after `dvc repro`
    grid = {"lr": [0.05, 0.2], "augment_shift": [0, 2]}
    sweep_file = write_sweep(path, "shared", {"fixed": SMOKE, "grid": grid})
    with postgres_cluster() as database:
        storage = database.sqlalchemy_uri()
        workers, logs = {}, {}
        for name in ("a", "b"):  # each with an output directory of its own, as on its own machine
            logs[name] = (tmp_path / f"worker-{name}.log").open("w")
            workers[name] = subprocess.Popen(
                [sys.executable, "-m", "mnist_lifecycle.sweep", str(sweep_file), "--storage", storage,
                 "--workers", "1", "--heartbeat", "2", "--output", f"sweeps/shared-{name}"],
                cwd=path, env=env, stdout=logs[name], stderr=subprocess.STDOUT)
        try:
            # Kill a mid-trial: its kernel is training (it has told the trial its MLflow run).
            deadline = time.monotonic() + 300
            while True:
                assert time.monotonic() < deadline and workers["a"].poll() is None, (tmp_path / "worker-a.log").read_text()
                try:
                    study = optuna.load_study(study_name="shared", storage=storage)
                    killed = next((t for t in study.get_trials(states=(TrialState.RUNNING,))
                                   if t.user_attrs.get("worker", "").endswith(f":{workers['a'].pid}")
                                   and "mlflow_run_id" in t.user_attrs), None)
                except KeyError:  # no study yet
                    killed = None
                if killed:
                    break
                time.sleep(0.5)
            workers["a"].send_signal(signal.SIGKILL)
            workers["a"].wait()
            # Its stage runner and kernel die with it.
            deadline = time.monotonic() + 30
            while _trial_processes(str(path / "sweeps" / "shared-a")):
                assert time.monotonic() < deadline, _trial_processes(str(path / "sweeps" / "shared-a"))
                time.sleep(0.5)
            assert workers["b"].wait(timeout=600) == 0, (tmp_path / "worker-b.log").read_text()[-4000:]
        finally:
            for process in workers.values():
                if process.poll() is None:
                    process.kill()
                    process.wait()
            for log in logs.values():
                log.close()
        trials = optuna.load_study(study_name="shared", storage=storage).get_trials()

    out_b = (tmp_path / "worker-b.log").read_text()
    assert f"trial {killed.number} ({killed.user_attrs['point']}): its worker died; queued again" in out_b
    # Exactly the grid's points completed, each once; the killed attempt failed and was retried.
    completed = [t for t in trials if t.state == TrialState.COMPLETE]
    names = ["01_lr=0.05_augment_shift=0", "02_lr=0.05_augment_shift=2", "03_lr=0.2_augment_shift=0",
             "04_lr=0.2_augment_shift=2"]
    assert sorted(t.user_attrs["point"] for t in completed) == names
    assert sorted((t.params["lr"], t.params["augment_shift"]) for t in completed) == [
        (0.05, 0), (0.05, 2), (0.2, 0), (0.2, 2)]
    assert [t.number for t in trials if t.state == TrialState.FAIL] == [killed.number]
    (retry,) = [t for t in trials if t.system_attrs.get("failed_trial") == killed.number]
    assert retry.state == TrialState.COMPLETE and retry.params == killed.params
    assert retry.user_attrs["worker"].endswith(f":{workers['b'].pid}")
    assert len(trials) == 5
    # Both workers took trials: they add up.
    assert {t.user_attrs["worker"].rsplit(":", 1)[1] for t in trials} == {str(p.pid) for p in workers.values()}

    client = MlflowClient(tracking_uri=f"sqlite:///{path / 'mlflow.db'}")
    experiment = client.get_experiment_by_name("mnist-lifecycle")
    assert not client.search_runs([experiment.experiment_id], "attributes.status = 'RUNNING'")
    (parent,) = client.search_runs([experiment.experiment_id], "tags.sweep = 'shared' and attributes.run_name = 'shared'")
    assert parent.info.status == "FINISHED" and parent.data.tags["optuna_storage"].startswith("postgresql+psycopg://mlflow:***@")
    dead = client.get_run(killed.user_attrs["mlflow_run_id"])
    assert dead.info.status == "FAILED" and "stopped (no heartbeat); retried" in dead.data.tags["error"]
    assert dead.data.tags["mlflow.parentRunId"] == parent.info.run_id
    children = client.search_runs([experiment.experiment_id], f"tags.mlflow.parentRunId = '{parent.info.run_id}'")
    assert sorted(c.info.status for c in children) == ["FAILED"] + ["FINISHED"] * 4
    with (path / "sweeps" / "shared-b" / "summary.csv").open() as stream:
        rows = list(csv.DictReader(stream))
    assert sorted(row["point"] for row in rows) == names and {row["status"] for row in rows} == {"FINISHED"}


def test_search_with_a_median_pruner_prunes_losing_trials(finished_project):
    """A seeded TPE search over a learning-rate range whose low end learns little: the notebook
    reports each epoch, the median pruner stops the losers; they show as pruned in MLflow."""
    import optuna
    from optuna.trial import TrialState

    path, env = finished_project  # after `dvc repro`
    sweep_file = write_sweep(path, "search", {
        "fixed": {**SMOKE, "epochs": 2}, "search": {"lr": {"low": 1e-5, "high": 0.3, "log": True}},
        "trials": 6, "seed": 0, "pruner": "median"})
    result = run(["python", "-m", "mnist_lifecycle.sweep", str(sweep_file), "--workers", "2"], path, env)
    assert "6 trials, 2 worker(s) here" in result.stdout
    sweep_dir = path / "sweeps" / "search"
    study = optuna.load_study(study_name="search", storage=f"sqlite:///{sweep_dir / 'study.db'}")
    pruned = study.get_trials(states=(TrialState.PRUNED,))
    completed = study.get_trials(states=(TrialState.COMPLETE,))
    assert pruned and len(pruned) + len(completed) == 6, result.stdout
    for trial in pruned:
        # Stopped after the first epoch (never the last: a trained model is kept), below the
        # median of the completed trials after that epoch.
        epoch = max(trial.intermediate_values)
        assert list(trial.intermediate_values) == [1]
        assert trial.intermediate_values[epoch] < max(t.intermediate_values[epoch] for t in completed)
    assert study.best_value == max(t.value for t in completed)

    client = MlflowClient(tracking_uri=f"sqlite:///{path / 'mlflow.db'}")
    for trial in pruned:
        mlflow_run = client.get_run(trial.user_attrs["mlflow_run_id"])
        assert mlflow_run.info.status == "KILLED" and mlflow_run.data.tags["trial_state"] == "PRUNED"
        epoch = max(trial.intermediate_values)
        assert mlflow_run.data.tags["error"].startswith(f"pruned after epoch {epoch}: val_accuracy ")
        steps = [m.step for m in client.get_metric_history(mlflow_run.info.run_id, "val_accuracy")]
        assert steps == list(trial.intermediate_values)
    with (sweep_dir / "summary.csv").open() as stream:
        rows = list(csv.DictReader(stream))
    assert [row["status"] for row in rows] == ["FINISHED"] * len(completed) + ["PRUNED"] * len(pruned)
    assert float(rows[0]["val_accuracy"]) == pytest.approx(study.best_value)
    assert yaml.safe_load((sweep_dir / "best.yaml").read_text())["lr"] == pytest.approx(study.best_params["lr"])
