"""Run one stage: its notebook under papermill. Each dvc.yaml stage calls this, and so does every
point of a sweep: one executor, one error report, one way of recording.

    python -m mnist_lifecycle.stage train
    python -m mnist_lifecycle.stage train --set lr=0.2 --output-dir sweeps/s/01 --parent-run ID

1. validates `params/<stage>.yaml` with the `--set` overrides (a bad value stops here, before a
   kernel starts);
2. executes `notebooks/NN_<stage>.ipynb` into `<output>/executed/` (`data/` unless
   `--output-dir`; under a temporary name until it ends) with the parameters injected; the
   notebook opens the stage's MLflow run itself (nested in `--parent-run`), so it runs the same
   in JupyterLab;
3. logs the executed notebook (ipynb and HTML) to that run, tags it with DVC's view of the stage
   (its dependencies' hashes; the experiment's name under `dvc exp run`), marks it FAILED if the
   notebook failed, and writes `<output>/runs/<stage>.json`: the run's id (a DVC metric), and the
   error if it failed.

What the runner adds to the notebook's own time is kept small: the kernel is started before
papermill is even imported (its ~1.4 s boot overlaps the ~1 s import), MLflow and nbconvert are
readied in a background thread while the kernel runs (~4 s), and the kernel is killed as soon as
its last cell ends.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import uuid
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import yaml
from jupyter_client.manager import AsyncKernelManager
from jupyter_core.paths import jupyter_runtime_dir
from jupyter_core.utils import run_sync

from . import config, lineage, outputs
from .paths import Layout




def _prepare_recording(root: Path, stage: str):
    """What record_notebook needs, made ready while the kernel runs: an MLflow client on the
    stage's experiment, an HTML exporter with its templates loaded, and the stage's DVC tags."""
    import nbformat
    from mlflow.tracking import MlflowClient
    from nbconvert import HTMLExporter

    from .tracking import configure, quiet_known_warnings

    quiet_known_warnings()  # as in the kernel: MLflow's INFO lines on a new store
    experiment_id = configure(root)  # first: a client opens the store, which configure guards
    exporter = HTMLExporter()
    exporter.from_notebook_node(nbformat.v4.new_notebook())  # the first conversion loads templates
    return MlflowClient(), experiment_id, exporter, lineage.stage_tags(root, stage)


def record_notebook(client, experiment_id: str, invocation: str, notebook: Path, failed: bool,
                    exporter=None, tags: dict[str, str] | None = None) -> str | None:
    """Log the executed notebook (and tags) to the run the notebook opened; returns that run's id."""
    import nbformat
    from mlflow.entities import RunTag
    from nbconvert import HTMLExporter

    runs = client.search_runs([experiment_id], f"tags.stage_invocation = '{invocation}'", max_results=1)
    if not runs:
        return None  # the notebook failed before it opened a run; the error says why
    run_id = runs[0].info.run_id
    if tags:
        client.log_batch(run_id, tags=[RunTag(key, value) for key, value in tags.items()])
    client.log_artifact(run_id, str(notebook), "notebook")
    html, _ = (exporter or HTMLExporter()).from_notebook_node(nbformat.read(notebook, as_version=4))
    client.log_text(run_id, html, f"notebook/{notebook.stem}.html")
    if failed:
        client.set_terminated(run_id, status="FAILED")
    return run_id


def start_kernel(root: Path) -> AsyncKernelManager:
    """The notebooks' kernel (kernelspec python3: this environment's ipykernel), started in `root`
    with the environment as it is now, without waiting for it to be ready."""
    # Named explicitly, whatever kernel the notebook declares: the project's kernel (make setup) runs
    # this environment too, and the stage must run where it was never registered. Over IPC (local
    # sockets) rather than unencrypted TCP, which the kernel warns about on every start.
    # The sockets' path prefix is unique: the default, "kernel-ipc" in the working directory, is
    # shared by every kernel started there at once (a sweep's workers), which then never connect.
    runtime = Path(jupyter_runtime_dir())
    runtime.mkdir(parents=True, exist_ok=True)
    kernel = AsyncKernelManager(kernel_name="python3", transport="ipc",
                                ip=str(runtime / f"mnist-kernel-{uuid.uuid4().hex[:12]}-ipc"))
    # As nbclient starts its own kernels: no IPython history database to write to.
    run_sync(kernel.start_kernel)(cwd=str(root), extra_arguments=["--HistoryManager.hist_file=:memory:"])
    return kernel


def stage_params(root: Path, stage: str, overrides: dict[str, Any] | None = None):
    """params/<stage>.yaml with `overrides` applied, validated (ParamsError names the bad one)."""
    params = config.load(root, stage)
    if not overrides:
        return params
    # The file's values are valid by now: a message names the override.
    return config.validate(stage, {**config.as_dict(params), **overrides}, source="--set")


