"""An offline digit classifier whose penultimate activations serve as FID features (no download needed)."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Union

import torch
import torch.nn.functional as F
from diffusers import ModelMixin
from diffusers.configuration_utils import ConfigMixin, register_to_config
from torch import nn
from tqdm.auto import tqdm

from ..data import dataset_to_tensor


def prepare_digits(images: torch.Tensor, resolution: int, in_channels: int, dtype: torch.dtype) -> torch.Tensor:
    """Images ``[N, C, H, W]`` resized (bilinear, antialiased) to ``resolution`` and averaged to grayscale when the
    classifier takes one channel."""
    if images.shape[-2:] != (resolution, resolution):
        images = F.interpolate(
            images, size=(resolution, resolution), mode="bilinear", align_corners=False, antialias=True
        )
    if images.shape[1] == 3 and in_channels == 1:
        images = images.mean(1, keepdim=True)
    return images.to(dtype)


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
        return prepare_digits(images, self.config.resolution, self.config.in_channels, self.dtype)

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
    architecture: str = "cnn",
) -> DigitClassifier:
    """
    Train a digit classifier (``architecture``: ``"cnn"``, :class:`DigitClassifier`, or ``"mlp"``,
    :class:`~diffusers_stages.evaluation.mlp_classifier.DigitMLPClassifier`) on labelled images ``[N, C, H, W]`` in
    ``[-1, 1]``; the ``holdout`` share picked by a seeded shuffle is never trained on and gives
    ``config.test_accuracy``. Random shifts of up to 2 pixels augment the training images.
    """
    if len(images) != len(labels) or len(images) < 10:
        raise ValueError("need at least 10 labelled images, with one label per image.")
    g = torch.Generator().manual_seed(seed)
    torch.manual_seed(seed)
    perm = torch.randperm(len(images), generator=g)
    n_test = max(1, int(round(holdout * len(images))))
    test_idx, train_idx = perm[:n_test], perm[n_test:]
    model = classifier_class(architecture)(
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


def classifier_class(architecture: str) -> type:
    """The model class of a classifier ``architecture``: ``"cnn"`` or ``"mlp"``."""
    from .mlp_classifier import DigitMLPClassifier

    classes = {"cnn": DigitClassifier, "mlp": DigitMLPClassifier}
    if architecture not in classes:
        raise ValueError(f"`architecture` must be one of {sorted(classes)}, got {architecture!r}.")
    return classes[architecture]


def default_cache_dir() -> Path:
    return Path(os.environ.get("DIFFUSERS_STAGES_CACHE", Path.home() / ".cache" / "diffusers_stages"))


def load_or_train_classifier(
    source: str = "mnist",
    resolution: int | None = None,
    cache_dir: Union[str, os.PathLike] | None = None,
    progress: bool = True,
    architecture: str = "cnn",
    seed: int = 0,
    **train_kwargs,
) -> DigitClassifier:
    """
    The offline FID classifier for ``source`` (``"mnist"``: the shared MNIST test set; ``"digits"``: scikit-learn's
    digits, or a path to MNIST IDX files), trained once and cached under ``cache_dir``.

    Args:
        architecture (`str`, defaults to ``"cnn"``): ``"cnn"`` (the default feature space) or ``"mlp"`` (a second,
            independent one: another architecture, and by convention another ``seed``).
        seed (`int`, defaults to 0): Seed of the weights, the hold-out split and the batch order. Classifiers of
            different architectures or seeds are cached apart (``classifier-mnist-28-mlp-seed1``).
    """
    from ..data import load_image_dataset

    cls = classifier_class(architecture)
    resolution = resolution or (28 if source != "digits" else 16)
    key = f"classifier-{Path(source).name}-{resolution}"
    if (architecture, seed) != ("cnn", 0):
        key += f"-{architecture}-seed{seed}"
    folder = Path(cache_dir or default_cache_dir()) / key
    if (folder / "config.json").exists():
        return cls.from_pretrained(folder).eval()
    ds = load_image_dataset(source)
    images = dataset_to_tensor(ds, resolution=resolution, channels=1)
    labels = torch.tensor(ds["label"])
    model = train_digit_classifier(
        images, labels, resolution=resolution, train_source=source, progress=progress, seed=seed,
        architecture=architecture, **train_kwargs,
    )  # fmt: skip
    folder.parent.mkdir(parents=True, exist_ok=True)
    from ..utils import atomic_directory

    with atomic_directory(folder) as tmp:
        model.save_pretrained(tmp)
    return model


@torch.no_grad()
def label_histogram(classifier: DigitClassifier, images: torch.Tensor) -> list[int]:
    """How many of ``images`` the classifier assigns to each class (mode coverage of generated samples)."""
    classifier.eval()
    preds = torch.cat(
        [classifier(images[i : i + 512].to(classifier.device)).argmax(1) for i in range(0, len(images), 512)]
    )
    return torch.bincount(preds.cpu(), minlength=classifier.config.num_classes).tolist()
