"""Model Registry: register a challenger, and move `champion` to it only when it is better.

Aliases, not the deprecated stages: `challenger` always names the newest registered version,
`champion` the one to serve (`models:/<name>@champion`).
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

import mlflow
from mlflow.exceptions import MlflowException
from mlflow.tracking import MlflowClient

CHAMPION = "champion"
CHALLENGER = "challenger"


@dataclass
class Decision:
    model_name: str
    challenger_version: str
    challenger_test_accuracy: float
    champion_version: str | None  # before this decision; None when there was none
    champion_test_accuracy: float | None
    promoted: bool
    reason: str

    def as_dict(self) -> dict:
        return asdict(self)

    def description(self) -> str:
        """The decision in a sentence: the register run's and the model version's description."""
        before = (f"version {self.champion_version} (test accuracy {self.champion_test_accuracy:.4f})"
                  if self.champion_version else "none")
        # Aliases in code spans: the UI renders descriptions as Markdown, where @name is a link.
        verdict = "promoted to `@champion`" if self.promoted else "not promoted: `@champion` stays"
        return (f"{self.model_name} version {self.challenger_version} (test accuracy "
                f"{self.challenger_test_accuracy:.4f}) is `@challenger`, {verdict}. Champion before: "
                f"{before}. Why: {self.reason}.")


def current_champion(model_name: str):
    """The ModelVersion behind `@champion`, or None."""
    try:
        return MlflowClient().get_model_version_by_alias(model_name, CHAMPION)
    except MlflowException:
        return None


def test_accuracy(model_uri: str, images, labels) -> float:
    """Accuracy of a registered or logged model on test images (torch is imported only here)."""
    import mlflow.pytorch
    import torch

    from .model import predict_probabilities

    loaded = mlflow.pytorch.load_model(model_uri)
    predictions = predict_probabilities(loaded, torch.from_numpy(images)).argmax(1).numpy()
    return float((predictions == labels).mean())


def decide(challenger_accuracy: float, champion_accuracy: float | None, min_improvement: float):
    """(promote?, why) — the challenger must beat the champion by more than min_improvement."""
    if champion_accuracy is None:
        return True, "no champion yet"
    if challenger_accuracy > champion_accuracy + min_improvement:
        return True, (f"challenger {challenger_accuracy:.4f} beats champion {champion_accuracy:.4f} "
                      f"by more than {min_improvement}")
    return False, (f"challenger {challenger_accuracy:.4f} does not beat champion "
                   f"{champion_accuracy:.4f} by more than {min_improvement}")


def register_and_decide(
    model_name: str,
    model_uri: str,
    challenger_accuracy: float,
    champion_accuracy: float | None,
    champion_version: str | None,
    min_improvement: float,
    tags: dict[str, str],
) -> Decision:
    """Register `model_uri`, alias it `challenger`, maybe `champion`; record all on the version."""
    client = MlflowClient()
    version = mlflow.register_model(model_uri, model_name, tags=tags).version
    client.set_registered_model_alias(model_name, CHALLENGER, version)
    promoted, reason = decide(challenger_accuracy, champion_accuracy, min_improvement)
    if promoted:
        client.set_registered_model_alias(model_name, CHAMPION, version)
    decision = Decision(model_name, str(version), challenger_accuracy, champion_version,
                        champion_accuracy, promoted, reason)
    for key, value in {
        "test_accuracy": challenger_accuracy,
        "champion_test_accuracy_before": champion_accuracy,
        "promoted": promoted,
        "decision": reason,
    }.items():
        client.set_model_version_tag(model_name, version, key, "none" if value is None else str(value))
    client.update_model_version(model_name, version, description=decision.description())
    return decision
