"""Model card rendering and the Hub upload, against a local HTTP server implementing the routes `upload_folder` uses."""

import dataclasses

import pytest
from huggingface_hub import ModelCard
from huggingface_hub.errors import HfHubHTTPError

from diffusers_stages.deme import StageMergeConfig, merge_stages
from diffusers_stages.hub import check_upload_folder, create_hub_repo, push_to_hub, render_model_card, start_hub_repo
from tests.conftest import BAD_TOKEN


def card(**extra):
    return render_model_card(
        "deme_merged.md",
        tags=["decouple-then-merge", "lora"],
        base_model="tiny/base",
        pipeline_tag="unconditional-image-generation",
        stages=[
            {"stage": 0, "start": 0, "end": 500, "weight": 0.25},
            {"stage": 1, "start": 500, "end": 1000, "weight": 1.0},
        ],
        rank=4,
        lora_alpha=8,
        target_modules=["to_q", "to_v"],
        channel_projection=False,
        training={"max_train_steps": 10},
        metrics={"fid": 12.5},
        **extra,
    )


def test_model_card_has_metadata_and_merge_details(tmp_path):
    c = card()
    c.save(tmp_path / "README.md")
    loaded = ModelCard.load(tmp_path / "README.md")
    assert loaded.data.library_name == "diffusers" and loaded.data.base_model == "tiny/base"
    assert {"decouple-then-merge", "lora"} <= set(loaded.data.tags)
    assert (
        "| 1 | [500, 1000) | 1.0 |" in loaded.text
        and "| fid | 12.5 |" in loaded.text
        and "max_train_steps: 10" in loaded.text
    )
    with pytest.raises(ValueError, match="template"):
        render_model_card("no_such_template.md")


def test_push_to_hub_uploads_the_complete_folder(tmp_path, fake_hub):
    endpoint, hub = fake_hub
    folder = tmp_path / "merged"
    (folder / "unet").mkdir(parents=True)
    (folder / "model_index.json").write_text("{}")
    (folder / "unet" / "config.json").write_text("{}")
    with pytest.raises(ValueError, match="README.md"):
        check_upload_folder(folder)
    card().save(folder / "README.md")
    with pytest.raises(ValueError, match="no safetensors"):
        check_upload_folder(folder)
    (folder / "unet" / "diffusion_pytorch_model.safetensors").write_bytes(b"\x00weights")
    url = push_to_hub(folder, "user/deme", token="hf_fake", endpoint=endpoint)
    assert url.endswith("/commit/abc") and hub.repos[0]["name"] == "deme"
    assert hub.store["unet/diffusion_pytorch_model.safetensors"] == b"\x00weights"
    assert b"library_name: diffusers" in hub.store.pop("validated-yaml")
    assert set(hub.store) == {
        "README.md",
        "model_index.json",
        "unet/config.json",
        "unet/diffusion_pytorch_model.safetensors",
    }


def test_create_hub_repo_defaults_to_the_output_folder_name(tmp_path, fake_hub):
    _, hub = fake_hub
    assert create_hub_repo(None, tmp_path / "my-run", token="hf_fake") == "user/my-run"
    assert create_hub_repo("org/named", tmp_path / "my-run", token="hf_fake") == "org/named"
    assert [r["name"] for r in hub.repos] == ["my-run", "named"] and hub.repos[1]["organization"] == "org"
    with pytest.raises(HfHubHTTPError, match="401"):
        create_hub_repo(None, tmp_path / "my-run", token=BAD_TOKEN)


def test_merge_with_a_bad_token_fails_before_loading_anything(tmp_path, fake_hub):
    config = StageMergeConfig(
        pretrained_model_name_or_path=str(tmp_path / "no-base"),
        adapters_dir=str(tmp_path / "no-adapters"),
        merge_weights=[1.0],
        output_dir=str(tmp_path / "merged"),
        push_to_hub=True,
        hub_token=BAD_TOKEN,
    )
    with pytest.raises(HfHubHTTPError, match="401"):
        merge_stages(config)
    assert start_hub_repo(dataclasses.replace(config, hub_token="hf_fake")).hub_model_id == "user/merged"
