"""What a person sees, in a real browser (Debian's chromium driven by Playwright): a notebook run
in JupyterLab shows its figure, opens in the project's kernel and is saved without dirtying the
pipeline; then the MLflow UI opens on the runs table and the run page tells what the run did.

One JupyterLab and one MLflow server for the module, on loopback, with bounded waits.
"""

from __future__ import annotations

import contextlib
import json
import os
import secrets
import shutil
from pathlib import Path

import pytest

from .conftest import VENV_BIN, copy_project, project_env, run
from .servers import Server, free_port

NOTEBOOK = "notebooks/01_prepare.ipynb"
SCREENSHOTS = os.environ.get("MNIST_SCREENSHOT_DIR")  # set to keep the screenshots for a look


def chromium_path() -> str:
    # Debian's /usr/bin/chromium is a shell wrapper; Playwright wants the browser binary itself.
    for candidate in ("/usr/lib/chromium/chromium", shutil.which("chromium") or ""):
        if candidate and Path(candidate).is_file():
            return candidate
    pytest.fail("chromium not found: install it (Debian: apt-get install chromium; .ci/run does it)")


@pytest.fixture(scope="module")
def browser():
    from playwright.sync_api import sync_playwright

    with sync_playwright() as playwright:
        launched = playwright.chromium.launch(executable_path=chromium_path(), args=["--no-sandbox"])
        yield launched
        launched.close()


@pytest.fixture(scope="module")
def lab_project(tmp_path_factory, mnist_source):
    path = copy_project(tmp_path_factory.mktemp("browser") / "project")
    return path, project_env(path, mnist_source)


def screenshot(page, name: str) -> None:
    if SCREENSHOTS:
        Path(SCREENSHOTS).mkdir(parents=True, exist_ok=True)
        page.screenshot(path=str(Path(SCREENSHOTS) / f"{name}.png"), full_page=False)


@contextlib.contextmanager
def page_on(server: Server, browser, ready_timeout: float, timeout_ms: int):
    """A browser page once `server` answers; the server is stopped afterwards."""
    try:
        server.wait_ready(timeout=ready_timeout)
        page = browser.new_page(viewport={"width": 1400, "height": 1000})
        page.set_default_timeout(timeout_ms)
        yield page
        page.close()
    finally:
        server.stop()


def notebook_dep_changes(path: Path, env: dict) -> list:
    """What `dvc status` says about the stages' notebooks."""
    status = json.loads(run(["dvc", "status", "--json"], path, env).stdout or "{}")
    return [(stage, change) for stage, changes in status.items() for change in changes
            if isinstance(change, dict) and any("notebooks/" in dep for dep in change.get("changed deps", {}))]


def test_notebook_in_jupyterlab_shows_its_figure_and_saves_clean(lab_project, browser, tmp_path):
    path, env = lab_project
    committed = (path / NOTEBOOK).read_bytes()
    token, port = secrets.token_hex(16), free_port()
    lab_env = {**env, "JUPYTERLAB_WORKSPACES_DIR": str(tmp_path / "workspaces")}
    lab = Server([str(VENV_BIN / "jupyter"), "lab", "--no-browser", "--ServerApp.ip=127.0.0.1",
                  f"--ServerApp.port={port}", f"--IdentityProvider.token={token}",
                  f"--ServerApp.root_dir={path}", "--LabApp.news_url=",
                  *(["--allow-root"] if os.geteuid() == 0 else [])],
                 lab_env, tmp_path / "jupyterlab.log", f"http://127.0.0.1:{port}", "/api", cwd=path)
    with page_on(lab, browser, ready_timeout=120, timeout_ms=120_000) as page:
        page.goto(f"{lab.url}/lab/tree/{NOTEBOOK}?token={token}")
        # The kernel the notebook declares, started without asking which one.
        try:
            page.locator(".jp-Toolbar-kernelName", has_text="Python (mnist-lifecycle)").first.wait_for(timeout=60_000)
            page.wait_for_selector(".jp-Notebook-ExecutionIndicator[data-status='idle']")
        finally:
            screenshot(page, "jupyterlab-opened")

        page.locator(".lm-MenuBar-itemLabel", has_text="Run").first.click()
        page.locator(".lm-Menu-itemLabel", has_text="Run All Cells").first.click()
        image = page.locator(".jp-OutputArea-output img").first
        image.wait_for(state="visible")
        page.wait_for_selector(".jp-Notebook-ExecutionIndicator[data-status='idle']")
        image.scroll_into_view_if_needed()
        screenshot(page, "jupyterlab-figure")
        assert image.evaluate("img => img.naturalWidth") > 500  # the 40-digit grid, as a PNG
        assert page.locator(".jp-OutputArea-output", has_text="<Figure size").count() == 0
        stderr = page.locator(".jp-RenderedText[data-mime-type='application/vnd.jupyter.stderr']")
        assert stderr.count() == 0, stderr.all_inner_texts()  # no warning blocks between the cells

        before = (path / NOTEBOOK).stat().st_mtime_ns
        page.locator(".jp-Notebook").first.click()
        page.keyboard.press("Control+s")
        page.wait_for_function("() => !document.querySelector('.jp-mod-dirty')")
        assert (path / NOTEBOOK).stat().st_mtime_ns != before, "the notebook was not saved"
    # Saved through the contents API with outputs on screen, the file is as committed.
    assert (path / NOTEBOOK).read_bytes() == committed
    assert run(["git", "status", "--porcelain", "--untracked-files=no"], path, env).stdout == ""
    assert notebook_dep_changes(path, env) == []


def test_mlflow_ui_opens_on_runs_and_shows_what_the_run_did(lab_project, browser, tmp_path):
    """After the JupyterLab test: its prepare run, in the MLflow UI."""
    from mlflow.tracking import MlflowClient

    path, env = lab_project
    client = MlflowClient(tracking_uri=f"sqlite:///{path / 'mlflow.db'}")
    experiment = client.get_experiment_by_name("mnist-lifecycle")
    assert experiment is not None, "the JupyterLab test logs the run this test looks at"
    (prepared,) = client.search_runs([experiment.experiment_id], "tags.stage = 'prepare'")
    assert prepared.info.run_name.startswith("prepare · jupyter · val_size=5000 split_seed=0 · ")

    port = free_port()
    mlflow_server = Server([str(VENV_BIN / "mlflow"), "server", "--backend-store-uri",
                            f"sqlite:///{path / 'mlflow.db'}", "--host", "127.0.0.1", "--port", str(port)],
                           {**env, "MLFLOW_SERVER_ENABLE_JOB_EXECUTION": "false"}, tmp_path / "mlflow.log",
                           f"http://127.0.0.1:{port}", "/health", cwd=path)
    with page_on(mlflow_server, browser, ready_timeout=180, timeout_ms=60_000) as page:
        # The experiment's page as the README links it lists the runs by name (not the GenAI overview).
        page.goto(f"{mlflow_server.url}/#/experiments/{experiment.experiment_id}?workflowType=machine_learning")
        try:
            page.get_by_text(prepared.info.run_name).first.wait_for(state="visible")
        finally:
            screenshot(page, "mlflow-experiment")
        page.goto(f"{mlflow_server.url}/#/experiments/{experiment.experiment_id}/runs/{prepared.info.run_id}"
                  "?workflowType=machine_learning")
        page.get_by_text("verified the raw files from").first.wait_for(state="visible")
        page.get_by_text("Verifies the four MNIST files by content").first.wait_for(state="visible")
        screenshot(page, "mlflow-run")
