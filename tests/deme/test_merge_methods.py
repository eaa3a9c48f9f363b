"""Task vectors (full finetuning), exact task arithmetic and TIES merging, against short reference formulas."""

import pytest
import torch

from diffusers_stages import StageLoraAdapters, TimestepStages
from diffusers_stages.deme.adapters import base_fingerprint
from diffusers_stages.deme.merging import StageDeltas, grid_search_merge_weights, merge_stage_adapters
from diffusers_stages.deme.task_vectors import compute_task_vector, save_stage_task_vector
from diffusers_stages.deme.ties import ties_merge
from diffusers_stages.testing import tiny_unet_2d

WEIGHTS = [0.1, 0.1, 0.2, 0.5]  # the authors' LSUN weights


def reference_ties(taus, weights, density):
    """The authors' `ties_merging` on the flattened model ([n_tasks, d] matrix), with weights applied to the rows."""
    keys = list(taus[0])
    m = torch.stack([torch.cat([t[k].double().flatten() for k in keys]) for t in taus])
    n, d = m.shape
    keep = int(d * density)
    if keep < d:
        kth = m.abs().kthvalue(d - keep, dim=1, keepdim=True).values
        m = m * (m.abs() >= kth)
    m = m * torch.tensor(weights, dtype=torch.float64)[:, None]
    sign = torch.sign(m.sum(0))
    sign[sign == 0] = torch.sign(sign.sum())
    sel = m * torch.where(sign[None] > 0, m > 0, m < 0)
    flat = sel.sum(0) / (sel != 0).sum(0).clamp_min(1)
    out, i = {}, 0
    for k in keys:
        out[k] = flat[i : i + taus[0][k].numel()].reshape(taus[0][k].shape)
        i += taus[0][k].numel()
    return out


def random_taus(n=4, seed=0):
    g = torch.Generator().manual_seed(seed)
    shapes = {"a.weight": (6, 5), "b.bias": (7,), "c.weight": (3, 2, 3, 3)}
    taus = [{k: torch.randn(s, generator=g) for k, s in shapes.items()} for _ in range(n)]
    taus[1]["a.weight"][0, 0] = -taus[0]["a.weight"][0, 0]  # a sign conflict that sums to zero
    return taus


@pytest.mark.parametrize("density", [1.0, 0.5, 0.2])
def test_ties_matches_the_authors_formula(density):
    taus = random_taus()
    ours = ties_merge(taus, WEIGHTS, density)
    ref = reference_ties(taus, WEIGHTS, density)
    for k in ref:
        torch.testing.assert_close(ours[k], ref[k])


def test_ties_with_full_density_and_sum_and_no_conflict_is_task_arithmetic():
    taus = [{k: v.abs() for k, v in t.items()} for t in random_taus()]
    ours = ties_merge(taus, WEIGHTS, 1.0, disjoint="sum")
    for k in taus[0]:
        torch.testing.assert_close(ours[k], sum(w * t[k].double() for w, t in zip(WEIGHTS, taus)))


def finetuned_stages(tmp_path, dtype=torch.bfloat16):
    """Four 'finetuned' copies of a tiny UNet (random perturbations of every tensor), saved as task vectors."""
    base = tiny_unet_2d(seed=0)
    stages = TimestepStages.uniform(4)
    g = torch.Generator().manual_seed(3)
    thetas = []
    for k in range(4):
        theta = {n: v + 0.01 * torch.randn(v.shape, generator=g) for n, v in base.state_dict().items()}
        thetas.append(theta)
        tau = compute_task_vector(theta, base.state_dict(), dtype)
        info = {"stage": k, "boundaries": stages.boundaries, "base_fingerprint": base_fingerprint(base)}
        save_stage_task_vector(tmp_path, stages, k, tau, info)
    return base, thetas


def test_full_task_vector_merge_is_exact_for_the_stored_precision(tmp_path):
    base, thetas = finetuned_stages(tmp_path)
    merged = merge_stage_adapters(tiny_unet_2d(seed=0), tmp_path, WEIGHTS)
    for name, w0 in base.state_dict().items():
        taus = [(t[name] - w0).to(torch.bfloat16).double() for t in thetas]  # tau_k as stored (bf16)
        ref = (w0.double() + sum(w * tau for w, tau in zip(WEIGHTS, taus))).to(w0.dtype)
        assert torch.equal(merged.state_dict()[name], ref), name
    assert StageDeltas.read(tmp_path).finetune == "full"


