import dataclasses
import os
import subprocess
import sys
from pathlib import Path

import pytest

from diffusers_stages import TDCConfig, TrainingConfig, train
from diffusers_stages.configs import config_parser, parse_config

REPO = Path(__file__).resolve().parents[2]

# the flags of train_multistage.py before the typed config (diffusers' example names): none may disappear
OLD_FLAGS = (
    "pretrained_model_name_or_path model_type block_out_channels layers_per_block decoder_block_out_channels "
    "dataset_name train_data_dir image_column caption_column max_train_samples resolution dataloader_num_workers "
    "noise_process prediction_type fdm_m fdm_warmup_steps sigma_min sigma_max stages_json num_stages stage_sampling "
    "train_stage train_batch_size max_train_steps learning_rate lr_scheduler lr_warmup_steps adam_beta1 adam_beta2 "
    "adam_weight_decay adam_epsilon max_grad_norm gradient_accumulation_steps mixed_precision use_ema ema_decay seed "
    "output_dir checkpointing_steps checkpoints_total_limit resume_from_checkpoint report_to logging_dir "
    "validation_steps num_validation_images num_inference_steps eval_fid_samples push_to_hub hub_model_id hub_token"
).split()


@pytest.mark.parametrize(
    "field, value",
    [
        ("max_train_steps", 0),
        ("train_batch_size", 0),
        ("gradient_accumulation_steps", 0),
        ("resolution", 0),
        ("num_stages", 0),
        ("checkpointing_steps", 0),
        ("max_train_samples", 0),
        ("validation_steps", -1),
        ("train_stage", -1),
        ("block_out_channels", []),
        ("sigma_min", 0.0),
        ("sigma_min", 100.0),  # above sigma_max
        ("learning_rate", 0.0),
        ("fdm_m", -1.0),
        ("ema_decay", 1.0),
        ("adam_beta2", 1.5),
        ("max_grad_norm", -1.0),
        ("noise_process", "vp-momentum"),
        ("model_type", "experts"),
        ("stage_sampling", "random"),
        ("prediction_type", "x0"),
        ("mixed_precision", "fp8"),
        ("lr_scheduler", "cosine_annealing"),
        ("decoder_block_out_channels", "16,32;8,16"),  # needs model_type="multi_decoder"
        ("push_to_hub", True),  # needs hub_model_id
    ],
)
def test_invalid_values_raise_naming_the_field(field, value):
    with pytest.raises(ValueError, match=f"`{field}`"):
        TrainingConfig(**{field: value})


@pytest.mark.parametrize(
    "fields, match",
    [
        (dict(model_type="multi_decoder", num_stages=2, decoder_block_out_channels="16,32;x"), "decoder_block_out"),
        (dict(model_type="multi_decoder", num_stages=2, decoder_block_out_channels="16,32;16,32;8,16"), "3 decoders"),
        (dict(model_type="multi_decoder", num_stages=2, train_stage=2), "`train_stage` must lie in \\[0, 2\\)"),
        (dict(train_stage=1), "`train_stage` must lie in \\[0, 1\\)"),  # a unified model has one stage
    ],
)
def test_stage_dependent_fields_are_checked_when_the_stages_are_known(fields, match):
    with pytest.raises(ValueError, match=match):
        TrainingConfig(**fields)
    # with a stages.json, the count is only known when the run loads it
    TrainingConfig(**{**fields, "stages_json": "somewhere"}) if "x" not in str(fields) else None


def test_decoder_widths_parse_both_forms():
    config = TrainingConfig(model_type="multi_decoder", num_stages=2, decoder_block_out_channels="16,32;8,16")
    assert config.decoder_widths == [[16, 32], [8, 16]]
    config = dataclasses.replace(config, decoder_block_out_channels="[[16, 32], [8, 16]]")
    assert config.decoder_widths == [[16, 32], [8, 16]]
    assert TrainingConfig().decoder_widths is None


@pytest.mark.parametrize(
    "field, value",
    [
        ("noise_process", "edm"),
        ("model_type", "multi_decoder"),
        ("phase1_fraction", 1.0),
        ("phase1_fraction", 0.0),
        ("num_groups", 0),
        ("prune_k", 0.0),
        ("prune_k", 1.5),
        ("width_ratio", 1.0),
        ("difficulty_weight", 2.0),
        ("full_size_at", "middle"),
        ("proxy_heldout_images", 0),
        ("proxy_finetune_steps", -1),
        ("max_train_steps", 0),  # the trainer's checks hold for TDC too
    ],
)
def test_tdc_invalid_values_raise_naming_the_field(field, value):
    with pytest.raises(ValueError, match=f"`{field}`"):
        TDCConfig(**{field: value})


