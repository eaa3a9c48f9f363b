"""The DeMe job configs: defaults, command lines with today's flag names, and errors at construction."""

import dataclasses

import pytest

from diffusers_stages import StageLoraConfig, StageMergeConfig
from diffusers_stages.configs import config_parser, parse_config
from diffusers_stages.deme.config import DeMeJobConfig
from diffusers_stages.deme.norms_and_biases import peft_supports_norms_and_biases

MISSING_PATH = "/nonexistent/pipeline"  # never loaded: every error below is raised while building the config
TRAIN = {"pretrained_model_name_or_path": MISSING_PATH, "dataset_name": "digits"}
MERGE = {"pretrained_model_name_or_path": MISSING_PATH, "adapters_dir": "/nonexistent/a", "output_dir": "out"}

# the flags of train_stage_lora.py / merge_stage_adapters.py before they became configs
TRAIN_FLAGS = """pretrained_model_name_or_path dataset_name train_data_dir image_column caption_column max_train_samples
resolution train_batch_size max_train_steps learning_rate lr_scheduler lr_warmup_steps gradient_accumulation_steps
max_grad_norm adam_weight_decay mixed_precision checkpointing_steps checkpoints_total_limit resume_from_checkpoint
output_dir logging_dir report_to seed rank lora_alpha target_modules validation_prompt num_validation_images
validation_inference_steps push_to_hub hub_model_id hub_token stages_json num_stages stage consistency_loss
consistency_weight prob_sampling channel_projection""".split()
MERGE_FLAGS = """pretrained_model_name_or_path adapters_dir output_dir merge_weights grid_search grid_values dataset_name
train_data_dir image_column caption_column resolution num_heldout seed metrics_json push_to_hub hub_model_id hub_token
private""".split()


@pytest.mark.parametrize(
    "cls, flags", [(StageLoraConfig, TRAIN_FLAGS), (StageMergeConfig, MERGE_FLAGS)], ids=["train", "merge"]
)
def test_every_flag_of_the_scripts_is_a_documented_field(cls, flags):
    options = {s for a in config_parser(cls)._actions for s in a.option_strings}
    assert {f"--{f}" for f in flags} <= options
    docs = cls.__doc__ + DeMeJobConfig.__doc__
    for f in dataclasses.fields(cls):
        assert f"{f.name}" in docs and f.metadata.get("help"), f.name


def test_command_line_equals_python_config():
    argv = ["--pretrained_model_name_or_path", "sd", "--train_data_dir", "imgs", "--rank", "2", "--lora_alpha", "4"]
    argv += ["--target_modules", "to_q", "conv1", "--consistency_loss", "--mixed_precision", "bf16", "--stage", "1"]
    config = parse_config(StageLoraConfig, argv)
    assert config == StageLoraConfig(
        pretrained_model_name_or_path="sd",
        train_data_dir="imgs",
        rank=2,
        lora_alpha=4.0,
        target_modules=["to_q", "conv1"],
        consistency_loss=True,
        mixed_precision="bf16",
        stage=1,
    )
    assert config.max_train_steps == 1000 and config.target_modules is not StageLoraConfig(**TRAIN).target_modules
    merge = parse_config(
        StageMergeConfig, [*sum(([f"--{k}", v] for k, v in MERGE.items()), []), "--grid_search", "--dataset_name", "d"]
    )
    assert merge.grid_search and merge.grid_values == [0.0, 0.1, 0.2, 0.5, 1.0]


@pytest.mark.parametrize(
    "changes, field",
    [
        ({"dataset_name": None}, "dataset_name"),
        ({"train_data_dir": "imgs"}, "train_data_dir"),
        ({"rank": 0}, "rank"),
        ({"max_train_steps": 0}, "max_train_steps"),
        ({"train_batch_size": 0}, "train_batch_size"),
        ({"gradient_accumulation_steps": 0}, "gradient_accumulation_steps"),
        ({"checkpointing_steps": 0}, "checkpointing_steps"),
        ({"checkpoints_total_limit": 0}, "checkpoints_total_limit"),
        ({"learning_rate": 0.0}, "learning_rate"),
        ({"learning_rate": float("nan")}, "learning_rate"),
        ({"lora_alpha": -1.0}, "lora_alpha"),
        ({"prob_sampling": 1.5}, "prob_sampling"),
        ({"prob_sampling": -0.1}, "prob_sampling"),
        ({"consistency_weight": -1.0}, "consistency_weight"),
        ({"num_stages": 0}, "num_stages"),
        ({"stage": 4}, "stage"),
        ({"stage": -1}, "stage"),
        ({"resolution": 0}, "resolution"),
        ({"lr_scheduler": "step"}, "lr_scheduler"),
        ({"mixed_precision": "fp8"}, "mixed_precision"),
        ({"target_modules": []}, "target_modules"),
        ({"finetune": "full", "train_norms_and_biases": True}, "train_norms_and_biases"),
        ({"pretrained_model_name_or_path": ""}, "pretrained_model_name_or_path"),
    ],
)
def test_invalid_training_config_names_the_field(changes, field):
    with pytest.raises(ValueError, match=f"`{field}`"):
        StageLoraConfig(**{**TRAIN, **changes})


@pytest.mark.parametrize(
    "changes, field",
    [
        ({}, "merge_weights"),
        ({"merge_weights": [0.5], "grid_search": True}, "grid_search"),
        ({"grid_search": True}, "dataset_name"),
        ({"merge_weights": [float("inf")]}, "merge_weights"),
        ({"grid_search": True, "dataset_name": "digits", "grid_values": []}, "grid_values"),
        ({"grid_search": True, "dataset_name": "digits", "num_heldout": 0}, "num_heldout"),
        ({"merge_weights": [0.5], "output_dir": ""}, "output_dir"),
    ],
)
def test_invalid_merge_config_names_the_field(changes, field):
    with pytest.raises(ValueError, match=f"`{field}`"):
        StageMergeConfig(**{**MERGE, **changes})


def test_stage_with_stages_json_is_checked_when_the_stages_are_read():
    assert StageLoraConfig(**TRAIN, stage=7, stages_json="stages.json").stage == 7


def test_command_line_errors_exit_with_the_message(capsys):
    with pytest.raises(SystemExit):
        parse_config(StageMergeConfig, ["--pretrained_model_name_or_path", "x", "--adapters_dir", "y"])  # no output
    with pytest.raises(SystemExit):
        parse_config(StageLoraConfig, ["--pretrained_model_name_or_path", "x", "--dataset_name", "d", "--rank", "0"])
    assert "`rank` must be >= 1" in capsys.readouterr().err


@pytest.mark.skipif(peft_supports_norms_and_biases(), reason="the installed PEFT supports the option")
def test_train_norms_and_biases_is_refused_on_an_older_peft_naming_the_version():
    with pytest.raises(ValueError, match=r"needs peft>=0\.20"):
        StageLoraConfig(**TRAIN, train_norms_and_biases=True)
