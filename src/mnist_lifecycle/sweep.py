"""Sweeps on Optuna: the training notebook over a grid, a list of points or a search space, run
by workers on one or many machines against one study in a database.

    python -m mnist_lifecycle.sweep params/sweeps/lr_width.yaml --workers 2
    python -m mnist_lifecycle.sweep FILE --storage postgresql+psycopg://user:pw@db/optuna   # any host joins

A sweep file names the points (see params/sweeps/ and docs/sweeps.md):

    grid:               # every combination of these values...
      lr: [0.003, 0.01, 0.03, 0.1]
      width: [8, 16]
    points:             # ...and/or these parameter sets, as listed
      - {lr: 0.01, augment_shift: 2}
    fixed: {epochs: 1}  # set for every trial (optional)
    evaluate: false     # also run notebooks/03_evaluate.ipynb on each trial's model (optional)

or, instead of grid and points, a search space with a budget:

    search:
      lr: {low: 0.001, high: 0.1, log: true}
      width: [8, 16, 32]  # choices
    trials: 16
    sampler: tpe          # or random; seeded by `seed` (default 0)
    pruner: median        # or none (the default for grids and points)

A trial's parameters are params/train.yaml, then `fixed`, then its own values; every name and value
is checked before anything runs. The study lives in `--storage` (default: sqlite in
sweeps/<sweep>/study.db), named after the sweep file: the same command on another machine joins it,
and run again it resumes. Grid and listed points are Optuna's trial queue (enqueued once, when the
study is made, and each taken by one worker); a search asks the sampler. Each trial runs the train
stage through the stage runner (`python -m mnist_lifecycle.stage train --set ... --output-dir ...
--parent-run ...`) into sweeps/<sweep>/<trial>/, and its MLflow run nests in the sweep's one parent
run. The notebook reports each epoch to its trial, whose pruner may stop it. A worker that dies
(kill -9) stops its heartbeat: the next worker to look fails its trial, closes its MLflow run and
queues it again. The sweep ends with sweeps/<sweep>/summary.{csv,md,png}, Optuna's views and
best.yaml (a params/train.yaml), also logged to the parent run.

Each training uses torch's intra-op threads: with W workers on C cores each kernel gets C // W
(OMP_NUM_THREADS), so workers do not fight over cores.
"""

from __future__ import annotations

import argparse
import csv
import ctypes
import hashlib
import itertools
import json
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
import warnings
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any

import yaml

from . import config, trials
from .paths import Layout

SWEEP_KEYS = ("grid", "points", "fixed", "evaluate", "search", "trials", "sampler", "seed", "pruner")
TRAIN_NOTEBOOK = Path("notebooks") / f"{config.NOTEBOOKS['train']}.ipynb"
MAX_RETRIES = 2  # a trial whose worker died is queued again this many times at most


class SweepError(ValueError):
    """The sweep file is malformed or cannot run; the message says where."""


class TrialFailed(Exception):
    """A trial's notebook failed (e.g. training diverged): recorded, and the study goes on."""


@dataclass(frozen=True)
class Point:
    name: str  # also its directory: index, then the values it sets itself, e.g. 03_lr=0.2_width=8
    params: config.TrainParams  # everything the notebook gets
    values: dict[str, Any] = field(default_factory=dict)  # the values it sets itself


@dataclass(frozen=True)
class Dimension:
    """One parameter of a search space: a range (`low`..`high`, `log` scale) or `choices`."""
    name: str
    low: Any = None
    high: Any = None
    log: bool = False
    choices: tuple = ()

    def suggest(self, trial) -> Any:
        if self.choices:
            return trial.suggest_categorical(self.name, list(self.choices))
        if isinstance(self.low, int):
            return trial.suggest_int(self.name, self.low, self.high, log=self.log)
        return trial.suggest_float(self.name, self.low, self.high, log=self.log)


@dataclass(frozen=True)
class Sweep:
    name: str
    path: Path
    points: list[Point]  # grid and listed points; empty for a search
    swept: list[str]  # parameter names whose value differs between trials
    evaluate: bool
    base: dict[str, Any]  # params/train.yaml with `fixed`
    search: list[Dimension] = field(default_factory=list)
    budget: int = 0  # trials of a search
    sampler: str = "tpe"
    seed: int = 0
    pruner: str = "none"
    digest: str = ""  # of the file's content: a study resumed from another file is refused

    @property
    def total(self) -> int:
        return len(self.points) or self.budget


@dataclass
class Outcome:
    point: Point
    status: str = "FAILED"  # or FINISHED, PRUNED
    run_id: str | None = None
    metrics: dict[str, float] = field(default_factory=dict)
    error: str = ""
    seconds: float = 0.0
    number: int = 0  # the Optuna trial's


