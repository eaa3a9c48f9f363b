import pytest
import torch
import torch.nn.functional as F

from diffusers_stages.clustering import NoiseSchedule, cluster_timesteps, gradient_similarity, interval_clustering
from diffusers_stages.clustering.segmentation import grid_edges
from diffusers_stages.testing import tiny_unet_2d

pytestmark = pytest.mark.usefixtures("single_thread")


@pytest.fixture(scope="module")
def unet():
    return tiny_unet_2d(sample_size=8, block_out_channels=(8, 16), attention=False)


@pytest.fixture(scope="module")
def images():
    return torch.rand(6, 1, 8, 8, generator=torch.Generator().manual_seed(0)) * 2 - 1


def reference_gradient(model, schedule, x0, eps, t, names):
    """Oracle: the plain full-batch eps-prediction MSE and its gradient via .backward()."""
    model.zero_grad()
    a = float(schedule.alphas_cumprod[t])
    pred = model(a**0.5 * x0 + (1 - a) ** 0.5 * eps, torch.full((len(x0),), t)).sample
    loss = F.mse_loss(pred, eps)
    loss.backward()
    params = dict(model.named_parameters())
    grad = torch.cat([params[n].grad.flatten() for n in names])
    model.zero_grad(set_to_none=True)
    return grad.double(), float(loss.detach())


def test_matches_backward_oracle(unet, images):
    schedule = NoiseSchedule.vp(1000)
    timesteps = [5, 400, 990]
    names = [n for n, _ in unet.named_parameters() if n.startswith(("conv_out", "up_blocks.1"))]
    out = gradient_similarity(
        unet,
        schedule,
        images,
        timesteps,
        ["conv_out", "up_blocks.1"],
        batch_size=4,
        generator=torch.Generator().manual_seed(3),
        progress=False,
    )
    eps = torch.randn(images.shape, generator=torch.Generator().manual_seed(3))
    refs = [reference_gradient(unet, schedule, images, eps, t, names) for t in timesteps]
    g = torch.stack([r[0] for r in refs])
    cos = (g @ g.T) / (g.norm(dim=1)[:, None] * g.norm(dim=1)[None])
    assert torch.allclose(out.similarity, cos, atol=1e-5)
    assert torch.allclose(out.loss, torch.tensor([r[1] for r in refs], dtype=torch.float64), rtol=1e-5)
    assert torch.allclose(out.similarity.diagonal(), torch.ones(3, dtype=torch.float64))
    assert out.timesteps.tolist() == timesteps


def test_model_state_is_restored(unet, images):
    unet.train()
    frozen = dict(unet.named_parameters())["conv_in.weight"]
    frozen.requires_grad_(False)
    try:
        gradient_similarity(unet, None, images[:2], [10, 900], ["conv_in"], progress=False)
        assert unet.training and not frozen.requires_grad
        assert all(p.grad is None for p in unet.parameters())
    finally:
        frozen.requires_grad_(True)
        unet.eval()


def test_bad_input(unet, images):
    with pytest.raises(ValueError, match="parameters"):
        gradient_similarity(unet, None, images, [1], ["no_such_module"], progress=False)
    with pytest.raises(ValueError, match="timesteps"):
        gradient_similarity(unet, None, images, [1000], progress=False)
    with pytest.raises(ValueError, match="images"):
        gradient_similarity(unet, None, images[:0], [1], progress=False)
    for method in ("gradient", "gradient_difficulty"):
        with pytest.raises(ValueError, match="needs `model`"):
            cluster_timesteps(method, 2, data=images)
        with pytest.raises(ValueError, match="num_stages"):
            cluster_timesteps(method, 5, data=images, model=unet, grid_size=4)
    with pytest.raises(ValueError, match="difficulty_weight"):
        cluster_timesteps("gradient_difficulty", 2, data=images, model=unet, difficulty_weight=2.0)
    with pytest.raises(ValueError, match="difficulty"):
        cluster_timesteps("gradient_difficulty", 2, data=images, model=unet, difficulty="flops")


def test_gradient_clustering_is_contiguous_and_deterministic(unet, images):
    kwargs = dict(data=images[:4], model=unet, grid_size=6, parameters=["conv_out"], progress=False)
    a = cluster_timesteps("gradient_difficulty", 3, seed=0, return_details=True, **kwargs)
    b = cluster_timesteps("gradient_difficulty", 3, seed=0, **kwargs)
    assert a.stages == b and b.config.method == "gradient_difficulty" and b.num_stages == 3
    assert set(b.boundaries) <= set(grid_edges(1000, 6))
    assert a.similarity.shape == (6, 6) and a.curves["loss"].shape == (6,)
    # pure difficulty: the segmentation of the loss-closeness matrix alone (oracle: the reference formula)
    only_loss = cluster_timesteps("gradient_difficulty", 2, difficulty_weight=1.0, return_details=True, **kwargs)
    log_loss = only_loss.curves["loss"].log()
    closeness = 1 - (log_loss[:, None] - log_loss[None]).abs() / (log_loss.max() - log_loss.min())
    assert torch.allclose(only_loss.similarity, closeness)


def test_snr_difficulty_is_the_log_snr_closeness(unet, images):
    kwargs = dict(data=images[:2], model=unet, grid_size=5, parameters=["conv_out"], progress=False)
    out = cluster_timesteps(
        "gradient_difficulty", 2, difficulty="snr", difficulty_weight=1.0, return_details=True, **kwargs
    )
    lam = NoiseSchedule.vp(1000).log_snr[out.grid_timesteps]  # oracle: 1 - |lambda_s - lambda_t| / spread
    assert torch.allclose(out.similarity, 1 - (lam[:, None] - lam[None]).abs() / (lam.max() - lam.min()))
    # half weight: the mean of the gradient cosines and the SNR closeness
    half = cluster_timesteps("gradient_difficulty", 2, difficulty="snr", return_details=True, **kwargs)
    loss_only = cluster_timesteps("gradient_difficulty", 2, difficulty_weight=0.0, return_details=True, **kwargs)
    assert torch.allclose(half.similarity, 0.5 * loss_only.similarity + 0.5 * out.similarity)


def test_authors_gradient_baseline_is_the_interval_clustering_of_the_cosines(unet, images):
    kwargs = dict(data=images[:4], model=unet, grid_size=12, parameters=["conv_out"], progress=False)
    out = cluster_timesteps("gradient", 3, seed=0, return_details=True, **kwargs)
    assert out.stages.config.method == "gradient" and out.similarity.shape == (12, 12)
    edges = grid_edges(1000, 12)
    cells = [edges.index(b) for b in out.stages.boundaries]
    assert cells == interval_clustering(-out.similarity, 3)  # checked against brute force in test_baselines.py
    assert torch.allclose(out.similarity.diagonal(), torch.ones(12, dtype=torch.float64))
