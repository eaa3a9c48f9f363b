"""Training data: the image dataset and its transform, a resumable sampler, the collate function, endless batches."""

from __future__ import annotations

import torch

from .config import TrainingConfig


class EpochSampler(torch.utils.data.Sampler):
    """A permutation of ``range(n)`` that depends only on ``(seed, epoch)``: resumable data order."""

    def __init__(self, n: int, seed: int):
        self.n, self.seed, self.epoch = n, seed, 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __iter__(self):
        g = torch.Generator().manual_seed(self.seed * 1_000_003 + self.epoch)
        return iter(torch.randperm(self.n, generator=g).tolist())

    def __len__(self) -> int:
        return self.n


def _image_tensor(image, mode: str, resolution: int) -> torch.Tensor:
    """A PIL image -> ``[C, H, W]`` in ``[-1, 1]`` at ``resolution``."""
    import numpy as np
    from PIL import Image

    image = image.convert(mode)
    if image.size != (resolution, resolution):
        image = image.resize((resolution, resolution), Image.BILINEAR)
    arr = np.asarray(image, dtype=np.float32)
    return torch.from_numpy(arr[None] if arr.ndim == 2 else arr.transpose(2, 0, 1)) / 127.5 - 1


def load_training_dataset(config: TrainingConfig, text_to_image: bool = False):
    """The run's `datasets.Dataset` (``image``, and ``text`` for a text-to-image model) at ``resolution``."""
    from ..data import load_image_dataset

    ds = load_image_dataset(
        config.train_data_dir or config.dataset_name,
        resolution=config.resolution,
        image_column=config.image_column,
        caption_column=config.caption_column,
        max_samples=config.max_train_samples,
    )
    if text_to_image and "text" not in ds.column_names:
        raise ValueError("a text-to-image model needs captions: pass `caption_column` or a metadata.jsonl.")
    return ds


def build_dataset(config: TrainingConfig, ds, channels: int, tokenizer=None):
    """``ds`` with a torch transform giving ``pixel_values`` in ``[-1, 1]`` with ``channels`` channels (and
    ``input_ids`` when a ``tokenizer`` is given: text-to-image)."""
    mode = "L" if channels == 1 else "RGB"

    def transform(batch):
        out = {"pixel_values": [_image_tensor(im, mode, config.resolution) for im in batch["image"]]}
        if tokenizer is not None:
            ids = tokenizer(
                list(batch["text"]),
                padding="max_length",
                max_length=tokenizer.model_max_length,
                truncation=True,
                return_tensors="pt",
            ).input_ids
            out["input_ids"] = list(ids)
        return out

    return ds.with_transform(transform)


def collate(examples: list[dict]) -> dict:
    """Stack ``pixel_values`` (and ``input_ids`` when present)."""
    batch = {"pixel_values": torch.stack([e["pixel_values"] for e in examples])}
    if "input_ids" in examples[0]:
        batch["input_ids"] = torch.stack([e["input_ids"] for e in examples])
    return batch


def build_loader(config: TrainingConfig, dataset) -> torch.utils.data.DataLoader:
    """The training loader: full batches in the resumable order of :class:`EpochSampler`."""
    if len(dataset) < config.train_batch_size:
        raise ValueError(
            f"the dataset has {len(dataset)} images, fewer than `train_batch_size` {config.train_batch_size}."
        )
    return torch.utils.data.DataLoader(
        dataset,
        batch_size=config.train_batch_size,
        sampler=EpochSampler(len(dataset), config.seed),
        collate_fn=collate,
        drop_last=True,
        num_workers=config.dataloader_num_workers,
    )


def iterate_batches(accelerator, loader, start_micro: int):
    """Batches forever, epoch after epoch, starting ``start_micro`` micro-batches in (exact resume)."""
    per_epoch = len(loader)
    epoch, skip = divmod(start_micro, per_epoch)
    while True:
        loader.set_epoch(epoch)
        it = accelerator.skip_first_batches(loader, skip) if skip else loader
        yield from it
        epoch, skip = epoch + 1, 0
