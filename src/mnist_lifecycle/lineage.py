"""What ties the model's bytes, DVC and MLflow together.

The train stage logs the model to MLflow and saves the very same files (the logged model's
artifacts, byte for byte) as `data/model/mlflow_model`, a DVC output: `dvc push` shares it and
`dvc pull` or `dvc checkout` bring it back without any tracking store. Its DVC hash (the `md5`
that dvc.lock records for it) is tagged on the training run, the logged model and the
registered version (`model_dvc_md5`), so either side can check the other. The stages after
train read the model from the directory, never from the store.
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path
from unittest.mock import patch

import yaml

from . import outputs
from .paths import Layout

MODEL_HASH_TAG = "model_dvc_md5"


class StoreMismatch(RuntimeError):
    """The tracking store lacks what the pipeline's outputs name, or disagrees with them."""


def dvc_md5(path: Path) -> str:
    """DVC's hash of a file or directory: what dvc.lock records as its `md5` (dvc-data computes it)."""
    from dvc_data.hashfile.build import build
    from dvc_data.hashfile.db import HashFileDB
    from dvc_objects.fs.local import LocalFileSystem

    fs = LocalFileSystem()
    # dry_run: hashes only; the object database is never written to.
    _, _, obj = build(HashFileDB(fs, str(path.parent / ".dvc-hash-staging")), str(path), fs, "md5", dry_run=True)
    return obj.hash_info.value


def tracking_store() -> str:
    import mlflow

    return mlflow.get_tracking_uri()


def save_model_output(layout: Layout, run_id: str, model_info) -> dict:
    """Copy the logged model's artifacts to `layout.mlflow_model`, tag their DVC hash on the run and
    the logged model, and write model.json last; returns what model.json holds."""
    import mlflow
    from mlflow.tracking import MlflowClient

    client = MlflowClient()
    target = layout.mlflow_model
    partial = outputs.partial_path(target)
    shutil.rmtree(partial, ignore_errors=True)
    # From the artifact location itself: a models:/ download adds a file of its own (registered_model_meta).
    location = client.get_logged_model(model_info.model_id).artifact_location
    # No progress bar in the notebook's output.
    with patch.dict(os.environ, {"MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR": "false"}):
        downloaded = mlflow.artifacts.download_artifacts(artifact_uri=location, dst_path=str(partial))
    shutil.rmtree(target, ignore_errors=True)
    os.replace(downloaded, target)  # the download lands in a directory named after the location's last part
    shutil.rmtree(partial)
    md5 = dvc_md5(target)
    client.set_tag(run_id, MODEL_HASH_TAG, md5)
    client.set_logged_model_tags(model_info.model_id, {MODEL_HASH_TAG: md5})
    info = {"run_id": run_id, "model_id": model_info.model_id, "model_uri": model_info.model_uri,
            MODEL_HASH_TAG: md5, "path": target.relative_to(layout.root).as_posix()}
    outputs.write_json(layout.model_info, info)
    return info


def read_model_output(layout: Layout) -> dict:
    """model.json, after checking that the model directory beside it holds the bytes it names."""
    if not layout.model_info.is_file() or not layout.mlflow_model.is_dir():
        raise FileNotFoundError(f"{layout.mlflow_model.relative_to(layout.root)}: missing; "
                                "run `dvc pull` (from the remote) or `dvc repro train`")
    info = json.loads(layout.model_info.read_text())
    actual = dvc_md5(layout.mlflow_model)
    if actual != info[MODEL_HASH_TAG]:
        raise StoreMismatch(f"{layout.mlflow_model.relative_to(layout.root)} has DVC hash {actual}, but "
                            f"{layout.model_info.relative_to(layout.root)} names {info[MODEL_HASH_TAG]}: "
                            "the directory was changed; `dvc checkout` restores it")
    return info


def logged_model_in_store(model_id: str) -> bool:
    from mlflow.exceptions import MlflowException
    from mlflow.tracking import MlflowClient

    try:
        MlflowClient().get_logged_model(model_id)
    except MlflowException:
        return False
    return True


def require_store(root: Path) -> str:
    """The tracking URI, after checking that its store exists (opening it would create it empty)."""
    from .config import use_default_tracking_uri

    tracking_uri = use_default_tracking_uri(root)
    if store_missing(tracking_uri):
        raise StoreMismatch(
            f"the tracking store {tracking_uri} does not exist, so it cannot hold the model that "
            "data/model/model.json names. Point MLFLOW_TRACKING_URI at the store the pipeline ran "
            "against, or retrain into this one with `dvc repro -f train` and then `dvc repro`")
    return tracking_uri


def require_logged_model(root: Path, info: dict) -> None:
    """Stop unless the tracking store holds the logged model that model.json names, with its hash."""
    from mlflow.exceptions import MlflowException
    from mlflow.tracking import MlflowClient

    require_store(root)
    try:
        logged = MlflowClient().get_logged_model(info["model_id"])
    except MlflowException:
        raise StoreMismatch(
            f"the tracking store {tracking_store()} has no logged model {info['model_id']} (the one "
            f"data/model/model.json names, from run {info['run_id']}). Point MLFLOW_TRACKING_URI at "
            "the store the pipeline ran against, or retrain into this store with `dvc repro -f train` "
            "and then `dvc repro`") from None
    recorded = logged.tags.get(MODEL_HASH_TAG)
    if recorded != info[MODEL_HASH_TAG]:
        raise StoreMismatch(f"the tracking store {tracking_store()} has logged model {info['model_id']} with "
                            f"{MODEL_HASH_TAG}={recorded}, but data/model holds {info[MODEL_HASH_TAG]}")


def store_missing(tracking_uri: str) -> Path | None:
    """The database file of an sqlite store that does not exist yet (opening it would create it)."""
    from .tracking import sqlite_file

    path = sqlite_file(tracking_uri)
    return path if path is not None and not path.is_file() else None


def stage_tags(root: Path, stage: str) -> dict[str, str]:
    """DVC's view of a stage run, for its MLflow run: the stage, its dependencies' hashes (those
    dvc.lock records), and under `dvc exp run` the experiment's name and baseline commit."""
    spec = yaml.safe_load((root / "dvc.yaml").read_text())["stages"][stage]
    tags = {"dvc.stage": stage}
    for dep in spec.get("deps", []):
        path = root / dep
        if path.exists():
            tags[f"dvc.dep.{dep}"] = dvc_md5(path)
    if os.environ.get("DVC_EXP_NAME"):
        tags["dvc.exp_name"] = os.environ["DVC_EXP_NAME"]
        tags["dvc.exp_baseline_rev"] = os.environ.get("DVC_EXP_BASELINE_REV", "")
    return tags
