"""Evaluation: FID with a pluggable feature extractor, the offline digit classifier, sample grids."""

from .classifier import ClassifierFeatureExtractor, DigitClassifier, label_histogram, load_or_train_classifier
from .fid import InceptionFeatureExtractor, fid, frechet_distance
from .grids import save_image_grid
from .mlp_classifier import DigitMLPClassifier

__all__ = [
    "ClassifierFeatureExtractor",
    "DigitClassifier",
    "DigitMLPClassifier",
    "InceptionFeatureExtractor",
    "fid",
    "frechet_distance",
    "label_histogram",
    "load_or_train_classifier",
    "save_image_grid",
]
