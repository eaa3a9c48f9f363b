"""The efficiency study of issue 18: every method against its baseline, several seeds, two FID feature spaces.

Each (configuration, seed) run trains with the library's own options (`TrainingConfig`, `TDCConfig`,
`StageLoraConfig` + `merge_stages`), scores FID curves at every checkpoint (``--curve_samples`` samples), the final
model on ``--final_samples`` samples against all real MNIST test images in two independent feature spaces (the CNN
classifier and an MLP of another seed), FID against NFE, and the training / sampling MACs (`count_macs`). Each run's
result is cached as ``<output_dir>/runs/<config>/seed<k>.json`` (and training resumes from its checkpoints), so the
study completes over several sittings: rerun the same command. `study_report` then writes the tables, the targets
(met / not met only where both feature spaces agree) and the plots.

    python benchmarks/study.py                      # the full CPU study (many hours on 2 cores; resumable)
    python benchmarks/study.py --configs baseline edm_fdm --seeds 0 1 2    # a subset
    python benchmarks/study.py --quick              # smoke run (~1 min): 1 seed, 3 configs, tiny everything
    python benchmarks/study.py --list               # which configurations exist in the library today

Writes ``<results_dir>/study.{json,md}``, ``study_fid_vs_{steps,macs,nfe}.png`` and
``<results_dir>/study_samples/<config>.npz`` (1,000 uint8 samples of seed 0).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import shutil
import sys
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from study_report import write_report  # noqa: E402
from study_variants import TAILORED, VARIANTS, Variant, check_available, tailored_widths  # noqa: E402

from diffusers_stages import TimestepStages, count_macs, train  # noqa: E402
from diffusers_stages.data import dataset_to_tensor, load_mnist_dataset  # noqa: E402
from diffusers_stages.evaluation.classifier import ClassifierFeatureExtractor, load_or_train_classifier  # noqa: E402
from diffusers_stages.evaluation.fid import extract_features, frechet_distance  # noqa: E402
from diffusers_stages.pipelines import load_pipeline  # noqa: E402
from diffusers_stages.training import TrainingConfig, build_noise_process, sample_images  # noqa: E402
from diffusers_stages.training.checkpointing import load_ema_weights  # noqa: E402

RESULTS = Path(__file__).parent / "results"
SPACES = {"cnn": dict(architecture="cnn", seed=0, epochs=8), "mlp": dict(architecture="mlp", seed=1, epochs=20)}
QUICK = dict(
    steps=4, eval_every=2, resolution=8, block_out_channels=[8, 16], batch_size=8, seeds=[0], curve_samples=24,
    final_samples=32, nfe=[3, 5], default_nfe=5, npz_samples=16, real_images=300, classifier_epochs=1,
    configs=["baseline", "baseline_long", "edm_fdm"],
)  # fmt: skip


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--configs", nargs="+", default=None, help="configurations (default: every available one)")
    p.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    p.add_argument("--steps", type=int, default=4000, help="training steps of every run (equal steps)")
    p.add_argument("--eval_every", type=int, default=500, help="checkpoint (curve point) every N steps")
    p.add_argument("--resolution", type=int, default=16)
    p.add_argument("--block_out_channels", type=int, nargs="+", default=[32, 64, 64])
    p.add_argument("--batch_size", type=int, default=64)
    p.add_argument("--lr", type=float, default=1e-3)
    p.add_argument("--ema_decay", type=float, default=0.999)
    p.add_argument("--mixed_precision", default=None, choices=["no", "fp16", "bf16"])
    p.add_argument("--curve_samples", type=int, default=500)
    p.add_argument("--final_samples", type=int, default=2000)
    p.add_argument("--real_images", type=int, default=None, help="real images for FID (default: all 10,000)")
    p.add_argument("--default_nfe", type=int, default=13, help="NFE of the curves and final FIDs")
    p.add_argument("--nfe", type=int, nargs="+", default=[5, 7, 9, 13, 19], help="NFE of the FID-vs-NFE sweep")
    p.add_argument("--init_fraction", type=float, default=0.25, help="share of steps a from-unified init had")
    p.add_argument("--deme_steps", type=int, default=500, help="DeMe LoRA steps per stage")
    p.add_argument("--deme_lr", type=float, default=1e-4)
    p.add_argument("--npz_samples", type=int, default=1000)
    p.add_argument("--classifier_epochs", type=int, default=None, help="override both classifiers' epochs")
    p.add_argument(
        "--classifier_dir",
        default=str(RESULTS / "classifiers"),
        help="the two feature classifiers (committed, so that every rerun scores in the same features; trained and "
        "saved here when missing; --quick uses <output_dir>/classifiers)",
    )
    p.add_argument("--output_dir", default="outputs/study", help="runs, checkpoints and the per-run JSON cache")
    p.add_argument("--results_dir", default=str(RESULTS))
    p.add_argument("--threads", type=int, default=None, help="torch threads (1 on a shared machine)")
    p.add_argument(
        "--quick", action="store_true", help="smoke run: " + ", ".join(f"{k}={v}" for k, v in QUICK.items())
    )
    p.add_argument("--list", action="store_true", help="list the configurations and their status, then exit")
    p.add_argument("--report_only", action="store_true", help="write the report from the cached runs; train nothing")
    a = p.parse_args(argv)
    if a.quick:  # the smoke settings, except where given on the command line
        for k, v in QUICK.items():
            if getattr(a, k) == p.get_default(k):
                setattr(a, k, v)
    if a.steps % a.eval_every:
        raise ValueError(f"`--steps` ({a.steps}) must be a multiple of `--eval_every` ({a.eval_every}).")
    return a


# ------------------------------------------------------------------------------------------------ configurations
def sampler_steps(noise_process: str, nfe: int) -> int:
    """Sampler steps giving ``nfe`` denoiser calls: Heun (``2 n - 1`` NFE) for the sigma-space processes, one call
    per DDIM step for the discrete ones."""
    return nfe if noise_process in ("ddpm", "fdm") else (nfe + 1) // 2


def build_config(v: Variant, a, seed: int = 0, output_dir: str = "unused", steps: int | None = None, **changes):
    """The variant's `TrainingConfig` (or `TDCConfig`) under the study's shared settings."""
    fields = dict(v.fields)
    if fields.get("decoder_block_out_channels") == TAILORED:
        fields["decoder_block_out_channels"] = tailored_widths(a.block_out_channels, fields["num_stages"])
    noise_process = fields.get("noise_process", "edm")
    shared = dict(
        dataset_name="mnist", resolution=a.resolution, block_out_channels=list(a.block_out_channels),
        train_batch_size=a.batch_size, max_train_steps=steps or a.steps, checkpointing_steps=a.eval_every,
        use_ema=True, ema_decay=a.ema_decay, learning_rate=a.lr, validation_steps=0, report_to="none",
        num_inference_steps=sampler_steps(noise_process, a.default_nfe), seed=seed, output_dir=str(output_dir),
        mixed_precision=a.mixed_precision,
    )  # fmt: skip
    if v.method == "tdc":
        from diffusers_stages import TDCConfig

        return TDCConfig(**{**shared, **fields, **changes})
    return TrainingConfig(**{**shared, **fields, **changes})


def stages_file(v: Variant, a, work: Path) -> str | None:
    """The folder of the variant's ``stages.json`` (computed once under ``work/stages``); ``None`` for the library's uniform."""
    if v.stages in (None, "uniform_log_sigma"):
        return None
    config = build_config(v, a)
    path = work / "stages" / f"{v.stages}-{config.noise_process}-{config.num_stages}-{a.resolution}"
    if not path.exists():
        objective, _, _ = build_noise_process(config)
        if v.stages == "optimal_denoiser":
            sigmas = objective.scheduler.timestep_to_sigma(torch.arange(objective.num_train_timesteps).double())
            stages = optimal_denoiser_stages(sigmas, config.num_stages, a.resolution)
        else:
            stages = balanced_stages(objective, config.num_stages)
        stages.save_pretrained(path)
    return str(path)


def balanced_stages(objective, num_stages: int) -> TimestepStages:
    r"""Stages with equal probability under the objective's training distribution of noise levels: boundary ``k`` is
    the first timestep ``b`` with ``P(t < b) >= k / K``, where ``P(t < b)`` is the objective's own ``stage_weights``
    of the single boundary ``b`` (so it follows whatever distribution the objective samples)."""
    T = objective.num_train_timesteps
    cdf = torch.tensor([float(objective.stage_weights(TimestepStages([b], T))[0]) for b in range(1, T)])
    bounds = [1 + int(torch.searchsorted(cdf, torch.tensor(k / num_stages))) for k in range(1, num_stages)]
    return TimestepStages(bounds, T, method="balanced_training_distribution")


def optimal_denoiser_stages(sigmas: torch.Tensor, num_stages: int, resolution: int) -> TimestepStages:
    """The multi-stage paper's optimal-denoiser clustering of MNIST on the EDM grid (``abar_t = 1 / (1 + sigma_t^2)``)."""
    from diffusers_stages import NoiseSchedule, cluster_timesteps

    data = dataset_to_tensor(load_mnist_dataset(resolution=resolution, max_samples=2000), channels=1)
    schedule = NoiseSchedule((1 / (1 + sigmas**2)).float(), name="edm")
    return cluster_timesteps(
        "optimal_denoiser", num_stages, data=data, noise_schedule=schedule, pixel_range="[-1, 1]", progress=False
    )


