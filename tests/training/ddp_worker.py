"""Training runs that also save, per rank, the state they end with (for the DDP tests).

    ACCELERATE_USE_CPU=1 torchrun --nproc_per_node 2 tests/training/ddp_worker.py --configs '[{"output_dir": ...}]'

Runs the configs one after the other (one launch: the start-up cost is paid once): a `TrainingConfig`'s fields, or a
`StageLoraConfig`'s with ``"kind": "deme"``, a `TDCConfig`'s with ``"kind": "tdc"`` (no rank file: its phases are trainer
runs). Each writes ``<output_dir>/rank<r>.safetensors``: ``model.*``,
``optim.<i>.<state>`` and ``ema.<i>`` tensors (trainer), ``stage<k>.<i>`` and ``optim<k>.<i>.<state>`` (DeMe).
"""

import argparse
import json
from pathlib import Path

import torch


def _optimizer_state(optimizer, params, prefix: str) -> dict[str, torch.Tensor]:
    return {
        f"{prefix}.{i}.{name}": t.detach().cpu().clone()
        for i, p in enumerate(params)
        for name, t in optimizer.state.get(p, {}).items()
        if torch.is_tensor(t) and t.ndim > 0
    }


def rank_state(run) -> dict[str, torch.Tensor]:
    """A trainer rank's state: model parameters, AdamW moments, EMA weights."""
    model = run.accelerator.unwrap_model(run.unet)
    out = {f"model.{k}": v.detach().cpu().clone() for k, v in model.state_dict().items()}
    out.update(_optimizer_state(run.optimizer, list(model.parameters()), "optim"))
    if run.ema is not None:
        out.update({f"ema.{i}": t.detach().cpu().clone() for i, t in enumerate(run.ema.shadow_params)})
    return out


def deme_rank_state(run) -> dict[str, torch.Tensor]:
    """A DeMe rank's state: every trained stage's adapter and projection weights and AdamW moments."""
    out = {}
    for k, optimizer in zip(run.train_stages, run.optimizers):
        params = run.adapters.parameters(k)
        out.update({f"stage{k}.{i}": p.detach().cpu().clone() for i, p in enumerate(params)})
        out.update(_optimizer_state(optimizer, params, f"optim{k}"))
    return out


def _run(fields: dict) -> None:
    from safetensors.torch import save_file

    kind = fields.pop("kind", "multistage")
    if kind == "tdc":
        from diffusers_stages.tdc import TDCConfig, run_tdc

        run_tdc(TDCConfig(**fields))
        return
    if kind == "deme":
        from diffusers_stages.deme import StageLoraConfig
        from diffusers_stages.deme.training import finish_run, fit_run, setup_run

        run = setup_run(StageLoraConfig(**fields))
        fit_run(run)
        state = deme_rank_state(run)
        finish_run(run)
    else:
        from diffusers_stages.training import TrainingConfig
        from diffusers_stages.training.loop import finish, fit, setup

        run = setup(TrainingConfig(**fields))
        step, seconds = fit(run)
        state = rank_state(run)
        finish(run, step, seconds)
    save_file(state, str(Path(fields["output_dir"]) / f"rank{run.accelerator.process_index}.safetensors"))


def main() -> None:
    from accelerate.state import AcceleratorState

    from diffusers_stages.training.distributed import end_process_group

    parser = argparse.ArgumentParser()
    parser.add_argument("--configs", required=True, help="a JSON list of config fields")
    for fields in json.loads(parser.parse_args().configs):
        _run(fields)
        AcceleratorState._reset_state()  # the next run picks its own mixed precision (the process group stays)
    end_process_group()


if __name__ == "__main__":
    main()
