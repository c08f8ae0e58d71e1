"""Shared fixtures: real MNIST from $MNIST_SOURCE_DIR, and throwaway copies of the project."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

ROOT = Path(__file__).resolve().parents[1]
VENV_BIN = Path(sys.executable).parent

# Smoke configuration: the real data, a few thousand training images, one small epoch.
SMOKE_TRAIN = {"epochs": 1, "max_train_samples": 3000, "width": 8, "batch_size": 64}


def smoke_params(**changes):
    """The default training recipe (params/train.yaml) at smoke scale, for tests that train in-process."""
    from mnist_lifecycle import config

    values = yaml.safe_load((ROOT / "params" / "train.yaml").read_text())
    return config.validate("train", {**values, **SMOKE_TRAIN, **changes})


@pytest.fixture(scope="session")
def mnist_source() -> Path:
    """$MNIST_SOURCE_DIR, else MNIST downloaded once (as the prepare stage does) into a cache."""
    source = os.environ.get("MNIST_SOURCE_DIR")
    if source:
        if not Path(source).is_dir():
            pytest.fail(f"MNIST_SOURCE_DIR={source} is not a directory: it must hold the four MNIST idx .gz files")
        return Path(source).resolve()
    from mnist_lifecycle import data

    cache = Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "mnist-lifecycle" / "mnist"
    try:
        if not all((cache / f"{idx.name}.gz").is_file() for idx in data.IDX_FILES):
            data.fetch_raw(cache)  # each file is written whole or not at all
        data.verify_raw(cache)
    except data.DataError as exc:  # its message says what to do without internet
        pytest.fail(str(exc))
    return cache


def copy_project(destination: Path) -> Path:
    """The git-tracked files of the project, in a fresh git repository of their own."""
    files = subprocess.run(["git", "ls-files", "-z"], cwd=ROOT, capture_output=True, check=True,
                           text=True).stdout.split("\0")
    for name in filter(None, files):
        if (ROOT / name).is_file():
            target = destination / name
            target.parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(ROOT / name, target)
    git(destination, "init", "-q")
    git(destination, "add", "-A")
    git(destination, "commit", "-qm", "copy")
    return destination


def git(path: Path, *args: str) -> None:
    """git in `path`, as a test user."""
    subprocess.run(["git", "-c", "user.name=test", "-c", "user.email=test@localhost", *args], cwd=path,
                   check=True, capture_output=True)


def set_params(project: Path, stage: str, **values) -> None:
    path = project / "params" / f"{stage}.yaml"
    params = yaml.safe_load(path.read_text())
    params.update(values)
    path.write_text(yaml.safe_dump(params, sort_keys=False))


def isolated_env(**extra: str) -> dict[str, str]:
    """This process's environment without what points at a tracking store, project or model
    (MLFLOW_*, MNIST_PROJECT_ROOT, MODEL_URI, MNIST_SERVING_*), with the venv first on PATH."""
    env = {k: v for k, v in os.environ.items()
           if not k.startswith(("MLFLOW_", "MNIST_SERVING_")) and k not in ("MNIST_PROJECT_ROOT", "MODEL_URI")}
    env.update(PATH=f"{VENV_BIN}{os.pathsep}{env['PATH']}", **extra)
    return env


def project_env(project: Path, mnist_source: Path, **extra: str) -> dict[str, str]:
    """Environment for commands in a copy: its own sqlite MLflow store, the venv on PATH."""
    return isolated_env(MNIST_SOURCE_DIR=str(mnist_source), **extra)


def run(command: list[str], project: Path, env: dict[str, str], check: bool = True,
        timeout: float = 600) -> subprocess.CompletedProcess:
    result = subprocess.run(command, cwd=project, env=env, capture_output=True, text=True,
                            timeout=timeout)
    if check and result.returncode != 0:
        raise AssertionError(f"{' '.join(command)} exited {result.returncode}\n"
                             f"stdout:\n{result.stdout[-4000:]}\nstderr:\n{result.stderr[-4000:]}")
    return result


@pytest.fixture
def project(tmp_path, mnist_source):
    """A fresh copy of the project with smoke training parameters; yields (path, env)."""
    path = copy_project(tmp_path / "project")
    set_params(path, "train", **SMOKE_TRAIN)
    return path, project_env(path, mnist_source)
