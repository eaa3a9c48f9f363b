import math

import pytest
import torch
from diffusers import (
    DDIMScheduler,
    DDPMScheduler,
    DPMSolverMultistepScheduler,
    EulerDiscreteScheduler,
    PNDMScheduler,
)

from diffusers_stages.schedulers import FDMDDIMScheduler, FDMDPMSolverMultistepScheduler, FDMSchedulerOutput

from .reference import gaussian_denoiser, gaussian_error, s_reference

CLASSES = [FDMDDIMScheduler, FDMDPMSolverMultistepScheduler]
DIFFUSERS_TWIN = {
    FDMDDIMScheduler: lambda **kw: DDIMScheduler(clip_sample=False, **kw),
    FDMDPMSolverMultistepScheduler: lambda **kw: DPMSolverMultistepScheduler(
        algorithm_type="dpmsolver++", solver_order=2, final_sigmas_type="zero", **kw
    ),
}
STEPS = {FDMDDIMScheduler: 50, FDMDPMSolverMultistepScheduler: 20}  # first- vs second-order solver
MU, COV = torch.tensor([0.6, -0.4], dtype=torch.float64), torch.tensor([[0.3, 0.1], [0.1, 0.2]], dtype=torch.float64)


def abar_reference(t, beta_start=0.0001, beta_end=0.02, T=1000):
    return float(torch.cumprod(1 - torch.linspace(beta_start, beta_end, T, dtype=torch.float64), 0)[t])


def oracle_model(scheduler, prediction_type="epsilon"):
    """
    The exact network for Gaussian data, written from the definitions: the input at t is y = scale_t (x0 + sigma_t eps)
    (scale_t = s(sigma_t) for FDM, sqrt(abar_t) for DDPM); the eps / v targets are DDPM's.
    """
    denoise = gaussian_denoiser(MU, COV)
    fdm = scheduler.config.input_scaling == "fdm"
    lo, hi = scheduler.process.sigma_min, scheduler.process.sigma_max

    def model(y, t):
        abar = abar_reference(int(t))
        sigma = math.sqrt((1 - abar) / abar)
        scale = s_reference(sigma, 2.0, lo, hi) if fdm else math.sqrt(abar)
        z = y.double() / scale
        d = denoise(z, sigma)
        eps = (z - d) / sigma
        out = eps if prediction_type == "epsilon" else math.sqrt(abar) * eps - math.sqrt(1 - abar) * d
        return out.to(y.dtype)

    return model


def run_loop(scheduler, model, y, record=None):
    """The DDPMPipeline loop: the state is fed to the model as is."""
    for t in scheduler.timesteps:
        if record is not None:
            record[int(t)] = y
        y = scheduler.step(model(scheduler.scale_model_input(y, t), t), t, y).prev_sample
    return y


def test_add_noise_is_the_network_input_and_targets_are_ddpm():
    sched = FDMDDIMScheduler()
    x0, eps = torch.randn(3, 1, 4, 4, dtype=torch.float64), torch.randn(3, 1, 4, 4, dtype=torch.float64)
    t = torch.tensor([0, 500, 999])
    y = sched.add_noise(x0, eps, t)
    ddpm = DDPMScheduler()
    for i, ti in enumerate(t.tolist()):
        abar = abar_reference(ti)
        sigma = math.sqrt((1 - abar) / abar)
        s = s_reference(sigma, 2.0, sched.process.sigma_min, sched.process.sigma_max)
        torch.testing.assert_close(y[i], s * (x0[i] + sigma * eps[i]))
    torch.testing.assert_close(sched.get_velocity(x0, eps, t), ddpm.get_velocity(x0, eps, t), rtol=1e-5, atol=1e-5)
    base = FDMDDIMScheduler(input_scaling="baseline")
    torch.testing.assert_close(base.add_noise(x0, eps, t), ddpm.add_noise(x0, eps, t), rtol=1e-5, atol=1e-5)
    assert sched.scale_model_input(y, 10) is y


