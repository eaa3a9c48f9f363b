"""Runs ``train_stage_lora(StageLoraConfig(**json))`` with one injected fault (used by test_robustness.py).

python lora_fault_driver.py '<config json>' kill_at_write:4 | kill_at_step:3 | none
"""

import json
import os
import signal
import sys

from diffusers_stages.deme import training
from diffusers_stages.deme.config import StageLoraConfig
from diffusers_stages.training import checkpointing


def inject(fault: str) -> None:
    kind, _, arg = fault.partition(":")
    if kind == "kill_at_write":  # the checkpoint is complete in its temporary folder, not yet renamed
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
