"""The study's configurations: each a `TrainingConfig` / `TDCConfig` / `StageLoraConfig` variant of the library.

A variant is *available* when the library accepts its options today (its config builds); otherwise it is a named
hook (`Variant.pending`) that the study lists and skips until the option lands. Nothing here trains.
"""

from __future__ import annotations

from dataclasses import dataclass, field


@dataclass
class Variant:
    """One configuration of the study.

    Args:
        name (`str`): Its key in the result files.
        method (`str`): ``"train"`` (`diffusers_stages.train`), ``"tdc"`` (`run_tdc`) or ``"deme"``
            (`train_stage_lora` + `merge_stages` on ``base``, with an equal-steps continued-training control).
        fields (`dict`): `TrainingConfig` / `TDCConfig` fields on top of the study's shared ones.
        stages (`str`, *optional*): ``"uniform_log_sigma"`` (the library's uniform stages: equal widths of the
            timestep index, i.e. of log-sigma under EDM), ``"balanced"`` (equal probability under the training
            distribution of noise levels) or ``"optimal_denoiser"`` (the multi-stage paper's clustering of the data).
        baseline (`str`): The variant it is compared with (the targets' denominator).
        init_from (`str`, *optional*): A unified variant whose partly trained model (at ``init_fraction`` of the
            steps) initialises the decoders (``pretrained_model_name_or_path``); its steps count towards the total.
        base (`str`, *optional*): DeMe's pretrained model: this variant's final model, same seed.
        extra (`dict`): Method options (DeMe: `StageLoraConfig` fields).
        steps_factor (`float`): Trains ``steps_factor`` x ``--steps`` (the baseline trained longer, to locate its
            plateau); the targets still compare against ``baseline`` at ``--steps``.
        pending (`str`, *optional*): Why it cannot run yet (set by `check_available`).
    """

    name: str
    method: str = "train"
    fields: dict = field(default_factory=dict)
    stages: str | None = None
    baseline: str = "baseline"
    init_from: str | None = None
    base: str | None = None
    extra: dict = field(default_factory=dict)
    steps_factor: float = 1.0
    pending: str | None = None


TAILORED = "tailored"  # full-width decoders for the two low-noise stages, half width at high noise
MS = dict(model_type="multi_decoder", num_stages=3)

VARIANTS = [
    Variant("baseline", fields=dict(noise_process="edm")),
    # the baseline trained twice as long: where its FID curve flattens, and how far the study's budget is from it
    Variant("baseline_long", fields=dict(noise_process="edm"), steps_factor=2.0),
    Variant("edm_fdm", fields=dict(noise_process="edm_fdm")),
    # VP-FDM objectives (issue 15, branch fdm-fidelity): the names the library is adopting
    Variant("vp", fields=dict(noise_process="vp")),
    Variant("vp_fdm", fields=dict(noise_process="vp_fdm"), baseline="vp"),
    Variant("ddpm", fields=dict(noise_process="ddpm")),
    Variant("fdm_discrete", fields=dict(noise_process="fdm"), baseline="ddpm"),
    Variant("ms_log_sigma", fields=dict(MS, noise_process="edm"), stages="uniform_log_sigma"),
    Variant("ms_balanced", fields=dict(MS, noise_process="edm"), stages="balanced"),
    Variant("ms_optimal_denoiser", fields=dict(MS, noise_process="edm"), stages="optimal_denoiser"),
    Variant(
        "ms_balanced_tailored",
        fields=dict(MS, noise_process="edm", decoder_block_out_channels=TAILORED),
        stages="balanced",
    ),  # fmt: skip
    Variant("ms_balanced_from_unified", fields=dict(MS, noise_process="edm"), stages="balanced", init_from="baseline"),
    Variant("ms_balanced_fdm", fields=dict(MS, noise_process="edm_fdm"), stages="balanced"),
    # stage-sampling modes (issue 15): named after what they do
    Variant(
        "ms_balanced_per_sample",
        fields=dict(MS, noise_process="edm", stage_sampling="stage_per_sample"),
        stages="balanced",
    ),  # fmt: skip
    Variant(
        "ms_log_sigma_uniform_draw",
        fields=dict(MS, noise_process="edm", stage_sampling="stage_per_batch_uniform"),
        stages="uniform_log_sigma",
    ),  # fmt: skip
    Variant("tdc", method="tdc", fields=dict(noise_process="ddpm"), baseline="ddpm"),
    Variant("tdc_k075", method="tdc", fields=dict(noise_process="ddpm", prune_k=0.75), baseline="ddpm"),
    # the groupings: the paper's difficulty (-log SNR_t), and the gradient similarity alone (no difficulty term)
    Variant("tdc_snr", method="tdc", fields=dict(noise_process="ddpm", grouping_difficulty="snr"), baseline="ddpm"),
    Variant(
        "tdc_gradient_only", method="tdc", fields=dict(noise_process="ddpm", difficulty_weight=0.0), baseline="ddpm"
    ),
    # more of the budget on the unified phase
    Variant("tdc_phase1_075", method="tdc", fields=dict(noise_process="ddpm", phase1_fraction=0.75), baseline="ddpm"),
    Variant("deme_lora", method="deme", base="ddpm", baseline="ddpm", extra=dict(num_stages=4)),
    Variant(
        "deme_full",
        method="deme",
        base="ddpm",
        baseline="ddpm",
        extra=dict(num_stages=4, finetune="full", use_ema=True),
    ),  # fmt: skip
    # DeMe from a base at its plateau (the EDM baseline trained twice as long): LoRA, and full finetuning + EMA
    Variant("deme_lora_plateau", method="deme", base="baseline_long", extra=dict(num_stages=4)),
    Variant(
        "deme_full_plateau",
        method="deme",
        base="baseline_long",
        extra=dict(num_stages=4, finetune="full", use_ema=True),
    ),  # fmt: skip
    # the combination no paper has: DeMe on a multi-stage FDM model (sigma-space DeMe; it reuses the base's 3 stages)
    Variant("ms_fdm_deme", method="deme", base="ms_balanced_fdm", baseline="baseline", extra=dict(num_stages=3)),
]

#: What each pending hook waits for, when the config error alone does not say it.
HOOK_NOTES: dict[str, str] = {}


def tailored_widths(block_out_channels: list[int], num_stages: int) -> str:
    """``decoder_block_out_channels`` of the tailored variant: the encoder's widths for every stage but the noisiest,
    which gets half of them, in multiples of 8 (32-64-64 -> ``"32,64,64;32,64,64;16,32,32"``)."""
    full = ",".join(map(str, block_out_channels))
    half = ",".join(str(max(8, c // 16 * 8)) for c in block_out_channels)  # multiples of 8 (group norm)
    return ";".join([full] * (num_stages - 1) + [half])


def check_available(variant: Variant, build_config) -> Variant:
    """Set ``variant.pending`` to the reason it cannot run today (``build_config(variant)`` raising `ValueError`,
    or a hook in `HOOK_NOTES`); returns the variant."""
    variant.pending = HOOK_NOTES.get(variant.name)
    if variant.pending is None and variant.method != "deme":
        try:
            build_config(variant)
        except (ValueError, TypeError) as e:
            variant.pending = f"not in the library yet: {e}"
    return variant