def test_tdc_config_is_a_training_config_with_its_own_defaults():
    config = TDCConfig()
    assert isinstance(config, TrainingConfig)
    assert (config.noise_process, config.output_dir, config.validation_steps) == ("ddpm", "outputs/tdc", 0)
    assert config.max_train_steps == TrainingConfig().max_train_steps
    assert parse_config(TDCConfig, []) == config and parse_config(TrainingConfig, []) == TrainingConfig()
    with pytest.raises(ValueError, match="`train_stage`"):  # sub-runs are rebuilt and re-checked
        dataclasses.replace(config, train_stage=5)


def test_the_command_line_keeps_every_flag_and_shows_the_defaults():
    parser = config_parser(TrainingConfig)
    flags = {a.dest for a in parser._actions}
    assert set(OLD_FLAGS) <= flags
    text = " ".join(parser.format_help().split())
    assert "(default: 1000)" in text and "(default: outputs/multistage)" in text and "Multi-stage" in text
    config = parse_config(
        TrainingConfig, ["--model_type", "multi_decoder", "--block_out_channels", "16", "32", "--use_ema"]
    )
    assert config == TrainingConfig(model_type="multi_decoder", block_out_channels=[16, 32], use_ema=True)
    tdc_help = " ".join(config_parser(TDCConfig).format_help().split())
    assert "--phase1_fraction" in tdc_help and "(default: outputs/tdc)" in tdc_help


def test_documented_fields_match_the_dataclass():
    for cls in (TrainingConfig, TDCConfig):
        own = [f.name for f in dataclasses.fields(cls)]
        documented = [name for name in own if f"    {name} (`" in cls.__doc__ or f"    {name} (" in cls.__doc__]
        missing = set(own) - set(documented)
        if cls is TDCConfig:  # TDCConfig documents its own fields and refers to TrainingConfig for the rest
            missing -= {f.name for f in dataclasses.fields(TrainingConfig)}
        assert not missing, missing
        assert all(f.metadata.get("help") for f in dataclasses.fields(cls))


@pytest.mark.parametrize("script", ["train_multistage.py", "train_tdc.py"])
def test_scripts_help_lists_the_fields_with_defaults(script):
    out = subprocess.run(
        [sys.executable, str(REPO / "training" / script), "--help"],
        capture_output=True,
        text=True,
        timeout=120,
        env={**os.environ, "PYTHONPATH": str(REPO)},
        check=True,
    ).stdout
    out = " ".join(out.split())
    assert "--max_train_steps MAX_TRAIN_STEPS" in out and "optimisation steps (default: 1000)" in out
    assert ("--num_groups" in out) == (script == "train_tdc.py")


def test_train_from_python_without_a_command_line(tmp_path, monkeypatch):
    monkeypatch.setattr(sys, "argv", ["not-a-training-script", "--bogus"])  # argparse would choke on it
    metrics = train(
        TrainingConfig(
            max_train_steps=2,
            resolution=8,
            block_out_channels=[16, 32],
            max_train_samples=16,
            train_batch_size=8,
            num_inference_steps=1,
            report_to="none",
            output_dir=str(tmp_path / "run"),
        )
    )
    assert metrics["max_train_steps"] == 2 and (tmp_path / "run" / "model_index.json").exists()


@pytest.mark.parametrize(
    "noise_process, m, warmup_steps, sigma_min",
    [  # sail-sg/FDM: README's CIFAR-10 commands, EDM's sampler clamped to the network's range, VE ignoring m
        ("edm_fdm", 2.0, 200, 0.002),
        ("vp_fdm", 2.0, 400, 0.002),
        ("ve_fdm", 1.0, 400, 0.02),
        ("fdm", 2.0, 400, 0.002),
        ("edm", 2.0, 0, 0.002),
        ("vp", 2.0, 0, 0.002),
        ("ve", 1.0, 0, 0.02),  # m is unused by a baseline; the scheduler stores the variant's
        ("ddpm", 2.0, 0, 0.002),
    ],
)
def test_fdm_defaults_are_the_papers_per_variant(noise_process, m, warmup_steps, sigma_min):
    config = TrainingConfig(noise_process=noise_process)
    assert (config.fdm_multiplier, config.loss_warmup_steps, config.sampler_sigma_min) == (m, warmup_steps, sigma_min)
    config = TrainingConfig(noise_process=noise_process, fdm_m=3.0, fdm_warmup_steps=7, sigma_min=0.01)
    want_steps = 7 if "fdm" in noise_process else 0  # the baselines never warm up
    assert (config.fdm_multiplier, config.loss_warmup_steps, config.sampler_sigma_min) == (3.0, want_steps, 0.01)


@pytest.mark.parametrize(
    "old, new",
    [
        ("weighted", "stage_per_batch_weighted"),
        ("uniform", "stage_per_batch_uniform"),
        ("per_sample", "stage_per_sample"),
    ],
)
def test_old_stage_sampling_names_are_deprecated_aliases(old, new):
    with pytest.warns(FutureWarning, match=new):
        config = TrainingConfig(stage_sampling=old)
    assert config.stage_sampling == new
    assert parse_config(TrainingConfig, ["--stage_sampling", old]).stage_sampling == new
