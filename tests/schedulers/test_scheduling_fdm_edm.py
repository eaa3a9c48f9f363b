import math

import pytest
import torch
from diffusers import EDMEulerScheduler

from diffusers_stages import TimestepStages
from diffusers_stages.schedulers import FDMEDMScheduler, FDMSchedulerOutput

from .reference import gaussian_denoiser, gaussian_error, s_reference

RANGES = {"vp": (0.001, 152.17), "ve": (0.02, 100.0), "edm": (0.002, 80.0)}
SD = 0.5


def precond_reference(variant, scaling, sigma, m=2.0):
    """(c_skip, c_out, c_in) of the EDM paper's Table 1, with FDM's c_in = s(sigma)."""
    if variant == "edm":
        c_skip, c_out = SD**2 / (sigma**2 + SD**2), sigma * SD / math.sqrt(sigma**2 + SD**2)
        c_in = 1 / math.sqrt(sigma**2 + SD**2)
    elif variant == "vp":
        c_skip, c_out, c_in = 1.0, -sigma, 1 / math.sqrt(sigma**2 + 1)
    else:
        c_skip, c_out, c_in = 1.0, sigma, 1.0
    if scaling == "fdm":
        c_in = s_reference(sigma, m, *RANGES[variant])
    return c_skip, c_out, c_in


def public_config(scheduler):
    return {k: v for k, v in scheduler.config.items() if not k.startswith("_")}


def karras_reference(n, sigma_min=0.002, sigma_max=80.0, rho=7.0):
    i = torch.arange(n, dtype=torch.float64)
    sig = (sigma_max ** (1 / rho) + i / max(n - 1, 1) * (sigma_min ** (1 / rho) - sigma_max ** (1 / rho))) ** rho
    return torch.cat([sig, torch.zeros(1, dtype=torch.float64)])


def ode_reference(denoise, x, sigmas, heun):
    """EDM Algorithm 1 (deterministic): Euler step, plus the trapezoidal correction except when sigma_next = 0."""
    for s, s_next in zip(sigmas[:-1].tolist(), sigmas[1:].tolist()):
        d = (x - denoise(x, s)) / s
        x_next = x + (s_next - s) * d
        if heun and s_next > 0:
            x_next = x + (s_next - s) * 0.5 * (d + (x_next - denoise(x_next, s_next)) / s_next)
        x = x_next
    return x


def network_for(denoise, variant, scaling, m=2.0):
    """The raw network F whose preconditioned output is the exact denoiser: F = (D(x) - c_skip x) / c_out."""

    def net(x_in, t):
        sigma = math.exp(4 * float(t))  # c_noise = 0.25 ln sigma
        c_skip, c_out, c_in = precond_reference(variant, scaling, sigma, m)
        x = x_in / c_in
        return (denoise(x, sigma) - c_skip * x) / c_out

    return net


def sample_loop(scheduler, net, x):
    """The stock diffusers loop."""
    for t in scheduler.timesteps:
        x = scheduler.step(net(scheduler.scale_model_input(x, t), t), t, x).prev_sample
    return x


@pytest.mark.parametrize("variant", ["edm", "vp", "ve"])
@pytest.mark.parametrize("scaling", ["fdm", "baseline"])
def test_preconditioning_matches_reference(variant, scaling):
    sched = FDMEDMScheduler(variant=variant, input_scaling=scaling, m=1.3)
    x, f = torch.randn(3, 2, 4, 4), torch.randn(3, 2, 4, 4)
    for sigma in [0.002, 0.1, 0.5, 3.0, 80.0]:
        c_skip, c_out, c_in = precond_reference(variant, scaling, sigma, m=1.3)
        torch.testing.assert_close(sched.precondition_inputs(x, sigma), c_in * x)
        torch.testing.assert_close(sched.precondition_outputs(x, f, sigma), c_skip * x + c_out * f)
        lam = (sigma**2 + SD**2) / (sigma * SD) ** 2 if variant == "edm" else 1 / sigma**2
        assert sched.loss_weight(torch.tensor(sigma, dtype=torch.float64)).item() == pytest.approx(lam, rel=1e-9)
    # per-sample sigmas broadcast over the batch
    sigmas = torch.tensor([0.1, 1.0, 10.0])
    want = torch.stack([precond_reference(variant, scaling, s.item(), 1.3)[2] * x[i] for i, s in enumerate(sigmas)])
    torch.testing.assert_close(sched.precondition_inputs(x, sigmas), want)
    torch.testing.assert_close(sched.add_noise(x, f, sigmas=sigmas), x + sigmas.view(3, 1, 1, 1) * f)


