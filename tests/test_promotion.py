"""The promotion gate on real models trained here on real MNIST (small: thousands of images, one
epoch, width 8), compared on the 10,000 real test images; then the register step in a real sqlite
MLflow store, which records every check on the version and in the decision."""

from __future__ import annotations

import json

import mlflow
import numpy as np
import pytest
import torch
import yaml
from mlflow.tracking import MlflowClient

from mnist_lifecycle import aliases, behaviour, config, evaluation, lineage, model, model_card, promotion, registry, training

from .conftest import ROOT, run, set_params, smoke_params

TRAIN_IMAGES = 6000
WEAK_DIGIT = 3


@pytest.fixture(scope="module")
def mnist(mnist_source):
    from mnist_lifecycle import data

    return tuple(data.read_idx(mnist_source / f"{idx.name}.gz").copy() for idx in data.IDX_FILES)


def train_model(mnist, seed: int, keep=None) -> model.ProbabilityModel:
    """The smoke recipe on the first TRAIN_IMAGES training images (or those `keep` selects)."""
    train_images, train_labels, _, _ = mnist
    images, labels = train_images[:TRAIN_IMAGES], train_labels[:TRAIN_IMAGES]
    if keep is not None:
        images, labels = images[keep(labels)], labels[keep(labels)]
    images, labels = torch.from_numpy(images), torch.from_numpy(labels)
    training.seed_everything(seed)
    classifier = model.DigitClassifier(width=8)
    training.train(classifier, images, labels, images[:500], labels[:500], smoke_params(seed=seed), progress=False)
    return model.ProbabilityModel(classifier.eval())


def predict(probability_model, images) -> np.ndarray:
    return model.predict_probabilities(probability_model, torch.from_numpy(images)).argmax(1).numpy()


