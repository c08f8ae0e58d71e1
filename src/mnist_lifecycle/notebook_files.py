"""The committed notebooks stay as committed when a person runs and saves them in JupyterLab.

`notebooks/*.ipynb` are dependencies of the DVC stages: an autosave that writes outputs,
execution counts or another kernel into one would make `dvc status` report a changed stage,
`dvc repro` rerun the pipeline from there and every later run carry a `-dirty` commit. The
executed copies with their outputs are what the stages write to `data/executed/` (and log to
MLflow). So Jupyter saves a project notebook without outputs (`strip`): this module is a Jupyter
server extension, enabled by jupyter_server_config.d/mnist_lifecycle.json (installed into the
environment with this package), that adds a pre-save hook to the contents manager. Outputs stay
visible in the open tab; only the file is clean.
"""

from __future__ import annotations

from pathlib import Path

# The committed notebooks' kernel: `make setup` registers it in the environment.
KERNELSPEC = {"display_name": "Python (mnist-lifecycle)", "language": "python", "name": "mnist-lifecycle"}
CELL_METADATA_KEPT = ("tags",)  # papermill finds the parameters cell by its tag


def strip(notebook: dict) -> dict:
    """The notebook as committed: no outputs or execution counts, only the project's kernel and
    the cells' tags as metadata. Changes `notebook` in place and returns it."""
    notebook["metadata"] = {"kernelspec": dict(KERNELSPEC), "language_info": {"name": "python"}}
    for cell in notebook["cells"]:
        cell["metadata"] = {key: value for key, value in cell.get("metadata", {}).items()
                            if key in CELL_METADATA_KEPT}
        if cell["cell_type"] == "code":
            cell["outputs"] = []
            cell["execution_count"] = None
    return notebook


def is_project_notebook(path: Path) -> bool:
    """A notebook in the `notebooks/` directory beside a dvc.yaml."""
    return path.suffix == ".ipynb" and path.parent.name == "notebooks" and (path.parent.parent / "dvc.yaml").is_file()


def pre_save_hook(model: dict, path: str, contents_manager, **kwargs) -> None:
    """jupyter_server's ContentsManager.pre_save_hook: strip project notebooks before writing."""
    if model.get("type") != "notebook" or not model.get("content"):
        return
    if is_project_notebook(Path(contents_manager.root_dir, path.lstrip("/")).resolve()):
        strip(model["content"])


def _jupyter_server_extension_points() -> list[dict]:
    return [{"module": "mnist_lifecycle.notebook_files"}]


def _load_jupyter_server_extension(serverapp) -> None:
    serverapp.contents_manager.register_pre_save_hook(pre_save_hook)
