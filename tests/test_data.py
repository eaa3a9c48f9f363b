import numpy as np
import pytest
import torch
from PIL import Image

from diffusers_stages import dataset_to_tensor, load_digits_dataset, load_image_dataset, load_mnist_dataset
from diffusers_stages.data import read_mnist_arrays, tensor_to_pil


def test_digits_default_dataset():
    ds = load_digits_dataset()
    assert len(ds) == 1797 and set(ds.column_names) == {"image", "label"}
    assert ds[0]["image"].size == (8, 8) and ds.features["label"].num_classes == 10
    x = dataset_to_tensor(load_digits_dataset(resolution=16))
    assert x.shape == (1797, 1, 16, 16) and x.min() >= -1 and x.max() <= 1 and x.max() > 0.9


def test_mnist_files_match_published_counts():
    images, labels = read_mnist_arrays()
    assert images.shape == (10000, 28, 28) and images.dtype == np.uint8
    assert np.bincount(labels).tolist() == [980, 1135, 1032, 1010, 982, 892, 958, 1028, 974, 1009]


def test_mnist_dataset_and_loader_dispatch():
    ds = load_mnist_dataset(resolution=16, max_samples=50)
    assert len(ds) == 50 and ds[0]["image"].size == (16, 16)
    same = load_image_dataset("mnist", resolution=16, max_samples=50)
    assert same["label"] == ds["label"]
    assert torch.equal(dataset_to_tensor(same), dataset_to_tensor(ds))


def test_image_folder_with_captions(tmp_path):
    for i in range(3):
        Image.fromarray(np.full((10, 10, 3), 40 * i, np.uint8)).save(tmp_path / f"{i}.png")
    (tmp_path / "metadata.jsonl").write_text(
        "\n".join(f'{{"file_name": "{i}.png", "caption": "shade {i}"}}' for i in range(3)) + "\n"
    )
    ds = load_image_dataset(str(tmp_path), resolution=8)
    assert len(ds) == 3 and "text" in ds.column_names and ds[0]["image"].size == (8, 8)
    assert sorted(ds["text"]) == ["shade 0", "shade 1", "shade 2"]
    assert dataset_to_tensor(ds, channels=1).shape == (3, 1, 8, 8)


def test_tensor_pil_round_trip():
    x = dataset_to_tensor(load_digits_dataset().select(range(4)))
    assert torch.allclose(dataset_to_tensor_from_pil(tensor_to_pil(x)), x, atol=1 / 127.5)


def dataset_to_tensor_from_pil(images):
    import datasets

    return dataset_to_tensor(
        datasets.Dataset.from_dict({"image": images}, features=datasets.Features({"image": datasets.Image()}))
    )


def test_errors(tmp_path):
    with pytest.raises(FileNotFoundError, match="MNIST"):
        read_mnist_arrays(tmp_path)
    with pytest.raises(ValueError, match="split"):
        read_mnist_arrays(split="validation")
    mixed = [Image.new("L", (8, 8)), Image.new("L", (9, 9))]
    with pytest.raises(ValueError, match="mixed sizes"):
        dataset_to_tensor_from_pil(mixed)
    with pytest.raises(ValueError, match="empty"):
        load_image_dataset("digits", max_samples=0)