@pytest.fixture(scope="module")
def models(mnist):
    """name -> (model, predicted digits on the test set, behavioural metrics): two seeds of one
    recipe, a clearly weaker model (a tenth of the images), one that saw only a few images of
    WEAK_DIGIT, and seed0 made overconfident (a temperature of 0.02: the same digits, sharper)."""
    trained = {
        "seed0": train_model(mnist, 0),
        "seed1": train_model(mnist, 1),
        "weak": train_model(mnist, 0, keep=lambda labels: np.arange(len(labels)) < TRAIN_IMAGES // 10),
        # All other digits, and WEAK_DIGIT's first 15 images only.
        "few_threes": train_model(mnist, 0, keep=lambda labels: (labels != WEAK_DIGIT)
                                  | (np.cumsum(labels == WEAK_DIGIT) <= 15)),
    }
    trained["overconfident"] = model.ProbabilityModel(trained["seed0"].classifier, temperature=0.02).eval()
    test_images = mnist[2]

    def measured(probability_model):
        return behaviour.measure(
            lambda images: model.predict_probabilities(probability_model, torch.from_numpy(images)).numpy(), test_images)

    return {name: (m, predict(m, test_images), measured(m)) for name, m in trained.items()}


def default_params(**changed):
    values = yaml.safe_load((ROOT / "params" / "register.yaml").read_text())
    return config.validate("register", {**values, **changed})


def gate(mnist, models, challenger: str, champion: str | None, **changed):
    labels = mnist[3]
    return promotion.gate(default_params(**changed), labels, models[challenger][1],
                          models[champion][1] if champion else None, challenger_latency_ms=0.05, challenger_mb=1.0,
                          behaviour=models[challenger][2])


def check(result, name: str) -> promotion.Check:
    return next(c for c in result.checks if c.name == name)


def test_mcnemar_is_the_exact_binomial_test_on_disagreements():
    labels = np.zeros(100, dtype=np.int64)
    challenger, champion = labels.copy(), labels.copy()
    challenger[:3] = 1  # wrong where the champion is right
    champion[10:20] = 1  # wrong where the challenger is right
    only_challenger, only_champion, p_value = promotion.mcnemar(labels, challenger, champion)
    assert (only_challenger, only_champion) == (10, 3)
    assert p_value == pytest.approx(sum(__import__("math").comb(13, k) for k in range(10, 14)) / 2**13)
    assert promotion.mcnemar(labels, labels, labels) == (0, 0, 1.0)


def test_another_seed_of_the_same_recipe_is_noise_and_not_promoted(mnist, models):
    result = gate(mnist, models, "seed1", "seed0")
    p_value = check(result, "alpha").value
    assert not check(result, "alpha").passed and p_value >= 0.05
    assert not result.promoted and f"McNemar exact p = {p_value:.4g}" in result.reason
    # The other way round is noise too: the champion does not flip back and forth.
    assert not gate(mnist, models, "seed0", "seed1").promoted


def test_a_clearly_better_model_is_promoted(mnist, models):
    result = gate(mnist, models, "seed0", "weak")
    assert result.promoted, result.reason
    assert check(result, "alpha").value < 1e-6
    assert result.challenger_accuracy > result.champion_accuracy


def test_a_model_worse_on_one_digit_is_refused_naming_it(mnist, models):
    labels = mnist[3]
    recall = promotion.recall(labels, models["few_threes"][1])
    assert recall[WEAK_DIGIT] < promotion.recall(labels, models["weak"][1])[WEAK_DIGIT] - 0.05
    # Better overall than the weak model, but not at the digit it barely saw.
    result = gate(mnist, models, "few_threes", "weak")
    assert check(result, "alpha").passed
    assert not check(result, "max_recall_drop").passed and not result.promoted
    assert f"recall dropped by more than 0.01 for digit {WEAK_DIGIT} (" in result.reason
    # A tolerance as large as the drop lets it through.
    assert gate(mnist, models, "few_threes", "weak", max_recall_drop=1.0).promoted


BEHAVIOUR_CHECKS = {"min_shift_agreement", "min_rotation_agreement", "min_stroke_agreement", "max_blank_confidence",
                    "max_inverted_confidence"}


def test_a_model_that_fails_a_behavioural_check_is_refused(mnist, models):
    # Real models of the smoke recipe pass every behavioural check at the defaults...
    for name in ("seed0", "seed1"):
        assert all(check(gate(mnist, models, name, None), c).passed for c in BEHAVIOUR_CHECKS), models[name][2]
    # ... the overconfident one is sure of a digit on a blank and on inverted images: refused, even
    # against a weak champion it beats on every image-level check.
    confident = models["overconfident"][2]
    assert confident["blank_confidence"] > 0.95 and confident["inverted_confidence"] > 0.8
    result = gate(mnist, models, "overconfident", "weak")
    assert check(result, "alpha").passed and not result.promoted
    assert f"blank_confidence {confident['blank_confidence']:.4f} (at most 0.95)" in result.reason
    assert "inverted_confidence" in result.reason and not check(result, "max_inverted_confidence").passed
    # Its predicted digits are seed0's: the agreements are the same, and pass.
    assert all(check(result, c).passed for c in ("min_shift_agreement", "min_rotation_agreement", "min_stroke_agreement"))
    # Not measured (an evaluate stage before behaviour existed): refused, saying so.
    unmeasured = promotion.gate(default_params(), mnist[3], models["seed0"][1], None, 0.05, 1.0, behaviour=None)
    assert not unmeasured.promoted and "shift_agreement was not measured (run 03_evaluate)" in unmeasured.reason


def test_budgets_refuse_a_slow_or_large_model(mnist, models):
    labels = mnist[3]
    params = default_params(max_latency_ms=0.01, max_model_mb=0.5)
    result = promotion.gate(params, labels, models["seed0"][1], None, challenger_latency_ms=0.05, challenger_mb=1.0,
                            behaviour=models["seed0"][2])
    assert not result.promoted
    assert "latency 0.0500 ms per image, budget 0.01 ms" in result.reason
    assert "model size 1.00 MB, budget 0.5 MB" in result.reason
    # The budgets are the only checks without a champion: the first registration is promoted.
    first = gate(mnist, models, "seed0", None)
    assert first.promoted and first.reason.startswith("no champion yet")
    # Latency is measured, the same way for any model.
    measured = promotion.latencies_ms_per_image({"a": models["seed0"][0], "b": models["seed1"][0]}, mnist[2])
    assert set(measured) == {"a", "b"} and all(0 < ms < 100 for ms in measured.values())


def register(mnist, models, name: str, params) -> registry.Decision:
    """What 04_register does, on a model trained here: log it, predict with the champion, gate, register."""
    with mlflow.start_run() as training_run:
        mlflow.log_params({"width": 8, "epochs": 1, "train_images": TRAIN_IMAGES})
        info = model.log_classifier(models[name][0], mnist[0][:5])
    trained = {"model_uri": info.model_uri, lineage.MODEL_HASH_TAG: f"md5-of-{name}"}
    champion = registry.current_champion(params.model_name)
    champion_predictions = None
    if champion:
        champion_predictions, _ = registry.predictions_on(f"models:/{params.model_name}/{champion.version}", mnist[2])
    result = promotion.gate(params, mnist[3], models[name][1], champion_predictions, 0.05, 1.0, models[name][2])
    with mlflow.start_run():
        decision = registry.register_and_decide(params, trained, result, champion, tags={"registered_by_run_id": "r"})
        evaluated = {"test": evaluation.classification_metrics(mnist[3], models[name][1]), "behaviour": models[name][2]}
        card = model_card.render(decision, evaluated, {"test": "0123456789abcdef0123"},
                                 mlflow.get_run(training_run.info.run_id))
        model_card.publish(decision, card)
    return decision


@pytest.fixture
def store(tmp_path, monkeypatch):
    """A real, empty sqlite MLflow store for this test."""
    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{tmp_path / 'mlflow.db'}")
    mlflow.set_experiment("promotion-test")
    yield MlflowClient()
    mlflow.set_tracking_uri(None)


def test_register_records_checks_and_rollback_restores_the_previous_champion(mnist, models, store, tmp_path,
                                                                              monkeypatch, capsys):
    client, params = store, default_params()
    # Agreement floors off for the weak model (a tenth of the images): this test is about the comparisons.
    first = default_params(min_shift_agreement=0.0, min_rotation_agreement=0.0, min_stroke_agreement=0.0)
    decisions = {name: register(mnist, models, name, first if name == "weak" else params)
                 for name in ("weak", "seed0", "seed1")}

    assert [d.promoted for d in decisions.values()] == [True, True, False]
    noise = decisions["seed1"]
    assert noise.champion_version == "2" and noise.challenger_version == "3"
    version = client.get_model_version(params.model_name, "3")
    assert version.tags["promoted"] == "False"
    assert version.tags["gate.alpha"] == "failed"
    assert float(version.tags["mcnemar_p_value"]) == pytest.approx(noise.mcnemar_p_value) and noise.mcnemar_p_value >= 0.05
    assert version.tags["gate.max_recall_drop.value"] == str(noise.checks["max_recall_drop"]["value"])
    # The model card is the version's description and an artifact the version names.
    card = version.description
    assert card.startswith(noise.description()) and "## Model card: mnist-digits version 3" in card
    assert "| width | 8 |" in card and "| test | `0123456789abcdef` |" in card and "**Intended use.**" in card
    recall_3 = evaluation.classification_metrics(mnist[3], models["seed1"][1])["recall"]["3"]
    assert f"| 3 | " in card and f"{recall_3:.4f} |" in card
    assert "| alpha | **failed** | McNemar exact p" in card
    assert mlflow.artifacts.load_text(version.tags["model_card"]) == card
    # decision.json's shape: the fields `registry check/sync` read, and the checks.
    saved = json.loads(json.dumps(noise.as_dict()))
    assert {"champion_version", "champion_model_dvc_md5", "challenger_version", "challenger_model_dvc_md5",
            "promoted", "reason", "previous_champion_version", "mcnemar_p_value"} <= set(saved)
    assert set(saved["checks"]) == {"min_improvement", "alpha", "max_recall_drop", "max_latency_ms", "max_model_mb",
                                    *BEHAVIOUR_CHECKS}
    assert "| shift_agreement | " in card
    assert decisions["weak"].mcnemar_p_value is None and decisions["weak"].reason.startswith("no champion yet")

    # Rollback through the documented command, in a project whose decision.json names the champion.
    project = tmp_path / "project"
    (project / "params").mkdir(parents=True)
    (project / "dvc.yaml").write_text("stages: {}\n")
    (project / "params" / "register.yaml").write_text((ROOT / "params" / "register.yaml").read_text())
    decision_path = project / "data" / "registry" / "decision.json"
    decision_path.parent.mkdir(parents=True)
    decision_path.write_text(json.dumps(noise.as_dict()))
    monkeypatch.setenv("MNIST_PROJECT_ROOT", str(project))
    assert registry.main(["rollback", "--to", "99", "--reason", "typo"]) == 1
    assert "mnist-digits has no version 99; mnist-digits@champion stays at version 2" in capsys.readouterr().err
    assert registry.main(["rollback", "--reason", "wrong answers on scanned forms"]) == 0
    assert str(registry.current_champion(params.model_name).version) == "1"
    assert json.loads(decision_path.read_text())["champion_version"] == "1"
    assert registry.main(["check"]) == 0  # registry and decision.json agree after the rollback

    champion_moves = [(e["from_version"], e["to_version"], e["reason"]) for e in aliases.history(params.model_name)
                      if e["alias"] == "champion"]
    assert champion_moves[0][:2] == (None, "1") and champion_moves[1][:2] == ("1", "2")
    assert champion_moves[2] == ("2", "1", "rollback: wrong answers on scanned forms")
    assert all(e["by"] for e in aliases.history(params.model_name))
    capsys.readouterr()
    assert registry.main(["history"]) == 0
    assert "@champion: 2 -> 1  by " in capsys.readouterr().out
    # The rolled-back model, registered again, is not promoted again.
    again = register(mnist, models, "seed0", params)
    assert again.challenger_version == "2" and not again.promoted and "was rolled back" in again.reason
    # Rolled back to by name, it is trusted again.
    assert registry.main(["rollback", "--to", "2", "--reason", "the forms were mislabelled"]) == 0
    assert "rolled_back" not in client.get_model_version(params.model_name, "2").tags
    assert "rolled_back" in client.get_model_version(params.model_name, "1").tags


def test_a_refused_first_model_leaves_no_champion(mnist, models, store):
    params = default_params()
    decision = register(mnist, models, "overconfident", params)
    assert not decision.promoted and decision.reason.startswith("refused: ")
    assert decision.champion_version is None and registry.current_champion(params.model_name) is None
    assert registry.disagreements(decision.as_dict()) == []  # `registry check` agrees: no champion, as decided
    assert str(store.get_model_version_by_alias(params.model_name, "challenger").version) == "1"


@pytest.mark.parametrize("name, value, message", [
    ("alpha", 1.5, "params/register.yaml:alpha = 1.5: must be a finite number > 0 and < 1"),
    ("max_recall_drop", -0.01, "params/register.yaml:max_recall_drop = -0.01: must be a finite number >= 0 and <= 1"),
    ("max_latency_ms", "fast", "params/register.yaml:max_latency_ms = 'fast': must be float, got str"),
])
def test_a_bad_gate_parameter_stops_the_stage_before_anything_is_registered(project, name, value, message):
    path, env = project
    set_params(path, "register", **{name: value})
    result = run(["python", "-m", "mnist_lifecycle.stage", "register"], path, env, check=False)
    assert result.returncode == 2 and message in result.stderr
    assert not (path / "mlflow.db").exists()  # no kernel, no store opened, no alias moved
