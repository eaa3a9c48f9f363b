import pytest
import torch

from diffusers_stages.clustering import encode_latents
from diffusers_stages.clustering.samples import as_sample_tensor
from diffusers_stages.testing import tiny_vae


def test_encode_latents_in_batches_matches_one_pass():
    vae = tiny_vae().eval()
    images = torch.rand(5, 3, 16, 16, generator=torch.Generator().manual_seed(0)) * 2 - 1
    latents = encode_latents(vae, images, batch_size=2, progress=False)
    with torch.no_grad():
        ref = vae.encode(images).latent_dist.mode() * vae.config.scaling_factor
    assert latents.shape == (5, 4, 8, 8)
    assert torch.allclose(latents, ref, atol=1e-5)
    # grayscale images are repeated to the VAE's three input channels
    gray = images[:, :1]
    assert torch.allclose(
        encode_latents(vae, gray, progress=False), encode_latents(vae, gray.repeat(1, 3, 1, 1), progress=False)
    )
    with pytest.raises(ValueError, match="channels"):
        encode_latents(vae, torch.zeros(1, 2, 16, 16), progress=False)


def test_as_sample_tensor_stacks_and_validates():
    stacked = as_sample_tensor([torch.zeros(1, 4, 4), torch.ones(1, 4, 4)])
    assert stacked.shape == (2, 1, 4, 4) and stacked[1].sum() == 16
    with pytest.raises(ValueError, match="mixed sample sizes"):
        as_sample_tensor([torch.zeros(1, 4, 4), torch.zeros(1, 5, 4)])
    with pytest.raises(ValueError, match="empty"):
        as_sample_tensor(torch.zeros(0, 1, 4, 4))
    with pytest.raises(ValueError, match="floating-point"):
        as_sample_tensor(torch.zeros(2, 1, 4, 4, dtype=torch.uint8))
