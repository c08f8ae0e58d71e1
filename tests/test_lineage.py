"""Lineage on one machine (embedded sqlite store, the default directory remote): the model is a
DVC output that `git checkout` + `dvc checkout` bring back, the registry is compared with
data/registry/decision.json, MLflow runs and DVC name each other, and stores that do not match
stop with a message. The S3 remote, a second clone pulling and the team server:
tests/test_tracking_server.py."""

from __future__ import annotations

import json
import shutil
import subprocess
from pathlib import Path

import yaml
from mlflow.tracking import MlflowClient

from mnist_lifecycle import config, lineage

from .conftest import git, run, set_params
from .servers import model_server

MODEL_DIR = "data/model/mlflow_model"


def locked_model_md5(path: Path) -> str:
    outs = yaml.safe_load((path / "dvc.lock").read_text())["stages"]["train"]["outs"]
    return next(out["md5"] for out in outs if out["path"] == MODEL_DIR)


def registry(path: Path, env: dict, action: str):
    return run(["python", "-m", "mnist_lifecycle.registry", action], path, env, check=False)


def versions(client: MlflowClient) -> list[int]:
    return sorted(int(v.version) for v in client.search_model_versions("name = 'mnist-digits'"))


def test_checkout_restores_models_and_the_registry_is_held_to_decision_json(finished_project):
    path, env = finished_project  # after `dvc repro`
    client = MlflowClient(tracking_uri=f"sqlite:///{path / 'mlflow.db'}")
    git(path, "add", "-A")
    git(path, "commit", "-m", "first model")
    first = locked_model_md5(path)
    assert json.loads((path / "data/model/model.json").read_text())["model_dvc_md5"] == first

    # Links both ways: `dvc metrics show` names each stage's MLflow run; the run carries the hashes
    # dvc.lock records for the stage's dependencies, and train's run its model's hash.
    shown = json.loads(run(["dvc", "metrics", "show", "--json"], path, env).stdout)[""]["data"]
    lock = yaml.safe_load((path / "dvc.lock").read_text())["stages"]
    for stage in config.STAGES:
        stage_run = client.get_run(shown[f"data/runs/{stage}.json"]["data"]["mlflow_run_id"])
        tags = stage_run.data.tags
        assert tags["stage"] == tags["dvc.stage"] == stage
        assert {dep["path"]: dep["md5"] for dep in lock[stage]["deps"]} == \
            {key.removeprefix("dvc.dep."): value for key, value in tags.items() if key.startswith("dvc.dep.")}
        if stage == "train":
            assert tags["model_dvc_md5"] == first
    assert client.get_model_version("mnist-digits", "1").tags["model_dvc_md5"] == first

    # DVC's run-cache never replays register: a changed parameter and its restore both really run
    # it, and the same model bytes keep their version.
    set_params(path, "register", min_improvement=0.5)
    assert "Running stage 'register'" in run(["dvc", "repro"], path, env).stdout
    git(path, "checkout", "params/register.yaml")
    again = run(["dvc", "repro"], path, env).stdout
    assert "Running stage 'register'" in again and "cached" not in again
    assert versions(client) == [1]
    assert registry(path, env, "check").returncode == 0

    # A second model, promoted or not, becomes @challenger.
    set_params(path, "train", seed=1)
    run(["dvc", "repro"], path, env)
    git(path, "commit", "-qam", "second model")
    second = locked_model_md5(path)
    assert second != first and versions(client) == [1, 2]
    assert registry(path, env, "check").returncode == 0

    # Back to the first commit: its model returns, byte for byte. The registry's aliases are state
    # outside git: the disagreement is reported (by `registry check` and by the model server), and
    # `registry sync` makes the registry follow the checkout.
    git(path, "checkout", "-q", "HEAD~1")
    run(["dvc", "checkout"], path, env)
    assert lineage.dvc_md5(path / MODEL_DIR) == first
    check = registry(path, env, "check")
    assert check.returncode == 1
    assert f"mnist-digits@challenger is version 2 ({second}), decision.json names version 1 ({first})" in check.stderr
    server = model_server(path, env, path.parent / "serving.log", model_uri="models:/mnist-digits@challenger")
    try:
        server.wait_ready()
    finally:
        server.stop()
    assert f"warning: models:/mnist-digits@challenger is version 2 ({second})" in server.log_tail()
    assert "moved mnist-digits@challenger: 2 -> 1" in registry(path, env, "sync").stdout
    assert registry(path, env, "check").returncode == 0
    git(path, "checkout", "-q", "-")
    run(["dvc", "checkout"], path, env)
    assert lineage.dvc_md5(path / MODEL_DIR) == second
    assert registry(path, env, "check").returncode == 1
    registry(path, env, "sync")
    assert registry(path, env, "check").returncode == 0

    # Under `dvc exp run` the stage's MLflow run names the experiment, and `dvc exp show` the run.
    run(["dvc", "exp", "run", "-n", "lineage-exp", "-S", "params/register.yaml:min_improvement=0.25"], path, env)
    register_run = json.loads((path / "data/runs/register.json").read_text())["mlflow_run_id"]
    assert client.get_run(register_run).data.tags["dvc.exp_name"] == "lineage-exp"
    assert register_run in run(["dvc", "exp", "show", "--json"], path, env).stdout
    assert versions(client) == [1, 2] and registry(path, env, "check").returncode == 0


