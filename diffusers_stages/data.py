"""Datasets for training, clustering and evaluation, all returned as a `datasets.Dataset`.

Sources: the embedded default (scikit-learn's 1,797 labelled 8x8 digits), the MNIST IDX files, and any
`datasets` dataset or local image folder. Every dataset has an ``image`` column (PIL, grayscale or RGB) and,
where the source has one, a ``label`` column.
"""

from __future__ import annotations

import gzip
import io
import os
import zlib
from pathlib import Path
from typing import Union

import numpy as np
import torch
from PIL import Image

MNIST_FILES = {
    "test": ("t10k-images-idx3-ubyte.gz", "t10k-labels-idx1-ubyte.gz"),
    "train": ("train-images-idx3-ubyte.gz", "train-labels-idx1-ubyte.gz"),
}
EMBEDDED_DATASETS = ("digits", "mnist")


def _from_arrays(images: np.ndarray, labels: np.ndarray | None, resolution: int | None):
    import datasets

    pil = [Image.fromarray(img, mode="L") for img in images]
    if resolution is not None:
        pil = [im.resize((resolution, resolution), Image.BILINEAR) for im in pil]
    columns = {"image": pil}
    features = {"image": datasets.Image()}
    if labels is not None:
        columns["label"] = [int(v) for v in labels]
        features["label"] = datasets.ClassLabel(names=[str(c) for c in range(int(labels.max()) + 1)])
    return datasets.Dataset.from_dict(columns, features=datasets.Features(features))


def load_digits_dataset(resolution: int | None = None):
    """scikit-learn's 1,797 labelled 8x8 digits (values 0..16 rescaled to 0..255), resized if asked."""
    from sklearn.datasets import load_digits

    digits = load_digits()
    images = np.round(digits.images * (255.0 / 16.0)).clip(0, 255).astype(np.uint8)
    return _from_arrays(images, digits.target, resolution)


def default_mnist_dir() -> Path:
    """``$DIFFUSERS_STAGES_MNIST``, else ``../shared/data/mnist`` beside the repository or the working directory."""
    env = os.environ.get("DIFFUSERS_STAGES_MNIST")
    if env:
        return Path(env)
    candidates = [
        Path(__file__).resolve().parents[2] / "shared" / "data" / "mnist",
        Path.cwd().parent / "shared" / "data" / "mnist",
        Path.cwd() / "shared" / "data" / "mnist",
    ]
    for c in candidates:
        if (c / MNIST_FILES["test"][0]).exists():
            return c
    return candidates[0]


def read_mnist_arrays(path: Union[str, os.PathLike] | None = None, split: str = "test"):
    """The raw MNIST IDX files as ``(images uint8 [N, 28, 28], labels uint8 [N])``."""
    if split not in MNIST_FILES:
        raise ValueError(f"`split` must be one of {sorted(MNIST_FILES)}, got {split!r}.")
    root = Path(path) if path is not None else default_mnist_dir()
    image_file, label_file = (root / name for name in MNIST_FILES[split])
    if not image_file.exists() or not label_file.exists():
        raise FileNotFoundError(
            f"MNIST {split} files not found in {root} (expected {image_file.name} and {label_file.name}); "
            "pass the folder that holds them or set $DIFFUSERS_STAGES_MNIST."
        )
    raw = _read_gzip(image_file)
    if len(raw) < 16 or int.from_bytes(raw[:4], "big") != 2051:
        raise ValueError(f"{image_file} is not an IDX image file (bad magic number).")
    n, h, w = (int.from_bytes(raw[4 * i : 4 * i + 4], "big") for i in (1, 2, 3))
    if len(raw) != 16 + n * h * w:
        raise ValueError(f"{image_file} is truncated or corrupt: {len(raw) - 16} pixel bytes for {n} x {h} x {w}.")
    images = np.frombuffer(raw, np.uint8, offset=16).reshape(n, h, w)
    labels = np.frombuffer(_read_gzip(label_file), np.uint8, offset=8)
    if len(labels) != n:
        raise ValueError(f"MNIST image and label counts differ: {n} vs {len(labels)} ({label_file}).")
    return images, labels


