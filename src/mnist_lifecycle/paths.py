"""The data layout: the one place that names where each stage reads and writes.

`dvc.yaml` declares the same paths as the stages' deps and outs (tests/test_config.py keeps the
two in step). Train and evaluate write under `output` (`data/`, or a sweep point's directory).
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

from .config import OUTPUT_DIR_ENV


@dataclass(frozen=True)
class Layout:
    root: Path  # the project: the directory holding dvc.yaml
    output: Path  # where model/ and evaluation/ go

    @classmethod
    def of(cls, root: Path) -> Layout:
        return cls(root, Path(os.environ.get(OUTPUT_DIR_ENV) or root / "data"))

    @property
    def raw(self) -> Path:
        return self.root / "data" / "raw"

    @property
    def prepared(self) -> Path:
        return self.root / "data" / "prepared"

    @property
    def model_dir(self) -> Path:
        return self.output / "model"

    @property
    def mlflow_model(self) -> Path:
        """The trained model in MLflow's model format: a DVC output, loadable without the store."""
        return self.model_dir / "mlflow_model"

    @property
    def model_info(self) -> Path:
        """model.json: the MLflow run and logged model the directory came from, and its DVC hash."""
        return self.model_dir / "model.json"

    @property
    def train_metrics(self) -> Path:
        return self.model_dir / "metrics.json"

    @property
    def history(self) -> Path:
        return self.model_dir / "history.csv"

    @property
    def evaluation_dir(self) -> Path:
        return self.output / "evaluation"

    @property
    def evaluation_metrics(self) -> Path:
        return self.evaluation_dir / "metrics.json"

    @property
    def decision(self) -> Path:
        return self.root / "data" / "registry" / "decision.json"

    def executed(self, notebook: str) -> Path:
        return self.output / "executed" / f"{notebook}.ipynb"

    def stage_run(self, stage: str) -> Path:
        """runs/<stage>.json: the MLflow run of the stage's last execution (a DVC metric in data/)."""
        return self.output / "runs" / f"{stage}.json"
