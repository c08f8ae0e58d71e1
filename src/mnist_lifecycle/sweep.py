"""Batch sweeps: the training notebook over a set of parameter points, headless and in parallel.

    python -m mnist_lifecycle.sweep params/sweeps/lr_width.yaml --workers 2

A sweep file names the points (see params/sweeps/):

    grid:               # every combination of these values...
      lr: [0.05, 0.1, 0.2, 0.4]
      width: [8, 16]
    points:             # ...and/or these parameter sets, as listed
      - {lr: 0.1, augment_shift: 2}
    fixed: {epochs: 1}  # set for every point (optional)
    evaluate: false     # also run notebooks/03_evaluate.ipynb on each point's model (optional)

A point's parameters are params/train.yaml, then `fixed`, then the point's own values. Names are
checked against the notebook's `parameters` cell and values with config.validate before anything
runs. Each point runs the train stage through the stage runner (`python -m mnist_lifecycle.stage
train --set ... --output-dir ... --parent-run ...`, as dvc.yaml runs it, in a kernel of its own),
writing into sweeps/<sweep>/<point>/ (executed/, runs/, model/, the runner's log and, with
evaluate, evaluation/) instead of data/. In MLflow the sweep is one run and each point a run nested in it. A point that fails
(e.g. training diverged) is recorded as failed with its error and the others go on. The sweep ends
with sweeps/<sweep>/summary.{csv,md,png}, also logged to the sweep's run, and the best point as
sweeps/<sweep>/best.yaml, a params/train.yaml to copy over the pipeline's.

Each training uses torch's intra-op threads: with W workers on C cores each kernel gets C // W
(OMP_NUM_THREADS), so workers do not fight over cores.
"""

from __future__ import annotations

import argparse
import csv
import itertools
import json
import os
import re
import shutil
import socket
import subprocess
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from . import config
from .paths import Layout

SWEEP_KEYS = ("grid", "points", "fixed", "evaluate")
TRAIN_NOTEBOOK = Path("notebooks") / f"{config.NOTEBOOKS['train']}.ipynb"


class SweepError(ValueError):
    """The sweep file is malformed or cannot run; the message says where."""


@dataclass(frozen=True)
class Point:
    name: str  # also its directory: index, then the values it sets itself, e.g. 03_lr=0.2_width=8
    params: config.TrainParams  # everything the notebook gets


@dataclass(frozen=True)
class Sweep:
    name: str
    path: Path
    points: list[Point]
    swept: list[str]  # parameter names whose value differs between points
    evaluate: bool


@dataclass
class Outcome:
    point: Point
    status: str = "FAILED"  # or FINISHED
    run_id: str | None = None
    metrics: dict[str, float] = field(default_factory=dict)
    error: str = ""
    seconds: float = 0.0


def available_cpus() -> int:
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1


def _shown(root: Path, path: Path) -> Path:
    """A path as a user in the project root would type it."""
    return path.relative_to(root) if path.is_relative_to(root) else path


def _yaml_value(value: Any) -> str:
    """A value as YAML writes it: 1e-05 becomes 1.0e-05, which YAML reads back as a float."""
    return yaml.safe_dump(value, default_flow_style=True).splitlines()[0]


def _point_name(index: int, values: dict[str, Any]) -> str:
    return "_".join([f"{index:02d}", *(f"{name}={_yaml_value(value)}" for name, value in values.items())])


