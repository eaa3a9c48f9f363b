"""Runs ``train(TrainingConfig(**json))`` with one injected fault (used by test_fault_injection.py in a subprocess).

python fault_driver.py '<config json>' kill_at_write:4 | kill_at_step:5 | disk_full:4 | inf_grad:4 | none
"""

import errno
import json
import os
import signal
import sys

import torch

from diffusers_stages.training import TrainingConfig, checkpointing, loop, train


def make_gradient_infinite(name: str, param: torch.nn.Parameter, step: int, start: int = 0) -> None:
    """A real gradient hook: ``param``'s gradient becomes infinite in backward pass ``step`` (1-based, counted from
    ``start``; one pass per optimisation step without gradient accumulation). The loss stays finite; clipping and
    AdamW then turn the parameter into NaN."""
    backward_passes = [start]

    def hook(grad):
        backward_passes[0] += 1
        return torch.full_like(grad, float("inf")) if backward_passes[0] == step else grad

    param.register_hook(hook)
    print(f"injected: an infinite gradient of {name!r} at step {step}", file=sys.stderr)


def infinite_gradient_at(step: int) -> None:
    """`make_gradient_infinite` on the UNet's first parameter at optimisation step ``step``."""
    original_setup = loop.setup

    def setup(config):
        run = original_setup(config)
        name, param = next(iter(run.accelerator.unwrap_model(run.unet).named_parameters()))
        make_gradient_infinite(name, param, step, start=run.start_step)
        return run

    loop.setup = setup


def inject(fault: str) -> None:
    kind, _, arg = fault.partition(":")
    if kind == "none":
        return
    step = int(arg)
    if kind == "inf_grad":
        return infinite_gradient_at(step)
    if kind == "kill_at_step":  # SIGKILL right after optimisation step `step`, before its logging and checkpoint
        original_log_step = loop.log_step

        def log_step(run, s, *args):
            if s == step:
                os.kill(os.getpid(), signal.SIGKILL)
            original_log_step(run, s, *args)

        loop.log_step = log_step
        return
    original_extra = checkpointing._write_extra_state

    def write_extra_state(tmp, state, ema, warmup):
        if state["step"] == step:
            if kind == "kill_at_write":  # the accelerate state is on disk, train_state.json is not
                os.kill(os.getpid(), signal.SIGKILL)
            raise OSError(errno.ENOSPC, "No space left on device (injected)")
        original_extra(tmp, state, ema, warmup)

    checkpointing._write_extra_state = write_extra_state


if __name__ == "__main__":
    inject(sys.argv[2])
    train(TrainingConfig(**json.loads(sys.argv[1])))
