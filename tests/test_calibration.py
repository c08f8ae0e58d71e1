"""Calibration on a real model trained here on real MNIST with label smoothing (which makes its
probabilities too soft): a temperature fitted on held-out training images lowers the expected
calibration error on the test set, keeps every prediction, and travels inside the logged model."""

from __future__ import annotations

import mlflow
import mlflow.pytorch
import numpy as np
import pytest
import torch

from mnist_lifecycle import calibration, data, model, training

from .conftest import smoke_params


@pytest.fixture(scope="module")
def fitted(mnist_source):
    train_images, train_labels, test_images, test_labels = (
        data.read_idx(mnist_source / f"{idx.name}.gz").copy() for idx in data.IDX_FILES)
    images, labels = torch.from_numpy(train_images[:4000]), torch.from_numpy(train_labels[:4000])
    training.seed_everything(0)
    classifier = model.DigitClassifier(width=8)
    training.train(classifier, images, labels, images[:500], labels[:500], smoke_params(seed=0), progress=False)
    # Validation: training images the model did not see.
    val_images, val_labels = train_images[50_000:55_000], train_labels[50_000:55_000]
    temperature = calibration.fit_temperature(calibration.logits_of(classifier, val_images), val_labels)
    return classifier.eval(), temperature, test_images, test_labels


def test_temperature_lowers_the_calibration_error_and_keeps_every_prediction(fitted):
    classifier, temperature, test_images, test_labels = fitted
    pixels = torch.from_numpy(test_images)
    soft = model.predict_probabilities(model.ProbabilityModel(classifier), pixels).numpy()
    calibrated = model.predict_probabilities(model.ProbabilityModel(classifier, temperature), pixels).numpy()
    assert temperature < 1  # label smoothing's probabilities are too soft: the temperature sharpens them
    before = calibration.expected_calibration_error(soft, test_labels)
    after = calibration.expected_calibration_error(calibrated, test_labels)
    assert after < before / 2, (before, after)
    assert (calibrated.argmax(1) == soft.argmax(1)).all()
    # What evaluate reports as "before": recovered from the calibrated probabilities alone.
    np.testing.assert_allclose(calibration.uncalibrated(calibrated, temperature), soft, atol=1e-4)


def test_expected_calibration_error_by_hand():
    labels = np.array([0, 0, 1, 1])
    # Two bins: confidence 0.95 (right once of twice), 0.6 (right twice).
    probabilities = np.array([[0.95, 0.05], [0.05, 0.95], [0.4, 0.6], [0.4, 0.6]])
    assert calibration.expected_calibration_error(probabilities, labels) == pytest.approx(
        0.5 * abs(0.5 - 0.95) + 0.5 * abs(1.0 - 0.6))


def test_the_logged_model_serves_calibrated_probabilities(fitted, tmp_path, monkeypatch):
    classifier, temperature, test_images, _ = fitted
    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{tmp_path / 'mlflow.db'}")
    mlflow.set_experiment("calibration-test")
    with mlflow.start_run():
        info = model.log_classifier(model.ProbabilityModel(classifier, temperature), test_images[:5])
    loaded = mlflow.pytorch.load_model(info.model_uri)
    served = model.predict_probabilities(loaded, torch.from_numpy(test_images[:500])).numpy()
    logits = calibration.logits_of(classifier, test_images[:500])
    expected = torch.softmax(torch.from_numpy(logits) / temperature, dim=1).numpy()
    np.testing.assert_allclose(served, expected, atol=1e-5)
    assert mlflow.models.Model.load(info.model_uri).metadata["temperature"] == pytest.approx(temperature)
    mlflow.set_tracking_uri(None)
