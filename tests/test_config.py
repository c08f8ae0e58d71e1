"""Parameters: params/ files, the dataclasses and the notebooks' parameters cells agree."""

import subprocess
from dataclasses import fields

import papermill
import pytest
import yaml

from mnist_lifecycle import config

from .conftest import ROOT


@pytest.mark.parametrize("stage", config.STAGES)
def test_params_file_dataclass_and_notebook_agree(stage):
    from_file = yaml.safe_load((ROOT / "params" / f"{stage}.yaml").read_text())
    notebook = papermill.inspect_notebook(str(ROOT / "notebooks" / f"{config.NOTEBOOKS[stage]}.ipynb"))
    field_names = [f.name for f in fields(config.PARAMS_CLASSES[stage])]
    assert list(from_file) == field_names == list(notebook)
    # The notebook's defaults are the pipeline's defaults, so JupyterLab runs what dvc repro runs:
    # those of the workspace's params file, or of the committed one while `dvc exp run -S` has
    # changed the workspace's.
    candidates = [from_file, committed_params(stage)]
    defaults = {name: spec["default"] for name, spec in notebook.items()}
    shown = [{name: repr(value).replace("'", '"') for name, value in values.items()}
             for values in candidates if values is not None]
    assert defaults in shown, f"notebook defaults {defaults} match neither params/{stage}.yaml nor its committed version"
    config.load(ROOT, stage)


def committed_params(stage: str) -> dict | None:
    shown = subprocess.run(["git", "show", f"HEAD:params/{stage}.yaml"], cwd=ROOT, capture_output=True, text=True)
    return yaml.safe_load(shown.stdout) if shown.returncode == 0 else None


def test_wrong_type_is_named():
    values = yaml.safe_load((ROOT / "params" / "train.yaml").read_text())
    with pytest.raises(config.ParamsError, match=r"train\.epochs must be int, got str 'three'"):
        config.validate("train", {**values, "epochs": "three"})
    with pytest.raises(config.ParamsError, match=r"train\.epochs must be int, got bool"):
        config.validate("train", {**values, "epochs": True})
    assert config.validate("train", {**values, "lr": 1}).lr == 1.0  # an int is a fine float


def test_unknown_and_missing_parameters_are_named():
    values = yaml.safe_load((ROOT / "params" / "train.yaml").read_text())
    with pytest.raises(config.ParamsError, match=r"unknown parameter\(s\) train\.epoch\b"):
        config.validate("train", {**values, "epoch": 3})
    del values["lr"]
    with pytest.raises(config.ParamsError, match=r"missing parameter\(s\) train\.lr"):
        config.validate("train", values)


def test_params_hash_is_stable_and_sensitive():
    params = config.load(ROOT, "train")
    assert config.params_hash(params) == config.params_hash(config.load(ROOT, "train"))
    changed = config.validate("train", {**config.as_dict(params), "seed": params.seed + 1})
    assert config.params_hash(changed) != config.params_hash(params)


def test_presets_are_valid_train_parameters():
    presets = sorted((ROOT / "params" / "presets").glob("*.yaml"))
    assert presets
    for preset in presets:
        config.validate("train", yaml.safe_load(preset.read_text()))