# ------------------------------------------------------------------------------------------------ scoring
class Scorer:
    """FID in both feature spaces against the real images (features computed once), on ``device``."""

    def __init__(self, a, device: str, cache_dir: str):
        real = dataset_to_tensor(load_mnist_dataset(resolution=a.resolution, max_samples=a.real_images), channels=1)
        self.extractors, self.real = {}, {}
        for space, opts in SPACES.items():
            epochs = a.classifier_epochs or opts["epochs"]
            options = dict(architecture=opts["architecture"], seed=opts["seed"], epochs=epochs)
            model = load_or_train_classifier("mnist", cache_dir=cache_dir, progress=False, **options).to(device)
            self.extractors[space] = ClassifierFeatureExtractor(model)
            self.real[space] = extract_features(self.extractors[space], real)
        self.num_real = len(real)

    def __call__(self, images: torch.Tensor) -> dict:
        return {s: frechet_distance(self.real[s], extract_features(e, images)) for s, e in self.extractors.items()}


def sampling_cost(pipe, steps: int, resolution: int) -> dict:
    """NFE and MACs of sampling one image: the denoiser calls of a real sampling run, each counted by `count_macs`
    at its own timestep (a multi-decoder or expert model routes each call to its stage)."""
    unet, calls = pipe.unet, []
    handle = unet.register_forward_pre_hook(
        lambda m, args, kwargs: calls.append(args[1] if len(args) > 1 else kwargs["timestep"]), with_kwargs=True
    )
    try:
        sample_images(pipe, 1, steps, seed=0)
    finally:
        handle.remove()
    x = torch.zeros(1, unet.config.in_channels, resolution, resolution, device=pipe.device)
    macs = sum(count_macs(unet, x, torch.as_tensor(t, device=pipe.device).reshape(-1)[:1]) for t in calls)
    return {"nfe": len(calls), "macs": macs}


