"""Named training presets: `params/presets/<name>.yaml` lists only what it changes in params/train.yaml.

Applied as a DVC experiment, which writes the values into params/train.yaml (keeping its comments)
and runs the pipeline:

    uv run python -m mnist_lifecycle.presets accurate [more `dvc exp run` arguments, e.g. --queue]

A preset that names an unknown parameter, or a value out of its range, stops before DVC starts,
naming the preset file.
"""

from __future__ import annotations

import argparse
import os
import sys
from dataclasses import fields
from pathlib import Path
from typing import Any

import yaml

from . import config


def preset_path(root: Path, name: str) -> Path:
    return root / "params" / "presets" / f"{name}.yaml"


def names(root: Path) -> list[str]:
    return sorted(path.stem for path in (root / "params" / "presets").glob("*.yaml"))


def changes(root: Path, name: str) -> dict[str, Any]:
    """The preset's values, each a parameter of the train stage; raises ParamsError naming the file."""
    path = preset_path(root, name)
    if not path.is_file():
        raise config.ParamsError(f"{path.relative_to(root)}: no such preset; presets are {', '.join(names(root))}")
    try:
        values = yaml.safe_load(path.read_text()) or {}
    except yaml.YAMLError as exc:
        raise config.ParamsError(f"{path.relative_to(root)}: cannot be read as YAML ({exc})") from exc
    if not isinstance(values, dict) or not values:
        raise config.ParamsError(f"{path.relative_to(root)}: must map train parameters to the values it changes")
    known = [item.name for item in fields(config.TrainParams)]
    unknown = sorted(set(values) - set(known))
    if unknown:
        raise config.ParamsError(f"{path.relative_to(root)}: unknown parameter(s) "
                                 f"{', '.join(f'train.{u}' for u in unknown)}; train takes {', '.join(known)}")
    return values


def params(root: Path, name: str, further: dict[str, Any] | None = None) -> config.TrainParams:
    """params/train.yaml with the preset's values over it, then `further` changes (a variant of the
    preset, e.g. `--set` in the benchmarks), validated (messages name the preset)."""
    base = config.as_dict(config.load(root, "train"))
    return config.validate("train", {**base, **changes(root, name), **(further or {})},
                           str(preset_path(root, name).relative_to(root)) + (" + --set" if further else ""))


def set_arguments(root: Path, name: str) -> list[str]:
    """`dvc exp run` arguments that set the preset's values in params/train.yaml."""
    params(root, name)  # the merged values must pass before DVC writes any of them
    return [argument for key, value in changes(root, name).items()
            for argument in ("-S", f"params/train.yaml:{key}={config.yaml_value(value)}")]


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m mnist_lifecycle.presets", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("name", help="a file name in params/presets/, without .yaml")
    parser.add_argument("dvc_args", nargs=argparse.REMAINDER, help="passed on to `dvc exp run`")
    args = parser.parse_args(argv)
    try:
        arguments = set_arguments(config.project_root(), args.name)
    except config.ParamsError as exc:
        sys.exit(f"error: {exc}")
    command = ["dvc", "exp", "run", *arguments, *args.dvc_args]
    print(" ".join(command), flush=True)
    os.execvp(command[0], command)


if __name__ == "__main__":
    main()
