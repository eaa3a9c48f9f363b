"""Evaluation: Frechet distance with a pluggable feature extractor, an offline digit classifier, sample grids.

FID = ``|mu_a - mu_b|^2 + tr(C_a + C_b - 2 (C_a C_b)^{1/2})`` over features of real and generated images.
A feature extractor is any callable mapping images ``[N, C, H, W]`` in ``[-1, 1]`` to features ``[N, D]``:
:class:`InceptionFeatureExtractor` (the standard FID, torchmetrics' Inception-v3, needs its weights) or the
offline :class:`ClassifierFeatureExtractor` over a :class:`DigitClassifier` trained on the labelled real data.
FIDs in different feature spaces are not comparable; this project's tables say which one they use.
"""

from __future__ import annotations

import json
import os
from collections.abc import Callable
from pathlib import Path
from typing import Union

import numpy as np
import torch
import torch.nn.functional as F
from diffusers import ModelMixin
from diffusers.configuration_utils import ConfigMixin, register_to_config
from diffusers.utils import make_image_grid
from torch import nn
from tqdm.auto import tqdm

from .data import dataset_to_tensor, tensor_to_pil

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


# ---------------------------------------------------------------------------------------------- extractors
class DigitClassifier(ModelMixin, ConfigMixin):
    r"""
    A small CNN digit classifier whose penultimate activations serve as offline FID features.

    Args:
        resolution (`int`): input size; other sizes are resized bilinearly.
        in_channels (`int`): 1 for grayscale digits.
        num_classes (`int`): number of labels.
        feature_dim (`int`): width of the feature layer.
        test_accuracy (`float`, *optional*): accuracy on held-out images, recorded after training.
    """

    @register_to_config
    def __init__(
        self,
        resolution: int = 28,
        in_channels: int = 1,
        num_classes: int = 10,
        feature_dim: int = 128,
        test_accuracy: float | None = None,
        train_source: str | None = None,
    ):
        super().__init__()
        self.conv = nn.Sequential(
            nn.Conv2d(in_channels, 32, 3, padding=1),
            nn.BatchNorm2d(32),
            nn.ReLU(),
            nn.Conv2d(32, 64, 3, stride=2, padding=1),
            nn.BatchNorm2d(64),
            nn.ReLU(),
            nn.Conv2d(64, 64, 3, stride=2, padding=1),
            nn.BatchNorm2d(64),
            nn.ReLU(),
            nn.AdaptiveAvgPool2d(4),
            nn.Flatten(),
        )
        self.fc = nn.Sequential(nn.Dropout(0.25), nn.Linear(64 * 16, feature_dim), nn.ReLU())
        self.head = nn.Linear(feature_dim, num_classes)

    def _prepare(self, images: torch.Tensor) -> torch.Tensor:
        r = self.config.resolution
        if images.shape[-2:] != (r, r):
            images = F.interpolate(images, size=(r, r), mode="bilinear", align_corners=False, antialias=True)
        if images.shape[1] == 3 and self.config.in_channels == 1:
            images = images.mean(1, keepdim=True)
        return images.to(self.dtype)

    def features(self, images: torch.Tensor) -> torch.Tensor:
        """Penultimate activations ``[N, feature_dim]`` of images in ``[-1, 1]``."""
        return self.fc(self.conv(self._prepare(images)))

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        """Class logits ``[N, num_classes]``."""
        return self.head(self.features(images))


class ClassifierFeatureExtractor:
    """FID features from a trained :class:`DigitClassifier` (eval mode, no gradients)."""

    def __init__(self, classifier: DigitClassifier):
        self.classifier = classifier.eval()

    @torch.no_grad()
    def __call__(self, images: torch.Tensor) -> torch.Tensor:
        return self.classifier.features(images.to(self.classifier.device))


