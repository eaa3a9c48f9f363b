import json

import pytest
import torch

from diffusers_stages import TimestepStages


def test_uniform_boundaries_and_ranges():
    stages = TimestepStages.uniform(4, 1000)
    assert stages.boundaries == [250, 500, 750]
    assert stages.num_stages == len(stages) == 4
    assert [stages.timestep_range(k) for k in range(4)] == [(0, 250), (250, 500), (500, 750), (750, 1000)]
    assert stages.adapter_names == ["stage0", "stage1", "stage2", "stage3"]


def test_single_stage():
    stages = TimestepStages.uniform(1, 10)
    assert stages.boundaries == [] and stages.timestep_range(0) == (0, 10)
    assert stages.stage_index(torch.arange(10)).eq(0).all()


@pytest.mark.parametrize("boundaries", [[1], [300, 700], [1, 2, 3, 998, 999]])
def test_timestep_stage_range_round_trip(boundaries):
    stages = TimestepStages(boundaries, 1000)
    t = torch.arange(1000)
    k = stages.stage_index(t)
    assert k.dtype == torch.long and k.shape == t.shape
    assert k[0] == 0 and k[-1] == stages.num_stages - 1  # stage 0 is the least noisy
    for ti, ki in zip(t.tolist(), k.tolist()):
        start, end = stages.timestep_range(ki)
        assert start <= ti < end
    assert (k[1:] >= k[:-1]).all()


def test_stage_index_scalar_and_float():
    stages = TimestepStages([300, 700], 1000)
    assert int(stages.stage_index(299)) == 0 and int(stages.stage_index(300)) == 1
    assert stages.stage_index(torch.tensor([299.5, 300.0, 699.99, 999.0])).tolist() == [0, 1, 1, 2]


def test_sample_timesteps_stay_inside_their_stage():
    stages = TimestepStages([100, 900], 1000)
    g = torch.Generator().manual_seed(0)
    for k in range(3):
        t = stages.sample_timesteps(k, 4096, generator=g)
        start, end = stages.timestep_range(k)
        assert t.min() >= start and t.max() < end
        assert t.min() < start + 0.05 * (end - start) and t.max() >= end - 1 - 0.05 * (end - start)
    per_sample = torch.tensor([0, 2, 1, 0, 2])
    t = stages.sample_timesteps(per_sample, generator=g)
    assert stages.stage_index(t).tolist() == per_sample.tolist()


def test_sample_timesteps_is_deterministic():
    stages = TimestepStages.uniform(3)
    a = stages.sample_timesteps(1, 16, generator=torch.Generator().manual_seed(3))
    b = stages.sample_timesteps(1, 16, generator=torch.Generator().manual_seed(3))
    assert torch.equal(a, b)


def test_sigma_mapping():
    betas = torch.linspace(1e-4, 0.02, 1000, dtype=torch.float64)
    abar = torch.cumprod(1 - betas, 0)
    sigmas = ((1 - abar) / abar).sqrt()
    stages = TimestepStages([250, 600], 1000)
    assert stages.stage_index_from_sigma(sigmas, sigmas).tolist() == stages.stage_index(torch.arange(1000)).tolist()
    lo, hi = stages.sigma_boundaries(sigmas)
    assert lo == pytest.approx(float(sigmas[250])) and hi == pytest.approx(float(sigmas[600]))
    # a noise level between two table entries maps to the stage of its fractional timestep
    mid = (sigmas[249] * sigmas[250]).sqrt()
    assert int(stages.stage_index_from_sigma(mid, sigmas)) == 0
    assert (
        int(stages.stage_index_from_sigma(1e9, sigmas)) == 2 and int(stages.stage_index_from_sigma(0.0, sigmas)) == 0
    )


def test_json_round_trip(tmp_path):
    stages = TimestepStages([123, 456, 789], 1000, method="optimal_denoiser")
    path = stages.save_pretrained(tmp_path)
    assert path.endswith("stages.json")
    on_disk = json.loads(open(path).read())
    assert on_disk["boundaries"] == [123, 456, 789] and on_disk["method"] == "optimal_denoiser"
    for source in (tmp_path, path):
        loaded = TimestepStages.from_pretrained(source)
        assert loaded == stages and loaded.config.method == "optimal_denoiser"
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]  # no temporary file left behind


def test_from_fractions_matches_paper_notation():
    stages = TimestepStages.from_fractions([0.442, 0.631], 1000)
    assert stages.boundaries == [442, 631]


@pytest.mark.parametrize(
    "boundaries, T, match",
    [
        ([500, 300], 1000, "strictly increasing"),
        ([300, 300], 1000, "strictly increasing"),
        ([0, 500], 1000, "strictly inside"),
        ([500, 1000], 1000, "strictly inside"),
        ([-5], 1000, "strictly inside"),
        ([2.5], 1000, "integer"),
        ([10], 0, "num_train_timesteps"),
    ],
)
def test_invalid_boundaries(boundaries, T, match):
    with pytest.raises(ValueError, match=match):
        TimestepStages(boundaries, T)


def test_invalid_queries(tmp_path):
    stages = TimestepStages.uniform(3)
    with pytest.raises(ValueError, match="num_stages"):
        TimestepStages.uniform(0)
    with pytest.raises(ValueError, match="num_stages"):
        TimestepStages.uniform(11, 10)
    with pytest.raises(ValueError, match="stage"):
        stages.timestep_range(3)
    with pytest.raises(ValueError, match="stage"):
        stages.sample_timesteps(5, 4)
    with pytest.raises(ValueError, match="batch_size"):
        stages.sample_timesteps(1)
    with pytest.raises(ValueError, match="sigmas"):
        stages.stage_index_from_sigma(1.0, torch.ones(10))
    with pytest.raises(ValueError, match="fractions"):
        TimestepStages.from_fractions([0.0, 0.5])
    (tmp_path / "stages.json").write_text(json.dumps({"foo": 1}))
    with pytest.raises(ValueError, match="boundaries"):
        TimestepStages.from_pretrained(tmp_path / "stages.json")


def test_strings_and_nan_are_refused():
    with pytest.raises(ValueError, match="integer timesteps"):
        TimestepStages(["500"])
    with pytest.raises(ValueError, match="NaN"):
        TimestepStages([500]).stage_index(torch.tensor([1.0, float("nan")]))


def test_an_invalid_stages_file_is_named(tmp_path):
    path = tmp_path / "stages.json"
    path.write_text("{not json")
    with pytest.raises(ValueError, match=f"{path} is not a valid stages file"):
        TimestepStages.from_pretrained(path)
    path.write_text(json.dumps({"boundaries": [700, 300]}))
    with pytest.raises(ValueError, match="strictly increasing"):
        TimestepStages.from_pretrained(tmp_path)


def test_saved_files_get_the_umask_mode(tmp_path):
    import os

    from diffusers_stages.utils import atomic_directory

    old = os.umask(0o022)
    try:
        TimestepStages([500]).save_pretrained(tmp_path)
        with atomic_directory(tmp_path / "folder"):
            pass
    finally:
        os.umask(old)
    assert (tmp_path / "stages.json").stat().st_mode & 0o777 == 0o644
    assert (tmp_path / "folder").stat().st_mode & 0o777 == 0o755