def load_sweep(root: Path, path: Path) -> Sweep:
    """Read and check a sweep file: every name known to the notebook, every point's types valid."""
    shown = _shown(root, path)
    try:
        spec = yaml.safe_load(path.read_text())
    except (OSError, yaml.YAMLError) as exc:
        raise SweepError(f"{shown}: cannot be read as YAML ({exc})") from exc
    if not isinstance(spec, dict):
        raise SweepError(f"{shown}: must be a mapping with {', '.join(SWEEP_KEYS)}")
    unknown = sorted(set(spec) - set(SWEEP_KEYS))
    if unknown:
        raise SweepError(f"{shown}: unknown key(s) {', '.join(unknown)}; a sweep has {', '.join(SWEEP_KEYS)}")
    grid, listed, fixed = spec.get("grid") or {}, spec.get("points") or [], spec.get("fixed") or {}
    if not isinstance(grid, dict) or not all(isinstance(v, list) and v for v in grid.values()):
        raise SweepError(f"{shown}: grid must map each parameter to a non-empty list of values")
    if not isinstance(listed, list) or not all(isinstance(p, dict) and p for p in listed):
        raise SweepError(f"{shown}: points must be a list of parameter mappings")
    if not isinstance(fixed, dict):
        raise SweepError(f"{shown}: fixed must map parameters to values")
    evaluate = spec.get("evaluate", False)
    if not isinstance(evaluate, bool):
        raise SweepError(f"{shown}: evaluate must be true or false, got {evaluate!r}")

    # The notebook's parameters cell is what papermill fills in; a name it lacks would be ignored.
    import papermill

    takes = list(papermill.inspect_notebook(str(root / TRAIN_NOTEBOOK)))
    for name in [*grid, *fixed, *(name for point in listed for name in point)]:
        if name not in takes:
            raise SweepError(f"{shown}: unknown parameter {name!r}; {TRAIN_NOTEBOOK} takes {', '.join(takes)}")

    base = config.as_dict(config.load(root, "train"))
    sets = [dict(zip(grid, combination)) for combination in itertools.product(*grid.values())] if grid else []
    sets += listed
    if not sets:
        raise SweepError(f"{shown}: no points; give a grid, points or both")
    points = []
    for index, values in enumerate(sets, start=1):
        name = _point_name(index, values)
        try:
            # params/train.yaml passed config.load: a bad value here comes from the sweep file.
            params = config.validate("train", {**base, **fixed, **values}, source=str(shown))
        except config.ParamsError as exc:
            raise SweepError(f"point {name}: {exc}") from exc
        points.append(Point(name, params))
    swept = [name for name in takes if len({getattr(p.params, name) for p in points}) > 1]
    return Sweep(path.stem, path, points, swept, evaluate)


def best_params_yaml(root: Path, params: config.TrainParams) -> str:
    """params/train.yaml with the values replaced by `params`, comments and order kept."""
    values = config.as_dict(params)
    lines = []
    for line in config.params_path(root, "train").read_text().splitlines():
        match = re.match(r"^(\w+):(\s*)([^#]*?)(\s*#.*)?$", line)
        if match and match[1] in values:
            line = f"{match[1]}:{match[2] or ' '}{_yaml_value(values[match[1]])}{match[4] or ''}"
        lines.append(line)
    return "\n".join(lines) + "\n"


