import importlib
import warnings

import pytest
import torch

from diffusers_stages.clustering import (
    NoiseSchedule,
    cluster_timesteps,
    optimal_denoiser,
    optimal_denoiser_similarity,
    threshold_boundaries,
)
from diffusers_stages.data import dataset_to_tensor, load_image_dataset, read_mnist_arrays

# the module (the package exports a function of the same name)
od = importlib.import_module("diffusers_stages.clustering.optimal_denoiser")


def reference_denoiser(x, data, sigma):
    """Brute force: w_i = exp(-|x - y_i|^2 / (2 sigma^2)), D = sum w_i y_i / sum w_i (stabilised by the max)."""
    y = data.reshape(len(data), -1).double()
    out = []
    for xq, s in zip(x.reshape(len(x), -1).double(), sigma):
        logw = torch.tensor([-float(((xq - yi) ** 2).sum()) / (2 * float(s) ** 2) for yi in y], dtype=torch.float64)
        w = torch.exp(logw - logw.max())
        out.append((w[:, None] * y).sum(0) / w.sum())
    return torch.stack(out).reshape(x.shape)


@pytest.fixture(scope="module")
def digits():
    return dataset_to_tensor(load_image_dataset("digits"))


def test_matches_brute_force_exactly(monkeypatch):
    g = torch.Generator().manual_seed(0)
    data = torch.rand(13, 1, 3, 3, generator=g, dtype=torch.float64) * 2 - 1
    x = data[torch.arange(10) % 13] + torch.randn(10, 1, 3, 3, generator=g, dtype=torch.float64)
    sigma = torch.tensor([0.05, 0.1, 0.2, 0.3, 0.5, 0.8, 1.0, 2.0, 5.0, 50.0], dtype=torch.float64)
    ref = reference_denoiser(x, data, sigma)
    assert torch.allclose(optimal_denoiser(x, data, sigma), ref, rtol=0, atol=1e-12)
    # the streaming log-sum-exp over chunks of the training set and small query batches give the same result
    monkeypatch.setattr(od, "_MAX_LOGITS", 3)
    assert torch.allclose(optimal_denoiser(x, data, sigma, batch_size=3), ref, rtol=0, atol=1e-12)
    # float32 stays close
    assert torch.allclose(optimal_denoiser(x, data, sigma, dtype=torch.float32).double(), ref, atol=1e-5)


def test_limits(digits):
    data = digits.double()
    g = torch.Generator().manual_seed(1)
    y, eps = data[:5], torch.randn(5, *data.shape[1:], generator=g, dtype=torch.float64)
    # sigma -> 0: the posterior collapses onto the clean sample, so eps*_0 returns the true noise
    sigma = 1e-3
    x = y + sigma * eps
    d = optimal_denoiser(x, data, sigma)
    assert torch.allclose(d, y, atol=1e-10)
    assert torch.allclose((x - d) / sigma, eps, atol=1e-6)
    # sigma -> inf: the posterior mean is the dataset mean ybar
    sigma = 1e6
    d = optimal_denoiser(y + sigma * eps, data, sigma)
    assert torch.allclose(d, data.mean(0).expand_as(d), atol=1e-3)
    assert not torch.allclose(d, data.mean(0).expand_as(d), atol=1e-7)  # but only in the limit


def test_bad_sigma_and_shapes():
    data = torch.zeros(3, 1, 2, 2)
    with pytest.raises(ValueError, match="sigma"):
        optimal_denoiser(torch.zeros(2, 1, 2, 2), data, 0.0)
    with pytest.raises(ValueError, match="sigma"):
        optimal_denoiser(torch.zeros(2, 1, 2, 2), data, torch.ones(3))
    with pytest.raises(ValueError, match="sample shape"):
        optimal_denoiser(torch.zeros(2, 1, 3, 3), data, 1.0)


def test_similarity_curves_follow_the_limits(digits):
    out = optimal_denoiser_similarity(
        digits, NoiseSchedule.vp(1000), grid_size=20, num_samples=16, generator=torch.Generator().manual_seed(0)
    )
    m = out.task_similarity
    assert m.shape == (22, 22) and torch.allclose(m, m.T) and torch.all(m.diagonal() == 1)
    assert out.S0[0] == 1.0  # at sigma_min = 0.01 the denoiser returns y exactly
    assert out.S0[0] > out.S0[10] > out.S0[-1]
    assert out.S1[-1] > 0.95 > out.S1[0]  # 64-pixel digits: sigma_max = 152 is nearly the infinite-noise limit
    assert torch.equal(out.S0, m[0, 1:-1]) and torch.equal(out.S1, m[-1, 1:-1])


def reference_threshold(S0, S1, alpha):
    g = len(S0)
    t1 = max(e for e in range(1, g) if sum(S0[:e]) / e >= alpha)
    t2 = min(e for e in range(1, g) if sum(S1[e:]) / (g - e) >= alpha)
    return t1, t2