def available_cpus() -> int:
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1


def _shown(root: Path, path: Path) -> Path:
    """A path as a user in the project root would type it."""
    return path.relative_to(root) if path.is_relative_to(root) else path


def _point_name(index: int, values: dict[str, Any]) -> str:
    shown = {name: float(f"{value:.4g}") if isinstance(value, float) else value for name, value in values.items()}
    return "_".join([f"{index:02d}", *(f"{name}={config.yaml_value(value)}" for name, value in shown.items())])


def _search_space(shown: Path, search: Any, base: dict[str, Any]) -> list[Dimension]:
    """The search space's dimensions; each bound and choice checked as a value of the parameter."""
    if not isinstance(search, dict) or not search:
        raise SweepError(f"{shown}: search must map parameters to a range {{low, high, log}} or a list of choices")
    types = {f.name: f.type for f in fields(config.TrainParams)}
    dimensions = []
    for name, spec in search.items():
        if isinstance(spec, list) and spec:
            values, dimension = spec, Dimension(name, choices=tuple(spec))
        elif isinstance(spec, dict) and {"low", "high"} <= set(spec) <= {"low", "high", "log"}:
            cast = {"int": int, "float": float}.get(types[name])
            if cast is None or not all(isinstance(spec[k], (int, float)) and not isinstance(spec[k], bool)
                                       for k in ("low", "high")):
                raise SweepError(f"{shown}: search.{name}: a range needs a numeric parameter and numbers, "
                                 f"got {spec!r}; give a list of choices instead")
            low, high, log = cast(spec["low"]), cast(spec["high"]), spec.get("log", False)
            if not isinstance(log, bool) or not low < high or (log and low <= 0):
                raise SweepError(f"{shown}: search.{name} = {spec!r}: needs low < high (and low > 0 with log: true)")
            values, dimension = [low, high], Dimension(name, low, high, log)
        else:
            raise SweepError(f"{shown}: search.{name} must be {{low: ..., high: ..., log: true|false}} or a "
                             f"non-empty list of choices, got {spec!r}")
        for value in values:
            try:
                config.validate("train", {**base, name: value}, source=f"{shown}:search")
            except config.ParamsError as exc:
                raise SweepError(str(exc)) from exc
        dimensions.append(dimension)
    return dimensions


def load_sweep(root: Path, path: Path) -> Sweep:
    """Read and check a sweep file: every name known to the notebook, every point's types valid."""
    shown = _shown(root, path)
    try:
        text = path.read_text()
        spec = yaml.safe_load(text)
    except (OSError, yaml.YAMLError) as exc:
        raise SweepError(f"{shown}: cannot be read as YAML ({exc})") from exc
    if not isinstance(spec, dict):
        raise SweepError(f"{shown}: must be a mapping with {', '.join(SWEEP_KEYS)}")
    unknown = sorted(set(spec) - set(SWEEP_KEYS))
    if unknown:
        raise SweepError(f"{shown}: unknown key(s) {', '.join(unknown)}; a sweep has {', '.join(SWEEP_KEYS)}")
    grid, listed, fixed = spec.get("grid") or {}, spec.get("points") or [], spec.get("fixed") or {}
    search = spec.get("search")
    if not isinstance(grid, dict) or not all(isinstance(v, list) and v for v in grid.values()):
        raise SweepError(f"{shown}: grid must map each parameter to a non-empty list of values")
    if not isinstance(listed, list) or not all(isinstance(p, dict) and p for p in listed):
        raise SweepError(f"{shown}: points must be a list of parameter mappings")
    if not isinstance(fixed, dict):
        raise SweepError(f"{shown}: fixed must map parameters to values")
    evaluate = spec.get("evaluate", False)
    if not isinstance(evaluate, bool):
        raise SweepError(f"{shown}: evaluate must be true or false, got {evaluate!r}")
    if search is not None and (grid or listed):
        raise SweepError(f"{shown}: give either search (with trials) or grid/points, not both")
    budget, sampler, seed = spec.get("trials"), spec.get("sampler", "tpe"), spec.get("seed", 0)
    pruner = spec.get("pruner", "median" if search is not None else "none")
    if search is None and any(key in spec for key in ("trials", "sampler", "seed")):
        raise SweepError(f"{shown}: trials, sampler and seed belong to a search; a grid runs each point once")
    if search is not None and (not isinstance(budget, int) or isinstance(budget, bool) or budget < 1):
        raise SweepError(f"{shown}: a search needs trials: a whole number of at least 1, got {budget!r}")
    if sampler not in trials.SAMPLERS:
        raise SweepError(f"{shown}: sampler must be one of {', '.join(trials.SAMPLERS)}, got {sampler!r}")
    if not isinstance(seed, int) or isinstance(seed, bool) or not config.SEEDS.check(seed):
        raise SweepError(f"{shown}: seed must be {config.SEEDS.allowed}, got {seed!r}")
    if pruner not in trials.PRUNERS:
        raise SweepError(f"{shown}: pruner must be one of {', '.join(trials.PRUNERS)}, got {pruner!r}")

    # The notebook's parameters cell is what papermill fills in; a name it lacks would be ignored.
    import papermill

    takes = list(papermill.inspect_notebook(str(root / TRAIN_NOTEBOOK)))
    for name in [*grid, *fixed, *(name for point in listed for name in point), *(search or {})]:
        if name not in takes:
            raise SweepError(f"{shown}: unknown parameter {name!r}; {TRAIN_NOTEBOOK} takes {', '.join(takes)}")

    base = config.as_dict(config.load(root, "train"))
    try:
        # params/train.yaml passed config.load: a bad value here comes from the sweep file.
        base = config.as_dict(config.validate("train", {**base, **fixed}, source=str(shown)))
    except config.ParamsError as exc:
        raise SweepError(str(exc)) from exc
    digest = hashlib.sha256(text.encode()).hexdigest()[:16]
    if search is not None:
        dimensions = _search_space(shown, search, base)
        return Sweep(path.stem, path, [], [d.name for d in dimensions], evaluate, base, dimensions, budget,
                     sampler, seed, pruner, digest)
    sets = [dict(zip(grid, combination)) for combination in itertools.product(*grid.values())] if grid else []
    sets += listed
    if not sets:
        raise SweepError(f"{shown}: no points; give a grid, points or both (or a search)")
    points = []
    for index, values in enumerate(sets, start=1):
        name = _point_name(index, values)
        try:
            params = config.validate("train", {**base, **values}, source=str(shown))
        except config.ParamsError as exc:
            raise SweepError(f"point {name}: {exc}") from exc
        points.append(Point(name, params, values))
    swept = [name for name in takes if len({getattr(p.params, name) for p in points}) > 1]
    return Sweep(path.stem, path, points, swept, evaluate, base, pruner=pruner, digest=digest)


