"""Stage parameters: one YAML file per stage in `params/`, validated before anything runs.

The field names here, the keys of `params/<stage>.yaml` and the names in each notebook's
`parameters` cell are the same; `tests/test_config.py` keeps the three in step.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import math
import os
import re
from collections.abc import Callable
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any

import yaml

PROJECT_ROOT_ENV = "MNIST_PROJECT_ROOT"
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
    """A parameter is unknown, missing, of the wrong type or out of its range; the message names it."""


@dataclass(frozen=True)
class Rule:
    """What a parameter's value must be: the check, and the words saying it in an error."""

    allowed: str  # completes "must be ..."
    check: Callable[[Any], bool]


def integer(low: int, high: int, multiple_of: int = 1) -> Rule:
    words = f"an integer from {low:,} to {high:,}"
    if multiple_of > 1:
        words = f"a multiple of {multiple_of} from {low:,} to {high:,}"
    return Rule(words, lambda v: low <= v <= high and v % multiple_of == 0)


def number(low: float, high: float, low_open: bool = False, high_open: bool = False) -> Rule:
    """A finite float within [low, high], either end open if told."""
    words = f"a finite number {'>' if low_open else '>='} {low:g}"
    if high != math.inf:
        words += f" and {'<' if high_open else '<='} {high:g}"
    return Rule(words, lambda v: math.isfinite(v) and (low < v if low_open else low <= v)
                and (v < high if high_open else v <= high))


def rule(allowed: Rule) -> Any:
    """A dataclass field with its rule in the field's metadata (one table for check and message)."""
    return field(metadata={"rule": allowed})


PRECISIONS = ("float32", "bfloat16")
TRAIN_IMAGES = 60_000  # MNIST's training set, which prepare splits into train and validation
TEST_IMAGES = 10_000
SEEDS = integer(0, 2**32 - 1)  # what numpy's and torch's generators accept
# MLflow registry names appear in models:/ URIs: no "/" nor spaces, which those would split on.
MODEL_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,255}")


@dataclass(frozen=True)
class PrepareParams:
    # local directory with the four idx .gz files; "" = $MNIST_SOURCE_DIR or download
    source_dir: str = rule(Rule("a directory path, or empty", lambda v: "\0" not in v))
    # training images held out for validation: both parts of the split must be non-empty
    val_size: int = rule(integer(1, TRAIN_IMAGES - 1))
    split_seed: int = rule(SEEDS)


@dataclass(frozen=True)
class TrainParams:
    epochs: int = rule(integer(1, 1000))
    batch_size: int = rule(integer(1, TRAIN_IMAGES))
    # peak of the one-cycle schedule; too high a rate diverges, which training reports (a result,
    # not a parameter error: sweeps look for that edge)
    lr: float = rule(number(0, math.inf, low_open=True))
    weight_decay: float = rule(number(0, 1))
    label_smoothing: float = rule(number(0, 1, high_open=True))
    # random translation in pixels; 0 = no augmentation; half the image would shift the digit out
    augment_shift: int = rule(integer(0, 13))
    # channels of the first conv block (then 2x, 4x): multiples of 8 fill the CPU's vectors (model.py)
    width: int = rule(integer(8, 256, multiple_of=8))
    dropout: float = rule(number(0, 1, high_open=True))  # 1 would drop every feature
    # units of a hidden layer before the classifier; 0 = none, the features feed the classifier directly
    hidden: int = rule(integer(0, 4096))
    # 3x3 convolutions in the last conv block (at 7x7, before its pooling); 1 = the fast model
    last_block_convs: int = rule(integer(1, 4))
    # arithmetic of training's forward and backward passes (the weights and the logged model stay
    # float32): bfloat16 runs at 1.6-2x the speed on CPUs with bfloat16 instructions (training.py)
    precision: str = rule(Rule("float32 or bfloat16", lambda v: v in PRECISIONS))
    seed: int = rule(SEEDS)
    max_train_samples: int = rule(integer(0, TRAIN_IMAGES))  # 0 = all; smoke runs train on a subset


