"""Evaluation: Frechet distance with a pluggable feature extractor, an offline digit classifier, sample grids.

FID = ``|mu_a - mu_b|^2 + tr(C_a + C_b - 2 (C_a C_b)^{1/2})`` over features of real and generated images.
A feature extractor is any callable mapping images ``[N, C, H, W]`` in ``[-1, 1]`` to features ``[N, D]``:
:class:`InceptionFeatureExtractor` (the standard FID, torchmetrics' Inception-v3, needs its weights) or the
offline :class:`ClassifierFeatureExtractor` over a :class:`DigitClassifier` trained on the labelled real data.
FIDs in different feature spaces are not comparable; this project's tables say which one they use.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Union

import numpy as np
import torch
from tqdm.auto import tqdm

FeatureExtractor = Callable[[torch.Tensor], torch.Tensor]


# ---------------------------------------------------------------------------------------------- Frechet distance
def feature_statistics(features: Union[torch.Tensor, np.ndarray]) -> tuple[np.ndarray, np.ndarray]:
    """Mean and (unbiased) covariance of ``[N, D]`` features, in float64."""
    f = np.asarray(torch.as_tensor(features).detach().cpu().double().numpy())
    if f.ndim != 2 or f.shape[0] < 2:
        raise ValueError(f"features must be [N >= 2, D], got shape {tuple(f.shape)}.")
    return f.mean(0), np.cov(f, rowvar=False)


def frechet_distance_from_statistics(mu_a, cov_a, mu_b, cov_b) -> float:
    """
    ``|mu_a - mu_b|^2 + tr(C_a) + tr(C_b) - 2 tr((C_a C_b)^{1/2})``, with the trace of the matrix square root taken
    as ``sum sqrt(eig(C_a^{1/2} C_b C_a^{1/2}))`` (a symmetric PSD form: no complex round-off).
    """
    w, v = np.linalg.eigh(np.atleast_2d(cov_a))
    sqrt_a = (v * np.sqrt(np.clip(w, 0, None))) @ v.T
    middle = np.linalg.eigvalsh(sqrt_a @ np.atleast_2d(cov_b) @ sqrt_a)
    tr_sqrt = np.sqrt(np.clip(middle, 0, None)).sum()
    diff = np.asarray(mu_a) - np.asarray(mu_b)
    return float(diff @ diff + np.trace(np.atleast_2d(cov_a)) + np.trace(np.atleast_2d(cov_b)) - 2 * tr_sqrt)


def frechet_distance(features_a, features_b) -> float:
    """The Frechet distance between the Gaussians fitted to two feature sets ``[N, D]``."""
    return frechet_distance_from_statistics(*feature_statistics(features_a), *feature_statistics(features_b))


@torch.no_grad()
def extract_features(
    extractor: FeatureExtractor, images: torch.Tensor, batch_size: int = 256, progress: bool = False
) -> torch.Tensor:
    """Run ``extractor`` over ``images`` in batches."""
    chunks = range(0, len(images), batch_size)
    out = [extractor(images[i : i + batch_size]) for i in tqdm(chunks, desc="features", disable=not progress)]
    return torch.cat(out).double()


def fid(extractor: FeatureExtractor, real: torch.Tensor, generated: torch.Tensor, batch_size: int = 256) -> float:
    """FID between real and generated images (both ``[N, C, H, W]`` in ``[-1, 1]``) in ``extractor``'s features."""
    return frechet_distance(
        extract_features(extractor, real, batch_size), extract_features(extractor, generated, batch_size)
    )


class InceptionFeatureExtractor:
    """
    The standard FID features: the 2048-d pool features of the FID Inception-v3 of torchmetrics'
    `FrechetInceptionDistance` (``pip install "diffusers-stages[fid]"``: torchmetrics, torch-fidelity, torchvision). Its weights are
    downloaded on first use, so it does not work offline; tests here use :class:`ClassifierFeatureExtractor`.
    """

    def __init__(self, device: Union[str, torch.device] = "cpu"):
        try:
            from torchmetrics.image.fid import FrechetInceptionDistance
        except ImportError as e:  # pragma: no cover - depends on optional packages
            raise ImportError('InceptionFeatureExtractor needs `pip install "diffusers-stages[fid]"`.') from e
        # torchmetrics' public metric builds the FID Inception-v3 (2048-d pool features) as its `inception`
        # attribute; we keep only that network because `fid` takes any feature extractor (the offline digit
        # classifier too) and computes the distance itself, in float64. Not tested here: the metric downloads its
        # weights when built, and tests run offline.
        self.model = FrechetInceptionDistance(feature=2048).inception.to(device).eval()  # pragma: no cover
        self.device = device

    @torch.no_grad()
    def __call__(self, images: torch.Tensor) -> torch.Tensor:  # pragma: no cover - needs downloaded weights
        if images.shape[1] == 1:
            images = images.expand(-1, 3, -1, -1)
        uint8 = ((images.clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8).to(self.device)
        return self.model(uint8).double()