def best_params_yaml(root: Path, params: config.TrainParams) -> str:
    """params/train.yaml with the values replaced by `params`, comments and order kept."""
    values = config.as_dict(params)
    lines = []
    for line in config.params_path(root, "train").read_text().splitlines():
        match = re.match(r"^(\w+):(\s*)([^#]*?)(\s*#.*)?$", line)
        if match and match[1] in values:
            line = f"{match[1]}:{match[2] or ' '}{config.yaml_value(values[match[1]])}{match[4] or ''}"
        lines.append(line)
    return "\n".join(lines) + "\n"


def shown_storage(url: str) -> str:
    """A storage URL without its password, to print and tag."""
    from sqlalchemy.engine import make_url

    return make_url(url).render_as_string(hide_password=True)


def _die_with_parent() -> None:
    """In the stage runner's process, before exec: SIGKILL when the worker that started it dies,
    so that a killed worker leaves no trial running (its kernel follows the runner: ipykernel
    exits when its parent does)."""
    ctypes.CDLL(None, use_errno=True).prctl(1, signal.SIGKILL)  # PR_SET_PDEATHSIG


class Worker:
    """This process's part of a study: `workers` threads take trials until none is left."""

    def __init__(self, root: Path, sweep: Sweep, output: Path, storage_url: str, workers: int, threads: int,
                 heartbeat: int):
        import optuna
        from mlflow.tracking import MlflowClient

        from . import tracking

        optuna.logging.set_verbosity(optuna.logging.ERROR)  # this module prints each trial's end
        self.root, self.sweep, self.output, self.storage_url = root, sweep, output, storage_url
        self.workers, self.threads = workers, threads
        self.tracking_uri = config.use_default_tracking_uri(root)  # the kernels inherit it
        self.client = MlflowClient()
        self.experiment_id = tracking.configure(root)
        self.lock = threading.Lock()
        self.stopping = threading.Event()  # Ctrl-C: no new trial; the interrupted ones are queued again
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)  # stable since 2.8
            self.retry = optuna.storages.RetryHeartbeatStaleTrialCallback(max_retry=MAX_RETRIES)
        self.storage = trials.storage(storage_url, heartbeat, self.worker_died)
        self.study = self.open_study()
        self.parent_id = self.study.user_attrs["mlflow_parent_run_id"]

    def open_study(self):
        """Make the study, or join it: whoever makes it queues the points and opens the parent run."""
        import optuna

        sampler = trials.make_sampler(self.sweep.sampler, self.sweep.seed)
        pruner = trials.make_pruner(self.sweep.pruner)
        try:
            study = optuna.create_study(storage=self.storage, study_name=self.sweep.name, direction="maximize",
                                        sampler=sampler, pruner=pruner)
        except optuna.exceptions.DuplicatedStudyError:
            study = optuna.load_study(study_name=self.sweep.name, storage=self.storage, sampler=sampler,
                                      pruner=pruner)
            deadline = time.monotonic() + 60
            while "mlflow_parent_run_id" not in study.user_attrs:  # its maker is still at it
                if time.monotonic() > deadline:
                    raise SweepError(f"study {self.sweep.name} in {shown_storage(self.storage_url)} has no MLflow "
                                     f"parent run: its maker stopped early; run again with --overwrite")
                time.sleep(1)
            made_from = study.user_attrs.get("sweep_digest")
            if made_from != self.sweep.digest:
                raise SweepError(f"study {self.sweep.name} in {shown_storage(self.storage_url)} was made from "
                                 f"another version of {self.sweep.path.name}; pass --overwrite to start over")
            self.client.update_run(study.user_attrs["mlflow_parent_run_id"], status="RUNNING")
            return study
        for point in self.sweep.points:
            study.enqueue_trial(point.values, user_attrs={"point": point.name})
        study.set_user_attr("sweep_digest", self.sweep.digest)
        study.set_user_attr("mlflow_parent_run_id", self.open_parent_run())
        return study

    def open_parent_run(self) -> str:
        from mlflow.entities import Param

        from . import tracking

        storage = shown_storage(self.storage_url)
        sweep_file = _shown(self.root, self.sweep.path)
        description = (f"Sweep `{sweep_file}`: Optuna study `{self.sweep.name}` in `{storage}`, one nested run per "
                       f"trial. Join or resume it from any machine with `python -m mnist_lifecycle.sweep "
                       f"{sweep_file} --storage {storage}`{' (with the password)' if '***' in storage else ''}; watch it with "
                       f"`uvx optuna-dashboard {storage}`.")
        run_id = self.client.create_run(
            self.experiment_id, run_name=self.sweep.name,
            tags={"sweep": self.sweep.name, "git_commit": tracking.git_commit(self.root),
                  "optuna_storage": storage, "optuna_study": self.sweep.name,
                  "mlflow.source.name": "mnist_lifecycle.sweep", tracking.RUN_DESCRIPTION_TAG: description},
        ).info.run_id
        params = {"sweep_file": _shown(self.root, self.sweep.path), "trials": self.sweep.total,
                  "swept": ",".join(self.sweep.swept), "evaluate": self.sweep.evaluate,
                  "sampler": self.sweep.sampler if self.sweep.search else "queue", "pruner": self.sweep.pruner}
        self.client.log_batch(run_id, params=[Param(k, str(v)) for k, v in params.items()])
        self.client.log_artifact(run_id, str(self.sweep.path))
        return run_id

    def worker_died(self, study, trial) -> None:
        """Optuna's callback for a trial whose worker stopped its heartbeat: close its MLflow run,
        queue it again."""
        run_id = trial.user_attrs.get("mlflow_run_id")
        if run_id:
            self.client.set_tag(run_id, "error", f"its worker {trial.user_attrs.get('worker', '?')} stopped "
                                                 f"(no heartbeat); retried as a new trial")
            self.client.set_terminated(run_id, status="FAILED")
        self.retry(study, trial)
        self.progress(f"trial {trial.number} ({trial.user_attrs.get('point', '?')}): its worker died; queued again")

    def progress(self, event: str) -> None:
        from optuna.trial import TrialState

        counts = {state: 0 for state in TrialState}
        for trial in self.study.get_trials(deepcopy=False):
            counts[trial.state] += 1
        print(f"[{counts[TrialState.COMPLETE]}/{self.sweep.total} done, {counts[TrialState.RUNNING]} running, "
              f"{counts[TrialState.PRUNED]} pruned, {counts[TrialState.FAIL]} failed] {event}", flush=True)

    def execute(self, stage: str, trial_dir: Path, overrides: dict, parent_id: str,
                extra_env: dict[str, str]) -> tuple[str | None, str]:
        """One stage of a trial, through the stage runner in a process of its own (each kernel gets
        its own threads); (its MLflow run id, error or "")."""
        log = trial_dir / f"{config.NOTEBOOKS[stage]}.log"
        env = {**os.environ,  # with $MLFLOW_TRACKING_URI (use_default_tracking_uri)
               "OMP_NUM_THREADS": str(self.threads), "MKL_NUM_THREADS": str(self.threads), **extra_env}
        command = [sys.executable, "-m", "mnist_lifecycle.stage", stage, "--output-dir", str(trial_dir),
                   "--parent-run", parent_id, *(f"--set={name}={config.yaml_value(value)}" for name, value in overrides.items())]
        with log.open("w") as stream:
            result = subprocess.run(command, cwd=self.root, env=env, stdout=stream, stderr=subprocess.STDOUT,
                                    preexec_fn=_die_with_parent)
        record = Layout(self.root, trial_dir).stage_run(stage)
        recorded = json.loads(record.read_text()) if record.is_file() else {}
        error = recorded.get("error", "")
        if result.returncode and not error:
            error = f"the stage runner exited {result.returncode}; see {_shown(self.root, log)}"
        return recorded.get("mlflow_run_id"), error

    def objective(self, trial) -> float:
        """One trial: its values from the queue or the sampler, the train stage (and evaluate)."""
        import optuna

        started = time.perf_counter()
        trial.set_user_attr("worker", f"{socket.gethostname()}:{os.getpid()}")
        if self.sweep.search:
            values = {d.name: d.suggest(trial) for d in self.sweep.search}
            name = _point_name(trial.number + 1, values)
        elif "point" not in trial.user_attrs:
            # Another machine took the last queued point between this worker's look and its ask.
            raise optuna.TrialPruned("nothing left in the queue")
        else:
            name = trial.user_attrs["point"]
            point = next(p for p in self.sweep.points if p.name == name)
            # Suggested from every value the sweep gives the parameter: one distribution per name.
            values = {key: trial.suggest_categorical(key, sorted({p.values[key] for p in self.sweep.points
                                                                  if key in p.values}))
                      for key in point.values}
        params = config.validate("train", {**self.sweep.base, **values}, source=name)
        trial.set_user_attr("point", name)
        trial.set_user_attr("params", config.as_dict(params))
        trial_dir = self.output / name
        if trial_dir.exists():  # a retried trial's earlier attempt
            trial_dir = self.output / f"{name}.trial{trial.number}"
        trial_dir.mkdir(parents=True)
        self.progress(f"started trial {trial.number}: {name}")
        env = trials.environment(self.storage_url, self.sweep.name, trial._trial_id, self.sweep.pruner)
        run_id, error = self.execute("train", trial_dir, config.as_dict(params), self.parent_id, env)
        metrics = {}
        if not error:
            metrics = json.loads((trial_dir / "model" / "metrics.json").read_text())
            with (trial_dir / "model" / "history.csv").open() as stream:
                metrics["train_seconds"] = sum(float(row["seconds"]) for row in csv.DictReader(stream))
        if not error and self.sweep.evaluate:
            _, evaluation_error = self.execute("evaluate", trial_dir, {}, run_id, {})
            if evaluation_error:
                error = f"evaluate: {evaluation_error}"
            else:
                test = json.loads((trial_dir / "evaluation" / "metrics.json").read_text())["test"]
                metrics["test_accuracy"] = test["accuracy"]
        seconds = time.perf_counter() - started
        trial.set_user_attr("wall_seconds", round(seconds, 1))
        if error and self.stopping.is_set():
            error = "interrupted (Ctrl-C); queued again, for the sweep's resume"
        pruned = "TrialPruned: " in error
        if pruned:
            error = error.split("TrialPruned: ", 1)[1]
        trial.set_user_attr("error", error)
        for key, value in metrics.items():
            trial.set_user_attr(key, value)
        if run_id:
            self.tag_run(run_id, name, trial.number, "PRUNED" if pruned else "FAILED" if error else "", error,
                         metrics)
        if pruned:
            raise optuna.TrialPruned(error)
        if error:
            raise TrialFailed(error)
        return metrics["val_accuracy"]

    def ended(self, study, trial) -> None:
        """Optuna's callback once a trial's end is recorded: a line with the study's counts."""
        from optuna.trial import TrialState

        name, seconds = trial.user_attrs.get("point", "?"), trial.user_attrs.get("wall_seconds", 0)
        if self.stopping.is_set() and trial.state == TrialState.FAIL:  # its kernel got the Ctrl-C too
            self.retry(study, trial)
            self.progress(f"interrupted trial {trial.number} {name}: queued again, to run when the sweep resumes")
        elif trial.state == TrialState.COMPLETE:
            self.progress(f"finished trial {trial.number} {name} in {seconds:.0f} s: val_accuracy {trial.value:.4f}")
        else:
            self.progress(f"{trial.state.name.replace('FAIL', 'FAILED')} trial {trial.number} {name} after "
                          f"{seconds:.0f} s: {trial.user_attrs.get('error', '')}")

    def tag_run(self, run_id: str, name: str, number: int, state: str, error: str, metrics: dict) -> None:
        from mlflow.entities import RunTag

        tags = {"sweep": self.sweep.name, "sweep_point": name, "optuna_trial": str(number),
                "mlflow.runName": f"{name} · sweep {self.sweep.name}"}
        if state:
            tags["trial_state"] = state
            tags["error"] = error[:5000]  # MLflow's limit on a tag's value
        self.client.log_batch(run_id, tags=[RunTag(k, v) for k, v in tags.items()])
        if "test_accuracy" in metrics:
            self.client.log_metric(run_id, "test_accuracy", metrics["test_accuracy"])
        if state:  # the stage runner marked a failed notebook FAILED; a pruned trial was stopped
            self.client.set_terminated(run_id, status="KILLED" if state == "PRUNED" else "FAILED")

    def left(self) -> tuple[bool, bool]:
        """(a trial can start here, another worker's trial is running)."""
        from optuna.exceptions import ExperimentalWarning
        from optuna.storages import fail_stale_trials
        from optuna.trial import TrialState

        with warnings.catch_warnings():
            warnings.simplefilter("ignore", ExperimentalWarning)  # stable since 2.9, still so marked
            fail_stale_trials(self.study)  # a dead worker's trial: failed and queued again (worker_died)
        states = [t.state for t in self.study.get_trials(deepcopy=False)]
        fresh = sum("failed_trial" not in t.system_attrs for t in self.study.get_trials(deepcopy=False)
                    if t.state != TrialState.WAITING)  # a retry does not count against the budget
        startable = TrialState.WAITING in states or (bool(self.sweep.search) and fresh < self.sweep.budget)
        return startable, TrialState.RUNNING in states

    def work(self) -> None:
        """One worker: a trial at a time while any can start; waits while others' trials run
        (one of them may die and be queued again)."""
        while not self.stopping.is_set():
            # One thread of this process at a time decides and takes its trial (the lock is let go
            # once the trial is taken): a queued trial is never asked for twice here.
            self.lock.acquire()
            taken = False

            def objective(trial) -> float:
                nonlocal taken
                taken = True
                self.lock.release()
                return self.objective(trial)

            try:
                startable, running = self.left()
                if startable:
                    self.study.optimize(objective, n_trials=1, catch=(TrialFailed,), callbacks=[self.ended])
            finally:
                if not taken:
                    self.lock.release()
            if startable:
                continue
            if running:
                time.sleep(min(5, self.storage.get_heartbeat_interval() or 5))
            else:
                return

    def run(self) -> list[Outcome]:
        status = "KILLED"
        try:
            with ThreadPoolExecutor(max_workers=self.workers) as pool:
                try:
                    for future in [pool.submit(self.work) for _ in range(self.workers)]:
                        future.result()
                except KeyboardInterrupt:
                    self.stopping.set()
                    print("interrupted: the running trials stop and are queued again; the same command "
                          "resumes the sweep", flush=True)
                    raise
            outcomes = self.outcomes()
            self.summarize(outcomes)
            status = "FINISHED"
            return outcomes
        finally:
            self.client.set_terminated(self.parent_id, status=status)

    def outcomes(self) -> list[Outcome]:
        """Each trial that ran, except an attempt of a point that was queued again."""
        from optuna.trial import TrialState

        states = {TrialState.COMPLETE: "FINISHED", TrialState.PRUNED: "PRUNED", TrialState.FAIL: "FAILED"}
        finished = [t for t in self.study.get_trials(deepcopy=False) if t.state in states and "params" in t.user_attrs]
        retried = {n for t in self.study.get_trials(deepcopy=False) for n in t.system_attrs.get("retry_history", [])}
        outcomes = []
        for t in finished:
            if t.number in retried:
                continue
            metrics = {k: t.user_attrs[k] for k in ("val_accuracy", "test_accuracy", "train_seconds") if k in t.user_attrs}
            if t.intermediate_values:  # where a pruned trial stood when it was stopped
                metrics["last_reported"] = t.intermediate_values[max(t.intermediate_values)]
            outcomes.append(Outcome(Point(t.user_attrs["point"], config.validate("train", t.user_attrs["params"])),
                                    states[t.state], t.user_attrs.get("mlflow_run_id"), metrics,
                                    t.user_attrs.get("error", ""), t.user_attrs.get("wall_seconds", 0.0), t.number))
        return outcomes

    def summarize(self, outcomes: list[Outcome]) -> None:
        from .evaluation import write_csv

        if not outcomes:
            print("no trial ran")
            return
        order = {"FINISHED": 0, "PRUNED": 1, "FAILED": 2}
        ranked = sorted(outcomes, key=lambda o: (order[o.status], -o.metrics.get("val_accuracy", 0.0), o.number))
        metric_names = ["val_accuracy", *(["test_accuracy"] if self.sweep.evaluate else []), "train_seconds"]
        rows = [{
            "point": o.point.name, "trial": o.number, "status": o.status,
            **{name: getattr(o.point.params, name) for name in self.sweep.swept},
            **{name: o.metrics.get(name, "") for name in metric_names},
            "wall_seconds": round(o.seconds, 1), "run_id": o.run_id or "", "error": o.error,
        } for o in ranked]
        self.output.mkdir(parents=True, exist_ok=True)
        write_csv(self.output / "summary.csv", rows)
        table = markdown_table(rows)
        (self.output / "summary.md").write_text(f"# Sweep {self.sweep.name}\n\n{table}\n")
        figure = summary_figure(f"sweep {self.sweep.name}", outcomes, self.sweep.swept,
                                {d.name for d in self.sweep.search if d.log})
        figure.savefig(self.output / "summary.png", dpi=100)
        names = ["summary.csv", "summary.md", "summary.png", *optuna_views(self.study, self.output)]
        for name in names:
            self.client.log_artifact(self.parent_id, str(self.output / name))
        for status in ("FAILED", "PRUNED"):
            self.client.log_metric(self.parent_id, f"trials_{status.lower()}", sum(o.status == status for o in outcomes))
        print(f"\n{table}\n")
        best = ranked[0]
        if best.status != "FINISHED":
            print(f"no trial finished; see {self.output}/*/*.log")
            return
        self.client.log_metric(self.parent_id, "best_val_accuracy", best.metrics["val_accuracy"])
        self.client.set_tag(self.parent_id, "best_point", best.point.name)
        self.client.set_tag(self.parent_id, "best_run_id", best.run_id)
        best_yaml = best_params_yaml(self.root, best.point.params)
        (self.output / "best.yaml").write_text(best_yaml)
        self.client.log_artifact(self.parent_id, str(self.output / "best.yaml"))
        print(f"best point {best.point.name}: val_accuracy {best.metrics['val_accuracy']:.4f} "
              f"(MLflow run {best.run_id}); as params/train.yaml "
              f"(cp {_shown(self.root, self.output)}/best.yaml params/train.yaml):\n\n{best_yaml}")


