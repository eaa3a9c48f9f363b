import numpy as np
import pytest
import torch
from diffusers import DDPMPipeline, DDPMScheduler, DiffusionPipeline

from diffusers_stages.schedulers import FDMDDIMScheduler, FDMDPMSolverMultistepScheduler, FDMEDMScheduler
from diffusers_stages.testing import tiny_stable_diffusion_pipeline, tiny_unet_2d


def record_unet_calls(unet):
    calls = []
    unet.register_forward_pre_hook(lambda module, args, kwargs: calls.append((args, kwargs)), with_kwargs=True)
    return calls


@pytest.mark.parametrize("cls", [FDMDDIMScheduler, FDMDPMSolverMultistepScheduler])
def test_swapped_into_stable_diffusion_and_reloaded(cls, tmp_path):
    pipe = tiny_stable_diffusion_pipeline()
    pipe.scheduler = cls.from_config(pipe.scheduler.config)
    assert pipe.scheduler.config.beta_schedule == "scaled_linear" and pipe.scheduler.config.steps_offset == 1
    calls = record_unet_calls(pipe.unet)
    kwargs = dict(num_inference_steps=2, output_type="np", guidance_scale=2.0)
    images = pipe("a cat", generator=torch.Generator().manual_seed(0), **kwargs).images
    assert images.shape == (1, 64, 64, 3) and np.isfinite(images).all() and images.std() > 0
    assert [int(c[0][1]) for c in calls] == pipe.scheduler.timesteps.tolist()
    first_input = calls[0][0][0]
    assert first_input.std().item() == pytest.approx(pipe.scheduler.init_noise_sigma, rel=0.1)
    pipe.save_pretrained(tmp_path)
    loaded = DiffusionPipeline.from_pretrained(tmp_path)
    loaded.set_progress_bar_config(disable=True)
    assert type(loaded.scheduler) is cls
    again = loaded("a cat", generator=torch.Generator().manual_seed(0), **kwargs).images
    np.testing.assert_allclose(again, images, atol=1e-5)


def test_sigma_space_scheduler_in_stable_diffusion_heun_calls():
    pipe = tiny_stable_diffusion_pipeline()
    pipe.scheduler = FDMEDMScheduler(sigma_max=14.6, sigma_min=0.03, sigma_data=1.0)
    calls = record_unet_calls(pipe.unet)
    images = pipe("a cat", num_inference_steps=2, output_type="np", generator=torch.Generator().manual_seed(0)).images
    assert images.shape == (1, 64, 64, 3) and np.isfinite(images).all()
    assert len(calls) == 3  # Heun: 2 N - 1 model calls
    assert pipe.scheduler.state_in_first_order


@pytest.mark.parametrize("cls", [FDMDDIMScheduler, FDMDPMSolverMultistepScheduler])
def test_swapped_into_ddpm_pipeline_and_reloaded(cls, tmp_path):
    pipe = DDPMPipeline(unet=tiny_unet_2d(), scheduler=DDPMScheduler(num_train_timesteps=1000))
    pipe.set_progress_bar_config(disable=True)
    pipe.scheduler = cls.from_config(pipe.scheduler.config, timestep_spacing="trailing")
    calls = record_unet_calls(pipe.unet)
    out = pipe(batch_size=2, num_inference_steps=4, output_type="np", generator=torch.Generator().manual_seed(0))
    assert out.images.shape == (2, 8, 8, 1) and np.isfinite(out.images).all()
    assert len(calls) == 4
    # DDPMPipeline starts from N(0, I) and never calls scale_model_input: right only because the FDM state at the
    # first timestep of this grid is unit-scale (checked after set_timesteps, i.e. for the grid actually used)
    assert pipe.scheduler.init_noise_sigma == pytest.approx(1.0, abs=1e-3)
    pipe.save_pretrained(tmp_path)
    loaded = DiffusionPipeline.from_pretrained(tmp_path)
    loaded.set_progress_bar_config(disable=True)
    assert type(loaded.scheduler) is cls
    again = loaded(batch_size=2, num_inference_steps=4, output_type="np", generator=torch.Generator().manual_seed(0))
    np.testing.assert_allclose(again.images, out.images, atol=1e-4)  # float32 run-to-run, some CPUs


@pytest.mark.parametrize("cls", [FDMDDIMScheduler, FDMDPMSolverMultistepScheduler, FDMEDMScheduler])
def test_ddpm_pipeline_refuses_what_it_cannot_serve(cls):
    """Leading spacing (FDM state std 5 to 43 at the first timestep) and sigma-space schedulers: a clear error."""
    pipe = DDPMPipeline(unet=tiny_unet_2d(), scheduler=cls())
    pipe.set_progress_bar_config(disable=True)
    if cls is not FDMEDMScheduler:
        pipe.scheduler = cls(timestep_spacing="leading")
    with pytest.raises(ValueError, match="scale_model_input"):
        pipe(batch_size=1, num_inference_steps=4, output_type="np")


def test_training_step_uses_add_noise_as_the_unet_input():
    """One training step in the documented form: unet(add_noise(x0, eps, t), t) regressed on eps."""
    unet, sched = tiny_unet_2d(), FDMDDIMScheduler()
    opt = torch.optim.Adam(unet.parameters(), lr=1e-3)
    gen = torch.Generator().manual_seed(0)
    x0, eps = torch.rand(4, 1, 8, 8, generator=gen) * 2 - 1, torch.randn(4, 1, 8, 8, generator=gen)
    t = torch.tensor([0, 300, 700, 999])
    loss = torch.nn.functional.mse_loss(unet(sched.add_noise(x0, eps, t), t).sample, eps)
    loss.backward()
    opt.step()
    assert torch.isfinite(loss) and any(p.grad is not None and p.grad.abs().sum() > 0 for p in unet.parameters())