def test_stores_that_do_not_match_stop_with_what_to_do(finished_project, tmp_path):
    path, env = finished_project  # after `dvc repro`
    register = ["python", "-m", "mnist_lifecycle.stage", "register", "--quiet"]

    # Another store, which lacks the model train logged: register stops naming it.
    other = tmp_path / "other.db"
    MlflowClient(tracking_uri=f"sqlite:///{other}").search_experiments()  # an existing, empty store
    result = run(register, path, {**env, "MLFLOW_TRACKING_URI": f"sqlite:///{other}"}, check=False)
    assert result.returncode == 1
    assert f"the tracking store sqlite:///{other} has no logged model" in result.stderr

    # No store at all (moved away): register, the model server and `registry check` stop before
    # opening one, which would create it empty.
    aside = tmp_path / "aside"
    aside.mkdir()
    for name in ("mlflow.db", "mlartifacts"):
        shutil.move(path / name, aside / name)
    result = run(register, path, env, check=False)
    assert result.returncode == 1 and "does not exist" in result.stderr and "Traceback" not in result.stderr
    result = run(["python", "-m", "mnist_lifecycle.serving"], path, env, check=False, timeout=120)
    assert result.returncode == 1 and "Traceback" not in result.stderr
    assert f"the tracking store sqlite:///{path / 'mlflow.db'} does not exist" in result.stderr
    assert "make serve MODEL_URI=data/model/mlflow_model" in result.stderr
    assert registry(path, env, "check").returncode == 1
    assert not (path / "mlflow.db").exists()
    # DVC still calls the model up to date: its bytes are in data/, not in the store.
    assert "Data and pipelines are up to date" in run(["dvc", "status", "train"], path, env).stdout

    # A model directory changed by hand no longer matches model.json: evaluate stops naming it.
    mlmodel = path / MODEL_DIR / "MLmodel"
    mlmodel.chmod(0o644)  # DVC links outputs from its cache read-only
    mlmodel.write_text(mlmodel.read_text() + "# edited\n")
    result = run(["python", "-m", "mnist_lifecycle.stage", "evaluate", "--quiet"], path, env, check=False)
    assert result.returncode == 1 and "the directory was changed; `dvc checkout` restores it" in result.stderr


def test_default_remote_shares_outputs_and_catches_a_corrupt_object(finished_project, tmp_path):
    path, env = finished_project  # after `dvc repro`
    git(path, "add", "-A")
    git(path, "commit", "-m", "pipeline")
    # .dvc/config's default remote: a directory beside the clone.
    remote = path.parent / "mnist-lifecycle-dvc-remote"
    run(["dvc", "push"], path, env)
    assert remote.is_dir()

    clone = tmp_path / "clone"
    subprocess.run(["git", "clone", "-q", str(path), str(clone)], check=True)
    run(["dvc", "pull", "prepare"], clone, env)  # the committed dvc.lock names later outputs too
    assert "Data and pipelines are up to date" in run(["dvc", "status", "prepare"], clone, env).stdout

    # One object in the remote corrupted: a new clone's pull fails on it and checks nothing bad out.
    labels = path / "data/prepared/val_labels.npy"
    digest = lineage.dvc_md5(labels)
    stored = remote / "files" / "md5" / digest[:2] / digest[2:]
    stored.chmod(0o644)
    stored.write_bytes(stored.read_bytes()[:-8] + b"corrupt!")
    corrupt = tmp_path / "corrupt"
    subprocess.run(["git", "clone", "-q", str(path), str(corrupt)], check=True)
    result = run(["dvc", "pull", "prepare"], corrupt, env, check=False)
    assert result.returncode != 0 and "data/prepared" in result.stderr
    assert not (corrupt / "data/prepared/val_labels.npy").exists()