class Runner:
    """Runs the points of one sweep; MLflow calls from the worker threads go through one lock."""

    def __init__(self, root: Path, sweep: Sweep, output: Path, workers: int, threads: int):
        from mlflow.tracking import MlflowClient

        from . import tracking

        self.root, self.sweep, self.output = root, sweep, output
        self.workers, self.threads = workers, threads
        self.tracking_uri = config.use_default_tracking_uri(root)  # the kernels inherit it
        self.client = MlflowClient()
        self.experiment_id = tracking.configure(root)
        self.lock = threading.Lock()
        self.counts = {"done": 0, "running": 0, "failed": 0}
        self.parent_id = self.client.create_run(
            self.experiment_id, run_name=sweep.name,
            tags={"sweep": sweep.name, "git_commit": tracking.git_commit(root),
                  "host": socket.gethostname(), "pid": str(os.getpid()),
                  "mlflow.source.name": "mnist_lifecycle.sweep"},
        ).info.run_id

    def progress(self, event: str) -> None:
        c, total = self.counts, len(self.sweep.points)
        print(f"[{c['done']}/{total} done, {c['running']} running, {c['failed']} failed] {event}", flush=True)

    def execute(self, stage: str, point_dir: Path, overrides: dict, parent_id: str) -> tuple[str | None, str]:
        """One stage of a point, through the stage runner in a process of its own (each kernel gets
        its own threads); (its MLflow run id, error or "")."""
        log = point_dir / f"{config.NOTEBOOKS[stage]}.log"
        env = {**os.environ, "MLFLOW_TRACKING_URI": self.tracking_uri,
               "OMP_NUM_THREADS": str(self.threads), "MKL_NUM_THREADS": str(self.threads)}
        command = [sys.executable, "-m", "mnist_lifecycle.stage", stage, "--output-dir", str(point_dir),
                   "--parent-run", parent_id, *(f"--set={name}={_yaml_value(value)}" for name, value in overrides.items())]
        with log.open("w") as stream:
            result = subprocess.run(command, cwd=self.root, env=env, stdout=stream, stderr=subprocess.STDOUT)
        record = Layout(self.root, point_dir).stage_run(stage)
        recorded = json.loads(record.read_text()) if record.is_file() else {}
        error = recorded.get("error", "")
        if result.returncode and not error:
            error = f"the stage runner exited {result.returncode}; see {_shown(self.root, log)}"
        return recorded.get("mlflow_run_id"), error

    def run_point(self, point: Point) -> Outcome:
        from mlflow.entities import RunTag

        outcome, started = Outcome(point), time.perf_counter()
        point_dir = self.output / point.name
        point_dir.mkdir(parents=True)
        with self.lock:
            self.counts["running"] += 1
            self.progress(f"started {point.name}")
        try:
            outcome.run_id, outcome.error = self.execute("train", point_dir, config.as_dict(point.params),
                                                         self.parent_id)
            if not outcome.error:
                outcome.metrics = json.loads((point_dir / "model" / "metrics.json").read_text())
                with (point_dir / "model" / "history.csv").open() as stream:
                    outcome.metrics["train_seconds"] = sum(float(row["seconds"]) for row in csv.DictReader(stream))
            if not outcome.error and self.sweep.evaluate:
                _, error = self.execute("evaluate", point_dir, {}, outcome.run_id)
                if error:
                    outcome.error = f"evaluate: {error}"
                else:
                    test = json.loads((point_dir / "evaluation" / "metrics.json").read_text())["test"]
                    outcome.metrics["test_accuracy"] = test["accuracy"]
        except Exception as exc:  # a point's own failure must not end the sweep
            outcome.error = f"{type(exc).__name__}: {exc}"
        outcome.status = "FAILED" if outcome.error else "FINISHED"
        outcome.seconds = time.perf_counter() - started
        with self.lock:
            if outcome.run_id:
                tags = {"sweep": self.sweep.name, "sweep_point": point.name, "mlflow.runName": f"{point.name} · sweep {self.sweep.name}"}
                if outcome.error:
                    tags["error"] = outcome.error[:5000]  # MLflow's limit on a tag's value
                self.client.log_batch(outcome.run_id, tags=[RunTag(k, v) for k, v in tags.items()])
                if "test_accuracy" in outcome.metrics:
                    self.client.log_metric(outcome.run_id, "test_accuracy", outcome.metrics["test_accuracy"])
                if outcome.error:
                    self.client.set_terminated(outcome.run_id, status="FAILED")
            self.counts["running"] -= 1
            self.counts["done" if not outcome.error else "failed"] += 1
            if outcome.error:
                self.progress(f"FAILED {point.name} after {outcome.seconds:.0f} s: {outcome.error}")
            else:
                self.progress(f"finished {point.name} in {outcome.seconds:.0f} s: "
                              f"val_accuracy {outcome.metrics['val_accuracy']:.4f}")
        return outcome

    def run(self) -> list[Outcome]:
        from mlflow.entities import Param

        status = "KILLED"
        try:
            params = {"sweep_file": _shown(self.root, self.sweep.path), "points": len(self.sweep.points),
                      "swept": ",".join(self.sweep.swept), "workers": self.workers,
                      "threads_per_worker": self.threads, "evaluate": self.sweep.evaluate}
            self.client.log_batch(self.parent_id, params=[Param(k, str(v)) for k, v in params.items()])
            self.client.log_artifact(self.parent_id, str(self.sweep.path))
            with ThreadPoolExecutor(max_workers=self.workers) as pool:
                outcomes = list(pool.map(self.run_point, self.sweep.points))
            self.summarize(outcomes)
            status = "FINISHED"
            return outcomes
        finally:
            self.client.set_terminated(self.parent_id, status=status)

    def summarize(self, outcomes: list[Outcome]) -> None:
        from .evaluation import write_csv

        ranked = sorted(outcomes, key=lambda o: (o.status != "FINISHED", -o.metrics.get("val_accuracy", 0.0)))
        metric_names = ["val_accuracy", *(["test_accuracy"] if self.sweep.evaluate else []), "train_seconds"]
        rows = [{
            "point": o.point.name, "status": o.status,
            **{name: getattr(o.point.params, name) for name in self.sweep.swept},
            **{name: o.metrics.get(name, "") for name in metric_names},
            "wall_seconds": round(o.seconds, 1), "run_id": o.run_id or "", "error": o.error,
        } for o in ranked]
        write_csv(self.output / "summary.csv", rows)
        table = markdown_table(rows)
        (self.output / "summary.md").write_text(f"# Sweep {self.sweep.name}\n\n{table}\n")
        figure = summary_figure(f"sweep {self.sweep.name}", outcomes, self.sweep.swept)
        figure.savefig(self.output / "summary.png", dpi=100)
        for name in ("summary.csv", "summary.md", "summary.png"):
            self.client.log_artifact(self.parent_id, str(self.output / name))
        failed = sum(o.status == "FAILED" for o in outcomes)
        self.client.log_metric(self.parent_id, "points_failed", failed)
        print(f"\n{table}\n")
        best = ranked[0]
        if best.status != "FINISHED":
            print(f"every point failed; see {self.output}/*/*.log")
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


