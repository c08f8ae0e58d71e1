"""End to end: `dvc repro` in a copy of the project on real MNIST (smoke training parameters, the
session's shared run), then what MLflow and the registry hold, what DVC reruns, and how failures
are reported."""

import gzip
import json
import shutil
from pathlib import Path

import nbformat
import numpy as np
from mlflow.tracking import MlflowClient

from mnist_lifecycle import config, data, tracking

from .conftest import run, set_params
from .servers import model_server, predict_each


def client_for(project):
    return MlflowClient(tracking_uri=f"sqlite:///{project / 'mlflow.db'}")


def stage_runs(client, stage):
    experiment = client.get_experiment_by_name("mnist-lifecycle")
    return client.search_runs([experiment.experiment_id], f"tags.stage = '{stage}'",
                              order_by=["attributes.start_time DESC"])


def test_dvc_repro_tracks_registers_and_reruns_only_what_changed(finished_project):
    path, env = finished_project  # after `dvc repro` (conftest.smoke_pipeline)

    metrics = json.loads((path / "data" / "evaluation" / "metrics.json").read_text())["test"]
    assert 0.9 < metrics["accuracy"] <= 1.0  # 3,000 training images, one epoch of a small net
    shown = run(["dvc", "metrics", "show"], path, env).stdout
    assert "data/evaluation/scores.json" in shown and "test_accuracy" in shown
    assert max(map(len, shown.splitlines())) <= 120, shown

    client = client_for(path)
    train_run = stage_runs(client, "train")[0]
    figures = 0
    for stage in config.STAGES:
        (stage_run,) = stage_runs(client, stage)
        assert stage_run.info.status == "FINISHED"
        tags = stage_run.data.tags
        assert len(tags["git_commit"]) >= 40 and tags["params_hash"] and tags["stage"] == stage
        artifacts = {a.path for a in client.list_artifacts(stage_run.info.run_id, "notebook")}
        assert artifacts == {f"notebook/{config.NOTEBOOKS[stage]}.ipynb",
                             f"notebook/{config.NOTEBOOKS[stage]}.html"}
        if stage in ("evaluate", "register"):
            assert tags["training_run_id"] == train_run.info.run_id
        # Names and descriptions a person can tell runs apart by in the MLflow UI.
        assert stage_run.info.run_name.startswith(f"{stage} · pipeline")
        assert tags["mlflow.note.content"].startswith("**Result:** ")
        assert f"\n\n{tracking.STAGE_PURPOSE[stage]}\n\nStarted by: pipeline" in tags["mlflow.note.content"]
        # Every figure is an image, in the executed notebook and in its HTML in MLflow; no warnings.
        executed = nbformat.read(path / "data" / "executed" / f"{config.NOTEBOOKS[stage]}.ipynb", as_version=4)
        cells = [cell for cell in executed.cells if cell.cell_type == "code"]
        figure_cells = [cell for cell in cells if cell.source.rstrip().endswith("\nfigure")]
        for cell in figure_cells:
            assert [o for o in cell.outputs if "image/png" in o.get("data", {})], cell.source
        figures += len(figure_cells)
        stderr = "".join(o.text for cell in cells for o in cell.outputs if o.get("name") == "stderr")
        assert "warn" not in stderr.lower(), stderr
        html = Path(client.download_artifacts(stage_run.info.run_id, f"notebook/{config.NOTEBOOKS[stage]}.html",
                                              str(path.parent / "html")))
        assert html.read_text().count("data:image/png;base64,") >= len(figure_cells)
    assert figures == 6  # samples, learning curves, reliability, behaviour, confusion matrix, misclassified digits
    assert train_run.info.run_name.startswith("train · pipeline · epochs=1 lr=0.01 width=8 max_train_samples=3000 · ")
    assert int(train_run.data.params["epochs"]) == 1
    assert "val_accuracy" in train_run.data.metrics
    assert len(client.get_metric_history(train_run.info.run_id, "val_accuracy")) == 1

    champion = client.get_model_version_by_alias("mnist-digits", "champion")
    assert champion.run_id == train_run.info.run_id
    assert client.get_model_version_by_alias("mnist-digits", "challenger").version == champion.version
    assert float(champion.tags["test_accuracy"]) == metrics["accuracy"]
    decision = json.loads((path / "data" / "registry" / "decision.json").read_text())
    assert decision["promoted"] and decision["previous_champion_version"] is None
    assert decision["champion_version"] == str(champion.version)
    # The decision, in words, on the version and at the end of the register run's description.
    assert champion.description.startswith(f"mnist-digits version {champion.version} (test accuracy ")
    assert "promoted to `@champion`" in champion.description and "Champion before: none" in champion.description
    register_run = stage_runs(client, "register")[0]
    # The version's description goes on with its model card.
    sentence, _, card = champion.description.partition("\n\n")
    assert card.startswith(f"## Model card: mnist-digits version {champion.version}")
    assert register_run.data.tags["mlflow.note.content"].startswith(f"**Result:** {sentence}\n\n")

    # The README's serving command on the champion: for 1,000 real test images, one request each,
    # it answers the digits the evaluate stage predicted, hence the same accuracy.
    test_images, test_labels = data.load_split(path / "data" / "prepared", "test")
    evaluated = np.loadtxt(path / "data" / "evaluation" / "predictions.csv", delimiter=",", skiprows=1, dtype=int)
    server = model_server(path, env, path.parent / "serving.log")
    try:
        server.wait_ready()
        served = np.array(predict_each(server.url, test_images[:1000]))
    finally:
        server.stop()
    assert served.tolist() == evaluated[:1000, 1].tolist()
    assert (served == test_labels[:1000]).mean() == (evaluated[:1000, 1] == test_labels[:1000]).mean() > 0.9

    lock = (path / "dvc.lock").read_text()
    nothing = run(["dvc", "repro"], path, env)
    assert "Data and pipelines are up to date" in nothing.stdout
    assert (path / "dvc.lock").read_text() == lock

    # A register-only parameter reruns register alone; the same model keeps its version and does
    # not compete with itself.
    set_params(path, "register", min_improvement=0.001)
    rerun = run(["dvc", "repro"], path, env).stdout
    assert "Running stage 'register'" in rerun
    assert "Running stage 'train'" not in rerun and "Running stage 'evaluate'" not in rerun
    assert [v.version for v in client.search_model_versions("name = 'mnist-digits'")] == [champion.version]
    decision = json.loads((path / "data" / "registry" / "decision.json").read_text())
    assert not decision["promoted"] and "the champion already" in decision["reason"]
    assert decision["champion_version"] == decision["challenger_version"] == str(champion.version)


