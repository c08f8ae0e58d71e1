"""Shared fixtures: real MNIST from $MNIST_SOURCE_DIR, throwaway copies of the project, and one
finished smoke pipeline per test session that tests copy instead of each running its own."""

from __future__ import annotations

import contextlib
import fcntl
import os
import shutil
import sqlite3
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

ROOT = Path(__file__).resolve().parents[1]
VENV_BIN = Path(sys.executable).parent

# Smoke configuration: the real data, a few thousand training images, one small epoch.
SMOKE_TRAIN = {"epochs": 1, "max_train_samples": 3000, "width": 8, "batch_size": 64}


# `make test` spreads the tests over the cores one by one (pytest -n auto, the scheduler below), except
# that the tests of a module that starts servers or trains models once for all of them stay in one
# worker. xdist hands those modules out first (the most tests first). The other tests follow: first
# those that do not copy the smoke pipeline, while it builds, then those that do; each part longest
# first, so that the workers finish together.
MODULES_IN_ONE_WORKER = ("test_browser.py", "test_calibration.py", "test_promotion.py", "test_serving.py",
                         "test_tracking_server.py")
LONGEST_FIRST = ("test_notebooks.py", "test_lineage.py", "test_sweep_study.py", "test_sweep.py",
                 "test_reliability.py", "test_pipeline.py")


def needs_smoke_pipeline(item) -> bool:
    return "smoke_pipeline" in getattr(item, "fixturenames", ())


def pytest_collection_modifyitems(items):
    rank = {name: place for place, name in enumerate(LONGEST_FIRST)}
    # Stable: tests keep their order within a module.
    items.sort(key=lambda item: (needs_smoke_pipeline(item), rank.get(item.path.name, len(rank))))


def pytest_xdist_make_scheduler(config, log):
    # xdist's own --dist loadgroup cannot be used: it marks groups in Item._nodeid, which pytest 9.2
    # no longer reads.
    from xdist.scheduler import LoadScopeScheduling

    class ModulesWithFixturesTogether(LoadScopeScheduling):
        def _split_scope(self, nodeid: str) -> str:
            module = nodeid.split("::")[0]
            return module if Path(module).name in MODULES_IN_ONE_WORKER else nodeid

        def _reschedule(self, node) -> None:
            # A worker holds the test it runs and the next one only (xdist's default: up to three),
            # so that a free worker is not left idle while another holds several minutes of tests.
            if self.workqueue and not node.shutting_down and self._pending_of(self.assigned_work[node]) > 1:
                return
            super()._reschedule(node)

    return ModulesWithFixturesTogether(config, log)


def smoke_params(**changes):
    """The default training recipe (params/train.yaml) at smoke scale, for tests that train in-process."""
    from mnist_lifecycle import config

    values = yaml.safe_load((ROOT / "params" / "train.yaml").read_text())
    return config.validate("train", {**values, **SMOKE_TRAIN, **changes})


