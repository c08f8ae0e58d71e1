"""Sweeps: checked before anything runs, nested MLflow runs, a failing point recorded and passed
over, the summary, the resume; DVC's queued grid. A 3-point smoke sweep on real MNIST in a copy of
the finished smoke pipeline. Studies shared by workers and pruning: test_sweep_study.py."""

import csv
import json
import re
import time

import pytest
import yaml
from mlflow.tracking import MlflowClient

from mnist_lifecycle import config, sweep

from .conftest import ROOT, copy_project, run

SMOKE = {"epochs": 1, "max_train_samples": 2000, "width": 8, "batch_size": 64}


def write_sweep(project, name, spec):
    path = project / "params" / "sweeps" / f"{name}.yaml"
    path.parent.mkdir(exist_ok=True)
    path.write_text(yaml.safe_dump(spec, sort_keys=False))
    return path


@pytest.fixture
def bare_project(tmp_path):
    """A copy of the project without data: enough for everything that happens before a point runs."""
    return copy_project(tmp_path / "project")


def test_committed_sweep_files_are_valid():
    files = sorted((ROOT / "params" / "sweeps").glob("*.yaml"))
    assert [f.stem for f in files] == ["lr_search", "lr_width", "smoke"]
    lr_width = sweep.load_sweep(ROOT, files[1])
    assert len(lr_width.points) == 8 and lr_width.swept == ["lr", "width"]
    assert lr_width.points[0].name == "01_lr=0.003_width=8"
    assert lr_width.points[0].params.epochs == config.load(ROOT, "train").epochs  # the base values
    search = sweep.load_sweep(ROOT, files[0])
    assert (search.points, search.budget, search.sampler, search.pruner) == ([], 16, "tpe", "median")
    assert [(d.name, d.log) for d in search.search] == [("lr", True), ("weight_decay", True), ("width", False)]


def test_unknown_parameter_stops_the_sweep_naming_it(bare_project, monkeypatch, capsys):
    path = write_sweep(bare_project, "typo", {"grid": {"lr": [0.1, 0.2]}, "points": [{"lrr": 0.3}]})
    monkeypatch.chdir(bare_project)
    assert sweep.main([str(path)]) == 2
    error = capsys.readouterr().err
    assert "params/sweeps/typo.yaml: unknown parameter 'lrr'; notebooks/02_train.ipynb takes epochs," in error
    assert not (bare_project / "sweeps").exists() and not (bare_project / "mlflow.db").exists()


def test_wrong_type_and_malformed_files_are_explained(bare_project):
    cases = [
        ({"grid": {"lr": [0.1, "fast"]}}, r"point 02_lr=fast: params/sweeps/bad\.yaml:lr = 'fast': must be float, got str"),
        ({"fixed": {"epochs": 1.5}, "points": [{"seed": 1}]}, r"params/sweeps/bad\.yaml:epochs = 1\.5: must be int, got float"),
        ({"grid": {"lr": []}}, r"grid must map each parameter to a non-empty list"),
        ({"grids": {"lr": [0.1]}}, r"unknown key\(s\) grids; a sweep has grid, points, fixed, evaluate, search"),
        ({"fixed": {"epochs": 1}}, r"no points; give a grid, points or both"),
        ({"grid": {"lr": [0.1, 0.0]}}, r"point 02_lr=0\.0: params/sweeps/bad\.yaml:lr = 0\.0: must be a finite "
                                      r"number > 0$"),
        # Search spaces: each bound and choice is a value of its parameter.
        ({"search": {"lr": {"low": 0.0, "high": 1.0}}, "trials": 4},
         r"params/sweeps/bad\.yaml:search:lr = 0\.0: must be a finite number > 0$"),
        ({"search": {"width": [8, "wide"]}, "trials": 4}, r"search:width = 'wide': must be int, got str"),
        ({"search": {"lr": {"low": 0.5, "high": 0.1}}, "trials": 4}, r"search\.lr = .*: needs low < high"),
        ({"search": {"lr": [0.1]}}, r"a search needs trials: a whole number of at least 1, got None"),
        ({"search": {"lr": [0.1]}, "trials": 2, "grid": {"width": [8]}}, r"either search \(with trials\) or grid"),
        ({"search": {"lr": [0.1]}, "trials": 2, "pruner": "mean"}, r"pruner must be one of median, none, got 'mean'"),
        ({"grid": {"lr": [0.1]}, "trials": 2}, r"trials, sampler and seed belong to a search"),
    ]
    for spec, message in cases:
        with pytest.raises(sweep.SweepError, match=message):
            sweep.load_sweep(bare_project, write_sweep(bare_project, "bad", spec))


