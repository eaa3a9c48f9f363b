"""The trainer under a real 2-process gloo group (``ACCELERATE_USE_CPU=1 torchrun``): every rank ends identical, and
2 processes x batch B end where 1 process x batch 2B ends (same data, noise levels and noise per global sample).

One ``torchrun`` launch runs all the 2-process configurations (start-up is the slow part on CPU)."""

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from diffusers_stages.testing import tiny_stable_diffusion_pipeline
from diffusers_stages.training import TrainingConfig
from diffusers_stages.training.loop import fit, setup
from tests.distributed import assert_same_training, assert_states_close, launch, load_rank_states
from tests.training.ddp_worker import deme_rank_state, rank_state

TINY = dict(
    dataset_name="digits",
    resolution=8,
    max_train_samples=32,
    train_batch_size=4,
    block_out_channels=[16, 32],
    num_inference_steps=2,
    num_validation_images=2,
    validation_steps=0,
    report_to="none",
    max_train_steps=3,
    checkpointing_steps=2,
)


def _sd_data(root: Path) -> dict:
    """A tiny Stable Diffusion pipeline folder and 8 captioned 64x64 images: the latent-space fields."""
    tiny_stable_diffusion_pipeline().save_pretrained(root / "base")
    data = root / "sd_data"
    data.mkdir()
    rng = np.random.default_rng(0)
    lines = []
    for i in range(8):
        Image.fromarray(rng.integers(0, 255, (64, 64, 3), dtype=np.uint8)).save(data / f"{i}.png")
        lines.append(json.dumps({"file_name": f"{i}.png", "text": f"noise pattern {i}"}))
    (data / "metadata.jsonl").write_text("\n".join(lines) + "\n")
    return dict(
        pretrained_model_name_or_path=str(root / "base"),
        train_data_dir=str(data),
        dataset_name="unused",
        max_train_samples=None,
        resolution=64,
        train_batch_size=1,
        max_train_steps=2,
        noise_process="ddpm",
    )


def _runs(root: Path) -> dict[str, dict]:
    """The 2-process runs by name (each a `TrainingConfig`'s fields; batch per process B = 4, or 1 for SD)."""
    runs = {
        "unified": dict(use_ema=True, lr_scheduler="cosine", lr_warmup_steps=1, max_train_steps=4),
        "multi_decoder": dict(model_type="multi_decoder", num_stages=2, use_ema=True),
        "per_sample": dict(model_type="multi_decoder", num_stages=3, stage_sampling="per_sample"),
        "per_rank": dict(model_type="multi_decoder", num_stages=2, stage_sampling="per_rank"),
        "accumulation": dict(train_batch_size=2, gradient_accumulation_steps=2, noise_process="edm_fdm"),
        "sd_multi_decoder": dict(model_type="multi_decoder", num_stages=2, **_sd_data(root)),
    }
    runs["resumed"] = {**runs["unified"], "resume_from_checkpoint": str(root / "unified" / "checkpoint-2")}
    runs = {name: {**TINY, **fields, "output_dir": str(root / name)} for name, fields in runs.items()}
    sd = runs["sd_multi_decoder"]
    deme = dict(
        kind="deme", pretrained_model_name_or_path=sd["pretrained_model_name_or_path"],
        train_data_dir=sd["train_data_dir"], resolution=32, train_batch_size=2, max_train_steps=2, num_stages=2,
        rank=2, learning_rate=1e-2, channel_projection=True, checkpointing_steps=1, report_to="none",
    )  # fmt: skip
    runs["deme"] = {**deme, "output_dir": str(root / "deme")}
    runs["deme_stage_parallel"] = {**deme, "stage_parallel": True, "output_dir": str(root / "deme_stage_parallel")}
    runs["deme_one_stage"] = {
        **deme, "stage": 1, "channel_projection": False, "gradient_accumulation_steps": 2, "checkpointing_steps": 10,
        "antithetic_timesteps": True, "prob_sampling": 0.5, "consistency_loss": True,
        "output_dir": str(root / "deme_one_stage"),
    }  # fmt: skip
    runs["tdc"] = dict(
        kind="tdc", dataset_name="digits", max_train_samples=64, resolution=8, block_out_channels=[16, 32],
        max_train_steps=8, train_batch_size=8, num_groups=2, grouping_grid_size=4, grouping_images=8,
        proxy_finetune_steps=1, proxy_heldout_images=8, num_inference_steps=1, num_validation_images=1,
        validation_steps=0, report_to="none", output_dir=str(root / "tdc"),
    )  # fmt: skip
    return runs


@pytest.fixture(autouse=True)
def one_thread_like_the_workers():
    """The in-process reference runs use one torch thread, as the launched workers do (``OMP_NUM_THREADS=1``): the
    same float summation order (tests/conftest.py restores the thread count afterwards)."""
    torch.set_num_threads(1)


@pytest.fixture(scope="module")
def two_process_runs(tmp_path_factory):
    """``{name: (fields, [rank 0 state, rank 1 state])}`` after one 2-process launch of every run."""
    root = tmp_path_factory.mktemp("ddp")
    runs = _runs(root)
    launch(["tests/training/ddp_worker.py", "--configs", json.dumps(list(runs.values()))], nproc=2, timeout=420)
    return {name: (fields, load_rank_states(Path(fields["output_dir"]))) for name, fields in runs.items()}