def run_stage(root: Path, stage: str, log_output: bool = True, *, overrides: dict[str, Any] | None = None,
              output_dir: Path | None = None, parent_run_id: str | None = None) -> str | None:
    """Execute the stage; returns the MLflow run id, raises on failure after recording it.

    `output_dir` replaces data/ for what train and evaluate write, the executed notebook and the
    run record (a sweep point's directory); `parent_run_id` nests the stage's run in that run.
    """
    params = stage_params(root, stage, overrides)
    config.use_default_tracking_uri(root)  # the kernel inherits the environment
    if stage == "register":
        lineage.require_store(root)  # before the kernel opens its run, which would create it empty
    invocation = uuid.uuid4().hex
    # What the kernel inherits: the run to find afterwards, where to write, the run to nest in.
    os.environ[config.INVOCATION_ENV] = invocation
    if output_dir is not None:
        os.environ[config.OUTPUT_DIR_ENV] = str(output_dir)
    if parent_run_id:
        os.environ[config.PARENT_RUN_ENV] = parent_run_id
    layout = Layout.of(root)
    kernel = start_kernel(root)
    import papermill  # while the kernel boots, and before the recording thread contends for the GIL

    # The kernel opens the store too; tracking.configure keeps two openings of a new sqlite file apart.
    recording = ThreadPoolExecutor(max_workers=1).submit(_prepare_recording, root, stage)
    output = layout.executed(config.NOTEBOOKS[stage])
    output.parent.mkdir(parents=True, exist_ok=True)
    # papermill rewrites the notebook after every cell: under a temporary name, so that a kill -9
    # of this process never leaves a truncated notebook where the stage's output belongs.
    partial = outputs.partial_path(output)
    failed = True
    try:
        papermill.execute_notebook(
            str(root / "notebooks" / f"{config.NOTEBOOKS[stage]}.ipynb"),
            str(partial),
            parameters=config.as_dict(params),
            cwd=str(root),
            log_output=log_output,
            progress_bar=False,
            km=kernel,
        )
        failed = False
    finally:
        # Every notebook ends its MLflow run in its last cell, so nothing is left to flush; a
        # graceful shutdown would wait ~3 s for the kernel's teardown of torch and MLflow.
        run_sync(kernel.shutdown_kernel)(now=True)
        for name in (config.INVOCATION_ENV, config.OUTPUT_DIR_ENV, config.PARENT_RUN_ENV):
            os.environ.pop(name, None)
        if partial.is_file():  # whole: executed to the end, or to where it failed
            os.replace(partial, output)
        # Waited for even when nothing is recorded: the thread may still be writing the store.
        client, experiment_id, exporter, tags = recording.result()
        run_id = record_notebook(client, experiment_id, invocation, output, failed, exporter, tags) \
            if output.is_file() else None
        record = layout.stage_run(stage)
        record.unlink(missing_ok=True)  # an earlier execution's
        if run_id:
            outputs.write_text(record, json.dumps({"mlflow_run_id": run_id}) + "\n")
    return run_id


def failure_message(stage: str, exc: BaseException, executed: Path) -> str | None:
    """What went wrong, in a line or two naming the stage, or None for an unexpected error."""
    # Imported here, not at the top: papermill's import is kept out of the kernel's start-up path.
    from nbclient.exceptions import DeadKernelError
    from papermill import PapermillExecutionError

    if isinstance(exc, (config.ParamsError, lineage.StoreMismatch)):
        return f"stage {stage}: {exc}"
    if isinstance(exc, PapermillExecutionError):
        return (f"stage {stage} failed in notebook cell {exc.exec_count}: {exc.ename}: {exc.evalue}\n"
                f"(executed notebook: {executed})")
    if isinstance(exc, DeadKernelError):
        return (f"stage {stage}: the kernel died (killed, or out of memory); its MLflow run is marked "
                f"FAILED\n(executed notebook: {executed})")
    return None


def _override(text: str) -> tuple[str, Any]:
    name, sep, value = text.partition("=")
    if not sep or not name:
        raise argparse.ArgumentTypeError(f"expected NAME=VALUE, got {text!r}")
    return name, yaml.safe_load(value)  # as params/<stage>.yaml would read it


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("stage", choices=config.STAGES)
    parser.add_argument("--quiet", action="store_true", help="do not stream the notebook's output")
    parser.add_argument("--set", dest="overrides", action="append", type=_override, default=[],
                        metavar="NAME=VALUE", help="override a parameter of params/<stage>.yaml (repeatable)")
    parser.add_argument("--output-dir", type=Path, help="write model/, evaluation/, executed/ and runs/ "
                                                        "here instead of data/ (a sweep point)")
    parser.add_argument("--parent-run", help="nest the stage's MLflow run in this run (a sweep's)")
    args = parser.parse_args(argv)
    root = config.project_root()
    output_dir = args.output_dir.resolve() if args.output_dir else None
    layout = Layout(root, output_dir or root / "data")
    try:
        run_id = run_stage(root, args.stage, log_output=not args.quiet, overrides=dict(args.overrides),
                           output_dir=output_dir, parent_run_id=args.parent_run)
    except Exception as exc:
        message = failure_message(args.stage, exc, layout.executed(config.NOTEBOOKS[args.stage]))
        if message is None:
            raise
        print(f"error: {message}", file=sys.stderr)
        if output_dir is not None:  # for the sweep that started it
            record = layout.stage_run(args.stage)
            previous = json.loads(record.read_text()) if record.is_file() else {}
            outputs.write_text(record, json.dumps({**previous, "error": message.splitlines()[0]}) + "\n")
        return 2 if isinstance(exc, config.ParamsError) else 1
    print(f"stage {args.stage}: MLflow run {run_id}")
    return 0


if __name__ == "__main__":
    status = main()
    # Everything is written and closed by now. Skip the interpreter's teardown of torch, MLflow and
    # nbconvert, which takes ~2 s per stage on a 2-core machine.
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(status)
