"""A second, independent FID feature space: a fully connected digit classifier (no convolutions).

FID claims in the study hold only where two feature spaces agree; this network shares neither the architecture nor
the training seed of the CNN :class:`~diffusers_stages.evaluation.classifier.DigitClassifier`.
"""

from __future__ import annotations

import torch
from diffusers import ModelMixin
from diffusers.configuration_utils import ConfigMixin, register_to_config
from torch import nn

from .classifier import prepare_digits


class DigitMLPClassifier(ModelMixin, ConfigMixin):
    r"""
    A multilayer perceptron digit classifier whose penultimate activations serve as a second FID feature space:
    ``x -> flatten -> Linear(H W C, hidden_dim) -> GELU -> Linear(hidden_dim, feature_dim) -> GELU -> head``.

    Args:
        resolution (`int`): input size; other sizes are resized bilinearly.
        in_channels (`int`): 1 for grayscale digits.
        num_classes (`int`): number of labels.
        hidden_dim (`int`): width of the first hidden layer.
        feature_dim (`int`): width of the feature layer.
        test_accuracy (`float`, *optional*): accuracy on held-out images, recorded after training.
        train_source (`str`, *optional*): the data it was trained on, for the record.
    """

    @register_to_config
    def __init__(
        self,
        resolution: int = 28,
        in_channels: int = 1,
        num_classes: int = 10,
        hidden_dim: int = 512,
        feature_dim: int = 256,
        test_accuracy: float | None = None,
        train_source: str | None = None,
    ):
        super().__init__()
        self.body = nn.Sequential(
            nn.Flatten(),
            nn.Linear(in_channels * resolution * resolution, hidden_dim),
            nn.GELU(),
            nn.Dropout(0.2),
            nn.Linear(hidden_dim, feature_dim),
            nn.GELU(),
        )
        self.head = nn.Linear(feature_dim, num_classes)

    def _prepare(self, images: torch.Tensor) -> torch.Tensor:
        return prepare_digits(images, self.config.resolution, self.config.in_channels, self.dtype)

    def features(self, images: torch.Tensor) -> torch.Tensor:
        """Penultimate activations ``[N, feature_dim]`` of images in ``[-1, 1]``."""
        return self.body(self._prepare(images))

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        """Class logits ``[N, num_classes]``."""
        return self.head(self.features(images))