def test_threshold_rule_matches_its_definition():
    S0 = torch.tensor([1.0, 1.0, 0.95, 0.7, 0.5, 0.4, 0.3, 0.3], dtype=torch.float64)
    S1 = torch.tensor([0.2, 0.2, 0.3, 0.4, 0.6, 0.85, 0.9, 1.0], dtype=torch.float64)
    for alpha in (0.85, 0.9, 0.95):
        assert threshold_boundaries(S0, S1, alpha) == reference_threshold(S0.tolist(), S1.tolist(), alpha)
    with pytest.raises(ValueError, match="alpha"):
        threshold_boundaries(S0, S1, 0.8)  # t1 would not lie before t2


def test_three_stages_on_digits_are_deterministic(digits):
    kwargs = dict(data=digits, grid_size=40, num_samples=16, progress=False)
    a = cluster_timesteps("optimal_denoiser", 3, seed=0, return_details=True, **kwargs)
    b = cluster_timesteps("optimal_denoiser", 3, seed=0, **kwargs)
    c = cluster_timesteps("optimal_denoiser", 3, seed=1, return_details=True, **kwargs)
    assert a.stages == b and a.stages.config.method == "optimal_denoiser"
    assert all(b % 25 == 0 for b in a.stages.boundaries)  # boundaries lie on the grid's cell edges
    assert not torch.equal(a.curves["S0"], c.curves["S0"])  # another seed draws other (y, eps)
    assert a.similarity.shape == (40, 40)
    t1, t2 = (b // 25 for b in a.stages.boundaries)
    assert (t1, t2) == reference_threshold(a.curves["S0"].tolist(), a.curves["S1"].tolist(), 0.9)


@pytest.mark.parametrize("k", [1, 2, 4, 5])
def test_segmentation_rule_for_any_number_of_stages(digits, k):
    stages = cluster_timesteps("optimal_denoiser", k, data=digits[:300], grid_size=20, num_samples=8, progress=False)
    assert stages.num_stages == k and all(b % 50 == 0 for b in stages.boundaries)


def test_auto_rule_falls_back_to_segmentation(digits):
    kwargs = dict(data=digits[:300], grid_size=20, num_samples=8, pixel_range="[-1, 1]", progress=False)
    with pytest.warns(UserWarning, match="segmentation"):
        auto = cluster_timesteps("optimal_denoiser", 3, alpha=0.999, **kwargs)
    assert auto == cluster_timesteps("optimal_denoiser", 3, boundary_rule="segmentation", **kwargs)
    with pytest.raises(ValueError, match="alpha"):
        cluster_timesteps("optimal_denoiser", 3, alpha=0.999, boundary_rule="threshold", **kwargs)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        cluster_timesteps("optimal_denoiser", 3, **kwargs)


def test_latents_with_a_ddpm_scheduler():
    from diffusers import DDPMScheduler

    latents = torch.randn(50, 4, 4, 4, generator=torch.Generator().manual_seed(0))
    stages = cluster_timesteps(
        "optimal_denoiser",
        2,
        data=latents,
        noise_schedule=DDPMScheduler(num_train_timesteps=200),
        grid_size=10,
        num_samples=8,
        data_range=8.0,
        progress=False,
    )
    assert stages.num_train_timesteps == 200 and stages.num_stages == 2


@pytest.mark.parametrize(
    "kwargs, match",
    [
        (dict(num_stages=0), "num_stages"),
        (dict(num_stages=11), "num_stages"),
        (dict(data=torch.zeros(0, 1, 8, 8)), "empty"),
        (dict(data=[torch.zeros(1, 8, 8), torch.zeros(1, 4, 4)]), "mixed sample sizes"),
        (dict(data=[]), "empty"),
        (dict(data=torch.zeros(5, 8, 8)), r"\[N, C, H, W\]"),
        (dict(data=None), "needs `data`"),
        (dict(boundary_rule="best"), "boundary_rule"),
        (dict(boundary_rule="threshold", num_stages=2), "num_stages"),
        (dict(grid_size=0), "grid_size"),
        (dict(num_samples=0), "num_samples"),
        (dict(colour="red"), "unknown option"),
    ],
)
def test_bad_input_raises_clear_errors(kwargs, match):
    args = dict(data=torch.rand(20, 1, 4, 4), num_stages=3, grid_size=10, num_samples=4, progress=False)
    args.update(kwargs)
    with pytest.raises(ValueError, match=match):
        cluster_timesteps("optimal_denoiser", **args)


def test_unknown_method():
    with pytest.raises(ValueError, match="method"):
        cluster_timesteps("kmeans", 3)


def test_curves_without_the_pairwise_matrix_are_the_same(digits):
    kwargs = dict(grid_size=12, num_samples=8, progress=False)
    full = optimal_denoiser_similarity(digits[:200], generator=torch.Generator().manual_seed(0), **kwargs)
    curves = optimal_denoiser_similarity(
        digits[:200], pairwise=False, generator=torch.Generator().manual_seed(0), **kwargs
    )
    assert curves.task_similarity is None
    assert torch.allclose(curves.S0, full.S0) and torch.allclose(curves.S1, full.S1)


def test_pixel_range_0_1_is_the_data_halved(digits):
    kwargs = dict(grid_size=10, num_samples=8, progress=False)
    paper = optimal_denoiser_similarity(digits[:200], generator=torch.Generator().manual_seed(0), **kwargs)
    halved = optimal_denoiser_similarity(
        digits[:200] / 2, pixel_range="[-1, 1]", data_range=1.0, generator=torch.Generator().manual_seed(0), **kwargs
    )
    torch.testing.assert_close(paper.task_similarity, halved.task_similarity)
    wide = optimal_denoiser_similarity(
        digits[:200], pixel_range="[-1, 1]", generator=torch.Generator().manual_seed(0), **kwargs
    )
    assert wide.S1.mean() < paper.S1.mean()  # relative to [-1, 1] data the same sigma is half as much noise


@pytest.mark.parametrize("pixel_range, scale", [("[0, 1]", 0.5), ("[-1, 1]", 1.0)])
def test_noise_space_matches_brute_force(pixel_range, scale):
    g = torch.Generator().manual_seed(0)
    data = (torch.rand(30, 1, 3, 3, generator=g) * 2 - 1).double()
    schedule, grid, eta = NoiseSchedule.vp(1000), 6, 0.05
    out = optimal_denoiser_similarity(
        data,
        schedule,
        grid_size=grid,
        num_samples=5,
        eta=eta,
        pixel_range=pixel_range,
        space="epsilon",
        dtype=torch.float64,
        generator=torch.Generator().manual_seed(1),
        progress=False,
    )
    # oracle: the same draws, noise predictions eps_t = (x_t - D_t) / sigma_t of the brute-force denoiser
    g = torch.Generator().manual_seed(1)
    y = data.flatten(1)[torch.randperm(30, generator=g)[:5]] * scale
    eps = torch.randn(y.shape, generator=g, dtype=torch.float64)
    ybar = data.flatten(1).mean(0) * scale
    sigmas = schedule.sigmas[out.grid_timesteps]
    preds = []
    for s in sigmas:
        x = y + s * eps
        preds.append((x - reference_denoiser(x, data.flatten(1) * scale, [s] * 5)) / s)
    agree = lambda a, b: float(((a - b).abs() <= eta).double().mean())  # noqa: E731
    for i in range(grid):
        assert out.S0[i] == pytest.approx(agree(preds[i], eps), abs=1e-9)  # eps*_0 returns the true noise
        limit = (y + sigmas[i] * eps - ybar) / sigmas[i]  # eps*_1 at the input of timestep i
        assert out.S1[i] == pytest.approx(agree(preds[i], limit), abs=1e-9)
        for j in range(grid):
            assert out.task_similarity[i + 1, j + 1] == pytest.approx(agree(preds[i], preds[j]), abs=1e-9)


def test_bad_pixel_range_and_space():
    data = torch.rand(10, 1, 2, 2)
    with pytest.raises(ValueError, match="pixel_range"):
        optimal_denoiser_similarity(data, grid_size=4, num_samples=2, pixel_range="[0, 255]", progress=False)
    with pytest.raises(ValueError, match="space"):
        optimal_denoiser_similarity(data, grid_size=4, num_samples=2, space="v", progress=False)


def test_mnist_boundaries_on_0_1_pixels_at_alpha_0_9():
    # the full test set (grid 200, 64 pairs) gives (0.405, 0.865) with x0 and (0.415, 0.495) with noise comparisons;
    # half the images on a coarser grid land within one cell of it
    torch.set_num_threads(1)
    images, _ = read_mnist_arrays()  # the raw test set (the dataset loader's PIL round-trip costs seconds)
    data = torch.from_numpy(images[:5000].copy()).float().div(127.5).sub(1)[:, None]
    kwargs = dict(data=data, grid_size=50, num_samples=24, alpha=0.9, boundary_rule="threshold", progress=False)
    x0 = cluster_timesteps("optimal_denoiser", 3, pixel_range="[0, 1]", space="x0", **kwargs)
    assert [b / 1000 for b in x0.boundaries] == pytest.approx([0.40, 0.88], abs=0.025)
    noise = cluster_timesteps("optimal_denoiser", 3, pixel_range="[0, 1]", space="epsilon", **kwargs)
    assert [b / 1000 for b in noise.boundaries] == pytest.approx([0.41, 0.50], abs=0.025)