@pytest.mark.parametrize("cls", CLASSES)
@pytest.mark.parametrize("prediction_type", ["epsilon", "v_prediction"])
def test_baseline_equals_diffusers(cls, prediction_type):
    """input_scaling="baseline" is the diffusers scheduler itself (same grid, same update)."""
    twin = DIFFUSERS_TWIN[cls](prediction_type=prediction_type)
    ours = cls.from_config(twin.config, input_scaling="baseline")
    twin.set_timesteps(8)
    ours.set_timesteps(8)
    assert ours.timesteps.tolist() == twin.timesteps.tolist()

    def model(y, t):
        return 0.8 * y + 0.05 * math.cos(float(t))

    y = torch.randn(4, 3, generator=torch.Generator().manual_seed(0))
    torch.testing.assert_close(run_loop(ours, model, y), run_loop(twin, model, y), rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("cls", CLASSES)
@pytest.mark.parametrize("prediction_type", ["epsilon", "v_prediction"])
def test_gaussian_data_fdm_and_baseline_reach_the_same_accuracy(cls, prediction_type):
    """Exact network for N(mu, C): FDM and DDPM inputs sample the data equally well at the same steps."""
    noise = torch.randn(4000, 2, generator=torch.Generator().manual_seed(0))
    errors, finals = {}, {}
    for scaling in ["fdm", "baseline"]:
        sched = cls(prediction_type=prediction_type, input_scaling=scaling, timestep_spacing="trailing")
        sched.set_timesteps(STEPS[cls])
        seen = {}
        finals[scaling] = run_loop(sched, oracle_model(sched, prediction_type), noise * sched.init_noise_sigma, seen)
        errors[scaling] = gaussian_error(finals[scaling], MU, COV)
        # training and sampling agree: the state the model sees at t is distributed like add_noise(x0, eps, t)
        t_mid = int(sched.timesteps[len(sched.timesteps) // 2])
        x0 = MU + torch.randn(4000, 2, dtype=torch.float64) @ torch.linalg.cholesky(COV).T
        train = sched.add_noise(x0, torch.randn_like(x0), t_mid)
        torch.testing.assert_close(seen[t_mid].double().mean(0), train.mean(0), atol=0.1 * train.std(), rtol=0)
        torch.testing.assert_close(seen[t_mid].double().std(0), train.std(0), rtol=0.08, atol=0)
    # 4000 exact samples have errors ~0.01; DDIM at 50 steps adds ~0.025 of discretisation error to the covariance
    for scaling, (mean_err, cov_err) in errors.items():
        assert mean_err < 0.03 and cov_err < 0.05, (scaling, mean_err, cov_err)
    assert abs(errors["fdm"][1] - errors["baseline"][1]) < 2e-3
    torch.testing.assert_close(finals["fdm"], finals["baseline"], rtol=0, atol=2e-3)


@pytest.mark.parametrize("cls", CLASSES)
@pytest.mark.parametrize(
    "source",
    [
        DDIMScheduler(beta_schedule="scaled_linear", beta_start=0.00085, beta_end=0.012, steps_offset=1),
        DDPMScheduler(prediction_type="v_prediction"),
        PNDMScheduler(beta_schedule="scaled_linear", beta_start=0.00085, beta_end=0.012, skip_prk_steps=True),
        EulerDiscreteScheduler(beta_schedule="squaredcos_cap_v2", timestep_spacing="trailing"),
    ],
    ids=["ddim", "ddpm", "pndm", "euler"],
)
def test_from_diffusers_config(cls, source):
    sched = cls.from_config(source.config)
    for key in ["num_train_timesteps", "beta_start", "beta_end", "beta_schedule", "prediction_type", "steps_offset"]:
        assert sched.config[key] == source.config[key], key
    assert sched.config.input_scaling == "fdm"
    torch.testing.assert_close(sched.alphas_cumprod, source.alphas_cumprod.float())
    assert sched.init_noise_sigma == pytest.approx(1.0, abs=0.2)
    assert {"DDIMScheduler", "DDPMScheduler", "PNDMScheduler"} <= {c.__name__ for c in sched.compatibles}


@pytest.mark.parametrize("cls", CLASSES)
def test_config_round_trip(cls, tmp_path):
    sched = cls(beta_schedule="scaled_linear", beta_start=0.00085, beta_end=0.012, m=1.0, sigma_max=40.0)
    sched.save_config(tmp_path)
    loaded = cls.from_pretrained(tmp_path)
    public = {k: v for k, v in sched.config.items() if not k.startswith("_")}
    assert {k: loaded.config[k] for k in public} == public
    x0, eps = torch.randn(2, 4), torch.randn(2, 4)
    torch.testing.assert_close(loaded.add_noise(x0, eps, 300), sched.add_noise(x0, eps, 300))


@pytest.mark.parametrize("cls", CLASSES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_step_shapes_dtypes_and_tuple(cls, dtype):
    sched = cls()
    sched.set_timesteps(5)
    y = torch.randn(2, 4, 8, 8).to(dtype)
    t = sched.timesteps[0]
    out = sched.step(torch.randn_like(y), t, sched.scale_model_input(y, t))
    assert isinstance(out, FDMSchedulerOutput) and out.prev_sample.shape == y.shape
    assert out.prev_sample.dtype == dtype and out.pred_original_sample.dtype == dtype
    sched.set_timesteps(5)
    f = torch.randn_like(y)
    tup = sched.step(f, t, sched.scale_model_input(y, t), return_dict=False)
    sched.set_timesteps(5)
    assert isinstance(tup, tuple) and torch.equal(tup[0], sched.step(f, t, sched.scale_model_input(y, t)).prev_sample)


@pytest.mark.parametrize("cls", CLASSES)
def test_set_timesteps_resets_trajectory_state(cls):
    def model(y, t):
        return 0.5 * y + 0.001 * float(t)

    y = torch.randn(3, 2, generator=torch.Generator().manual_seed(0))
    used = cls()
    used.set_timesteps(6)
    run_loop(used, model, y + 1)  # leaves multistep history behind
    used.set_timesteps(6)
    fresh = cls()
    fresh.set_timesteps(6)
    torch.testing.assert_close(run_loop(used, model, y), run_loop(fresh, model, y))


@pytest.mark.parametrize("cls", CLASSES)
@pytest.mark.parametrize(
    "kwargs, match",
    [
        (dict(m=0.0), "`m`"),
        (dict(m=-1.0), "`m`"),
        (dict(sigma_min=5.0, sigma_max=5.0), "`sigma_min`"),
        (dict(sigma_min=10.0, sigma_max=1.0), "`sigma_min`"),
        (dict(input_scaling="ddpm"), "`input_scaling`"),
        (dict(prediction_type="score"), "`prediction_type`"),
        (dict(beta_schedule="cosine"), "`beta_schedule`"),
        (dict(timestep_spacing="karras"), "`timestep_spacing`"),
        (dict(m=0.2), "increase `m`"),
    ],
)
def test_bad_input(cls, kwargs, match):
    with pytest.raises(ValueError, match=match):
        cls(**kwargs)


@pytest.mark.parametrize("cls", CLASSES)
def test_bad_runtime_input(cls):
    sched = cls(num_train_timesteps=100)
    with pytest.raises(ValueError, match="`num_inference_steps`"):
        sched.set_timesteps(101)
    with pytest.raises(ValueError, match="`num_inference_steps`"):
        sched.set_timesteps(0)
    sched.set_timesteps(10)
    with pytest.raises(ValueError, match="`timestep`"):
        sched.step(torch.zeros(1, 2), 3, torch.zeros(1, 2))


@pytest.mark.parametrize("cls", CLASSES)
@pytest.mark.parametrize("beta_schedule", ["linear", "scaled_linear", "squaredcos_cap_v2"])
def test_betas_and_alphas_are_diffusers(cls, beta_schedule):
    """Pipelines read `betas` / `alphas` / `alphas_cumprod` (diffusers' scheduler contract)."""
    ddim = DDIMScheduler(beta_schedule=beta_schedule, beta_start=0.00085, beta_end=0.012)
    sched = cls.from_config(ddim.config)
    for name in ["betas", "alphas", "alphas_cumprod"]:
        torch.testing.assert_close(getattr(sched, name), getattr(ddim, name), rtol=1e-5, atol=1e-6, msg=name)


@pytest.mark.parametrize("cls", CLASSES)
def test_rescale_betas_zero_snr_is_refused_not_ignored(cls):
    with pytest.raises(ValueError, match="`rescale_betas_zero_snr=True` is not supported"):
        cls(rescale_betas_zero_snr=True)
    with pytest.raises(ValueError, match="`rescale_betas_zero_snr=True` is not supported"):
        cls.from_config(DDIMScheduler(rescale_betas_zero_snr=True).config)


@pytest.mark.parametrize("cls", CLASSES)
def test_unit_variance_start_without_scale_model_input(cls):
    """`DDPMPipeline`'s loop (no `init_noise_sigma`, no `scale_model_input`) is served only where k_{t_0} = 1."""

    def model(y, t):
        return 0.5 * y

    for spacing in ["trailing", "linspace"]:
        for scaling in ["fdm", "baseline"]:
            sched = cls(timestep_spacing=spacing, input_scaling=scaling)
            sched.set_timesteps(10)
            assert sched.init_noise_sigma == pytest.approx(1.0, abs=1e-3)
            t = sched.timesteps[0]
            sched.step(model(torch.ones(1, 2), t), t, torch.ones(1, 2))
    sched = cls(timestep_spacing="leading", input_scaling="baseline")
    sched.set_timesteps(10)
    sched.step(model(torch.ones(1, 2), sched.timesteps[0]), sched.timesteps[0], torch.ones(1, 2))
    sched = cls(timestep_spacing="leading")
    sched.set_timesteps(10)
    assert sched.init_noise_sigma > 5
    with pytest.raises(ValueError, match="never called `scale_model_input`.*timestep_spacing='trailing'"):
        sched.step(torch.ones(1, 2), sched.timesteps[0], torch.ones(1, 2))
