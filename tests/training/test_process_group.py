"""Multi-process pieces that need no process group: sharding, launch checks, secrets kept out of logs."""

import pytest
from accelerate import Accelerator

from diffusers_stages.configs import public_fields
from diffusers_stages.training import TrainingConfig, train
from diffusers_stages.training.data import ShardedBatchSampler
from diffusers_stages.training.distributed import check_process_group, key_seed, micro_seed, sample_generators


def test_ranks_hold_distinct_shards_whose_union_is_the_single_process_batch():
    single = ShardedBatchSampler(20, batch_size=4, seed=3)
    ranks = [ShardedBatchSampler(20, batch_size=2, seed=3, num_replicas=2, rank=r) for r in range(2)]
    for sampler in (single, *ranks):
        sampler.set_epoch(1, skip=1)
    merged = [a + b for a, b in zip(*ranks)]
    assert merged == list(single) and len(merged) == 4
    assert all(not set(a) & set(b) for a, b in zip(*ranks))


def test_sample_noise_depends_on_the_global_index_not_on_the_rank():
    shared = micro_seed(0, 5)
    whole = [g.initial_seed() for g in sample_generators(shared, 0, 4)]
    halves = [g.initial_seed() for g in sample_generators(shared, 0, 2) + sample_generators(shared, 2, 2)]
    assert whole == halves and len(set(whole)) == 4
    assert whole != [g.initial_seed() for g in sample_generators(micro_seed(0, 6), 0, 4)]


def test_key_seeds_are_distinct_for_distinct_keys():
    """Linear arithmetic collides (``(s * 101 + 101)`` is ``((s + 1) * 101 + 0)``); zero padding must not either."""
    keys = [(0, a, b) for a in range(50) for b in range(300)] + [(0, 1), (0, 1, 0, 0)]  # (0, 1, 0) is in the grid
    seeds = [key_seed(*k) for k in keys]
    assert len(set(seeds)) == len(keys) and all(0 <= s < 2**63 - 1 for s in seeds)
    assert key_seed(3, 4) == key_seed(3, 4)
    with pytest.raises(ValueError, match="`key`"):
        key_seed(0, -1)


def test_torchrun_without_a_process_group_is_refused(monkeypatch):
    accelerator = Accelerator()  # what torchrun's processes get on a machine without GPUs: one process each
    monkeypatch.setenv("WORLD_SIZE", "2")
    with pytest.raises(ValueError, match="ACCELERATE_USE_CPU=1"):
        check_process_group(accelerator)


def test_tokens_never_reach_tracker_configs_model_cards_or_metrics(tmp_path):
    secret = "hf_do_not_log_4242"
    config = TrainingConfig(
        dataset_name="digits", resolution=8, max_train_samples=16, train_batch_size=8, block_out_channels=[16, 32],
        num_inference_steps=1, num_validation_images=1, validation_steps=1, report_to="tensorboard",
        max_train_steps=1, hub_token=secret, output_dir=str(tmp_path / "run"),
    )  # fmt: skip
    assert "hub_token" not in public_fields(config) and "hub_model_id" in public_fields(config)
    train(config)
    files = [p for p in (tmp_path / "run").rglob("*") if p.is_file()]
    assert any("logs" in p.parts for p in files)  # the tracker did write its config
    assert [p for p in files if secret.encode() in p.read_bytes()] == []