def train_macs_per_step(config: TrainingConfig, unet) -> float:
    """MACs of one training step: ``3 x batch x`` the mean forward MACs over the stages, weighted by how often each
    stage is drawn (backward counted as twice the forward, the usual convention)."""
    from diffusers_stages.training import load_stages

    objective, _, _ = build_noise_process(config)
    stages = load_stages(config)
    uniform_draw = "uniform" in config.stage_sampling
    weights = (
        torch.full((stages.num_stages,), 1 / stages.num_stages) if uniform_draw else objective.stage_weights(stages)
    )
    g = torch.Generator().manual_seed(0)
    x = torch.zeros(1, unet.config.in_channels, config.resolution, config.resolution, device=unet.device)
    per_stage = [
        count_macs(unet, x, objective.timesteps(objective.sample_levels(stages, k, 1, g)).to(unet.device))
        for k in range(stages.num_stages)
    ]
    return 3 * config.train_batch_size * float(sum(float(w) * m for w, m in zip(weights, per_stage)))


# ------------------------------------------------------------------------------------------------ runs
def run_train(v: Variant, a, seed: int, run_dir: Path, work: Path, scorer: Scorer, device: str) -> dict:
    """Train (resuming from the latest checkpoint), then score the curve, the final model and the NFE sweep."""
    offset, changes = 0, {}
    if v.init_from:
        offset, changes["pretrained_model_name_or_path"] = init_model(v, a, seed, work, scorer, device)
    config = build_config(
        v, a, seed, run_dir / "train", steps=run_steps(v, a) - offset, stages_json=stages_file(v, a, work)
    )
    config = dataclasses.replace(config, **changes)
    t0 = time.perf_counter()
    if not (Path(config.output_dir) / "model_index.json").exists():
        resume = "latest" if any(Path(config.output_dir).glob("checkpoint-*")) else None
        train(dataclasses.replace(config, resume_from_checkpoint=resume))
    seconds = time.perf_counter() - t0
    pipe = load_pipeline(config.output_dir).to(device)
    pipe.unet.eval()
    macs_step = train_macs_per_step(config, pipe.unet)
    steps = sampler_steps(config.noise_process, a.default_nfe)
    curve = []
    for step in range(a.eval_every, config.max_train_steps + 1, a.eval_every):
        load_ema_weights(pipe.unet, Path(config.output_dir) / f"checkpoint-{step}")
        fid = scorer(sample_images(pipe, a.curve_samples, steps, seed + 1))
        curve.append({"step": offset + step, "train_macs": (offset + step) * macs_step, "fid": fid})
    result = score_final(pipe, config.noise_process, a, seed, scorer, v.name)
    result.update(curve=curve, train_macs_per_step=macs_step, train_seconds=seconds, init_steps=offset)
    return result


