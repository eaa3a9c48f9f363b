"""`train_stage_lora` from Python (no command line), under mixed precision with validation."""

import json

import pytest
import torch
from diffusers import UNet2DConditionModel
from safetensors.torch import load_file

from diffusers_stages import StageLoraAdapters, StageLoraConfig, StageMergeConfig, merge_stages, train_stage_lora
from diffusers_stages.deme.norms_and_biases import peft_supports_norms_and_biases


def tiny_config(sd_folder, **fields) -> StageLoraConfig:
    """One step of two rank-2 stage adapters on the tiny SD pipeline and its 4 captioned images."""
    sd, data = sd_folder
    base = dict(pretrained_model_name_or_path=str(sd), train_data_dir=str(data), resolution=32, train_batch_size=2)
    return StageLoraConfig(**base, max_train_steps=1, num_stages=2, rank=2, **fields)


def test_train_from_python_with_mixed_precision_validates_and_saves(sd_folder, tmp_path, fresh_accelerator_state):
    """Validation used to crash under mixed precision (fp32 UNet output into the bf16 VAE) and skip the upload."""
    sd, _ = sd_folder
    config = tiny_config(
        sd_folder,
        learning_rate=1e-2,
        mixed_precision="bf16",
        validation_prompt="a digit",
        num_validation_images=1,
        validation_inference_steps=2,
        output_dir=str(tmp_path / "out"),
    )
    out = train_stage_lora(config)
    assert out == config.output_dir
    assert (tmp_path / "out" / "validation" / "0.png").is_file()  # validation ran in the run's precision
    weights = load_file(tmp_path / "out" / "stage1" / "pytorch_lora_weights.safetensors")
    assert all(v.dtype == torch.float32 for v in weights.values())  # trainable weights stayed fp32
    assert any(v.abs().max() > 0 for k, v in weights.items() if "lora_B" in k)
    info = json.loads((tmp_path / "out" / "stage1" / "stage_adapter.json").read_text())
    assert info["training"]["mixed_precision"] == "bf16"
    StageLoraAdapters.from_pretrained(UNet2DConditionModel.from_pretrained(sd / "unet"), out)  # loads on the base


@pytest.mark.skipif(not peft_supports_norms_and_biases(), reason="train_norms_and_biases needs a newer PEFT")
def test_norms_and_biases_are_trained_per_stage_saved_and_merged(sd_folder, tmp_path, fresh_accelerator_state):
    """`train_norms_and_biases`: each stage's file holds its trained norm copies and LoRA biases; the merge job reads
    them and records the option."""
    sd, _ = sd_folder
    out = train_stage_lora(
        tiny_config(sd_folder, learning_rate=1e-2, train_norms_and_biases=True, output_dir=str(tmp_path / "out"))
    )
    base = UNet2DConditionModel.from_pretrained(sd / "unet").state_dict()
    for k in (0, 1):
        weights = load_file(tmp_path / "out" / f"stage{k}" / "pytorch_lora_weights.safetensors")
        norm = weights["unet.down_blocks.0.resnets.0.norm1.weight"]
        assert not torch.equal(norm, base["down_blocks.0.resnets.0.norm1.weight"])  # trained away from the base
        assert weights["unet.down_blocks.0.resnets.0.conv1.lora_B.bias"].abs().max() > 0
    merged = merge_stages(
        StageMergeConfig(
            pretrained_model_name_or_path=str(sd), adapters_dir=out, merge_weights=[0.5, 0.5],
            output_dir=str(tmp_path / "merged"),
        )
    )  # fmt: skip
    record = json.loads((tmp_path / "merged" / "deme_merge.json").read_text())
    assert record["train_norms_and_biases"] and merged.merge_weights == [0.5, 0.5]


def test_fp16_on_cpu_is_refused_before_loading(tmp_path, fresh_accelerator_state):
    config = StageLoraConfig(
        pretrained_model_name_or_path=str(tmp_path / "not-loaded"), dataset_name="digits", mixed_precision="fp16"
    )
    with pytest.raises(ValueError, match="`mixed_precision='fp16'` needs a GPU"):
        train_stage_lora(config)


def test_push_uploads_the_adapters_with_their_model_card(sd_folder, tmp_path, fake_hub, fresh_accelerator_state):
    """The adapters go up through `hub.push_to_hub` (one upload path) with the `stage_adapters.md` card."""
    _, hub = fake_hub
    config = tiny_config(
        sd_folder,
        output_dir=str(tmp_path / "adapters"),
        push_to_hub=True,
        hub_model_id="user/adapters",
        hub_token="hf_fake",
    )
    train_stage_lora(config)
    card = (tmp_path / "adapters" / "README.md").read_text()
    assert card.startswith("---") and "diffusers-training" in card and "| 1 | [500, 1000) |" in card
    assert "hf_fake" not in card and "github.com/)" not in card
    uploaded = set(hub.store) - {"validated-yaml"}
    assert {"README.md", "stages.json", "stage0/pytorch_lora_weights.safetensors"} <= uploaded
    assert {r["name"] for r in hub.repos} == {"adapters"}  # created at the start, uploaded at the end
    assert not any(f.startswith(("checkpoint-", "logs/")) for f in uploaded)
