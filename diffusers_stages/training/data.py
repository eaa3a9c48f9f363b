"""Training data: the image dataset and its transform, a resumable sampler, the collate function, endless batches."""

from __future__ import annotations

import torch

from .config import TrainingConfig


class ShardedBatchSampler(torch.utils.data.Sampler):
    """Batches of one rank: a permutation of ``range(n)`` that depends only on ``(seed, epoch)``, cut into micro-batches
    of ``batch_size x num_replicas`` samples (the incomplete last one dropped), of which rank ``r`` takes
    ``[r batch_size, (r + 1) batch_size)``. Every rank sees a distinct shard of every micro-batch, and the union over
    the ranks is what one process with batch ``batch_size x num_replicas`` sees: resumable, process-count-free order.

    Args:
        n (`int`): Dataset size.
        batch_size (`int`): Samples per rank and micro-batch.
        seed (`int`): Seed of the permutations.
        num_replicas (`int`, defaults to 1): Number of processes.
        rank (`int`, defaults to 0): This process.
    """

    def __init__(self, n: int, batch_size: int, seed: int, num_replicas: int = 1, rank: int = 0):
        if not 0 <= rank < num_replicas:
            raise ValueError(f"`rank` must lie in [0, {num_replicas}), got {rank}.")
        self.n, self.batch_size, self.seed = n, batch_size, seed
        self.num_replicas, self.rank = num_replicas, rank
        self.epoch, self.skip = 0, 0

    def set_epoch(self, epoch: int, skip: int = 0) -> None:
        """Start epoch ``epoch``, leaving out its first ``skip`` micro-batches (exact resume)."""
        self.epoch, self.skip = epoch, skip

    def __iter__(self):
        g = torch.Generator().manual_seed(self.seed * 1_000_003 + self.epoch)
        order = torch.randperm(self.n, generator=g).tolist()
        size = self.batch_size * self.num_replicas
        for i in range(self.skip, len(self)):
            first = i * size + self.rank * self.batch_size
            yield order[first : first + self.batch_size]

    def __len__(self) -> int:
        """Micro-batches per epoch (before ``skip``)."""
        return self.n // (self.batch_size * self.num_replicas)


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


def build_loader(config: TrainingConfig, dataset, num_replicas: int = 1, rank: int = 0):
    """This rank's training loader: ``train_batch_size`` samples per batch, sharded by :class:`ShardedBatchSampler`.

    It is not prepared by accelerate (which would shard it again): batches are moved to the device by the loop.
    """
    global_batch = config.train_batch_size * num_replicas
    if len(dataset) < global_batch:
        raise ValueError(
            f"the dataset has {len(dataset)} images, fewer than `train_batch_size` x processes = {global_batch}."
        )
    return torch.utils.data.DataLoader(
        dataset,
        batch_sampler=ShardedBatchSampler(len(dataset), config.train_batch_size, config.seed, num_replicas, rank),
        collate_fn=collate,
        num_workers=config.dataloader_num_workers,
    )


def iterate_batches(loader, start_micro: int):
    """Batches forever, epoch after epoch, starting ``start_micro`` micro-batches in (exact resume)."""
    per_epoch = len(loader.batch_sampler)
    epoch, skip = divmod(start_micro, per_epoch)
    while True:
        loader.batch_sampler.set_epoch(epoch, skip)
        yield from loader
        epoch, skip = epoch + 1, 0
