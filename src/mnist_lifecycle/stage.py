"""Run one pipeline stage: its notebook under papermill. Each dvc.yaml stage calls this.

    python -m mnist_lifecycle.stage train

1. validates `params/<stage>.yaml` (a wrong type stops here, before a kernel starts);
2. executes `notebooks/NN_<stage>.ipynb` into `data/executed/` (under a temporary name until it
   ends) with the parameters injected; the notebook opens the stage's MLflow run itself, so it
   runs the same in JupyterLab;
3. logs the executed notebook (ipynb and HTML) to that run, tags it with DVC's view of the stage
   (its dependencies' hashes; the experiment's name under `dvc exp run`), marks it FAILED if the
   notebook failed, and names it in `data/runs/<stage>.json` (a DVC metric).

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

from jupyter_client.manager import AsyncKernelManager
from jupyter_core.utils import run_sync

from . import config, lineage, outputs
from .paths import Layout


def executed_path(root: Path, stage: str) -> Path:
    return Layout.of(root).executed(config.NOTEBOOKS[stage])


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
    kernel = AsyncKernelManager(kernel_name="python3", transport="ipc")
    # As nbclient starts its own kernels: no IPython history database to write to.
    run_sync(kernel.start_kernel)(cwd=str(root), extra_arguments=["--HistoryManager.hist_file=:memory:"])
    return kernel


def run_stage(root: Path, stage: str, log_output: bool = True) -> str | None:
    """Execute the stage; returns the MLflow run id, raises on failure after recording it."""
    params = config.load(root, stage)
    config.use_default_tracking_uri(root)  # the kernel inherits the environment
    if stage == "register":
        lineage.require_store(root)  # before the kernel opens its run, which would create it empty
    invocation = uuid.uuid4().hex
    os.environ[config.INVOCATION_ENV] = invocation
    kernel = start_kernel(root)
    import papermill  # while the kernel boots, and before the recording thread contends for the GIL

    # The kernel opens the store too; tracking.configure keeps two openings of a new sqlite file apart.
    recording = ThreadPoolExecutor(max_workers=1).submit(_prepare_recording, root, stage)
    output = executed_path(root, stage)
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
        os.environ.pop(config.INVOCATION_ENV, None)
        if partial.is_file():  # whole: executed to the end, or to where it failed
            os.replace(partial, output)
        # Waited for even when nothing is recorded: the thread may still be writing the store.
        client, experiment_id, exporter, tags = recording.result()
        run_id = record_notebook(client, experiment_id, invocation, output, failed, exporter, tags) \
            if output.is_file() else None
    if run_id:
        outputs.write_text(Layout.of(root).stage_run(stage), json.dumps({"mlflow_run_id": run_id}) + "\n")
    return run_id


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("stage", choices=config.STAGES)
    parser.add_argument("--quiet", action="store_true", help="do not stream the notebook's output")
    args = parser.parse_args(argv)
    root = config.project_root()
    try:
        run_id = run_stage(root, args.stage, log_output=not args.quiet)
    except config.ParamsError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    except lineage.StoreMismatch as exc:
        print(f"error: stage {args.stage}: {exc}", file=sys.stderr)
        return 1
    except Exception as exc:
        # Imported here, not at the top: papermill's import is kept out of the kernel's start-up path.
        from nbclient.exceptions import DeadKernelError
        from papermill import PapermillExecutionError

        if isinstance(exc, PapermillExecutionError):
            print(f"error: stage {args.stage} failed in notebook cell {exc.exec_count}: "
                  f"{exc.ename}: {exc.evalue}\n(executed notebook: {executed_path(root, args.stage)})",
                  file=sys.stderr)
            return 1
        if isinstance(exc, DeadKernelError):
            print(f"error: stage {args.stage}: the kernel died (killed, or out of memory); its MLflow run "
                  f"is marked FAILED\n(executed notebook: {executed_path(root, args.stage)})", file=sys.stderr)
            return 1
        raise
    print(f"stage {args.stage}: MLflow run {run_id}")
    return 0


if __name__ == "__main__":
    status = main()
    # Everything is written and closed by now. Skip the interpreter's teardown of torch, MLflow and
    # nbconvert, which takes ~2 s per stage on a 2-core machine.
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(status)
