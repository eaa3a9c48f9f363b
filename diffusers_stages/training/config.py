"""`TrainingConfig`: every option of a multi-stage / FDM training run, its default and its checks."""

from __future__ import annotations

import dataclasses
import json
import warnings
from dataclasses import dataclass
from typing import Literal

from ..configs import check_choices
from ..schedulers.fdm import FDM_PAPER_M, FDM_SAMPLER_SIGMA_RANGES

NoiseProcess = Literal["ddpm", "fdm", "edm", "edm_fdm", "vp", "vp_fdm", "ve", "ve_fdm"]
StageSampling = Literal[
    "stage_per_batch_weighted", "stage_per_batch_uniform", "stage_per_sample", "weighted", "uniform", "per_sample"
]

#: Deprecated ``stage_sampling`` names and the names that replace them.
STAGE_SAMPLING_ALIASES = {
    "weighted": "stage_per_batch_weighted",
    "uniform": "stage_per_batch_uniform",
    "per_sample": "stage_per_sample",
}

#: FDM's loss-weight warm-up length per noise process: the authors' CIFAR-10 commands (``sail-sg/FDM`` README).
PAPER_WARMUP_STEPS = {"edm_fdm": 200, "vp_fdm": 400, "ve_fdm": 400, "fdm": 400}
LrScheduler = Literal[
    "linear", "cosine", "cosine_with_restarts", "polynomial", "constant", "constant_with_warmup", "piecewise_constant"
]


def _field(default, help: str, **metadata):
    """A dataclass field with its help text (a list default becomes a factory)."""
    if isinstance(default, list):
        return dataclasses.field(default_factory=lambda: list(default), metadata={"help": help, **metadata})
    return dataclasses.field(default=default, metadata={"help": help, **metadata})


def parse_decoder_widths(spec: str | None) -> list[list[int]] | None:
    """``'64,64;32,32'`` (or JSON ``'[[64, 64], [32, 32]]'``) -> ``[[64, 64], [32, 32]]``."""
    if spec is None:
        return None
    try:
        widths = (
            json.loads(spec)
            if spec.strip().startswith("[")
            else [[int(c) for c in part.split(",")] for part in spec.split(";")]
        )
        if not widths or not all(isinstance(w, list) and w and all(int(c) >= 1 for c in w) for w in widths):
            raise ValueError(spec)
    except (ValueError, TypeError) as e:
        raise ValueError(
            f"`decoder_block_out_channels` must look like '64,64;32,32' (positive widths), got {spec!r}."
        ) from e
    return widths


