"""The model card of a registered version: what it was trained on and with, how it scores per
digit, how it behaves, and the gate's decision; markdown, as the version's description (the MLflow
UI renders it) and as the register run's artifact `model_card.md`."""

from __future__ import annotations

import mlflow
from mlflow.tracking import MlflowClient

ARTIFACT = "model_card.md"

INTENDED_USE = """\
**Intended use.** Classifying single handwritten digits 0-9 given as 28x28 grey levels (0-255, white
digit on black, centred and size-normalized as in MNIST), e.g. in a demonstration of a reproducible
ML lifecycle.

**Limits.** Trained and tested on MNIST only (US Census employees' and students' handwriting of the
1990s): other scripts, scanned forms, photos, letters, several digits or no digit at all are out
of its domain, and it answers one of ten digits for any input. Its probabilities are a model's
confidence, not a guarantee; per-digit recall below shows where it errs most."""


def _table(header: list[str], rows: list[list]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + " --- |" * len(header)]
    lines += ["| " + " | ".join(str(cell) for cell in row) + " |" for row in rows]
    return "\n".join(lines)


def render(decision, evaluated: dict, data_digests: dict[str, str], training_run) -> str:
    """The card in markdown. `decision` is registry.Decision, `evaluated` the evaluate stage's
    metrics.json, `data_digests` split -> content digest, `training_run` the MLflow run of train."""
    test = evaluated["test"]
    parts = [
        decision.description(),
        f"## Model card: {decision.model_name} version {decision.challenger_version}",
        f"Model directory DVC hash `{decision.challenger_model_dvc_md5}`; trained by run "
        f"`{training_run.info.run_id}` at commit `{training_run.data.tags.get('git_commit', 'unknown')}`.",
        INTENDED_USE,
        "### Data\n\n" + _table(["split", "content digest (sha256)"],
                                [[split, f"`{digest[:16]}`"] for split, digest in data_digests.items()]),
        "### Training parameters\n\n" + _table(["parameter", "value"], sorted(training_run.data.params.items())),
        f"### Test metrics\n\nAccuracy {test['accuracy']:.4f} ({test['errors']} errors).\n\n"
        + _table(["digit", "precision", "recall"],
                 [[digit, f"{test['precision'][digit]:.4f}", f"{test['recall'][digit]:.4f}"] for digit in test["recall"]]),
    ]
    if "calibration" in evaluated:
        parts.append("### Calibration\n\nExpected calibration error on the test set without (`ece_before`) and with "
                     "the temperature folded into the model (`ece`).\n\n"
                     + _table(["measure", "value"], [[k, f"{v:.4f}"] for k, v in evaluated["calibration"].items()]))
    if "behaviour" in evaluated:
        parts.append("### Behaviour\n\nOn the first 2,000 test images: predictions kept under 1-2 pixel shifts, "
                     "+-10 degree rotations, thicker/thinner strokes; top probability on a blank image and on "
                     "inverted images (thresholds: the gate below).\n\n"
                     + _table(["metric", "value"], [[name, f"{value:.4f}"] for name, value in evaluated["behaviour"].items()]))
    gate_rows = [[name, "passed" if c["passed"] else "**failed**", c["detail"]] for name, c in decision.checks.items()]
    parts.append(f"### Promotion gate\n\n{'Promoted' if decision.promoted else 'Not promoted'}: {decision.reason}.\n\n"
                 + _table(["check (parameter)", "result", "detail"], gate_rows))
    return "\n\n".join(parts) + "\n"


def publish(decision, card: str) -> None:
    """The card as the version's description and as the active run's artifact, which a version tag names."""
    mlflow.log_text(card, ARTIFACT)
    client = MlflowClient()
    client.update_model_version(decision.model_name, decision.challenger_version, description=card)
    client.set_model_version_tag(decision.model_name, decision.challenger_version, "model_card",
                                 f"runs:/{mlflow.active_run().info.run_id}/{ARTIFACT}")