def optuna_views(study, directory: Path) -> list[str]:
    """Optuna's own views of the study as PNGs in `directory`: optimization history, parameter
    importances and parallel coordinates (the last two need two finished trials that differ)."""
    import warnings

    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import optuna.visualization.matplotlib as views
    from optuna.exceptions import ExperimentalWarning
    from optuna.trial import TrialState

    written = []
    if not study.get_trials(deepcopy=False, states=(TrialState.COMPLETE,)):
        return written
    for name, view in (("optimization_history", views.plot_optimization_history),
                       ("param_importances", views.plot_param_importances),
                       ("parallel_coordinate", views.plot_parallel_coordinate)):
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", ExperimentalWarning)
            try:
                axes = view(study)
            except (ValueError, RuntimeError) as exc:  # too few finished trials for this view
                print(f"no {name} view: {exc}")
                continue
        figure = (axes.flat[0] if hasattr(axes, "flat") else axes).figure
        figure.set_size_inches(8, 5)
        figure.tight_layout()
        figure.savefig(directory / f"{name}.png", dpi=100)
        plt.close(figure)
        written.append(f"{name}.png")
    return written


def markdown_table(rows: list[dict]) -> str:
    def cell(name: str, value: Any) -> str:
        if isinstance(value, float) and name.endswith("accuracy"):
            return f"{value:.4f}"
        if isinstance(value, float) and name.endswith("seconds"):
            return f"{value:.1f}"
        if isinstance(value, float):
            return f"{value:.4g}"
        return str(value).replace("|", "\\|").replace("\n", " ")

    header = list(rows[0])
    lines = ["| " + " | ".join(header) + " |", "|" + " --- |" * len(header)]
    lines += ["| " + " | ".join(cell(name, row[name]) for name in header) + " |" for row in rows]
    return "\n".join(lines)