class InceptionFeatureExtractor:
    """
    The standard FID features: the 2048-d pool features of the FID Inception-v3, from torchmetrics
    (``pip install "torchmetrics[image]"``, which brings torch-fidelity and torchvision). Its weights are
    downloaded on first use, so it does not work offline; tests here use :class:`ClassifierFeatureExtractor`.
    """

    def __init__(self, device: Union[str, torch.device] = "cpu"):
        try:
            from torchmetrics.image.fid import NoTrainInceptionV3
        except ImportError as e:  # pragma: no cover - depends on optional packages
            raise ImportError('InceptionFeatureExtractor needs `pip install "torchmetrics[image]"`.') from e
        self.model = NoTrainInceptionV3(name="inception-v3-compat", features_list=["2048"]).to(device).eval()
        self.device = device

    @torch.no_grad()
    def __call__(self, images: torch.Tensor) -> torch.Tensor:  # pragma: no cover - needs downloaded weights
        if images.shape[1] == 1:
            images = images.expand(-1, 3, -1, -1)
        uint8 = ((images.clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8).to(self.device)
        return self.model(uint8).double()


# ---------------------------------------------------------------------------------------------- classifier training
def train_digit_classifier(
    images: torch.Tensor,
    labels: torch.Tensor,
    resolution: int = 28,
    holdout: float = 0.2,
    epochs: int = 8,
    batch_size: int = 128,
    lr: float = 2e-3,
    seed: int = 0,
    train_source: str | None = None,
    progress: bool = True,
) -> DigitClassifier:
    """
    Train a :class:`DigitClassifier` on labelled images ``[N, C, H, W]`` in ``[-1, 1]``; the last ``holdout``
    share (after a seeded shuffle) is never trained on and gives ``config.test_accuracy``. Random shifts of up to
    2 pixels augment the training images.
    """
    if len(images) != len(labels) or len(images) < 10:
        raise ValueError("need at least 10 labelled images, with one label per image.")
    g = torch.Generator().manual_seed(seed)
    torch.manual_seed(seed)
    perm = torch.randperm(len(images), generator=g)
    n_test = max(1, int(round(holdout * len(images))))
    test_idx, train_idx = perm[:n_test], perm[n_test:]
    model = DigitClassifier(
        resolution=resolution,
        in_channels=images.shape[1],
        num_classes=int(labels.max()) + 1,
        train_source=train_source,
    )
    opt = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=1e-4)
    steps = epochs * ((len(train_idx) + batch_size - 1) // batch_size)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=lr, total_steps=steps)
    x_train = model._prepare(images[train_idx])
    y_train = labels[train_idx].long()
    model.train()
    bar = tqdm(total=steps, desc="classifier", disable=not progress)
    for _ in range(epochs):
        order = torch.randperm(len(train_idx), generator=g)
        for i in range(0, len(order), batch_size):
            idx = order[i : i + batch_size]
            x = _random_shift(x_train[idx], 2, g)
            loss = F.cross_entropy(model(x), y_train[idx])
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            sched.step()
            bar.update(1)
            bar.set_postfix(loss=f"{loss.item():.3f}")
    bar.close()
    model.eval()
    acc = classifier_accuracy(model, images[test_idx], labels[test_idx])
    model.register_to_config(test_accuracy=acc)
    return model


def _random_shift(x: torch.Tensor, max_shift: int, generator: torch.Generator) -> torch.Tensor:
    """Shift each image by up to ``max_shift`` pixels, padding with the background value -1."""
    pad = F.pad(x, [max_shift] * 4, value=-1.0)
    n, _, h, w = x.shape
    dx, dy = torch.randint(0, 2 * max_shift + 1, (2, n), generator=generator)
    rows = (torch.arange(h)[None, :] + dy[:, None])[:, None, :, None].expand(n, x.shape[1], h, w + 2 * max_shift)
    out = pad.gather(2, rows)
    cols = (torch.arange(w)[None, :] + dx[:, None])[:, None, None, :].expand(n, x.shape[1], h, w)
    return out.gather(3, cols)


@torch.no_grad()
def classifier_accuracy(model: DigitClassifier, images: torch.Tensor, labels: torch.Tensor) -> float:
    model.eval()
    preds = torch.cat([model(images[i : i + 512]).argmax(1) for i in range(0, len(images), 512)])
    return float((preds == labels.long()).float().mean())


def default_cache_dir() -> Path:
    return Path(os.environ.get("DIFFUSERS_STAGES_CACHE", Path.home() / ".cache" / "diffusers_stages"))


def load_or_train_classifier(
    source: str = "mnist",
    resolution: int | None = None,
    cache_dir: Union[str, os.PathLike] | None = None,
    progress: bool = True,
    **train_kwargs,
) -> DigitClassifier:
    """
    The offline FID classifier for ``source`` (``"mnist"``: the shared MNIST test set; ``"digits"``: scikit-learn's
    digits, or a path to MNIST IDX files), trained once and cached under ``cache_dir``.
    """
    from .data import load_image_dataset

    resolution = resolution or (28 if source != "digits" else 16)
    key = f"classifier-{Path(source).name}-{resolution}"
    folder = Path(cache_dir or default_cache_dir()) / key
    if (folder / "config.json").exists():
        return DigitClassifier.from_pretrained(folder).eval()
    ds = load_image_dataset(source)
    images = dataset_to_tensor(ds, resolution=resolution, channels=1)
    labels = torch.tensor(ds["label"])
    model = train_digit_classifier(
        images, labels, resolution=resolution, train_source=source, progress=progress, **train_kwargs
    )
    folder.parent.mkdir(parents=True, exist_ok=True)
    from .utils import atomic_directory

    with atomic_directory(folder) as tmp:
        model.save_pretrained(tmp)
    return model


# ---------------------------------------------------------------------------------------------- grids and histograms
def save_image_grid(images: torch.Tensor, path: Union[str, os.PathLike], rows: int | None = None, scale: int = 1):
    """Save ``[N, C, H, W]`` images in ``[-1, 1]`` as a PNG grid (``rows`` defaults to about sqrt(N))."""
    pil = tensor_to_pil(images)
    n = len(pil)
    rows = rows or max(1, int(np.floor(np.sqrt(n))))
    cols = int(np.ceil(n / rows))
    pil += [pil[0].copy().point(lambda _: 0)] * (rows * cols - n)
    grid = make_image_grid(pil, rows=rows, cols=cols)
    if scale != 1:
        grid = grid.resize((grid.width * scale, grid.height * scale), resample=0)
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    grid.save(path)
    return grid


@torch.no_grad()
def label_histogram(classifier: DigitClassifier, images: torch.Tensor) -> list[int]:
    """How many of ``images`` the classifier assigns to each class (mode coverage of generated samples)."""
    classifier.eval()
    preds = torch.cat(
        [classifier(images[i : i + 512].to(classifier.device)).argmax(1) for i in range(0, len(images), 512)]
    )
    return torch.bincount(preds.cpu(), minlength=classifier.config.num_classes).tolist()


def write_json(obj, path: Union[str, os.PathLike]) -> None:
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    Path(path).write_text(json.dumps(obj, indent=2) + "\n")