def _read_gzip(path: Path) -> bytes:
    """The decompressed bytes of ``path``; a truncated or corrupt archive raises a `ValueError` naming it."""
    try:
        with gzip.open(path) as f:
            return f.read()
    except (OSError, EOFError, zlib.error) as e:
        raise ValueError(f"{path} is truncated or corrupt: {e}") from e


def load_mnist_dataset(
    path: Union[str, os.PathLike] | None = None,
    split: str = "test",
    resolution: int | None = None,
    max_samples: int | None = None,
):
    """MNIST from its IDX files (default ``../shared/data/mnist``, the 10,000-image test set)."""
    images, labels = read_mnist_arrays(path, split)
    if max_samples is not None:
        images, labels = images[:max_samples], labels[:max_samples]
    return _from_arrays(images, labels, resolution)


def load_image_dataset(
    name_or_path: str = "digits",
    split: str = "train",
    resolution: int | None = None,
    image_column: str | None = None,
    label_column: str | None = None,
    caption_column: str | None = None,
    max_samples: int | None = None,
    cache_dir: str | None = None,
):
    """
    One entry point for every source. ``name_or_path`` is ``"digits"`` (the embedded default), ``"mnist"`` (the
    shared MNIST test set), a folder of MNIST IDX files, a local image folder (``imagefolder``, with an optional
    ``metadata.jsonl`` for captions), or a `datasets` Hub name. Columns are renamed to ``image``, ``label`` and
    ``text``; images are resized to ``resolution`` when given.
    """
    if name_or_path == "digits":
        ds = load_digits_dataset(resolution)
    elif name_or_path == "mnist" or (
        os.path.isdir(name_or_path) and (Path(name_or_path) / MNIST_FILES["test"][0]).exists()
    ):
        root = default_mnist_dir() if name_or_path == "mnist" else Path(name_or_path)
        # the shared copy holds only the 10,000-image test set: any other split falls back to it
        has_split = split in MNIST_FILES and (root / MNIST_FILES[split][0]).exists()
        ds = load_mnist_dataset(root, split if has_split else "test", resolution)
    else:
        loaded = _load_datasets_source(name_or_path, cache_dir)
        if split not in loaded:
            raise ValueError(f"split {split!r} not found in {name_or_path}; available: {sorted(loaded)}.")
        ds = _normalise_columns(loaded[split], image_column, label_column, caption_column)
        ds = _decoded_images(_first(ds, max_samples), resolution)
    ds = _first(ds, max_samples)
    if len(ds) == 0:
        raise ValueError(f"dataset {name_or_path!r} (split {split!r}) is empty.")
    return ds


def _first(ds, n: int | None):
    """The first ``n`` rows of ``ds`` (all when ``n`` is ``None``)."""
    return ds if n is None else ds.select(range(min(n, len(ds))))


def _load_datasets_source(name_or_path: str, cache_dir: str | None):
    """``datasets.load_dataset`` of a local image folder (errors name the folder and its ``metadata.jsonl``) or a
    Hub dataset."""
    import datasets

    if not os.path.isdir(name_or_path):
        return datasets.load_dataset(name_or_path, cache_dir=cache_dir)
    try:
        return datasets.load_dataset("imagefolder", data_dir=name_or_path, cache_dir=cache_dir)
    except Exception as e:  # noqa: BLE001 - datasets raises arrow / generation errors that name no file
        raise ValueError(
            f"cannot load the image folder {name_or_path} (check its images and metadata.jsonl): {e}"
        ) from e


