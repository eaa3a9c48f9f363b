"""Runs ``train(TrainingConfig(**json))`` with one injected fault (used by test_fault_injection.py in a subprocess).

python fault_driver.py '<config json>' kill_at_write:4 | kill_at_step:5 | disk_full:4 | none
"""

import errno
import json
import os
import signal
import sys

from diffusers_stages.training import TrainingConfig, checkpointing, loop, train


def inject(fault: str) -> None:
    kind, _, arg = fault.partition(":")
    if kind == "none":
        return
    step = int(arg)
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
