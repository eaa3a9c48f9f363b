"""DeMe's inputs: the base's training scheduler, and the generators of the micro-batches, keyed by (seed, stage, step,
micro) and the global sample index."""

import pytest
import torch
from diffusers import DDPMScheduler

from diffusers_stages.deme.inputs import load_training_scheduler, micro_batch_generators
from diffusers_stages.schedulers import FDMDDIMScheduler, FDMDPMSolverMultistepScheduler
from diffusers_stages.training.components import objective_for_scheduler


def _seeds(processes: int, accumulation: int, batch: int, steps: int = 3, stages: int = 2):
    """``{(stage, step, micro): shared seed}`` (checked equal on every process) and every per-sample seed."""
    shared, per_sample = {}, []
    for stage in range(stages):
        for step in range(steps):
            for micro in range(accumulation):
                for r in range(processes):
                    g, gens = micro_batch_generators(0, stage, step, micro, slice(r * batch, (r + 1) * batch))
                    assert shared.setdefault((stage, step, micro), g.initial_seed()) == g.initial_seed()
                    per_sample += [s.initial_seed() for s in gens]
    return shared, per_sample


def test_seeds_are_unique_for_any_processes_accumulation_and_step():
    """The old seed ``(... + step) * 101 + micro x N + rank`` repeated step ``s + 1``'s first micro-batch in step
    ``s`` as soon as ``N x gradient_accumulation_steps >= 101`` (here 4 x 32 = 128)."""
    shared, per_sample = _seeds(processes=4, accumulation=32, batch=2)
    assert len(set(shared.values())) == len(shared) == 2 * 3 * 32
    assert len(set(per_sample)) == len(per_sample) == 2 * 3 * 32 * 4 * 2


def test_a_sample_draws_the_same_under_any_number_of_processes():
    """Two processes of batch 2 hold the per-sample generators of one process of batch 4, in order."""
    _, two = _seeds(processes=2, accumulation=2, batch=2)
    _, one = _seeds(processes=1, accumulation=2, batch=4)
    assert two == one


@pytest.mark.parametrize("cls", [FDMDDIMScheduler, FDMDPMSolverMultistepScheduler])
def test_a_discrete_fdm_base_is_finetuned_on_its_own_kernel(tmp_path, cls):
    """A discrete-FDM pipeline's state is ``s_t (x0 + sigma_t eps)``, not DDPM's ``sqrt(abar) x0 + sqrt(1 - abar)
    eps``: DeMe once read its scheduler config as a `DDPMScheduler` and finetuned it on the wrong inputs."""
    cls().save_pretrained(tmp_path / "scheduler")
    scheduler = load_training_scheduler(str(tmp_path))
    assert type(scheduler) is cls and scheduler.config.input_scaling == "fdm"
    x0, noise, t = torch.ones(2, 1, 4, 4), torch.randn(2, 1, 4, 4), torch.tensor([500, 999])
    objective = objective_for_scheduler(scheduler)
    fdm_state = cls().add_noise(x0, noise, t)
    torch.testing.assert_close(objective.scheduler.add_noise(x0, noise, t), fdm_state)
    assert not torch.allclose(DDPMScheduler().add_noise(x0, noise, t), fdm_state, atol=1e-2)
