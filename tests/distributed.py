"""Launch a script under a real 2-process gloo group (``ACCELERATE_USE_CPU=1 torchrun``) and compare what ranks saved.

Usage in a test::

    from tests.distributed import launch, load_rank_states
    launch(["tests/training/ddp_worker.py", "--config", json.dumps(fields)], nproc=2)
"""

from __future__ import annotations

import os
import socket
import subprocess
import sys
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[1]


def free_port() -> int:
    """A TCP port nobody listens on right now."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def launch(args: list[str], nproc: int = 2, timeout: float = 240, use_cpu: bool = True, check: bool = True):
    """Run ``torchrun --nproc_per_node nproc --master_port <free> *args`` from the repository root.

    Args:
        args (`list[str]`): The script and its arguments.
        nproc (`int`, defaults to 2): Processes (CPU, one thread each).
        timeout (`float`, defaults to 240): Seconds before the whole group is killed and the test fails.
        use_cpu (`bool`, defaults to `True`): Set ``ACCELERATE_USE_CPU=1`` (a real gloo process group on CPU).
        check (`bool`, defaults to `True`): Fail (``AssertionError`` with every rank's output) unless all ranks exit 0.

    Returns:
        `subprocess.CompletedProcess` with the combined output of all ranks.
    """
    env = {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1"}
    env["HF_DATASETS_OFFLINE"] = "1"
    env.pop("ACCELERATE_USE_CPU", None)
    if use_cpu:
        env["ACCELERATE_USE_CPU"] = "1"
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", str(nproc)]
    cmd += ["--master_addr", "127.0.0.1", "--master_port", str(free_port()), *args]
    try:
        proc = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=timeout)
    except subprocess.TimeoutExpired as e:
        raise AssertionError(f"torchrun timed out after {timeout} s:\n{e.stdout}\n{e.stderr}") from e
    if check and proc.returncode != 0:
        raise AssertionError(f"torchrun exited {proc.returncode}:\n{proc.stdout[-6000:]}\n{proc.stderr[-8000:]}")
    return proc


def load_rank_states(folder: Path) -> list[dict[str, torch.Tensor]]:
    """The ``rank<r>.safetensors`` files a worker wrote, rank 0 first."""
    from safetensors.torch import load_file

    files = sorted(Path(folder).glob("rank*.safetensors"), key=lambda p: int(p.stem[4:]))
    return [load_file(str(f)) for f in files]


def assert_states_close(a: dict, b: dict, atol: float = 1e-7, rtol: float = 1e-6) -> None:
    """Same tensor names and values to float tolerance."""
    assert a.keys() == b.keys() and a, (sorted(a)[:5], sorted(b)[:5])
    for k in a:
        torch.testing.assert_close(a[k], b[k], atol=atol, rtol=rtol, msg=lambda m, k=k: f"{k}: {m}")


def assert_same_training(a: dict, b: dict, max_diff: float = 5e-4, tol: float = 1e-5, outliers: float = 1e-3) -> None:
    """Two runs trained the same: every value within ``max_diff`` (half an Adam step at lr 1e-3) and at most a
    fraction ``outliers`` of all values further apart than ``tol``.

    Adam divides by ``sqrt(v)``: a summation-order difference of a near-zero gradient (2 x B vs 1 x 2B) can move a
    single value by ~lr; a mismatched sample, noise or level moves nearly every value.
    """
    assert a.keys() == b.keys() and a, (sorted(a)[:5], sorted(b)[:5])
    far = total = 0
    for k in a:
        diff = (a[k].double() - b[k].double()).abs()
        assert diff.max() <= max_diff, f"{k}: max difference {diff.max():.3g} > {max_diff}"
        far, total = far + int((diff > tol).sum()), total + diff.numel()
    assert far <= outliers * total, f"{far} of {total} values differ by more than {tol}"