def markdown_table(rows: list[dict]) -> str:
    def cell(name: str, value: Any) -> str:
        if isinstance(value, float) and name.endswith("accuracy"):
            return f"{value:.4f}"
        if isinstance(value, float) and name.endswith("seconds"):
            return f"{value:.1f}"
        return str(value).replace("|", "\\|").replace("\n", " ")

    header = list(rows[0])
    lines = ["| " + " | ".join(header) + " |", "|" + " --- |" * len(header)]
    lines += ["| " + " | ".join(cell(name, row[name]) for name in header) + " |" for row in rows]
    return "\n".join(lines)


def summary_figure(title: str, outcomes: list[Outcome], swept: list[str]):
    """Validation accuracy against each swept parameter (a line through the best point per value);
    failed points as red crosses at the bottom."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names = swept or ["seed"]
    figure, axes = plt.subplots(1, len(names), figsize=(4 * len(names), 3.5), squeeze=False, sharey=True)
    finished = [o for o in outcomes if o.status == "FINISHED"]
    failed = [o for o in outcomes if o.status != "FINISHED"]
    floor = min((o.metrics["val_accuracy"] for o in finished), default=0.0)
    for axis, name in zip(axes[0], names):
        # Values on evenly spaced positions: learning rates 0.05..0.4 or widths 8..32 stay readable.
        values = sorted({getattr(o.point.params, name) for o in outcomes})
        x = {value: index for index, value in enumerate(values)}
        axis.plot([x[getattr(o.point.params, name)] for o in finished],
                  [o.metrics["val_accuracy"] for o in finished], "o", alpha=0.6, label="point")
        best = {}
        for o in finished:
            value = getattr(o.point.params, name)
            best[value] = max(best.get(value, 0.0), o.metrics["val_accuracy"])
        axis.plot([x[v] for v in sorted(best)], [best[v] for v in sorted(best)], "-", label="best")
        if failed:
            axis.plot([x[getattr(o.point.params, name)] for o in failed], [floor] * len(failed),
                      "rx", markersize=10, label="failed")
        axis.set_xticks(range(len(values)), [_yaml_value(v) for v in values])
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
    parser.add_argument("--workers", type=_positive, help="points run at once (default: one per CPU, at most one per point)")
    parser.add_argument("--threads", type=_positive, help="torch threads per worker (default: CPUs // workers)")
    parser.add_argument("--output", type=Path, help="where the points go (default: sweeps/<sweep name>)")
    parser.add_argument("--overwrite", action="store_true", help="replace the output of an earlier run")
    args = parser.parse_args(argv)
    root = config.project_root()
    try:
        sweep = load_sweep(root, args.sweep_file.resolve())
        workers = args.workers or min(available_cpus(), len(sweep.points))
        threads = args.threads or max(1, available_cpus() // workers)
        if not (root / "data" / "prepared" / "train_images.npy").is_file():
            raise SweepError("no prepared data in data/prepared: run `uv run dvc repro prepare` first")
        output = (args.output or root / "sweeps" / sweep.name).resolve()
        if output.exists() and not args.overwrite:
            raise SweepError(f"{output} exists from an earlier run; pass --overwrite to replace it")
    except (SweepError, config.ParamsError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    print(f"sweep {sweep.name}: {len(sweep.points)} points, {workers} worker(s) x {threads} torch thread(s), "
          f"into {output}", flush=True)
    runner = Runner(root, sweep, output, workers, threads)
    shutil.rmtree(output, ignore_errors=True)
    output.mkdir(parents=True)
    print(f"MLflow run {runner.parent_id} in {runner.tracking_uri}", flush=True)
    outcomes = runner.run()
    return 1 if any(o.status == "FAILED" for o in outcomes) else 0


if __name__ == "__main__":
    sys.exit(main())