def test_best_params_keep_the_train_yaml_comments():
    params = config.validate("train", {**config.as_dict(config.load(ROOT, "train")), "lr": 1e-05, "width": 32})
    text = sweep.best_params_yaml(ROOT, params)
    assert "lr: 1.0e-05  # peak of the one-cycle schedule" in text
    assert config.validate("train", yaml.safe_load(text)) == params
    original = (ROOT / "params" / "train.yaml").read_text().splitlines()
    assert [line.split(":")[0] for line in text.splitlines()] == [line.split(":")[0] for line in original]


def test_smoke_sweep_nests_runs_records_a_diverging_point_and_summarizes(finished_project):
    path, env = finished_project  # after `dvc repro`: the sweep must leave the pipeline's outputs alone
    pipeline_outputs = [path / "data" / name for name in ("model/metrics.json", "model/model.json",
                                                          "evaluation/metrics.json", "registry/decision.json")]
    before = [output.read_text() for output in pipeline_outputs]
    # Two points train; lr=1e20 diverges (NaN loss: Adam steps by about lr) and must not stop them.
    sweep_file = write_sweep(path, "smoke", {
        "fixed": SMOKE, "grid": {"lr": [0.05, 1e20]}, "points": [{"lr": 0.1, "augment_shift": 2}],
        "evaluate": True,
    })
    result = run(["python", "-m", "mnist_lifecycle.sweep", str(sweep_file), "--workers", "2"], path, env,
                 check=False)
    assert result.returncode == 1, result.stderr[-3000:]  # a point failed
    out = result.stdout
    assert "3 trials, 2 worker(s) here x 1 torch thread(s)" in out
    assert "[2/3 done, 0 running, 0 pruned, 1 failed]" in out
    assert re.search(r"FAILED trial \d 02_lr=1\.0e\+20 after \d+ s: .*FloatingPointError: training diverged", out)

    client = MlflowClient(tracking_uri=f"sqlite:///{path / 'mlflow.db'}")
    experiment = client.get_experiment_by_name("mnist-lifecycle")
    (parent,) = client.search_runs([experiment.experiment_id], "tags.sweep = 'smoke' and attributes.run_name = 'smoke'")
    assert parent.info.status == "FINISHED" and "mlflow.parentRunId" not in parent.data.tags
    children = client.search_runs([experiment.experiment_id], f"tags.mlflow.parentRunId = '{parent.info.run_id}'")
    by_point = {c.data.tags["sweep_point"]: c for c in children}
    assert sorted(by_point) == ["01_lr=0.05", "02_lr=1.0e+20", "03_lr=0.1_augment_shift=2"]

    failed = by_point.pop("02_lr=1.0e+20")
    assert failed.info.status == "FAILED" and "training diverged" in failed.data.tags["error"]
    assert failed.data.params["lr"] == "1e+20"
    sweep_dir = path / "sweeps" / "smoke"
    for name, child in by_point.items():
        run_id = child.info.run_id
        assert child.info.status == "FINISHED" and child.info.run_name == f"{name} · sweep smoke"
        assert child.data.params["epochs"] == "1" and child.data.params["width"] == "8"
        assert 0.7 < child.data.metrics["val_accuracy"] <= 1.0
        assert 0.7 < child.data.metrics["test_accuracy"] <= 1.0
        # The point's outputs went to its own directory, its model is in the child run.
        model = json.loads((sweep_dir / name / "model" / "model.json").read_text())
        assert model["run_id"] == run_id and client.get_logged_model(model["model_id"]).source_run_id == run_id
        notebooks = {a.path for a in client.list_artifacts(run_id, "notebook")}
        assert notebooks == {"notebook/02_train.ipynb", "notebook/02_train.html"}
        (evaluation,) = client.search_runs([experiment.experiment_id], f"tags.mlflow.parentRunId = '{run_id}'")
        assert evaluation.data.tags["stage"] == "evaluate" and evaluation.data.tags["training_run_id"] == run_id
        assert evaluation.data.metrics["test_accuracy"] == child.data.metrics["test_accuracy"]
        assert (sweep_dir / name / "executed" / "03_evaluate.ipynb").is_file()
    assert (sweep_dir / "02_lr=1.0e+20" / "executed" / "02_train.ipynb").is_file()
    assert by_point["03_lr=0.1_augment_shift=2"].data.params["augment_shift"] == "2"
    # The pipeline's own outputs are untouched.
    assert [output.read_text() for output in pipeline_outputs] == before

    with (sweep_dir / "summary.csv").open() as stream:
        rows = list(csv.DictReader(stream))
    assert [row["status"] for row in rows] == ["FINISHED"] * 2 + ["FAILED"]
    accuracies = [float(row["val_accuracy"]) for row in rows[:2]]
    assert accuracies == sorted(accuracies, reverse=True)
    assert list(rows[0])[:5] == ["point", "trial", "status", "lr", "augment_shift"]
    best = by_point[rows[0]["point"]]
    assert parent.data.tags["best_run_id"] == best.info.run_id
    assert parent.data.metrics["best_val_accuracy"] == best.data.metrics["val_accuracy"]
    assert parent.data.metrics["trials_failed"] == 1 and parent.data.metrics["trials_pruned"] == 0
    best_yaml = (sweep_dir / "best.yaml").read_text()
    assert best_yaml in out
    best_params = config.as_dict(config.validate("train", yaml.safe_load(best_yaml)))
    assert {name: str(value) for name, value in best_params.items()} == {
        name: best.data.params[name] for name in best_params}
    views = ["optimization_history.png", "param_importances.png", "parallel_coordinate.png"]
    for name in ["summary.png", *views]:
        assert (sweep_dir / name).stat().st_size > 10_000, name
    assert {a.path for a in client.list_artifacts(parent.info.run_id)} >= {
        "summary.csv", "summary.md", "best.yaml", "smoke.yaml", "summary.png", *views}

    # Run again, the study resumes: nothing is left to run, the same summary and parent run.
    again = run(["python", "-m", "mnist_lifecycle.sweep", str(sweep_file)], path, env, check=False)
    assert again.returncode == 1 and "started trial" not in again.stdout, again.stdout
    assert f"MLflow run {parent.info.run_id}" in again.stdout and best_yaml in again.stdout
    import optuna

    study = optuna.load_study(study_name="smoke", storage=f"sqlite:///{sweep_dir / 'study.db'}")
    assert len(study.trials) == 3
    assert client.get_run(parent.info.run_id).info.status == "FINISHED"


