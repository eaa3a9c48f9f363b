"""Typed configs of the two DeMe jobs: finetuning one LoRA adapter per stage, and merging them into one UNet.

Each dataclass is the single list of a job's options and defaults: ``training/train_stage_lora.py`` and
``training/merge_stage_adapters.py`` build them from the command line with `diffusers_stages.configs.parse_config`
(one ``--flag`` per field), and Python users build them directly. Invalid values raise a `ValueError` naming the
field when the config is built, before any model or data is loaded.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Literal

from ..configs import check_choices
from .adapters import DEFAULT_TARGET_MODULES


def _check_at_least(config, minimum: float, *names: str) -> None:
    """Every field in ``names`` that is not `None` must be ``>= minimum``."""
    for name in names:
        value = getattr(config, name)
        if value is not None and not value >= minimum:
            raise ValueError(f"`{name}` must be >= {minimum}, got {value!r}.")


def _check_positive(config, *names: str) -> None:
    """Every field in ``names`` that is not `None` must be a finite number ``> 0``."""
    for name in names:
        value = getattr(config, name)
        if value is not None and not (value > 0 and math.isfinite(value)):
            raise ValueError(f"`{name}` must be a finite number > 0, got {value!r}.")


@dataclass(kw_only=True)
class DeMeJobConfig:
    r"""
    The options and checks shared by `StageLoraConfig` and `StageMergeConfig`: the base model, the data (training
    images, or held-out images for the merge's grid search), the seed and the Hub upload.

    Args:
        pretrained_model_name_or_path (`str`, required): A local pipeline folder: Stable Diffusion (VAE, CLIP text
            encoder, `UNet2DConditionModel`) or pixel (`UNet2DModel`, e.g. a saved `DDPMPipeline`, or a
            `MultiDecoderUNet2DModel`), with a DDPM-family scheduler or an ``FDMEDMScheduler`` (sigma space: DeMe
            then finetunes with the base's own objective, ``lambda(sigma) |D - x0|^2``).
        dataset_name (`str`, *optional*): A `datasets` name, or ``"mnist"`` / ``"digits"``. Exactly one of
            ``dataset_name`` and ``train_data_dir`` where the job reads data.
        train_data_dir (`str`, *optional*): An image folder (``metadata.jsonl`` for captions).
        image_column (`str`, defaults to ``"image"``): The dataset's image column.
        caption_column (`str`, defaults to ``"text"``): The dataset's caption column (Stable Diffusion).
        resolution (`int`, defaults to 512): Images are resized and center-cropped to this size.
        seed (`int`, defaults to 0): Seed of every batch, noise and timestep draw.
        push_to_hub (`bool`, defaults to `False`): Upload the output folder to the Hub (needs ``hub_model_id``).
        hub_model_id (`str`, *optional*): The Hub repo, ``"user/name"`` (defaults to the name of ``output_dir``; the
            repo is created when the job starts, so a bad token fails before any work).
        hub_token (`str`, *optional*): A write token (defaults to the logged-in one).
        private (`bool`, defaults to `False`): Create the Hub repo private.
        overwrite_output_dir (`bool`, defaults to `False`): Write into a non-empty ``output_dir`` that is not this
            job's (a LoRA run that does not resume, a merge over a folder that is not a merged pipeline). The inputs
            (``pretrained_model_name_or_path``, ``adapters_dir``) are never overwritten.
    """

    pretrained_model_name_or_path: str = field(metadata={"help": "local pipeline folder (SD or DDPM)"})
    dataset_name: str | None = field(default=None, metadata={"help": "a `datasets` name, or 'mnist' / 'digits'"})
    train_data_dir: str | None = field(
        default=None, metadata={"help": "an image folder (metadata.jsonl for captions)"}
    )
    image_column: str = field(default="image", metadata={"help": "the dataset's image column"})
    caption_column: str = field(default="text", metadata={"help": "the dataset's caption column"})
    resolution: int = field(default=512, metadata={"help": "image size after resize and center crop"})
    seed: int = field(default=0, metadata={"help": "seed of every batch, noise and timestep draw"})
    push_to_hub: bool = field(default=False, metadata={"help": "upload the output folder to the Hub"})
    hub_model_id: str | None = field(
        default=None, metadata={"help": "the Hub repo, 'user/name' (default: the name of --output_dir)"}
    )
    hub_token: str | None = field(default=None, metadata={"help": "a Hub write token"})
    private: bool = field(default=False, metadata={"help": "create the Hub repo private"})
    overwrite_output_dir: bool = field(
        default=False, metadata={"help": "write into a non-empty output_dir that is not this job's"}
    )

    def __post_init__(self):
        check_choices(self)
        if not self.pretrained_model_name_or_path:
            raise ValueError("`pretrained_model_name_or_path` must name a pipeline folder, got an empty value.")
        _check_at_least(self, 1, "resolution")

    def check_data_source(self, needed_for: str) -> None:
        """Raise unless exactly one of ``dataset_name`` and ``train_data_dir`` is set (``needed_for`` names why)."""
        if (self.dataset_name is None) == (self.train_data_dir is None):
            raise ValueError(f"{needed_for} needs exactly one of `dataset_name` and `train_data_dir`.")

    @property
    def data_source(self) -> str | None:
        """The dataset name or image folder, whichever is set."""
        return self.dataset_name or self.train_data_dir


LrSchedulerName = Literal["linear", "cosine", "cosine_with_restarts", "polynomial", "constant", "constant_with_warmup"]


@dataclass(kw_only=True)
class StageLoraConfig(DeMeJobConfig):
    r"""
    Decouple-then-Merge finetuning with one LoRA adapter per timestep stage (`train_stage_lora`).

    All stages train in one run by default (round robin, one optimizer and LR schedule per stage, one frozen base in
    memory); ``stage=k`` trains one stage. Every batch, noise and timestep of stage ``k`` at step ``s`` comes from
    generators keyed by ``(seed, k, s, micro-batch)`` and the global sample index, so a single-stage run reproduces the
    same stage of an all-stages run, a resumed run ends with the same adapters as an uninterrupted one, and ``N``
    processes x ``train_batch_size`` B train what one process x ``N B`` trains.

    Args:
        pretrained_model_name_or_path, dataset_name, train_data_dir, image_column, caption_column, resolution, seed,
        push_to_hub, hub_model_id, hub_token, private:
            As in `DeMeJobConfig` (exactly one of ``dataset_name`` / ``train_data_dir``).
        max_train_samples (`int`, *optional*): Use only the first samples of the dataset.
        train_batch_size (`int`, defaults to 16): Batch size of one stage's micro-batch on each process (the global
            batch of a stage's step is ``train_batch_size x num_processes x gradient_accumulation_steps``).
        max_train_steps (`int`, defaults to 1000): Optimizer steps PER STAGE.
        learning_rate (`float`, defaults to 1e-4): AdamW learning rate.
        lr_scheduler (`str`, defaults to ``"constant"``): A diffusers `get_scheduler` name.
        lr_warmup_steps (`int`, defaults to 0): Warm-up steps of the LR schedule.
        gradient_accumulation_steps (`int`, defaults to 1): Micro-batches per optimizer step.
        max_grad_norm (`float`, defaults to 1.0): Gradient clipping norm.
        adam_weight_decay (`float`, defaults to 1e-2): AdamW weight decay.
        mixed_precision (`str`, *optional*): ``"no"``, ``"fp16"`` or ``"bf16"`` (default: accelerate's config). The
            trainable LoRA weights stay fp32; the VAE and text encoder are cast.
        checkpointing_steps (`int`, defaults to 500): Save an accelerate checkpoint every this many steps.
        checkpoints_total_limit (`int`, *optional*): Keep at most this many checkpoints.
        resume_from_checkpoint (`str`, *optional*): A checkpoint folder, or ``"latest"`` in ``output_dir``.
        output_dir (`str`, defaults to ``"deme-lora"``): Where the adapters (``stages.json``, ``stage{k}/``) go.
        logging_dir (`str`, defaults to ``"logs"``): Tracker folder inside ``output_dir``.
        report_to (`str`, defaults to ``"none"``): An accelerate tracker (``"tensorboard"``, ``"wandb"``, ``"all"``)
            or ``"none"``.
        rank (`int`, defaults to 4): LoRA rank ``r``.
        lora_alpha (`float`, *optional*): LoRA ``alpha`` (the update is ``alpha / r B A``); defaults to the rank.
        target_modules (`list[str]`, defaults to ``["all-linear-conv"]``): Adapted layers: PEFT module names;
            ``"all-linear-conv"`` is every ``nn.Linear`` and ``nn.Conv2d`` of the UNet (``to_q to_k to_v to_out.0``:
            attention only, the former default).
        train_norms_and_biases (`bool`, defaults to `False`): Each stage also trains its own copy of every
            ``GroupNorm`` / ``LayerNorm`` affine weight and bias, and a bias update on every adapted layer that has
            a bias (ours, a step from LoRA toward the paper's full finetuning; the merge stays exact:
            ``theta + sum_k w_k tau_k`` for these parameters too). LoRA only.
        validation_prompt (`str`, *optional*): Sample this prompt stage-aware after training (Stable Diffusion).
        num_validation_images (`int`, defaults to 2): Validation images.
        validation_inference_steps (`int`, defaults to 25): Sampling steps of the validation.
        stages_json (`str`, *optional*): A ``stages.json``; default: the base's own stages for a multi-decoder base
            (its ``stages.json``), else ``num_stages`` uniform stages.
        num_stages (`int`, defaults to 4): Number of uniform stages without ``stages_json`` (ignored, with a
            warning, for a multi-decoder base).
        stage (`int`, *optional*): Train only this stage (stage 0 is the least noisy); all stages by default.
        stage_parallel (`bool`, defaults to `False`): Under ``N`` processes, process ``r`` trains stages
            ``r, r + N, ...`` on its own (no gradient exchange) and saves them into the shared ``output_dir``; by
            default every process trains every stage data-parallel (gradients averaged over the processes).
        consistency_loss (`bool`, defaults to `False`): DeMe's consistency term (teacher: the adapters off).
        consistency_weight (`float`, defaults to 1.0): Its weight ``lambda``.
        prob_sampling (`float`, defaults to 0.0): DeMe's probabilistic sampling ``p`` in ``[0, 1]`` (paper: 0.3).
        channel_projection (`bool`, defaults to `False`): DeMe's channel-wise projection.
        finetune (`str`, defaults to ``"lora"``): ``"lora"`` (one adapter per stage) or ``"full"`` (every parameter,
            the paper's method: stages train one after another, each saved as a task vector ``theta_k - theta``).
        task_vector_dtype (`str`, defaults to ``"bf16"``): Storage dtype of full-finetuning task vectors
            (``"bf16"``, ``"fp16"`` or ``"fp32"``).
        use_ema (`bool`, defaults to `False`): Keep an EMA of each stage's finetuned weights and save (merge) it.
        ema_max_decay (`float`, defaults to 0.9999): EMA decay cap (the authors' value).
        ema_inv_gamma (`float`, defaults to 1.0): EMA warm-up ``inv_gamma`` (the authors' value).
        ema_power (`float`, defaults to 0.75): EMA warm-up power (the authors' value).
        antithetic_timesteps (`bool`, defaults to `False`): The authors' timestep draw: antithetic pairs ``t`` /
            ``lo + hi - 1 - t``, with ``prob_sampling`` choosing the range per batch (integer timesteps: refused for
            a sigma-space base).
        adam_beta1 (`float`, defaults to 0.9): AdamW ``beta1`` (the authors' script: 0.95).
        adam_beta2 (`float`, defaults to 0.999): AdamW ``beta2``.
    """

    max_train_samples: int | None = field(default=None, metadata={"help": "use only the first samples"})
    train_batch_size: int = field(default=16, metadata={"help": "per-process batch of a stage's micro-batch"})
    max_train_steps: int = field(default=1000, metadata={"help": "optimizer steps per stage"})
    learning_rate: float = field(default=1e-4, metadata={"help": "AdamW learning rate"})
    lr_scheduler: LrSchedulerName = field(default="constant", metadata={"help": "LR schedule"})
    lr_warmup_steps: int = field(default=0, metadata={"help": "warm-up steps of the LR schedule"})
    gradient_accumulation_steps: int = field(default=1, metadata={"help": "micro-batches per optimizer step"})
    max_grad_norm: float = field(default=1.0, metadata={"help": "gradient clipping norm"})
    adam_weight_decay: float = field(default=1e-2, metadata={"help": "AdamW weight decay"})
    mixed_precision: Literal["no", "fp16", "bf16"] | None = field(
        default=None, metadata={"help": "mixed precision (default: accelerate's config)"}
    )
    checkpointing_steps: int = field(default=500, metadata={"help": "save a checkpoint every this many steps"})
    checkpoints_total_limit: int | None = field(default=None, metadata={"help": "keep at most this many"})
    resume_from_checkpoint: str | None = field(default=None, metadata={"help": "a checkpoint folder or 'latest'"})
    output_dir: str = field(default="deme-lora", metadata={"help": "where the adapters go"})
    logging_dir: str = field(default="logs", metadata={"help": "tracker folder inside output_dir"})
    report_to: str = field(default="none", metadata={"help": "'tensorboard', 'wandb', 'all' or 'none'"})
    rank: int = field(default=4, metadata={"help": "LoRA rank"})
    lora_alpha: float | None = field(default=None, metadata={"help": "LoRA alpha (default: the rank)"})
    target_modules: list[str] = field(
        default_factory=lambda: list(DEFAULT_TARGET_MODULES),
        metadata={"help": "adapted layers ('all-linear-conv': every linear and conv layer)"},
    )
    train_norms_and_biases: bool = field(
        default=False,
        metadata={"help": "per-stage copies of the norms and biases of the adapted layers, trained and merged (ours)"},
    )
    validation_prompt: str | None = field(default=None, metadata={"help": "sample this prompt after training"})
    num_validation_images: int = field(default=2, metadata={"help": "validation images"})
    validation_inference_steps: int = field(default=25, metadata={"help": "sampling steps of the validation"})
    stages_json: str | None = field(default=None, metadata={"help": "a stages.json (default: uniform --num_stages)"})
    num_stages: int = field(default=4, metadata={"help": "number of uniform stages without --stages_json"})
    stage: int | None = field(default=None, metadata={"help": "train only this stage"})
    stage_parallel: bool = field(
        default=False,
        metadata={"help": "several processes: process r trains stages r, r + N, ... alone (no gradient exchange)"},
    )
    consistency_loss: bool = field(default=False, metadata={"help": "DeMe's consistency term (teacher: adapters off)"})
    consistency_weight: float = field(default=1.0, metadata={"help": "weight of the consistency term"})
    prob_sampling: float = field(default=0.0, metadata={"help": "DeMe's probabilistic sampling p (paper 0.3)"})
    channel_projection: bool = field(default=False, metadata={"help": "DeMe's channel-wise projection"})
    finetune: Literal["lora", "full"] = field(
        default="lora", metadata={"help": "'lora' adapters, or 'full' finetuning (the paper's; task vectors)"}
    )
    task_vector_dtype: Literal["bf16", "fp16", "fp32"] = field(
        default="bf16", metadata={"help": "storage dtype of full-finetuning task vectors"}
    )
    use_ema: bool = field(default=False, metadata={"help": "EMA of each stage's weights, saved and merged"})
    ema_max_decay: float = field(default=0.9999, metadata={"help": "EMA decay cap"})
    ema_inv_gamma: float = field(default=1.0, metadata={"help": "EMA warm-up inv_gamma"})
    ema_power: float = field(default=0.75, metadata={"help": "EMA warm-up power"})
    antithetic_timesteps: bool = field(
        default=False, metadata={"help": "the authors' antithetic timestep pairs (p chosen per batch)"}
    )
    adam_beta1: float = field(default=0.9, metadata={"help": "AdamW beta1 (authors: 0.95)"})
    adam_beta2: float = field(default=0.999, metadata={"help": "AdamW beta2"})

    def __post_init__(self):
        super().__post_init__()
        self.check_data_source("DeMe finetuning")
        _check_at_least(self, 1, "train_batch_size", "max_train_steps", "gradient_accumulation_steps", "rank")
        _check_at_least(self, 1, "checkpointing_steps", "checkpoints_total_limit", "max_train_samples")
        _check_at_least(self, 1, "num_validation_images", "validation_inference_steps", "num_stages")
        _check_at_least(self, 0, "lr_warmup_steps", "adam_weight_decay", "consistency_weight", "stage")
        _check_positive(self, "learning_rate", "max_grad_norm", "lora_alpha")
        if not 0.0 <= self.prob_sampling <= 1.0:
            raise ValueError(f"`prob_sampling` must be in [0, 1], got {self.prob_sampling!r}.")
        if self.stage is not None and self.stages_json is None and self.stage >= self.num_stages:
            raise ValueError(f"`stage` must be in [0, {self.num_stages}) (`num_stages`), got {self.stage}.")
        if self.stage_parallel and self.stage is not None:
            raise ValueError("`stage_parallel` chooses the stages per process; do not also set `stage`.")
        if not self.target_modules:
            raise ValueError("`target_modules` must name at least one layer, got an empty list.")
        _check_positive(self, "ema_inv_gamma", "ema_power")
        for name in ("ema_max_decay", "adam_beta1", "adam_beta2"):
            if not 0.0 <= getattr(self, name) < 1.0:
                raise ValueError(f"`{name}` must be in [0, 1), got {getattr(self, name)!r}.")
        for name in ("channel_projection", "train_norms_and_biases"):
            if self.finetune == "full" and getattr(self, name):
                raise ValueError(f"`{name}` needs `finetune='lora'` (full finetuning trains every weight).")
        if self.train_norms_and_biases:
            from .norms_and_biases import check_peft_supports_norms_and_biases

            check_peft_supports_norms_and_biases()


@dataclass(kw_only=True)
class StageMergeConfig(DeMeJobConfig):
    r"""
    Merge per-stage LoRA adapters into one plain UNet and write a stock diffusers pipeline folder (`merge_stages`).

    The folder (``model_index.json``, safetensors components, ``stages.json``, ``deme_merge.json`` and a model card
    ``README.md``) loads with ``DiffusionPipeline.from_pretrained`` without this package.

    Args:
        pretrained_model_name_or_path, dataset_name, train_data_dir, image_column, caption_column, resolution, seed,
        push_to_hub, hub_model_id, hub_token, private:
            As in `DeMeJobConfig`; the data is the held-out set of ``grid_search`` (exactly one of ``dataset_name``
            / ``train_data_dir`` there) and ``seed`` seeds its timesteps and noise.
        adapters_dir (`str`, required): Output of `train_stage_lora` (``stages.json`` and ``stage{k}/``).
        output_dir (`str`, required): Where the merged pipeline goes.
        merge_weights (`list[float]`, *optional*): ``w_k``, one per stage, stage 0 (least noisy) first.
        grid_search (`bool`, defaults to `False`): Choose the weights on a held-out denoising loss instead. Exactly
            one of ``merge_weights`` and ``grid_search``.
        grid_values (`list[float]`, defaults to ``[0.0, 0.1, 0.2, 0.5, 1.0]``): Per-stage values of the grid (0 leaves
            a stage out; the authors' LSUN weights 0.1, 0.1, 0.2, 0.5 are on it).
        num_heldout (`int`, defaults to 256): Held-out samples of the grid search.
        merge_method (`str`, defaults to ``"task_arithmetic"``): ``"task_arithmetic"`` (DeMe's) or ``"ties"``.
        ties_density (`float`, defaults to 0.2): Fraction of each task vector kept by TIES' trim, in ``(0, 1]``.
        score (`str`, defaults to ``"loss"``): Grid-search score: ``"loss"`` (held-out denoising loss) or ``"fid"``
            (FID of samples against the held-out images, classifier-free features of `ClassifierFeatureExtractor` /
            Inception where available).
        num_fid_samples (`int`, defaults to 256): Samples per candidate when ``score="fid"``.
        fid_inference_steps (`int`, defaults to 25): Sampling steps per candidate when ``score="fid"``.
        device (`str`, *optional*): Device of the grid search (default: CUDA when available, else CPU).
        metrics_json (`str`, *optional*): Measured metrics (a JSON object) to show in the model card.
    """

    adapters_dir: str = field(metadata={"help": "output of train_stage_lora.py (stages.json + stage{k}/)"})
    output_dir: str = field(metadata={"help": "where the merged pipeline goes"})
    merge_weights: list[float] | None = field(default=None, metadata={"help": "w_k, stage 0 (least noisy) first"})
    grid_search: bool = field(default=False, metadata={"help": "choose the weights on a held-out denoising loss"})
    grid_values: list[float] = field(
        default_factory=lambda: [0.0, 0.1, 0.2, 0.5, 1.0], metadata={"help": "per-stage values of the grid"}
    )
    num_heldout: int = field(default=256, metadata={"help": "held-out samples of the grid search"})
    merge_method: Literal["task_arithmetic", "ties"] = field(
        default="task_arithmetic", metadata={"help": "'task_arithmetic' (DeMe's) or 'ties'"}
    )
    ties_density: float = field(default=0.2, metadata={"help": "fraction kept by TIES' trim"})
    score: Literal["loss", "fid"] = field(default="loss", metadata={"help": "grid-search score: 'loss' or 'fid'"})
    num_fid_samples: int = field(default=256, metadata={"help": "samples per candidate when --score fid"})
    fid_inference_steps: int = field(default=25, metadata={"help": "sampling steps per candidate (--score fid)"})
    device: str | None = field(default=None, metadata={"help": "device of the grid search (default: cuda if any)"})
    metrics_json: str | None = field(default=None, metadata={"help": "measured metrics to show in the model card"})

    def __post_init__(self):
        super().__post_init__()
        if (self.merge_weights is None) == (not self.grid_search):
            raise ValueError("Pass exactly one of `merge_weights` and `grid_search`.")
        if self.grid_search:
            self.check_data_source("`grid_search`")
        _check_at_least(self, 1, "num_heldout", "num_fid_samples", "fid_inference_steps")
        if not 0.0 < self.ties_density <= 1.0:
            raise ValueError(f"`ties_density` must be in (0, 1], got {self.ties_density!r}.")
        for name in ("merge_weights", "grid_values"):
            values = getattr(self, name)
            if values is not None and (not values or not all(math.isfinite(v) for v in values)):
                raise ValueError(f"`{name}` must hold finite numbers, got {values!r}.")
        for name in ("adapters_dir", "output_dir"):
            if not getattr(self, name):
                raise ValueError(f"`{name}` must be a folder path, got an empty value.")
