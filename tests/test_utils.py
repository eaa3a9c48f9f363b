"""Shared helpers: the tracker check the trainers run before training."""

import importlib.util

import pytest

from diffusers_stages.utils import check_tracker_installed


def test_installed_tracker_and_none_pass():
    check_tracker_installed("none")
    check_tracker_installed("tensorboard")  # installed with the `test` extra
    check_tracker_installed("all")


@pytest.mark.skipif(importlib.util.find_spec("wandb") is not None, reason="wandb is installed")
def test_missing_tracker_names_the_extra():
    with pytest.raises(ImportError, match=r'pip install "diffusers-stages\[wandb\]"'):
        check_tracker_installed("wandb")


@pytest.mark.skipif(importlib.util.find_spec("mlflow") is not None, reason="mlflow is installed")
def test_missing_tracker_without_extra_names_the_package():
    with pytest.raises(ImportError, match="pip install mlflow"):
        check_tracker_installed("mlflow")


def test_unknown_tracker_lists_the_accepted_values():
    with pytest.raises(ValueError, match="`report_to` must be 'none', 'all' or one of .*'tensorboard'"):
        check_tracker_installed("tensorbord")