def test_tdc_phases_under_two_processes(two_process_runs):
    """Both phases train data-parallel; grouping and pruning run once (main process) and reach every process."""
    from diffusers_stages.pipelines import StageAwareImagePipeline

    out = Path(two_process_runs["tdc"][0]["output_dir"])
    info = json.loads((out / "tdc.json").read_text())
    assert len(info["groups"]) == 2
    assert all((out / "phase2" / f"group_{k}" / "prune.json").is_file() for k in range(2))
    assert len(StageAwareImagePipeline.from_pretrained(out).unet.config.stage_boundaries) == 1


def _one_process(fields: dict, tmp_path: Path, **changes) -> dict:
    """The state one process ends with for ``fields`` with ``changes`` (e.g. the doubled batch)."""
    run = setup(TrainingConfig(**{**fields, "output_dir": str(tmp_path / "single"), **changes}))
    fit(run)
    run.accelerator.end_training()
    return rank_state(run)


@pytest.mark.parametrize(
    "name", ["unified", "multi_decoder", "per_sample", "per_rank", "accumulation", "resumed", "deme"]
)
def test_every_rank_ends_with_the_same_parameters_optimizer_state_and_ema(two_process_runs, name):
    fields, states = two_process_runs[name]
    assert len(states) == 2
    assert_states_close(states[0], states[1])
    if name == "deme":  # every stage's LoRA and channel projection, not only the one active at `prepare`
        assert {k.split(".")[0] for k in states[0]} == {"stage0", "stage1", "optim0", "optim1"}
        assert (Path(fields["output_dir"]) / "checkpoint-1" / "stage_adapters" / "stage1").is_dir()
        return
    start = 2 if "resume_from_checkpoint" in fields else 0
    last = fields["max_train_steps"]
    expected = {f"checkpoint-{s}" for s in range(start + 1, last + 1) if s % 2 == 0 or s == last}
    assert {p.name for p in Path(fields["output_dir"]).glob("checkpoint-*")} == expected


def test_stable_diffusion_latents_ranks_agree(two_process_runs):
    _, states = two_process_runs["sd_multi_decoder"]
    assert_states_close(states[0], states[1])


@pytest.mark.parametrize("name", ["unified", "multi_decoder", "accumulation"])
def test_two_processes_of_batch_b_equal_one_process_of_batch_2b(two_process_runs, tmp_path, name):
    fields, states = two_process_runs[name]
    single = _one_process(fields, tmp_path, train_batch_size=2 * fields["train_batch_size"])
    assert_same_training(states[0], single)


def test_resume_under_two_processes_ends_where_the_uninterrupted_run_ends(two_process_runs):
    _, uninterrupted = two_process_runs["unified"]
    _, resumed = two_process_runs["resumed"]
    assert_same_training(uninterrupted[0], resumed[0])


def test_per_rank_trains_every_decoder_and_the_encoder(two_process_runs, tmp_path):
    """Rank r trains stage (r + i) mod K: with 2 ranks and 2 stages both decoders move at every step."""
    fields, states = two_process_runs["per_rank"]
    start = rank_state(setup(TrainingConfig(**{**fields, "output_dir": str(tmp_path / "init")})))
    for prefix in ("model.decoders.0.", "model.decoders.1.", "model.conv_in."):
        moved = [k for k in states[0] if k.startswith(prefix) and not (states[0][k] - start[k]).abs().max() < 1e-4]
        assert moved, prefix


def _deme_one_process(fields: dict, tmp_path: Path, **changes) -> dict:
    """The state one process ends with for the DeMe run ``fields`` with ``changes``."""
    from diffusers_stages.deme import StageLoraConfig
    from diffusers_stages.deme.training import fit_run, setup_run

    single = {k: v for k, v in fields.items() if k not in ("kind", "stage_parallel")}
    run = setup_run(StageLoraConfig(**{**single, "output_dir": str(tmp_path / "single"), **changes}))
    fit_run(run)
    return deme_rank_state(run)


@pytest.mark.parametrize("name", ["deme", "deme_one_stage"])
def test_deme_two_processes_of_batch_b_equal_one_process_of_batch_2b(two_process_runs, tmp_path, name):
    """Every stage's adapter (and channel projection, AdamW moments): the images and timesteps of a micro-batch are
    drawn for all its samples, the noise per global sample, so the processes hold shards of the one-process batch
    (``deme_one_stage``: one stage, accumulation, antithetic pairs and the per-batch range spanning the processes)."""
    fields, states = two_process_runs[name]
    assert_states_close(states[0], states[1])
    single = _deme_one_process(fields, tmp_path, train_batch_size=2 * fields["train_batch_size"])
    # lr 1e-2: a LoRA weight whose gradient is near Adam's eps (e.g. cross-attention keys of the tiny model) moves by
    # up to ~lr under another summation order (batch 2 vs 4): ~0.15 % of the values here; a mismatched draw: ~40 %
    assert_same_training(states[0], single, max_diff=1e-2, outliers=1e-2)


def test_deme_stage_parallel_trains_each_stage_on_its_own_process(two_process_runs, tmp_path):
    """Process r trains stage r alone; its adapter equals a single-process ``stage=r`` run's; both are saved."""
    fields, states = two_process_runs["deme_stage_parallel"]
    assert [{k.split(".")[0] for k in st} for st in states] == [{"stage0", "optim0"}, {"stage1", "optim1"}]
    assert {p.name for p in Path(fields["output_dir"]).glob("stage?")} == {"stage0", "stage1"}
    assert_same_training(states[1], _deme_one_process(fields, tmp_path, stage=1), max_diff=1e-4)