def summary_figure(title: str, outcomes: list[Outcome], swept: list[str], log_scale: set[str] = frozenset()):
    """Validation accuracy against each swept parameter (a line through the best trial per value
    of a grid); pruned trials as grey dots where they stood when stopped, failed ones as red
    crosses, both at the bottom edge if lower than every finished trial. A search's ranges are
    drawn to scale (log where searched so)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names = swept or ["seed"]
    figure, axes = plt.subplots(1, len(names), figsize=(4 * len(names), 3.5), squeeze=False, sharey=True)
    finished = [o for o in outcomes if o.status == "FINISHED"]
    pruned = [o for o in outcomes if o.status == "PRUNED"]
    failed = [o for o in outcomes if o.status == "FAILED"]
    floor = min((o.metrics["val_accuracy"] for o in finished), default=0.0)
    floor -= 0.1 * (max((o.metrics["val_accuracy"] for o in finished), default=1.0) - floor) or 0.001
    for axis, name in zip(axes[0], names):
        values = sorted({getattr(o.point.params, name) for o in outcomes})
        numeric = all(isinstance(v, (int, float)) for v in values)
        if numeric and len(values) > 8:  # a search: the values themselves
            x = {value: value for value in values}
            if name in log_scale:
                axis.set_xscale("log")
        else:  # a grid's values evenly spaced: learning rates 0.003..0.1 or widths 8..32 stay readable
            x = {value: index for index, value in enumerate(values)}
            axis.set_xticks(range(len(values)), [config.yaml_value(v) for v in values])
        axis.plot([x[getattr(o.point.params, name)] for o in finished],
                  [o.metrics["val_accuracy"] for o in finished], "o", alpha=0.6, label="trial")
        if len(values) <= 8:
            best = {}
            for o in finished:
                value = getattr(o.point.params, name)
                best[value] = max(best.get(value, 0.0), o.metrics["val_accuracy"])
            axis.plot([x[v] for v in sorted(best)], [best[v] for v in sorted(best)], "-", label="best")
        if pruned:
            axis.plot([x[getattr(o.point.params, name)] for o in pruned],
                      [max(floor, o.metrics.get("last_reported", floor)) for o in pruned],
                      "o", color="grey", alpha=0.6, label="pruned (when stopped)")
        if failed:
            axis.plot([x[getattr(o.point.params, name)] for o in failed], [floor] * len(failed),
                      "rx", markersize=10, label="failed")
        axis.set_xlabel(name)
        axis.grid(alpha=0.3)
    axes[0][0].set_ylabel("validation accuracy")
    axes[0][0].legend(fontsize=8)
    figure.suptitle(title)
    figure.tight_layout()
    return figure


def _positive(text: str) -> int:
    if not text.isdigit() or int(text) < 1:
        raise argparse.ArgumentTypeError(f"must be a whole number of at least 1, got {text!r}")
    return int(text)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("sweep_file", type=Path)
    parser.add_argument("--storage", help="the study's database: sqlite:///FILE or postgresql+psycopg://USER:PASSWORD@"
                                          "HOST/DB (default: sqlite in the output directory, study.db)")
    parser.add_argument("--workers", type=_positive, help="trials run at once here (default: one per CPU, "
                                                          "at most one per point)")
    parser.add_argument("--threads", type=_positive, help="torch threads per worker (default: CPUs // workers)")
    parser.add_argument("--output", type=Path, help="where the trials go (default: sweeps/<sweep name>)")
    parser.add_argument("--overwrite", action="store_true", help="delete the study and its output and start over")
    parser.add_argument("--heartbeat", type=_positive, default=10,
                        help="seconds between a running trial's heartbeats; one silent 3 times as long is "
                             "failed and retried (default 10)")
    args = parser.parse_args(argv)
    root = config.project_root()
    try:
        sweep = load_sweep(root, args.sweep_file.resolve())
        workers = args.workers or min(available_cpus(), sweep.total)
        threads = args.threads or max(1, available_cpus() // workers)
        if not (root / "data" / "prepared" / "train_images.npy").is_file():
            raise SweepError("no prepared data in data/prepared: run `uv run dvc repro prepare` first")
        output = (args.output or root / "sweeps" / sweep.name).resolve()
        if not output.is_relative_to(root):  # each trial's model records its path relative to the root
            raise SweepError(f"--output {output} is outside the project {root}")
        storage_url = args.storage or f"sqlite:///{output / 'study.db'}"
    except (SweepError, config.ParamsError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    if args.overwrite:
        import optuna

        shutil.rmtree(output, ignore_errors=True)
        if args.storage:
            try:
                optuna.delete_study(study_name=sweep.name, storage=args.storage)
            except KeyError:  # none yet
                pass
    output.mkdir(parents=True, exist_ok=True)
    print(f"sweep {sweep.name}: {sweep.total} trials, {workers} worker(s) here x {threads} torch thread(s), "
          f"study in {shown_storage(storage_url)}, trials into {output}", flush=True)
    try:
        worker = Worker(root, sweep, output, storage_url, workers, threads, args.heartbeat)
    except SweepError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    print(f"MLflow run {worker.parent_id} in {worker.tracking_uri}", flush=True)
    try:
        outcomes = worker.run()
    except KeyboardInterrupt:
        return 130  # as a shell reports Ctrl-C; run() has said how to resume
    return 1 if any(o.status == "FAILED" for o in outcomes) else 0


if __name__ == "__main__":
    sys.exit(main())
