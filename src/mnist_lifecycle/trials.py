"""A sweep's Optuna trial, from both sides: the sweep worker that runs it (sweep.py) and the
training notebook that reports to it.

The worker hands the trial to the notebook's kernel in one environment variable, $MNIST_SWEEP_TRIAL
(the study's storage, name, trial id and pruner, as JSON), through the stage runner, which passes
its environment on to the kernel as it does $MLFLOW_TRACKING_URI. In the environment and not on a
command line: a PostgreSQL URL holds a password. Without it (JupyterLab, `dvc repro`) the notebook's
reporter does nothing.
"""

from __future__ import annotations

import json
import os
from collections.abc import Callable
from typing import Any

TRIAL_ENV = "MNIST_SWEEP_TRIAL"
PRUNERS = ("median", "none")
SAMPLERS = ("tpe", "random")


def make_pruner(name: str):
    """`median`: stop a trial whose validation accuracy after an epoch is below the median of the
    earlier trials' after the same epoch, once two trials have finished; `none`: never."""
    import optuna

    if name == "median":
        return optuna.pruners.MedianPruner(n_startup_trials=2, n_warmup_steps=0)
    return optuna.pruners.NopPruner()


def make_sampler(name: str, seed: int):
    """`tpe`: 5 random trials, then TPE over all parameters together; while other workers' trials
    run, it counts them as poor results (constant liar) so that workers do not try the same
    region at once. `random`: uniform over the space (log-uniform on log ranges)."""
    import optuna

    if name == "random":
        return optuna.samplers.RandomSampler(seed=seed)
    return optuna.samplers.TPESampler(seed=seed, n_startup_trials=5, multivariate=True, constant_liar=True)


def storage(url: str, heartbeat_seconds: int | None = None, stale_trial_callback=None):
    """Optuna's database storage (sqlite or PostgreSQL); with `heartbeat_seconds`, a running
    trial's worker writes a heartbeat that often, and a trial without one for 3 times as long is
    failed by the next worker that looks, which calls `stale_trial_callback` (a retry)."""
    import warnings

    import optuna

    # Several workers and their kernels write one sqlite file: wait for its lock, not fail at once.
    engine = {"connect_args": {"timeout": 60}} if url.startswith("sqlite") else {"pool_pre_ping": True}
    heartbeat = {} if heartbeat_seconds is None else {
        "heartbeat_interval": heartbeat_seconds, "grace_period": 3 * heartbeat_seconds,
        "heartbeat_stale_trial_callback": stale_trial_callback}
    with warnings.catch_warnings():
        # Heartbeats are "experimental" in Optuna since 2.9 and unchanged since; say nothing of it.
        warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
        return optuna.storages.RDBStorage(url, engine_kwargs=engine, **heartbeat)


def environment(storage_url: str, study_name: str, trial_id: int, pruner: str) -> dict[str, str]:
    """What the stage runner's environment gets for the kernel to find its trial."""
    return {TRIAL_ENV: json.dumps({"storage": storage_url, "study": study_name, "trial_id": trial_id,
                                   "pruner": pruner})}


def epoch_reporter(run_id: str, params) -> Callable[[Any], None]:
    """In a sweep's trial: a function that reports an epoch's validation accuracy to the trial and
    raises optuna.TrialPruned when the pruner stops it before the last of `params.epochs` (a
    trained model is kept whatever it scores); the trial also learns its MLflow run (so that a
    dead trial's run can be closed). Outside a sweep: a function that does nothing."""
    spec = os.environ.get(TRIAL_ENV)
    if not spec:
        return lambda result: None
    import optuna

    spec = json.loads(spec)
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    study = optuna.load_study(study_name=spec["study"], storage=storage(spec["storage"]),
                              pruner=make_pruner(spec["pruner"]))
    trial = optuna.Trial(study, spec["trial_id"])
    trial.set_user_attr("mlflow_run_id", run_id)

    def report(result) -> None:
        trial.report(result.val_accuracy, result.epoch)
        if result.epoch < params.epochs and trial.should_prune():
            raise optuna.TrialPruned(
                f"pruned after epoch {result.epoch}: val_accuracy {result.val_accuracy:.4f} is below "
                f"the median of the finished trials after that epoch ({spec['pruner']} pruner)")

    return report
