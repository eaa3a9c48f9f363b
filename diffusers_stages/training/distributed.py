"""Multiple processes: the accelerator with its DDP options and checks, and training noise keyed by the global sample.

A global batch is ``train_batch_size x num_processes x gradient_accumulation_steps`` samples. Micro-batch ``i`` is
``train_batch_size x num_processes`` samples, of which rank ``r`` holds ``[r B, (r + 1) B)``; every random number a
sample needs (its VAE latent sample, its noise) comes from a generator seeded by ``(seed, i, global index)``, and the
noise levels of micro-batch ``i`` are drawn for all its samples from a generator seeded by ``(seed, i)`` that every
rank shares. So ``N`` processes with batch ``B`` train exactly what one process with batch ``N B`` trains. DeMe keys
its micro-batches by ``(seed, stage, step, micro)`` (`key_seed`) and uses the same per-sample generators.
"""

from __future__ import annotations

import os

import numpy as np
import torch

_SEED_MOD = 2**63 - 1


def micro_seed(seed: int, micro: int) -> int:
    """The seed shared by every rank for micro-batch ``micro``: ``(seed * 1_000_003 + micro) mod (2^63 - 1)``."""
    return (seed * 1_000_003 + micro) % _SEED_MOD


def key_seed(*key: int) -> int:
    """The seed of a tuple of non-negative integers, e.g. ``(seed, stage, step, micro)``: numpy's ``SeedSequence``
    hash of ``(len(key), *key)``, reduced mod ``2^63 - 1``.

    Distinct keys get distinct seeds up to a 63-bit hash collision (about ``n^2 / 2^64`` among ``n`` keys), for any
    size of each entry; linear arithmetic such as ``a * 101 + b`` collides as soon as ``b >= 101``. The length prefix
    keeps ``(1, 2)`` and ``(1, 2, 0)`` apart (``SeedSequence`` pads its entropy with zeros).

    Raises:
        ValueError: An entry of ``key`` is negative.
    """
    if any(int(k) < 0 for k in key):
        raise ValueError(f"`key` entries must be non-negative integers, got {key}.")
    words = np.random.SeedSequence([len(key), *(int(k) for k in key)]).generate_state(1, np.uint64)
    return int(words[0]) % _SEED_MOD


def sample_generators(shared_seed: int, start: int, count: int) -> list[torch.Generator]:
    """One CPU generator per sample ``start, ..., start + count - 1`` (global indices) of the micro-batch whose
    shared generator is seeded by ``shared_seed`` (`micro_seed` in the trainer, `key_seed` in DeMe).

    The seed of sample ``j`` is ``(shared_seed * 1_000_033 + j + 1) mod (2^63 - 1)``; pass the list to diffusers'
    ``randn_tensor`` (one generator per batch entry).
    """
    base = shared_seed * 1_000_033
    return [torch.Generator().manual_seed((base + j + 1) % _SEED_MOD) for j in range(start, start + count)]


def make_accelerator(
    gradient_accumulation_steps: int,
    mixed_precision: str | None,
    log_with: str | None,
    project_config,
    find_unused_parameters: bool = False,
):
    """An `accelerate.Accelerator` for these trainers, checked by :func:`check_process_group`.

    Args:
        find_unused_parameters (`bool`, defaults to `False`): DDP's option, needed by models whose parameters do not
            all receive a gradient every step (multi-decoder UNets: the decoders of stages absent from a batch).
    """
    from accelerate import Accelerator
    from accelerate.utils import DistributedDataParallelKwargs

    accelerator = Accelerator(
        gradient_accumulation_steps=gradient_accumulation_steps,
        mixed_precision=mixed_precision,
        log_with=log_with,
        project_config=project_config,
        kwargs_handlers=[DistributedDataParallelKwargs(find_unused_parameters=find_unused_parameters)],
    )
    check_process_group(accelerator)
    return accelerator


def check_process_group(accelerator) -> None:
    """Refuse launches these trainers cannot run correctly.

    Raises:
        ValueError: ``torchrun`` started several processes (``WORLD_SIZE > 1``) but accelerate formed no process
            group (on a machine without GPUs unless ``ACCELERATE_USE_CPU=1``): they would train independent replicas
            racing on the same output folder. Or the launch asks for FSDP / DeepSpeed, which these trainers do not
            support (they rely on DDP's full replicas for EMA, checkpoints and validation).
    """
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world > 1 and accelerator.num_processes == 1:
        raise ValueError(
            f"WORLD_SIZE={world} processes were launched but accelerate sees a single process (no process group), "
            "so each would train its own replica into the same output folder. On CPU set ACCELERATE_USE_CPU=1 "
            "(`ACCELERATE_USE_CPU=1 torchrun --nproc_per_node N ...`); on GPUs use `accelerate launch` or torchrun "
            "with one GPU per process."
        )
    kind = str(accelerator.distributed_type).rsplit(".", 1)[-1]
    if kind in ("FSDP", "DEEPSPEED", "MEGATRON_LM"):
        raise ValueError(
            f"distributed_type {kind} is not supported by the diffusers-stages trainers: use multi-GPU DDP "
            "(`accelerate config` -> multi-GPU, no FSDP / DeepSpeed) or a single process."
        )


def rank_slice(accelerator, batch_size: int) -> slice:
    """Rank ``r``'s samples ``[r B, (r + 1) B)`` inside a micro-batch of ``B x num_processes`` samples."""
    start = accelerator.process_index * batch_size
    return slice(start, start + batch_size)


def average_gradients(accelerator, params: list[torch.nn.Parameter]) -> None:
    """Replace each gradient of ``params`` by its mean over the processes (one all-reduce of the concatenation).

    For models not wrapped in DDP, where every process knows which parameters the step used (DeMe: one stage's
    adapter); parameters without a gradient are left alone (the same ones on every process).
    """
    with_grad = [p for p in params if p.grad is not None]
    if accelerator.num_processes == 1 or not with_grad:
        return
    flat = accelerator.reduce(torch.cat([p.grad.flatten() for p in with_grad]), reduction="mean")
    for p, g in zip(with_grad, flat.split([p.numel() for p in with_grad])):
        p.grad.copy_(g.view_as(p.grad))


def end_process_group() -> None:
    """Destroy the process group, if any (the end of a script: several runs may share one group before it)."""
    from accelerate import PartialState

    PartialState().destroy_process_group()