def _open_image(item: dict, resolution: int | None) -> Image.Image:
    """A dataset image stored as ``{"bytes", "path"}`` fully decoded (and resized); errors name the file."""
    try:
        image = Image.open(io.BytesIO(item["bytes"]) if item.get("bytes") else item["path"])
        image.load()
    except (OSError, SyntaxError, ValueError) as e:
        raise ValueError(f"cannot read image {item.get('path') or '<bytes>'}: {e}") from e
    if resolution is not None:
        image = image.resize((resolution, resolution), Image.BICUBIC)
    return image


def _decoded_images(ds, resolution: int | None):
    """Decode every image now (a truncated or corrupt file fails here, named, before any compute), resized to
    ``resolution`` when given."""
    import datasets

    ds = ds.cast_column("image", datasets.Image(decode=False))
    ds = ds.map(lambda ex: {"image": _open_image(ex["image"], resolution)})
    return ds.cast_column("image", datasets.Image())


def image_channels(ds, num_checked: int = 64) -> int:
    """1 when the first ``num_checked`` images of ``ds`` are all grayscale (PIL modes ``1``, ``L``, ``I``, ``F``,
    ...), else 3 (RGB)."""
    grayscale = {"1", "L", "LA", "I", "I;16", "F"}
    modes = {im.mode for im in ds.select(range(min(num_checked, len(ds))))["image"]}
    return 1 if modes <= grayscale else 3


def _normalise_columns(ds, image_column, label_column, caption_column):
    names = ds.column_names
    if image_column is not None and image_column not in names:
        raise ValueError(f"`image_column` {image_column!r} is not a column of the dataset (columns: {names}).")
    image_column = image_column or next((c for c in ("image", "img", "pixel_values") if c in names), None)
    if image_column is None:
        raise ValueError(f"no image column found (columns: {names}); pass `image_column`.")
    renames = {image_column: "image"}
    label_column = label_column or ("label" if "label" in names else ("labels" if "labels" in names else None))
    if label_column is not None:
        if label_column not in names:
            raise ValueError(f"`label_column` {label_column!r} not in {names}.")
        renames[label_column] = "label"
    caption_column = caption_column or next((c for c in ("text", "caption", "prompt") if c in names), None)
    if caption_column is not None:
        if caption_column not in names:
            raise ValueError(f"`caption_column` {caption_column!r} not in {names}.")
        renames[caption_column] = "text"
    return ds.rename_columns({k: v for k, v in renames.items() if k != v})


def dataset_to_tensor(ds, resolution: int | None = None, channels: int | None = None) -> torch.Tensor:
    """
    All images of a dataset as one float tensor ``[N, C, H, W]`` in ``[-1, 1]`` (the diffusers convention).
    Images must all have one size unless ``resolution`` is given; ``channels`` forces 1 (L) or 3 (RGB).
    """
    if len(ds) == 0:
        raise ValueError("the dataset is empty.")
    mode = {None: None, 1: "L", 3: "RGB"}[channels]
    arrays = []
    for im in ds["image"]:
        if mode is not None and im.mode != mode:
            im = im.convert(mode)
        if resolution is not None and im.size != (resolution, resolution):
            im = im.resize((resolution, resolution), Image.BILINEAR)
        arr = np.asarray(im, dtype=np.float32)
        arrays.append(arr[None] if arr.ndim == 2 else arr.transpose(2, 0, 1))
    shapes = {a.shape for a in arrays}
    if len(shapes) > 1:
        raise ValueError(f"images have mixed sizes {sorted(shapes)}; pass `resolution` to resize them.")
    return torch.from_numpy(np.stack(arrays)) / 127.5 - 1.0


def tensor_to_pil(images: torch.Tensor) -> list:
    """``[N, C, H, W]`` in ``[-1, 1]`` to a list of PIL images."""
    arr = ((images.detach().float().clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8).cpu().numpy()
    return [Image.fromarray(a[0], "L") if a.shape[0] == 1 else Image.fromarray(a.transpose(1, 2, 0)) for a in arr]
