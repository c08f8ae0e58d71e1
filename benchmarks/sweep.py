"""Sweeps on this machine: the parallel efficiency of one grid run with 1 and 2 workers against 8
times a single training run, and a seeded TPE search against a random search of the same budget.

    flock /tmp/cpu-bench.lock uv run python benchmarks/sweep.py [--epochs 1] [--sweep FILE] [--rounds 2]
        [--search FILE] [--part grid|search|both]

Measures, in rounds of alternating order (the CPU is shared: the best of the rounds counts):
  single     one point of params/train.yaml's defaults (width 12 in the run below),
             1 worker with all cores' torch threads: what `dvc repro train` runs;
  1 worker   the sweep's points one at a time, each with all cores' threads;
  2 workers  two points at a time, one torch thread each.
Every time is the wall time of the whole `python -m mnist_lifecycle.sweep` command (kernel start,
imports, data, training, model logging, notebook logging, summary). Points log to the MLflow
experiment "sweep-benchmark" in the project's store, and write into a temporary directory (with
the study's sqlite file: each sweep is a study of its own).

Then (--part search or both) params/sweeps/lr_search.yaml, 16 trials with 2 workers, once with its
TPE sampler and once with a random sampler, same seed and pruner: the best validation accuracy each
reaches, after how many trials (by trial number, the order trials started), trials pruned, time.

Results on Optuna (2026-11-30, a loaded machine) are in benchmarks/README.md. Results of the grid
part before the move to Optuna (the process pool of our own), on a quiet machine:

Results, 2 cores, full MNIST, params/sweeps/lr_width.yaml (8 points of 2 epochs, widths 8 and 16).
`uv run python benchmarks/sweep.py --rounds 1` on 2026-11-27 at 15:38-15:50 UTC, nothing else
running (load average 0.0-1.6), with the model before its strided stem:

    single     1 x 2 thread(s), 1 point(s):    63.9 s
    1 worker   1 x 2 thread(s), 8 point(s):   358.9 s
    2 workers  2 x 1 thread(s), 8 point(s):   273.9 s
    8 x single 511.1 s
    2 workers against 1 worker: 1.31x faster (parallel efficiency 66%)
    2 workers against 8 x single: 1.87x faster (parallel efficiency 93%); 1 worker against 8 x single: 1.42x
    best point 06_lr=0.2_width=16: val_accuracy 0.9928; largest difference of a point's
    val_accuracy between 2 threads and 1: 0.0012

An earlier 2-round run on a loaded machine (load average 2 to 14) gave the same picture: best of
2, single 62.1 s, 1 worker 341.8 s, 2 workers 269.9 s (1.27x).

Reading them:
- Against the 1-worker sweep of the same points, the honest sequential baseline, 2 workers are
  1.31x faster: a parallel efficiency of 66% on 2 cores. During training a lone worker already
  uses the second core well (in the loaded run's MLflow records a point trained in 23 s on
  average with 2 threads and 37 s with 1: a thread efficiency of ~81%; in this run the 1-thread
  points of the 2-worker sweep averaged 38.7 s). What 2 workers win is the ~19 s per point outside training
  (kernel start, imports, data, model and notebook logging), which runs on one core: a second
  worker fills the other. Hence the default of one worker per core with one thread each.
- "8 x single" overstates the sequential cost (1.42x the 1-worker sweep): each single run pays
  the sweep command's start-up (~6 s) and summary once more.
- Contention hurts 2-thread workers far more than 1-thread ones: in the loaded run, a 1-worker
  sweep that met a busy spell took 6.4x its other time, the 2-worker sweeps never more than 1.5x.
  torch's threads wait on each other when another process takes a core.
- The same point trained with 1 or 2 threads differs by at most 0.0012 in validation accuracy:
  floating-point sums in another order.
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


def grid(args, cores: int, scratch: Path) -> None:
    spec = yaml.safe_load(args.sweep.read_text())
    if args.epochs:
        spec["fixed"] = {**(spec.get("fixed") or {}), "epochs": args.epochs}
    configurations = {  # name: (sweep, workers, threads per worker)
        "single": ({"fixed": spec.get("fixed") or {}, "points": [{"seed": 0}]}, 1, cores),  # params/train.yaml
        "1 worker": (spec, 1, cores),
        "2 workers": (spec, 2, max(1, cores // 2)),
    }
    print(f"{args.sweep.name}{f', epochs {args.epochs}' if args.epochs else ''}; {cores} cores", flush=True)
    times = {name: [] for name in configurations}
    accuracy = {}
    for round_ in range(args.rounds):
        # Alternate the order (ABC, CBA, ...) so a slow spell of the shared CPU hits all alike.
        order = list(configurations) if round_ % 2 == 0 else list(reversed(configurations))
        for name in order:
            sweep, workers, threads = configurations[name]
            load = os.getloadavg()[0]
            seconds, rows = timed_sweep(sweep, f"{name.replace(' ', '')}-{round_}", workers, threads, scratch)
            times[name].append(seconds)
            accuracy[name] = {row["point"]: float(row["val_accuracy"]) for row in rows}
            print(f"round {round_ + 1}: {name:9} {workers} x {threads} thread(s), {len(rows)} point(s): "
                  f"{seconds:7.1f} s  (load average before: {load:.1f})", flush=True)
    points = len(accuracy["1 worker"])
    best = {name: min(values) for name, values in times.items()}  # the least disturbed run
    print(f"\nbest of {args.rounds}: single {best['single']:.1f} s; {points} x single {points * best['single']:.1f} s; "
          f"1 worker {best['1 worker']:.1f} s; 2 workers {best['2 workers']:.1f} s")
    print(f"2 workers against 1 worker: {best['1 worker'] / best['2 workers']:.2f}x faster "
          f"(parallel efficiency {best['1 worker'] / best['2 workers'] / 2:.0%})")
    print(f"2 workers against {points} x single: {points * best['single'] / best['2 workers']:.2f}x faster "
          f"(parallel efficiency {points * best['single'] / best['2 workers'] / 2:.0%}); "
          f"1 worker against {points} x single: {points * best['single'] / best['1 worker']:.2f}x")
    # Same points, same seeds: only the torch thread count differs between the two schedules.
    worst = max(abs(accuracy["1 worker"][p] - accuracy["2 workers"][p]) for p in accuracy["1 worker"])
    top = max(accuracy["2 workers"], key=accuracy["2 workers"].get)
    print(f"best point {top}: val_accuracy {accuracy['2 workers'][top]:.4f}; largest difference of a point's "
          f"val_accuracy between 2 threads and 1: {worst:.4f}", flush=True)


def trials_to_best(rows: list[dict]) -> tuple[float, int]:
    """(best validation accuracy, the number of trials started when the trial reaching it started)."""
    finished = sorted((int(row["trial"]), float(row["val_accuracy"])) for row in rows if row["status"] == "FINISHED")
    best = max(value for _, value in finished)
    return best, next(number for number, value in finished if value == best) + 1


def guided_first_epochs(study_db: Path, name: str, startup: int = 5) -> float:
    """The mean validation accuracy after the first epoch of the trials after TPE's 5 random ones
    (pruned trials included): how good the regions each sampler chose were."""
    import optuna

    optuna.logging.set_verbosity(optuna.logging.ERROR)
    study = optuna.load_study(study_name=name, storage=f"sqlite:///{study_db}")
    values = [t.intermediate_values[1] for t in study.trials if t.number >= startup and 1 in t.intermediate_values]
    return sum(values) / len(values)


def search(args, cores: int, scratch: Path) -> None:
    spec = yaml.safe_load(args.search.read_text())
    results = {}
    for seed in args.seeds:
        for sampler in ("tpe", "random"):
            load = os.getloadavg()[0]
            name = f"search-{sampler}-{seed}"
            seconds, rows = timed_sweep({**spec, "sampler": sampler, "seed": seed}, name, 2, max(1, cores // 2), scratch)
            best, reached = trials_to_best(rows)
            guided = guided_first_epochs(scratch / name / "study.db", name)
            pruned = sum(row["status"] == "PRUNED" for row in rows)
            failed = sum(row["status"] == "FAILED" for row in rows)
            results[sampler, seed] = (best, reached, seconds, guided)
            print(f"{args.search.name} seed {seed} {sampler:6}: {len(rows)} trials in {seconds:6.1f} s, best val_accuracy "
                  f"{best:.4f} reached at trial {reached}; {pruned} pruned, {failed} failed; trials 6-16 after epoch 1: "
                  f"mean val_accuracy {guided:.4f}  (load average before: {load:.1f})", flush=True)
    for seed in args.seeds:
        (tpe, tpe_at, tpe_s, tpe_g), (rnd, rnd_at, rnd_s, rnd_g) = results["tpe", seed], results["random", seed]
        print(f"seed {seed}, TPE against random: best val_accuracy {tpe - rnd:+.4f} (error rate {(1 - tpe) / (1 - rnd):.2f}x "
              f"random's), reached after {tpe_at} trials against {rnd_at}; trials 6-16 after epoch 1 {tpe_g - rnd_g:+.4f}; "
              f"wall time {tpe_s / rnd_s:.2f}x", flush=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--sweep", type=Path, default=ROOT / "params" / "sweeps" / "lr_width.yaml")
    parser.add_argument("--search", type=Path, default=ROOT / "params" / "sweeps" / "lr_search.yaml")
    parser.add_argument("--part", choices=("grid", "search", "both"), default="both")
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1], help="seeds of the search part (default 0 1)")
    parser.add_argument("--epochs", type=int, help="override the epochs of every grid point (a shorter sweep)")
    parser.add_argument("--rounds", type=int, default=2, help="rounds of the grid part, in alternating order (default 2)")
    args = parser.parse_args()
    cores = len(os.sched_getaffinity(0))
    (ROOT / "sweeps").mkdir(exist_ok=True)
    # In the project: a trial's model records its path relative to the project's root.
    with tempfile.TemporaryDirectory(prefix="benchmark-", dir=ROOT / "sweeps") as scratch:
        if args.part in ("grid", "both"):
            grid(args, cores, Path(scratch))
        if args.part in ("search", "both"):
            search(args, cores, Path(scratch))


if __name__ == "__main__":
    main()