def test_full_task_vectors_at_weight_one_give_the_finetuned_model_in_fp32(tmp_path):
    base, thetas = finetuned_stages(tmp_path, dtype=torch.float32)
    merged = merge_stage_adapters(tiny_unet_2d(seed=0), tmp_path, [0.0, 0.0, 1.0, 0.0])
    for name, v in merged.state_dict().items():
        torch.testing.assert_close(v, thetas[2][name], atol=1e-6, rtol=0)


def test_ties_merge_of_lora_deltas_and_full_vectors(tmp_path):
    unet = tiny_unet_2d(seed=0)
    adapters = StageLoraAdapters.attach(unet, TimestepStages.uniform(4), rank=2, lora_alpha=4.0)
    g = torch.Generator().manual_seed(5)
    with torch.no_grad():
        for n, p in unet.named_parameters():
            if "lora_B" in n:
                p.copy_(0.1 * torch.randn(p.shape, generator=g))
    adapters.save_pretrained(tmp_path)
    deltas = StageDeltas.read(tmp_path)
    taus = deltas.dense(tiny_unet_2d(seed=0))
    ref = reference_ties(taus, WEIGHTS, 0.3)
    merged = merge_stage_adapters(tiny_unet_2d(seed=0), tmp_path, WEIGHTS, merge_method="ties", ties_density=0.3)
    base = tiny_unet_2d(seed=0).state_dict()
    for name, d in ref.items():
        torch.testing.assert_close(merged.state_dict()[name].double(), base[name].double() + d, atol=1e-6, rtol=0)


def test_grid_search_restores_the_base_and_includes_zero(tmp_path):
    finetuned_stages(tmp_path)
    unet = tiny_unet_2d(seed=0)
    before = {k: v.clone() for k, v in unet.state_dict().items()}
    out = grid_search_merge_weights(
        unet,
        tmp_path,
        lambda m: float(m.conv_in.weight.detach().sum()),
        candidates=[[0, 0, 0, 0], WEIGHTS, [1, 1, 1, 1]],
    )
    assert len(out.results) == 3 and out.results[0]["weights"] == [0.0] * 4
    for k, v in unet.state_dict().items():
        assert torch.equal(v, before[k])
    with pytest.raises(ValueError, match="merge_method"):
        merge_stage_adapters(tiny_unet_2d(seed=0), tmp_path, WEIGHTS, merge_method="dare")


@pytest.mark.slow  # ~5 min on a loaded 2-core machine (TIES in float64 on the CPU, per candidate)
def test_merge_job_searches_full_task_vectors_with_ties_on_one_loaded_pipeline(tmp_path):
    import json

    from diffusers import DDPMPipeline, DDPMScheduler

    from diffusers_stages import StageMergeConfig, merge_stages

    DDPMPipeline(unet=tiny_unet_2d(seed=0), scheduler=DDPMScheduler()).save_pretrained(tmp_path / "ddpm")
    finetuned_stages(tmp_path / "stages")
    config = StageMergeConfig(
        pretrained_model_name_or_path=str(tmp_path / "ddpm"), adapters_dir=str(tmp_path / "stages"),
        output_dir=str(tmp_path / "merged"), grid_search=True, dataset_name="digits", resolution=8, num_heldout=8,
        merge_method="ties", ties_density=0.5, device="cpu", grid_values=[0.5, 1.0],
    )  # fmt: skip
    out = merge_stages(config)
    record = json.loads((tmp_path / "merged" / "deme_merge.json").read_text())
    assert (
        record["finetune"] == "full" and record["merge_method"] == "ties" and record["task_vector_dtype"] == "bfloat16"
    )
    assert "on cpu by held-out denoising loss" in out.weight_source and len(out.merge_weights) == 4
    assert "full finetuning" in (tmp_path / "merged" / "README.md").read_text()


def test_sample_fid_scores_the_current_unet():
    from diffusers import DDIMScheduler, DDPMPipeline

    from diffusers_stages.deme.merge import sample_fid
    from diffusers_stages.evaluation.fid import fid

    pipe = DDPMPipeline(unet=tiny_unet_2d(seed=0), scheduler=DDIMScheduler())
    real = torch.rand(16, 1, 8, 8) * 2 - 1
    extractor = lambda x: torch.cat([x.mean((1, 2, 3))[:, None], x.std((1, 2, 3))[:, None]], 1)  # noqa: E731
    score = sample_fid(pipe, real, extractor, num_samples=16, num_inference_steps=2, seed=1, batch_size=8)
    g = torch.Generator().manual_seed(1)
    images = [pipe(batch_size=8, generator=g, num_inference_steps=2, output_type="np").images for _ in range(2)]
    generated = torch.cat([torch.as_tensor(i).permute(0, 3, 1, 2) for i in images]).float() * 2 - 1
    assert score == pytest.approx(fid(extractor, real, generated))