@dataclass(frozen=True)
class EvaluateParams:
    misclassified_shown: int = rule(integer(0, TEST_IMAGES))  # digits in the grid of errors


@dataclass(frozen=True)
class RegisterParams:
    # name in the MLflow Model Registry
    model_name: str = rule(Rule("a name of letters, digits, '.', '_' or '-' (1 to 256, no '/' nor spaces)",
                                lambda v: MODEL_NAME.fullmatch(v) is not None))
    # The promotion gate's checks (promotion.py, docs/promotion.md), each a threshold:
    # test accuracy the challenger must gain to become champion: a difference of two probabilities
    min_improvement: float = rule(number(0, 1))
    # significance of McNemar's exact test on the two models' disagreements (0 and 1 decide nothing)
    alpha: float = rule(number(0, 1, low_open=True, high_open=True))
    # largest drop in any digit's test recall the challenger may have against the champion
    max_recall_drop: float = rule(number(0, 1))
    # budgets: milliseconds per image (the fastest of 10 batches of 100) and the model directory's megabytes
    max_latency_ms: float = rule(number(0, math.inf, low_open=True))
    max_model_mb: float = rule(number(0, math.inf, low_open=True))
    # behaviour (behaviour.py, measured by evaluate): fractions of test images whose predicted digit
    # survives 1-2 pixel shifts, +-10 degree rotations, thicker/thinner strokes; mean top probability
    # on a blank image and on inverted images
    min_shift_agreement: float = rule(number(0, 1))
    min_rotation_agreement: float = rule(number(0, 1))
    min_stroke_agreement: float = rule(number(0, 1))
    max_blank_confidence: float = rule(number(0, 1))
    max_inverted_confidence: float = rule(number(0, 1))


PARAMS_CLASSES = {
    "prepare": PrepareParams,
    "train": TrainParams,
    "evaluate": EvaluateParams,
    "register": RegisterParams,
}


def _check_type(where: str, value: Any, expected: type) -> Any:
    # bool is an int to Python, never to a user; an int is a fine float.
    if expected is float and isinstance(value, int) and not isinstance(value, bool):
        return float(value)
    if isinstance(value, expected) and not (expected is int and isinstance(value, bool)):
        return value
    raise ParamsError(f"{where} = {value!r}: must be {expected.__name__}, got {type(value).__name__}")


def validate(stage: str, values: dict[str, Any], source: str | None = None):
    """The stage's parameters as a frozen dataclass; raises ParamsError naming the bad one.

    `source` names where the values come from in messages (default params/<stage>.yaml).
    """
    if stage not in PARAMS_CLASSES:
        raise ParamsError(f"unknown stage {stage!r}; stages are {', '.join(STAGES)}")
    source = source or f"params/{stage}.yaml"
    params_class = PARAMS_CLASSES[stage]
    types = {f.name: f.type for f in fields(params_class)}
    unknown = sorted(set(values) - set(types))
    if unknown:
        raise ParamsError(f"{source}: unknown parameter(s) {', '.join(f'{stage}.{u}' for u in unknown)}; "
                          f"{stage} takes {', '.join(types)}")
    missing = [name for name in types if name not in values]
    if missing:
        raise ParamsError(f"{source}: missing parameter(s) {', '.join(f'{stage}.{m}' for m in missing)}")
    builtin = {"int": int, "float": float, "str": str}
    checked = {}
    for item in fields(params_class):
        where = f"{source}:{item.name}"
        value = _check_type(where, values[item.name], builtin[types[item.name]])
        allowed = item.metadata["rule"]
        if not allowed.check(value):
            raise ParamsError(f"{where} = {value!r}: must be {allowed.allowed}")
        checked[item.name] = value
    return params_class(**checked)


def yaml_value(value: Any) -> str:
    """A value as params/*.yaml would hold it (1e-05 as 1.0e-05, which YAML reads back as a float):
    for `dvc exp run -S`, the runner's --set, and files written from parameters."""
    return yaml.safe_dump(value, default_flow_style=True).splitlines()[0]


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
    return validate(stage, values, str(path.relative_to(root)))


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
