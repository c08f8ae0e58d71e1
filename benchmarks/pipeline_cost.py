"""Where the seconds of `dvc repro -f` go: a timeline of the stages, every cell, and import costs.

    MNIST_SOURCE_DIR=../shared/data/mnist uv run python benchmarks/pipeline_cost.py [--rounds 2]

In a fresh copy of the project: `dvc repro` once (builds the data, not counted), then `dvc repro -f`
timed --rounds times. For each forced run, papermill's timestamps in data/executed/*.ipynb split
the wall time into each notebook's cells and the gaps around the notebooks (DVC, the stage runner's
start, kernel boot, recording the executed notebook in MLflow). The training loop's own seconds come
from data/model/history.csv; the test accuracy from data/evaluation/metrics.json. Then the import time of each library a stage loads, each in a fresh
interpreter (median of 3). Prints tables and writes benchmarks/results/pipeline_cost.json; the
figures are written down in benchmarks/README.md.
"""

from __future__ import annotations

import argparse
import csv
import json
import statistics
import subprocess
import sys
import tempfile
import time
from datetime import datetime
from pathlib import Path

import nbformat

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from mnist_lifecycle import config, data, paths  # noqa: E402
from tests.conftest import copy_project, project_env  # noqa: E402

# What the stages' first cells import, one at a time (each also pays what it shares with the others).
IMPORTS = ["numpy", "torch", "mlflow", "mlflow.pytorch", "torch.export", "sqlalchemy", "matplotlib.pyplot",
           "papermill", "nbconvert", "mnist_lifecycle.stage", "mnist_lifecycle.tracking",
           "mnist_lifecycle.training", "mnist_lifecycle.evaluation", "torch, mlflow.pytorch, mnist_lifecycle.evaluation"]


def timestamp(text: str) -> float:
    return datetime.fromisoformat(text.replace("Z", "+00:00")).timestamp()


def first_line(source: str) -> str:
    lines = [line for line in source.splitlines() if line.strip() and not line.startswith("#")]
    return (lines[0] if lines else "")[:70]


def forced_run(project: Path, env: dict) -> dict:
    started = time.time()
    result = subprocess.run(["dvc", "repro", "-f"], cwd=project, env=env, capture_output=True, text=True)
    ended = time.time()
    if result.returncode:
        sys.exit(f"dvc repro -f exited {result.returncode}:\n{result.stdout[-3000:]}\n{result.stderr[-3000:]}")
    timeline, previous_end = [], started
    for stage in config.STAGES:
        notebook = nbformat.read(project / "data" / "executed" / f"{config.NOTEBOOKS[stage]}.ipynb", as_version=4)
        run = notebook.metadata["papermill"]
        cells = [{"cell": first_line(cell.source), "seconds": round(cell.metadata["papermill"]["duration"] or 0, 2)}
                 for cell in notebook.cells if cell.cell_type == "code"]
        timeline.append({"stage": stage, "before_notebook_seconds": round(timestamp(run["start_time"]) - previous_end, 2),
                         "notebook_seconds": round(run["duration"], 2), "cells": cells})
        previous_end = timestamp(run["end_time"])
    layout = paths.Layout(project, project / "data")
    with open(layout.history) as stream:
        train_loop = sum(float(row["seconds"]) for row in csv.DictReader(stream))
    test_accuracy = json.loads(layout.evaluation_metrics.read_text())["test"]["accuracy"]
    return {"wall_seconds": round(ended - started, 2), "after_last_notebook_seconds": round(ended - previous_end, 2),
            "train_loop_seconds": round(train_loop, 2), "test_accuracy": test_accuracy, "ratio": round((ended - started) / train_loop, 2),
            "stages": timeline}


def import_seconds(env: dict, module: str) -> float:
    runs = []
    for _ in range(3):
        started = time.perf_counter()
        subprocess.run([sys.executable, "-c", f"import {module}"], env=env, check=True, capture_output=True)
        runs.append(time.perf_counter() - started)
    return round(statistics.median(runs), 2)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rounds", type=int, default=2)
    args = parser.parse_args()
    mnist_source = data.resolve_source_dir("")
    if mnist_source is None:
        sys.exit("set MNIST_SOURCE_DIR to the directory with the four MNIST idx .gz files")
    with tempfile.TemporaryDirectory() as tmp:
        project = copy_project(Path(tmp) / "project")
        env = project_env(project, mnist_source)
        subprocess.run(["dvc", "repro"], cwd=project, env=env, check=True, capture_output=True)
        runs = []
        for _ in range(args.rounds):
            runs.append(forced_run(project, env))
            print(f"dvc repro -f: {runs[-1]['wall_seconds']} s, training loop {runs[-1]['train_loop_seconds']} s, "
                  f"ratio {runs[-1]['ratio']}, test accuracy {runs[-1]['test_accuracy']}", flush=True)
        bare = import_seconds(env, "sys")
        imports = {module: import_seconds(env, module) for module in IMPORTS}
    results = {"runs": runs, "interpreter_seconds": bare, "import_seconds": imports}
    last = runs[-1]
    print(f"\nlast forced run: {last['wall_seconds']} s wall")
    for stage in last["stages"]:
        print(f"  {stage['stage']}: {stage['before_notebook_seconds']} s before its notebook, "
              f"notebook {stage['notebook_seconds']} s")
        for cell in stage["cells"]:
            print(f"    {cell['seconds']:6.2f} s  {cell['cell']}")
    print(f"  after the last notebook: {last['after_last_notebook_seconds']} s")
    print(f"\nimport, fresh interpreter (bare interpreter {bare} s):")
    for module, seconds in imports.items():
        print(f"  {seconds:5.2f} s  import {module}")
    out = ROOT / "benchmarks" / "results" / "pipeline_cost.json"
    out.write_text(json.dumps(results, indent=2) + "\n")
    print(f"written to {out.relative_to(ROOT)}")


if __name__ == "__main__":
    main()
