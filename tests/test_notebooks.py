"""nbval over the four notebooks, in order, with the smoke configuration injected by papermill.

The committed notebooks carry no outputs, so nbval runs in lax mode: every cell must execute
without error; outputs are not compared.
"""

import nbformat
import papermill

from mnist_lifecycle import config

from .conftest import SMOKE_TRAIN, run


def test_notebooks_run_under_nbval(project):
    path, env = project
    ordered, code_cells = [], 0
    for stage in config.STAGES:
        notebook = path / "notebooks" / f"{config.NOTEBOOKS[stage]}.ipynb"
        parameters = SMOKE_TRAIN if stage == "train" else {}
        papermill.execute_notebook(str(notebook), str(notebook), parameters=parameters, prepare_only=True)
        ordered.append(str(notebook.relative_to(path)))
        code_cells += sum(c.cell_type == "code" for c in nbformat.read(notebook, as_version=4).cells)
    # --nbval-current-env: this environment's kernel, as the stage runner uses, whether or not the
    # kernel the notebooks name ("mnist-lifecycle", make setup) is registered.
    result = run(["python", "-m", "pytest", "--nbval-lax", "--nbval-current-env", "-p", "no:cacheprovider", "-q",
                  "--rootdir", str(path), *ordered], path, env)
    # nbval makes one test item of each code cell (papermill's injected cells included).
    assert f"{code_cells} passed" in result.stdout, result.stdout[-2000:]
