"""Stage parameters: one YAML file per stage in `params/`, validated before anything runs.

The field names here, the keys of `params/<stage>.yaml` and the names in each notebook's
`parameters` cell are the same; `tests/test_config.py` keeps the three in step.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
from dataclasses import dataclass, fields
from pathlib import Path
from typing import Any

import yaml

PROJECT_ROOT_ENV = "MNIST_PROJECT_ROOT"
# Set by the stage runner and tagged on the run, so that the runner finds the run its notebook opened.
INVOCATION_ENV = "MNIST_STAGE_INVOCATION"
# Set by the sweep runner (sweep.py) in each point's kernel: the stage's run nests under this run,
# and the notebooks write model/ and evaluation/ there instead of data/.
PARENT_RUN_ENV = "MNIST_PARENT_RUN_ID"
OUTPUT_DIR_ENV = "MNIST_OUTPUT_DIR"
STAGES = ("prepare", "train", "evaluate", "register")
NOTEBOOKS = {stage: f"{number:02d}_{stage}" for number, stage in enumerate(STAGES, start=1)}


def project_root() -> Path:
    """The directory holding dvc.yaml: from $MNIST_PROJECT_ROOT, else the nearest parent of cwd.

    Notebooks run from `notebooks/` (Jupyter, nbval) or the root (papermill under DVC); both work.
    """
    if os.environ.get(PROJECT_ROOT_ENV):
        return Path(os.environ[PROJECT_ROOT_ENV]).resolve()
    here = Path.cwd().resolve()
    for candidate in (here, *here.parents):
        if (candidate / "dvc.yaml").is_file():
            return candidate
    raise FileNotFoundError(f"no dvc.yaml in {here} or its parents; run from inside the project")


def tracking_root(root: Path) -> Path:
    """The directory of the default MLflow store: the root, except in a queued DVC experiment.

    `dvc queue start` runs each experiment in a temporary copy under .dvc/tmp/exps/ (deleted
    afterwards) and names the repository it came from in $DVC_ROOT; plain `dvc repro` sets it to
    the root itself.
    """
    return Path(os.environ.get("DVC_ROOT") or root)


def use_default_tracking_uri(root: Path) -> str:
    """Unless $MLFLOW_TRACKING_URI names a server or database, track to `mlflow.db` in the root."""
    if not os.environ.get("MLFLOW_TRACKING_URI"):
        os.environ["MLFLOW_TRACKING_URI"] = f"sqlite:///{tracking_root(root) / 'mlflow.db'}"
    return os.environ["MLFLOW_TRACKING_URI"]


class ParamsError(ValueError):
    """A parameter is unknown, missing or of the wrong type; the message names it."""


@dataclass(frozen=True)
class PrepareParams:
    source_dir: str  # local directory with the four idx .gz files; "" = $MNIST_SOURCE_DIR or download
    val_size: int  # training images held out for validation
    split_seed: int


@dataclass(frozen=True)
class TrainParams:
    epochs: int
    batch_size: int
    lr: float  # peak of the one-cycle schedule
    weight_decay: float
    label_smoothing: float
    augment_shift: int  # random translation in pixels; 0 = no augmentation
    width: int  # channels of the first conv block (then 2x, 4x)
    dropout: float
    seed: int
    max_train_samples: int  # 0 = all; smoke runs train on a subset


@dataclass(frozen=True)
class EvaluateParams:
    misclassified_shown: int  # digits in the grid of errors


@dataclass(frozen=True)
class RegisterParams:
    model_name: str  # name in the MLflow Model Registry
    min_improvement: float  # test accuracy the challenger must gain to become champion


PARAMS_CLASSES = {
    "prepare": PrepareParams,
    "train": TrainParams,
    "evaluate": EvaluateParams,
    "register": RegisterParams,
}


def _check_type(stage: str, name: str, value: Any, expected: type) -> Any:
    # bool is an int to Python, never to a user; an int is a fine float.
    if expected is float and isinstance(value, int) and not isinstance(value, bool):
        return float(value)
    if isinstance(value, expected) and not (expected is int and isinstance(value, bool)):
        return value
    raise ParamsError(
        f"{stage}.{name} must be {expected.__name__}, got {type(value).__name__} {value!r} "
        f"(in params/{stage}.yaml or a -S/-p override)"
    )


def validate(stage: str, values: dict[str, Any]):
    """The stage's parameters as a frozen dataclass; raises ParamsError naming the bad one."""
    if stage not in PARAMS_CLASSES:
        raise ParamsError(f"unknown stage {stage!r}; stages are {', '.join(STAGES)}")
    params_class = PARAMS_CLASSES[stage]
    types = {f.name: f.type for f in fields(params_class)}
    unknown = sorted(set(values) - set(types))
    if unknown:
        raise ParamsError(f"unknown parameter(s) {', '.join(f'{stage}.{u}' for u in unknown)}; "
                          f"{stage} takes {', '.join(types)}")
    missing = [name for name in types if name not in values]
    if missing:
        raise ParamsError(f"missing parameter(s) {', '.join(f'{stage}.{m}' for m in missing)}")
    builtin = {"int": int, "float": float, "str": str}
    return params_class(**{
        name: _check_type(stage, name, values[name], builtin[types[name]]) for name in types
    })


def params_path(root: Path, stage: str) -> Path:
    return root / "params" / f"{stage}.yaml"


def load(root: Path, stage: str):
    path = params_path(root, stage)
    try:
        values = yaml.safe_load(path.read_text()) or {}
    except (OSError, yaml.YAMLError) as exc:
        raise ParamsError(f"{path}: cannot be read as YAML ({exc})") from exc
    if not isinstance(values, dict):
        raise ParamsError(f"{path}: must map parameter names to values")
    return validate(stage, values)


def from_namespace(stage: str, namespace: dict[str, Any]):
    """Collect a notebook's parameters from its globals (after papermill's injected cell)."""
    names = [f.name for f in fields(PARAMS_CLASSES[stage])]
    return validate(stage, {name: namespace[name] for name in names if name in namespace})


def as_dict(params) -> dict[str, Any]:
    return dataclasses.asdict(params)


def params_hash(params) -> str:
    """Short, stable hash of a stage's parameters, for provenance."""
    canonical = json.dumps(as_dict(params), sort_keys=True)
    return hashlib.sha256(canonical.encode()).hexdigest()[:16]
