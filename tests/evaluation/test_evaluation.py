from pathlib import Path

import numpy as np
import pytest
import torch

from diffusers_stages import (
    ClassifierFeatureExtractor,
    DigitClassifier,
    DigitMLPClassifier,
    fid,
    frechet_distance,
    load_or_train_classifier,
    save_image_grid,
)
from diffusers_stages.data import dataset_to_tensor, load_mnist_dataset
from diffusers_stages.evaluation.classifier import label_histogram
from diffusers_stages.evaluation.fid import frechet_distance_from_statistics


def reference_frechet(a, b):
    """Textbook formula with a general (non-symmetric) matrix square root."""
    from scipy import linalg

    mu1, mu2 = a.mean(0), b.mean(0)
    c1, c2 = np.cov(a, rowvar=False), np.cov(b, rowvar=False)
    covmean = linalg.sqrtm(c1 @ c2).real
    return float(((mu1 - mu2) ** 2).sum() + np.trace(c1 + c2 - 2 * covmean))


def test_frechet_distance_matches_reference_and_grows_with_shift():
    rng = np.random.default_rng(0)
    a = rng.normal(size=(500, 6)) @ rng.normal(size=(6, 6))
    b = rng.normal(size=(400, 6)) * 1.5
    assert frechet_distance(a, b) == pytest.approx(reference_frechet(a, b), rel=1e-6)
    assert abs(frechet_distance(a, a)) < 1e-8
    shifts = [frechet_distance(a, a + s) for s in (0.1, 0.5, 2.0)]
    assert shifts == pytest.approx([6 * s**2 for s in (0.1, 0.5, 2.0)], rel=1e-6)
    assert shifts[0] < shifts[1] < shifts[2]


def test_frechet_distance_of_known_gaussians():
    # N(0, I) vs N(m, 4 I) in D dims: |m|^2 + D (1 + 4 - 2 * 2) = |m|^2 + D
    d, m = 3, np.array([1.0, 2.0, 0.0])
    assert frechet_distance_from_statistics(np.zeros(d), np.eye(d), m, 4 * np.eye(d)) == pytest.approx(5.0 + d)
    with pytest.raises(ValueError, match="features"):
        frechet_distance(np.zeros((1, 3)), np.zeros((4, 3)))


@pytest.mark.slow  # 80 s on 2 cores
def test_mnist_classifier_reaches_accuracy_bar(cache_dir):
    # the study's feature space, trained as the study trains it
    assert load_or_train_classifier("mnist", progress=False).config.test_accuracy > 0.97


def test_classifier_features_are_cached_and_separate_real_from_noise(cache_dir):
    model = load_or_train_classifier("mnist", progress=False, seed=2, epochs=1)  # a fast stand-in for the default
    assert model.config.test_accuracy > 0.9, model.config.test_accuracy
    again = load_or_train_classifier("mnist", progress=False, seed=2)  # from the cache: same weights
    for p, q in zip(model.parameters(), again.parameters()):
        assert torch.equal(p, q)

    real = dataset_to_tensor(load_mnist_dataset(max_samples=600))
    extractor = ClassifierFeatureExtractor(model)
    feats = extractor(real)
    assert feats.shape == (600, model.config.feature_dim)
    # FID of real vs real halves is small; against noise or blank images it is far larger
    half = fid(extractor, real[:300], real[300:])
    noise = fid(extractor, real[:300], torch.rand(300, 1, 28, 28) * 2 - 1)
    assert noise > 10 * half
    hist = label_histogram(model, real)
    assert sum(hist) == 600 and min(hist) > 30  # every digit is present in real data


def test_classifier_resizes_inputs():
    model = DigitClassifier(resolution=28).eval()
    assert model.features(torch.zeros(2, 1, 16, 16)).shape == (2, 128)
    assert model(torch.zeros(2, 3, 28, 28)).shape == (2, 10)


def test_image_grid(tmp_path):
    grid = save_image_grid(torch.rand(10, 1, 8, 8) * 2 - 1, tmp_path / "g.png", rows=2, scale=2)
    assert (tmp_path / "g.png").exists() and grid.size == (5 * 8 * 2, 2 * 8 * 2)


def test_mlp_classifier_is_a_second_cached_feature_space(cache_dir):
    # few epochs keep it fast; the study's default training reaches the same bar with margin
    mlp = load_or_train_classifier("mnist", architecture="mlp", seed=1, progress=False, epochs=10)
    assert isinstance(mlp, DigitMLPClassifier)
    assert mlp.config.test_accuracy > 0.95, mlp.config.test_accuracy
    assert (Path(cache_dir) / "classifier-mnist-28-mlp-seed1" / "config.json").exists()
    again = load_or_train_classifier("mnist", architecture="mlp", seed=1, progress=False)
    for p, q in zip(mlp.parameters(), again.parameters()):
        assert torch.equal(p, q)
    assert mlp.features(torch.zeros(3, 1, 16, 16)).shape == (3, mlp.config.feature_dim)
    with pytest.raises(ValueError, match="architecture"):
        load_or_train_classifier("mnist", architecture="resnet", progress=False)
