"""The model, its preprocessing and the training loop, on real MNIST."""

import numpy as np
import pytest
import torch

from mnist_lifecycle import data, model, training

from .conftest import smoke_params


@pytest.fixture(scope="module")
def prepared(tmp_path_factory, mnist_source):
    directory = tmp_path_factory.mktemp("data")
    data.fetch_raw(directory / "raw", mnist_source)
    data.write_prepared(directory / "prepared", data.verify_raw(directory / "raw"), 5000, 0)
    return directory / "prepared"


def test_preprocess_normalizes_grey_levels():
    pixels = torch.tensor([[[0.0, 255.0]]])
    out = model.preprocess(pixels)
    assert out.shape == (1, 1, 1, 2)
    expected = (torch.tensor([0.0, 1.0]) - model.PIXEL_MEAN) / model.PIXEL_STD
    assert torch.allclose(out.flatten(), expected)
    assert torch.equal(model.preprocess(torch.tensor([[[7]]], dtype=torch.uint8)),
                       model.preprocess(torch.tensor([[[7.0]]])))


def test_probability_model_outputs_distributions_for_any_batch_size():
    probability_model = model.ProbabilityModel(model.DigitClassifier(width=4)).eval()
    for batch in (1, 3, 64):
        out = probability_model(torch.rand(batch, 28, 28) * 255)
        assert out.shape == (batch, 10)
        assert torch.allclose(out.sum(1), torch.ones(batch), atol=1e-5)


def test_classifier_of_params_adds_the_accurate_layers_only_when_asked():
    fast = model.DigitClassifier.of(smoke_params())
    assert fast.state_dict().keys() == model.DigitClassifier(width=8).state_dict().keys()
    accurate = model.DigitClassifier.of(smoke_params(hidden=32, last_block_convs=2, dropout=0.2))
    convolutions = [m for m in accurate.features[2] if isinstance(m, torch.nn.Conv2d)]
    assert [(c.in_channels, c.out_channels) for c in convolutions] == [(16, 32), (32, 32)]
    assert [m.out_features for m in accurate.head if isinstance(m, torch.nn.Linear)] == [32, 10]
    assert accurate.eval()(torch.rand(3, 28, 28) * 255).shape == (3, 10)


def test_random_shift_moves_content_within_bounds():
    images = torch.zeros(50, 28, 28)
    images[:, 14, 14] = 1.0
    shifted = training.random_shift(images, 2, torch.Generator().manual_seed(0))
    assert shifted.shape == images.shape and torch.all(shifted.sum((1, 2)) == 1)
    rows, cols = torch.nonzero(shifted)[:, 1], torch.nonzero(shifted)[:, 2]
    assert rows.min() >= 12 and rows.max() <= 16 and cols.min() >= 12 and cols.max() <= 16
    assert len(set(zip(rows.tolist(), cols.tolist()))) > 1
    assert training.random_shift(images, 0, torch.Generator()) is images


def small_run(prepared, seed, precision="float32"):
    images, labels = (torch.from_numpy(a[:2000]) for a in data.load_split(prepared, "train"))
    val_images, val_labels = (torch.from_numpy(a[:1000]) for a in data.load_split(prepared, "val"))
    training.seed_everything(seed)
    classifier = model.DigitClassifier(width=8)
    history = training.train(classifier, images, labels, val_images, val_labels,
                             smoke_params(augment_shift=1, seed=seed, precision=precision), progress=False)
    return classifier, history


@pytest.mark.parametrize("precision", ["float32", "bfloat16"])
def test_training_learns_and_repeats_exactly(prepared, precision):
    first, history = small_run(prepared, seed=3, precision=precision)
    assert history[-1].val_accuracy > 0.8  # 2,000 images, one epoch: far above chance (0.1)
    second, _ = small_run(prepared, seed=3, precision=precision)
    for a, b in zip(first.state_dict().values(), second.state_dict().values()):
        assert torch.equal(a, b)
    # bfloat16 is the arithmetic of training only: what gets logged and served is float32.
    assert {p.dtype for p in first.parameters()} == {torch.float32}


def test_bfloat16_training_computes_in_bfloat16(prepared):
    fp32, _ = small_run(prepared, seed=3)
    bf16, _ = small_run(prepared, seed=3, precision="bfloat16")
    assert not torch.equal(fp32.head[-1].weight, bf16.head[-1].weight)


def test_diverging_training_stops_with_a_clear_error(prepared):
    images, labels = (torch.from_numpy(a[:512]) for a in data.load_split(prepared, "train"))
    # Adam steps by about lr whatever the gradient: only an absurd rate overflows the weights.
    with pytest.raises(FloatingPointError, match="diverged"):
        training.train(model.DigitClassifier(width=4), images, labels, images, labels,
                       smoke_params(lr=1e20, weight_decay=0.0, label_smoothing=0.0), progress=False)


def test_predict_probabilities_batches_consistently():
    probability_model = model.ProbabilityModel(model.DigitClassifier(width=4)).eval()
    images = torch.from_numpy(np.random.default_rng(0).integers(0, 256, (50, 28, 28), dtype=np.uint8))
    assert torch.allclose(model.predict_probabilities(probability_model, images, batch_size=7),
                          model.predict_probabilities(probability_model, images, batch_size=50), atol=1e-6)