def test_corrupt_data_file_stops_prepare_naming_it(project, tmp_path):
    path, env = project
    source = tmp_path / "corrupt"
    shutil.copytree(env["MNIST_SOURCE_DIR"], source)
    labels = source / "t10k-labels-idx1-ubyte.gz"
    content = bytearray(gzip.decompress(labels.read_bytes()))
    content[100] = (content[100] + 1) % 10
    labels.write_bytes(gzip.compress(bytes(content)))

    result = run(["dvc", "repro", "prepare"], path, {**env, "MNIST_SOURCE_DIR": str(source)}, check=False)
    assert result.returncode != 0
    assert "t10k-labels-idx1-ubyte.gz: content does not match MNIST" in result.stderr
    assert not (path / "data" / "prepared" / "test_labels.npy").exists()
    (failed,) = stage_runs(client_for(path), "prepare")
    assert failed.info.status == "FAILED"


def test_missing_data_source_is_explained(project, tmp_path):
    path, env = project
    result = run(["python", "-m", "mnist_lifecycle.stage", "prepare", "--quiet"], path,
                 {**env, "MNIST_SOURCE_DIR": str(tmp_path / "nowhere")}, check=False)
    assert result.returncode == 1
    assert "nowhere/train-images-idx3-ubyte.gz: missing" in result.stderr


def test_notebook_failing_before_it_resumes_its_run_is_recorded(project):
    # The runner creates the run before the notebook runs: a notebook that fails in its first cell,
    # before the cell that resumes the run, still leaves a FAILED run with its executed notebook.
    path, env = project
    notebook = path / "notebooks" / "01_prepare.ipynb"
    nb = nbformat.read(notebook, as_version=4)
    setup = next(cell for cell in nb.cells if "import mlflow" in cell.source)
    setup.source = "import mnist_lifecycle.no_such_module\n" + setup.source
    nbformat.write(nb, notebook)
    result = run(["python", "-m", "mnist_lifecycle.stage", "prepare", "--quiet"], path, env, check=False)
    assert result.returncode == 1
    assert "stage prepare failed in notebook cell" in result.stderr and "no_such_module" in result.stderr
    (failed,) = stage_runs(client_for(path), "prepare")
    assert failed.info.status == "FAILED"
    assert json.loads((path / "data/runs/prepare.json").read_text())["mlflow_run_id"] == failed.info.run_id
    artifacts = {a.path for a in client_for(path).list_artifacts(failed.info.run_id, "notebook")}
    assert artifacts == {"notebook/01_prepare.ipynb", "notebook/01_prepare.html"}


def test_wrong_parameter_type_stops_before_running(project):
    path, env = project
    set_params(path, "train", epochs="three")
    result = run(["python", "-m", "mnist_lifecycle.stage", "train"], path, env, check=False)
    assert result.returncode == 2
    assert "params/train.yaml:epochs = 'three': must be int, got str" in result.stderr
    assert not (path / "mlflow.db").exists()  # nothing started, nothing logged


def test_parameter_out_of_range_stops_before_running(project):
    path, env = project
    set_params(path, "train", batch_size=0)
    result = run(["python", "-m", "mnist_lifecycle.stage", "train"], path, env, check=False)
    assert result.returncode == 2
    assert "params/train.yaml:batch_size = 0: must be an integer from 1 to 60,000" in result.stderr
    assert not (path / "mlflow.db").exists()  # no kernel, no run
    # An override on the runner's command line (what sweeps pass) is checked the same way, and named.
    set_params(path, "train", batch_size=64)
    result = run(["python", "-m", "mnist_lifecycle.stage", "train", "--set", "width=12"], path, env, check=False)
    assert result.returncode == 2 and "--set:width = 12: must be" in result.stderr
    assert not (path / "mlflow.db").exists()