def test_noise_conditioning_and_stage_routing():
    edm = FDMEDMScheduler()
    sigma = torch.tensor([0.002, 0.5, 80.0], dtype=torch.float64)
    torch.testing.assert_close(edm.precondition_noise(sigma), 0.25 * sigma.log())
    torch.testing.assert_close(edm.timestep_to_sigma(edm.sigma_to_timestep(sigma)), sigma)
    idx = FDMEDMScheduler(noise_conditioning="index", num_train_timesteps=1000)
    t = idx.sigma_to_timestep(sigma)
    want = 999 * (sigma.log() - math.log(0.002)) / (math.log(80) - math.log(0.002))
    torch.testing.assert_close(t, want)
    assert t[0].item() == pytest.approx(0) and t[-1].item() == pytest.approx(999)
    torch.testing.assert_close(idx.timestep_to_sigma(t), sigma)
    # stage k of a TimestepStages over [0, T) is a log-sigma range: the boundary t = 500 sits at sigma_b
    stages = TimestepStages([500])
    sigma_b = math.exp(math.log(0.002) + 500 / 999 * (math.log(80) - math.log(0.002)))
    got = stages.stage_index(idx.sigma_to_timestep(torch.tensor([0.99 * sigma_b, 1.01 * sigma_b])))
    assert got.tolist() == [0, 1]
    idx.set_timesteps(10)
    assert 0 <= float(idx.timesteps.min()) and float(idx.timesteps.max()) <= 999


