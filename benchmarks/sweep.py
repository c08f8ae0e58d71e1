"""Parallel efficiency of papermill sweeps on this machine: one sweep, run with 1 and 2 workers,
against 8 times a single training run.

    flock /tmp/cpu-bench.lock uv run python benchmarks/sweep.py [--epochs 1] [--sweep FILE]

Measures, one after the other and side by side:
  single   one point (params/train.yaml's defaults, width 16: the costlier width of the grid),
           1 worker with all cores' torch threads: what `dvc repro train` runs;
  1 worker the sweep's points one at a time, each with all cores' threads;
  2 workers two points at a time, one torch thread each.
Every time is the wall time of the whole `python -m mnist_lifecycle.sweep` command (kernel start,
imports, data, training, model logging, summary). Points log to the MLflow experiment
"sweep-benchmark" in the project's store, and write into a temporary directory.

Results (2 cores, full MNIST after `dvc repro prepare`, params/sweeps/lr_width.yaml: 8 points;
measured while other jobs shared the CPU, so the ratios, not the seconds, are the finding):

    --epochs 1 (a shorter real sweep: the 2-epoch one twice did not fit the shared machine)
    single point                     TODO
    8 points, 1 worker  x 2 threads  TODO
    8 points, 2 workers x 1 thread   TODO
"""

from __future__ import annotations

import argparse
import csv
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import yaml

ROOT = Path(__file__).resolve().parents[1]


def timed_sweep(spec: dict, name: str, workers: int, threads: int, scratch: Path) -> tuple[float, list[dict]]:
    sweep_file = scratch / f"{name}.yaml"
    sweep_file.write_text(yaml.safe_dump(spec, sort_keys=False))
    output = scratch / name
    env = {**os.environ, "MLFLOW_EXPERIMENT_NAME": "sweep-benchmark"}
    started = time.perf_counter()
    result = subprocess.run(
        [sys.executable, "-m", "mnist_lifecycle.sweep", str(sweep_file), "--workers", str(workers),
         "--threads", str(threads), "--output", str(output)],
        cwd=ROOT, env=env, capture_output=True, text=True,
    )
    seconds = time.perf_counter() - started
    if result.returncode != 0:
        sys.exit(f"sweep {name} failed ({result.returncode}):\n{result.stdout[-3000:]}\n{result.stderr[-3000:]}")
    with (output / "summary.csv").open() as stream:
        return seconds, list(csv.DictReader(stream))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--sweep", type=Path, default=ROOT / "params" / "sweeps" / "lr_width.yaml")
    parser.add_argument("--epochs", type=int, help="override the epochs of every point (a shorter sweep)")
    args = parser.parse_args()
    spec = yaml.safe_load(args.sweep.read_text())
    if args.epochs:
        spec["fixed"] = {**(spec.get("fixed") or {}), "epochs": args.epochs}
    single = {"fixed": spec.get("fixed") or {}, "points": [{"seed": 0}]}  # params/train.yaml as it is
    cores = len(os.sched_getaffinity(0))
    print(f"{args.sweep.name}{f', epochs {args.epochs}' if args.epochs else ''}; {cores} cores", flush=True)
    with tempfile.TemporaryDirectory(prefix="sweep-benchmark-") as scratch:
        scratch = Path(scratch)
        one, _ = timed_sweep(single, "single", 1, cores, scratch)
        print(f"single point                     {one:7.1f} s", flush=True)
        sequential, rows = timed_sweep(spec, "workers1", 1, cores, scratch)
        points = len(rows)
        print(f"{points} points, 1 worker  x {cores} threads  {sequential:7.1f} s"
              f"  ({points} x single = {points * one:.1f} s)", flush=True)
        parallel, rows2 = timed_sweep(spec, "workers2", 2, max(1, cores // 2), scratch)
        print(f"{points} points, 2 workers x {max(1, cores // 2)} thread   {parallel:7.1f} s", flush=True)
    print(f"speed-up of 2 workers over 1: {sequential / parallel:.2f}x "
          f"(parallel efficiency {sequential / parallel / 2:.0%})")
    print(f"{points} x single / 2 workers: {points * one / parallel:.2f}x; "
          f"{points} x single / 1 worker: {points * one / sequential:.2f}x")
    # Same points, same seeds: the accuracy must not depend on how the sweep was scheduled.
    accuracy = {row["point"]: float(row["val_accuracy"]) for row in rows}
    accuracy2 = {row["point"]: float(row["val_accuracy"]) for row in rows2}
    worst = max(abs(accuracy[p] - accuracy2[p]) for p in accuracy)
    print(f"best point {rows[0]['point']} val_accuracy {float(rows[0]['val_accuracy']):.4f}; "
          f"largest val_accuracy difference between the two runs of a point: {worst:.4f}")


if __name__ == "__main__":
    main()
