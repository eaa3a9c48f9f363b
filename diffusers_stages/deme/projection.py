"""DeMe's channel-wise projection: per-stage ``C x C`` matrices on the outputs of each block's closing convolution."""

from __future__ import annotations

from collections.abc import Sequence

import torch


def projection_sites(unet: torch.nn.Module) -> list[str]:
    """
    The convolution closing each down, mid and up block: the down/up-sampler's conv where the block has one, else its
    last resnet's ``conv2``. A channel projection on its output folds exactly into its weights.
    """
    sites = []
    blocks = [(f"down_blocks.{i}", b, "downsamplers") for i, b in enumerate(unet.down_blocks)]
    blocks.append(("mid_block", unet.mid_block, None))
    blocks += [(f"up_blocks.{i}", b, "upsamplers") for i, b in enumerate(unet.up_blocks)]
    for prefix, block, sampler in blocks:
        samplers = getattr(block, sampler, None) if sampler else None
        if samplers and getattr(samplers[0], "conv", None) is not None:
            sites.append(f"{prefix}.{sampler}.0.conv")
        else:
            sites.append(f"{prefix}.resnets.{len(block.resnets) - 1}.conv2")
    return sites


class ChannelProjection(torch.nn.Module):
    r"""
    DeMe's channel-wise projection: per stage, a ``C x C`` matrix ``P_k`` initialised to the identity, applied to the
    output channels of the convolution that closes each down, mid and up block (`projection_sites`). With weights
    ``w_k`` the applied matrix is ``I + sum_k w_k (P_k - I)``: task arithmetic on the projections, which
    `merge_stage_adapters` folds into the convolution (``W <- P W``, ``b <- P b``), leaving a plain UNet.

    The paper places the projection after each block; we place it on the block's closing convolution (inside the
    last resnet's residual where there is no sampler) so that the merged model needs no extra layer.

    Args:
        unet (`torch.nn.Module`): The UNet (hooks are registered on its site convolutions).
        adapter_names (`Sequence[str]`): One projection set per stage adapter.
    """

    def __init__(self, unet: torch.nn.Module, adapter_names: Sequence[str]):
        super().__init__()
        self.sites = projection_sites(unet)
        modules = [unet.get_submodule(s) for s in self.sites]
        channels = [m.out_channels if hasattr(m, "out_channels") else m.base_layer.out_channels for m in modules]
        self.matrices = torch.nn.ModuleDict(
            {
                name: torch.nn.ParameterList([torch.nn.Parameter(torch.eye(c)) for c in channels])
                for name in adapter_names
            }
        )
        self.weights = {name: 0.0 for name in adapter_names}
        self.enabled = True
        for i, module in enumerate(modules):
            module.register_forward_hook(self._hook(i))

    def _hook(self, site: int):
        def hook(module, args, output):
            if not self.enabled or not any(self.weights.values()):
                return output
            if self.matrices[next(iter(self.weights))][site].device != output.device:
                self.to(output.device)  # follow the UNet's `.to(device)` (the projection is not one of its modules)
            eye = torch.eye(output.shape[1], device=output.device, dtype=output.dtype)
            p = eye + sum(w * (self.matrices[n][site].to(output.dtype) - eye) for n, w in self.weights.items() if w)
            return torch.einsum("oc,nc...->no...", p, output)

        return hook

    def set_weights(self, weights: dict[str, float]) -> None:
        self.weights = {name: float(weights.get(name, 0.0)) for name in self.matrices}

    def stage_parameters(self, name: str) -> list[torch.nn.Parameter]:
        return list(self.matrices[name])

    def stage_state_dict(self, name: str) -> dict[str, torch.Tensor]:
        """The projections of one stage keyed by their site's module name."""
        return {site: p.detach().cpu().contiguous() for site, p in zip(self.sites, self.matrices[name])}

    def load_stage_state_dict(self, name: str, state: dict[str, torch.Tensor]) -> None:
        if set(state) != set(self.sites):
            raise ValueError(f"Channel projection of `{name}` has sites {sorted(state)}, expected {self.sites}.")
        with torch.no_grad():
            for site, p in zip(self.sites, self.matrices[name]):
                p.copy_(state[site])