@pytest.mark.parametrize("solver", ["euler", "heun"])
@pytest.mark.parametrize("scaling", ["fdm", "baseline"])
def test_stock_loop_equals_functional_sampler(solver, scaling):
    mu, cov = (
        torch.tensor([1.0, -0.5], dtype=torch.float64),
        torch.tensor([[0.5, 0.3], [0.3, 0.4]], dtype=torch.float64),
    )
    denoise = gaussian_denoiser(mu, cov)
    sched = FDMEDMScheduler(solver=solver, input_scaling=scaling)
    sched.set_timesteps(6)
    assert len(sched.timesteps) == (11 if solver == "heun" else 6)  # NFE 2N - 1 for Heun
    x = torch.randn(64, 2, generator=torch.Generator().manual_seed(0), dtype=torch.float64) * sched.init_noise_sigma
    got = sample_loop(sched, network_for(denoise, "edm", scaling), x)
    want = ode_reference(denoise, x, karras_reference(6), heun=solver == "heun")
    torch.testing.assert_close(got, want, rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("variant", ["edm", "vp", "ve"])
def test_gaussian_data_fdm_and_baseline_reach_the_same_accuracy(variant):
    """Exact denoiser of N(mu, C): FDM and baseline sample the data distribution equally well at 35 NFE."""
    mu, cov = torch.tensor([1.0, -0.5]), torch.tensor([[0.5, 0.3], [0.3, 0.4]])
    denoise = gaussian_denoiser(mu.double(), cov.double())
    noise = torch.randn(4000, 2, generator=torch.Generator().manual_seed(0))
    errors, samples = {}, {}
    for scaling in ["fdm", "baseline"]:
        sched = FDMEDMScheduler(variant=variant, input_scaling=scaling)
        sched.set_timesteps(18)  # 35 NFE, as in the paper's CIFAR-10 table
        net = network_for(lambda x, s: denoise(x.double(), s).float(), variant, scaling, m=sched.config.m)
        samples[scaling] = sample_loop(sched, net, noise * sched.init_noise_sigma)
        errors[scaling] = gaussian_error(samples[scaling], mu, cov)
    # 4000 exact samples: mean error ~0.01, cov error ~0.01; Heun at 35 NFE adds ~0.04 of discretisation error to cov
    for scaling, (mean_err, cov_err) in errors.items():
        assert mean_err < 0.03 and cov_err < 0.07, (scaling, mean_err, cov_err)
    assert abs(errors["fdm"][1] - errors["baseline"][1]) < 1e-3
    torch.testing.assert_close(samples["fdm"], samples["baseline"], rtol=0, atol=1e-3)


def test_heun_state_and_set_timesteps_resets():
    sched = FDMEDMScheduler()
    sched.set_timesteps(4)
    x = torch.randn(2, 3) * sched.init_noise_sigma
    t0 = sched.timesteps[0]
    sched.step(torch.zeros_like(x), t0, sched.scale_model_input(x, t0))
    assert not sched.state_in_first_order and sched.step_index == 1
    sched.set_timesteps(4)
    assert sched.state_in_first_order and sched.step_index is None

    def net(x_in, t):
        return 0.3 * x_in + 0.01 * t

    fresh = FDMEDMScheduler()
    fresh.set_timesteps(4)
    torch.testing.assert_close(sample_loop(sched, net, x), sample_loop(fresh, net, x))


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_step_output_shapes_dtypes_and_tuple(dtype):
    sched = FDMEDMScheduler(solver="euler")
    sched.set_timesteps(3)
    x = torch.randn(2, 4, 8, 8, dtype=dtype)
    t = sched.timesteps[0]
    out = sched.step(torch.randn_like(x), t, sched.scale_model_input(x, t))
    assert isinstance(out, FDMSchedulerOutput)
    assert out.prev_sample.shape == x.shape and out.prev_sample.dtype == dtype
    assert out.pred_original_sample.dtype == dtype
    sched.set_timesteps(3)
    f = torch.randn_like(x)
    sched.scale_model_input(x, t)
    tup = sched.step(f, t, x, return_dict=False)
    sched.set_timesteps(3)
    sched.scale_model_input(x, t)
    torch.testing.assert_close(tup[0], sched.step(f, t, x).prev_sample)
    assert isinstance(tup, tuple) and len(tup) == 2


def test_config_round_trip_and_from_edm_euler_config(tmp_path):
    sched = FDMEDMScheduler(variant="vp", m=1.0, solver="euler", noise_conditioning="index", sigma_max=60.0)
    sched.save_config(tmp_path)
    loaded = FDMEDMScheduler.from_pretrained(tmp_path)
    assert public_config(loaded) == public_config(sched)
    sched.set_timesteps(5)
    loaded.set_timesteps(5)
    torch.testing.assert_close(loaded.timesteps, sched.timesteps)
    x = torch.randn(2, 3)
    torch.testing.assert_close(loaded.precondition_inputs(x, 3.0), sched.precondition_inputs(x, 3.0))
    edm = EDMEulerScheduler(sigma_min=0.01, sigma_max=50.0, sigma_data=0.6, rho=5.0)
    fdm = FDMEDMScheduler.from_config(edm.config)
    assert (fdm.config.sigma_min, fdm.config.sigma_max, fdm.config.sigma_data, fdm.config.rho) == (
        0.01,
        50.0,
        0.6,
        5.0,
    )
    assert "EDMEulerScheduler" in [c.__name__ for c in FDMEDMScheduler().compatibles]
    # with the baseline c_in and the same grid, one Euler step equals diffusers' EDMEulerScheduler
    base = FDMEDMScheduler.from_config(edm.config, input_scaling="baseline", solver="euler")
    edm.set_timesteps(4)
    base.set_timesteps(4)
    torch.testing.assert_close(base.timesteps, edm.timesteps)
    x, f = torch.randn(2, 3) * 50, torch.randn(2, 3)
    t = edm.timesteps[0]
    torch.testing.assert_close(base.scale_model_input(x, t), edm.scale_model_input(x, t))
    torch.testing.assert_close(base.step(f, t, x).prev_sample, edm.step(f, t, x).prev_sample)


@pytest.mark.parametrize(
    "kwargs, match",
    [
        (dict(variant="cosine"), "`variant`"),
        (dict(input_scaling="none"), "`input_scaling`"),
        (dict(solver="dpm"), "`solver`"),
        (dict(noise_conditioning="log"), "`noise_conditioning`"),
        (dict(sigma_min=80.0, sigma_max=80.0), "`sigma_min`"),
        (dict(sigma_min=0.0), "`sigma_min`"),
        (dict(m=0.0), "`m`"),
        (dict(m=-2.0), "`m`"),
        (dict(kernel_sigma_min=100.0, kernel_sigma_max=1.0), "`sigma_min`"),
        (dict(sigma_data=0.0), "`sigma_data`"),
        (dict(rho=0.0), "`rho`"),
    ],
)
def test_bad_input(kwargs, match):
    with pytest.raises(ValueError, match=match):
        FDMEDMScheduler(**kwargs)


def test_bad_runtime_input():
    sched = FDMEDMScheduler()
    with pytest.raises(ValueError, match="`num_inference_steps`"):
        sched.set_timesteps(0)
    sched.set_timesteps(3)
    with pytest.raises(ValueError, match="`timestep`"):
        sched.scale_model_input(torch.zeros(1), torch.tensor(123.0))


def test_add_noise_takes_timesteps_like_diffusers_and_sigmas_by_keyword():
    """Stock img2img / inpaint pipelines pass elements of `timesteps`; training code passes `sigmas=`."""
    for noise_conditioning in ["edm", "index"]:
        sched = FDMEDMScheduler(noise_conditioning=noise_conditioning)
        sched.set_timesteps(5)
        x0, eps = torch.randn(len(sched.timesteps), 3), torch.randn(len(sched.timesteps), 3)
        want = x0 + sched.sigmas[:-1].view(-1, 1) * eps
        torch.testing.assert_close(sched.add_noise(x0, eps, sched.timesteps), want, rtol=1e-5, atol=1e-5)
        sigma = torch.tensor([0.01, 0.3, 7.0])
        torch.testing.assert_close(
            sched.add_noise(x0[:3], eps[:3], sched.precondition_noise(sigma)),
            x0[:3] + sigma.view(-1, 1) * eps[:3],
            rtol=1e-5,
            atol=1e-5,
        )
    with pytest.raises(ValueError, match="exactly one of `timesteps`"):
        sched.add_noise(x0, eps)
    with pytest.raises(ValueError, match="exactly one of `timesteps`"):
        sched.add_noise(x0, eps, sched.timesteps, sigmas=sched.sigmas[:-1])


@pytest.mark.parametrize("solver, order", [("euler", 1), ("heun", 2)])
def test_order_and_img2img_start_match_diffusers(solver, order):
    """img2img slices `timesteps[t_start * order:]` and calls `set_begin_index`: Heun must start at a first-order slot."""
    from diffusers import EDMEulerScheduler, HeunDiscreteScheduler

    sched = FDMEDMScheduler(solver=solver)
    twin = HeunDiscreteScheduler() if solver == "heun" else EDMEulerScheduler()
    assert sched.order == twin.order == order
    steps, strength = 10, 0.5
    for s in (sched, twin):
        s.set_timesteps(steps)
    t_start = steps - int(steps * strength)
    assert len(sched.timesteps[t_start * order :]) == len(twin.timesteps[t_start * order :])
    sched.set_begin_index(t_start * order)
    x = torch.randn(2, 3)
    sched.scale_model_input(x, sched.timesteps[t_start * order])
    assert float(sched.sigmas[sched.step_index]) == pytest.approx(float(sched.sigmas[::order][t_start]))
    assert sched.state_in_first_order


def test_step_refuses_a_loop_without_scale_model_input():
    sched = FDMEDMScheduler()
    sched.set_timesteps(3)
    with pytest.raises(ValueError, match="without `scale_model_input`.*DDPMPipeline"):
        sched.step(torch.zeros(1, 2), sched.timesteps[0], torch.zeros(1, 2))