def score_final(pipe, noise_process: str, a, seed: int, scorer: Scorer, name: str) -> dict:
    """Final FID (``final_samples``), the FID-vs-NFE sweep (``curve_samples``) and the sampling cost; seed 0 also
    saves ``npz_samples`` uint8 samples to ``<results_dir>/study_samples/<name>.npz``."""
    steps = sampler_steps(noise_process, a.default_nfe)
    final = sample_images(pipe, a.final_samples, steps, seed + 2)
    if seed == 0:
        path = Path(a.results_dir) / "study_samples" / f"{name}.npz"
        path.parent.mkdir(parents=True, exist_ok=True)
        uint8 = ((final[: a.npz_samples].clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8).numpy()
        np.savez_compressed(path, samples=uint8)
    sweep = [
        {"nfe": n, "fid": scorer(sample_images(pipe, a.curve_samples, sampler_steps(noise_process, n), seed + 1))}
        for n in a.nfe
    ]
    cost = sampling_cost(pipe, steps, a.resolution)
    return {"final": {"fid": scorer(final), "samples": len(final)}, "nfe_sweep": sweep, "sampling": cost}


def init_model(v: Variant, a, seed: int, work: Path, scorer: Scorer, device: str) -> tuple[int, str]:
    """The ``init_from`` run's model at ``init_fraction`` of the steps (its checkpoint's EMA) as a pipeline folder;
    returns ``(its steps, the folder)``."""
    source = run_dir_of(work, v.init_from, seed)
    ensure_run(variant_named(v.init_from), a, seed, work, scorer, device)
    step = max(a.eval_every, int(a.init_fraction * a.steps) // a.eval_every * a.eval_every)
    folder = work / "init" / v.init_from / f"seed{seed}-step{step}"
    if not (folder / "model_index.json").exists():
        pipe = load_pipeline(source / "train")
        load_ema_weights(pipe.unet, source / "train" / f"checkpoint-{step}")
        shutil.rmtree(folder, ignore_errors=True)
        pipe.save_pretrained(folder)
    return step, str(folder)


def run_tdc_variant(v: Variant, a, seed: int, run_dir: Path, work: Path, scorer: Scorer, device: str) -> dict:
    """TDC with the whole budget (``steps`` unified-model steps); one final point, its compute in unified steps."""
    from diffusers_stages import run_tdc

    config = build_config(v, a, seed, run_dir / "train")
    t0 = time.perf_counter()
    if not (Path(config.output_dir) / "model_index.json").exists():
        shutil.rmtree(config.output_dir, ignore_errors=True)  # TDC's phases do not resume: start it afresh
        run_tdc(config)
    info = json.loads((Path(config.output_dir) / "tdc.json").read_text())
    pipe = load_pipeline(config.output_dir).to(device)
    pipe.unet.eval()
    result = score_final(pipe, config.noise_process, a, seed, scorer, v.name)
    # the unified model's MACs per step (from its cached run: they depend on the architecture only) price the budget
    macs_step = ensure_run(variant_named(v.baseline), a, seed, work, scorer, device)["train_macs_per_step"]
    compute = info["compute_unified_steps"]
    point = {"step": compute, "train_macs": compute * macs_step, "fid": result["final"]["fid"]}
    result.update(curve=[point], train_macs_per_step=macs_step, train_seconds=time.perf_counter() - t0, tdc=info)
    return result


def run_deme(v: Variant, a, seed: int, run_dir: Path, work: Path, scorer: Scorer, device: str) -> dict:
    """DeMe on the ``base`` run's final model: per-stage LoRA, merged with grid-searched weights, against the base
    and an equal-steps continued-training control (``K x deme_steps`` full steps)."""
    from diffusers_stages import StageLoraConfig, StageMergeConfig, merge_stages, train_stage_lora

    ensure_run(variant_named(v.base), a, seed, work, scorer, device)
    base = str(run_dir_of(work, v.base, seed) / "train")
    k = v.extra["num_stages"]
    common = dict(pretrained_model_name_or_path=base, dataset_name="mnist", resolution=a.resolution, seed=seed)
    if not (run_dir / "merged" / "model_index.json").exists():
        train_stage_lora(StageLoraConfig(
            **common, **v.extra, train_batch_size=a.batch_size, max_train_steps=a.deme_steps,
            learning_rate=a.deme_lr, checkpointing_steps=a.deme_steps, output_dir=str(run_dir / "adapters"),
        ))  # fmt: skip
        merge_stages(StageMergeConfig(
            **common, adapters_dir=str(run_dir / "adapters"), output_dir=str(run_dir / "merged"), grid_search=True,
        ))  # fmt: skip
    control = build_config(variant_named(v.base), a, seed, run_dir / "control", steps=k * a.deme_steps)
    control = dataclasses.replace(control, pretrained_model_name_or_path=base, learning_rate=a.deme_lr)
    if not (run_dir / "control" / "model_index.json").exists():
        train(control)
    scores = {}
    for name, folder in (("merged", run_dir / "merged"), ("control", run_dir / "control")):
        pipe = load_pipeline(folder).to(device)
        pipe.unet.eval()
        scores[name] = score_final(pipe, control.noise_process, a, seed, scorer, f"{v.name}_{name}")
    base_result = json.loads((run_dir_of(work, v.base, seed).with_suffix(".json")).read_text())
    result = dict(scores["merged"], control=scores["control"], base_final=base_result["final"])
    result.update(curve=[], train_macs_per_step=None, deme_steps_per_stage=a.deme_steps, num_stages=k)
    return result


RUNNERS = {"train": run_train, "tdc": run_tdc_variant, "deme": run_deme}


def run_steps(v: Variant, a) -> int:
    """The variant's total training steps: ``steps_factor`` x ``--steps``, on the ``--eval_every`` grid."""
    return round(a.steps * v.steps_factor / a.eval_every) * a.eval_every


def variant_named(name: str) -> Variant:
    for v in VARIANTS:
        if v.name == name:
            return v
    raise ValueError(f"unknown configuration {name!r}; known: {[v.name for v in VARIANTS]}.")


def run_dir_of(work: Path, name: str, seed: int) -> Path:
    return work / "runs" / name / f"seed{seed}"


def ensure_run(v: Variant, a, seed: int, work: Path, scorer: Scorer, device: str) -> dict:
    """The cached result of ``(v, seed)``; runs (or resumes) it first when there is none."""
    run_dir = run_dir_of(work, v.name, seed)
    cache = run_dir.with_suffix(".json")
    if cache.exists():
        return json.loads(cache.read_text())
    print(f"== {v.name} seed {seed}", flush=True)
    result = RUNNERS[v.method](v, a, seed, run_dir, work, scorer, device)
    result.update(config=v.name, seed=seed, method=v.method, baseline=v.baseline, steps=run_steps(v, a))
    cache.parent.mkdir(parents=True, exist_ok=True)
    tmp = cache.with_suffix(".tmp")
    tmp.write_text(json.dumps(result, indent=1))
    tmp.replace(cache)  # nothing half-written: a run counts as done only once its JSON is complete
    return result


def selected_variants(a) -> list[Variant]:
    """The requested (default: all) variants, each with its availability checked."""
    names = a.configs or [v.name for v in VARIANTS]
    return [check_available(variant_named(n), lambda v: build_config(v, a)) for n in names]


def main(argv=None) -> dict:
    a = parse_args(argv)
    if a.threads:
        torch.set_num_threads(a.threads)
    variants = selected_variants(a)
    if a.list:
        for v in variants:
            print(f"{v.name:28s} {v.method:6s} {'PENDING: ' + v.pending if v.pending else 'available'}")
        return {}
    work = Path(a.output_dir)
    device = "cuda" if torch.cuda.is_available() else "cpu"
    scorer = Scorer(a, device, str(work / "classifiers") if a.quick else a.classifier_dir)
    results = {v.name: {} for v in variants if not v.pending}
    for v in variants:
        for seed in a.seeds if not v.pending else []:
            cached = run_dir_of(work, v.name, seed).with_suffix(".json")
            if not a.report_only or cached.exists():
                results[v.name][seed] = ensure_run(v, a, seed, work, scorer, device)
    settings = {k: v for k, v in vars(a).items() if k not in ("list", "report_only")}
    settings.update(device=device, num_real_images=scorer.num_real)
    return write_report(results, variants, settings, Path(a.results_dir))


if __name__ == "__main__":
    main()
