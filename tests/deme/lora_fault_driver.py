"""Runs ``train_stage_lora(StageLoraConfig(**json))`` with one injected fault (used by test_robustness.py).

python lora_fault_driver.py '<config json>' kill_at_write:4 | kill_at_step:3 | disk_full:4 | inf_grad:4 | none
"""

import errno
import json
import os
import signal
import sys

from diffusers_stages.deme import training
from diffusers_stages.deme.adapters import StageLoraAdapters
from diffusers_stages.deme.config import StageLoraConfig
from diffusers_stages.training import checkpointing

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "training"))
from fault_driver import make_gradient_infinite  # noqa: E402


def infinite_gradient_at(step: int) -> None:
    """`make_gradient_infinite` on the first weight of the first trained stage at (1-based) step ``step`` (a fresh
    run, no gradient accumulation)."""
    original_setup = training.setup_run

    def setup_run(config):
        run = original_setup(config)
        make_gradient_infinite(*run.adapters.named_parameters(run.train_stages[0])[0], step)
        return run

    training.setup_run = setup_run


def disk_full_at(step: int) -> None:
    """Writing the adapters of ``checkpoint-{step}`` (inside accelerate's ``save_state``) fails with ENOSPC."""
    save = StageLoraAdapters.save_pretrained

    def save_pretrained(self, folder, *args, **kwargs):
        if f".checkpoint-{step}.tmp" in str(folder):
            raise OSError(errno.ENOSPC, "No space left on device (injected)")
        return save(self, folder, *args, **kwargs)

    StageLoraAdapters.save_pretrained = save_pretrained


def inject(fault: str) -> None:
    kind, _, arg = fault.partition(":")
    if kind == "inf_grad":
        infinite_gradient_at(int(arg))
    elif kind == "disk_full":
        disk_full_at(int(arg))
    elif kind == "kill_at_write":  # the checkpoint is complete in its temporary folder, not yet renamed
        publish = checkpointing._publish

        def killing_publish(tmp, path):
            if path.name == f"checkpoint-{arg}":
                os.kill(os.getpid(), signal.SIGKILL)
            publish(tmp, path)

        checkpointing._publish = killing_publish
    elif kind == "kill_at_step":  # SIGKILL at the start of (0-based) step `arg`
        step_fn = training.train_stage_step

        def killing_step(run, stage, step, *args):
            if step == int(arg):
                os.kill(os.getpid(), signal.SIGKILL)
            return step_fn(run, stage, step, *args)

        training.train_stage_step = killing_step


if __name__ == "__main__":
    inject(sys.argv[2])
    training.train_stage_lora(StageLoraConfig(**json.loads(sys.argv[1])))
