"""Parameters: params/ files, the dataclasses and the notebooks' parameters cells agree."""

import os
import re
import subprocess
import sys
from dataclasses import fields

import papermill
import pytest
import yaml

from mnist_lifecycle import config, presets

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
    with pytest.raises(config.ParamsError, match=r"^params/train\.yaml:epochs = 'three': must be int, got str$"):
        config.validate("train", {**values, "epochs": "three"})
    with pytest.raises(config.ParamsError, match=r"^params/train\.yaml:epochs = True: must be int, got bool$"):
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


def test_presets_change_only_what_differs_and_apply_as_dvc_arguments():
    default = yaml.safe_load((ROOT / "params" / "train.yaml").read_text())
    assert presets.names(ROOT)
    for name in presets.names(ROOT):
        changes = yaml.safe_load(presets.preset_path(ROOT, name).read_text())
        # A partial override: every value it lists differs from the default, the rest is the default's.
        assert changes and all(default[key] != value for key, value in changes.items()), name
        assert config.as_dict(presets.params(ROOT, name)) == {**default, **changes}
        arguments = presets.set_arguments(ROOT, name)
        assert arguments[::2] == ["-S"] * len(changes)
        assert {a.split(":", 1)[1].split("=")[0]: yaml.safe_load(a.split("=", 1)[1]) for a in arguments[1::2]} == changes


def test_bad_presets_are_refused_naming_the_file(tmp_path):
    (tmp_path / "params" / "presets").mkdir(parents=True)
    (tmp_path / "params" / "train.yaml").write_text((ROOT / "params" / "train.yaml").read_text())
    with pytest.raises(config.ParamsError, match=r"^params/presets/fast\.yaml: no such preset"):
        presets.params(tmp_path, "fast")
    (tmp_path / "params" / "presets" / "typo.yaml").write_text("epoch: 3\n")
    with pytest.raises(config.ParamsError, match=r"^params/presets/typo\.yaml: unknown parameter\(s\) train\.epoch;"):
        presets.set_arguments(tmp_path, "typo")
    (tmp_path / "params" / "presets" / "wide.yaml").write_text("width: 12\n")
    with pytest.raises(config.ParamsError, match=r"^params/presets/wide\.yaml:width = 12: must be a multiple of 8"):
        presets.set_arguments(tmp_path, "wide")
    # The command stops before DVC starts, with the message.
    result = subprocess.run([sys.executable, "-m", "mnist_lifecycle.presets", "wide"], cwd=tmp_path,
                            capture_output=True, text=True, env={**os.environ, "MNIST_PROJECT_ROOT": str(tmp_path)})
    assert result.returncode == 1 and "params/presets/wide.yaml:width = 12" in result.stderr
    assert "dvc exp run" not in result.stdout


# (stage, parameter, refused values, accepted values, the allowed range as the message says it).
RULES = [
    ("prepare", "val_size", [0, -5, 60_000], [1, 5000, 59_999], "an integer from 1 to 59,999"),
    ("prepare", "split_seed", [-1, 2**32], [0, 2**32 - 1], "an integer from 0 to 4,294,967,295"),
    ("prepare", "source_dir", ["bad\0path"], ["", "/data/mnist"], "a directory path, or empty"),
    ("train", "epochs", [0, -1, 1001], [1, 1000], "an integer from 1 to 1,000"),
    ("train", "batch_size", [0, -64, 60_001], [1, 60_000], "an integer from 1 to 60,000"),
    ("train", "lr", [0.0, -1.0, float("nan"), float("inf")], [1e-6, 0.1, 1e5], "a finite number > 0"),
    ("train", "weight_decay", [-1e-4, float("nan"), 1.5], [0.0, 1.0], "a finite number >= 0 and <= 1"),
    ("train", "label_smoothing", [-0.1, 1.0, float("nan")], [0.0, 0.99], "a finite number >= 0 and < 1"),
    ("train", "augment_shift", [-1, 14], [0, 13], "an integer from 0 to 13"),
    ("train", "width", [0, 3, 12, 264], [8, 16, 256], "a multiple of 8 from 8 to 256"),
    ("train", "dropout", [-0.5, 1.0, float("inf")], [0.0, 0.5], "a finite number >= 0 and < 1"),
    ("train", "hidden", [-1, 4097], [0, 256, 4096], "an integer from 0 to 4,096"),
    ("train", "last_block_convs", [0, 5], [1, 2, 4], "an integer from 1 to 4"),
    ("train", "precision", ["float16", "bf16", ""], ["float32", "bfloat16"], "float32 or bfloat16"),
    ("train", "seed", [-1, 2**32], [0, 2**32 - 1], "an integer from 0 to 4,294,967,295"),
    ("train", "max_train_samples", [-1, 60_001], [0, 3000, 60_000], "an integer from 0 to 60,000"),
    ("evaluate", "misclassified_shown", [-1, 10_001], [0, 10_000], "an integer from 0 to 10,000"),
    ("register", "model_name", ["", "a/b", "my model", "-x", "x" * 257], ["mnist-digits", "m.v_2"],
     "a name of letters, digits, '.', '_' or '-'"),
    ("register", "min_improvement", [-0.01, 1.5, float("nan")], [0.0, 0.005, 1.0],
     "a finite number >= 0 and <= 1"),
    ("register", "alpha", [0.0, 1.0, -0.1, float("nan")], [0.001, 0.05, 0.999], "a finite number > 0 and < 1"),
    ("register", "max_recall_drop", [-0.01, 1.5, float("inf")], [0.0, 0.01, 1.0], "a finite number >= 0 and <= 1"),
    ("register", "max_latency_ms", [0.0, -1.0, float("inf")], [0.01, 2.0, 1e4], "a finite number > 0"),
    ("register", "max_model_mb", [0.0, -5.0, float("nan")], [0.1, 50.0], "a finite number > 0"),
    *[("register", name, [-0.1, 1.01, float("nan")], [0.0, 0.9, 1.0], "a finite number >= 0 and <= 1")
      for name in ("min_shift_agreement", "min_rotation_agreement", "min_stroke_agreement", "max_blank_confidence",
                   "max_inverted_confidence")],
]


def test_every_parameter_has_a_rule_with_a_test():
    tested = {(stage, name) for stage, name, *_ in RULES}
    assert tested == {(stage, f.name) for stage, cls in config.PARAMS_CLASSES.items() for f in fields(cls)}


@pytest.mark.parametrize("stage, name, refused, accepted, allowed", RULES, ids=[f"{r[0]}.{r[1]}" for r in RULES])
def test_out_of_range_values_are_refused_naming_file_parameter_value_and_range(stage, name, refused, accepted,
                                                                                allowed):
    values = yaml.safe_load((ROOT / "params" / f"{stage}.yaml").read_text())
    for value in accepted:
        assert getattr(config.validate(stage, {**values, name: value}), name) == value
    for value in refused:
        with pytest.raises(config.ParamsError) as error:
            config.validate(stage, {**values, name: value})
        assert str(error.value).startswith(f"params/{stage}.yaml:{name} = {value!r}: must be {allowed}")


def test_load_names_the_file_it_read(tmp_path):
    (tmp_path / "params").mkdir()
    (tmp_path / "params" / "train.yaml").write_text(re.sub(r"(?m)^batch_size: \d+", "batch_size: 0",
                                                           (ROOT / "params" / "train.yaml").read_text()))
    with pytest.raises(config.ParamsError, match=r"^params/train\.yaml:batch_size = 0: must be an integer "
                                                 r"from 1 to 60,000$"):
        config.load(tmp_path, "train")
