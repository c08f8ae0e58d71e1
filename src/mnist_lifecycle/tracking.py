"""MLflow helpers shared by the notebooks, the stage runner and the model server.

Tracking defaults to an embedded sqlite database (`mlflow.db`) with local artifacts
(`mlartifacts/`) in the project root, safe for concurrent processes on one machine (see
sqlite_store_opening); set `MLFLOW_TRACKING_URI` to use a tracking server instead.
"""

from __future__ import annotations

import contextlib
import fcntl
import logging
import os
import socket
import sqlite3
import subprocess
import sys
import warnings
from collections.abc import Iterator
from pathlib import Path

import mlflow
from mlflow.tracking import MlflowClient

from . import config

EXPERIMENT_NAME = "mnist-lifecycle"  # overridden by $MLFLOW_EXPERIMENT_NAME, as in MLflow itself
# The experiment's kind, as MLflow's UI records it: model training, not GenAI. MLflow 3.17's UI
# chooses its view by its "GenAI / Model training" switch instead (remembered per browser, or
# ?workflowType=machine_learning in the link: see README), and reads this tag where that switch is off.
EXPERIMENT_KIND = {"mlflow.experimentKind": "custom_model_development"}
RUN_DESCRIPTION_TAG = "mlflow.note.content"  # what the UI shows (and edits) as the run's description

# What a stage does, in its run's description (after the result).
STAGE_PURPOSE = {
    "prepare": "Verifies the four MNIST files by content and writes the train/validation/test split.",
    "train": "Trains the digit classifier and logs it as an MLflow model.",
    "evaluate": "Scores the trained model on the 10,000 test images.",
    "register": "Registers the evaluated model as `@challenger` and decides whether it becomes `@champion`.",
}
# The parameters that tell one run of a stage from another, shown in its name.
NAMED_PARAMS = {
    "prepare": ("val_size", "split_seed"),
    "train": ("epochs", "lr", "width", "max_train_samples"),
    "evaluate": (),
    "register": ("min_improvement",),
}


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
            return mlflow.create_experiment(name, artifact_location=location, tags=EXPERIMENT_KIND)
        except mlflow.exceptions.MlflowException:
            experiment = mlflow.get_experiment_by_name(name)  # created meanwhile by another writer
            if experiment is None:
                raise
    for key, value in EXPERIMENT_KIND.items():
        if key not in experiment.tags:  # an experiment created before the tag was set
            MlflowClient().set_experiment_tag(experiment.experiment_id, key, value)
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


def runner(stage_runner: bool = False, parent_run_id: str | None = None) -> str:
    """What started this stage: "sweep", "dvc exp <name>" or "pipeline" for the stage runner (a
    sweep's points have a parent run; `dvc exp run` sets $DVC_EXP_NAME for its stages' commands),
    else "jupyter" (a notebook run by hand) or "python"."""
    if stage_runner:
        if parent_run_id:
            return "sweep"
        if os.environ.get("DVC_EXP_NAME"):
            return f"dvc exp {os.environ['DVC_EXP_NAME']}"
        return "pipeline"
    return "jupyter" if "ipykernel" in sys.modules else "python"


def describe_run(stage: str, params, commit: str, started_by: str) -> tuple[str, str]:
    """(run name, description) a person can tell runs apart by in the MLflow UI."""
    values = config.as_dict(params)
    shown = " ".join(f"{name}={values[name]}" for name in NAMED_PARAMS[stage]
                     if not (name == "max_train_samples" and values[name] == 0))  # 0: all
    short = commit[:7] + ("-dirty" if commit.endswith("-dirty") else "")
    # Stage and runner first: the UI's run table shows the first ~25 characters of a name.
    name = " · ".join(filter(None, [stage, started_by, shown, short]))
    description = (f"{STAGE_PURPOSE[stage]}\n\nStarted by: {started_by}, from `notebooks/{config.NOTEBOOKS[stage]}.ipynb` "
                   f"at commit `{commit}`. Parameters: "
                   + ", ".join(f"`{key}={value!r}`" for key, value in values.items()) + ".")
    return name, description


def end_stage_run(outcome: str) -> None:
    """Put what the stage found (`outcome`) first in the active run's description (the UI shows a
    description's first lines only), and end the run unless the stage runner owns it: the runner
    ends it once it has logged the executed notebook."""
    run = mlflow.active_run()
    if run is None:
        return
    description = MlflowClient().get_run(run.info.run_id).data.tags.get(RUN_DESCRIPTION_TAG, "")
    mlflow.set_tag(RUN_DESCRIPTION_TAG, f"**Result:** {outcome}\n\n{description}".strip())
    if run.info.run_id not in _runner_runs:
        mlflow.end_run()