@pytest.fixture(scope="session", autouse=True)
def torch_threads():
    """Two torch threads for what the tests train and predict in this process, whatever the
    machine's cores: some expected results (which of two seeds' models is significantly better,
    which images fall below a confidence threshold) depend on the order of the arithmetic, which the
    number of threads changes. They were measured with two."""
    import torch

    torch.set_num_threads(2)


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
    (MLFLOW_*, MNIST_PROJECT_ROOT, MODEL_URI, MNIST_SERVING_*), with the venv first on PATH and one
    torch thread."""
    env = {k: v for k, v in os.environ.items()
           if not k.startswith(("MLFLOW_", "MNIST_SERVING_")) and k not in ("MNIST_PROJECT_ROOT", "MODEL_URI")}
    # One torch thread in each command (pipelines, sweeps, servers), as sweep workers have: the tests
    # run side by side on every core (make test), and two threads per process that wait on each
    # other spin on the cores the other tests need.
    env.setdefault("OMP_NUM_THREADS", "1")
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


def smoke_project(destination: Path) -> Path:
    """A copy of the project with the smoke training parameters."""
    copy_project(destination)
    set_params(destination, "train", **SMOKE_TRAIN)
    return destination


@pytest.fixture
def project(tmp_path, mnist_source):
    """A fresh copy of the project with smoke training parameters; yields (path, env)."""
    path = smoke_project(tmp_path / "project")
    return path, project_env(path, mnist_source)


def build_smoke_pipeline(shared: Path, mnist_source: Path, wait: bool = True) -> Path:
    """The shared smoke pipeline in `shared`, built by the first process to ask; the others wait
    for it (or, with `wait=False`, go on at once)."""
    template = shared / "smoke-pipeline"
    with (shared / "smoke-pipeline.lock").open("w") as lock:
        try:
            fcntl.flock(lock, fcntl.LOCK_EX | (0 if wait else fcntl.LOCK_NB))
        except BlockingIOError:
            return template  # being built by another worker
        done = shared / "smoke-pipeline.done"
        if not done.exists():
            shutil.rmtree(template, ignore_errors=True)  # a failed attempt's
            run(["dvc", "repro"], smoke_project(template), project_env(template, mnist_source))
            with sqlite3.connect(template / "mlflow.db") as store:  # the whole store in mlflow.db, for copying
                store.execute("PRAGMA wal_checkpoint(TRUNCATE)")
            done.touch()
    return template


def shared_directory(tmp_path_factory) -> Path:
    shared = tmp_path_factory.getbasetemp()
    return shared.parent if os.environ.get("PYTEST_XDIST_WORKER") else shared  # common to xdist's workers


@pytest.fixture(scope="session", autouse=True)
def start_smoke_pipeline(request, tmp_path_factory):
    """If any test of the session needs the smoke pipeline, the first worker builds it before its
    first test, at full speed, while the other workers go on with theirs: tests wait for it less
    than if it were built in the background or by the first test that needs it."""
    if any(needs_smoke_pipeline(item) for item in request.session.items):
        with contextlib.suppress(AssertionError):  # raised again, with its output, by the tests that need it
            build_smoke_pipeline(shared_directory(tmp_path_factory), request.getfixturevalue("mnist_source"),
                                 wait=False)


@pytest.fixture(scope="session")
def smoke_pipeline(tmp_path_factory, mnist_source) -> Path:
    """A copy of the project with the smoke parameters after a whole `dvc repro` (its own sqlite
    store), made once per test session, shared by pytest-xdist's workers and never changed: tests
    take a copy of it (`finished_project`)."""
    return build_smoke_pipeline(shared_directory(tmp_path_factory), mnist_source)


def copy_pipeline(template: Path, destination: Path) -> Path:
    """A copy of a project directory with its DVC cache and tracking store. MLflow records artifact
    locations as absolute file URIs (runs, logged models, model versions): they are moved to the copy."""
    shutil.copytree(template, destination, symlinks=True)
    shutil.rmtree(destination / ".dvc" / "tmp", ignore_errors=True)  # DVC's locks and indexes, for the template
    old, new = str(template), str(destination)
    with sqlite3.connect(destination / "mlflow.db") as store:
        tables = [name for (name,) in store.execute("SELECT name FROM sqlite_master WHERE type = 'table'")]
        for table in tables:
            for column in store.execute(f"PRAGMA table_info('{table}')").fetchall():
                if column[2].upper().startswith(("VARCHAR", "TEXT")):
                    store.execute(f'UPDATE "{table}" SET "{column[1]}" = replace("{column[1]}", ?, ?) '
                                  f'WHERE instr("{column[1]}", ?) > 0', (old, new, old))
    for mlmodel in (destination / "mlartifacts").rglob("MLmodel"):
        mlmodel.write_text(mlmodel.read_text().replace(old, new))
    return destination


@pytest.fixture
def finished_project(tmp_path, smoke_pipeline, mnist_source):
    """A copy of the session's finished smoke pipeline (prepared data, model, evaluation, registered
    @champion, MLflow runs); yields (path, env)."""
    path = copy_pipeline(smoke_pipeline, tmp_path / "project")
    return path, project_env(path, mnist_source)
