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


def _rgb_folder(folder, n=3):
    folder.mkdir()
    for i in range(n):
        Image.new("RGB", (8, 8), (40 * i, 0, 0)).save(folder / f"{i}.png")
    return folder


def test_broken_files_are_named(tmp_path):
    folder = _rgb_folder(tmp_path / "png")
    data = (folder / "1.png").read_bytes()
    (folder / "1.png").write_bytes(data[: len(data) // 2])
    with pytest.raises(ValueError, match=r"cannot read image .*1\.png"):
        load_image_dataset(str(folder), resolution=8)
    folder = _rgb_folder(tmp_path / "meta")
    (folder / "metadata.jsonl").write_text('{"file_name": "0.png", "text": "a"}\n{bad json\n')
    with pytest.raises(ValueError, match="metadata.jsonl"):
        load_image_dataset(str(folder))
    with pytest.raises(ValueError, match="`image_column` 'nope' is not a column"):
        load_image_dataset(str(_rgb_folder(tmp_path / "ok")), image_column="nope")


def test_truncated_mnist_is_named(tmp_path):
    import gzip

    header = (2051).to_bytes(4, "big") + (10).to_bytes(4, "big") + (28).to_bytes(4, "big") * 2
    with gzip.open(tmp_path / "t10k-images-idx3-ubyte.gz", "wb") as f:
        f.write(header + bytes(28 * 28 * 10))
    with gzip.open(tmp_path / "t10k-labels-idx1-ubyte.gz", "wb") as f:
        f.write(bytes(8 + 10))
    assert read_mnist_arrays(tmp_path)[0].shape == (10, 28, 28)
    full = (tmp_path / "t10k-images-idx3-ubyte.gz").read_bytes()
    (tmp_path / "t10k-images-idx3-ubyte.gz").write_bytes(full[: len(full) // 2])
    with pytest.raises(ValueError, match="t10k-images-idx3-ubyte.gz is truncated or corrupt"):
        read_mnist_arrays(tmp_path)


def test_image_channels_of_grayscale_and_rgb_data(tmp_path):
    from diffusers_stages.data import image_channels

    assert image_channels(load_digits_dataset()) == 1
    assert image_channels(load_image_dataset(str(_rgb_folder(tmp_path / "rgb")))) == 3