def _not_about_pip_version(record: logging.LogRecord) -> bool:
    # MLflow writes conda.yaml with an unpinned pip when pip is not installed (uv's environments).
    return "Failed to resolve installed pip version" not in record.getMessage()


def quiet_known_warnings() -> None:
    """Silence the library warnings a stage triggers that ask nothing of the user (they appeared in
    every stage's output, every notebook and its HTML in MLflow). Idempotent."""
    # torch's model export, for weights that are not on the CPU (ours always are).
    warnings.filterwarnings("ignore", message="No complete tensor found in the group")
    logging.getLogger("mlflow.utils.environment").addFilter(_not_about_pip_version)
    # MLflow's INFO lines: "Detected uv project" on every model logged, "Creating initial MLflow
    # database tables" on a new sqlite store.
    for name in ("mlflow.utils.uv_utils", "mlflow.store.db.utils"):
        logging.getLogger(name).setLevel(logging.WARNING)


# Runs this process resumed from $MLFLOW_RUN_ID (which MLflow unsets once it has read it).
_runner_runs: set[str] = set()


def create_stage_run(root: Path, stage: str, params, started_by: str, *, parent_run_id: str | None = None,
                     tags: dict[str, str] | None = None) -> str:
    """Create the stage's MLflow run, not yet active: provenance tags, a name and description a
    person can tell it by, the parameters; nested in `parent_run_id` (a sweep's run) if given.

    Runs a killed process left RUNNING on this host are closed first (see close_abandoned_runs).
    """
    from mlflow.entities import Param
    from mlflow.tracking.context import registry as context
    from mlflow.utils.mlflow_tags import MLFLOW_PARENT_RUN_ID

    quiet_known_warnings()
    experiment_id = configure(root)
    close_abandoned_runs(experiment_id)
    run_tags = {**provenance_tags(root, stage, params), "runner": started_by}
    run_name, run_tags[RUN_DESCRIPTION_TAG] = describe_run(stage, params, run_tags["git_commit"], started_by)
    if parent_run_id:
        run_tags[MLFLOW_PARENT_RUN_ID] = parent_run_id
    client = MlflowClient()
    # The tags mlflow.start_run adds (user, source type), then ours.
    run = client.create_run(experiment_id, run_name=run_name, tags=context.resolve_tags({**run_tags, **(tags or {})}))
    client.log_batch(run.info.run_id, params=[Param(k, str(v)) for k, v in config.as_dict(params).items()])
    return run.info.run_id


def start_stage_run(root: Path, stage: str, params, extra_tags: dict[str, str] | None = None):
    """Make the stage's MLflow run the active run and return it.

    Under the stage runner (dvc repro, sweeps) that is the run it created, named by MLflow's own
    $MLFLOW_RUN_ID; run by hand (JupyterLab) the notebook creates its own.
    """
    quiet_known_warnings()
    if os.environ.get("MLFLOW_RUN_ID"):
        run = mlflow.start_run()  # resumes $MLFLOW_RUN_ID
        _runner_runs.add(run.info.run_id)
        # The process that runs the notebook (`pid` is the runner's, which owns the run).
        mlflow.set_tags({"kernel_pid": str(os.getpid()), **(extra_tags or {})})
        return run
    return mlflow.start_run(create_stage_run(root, stage, params, runner(), tags=extra_tags))


def close_abandoned_runs(experiment_id: str) -> list[str]:
    """Mark KILLED the runs this host left RUNNING whose process is gone (kill -9, power loss).

    The `pid` tag is the process that owns the run: the stage runner, or the kernel of a notebook
    run by hand.
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
        images, targets=labels, source=_local_source(prepared_dir / f"{split}_images.npy"),
        name=f"mnist-{split}", digest=dataset_digest(prepared_dir, split)[:16],
    )
    mlflow.log_input(dataset, context=split)


def _local_source(path: Path):
    """A local file as a dataset source. MLflow registers two local source classes (for URIs with
    and without `file:`), so resolving a bare path warns that it is ambiguous: pick one."""
    from mlflow.data.dataset_source_registry import get_registered_sources, resolve_dataset_source

    local = next(source for source in get_registered_sources() if source._get_source_type() == "local")
    return resolve_dataset_source(str(path), candidate_sources=[local])
