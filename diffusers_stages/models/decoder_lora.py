"""Loading a LoRA trained on a stock diffusers UNet into a multi-decoder UNet: the decoder part goes to every decoder."""

from __future__ import annotations

from typing import Any

from diffusers.loaders.lora_base import _fetch_state_dict

_FETCH_ARGS = {
    "weight_name": None,
    "use_safetensors": None,
    "local_files_only": None,
    "cache_dir": None,
    "force_download": False,
    "proxies": None,
    "token": None,
    "revision": None,
    "subfolder": None,
}


def replicate_decoder_keys(
    state_dict: dict[str, Any], prefix: str | None, decoder_modules: tuple[str, ...], num_decoders: int
) -> tuple[dict[str, Any], bool]:
    """
    ``state_dict`` with every key of a stock-UNet decoder module (``[prefix.]up_blocks.*``, ``conv_out.*``, ...)
    replaced by one copy per decoder (``[prefix.]decoders.k.up_blocks.*``); other keys unchanged. Also returns
    whether any key was replicated.
    """
    lead = f"{prefix}." if prefix else ""
    out, replicated = {}, False
    for key, value in state_dict.items():
        rest = key[len(lead) :] if key.startswith(lead) else None
        if rest is not None and rest.split(".")[0] in decoder_modules:
            replicated = True
            for k in range(num_decoders):
                out[f"{lead}decoders.{k}.{rest}"] = value
        else:
            out[key] = value
    return out, replicated


class DecoderLoraLoaderMixin:
    """`load_lora_adapter` (the path of every pipeline's ``load_lora_weights``) for multi-decoder UNets."""

    def _decoder_module_names(self) -> tuple[str, ...]:
        names = ("up_blocks", "conv_norm_out", "conv_out")
        return names + (("mid_block",) if self.config.decoder_includes_mid_block else ())

    def load_lora_adapter(self, pretrained_model_name_or_path_or_dict, prefix="transformer", hotswap=False, **kwargs):
        r"""
        `PeftAdapterMixin.load_lora_adapter` for a LoRA trained on the stock UNet (or on this model): the adapted
        encoder modules load as they are, and each adapted decoder module (``up_blocks.*``, ``conv_norm_out``,
        ``conv_out``, and ``mid_block.*`` when the decoders include it) loads into **every** decoder, so that at full
        width the adapted model computes what the adapted stock UNet computes at every timestep. Keys that already
        name a decoder (``decoders.k.*``, a LoRA of this model) are loaded as they are.

        Raises:
            `ValueError`: the LoRA adapts decoder modules but some decoders are narrower or wider than the stock
            UNet (``decoder_block_out_channels``): their weights have other shapes, so the LoRA cannot apply there.
        """
        state_dict = pretrained_model_name_or_path_or_dict
        if not isinstance(state_dict, dict):
            fetch = {name: kwargs.pop(name, default) for name, default in _FETCH_ARGS.items()}
            state_dict, metadata = _fetch_state_dict(
                state_dict,
                **fetch,
                user_agent={"file_type": "attn_procs_weights", "framework": "pytorch"},
                allow_pickle=False,
                metadata=kwargs.pop("metadata", None),
            )
            kwargs["metadata"] = metadata
        names = self._decoder_module_names()
        state_dict, replicated = replicate_decoder_keys(state_dict, prefix, names, self.num_stages)
        if replicated:
            stock = list(self.config.block_out_channels)
            other = [k for k, d in enumerate(self.decoders) if d.block_out_channels != stock]
            if other:
                raise ValueError(
                    f"This LoRA adapts decoder modules of a stock UNet with widths {stock}, but decoders {other} have "
                    f"other widths (`decoder_block_out_channels` = {self.config.decoder_block_out_channels}); it "
                    "cannot be loaded into them. Load it into a full-width model, or keep only its encoder keys."
                )
        if kwargs.get("network_alphas"):
            kwargs["network_alphas"] = replicate_decoder_keys(
                kwargs["network_alphas"], prefix, names, self.num_stages
            )[0]
        return super().load_lora_adapter(state_dict, prefix=prefix, hotswap=hotswap, **kwargs)
