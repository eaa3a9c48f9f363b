"""A `train` run that also saves, per rank, the model, optimizer state and EMA it ends with (for the DDP tests).

    ACCELERATE_USE_CPU=1 torchrun --nproc_per_node 2 tests/training/ddp_worker.py --configs '[{"output_dir": ...}]'

Runs the configs one after the other (one launch: the start-up cost is paid once). Each writes
``<output_dir>/rank<r>.safetensors`` with ``model.*``, ``optim.<i>.<state>`` and ``ema.<i>`` tensors.
"""

import argparse
import json
from pathlib import Path

import torch


def rank_state(run) -> dict[str, torch.Tensor]:
    """This rank's trained state: model parameters, AdamW moments, EMA weights."""
    model = run.accelerator.unwrap_model(run.unet)
    out = {f"model.{k}": v.detach().cpu().clone() for k, v in model.state_dict().items()}
    for i, p in enumerate(model.parameters()):
        for name, t in run.optimizer.state.get(p, {}).items():
            if torch.is_tensor(t) and t.ndim > 0:
                out[f"optim.{i}.{name}"] = t.detach().cpu().clone()
    if run.ema is not None:
        out.update({f"ema.{i}": t.detach().cpu().clone() for i, t in enumerate(run.ema.shadow_params)})
    return out


def main() -> None:
    from safetensors.torch import save_file

    from diffusers_stages.training import TrainingConfig
    from diffusers_stages.training.distributed import end_process_group
    from diffusers_stages.training.loop import finish, fit, setup

    parser = argparse.ArgumentParser()
    parser.add_argument("--configs", required=True, help="a JSON list of TrainingConfig fields")
    for fields in json.loads(parser.parse_args().configs):
        run = setup(TrainingConfig(**fields))
        step, seconds = fit(run)
        state = rank_state(run)
        save_file(state, str(Path(run.config.output_dir) / f"rank{run.accelerator.process_index}.safetensors"))
        finish(run, step, seconds)
    end_process_group()


if __name__ == "__main__":
    main()