def test_dvc_queue_runs_a_grid_of_the_same_parameters(finished_project):
    """The DVC route: a queued grid over params/train.yaml, run by `dvc queue start`. Only the
    train stage is queued (on a finished pipeline) to keep this short."""
    path, env = finished_project
    queued = run(["dvc", "exp", "run", "--queue", "train", "-S", "params/train.yaml:lr=0.05,0.2"], path, env)
    names = re.findall(r"Queued experiment '([^']+)'", queued.stdout)
    assert len(names) == 2, queued.stdout
    try:
        run(["dvc", "queue", "start"], path, env)
        deadline = time.monotonic() + 600
        while re.search(r"\b(Queued|Running)\b", status := run(["dvc", "queue", "status"], path, env).stdout):
            assert time.monotonic() < deadline, status
            time.sleep(2)
    finally:
        run(["dvc", "queue", "stop", "--kill"], path, env, check=False)
    assert status.count("Success") == 2, status

    (baseline,) = json.loads(run(["dvc", "exp", "show", "--json"], path, env).stdout)[1:]
    experiments = {e["name"]: e["revs"][0]["data"] for e in baseline["experiments"]}
    assert sorted(experiments) == sorted(names)
    assert sorted(e["params"]["params/train.yaml"]["data"]["lr"] for e in experiments.values()) == [0.05, 0.2]
    for experiment in experiments.values():
        assert 0.7 < experiment["metrics"]["data/model/metrics.json"]["data"]["val_accuracy"] <= 1.0
    # The experiments ran in temporary copies under .dvc/tmp/exps; their MLflow runs are in the project's store.
    client = MlflowClient(tracking_uri=f"sqlite:///{path / 'mlflow.db'}")
    experiment = client.get_experiment_by_name("mnist-lifecycle")
    runs = client.search_runs([experiment.experiment_id], "tags.stage = 'train' and tags.runner != 'pipeline'")
    assert sorted(r.data.params["lr"] for r in runs if r.info.status == "FINISHED") == ["0.05", "0.2"]
    assert all(r.info.artifact_uri.startswith((path / "mlartifacts").as_uri()) for r in runs)
    # Each run's name says which experiment ran it (the prepare run is the pipeline's).
    assert sorted(r.data.tags["runner"] for r in runs) == sorted(f"dvc exp {name}" for name in names)
    assert all(r.info.run_name.startswith(f"train · dvc exp {r.data.tags['runner'][8:]} · ") for r in runs)

