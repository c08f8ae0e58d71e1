"""Run one stage: its notebook under papermill. Each dvc.yaml stage calls this, and so does every
point of a sweep: one executor, one error report, one way of recording.

    python -m mnist_lifecycle.stage train
    python -m mnist_lifecycle.stage train --set lr=0.02 --output-dir sweeps/s/01 --parent-run ID

1. validates `params/<stage>.yaml` with the `--set` overrides (a bad value stops here, before a
   kernel starts);
2. creates the stage's MLflow run: provenance, parameters, DVC's view of the stage (its
   dependencies' hashes; the experiment's name under `dvc exp run`), nested in `--parent-run`;
3. executes `notebooks/NN_<stage>.ipynb` into `<output>/executed/` (`data/` unless
   `--output-dir`; under a temporary name until it ends) with the parameters injected, and the
   run handed over the way MLflow resumes runs: a cell injected before the notebook's
   `tracking.start_stage_run` sets $MLFLOW_RUN_ID (run by hand, the notebook opens its own run);
4. logs the executed notebook (ipynb and HTML) to the run and ends it, FAILED if the notebook
   failed, and writes `<output>/runs/<stage>.json`: the run's id (a DVC metric), and the error if
   it failed. A notebook that fails in its first cell still leaves its run, notebook and error.

What the runner adds to the notebook's own time is kept small: the kernel is started before
papermill is even imported (its ~1.4 s boot overlaps the ~1 s import), and the run is created in
a background thread while the kernel imports its libraries (the injected cell waits for it).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import uuid
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path
from typing import Any

import yaml
from jupyter_client.manager import AsyncKernelManager
from jupyter_core.paths import jupyter_runtime_dir
from jupyter_core.utils import run_sync

from . import config, lineage, outputs
from .paths import OUTPUT_TAG, Layout

RUN_CELL_TAG = "injected-run"  # as papermill tags the cell it injects: "injected-parameters"
OPENS_RUN = "tracking.start_stage_run("  # the notebook's cell that makes the stage's run active


def _open_run(root: Path, stage: str, params, parent_run_id: str | None, output_dir: Path | None):
    """The stage's run and what recording it needs (an MLflow client, an HTML exporter with its
    templates loaded), made ready while the kernel starts and imports."""
    import nbformat
    from mlflow.tracking import MlflowClient
    from nbconvert import HTMLExporter

    from .tracking import create_stage_run, runner

    tags = lineage.stage_tags(root, stage)
    if output_dir is not None:
        tags[OUTPUT_TAG] = str(output_dir)
    run_id = create_stage_run(root, stage, params, runner(stage_runner=True, parent_run_id=parent_run_id),
                              parent_run_id=parent_run_id, tags=tags)
    exporter = HTMLExporter()
    exporter.from_notebook_node(nbformat.v4.new_notebook())  # the first conversion loads templates
    return MlflowClient(), run_id, exporter


def write_with_run_cell(notebook: Path, destination: Path) -> None:
    """Copy the notebook with an empty cell, tagged RUN_CELL_TAG, before the cell that opens its run."""
    import nbformat

    nb = nbformat.read(notebook, as_version=4)
    index = next((i for i, cell in enumerate(nb.cells) if OPENS_RUN in cell.source), None)
    if index is None:
        raise ValueError(f"{notebook}: no cell calls {OPENS_RUN}...), which makes the stage's MLflow run active")
    nb.cells.insert(index, nbformat.v4.new_code_cell(metadata={"tags": [RUN_CELL_TAG]}))
    outputs.write_text(destination, nbformat.writes(nb))


def run_cell_filler(opening: Future):
    """An nbclient hook that writes the run's id into the injected cell as it is about to run."""
    def fill(cell, cell_index: int) -> None:
        if RUN_CELL_TAG in cell.metadata.get("tags", []):
            _, run_id, _ = opening.result()  # the run is created meanwhile in the background
            cell.source = (f"# Injected by the stage runner: its MLflow run for this execution, which the next\n"
                           f"# cell resumes (mlflow.start_run() reads $MLFLOW_RUN_ID).\n"
                           f"%env MLFLOW_RUN_ID={run_id}")
    return fill


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
              output_dir: Path | None = None, parent_run_id: str | None = None) -> str:
    """Execute the stage; returns the MLflow run id, raises on failure after recording it.

    `output_dir` replaces data/ for what train and evaluate write, the executed notebook and the
    run record (a sweep point's directory); `parent_run_id` nests the stage's run in that run.
    """
    params = stage_params(root, stage, overrides)
    config.use_default_tracking_uri(root)  # the kernel inherits the environment
    if stage == "register":
        lineage.require_store(root)  # before the run is created, which would create the store empty
    layout = Layout(root, output_dir or root / "data")
    notebook = root / "notebooks" / f"{config.NOTEBOOKS[stage]}.ipynb"
    kernel = start_kernel(root)
    import papermill  # while the kernel boots, and before the run's thread contends for the GIL

    opening = ThreadPoolExecutor(max_workers=1).submit(_open_run, root, stage, params, parent_run_id, output_dir)
    output = layout.executed(config.NOTEBOOKS[stage])
    output.parent.mkdir(parents=True, exist_ok=True)
    # papermill rewrites the notebook after every cell: under a temporary name, so that a kill -9
    # of this process never leaves a truncated notebook where the stage's output belongs. It
    # records where the notebook came from, which is the prepared copy's temporary name here.
    partial = outputs.partial_path(output)
    prepared = partial.with_name(partial.name.replace(".partial", ".input"))
    write_with_run_cell(notebook, prepared)
    failed = True
    try:
        papermill.execute_notebook(
            str(prepared),
            str(partial),
            parameters=config.as_dict(params),
            cwd=str(root),
            log_output=log_output,
            progress_bar=False,
            km=kernel,
            on_cell_start=run_cell_filler(opening),  # nbclient skips empty cells after this hook
        )
        failed = False
    finally:
        # The runner ends the run, so nothing is left for the kernel to flush; a graceful
        # shutdown would wait ~3 s for the kernel's teardown of torch and MLflow.
        run_sync(kernel.shutdown_kernel)(now=True)
        prepared.unlink(missing_ok=True)
        record = layout.stage_run(stage)
        record.unlink(missing_ok=True)  # an earlier execution's
        client, run_id, exporter = opening.result()  # raises if the run could not be created
        if partial.is_file():  # whole: executed to the end, or to where it failed
            executed = _name_source(partial, notebook)
            os.replace(partial, output)
            client.log_artifact(run_id, str(output), "notebook")
            client.log_text(run_id, exporter.from_notebook_node(executed)[0], f"notebook/{output.stem}.html")
            client.set_terminated(run_id, status="FAILED" if failed else "FINISHED")
        else:
            client.set_terminated(run_id, status="FAILED")
        outputs.write_json(record, {"mlflow_run_id": run_id})
    return run_id


def _name_source(executed: Path, notebook: Path):
    """Name the project's notebook, not its prepared copy, as the executed notebook's input;
    returns the executed notebook."""
    import nbformat

    nb = nbformat.read(executed, as_version=4)
    nb.metadata.setdefault("papermill", {})["input_path"] = str(notebook)
    nbformat.write(nb, executed)
    return nb


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


def parse_override(text: str) -> tuple[str, Any]:
    name, sep, value = text.partition("=")
    if not sep or not name:
        raise argparse.ArgumentTypeError(f"expected NAME=VALUE, got {text!r}")
    return name, yaml.safe_load(value)  # as params/<stage>.yaml would read it


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("stage", choices=config.STAGES)
    parser.add_argument("--quiet", action="store_true", help="do not stream the notebook's output")
    parser.add_argument("--set", dest="overrides", action="append", type=parse_override, default=[],
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
            outputs.write_json(record, {**previous, "error": message.splitlines()[0]})
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
