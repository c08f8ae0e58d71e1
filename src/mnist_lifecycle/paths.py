"""The data layout: the one place that names where each stage reads and writes.

`dvc.yaml` declares the same paths as the stages' deps and outs (tests/test_config.py keeps the
two in step). Train and evaluate write under `output` (`data/`, or a sweep point's directory,
which the stage runner tags on the stage's MLflow run).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

# The tag the stage runner puts on a run whose outputs go elsewhere than data/ (a sweep point's).
OUTPUT_TAG = "output_dir"


@dataclass(frozen=True)
class Layout:
    root: Path  # the project: the directory holding dvc.yaml
    output: Path  # where model/ and evaluation/ go

    @classmethod
    def of(cls, root: Path, run=None) -> Layout:
        """The layout of `root`, writing where the stage's MLflow `run` says (data/ by default)."""
        output = run.data.tags.get(OUTPUT_TAG) if run is not None else None
        return cls(root, Path(output) if output else root / "data")

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