@dataclass
class TrainingConfig:
    r"""
    Multi-stage (multi-decoder) and FDM diffusion training: one run of :func:`~diffusers_stages.training.train`.

    A run trains a unified UNet (baseline) or a multi-decoder UNet (one decoder per stage), in pixel space
    (`UNet2DModel`) or on Stable Diffusion latents (`UNet2DConditionModel`), with the standard noise process or FDM.
    The flags of ``training/train_multistage.py`` are these fields (diffusers' example names). Every check that needs
    no model or data runs when the config is built and raises a `ValueError` naming the field.

    Args:
        pretrained_model_name_or_path (`str`, *optional*, defaults to `None`): Pipeline folder or Hub id to start from.
        model_type (`"unified"` or `"multi_decoder"`, defaults to `"unified"`): One UNet, or one decoder per stage.
        block_out_channels (`list[int]`, defaults to `[32, 64, 64]`): UNet widths of a new pixel model.
        layers_per_block (`int`, defaults to 1): ResNet layers per UNet block of a new pixel model.
        decoder_block_out_channels (`str`, *optional*, defaults to `None`): Per-stage decoder widths, stage 0 first,
            e.g. ``"64,64,64;32,64,64;16,32,32"`` (default: the encoder's); needs ``model_type="multi_decoder"``.
        dataset_name (`str`, defaults to `"digits"`): ``"digits"`` (embedded), ``"mnist"`` or a `datasets` Hub name.
        train_data_dir (`str`, *optional*, defaults to `None`): A local image folder (overrides ``dataset_name``).
        image_column (`str`, *optional*, defaults to `None`): The dataset's image column.
        caption_column (`str`, *optional*, defaults to `None`): The dataset's caption column (text-to-image).
        max_train_samples (`int`, *optional*, defaults to `None`): Use only the first images of the dataset.
        resolution (`int`, defaults to 16): Training image size in pixels.
        dataloader_num_workers (`int`, defaults to 0): Data loader worker processes.
        noise_process (`str`, defaults to `"edm"`): ddpm: discrete VP; fdm: discrete VP with FDM scaling; edm, vp,
            ve: the sigma-space objectives of EDM's Table 1 (preconditioning, sigma distribution and loss weight);
            edm_fdm, vp_fdm, ve_fdm: the same with FDM's ``c_in`` and loss-weight warm-up (the FDM paper's three).
        prediction_type (`"epsilon"`, `"v_prediction"` or `"sample"`, *optional*, defaults to `None`): Overrides the
            discrete scheduler's prediction type.
        fdm_m (`float`, *optional*, defaults to `None`): FDM multiplier ``m``; default the paper's: 1.0 for ve_fdm
            (the authors' VE network ignores ``m``), 2.0 otherwise.
        fdm_warmup_steps (`int`, *optional*, defaults to `None`): Length of FDM's loss-weight warm-up (0: none);
            default the authors' CIFAR-10 setting: 200 for edm_fdm, 400 for vp_fdm, ve_fdm and fdm.
        fdm_sigma_range (`"calibrated"` or `"authors"`, defaults to `"calibrated"`): The discrete ``fdm`` process's
            kernel range: calibrated so the input at ``t = T - 1`` has DDPM's scale (ours), or the authors' VP-FDM
            range 0.001 .. 152.17 with sampling started at ``sigma_t <= 80`` (see `FDMDDIMScheduler`).
        sigma_min (`float`, *optional*, defaults to `None`): Smallest sampling noise level (Karras grid; also the
            low end of the ``index`` conditioning); default the authors' sampler's: 0.02 for ve / ve_fdm, else 0.002.
        sigma_max (`float`, defaults to 80.0): Largest sampling noise level; ``0 < sigma_min < sigma_max``.
        stages_json (`str`, *optional*, defaults to `None`): A ``stages.json`` (from ``diffusers-stages cluster``).
        num_stages (`int`, defaults to 3): Uniform stages of a multi-decoder model when there is no ``stages_json``.
        stage_sampling (`str`, defaults to `"stage_per_batch_weighted"`): ``stage_per_batch_weighted``: one stage per
            batch, drawn with its probability under the base noise distribution (the multi-stage authors' EDM code);
            ``stage_per_batch_uniform``: one stage per batch, all stages equally likely (their DPM-Solver code);
            ``stage_per_sample``: every sample from the base distribution, routed to its stage's decoder (ours).
            The old names ``weighted``, ``uniform``, ``per_sample`` are deprecated aliases.
        train_stage (`int`, *optional*, defaults to `None`): Train on this stage's timesteps only (TDC phase 2).
        train_batch_size (`int`, defaults to 64): Batch size per process.
        max_train_steps (`int`, defaults to 1000): Optimisation steps.
        learning_rate (`float`, defaults to 1e-3): AdamW learning rate.
        lr_scheduler (`str`, defaults to `"constant"`): A diffusers learning-rate schedule.
        lr_warmup_steps (`int`, defaults to 0): Learning-rate warm-up steps.
        adam_beta1 (`float`, defaults to 0.9): AdamW ``beta1``.
        adam_beta2 (`float`, defaults to 0.999): AdamW ``beta2``.
        adam_weight_decay (`float`, defaults to 0.0): AdamW weight decay.
        adam_epsilon (`float`, defaults to 1e-8): AdamW ``eps``.
        max_grad_norm (`float`, defaults to 1.0): Gradient clipping norm (0: no clipping).
        gradient_accumulation_steps (`int`, defaults to 1): Micro-batches per optimisation step.
        mixed_precision (`"no"`, `"fp16"` or `"bf16"`, *optional*, defaults to `None`): accelerate's mixed precision.
        use_ema (`bool`, defaults to `False`): Keep an EMA of the weights (saved as the final model).
        ema_decay (`float`, defaults to 0.999): EMA decay.
        seed (`int`, defaults to 0): Seed of the new weights, the data order and all training noise.
        output_dir (`str`, defaults to `"outputs/multistage"`): Where the pipeline, checkpoints and logs go.
        checkpointing_steps (`int`, defaults to 500): Save a resumable checkpoint every this many steps (and at the
            end).
        checkpoints_total_limit (`int`, *optional*, defaults to `None`): Keep only this many checkpoints.
        resume_from_checkpoint (`str`, *optional*, defaults to `None`): A checkpoint folder, or ``"latest"``.
        report_to (`str`, defaults to `"tensorboard"`): An accelerate tracker (``"tensorboard"``, ...) or ``"none"``.
        logging_dir (`str`, defaults to `"logs"`): Tracker folder inside ``output_dir``.
        validation_steps (`int`, defaults to 500): Save a sample grid every this many steps (0: never).
        num_validation_images (`int`, defaults to 16): Images in a validation grid.
        num_inference_steps (`int`, defaults to 18): Sampler steps for validation, samples and FID.
        eval_fid_samples (`int`, defaults to 0): Samples for the final FID (0: skip; digits / MNIST only).
        push_to_hub (`bool`, defaults to `False`): Upload the output folder; needs ``hub_model_id``.
        hub_model_id (`str`, *optional*, defaults to `None`): The Hub repository to push to.
        hub_token (`str`, *optional*, defaults to `None`): The Hub token (never written to the model card).
    """

    # model
    pretrained_model_name_or_path: str | None = _field(None, "pipeline folder or Hub id to start from")
    model_type: Literal["unified", "multi_decoder"] = _field("unified", "one UNet, or one decoder per stage")
    block_out_channels: list[int] = _field([32, 64, 64], "UNet widths (new pixel models)")
    layers_per_block: int = _field(1, "ResNet layers per UNet block (new pixel models)")
    decoder_block_out_channels: str | None = _field(
        None, "per-stage decoder widths, stage 0 first: '64,64,64;32,64,64;16,32,32' (default: the encoder's)"
    )
    # data
    dataset_name: str = _field("digits", "'digits' (embedded), 'mnist', a datasets Hub name")
    train_data_dir: str | None = _field(None, "local image folder (overrides --dataset_name)")
    image_column: str | None = _field(None, "the dataset's image column")
    caption_column: str | None = _field(None, "the dataset's caption column (text-to-image)")
    max_train_samples: int | None = _field(None, "use only the first N images")
    resolution: int = _field(16, "training image size in pixels")
    dataloader_num_workers: int = _field(0, "data loader worker processes")
    # noise process and stages
    noise_process: NoiseProcess = _field(
        "edm",
        "ddpm: discrete VP; fdm: discrete VP with FDM scaling; edm / vp / ve: EDM's Table 1 in sigma space; "
        "edm_fdm / vp_fdm / ve_fdm: the same with FDM's c_in and loss warm-up",
    )
    prediction_type: Literal["epsilon", "v_prediction", "sample"] | None = _field(
        None, "override the discrete scheduler's prediction type"
    )
    fdm_m: float | None = _field(None, "FDM multiplier m (default the paper's: 1 for ve_fdm, else 2)")
    fdm_warmup_steps: int | None = _field(
        None, "FDM loss-weight warm-up length, 0: none (default the authors': 200 for edm_fdm, else 400)"
    )
    fdm_sigma_range: Literal["calibrated", "authors"] = _field(
        "calibrated",
        "discrete fdm kernel range: calibrated (ours) or authors (0.001..152.17, sampling from sigma <= 80)",
    )
    sigma_min: float | None = _field(None, "smallest sampling noise level (default: 0.02 for ve / ve_fdm, else 0.002)")
    sigma_max: float = _field(80.0, "largest sampling noise level")
    stages_json: str | None = _field(None, "stages.json (from `diffusers-stages cluster`)")
    num_stages: int = _field(3, "uniform stages when no --stages_json")
    stage_sampling: StageSampling = _field(
        "stage_per_batch_weighted",
        "one stage per batch drawn by its base probability (stage_per_batch_weighted) or uniformly "
        "(stage_per_batch_uniform), or each sample from the base distribution (stage_per_sample); "
        "weighted / uniform / per_sample: deprecated aliases",
    )
    train_stage: int | None = _field(None, "train on this stage's timesteps only (TDC phase 2)")
    # optimisation
    train_batch_size: int = _field(64, "batch size per process")
    max_train_steps: int = _field(1000, "optimisation steps")
    learning_rate: float = _field(1e-3, "AdamW learning rate")
    lr_scheduler: LrScheduler = _field("constant", "learning-rate schedule")
    lr_warmup_steps: int = _field(0, "learning-rate warm-up steps")
    adam_beta1: float = _field(0.9, "AdamW beta1")
    adam_beta2: float = _field(0.999, "AdamW beta2")
    adam_weight_decay: float = _field(0.0, "AdamW weight decay")
    adam_epsilon: float = _field(1e-8, "AdamW eps")
    max_grad_norm: float = _field(1.0, "gradient clipping norm (0: no clipping)")
    gradient_accumulation_steps: int = _field(1, "micro-batches per optimisation step")
    mixed_precision: Literal["no", "fp16", "bf16"] | None = _field(None, "accelerate's mixed precision")
    use_ema: bool = _field(False, "keep an EMA of the weights (the final model)")
    ema_decay: float = _field(0.999, "EMA decay")
    seed: int = _field(0, "seed of the new weights, the data order and all training noise")
    # checkpoints, logging, outputs
    output_dir: str = _field("outputs/multistage", "pipeline, checkpoints and logs")
    checkpointing_steps: int = _field(500, "save a resumable checkpoint every N steps (and at the end)")
    checkpoints_total_limit: int | None = _field(None, "keep only this many checkpoints")
    resume_from_checkpoint: str | None = _field(None, "a checkpoint folder, or 'latest'")
    report_to: str = _field("tensorboard", "'tensorboard', 'none', ...")
    logging_dir: str = _field("logs", "tracker folder inside --output_dir")
    validation_steps: int = _field(500, "save a sample grid every N steps (0: never)")
    num_validation_images: int = _field(16, "images in a validation grid")
    num_inference_steps: int = _field(18, "sampler steps for validation, samples and FID")
    eval_fid_samples: int = _field(0, "samples for the final FID (0: skip)")
    push_to_hub: bool = _field(False, "upload the output folder (needs --hub_model_id)")
    hub_model_id: str | None = _field(None, "the Hub repository to push to")
    hub_token: str | None = _field(None, "the Hub token")

    def __post_init__(self):
        check_choices(self)
        if self.stage_sampling in STAGE_SAMPLING_ALIASES:
            new = STAGE_SAMPLING_ALIASES[self.stage_sampling]
            warnings.warn(
                f"`stage_sampling={self.stage_sampling!r}` is deprecated; use {new!r}.", FutureWarning, stacklevel=3
            )
            self.stage_sampling = new
        self._check_minimums()
        self._check_ranges()
        widths = parse_decoder_widths(self.decoder_block_out_channels)
        if widths is not None and self.model_type != "multi_decoder":
            raise ValueError("`decoder_block_out_channels` needs `model_type='multi_decoder'`.")
        if self.push_to_hub and not self.hub_model_id:
            raise ValueError("`push_to_hub` needs `hub_model_id`.")
        if self.stages_json is None:
            self.check_stages(self.num_stages if self.model_type == "multi_decoder" else 1)

    def _check_minimums(self) -> None:
        minimums = {
            "max_train_steps": 1,
            "train_batch_size": 1,
            "gradient_accumulation_steps": 1,
            "layers_per_block": 1,
            "resolution": 1,
            "num_stages": 1,
            "checkpointing_steps": 1,
            "num_validation_images": 1,
            "num_inference_steps": 1,
            "max_train_samples": 1,
            "checkpoints_total_limit": 1,
            "fdm_warmup_steps": 0,
            "lr_warmup_steps": 0,
            "dataloader_num_workers": 0,
            "validation_steps": 0,
            "eval_fid_samples": 0,
            "train_stage": 0,
        }
        for name, low in minimums.items():
            value = getattr(self, name)
            if value is not None and value < low:
                raise ValueError(f"`{name}` must be >= {low}, got {value}.")
        if not self.block_out_channels or min(self.block_out_channels) < 1:
            raise ValueError(f"`block_out_channels` must be positive widths, got {self.block_out_channels}.")

    def _check_ranges(self) -> None:
        if not 0 < self.sampler_sigma_min < self.sigma_max:
            raise ValueError(f"need 0 < `sigma_min` < `sigma_max`, got {self.sampler_sigma_min}, {self.sigma_max}.")
        for name in ("adam_beta1", "adam_beta2", "ema_decay"):
            if not 0 <= getattr(self, name) < 1:
                raise ValueError(f"`{name}` must lie in [0, 1), got {getattr(self, name)}.")
        for name in ("learning_rate", "fdm_m", "adam_epsilon"):
            if getattr(self, name) is not None and getattr(self, name) <= 0:
                raise ValueError(f"`{name}` must be > 0, got {getattr(self, name)}.")
        for name in ("adam_weight_decay", "max_grad_norm"):
            if getattr(self, name) < 0:
                raise ValueError(f"`{name}` must be >= 0, got {getattr(self, name)}.")

    @property
    def sampler_sigma_min(self) -> float:
        """``sigma_min``, or the authors' sampler's for the noise process (0.02 for VE, else 0.002)."""
        if self.sigma_min is not None:
            return self.sigma_min
        return FDM_SAMPLER_SIGMA_RANGES.get(self.noise_process.removesuffix("_fdm"), (0.002,))[0]

    @property
    def fdm_multiplier(self) -> float:
        """``fdm_m``, or the paper's for the noise process (1.0 for ve_fdm, else 2.0)."""
        return self.fdm_m if self.fdm_m is not None else FDM_PAPER_M.get(self.noise_process.removesuffix("_fdm"), 2.0)

    @property
    def loss_warmup_steps(self) -> int:
        """``fdm_warmup_steps``, or the authors' for the noise process (0 for the baselines: no warm-up)."""
        if self.fdm_warmup_steps is not None:
            return self.fdm_warmup_steps if "fdm" in self.noise_process else 0
        return PAPER_WARMUP_STEPS.get(self.noise_process, 0)

    @property
    def decoder_widths(self) -> list[list[int]] | None:
        """``decoder_block_out_channels`` parsed: one width list per stage, stage 0 first."""
        return parse_decoder_widths(self.decoder_block_out_channels)

    def check_stages(self, num_stages: int) -> None:
        """Check the stage-dependent fields against the run's number of stages (known once the stages are)."""
        widths = self.decoder_widths
        if widths is not None and len(widths) != num_stages:
            raise ValueError(
                f"`decoder_block_out_channels` gives {len(widths)} decoders but there are {num_stages} stages."
            )
        if self.train_stage is not None and not 0 <= self.train_stage < num_stages:
            raise ValueError(f"`train_stage` must lie in [0, {num_stages}), got {self.train_stage}.")
