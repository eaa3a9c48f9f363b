import pytest
import torch
from diffusers.models.attention_processor import Attention
from torch import nn
from torch.utils.flop_counter import FlopCounterMode

from diffusers_stages import MultiDecoderUNet2DModel, count_macs, count_parameters, stage_report
from diffusers_stages.testing import tiny_unet_2d


def test_count_parameters_counts_shared_once_and_trainable_only():
    shared = nn.Linear(3, 4)
    model = nn.Sequential(shared, nn.ReLU(), shared, nn.Conv2d(4, 2, 3))
    model[3].weight.requires_grad_(False)
    assert count_parameters(model) == 3 * 4 + 4 + 4 * 2 * 9 + 2
    assert count_parameters(model, trainable_only=True) == 3 * 4 + 4 + 2


def test_conv_and_linear_macs_match_formula_and_torch_flop_counter():
    model = nn.Sequential(
        nn.Conv2d(3, 8, 3, padding=1),
        nn.Conv2d(8, 8, 3, stride=2, padding=1, groups=4),
        nn.ConvTranspose2d(8, 4, 2, stride=2),
        nn.Flatten(),
        nn.Linear(4 * 8 * 8, 10),
    )
    x = torch.randn(2, 3, 8, 8)
    reference = 2 * (8 * 8 * 8 * 3 * 9 + 8 * 4 * 4 * 2 * 9 + 8 * 4 * 4 * 4 * 4 + 10 * 256)
    assert count_macs(model, x) == reference
    with FlopCounterMode(display=False) as counter:
        model(x)
    assert count_macs(model, x) == counter.get_total_flops() // 2


@pytest.mark.parametrize("cross", [False, True])
def test_diffusers_attention_counts_projections_and_matmuls(cross):
    attn = Attention(query_dim=16, cross_attention_dim=12 if cross else None, heads=2, dim_head=8)
    hidden, context = torch.randn(3, 10, 16), torch.randn(3, 5, 12)
    lk, kdim = (5, 12) if cross else (10, 16)
    reference = 3 * (10 * 16 * 16 + 2 * lk * kdim * 16 + 10 * 16 * 16 + 2 * 10 * lk * 16)
    assert count_macs(attn, hidden, encoder_hidden_states=context if cross else None) == reference


def test_multihead_attention_macs():
    mha = nn.MultiheadAttention(16, 4, batch_first=True)
    q, kv = torch.randn(2, 6, 16), torch.randn(2, 9, 16)
    assert count_macs(mha, q, kv, kv) == 2 * (6 * 256 + 9 * 2 * 256 + 6 * 256 + 2 * 6 * 9 * 16)


def test_stage_report_matches_source_unet_and_shrinks_with_narrow_decoders():
    unet = tiny_unet_2d().eval()
    x = torch.randn(2, 1, 8, 8)
    full = stage_report(MultiDecoderUNet2DModel.from_unet(unet, [500]), x)
    assert [r.macs for r in full] == [count_macs(unet, x, 10)] * 2
    assert all(r.parameters == count_parameters(unet) for r in full)
    narrow = stage_report(MultiDecoderUNet2DModel.from_unet(unet, [500], [[32, 64, 64], [8, 16, 16]]), x)
    assert narrow[0].macs == full[0].macs and narrow[1].macs < full[1].macs / 2
    assert narrow[1].encoder_parameters == full[1].encoder_parameters
    assert narrow[1].decoder_parameters < full[1].decoder_parameters / 4
    with pytest.raises(ValueError, match="timesteps"):
        stage_report(MultiDecoderUNet2DModel.from_unet(unet, [500]), x, timesteps=[600, 700])
