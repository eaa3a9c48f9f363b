"""Training efficiency on MNIST: FID against training images seen, and FID against NFE, for
(a) a unified EDM baseline, (b) EDM-FDM, (c) multi-stage (multi-decoder), (d) multi-stage + FDM.

Same data (MNIST test set at 16x16 from ../shared/data/mnist), same seed, same UNet budget, same optimiser; FID in the
features of the offline MNIST classifier (`load_or_train_classifier("mnist")`) against all 10,000 real images;
sampling with Heun on Karras sigmas (NFE = 2 * steps - 1), EMA weights.

    python benchmarks/bench_training_efficiency.py                       # ~40 min on a 2-core CPU
    python benchmarks/bench_training_efficiency.py --steps 600 --eval_every 200 --fid_samples 200   # smoke

Writes benchmarks/results/training_efficiency.{json,md,png}.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import torch

from diffusers_stages.data import dataset_to_tensor, load_mnist_dataset
from diffusers_stages.evaluation.classifier import ClassifierFeatureExtractor, load_or_train_classifier
from diffusers_stages.evaluation.fid import extract_features, frechet_distance
from diffusers_stages.pipelines import StageAwareImagePipeline
from diffusers_stages.training import TrainingConfig, sample_images, train
from diffusers_stages.training.checkpointing import load_ema_weights

METHODS = {
    "baseline": dict(model_type="unified", noise_process="edm"),
    "fdm": dict(model_type="unified", noise_process="edm_fdm"),
    "multistage": dict(model_type="multi_decoder", noise_process="edm"),
    "multistage_fdm": dict(model_type="multi_decoder", noise_process="edm_fdm"),
    # the FDM paper's other two pairs (not in the default run): --methods vp vp_fdm ve ve_fdm
    "vp": dict(model_type="unified", noise_process="vp"),
    "vp_fdm": dict(model_type="unified", noise_process="vp_fdm"),
    "ve": dict(model_type="unified", noise_process="ve"),
    "ve_fdm": dict(model_type="unified", noise_process="ve_fdm"),
}
DEFAULT_METHODS = ["baseline", "fdm", "multistage", "multistage_fdm"]
RESULTS = Path(__file__).parent / "results"


def steps_to_reach(curve: list[tuple[int, float]], target: float):
    """First (linearly interpolated) training step at which the FID curve reaches ``target``; None if never."""
    prev = None
    for step, value in curve:
        if value <= target:
            if prev is None:
                return float(step)
            (s0, v0) = prev
            return s0 + (step - s0) * (v0 - target) / max(v0 - value, 1e-12)
        prev = (step, value)
    return None


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--steps", type=int, default=2000)
    p.add_argument("--eval_every", type=int, default=500)
    p.add_argument("--batch_size", type=int, default=64)
    p.add_argument("--resolution", type=int, default=16)
    p.add_argument("--fid_samples", type=int, default=500)
    p.add_argument("--default_steps", type=int, default=7, help="Heun steps of the default sampler (13 NFE)")
    p.add_argument("--nfe_steps", type=int, nargs="+", default=[3, 4, 5, 7, 10])
    p.add_argument("--num_stages", type=int, default=3)
    p.add_argument("--stages_json", default=None, help="stage boundaries (default: uniform in log-sigma)")
    p.add_argument("--decoder_block_out_channels", default="32,64,64;32,64,64;16,32,32")
    p.add_argument("--methods", nargs="+", default=DEFAULT_METHODS, choices=list(METHODS))
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--work_dir", default="outputs/bench_training_efficiency")
    p.add_argument("--name", default="training_efficiency")
    p.add_argument("--threads", type=int, default=2, help="torch threads (1 is faster on a shared, loaded machine)")
    a = p.parse_args()

    torch.set_num_threads(a.threads)
    classifier = load_or_train_classifier("mnist", progress=False)
    extractor = ClassifierFeatureExtractor(classifier)
    real = dataset_to_tensor(load_mnist_dataset(resolution=a.resolution), channels=1)
    real_feats = extract_features(extractor, real)

    def fid_of(pipe, steps, seed):
        fake = sample_images(pipe, a.fid_samples, steps, seed)
        return frechet_distance(real_feats, extract_features(extractor, fake))

    results = {"config": vars(a), "methods": {}}
    for name in a.methods:
        fields = dict(METHODS[name])
        if fields["model_type"] == "multi_decoder":
            fields.update(decoder_block_out_channels=a.decoder_block_out_channels, num_stages=a.num_stages)
            fields.update(stages_json=a.stages_json)
        out = Path(a.work_dir) / name
        config = TrainingConfig(
            dataset_name="mnist",
            resolution=a.resolution,
            train_batch_size=a.batch_size,
            max_train_steps=a.steps,
            checkpointing_steps=a.eval_every,
            use_ema=True,
            ema_decay=0.999,
            learning_rate=1e-3,
            validation_steps=0,
            report_to="none",
            num_inference_steps=a.default_steps,
            seed=a.seed,
            output_dir=str(out),
            **fields,
        )
        print(f"== {name}: training {a.steps} steps", flush=True)
        t0 = time.perf_counter()
        metrics = train(config)
        train_time = time.perf_counter() - t0
        pipe = StageAwareImagePipeline.from_pretrained(out)
        pipe.unet.eval()
        params = list(pipe.unet.parameters())
        curve = []
        for step in range(a.eval_every, a.steps + 1, a.eval_every):
            load_ema_weights(pipe.unet, out / f"checkpoint-{step}")
            curve.append((step, fid_of(pipe, a.default_steps, a.seed + 1)))
            print(f"   step {step}: FID {curve[-1][1]:.2f}", flush=True)
        nfe = [(2 * s - 1, fid_of(pipe, s, a.seed + 1)) for s in a.nfe_steps]
        results["methods"][name] = {
            "fid_vs_steps": curve,
            "fid_vs_nfe": nfe,
            "train_seconds": train_time,
            "train_steps_per_second": metrics.get("train_steps_per_second"),
            "parameters": sum(p.numel() for p in params),
        }
    summarise(results, a)


def summarise(results, a):
    base = results["methods"].get("baseline")
    lines = [
        f"FID (MNIST classifier features, {a.fid_samples} samples, Heun {2 * a.default_steps - 1} NFE) "
        f"against training steps (batch {a.batch_size}):",
        "",
    ]
    steps = [s for s, _ in next(iter(results["methods"].values()))["fid_vs_steps"]]
    lines += [
        "| method | " + " | ".join(f"{s} steps" for s in steps) + " | steps to baseline's final FID (ratio) |",
        "|---" * (len(steps) + 2) + "|",
    ]
    for name, r in results["methods"].items():
        ratio = ""
        if base:
            reach = steps_to_reach(r["fid_vs_steps"], base["fid_vs_steps"][-1][1])
            r["steps_ratio_to_baseline_final"] = None if reach is None else reach / a.steps
            ratio = "not reached" if reach is None else f"{reach:.0f} ({reach / a.steps:.2f})"
        lines.append(f"| {name} | " + " | ".join(f"{v:.1f}" for _, v in r["fid_vs_steps"]) + f" | {ratio} |")
    nfes = [n for n, _ in next(iter(results["methods"].values()))["fid_vs_nfe"]]
    lines += [
        "",
        "FID of the final models against NFE:",
        "",
        "| method | " + " | ".join(f"NFE {n}" for n in nfes) + " | NFE to match baseline at its default NFE |",
        "|---" * (len(nfes) + 2) + "|",
    ]
    for name, r in results["methods"].items():
        match = ""
        if base:
            target = dict(base["fid_vs_nfe"]).get(2 * a.default_steps - 1, base["fid_vs_steps"][-1][1])
            ok = [n for n, v in r["fid_vs_nfe"] if v <= target]
            r["nfe_to_match_baseline"] = min(ok) if ok else None
            match = f"{min(ok)} (ratio {min(ok) / (2 * a.default_steps - 1):.2f})" if ok else "not reached"
        lines.append(f"| {name} | " + " | ".join(f"{v:.1f}" for _, v in r["fid_vs_nfe"]) + f" | {match} |")
    table = "\n".join(lines)
    print(table)
    RESULTS.mkdir(parents=True, exist_ok=True)
    (RESULTS / f"{a.name}.md").write_text(table + "\n")
    (RESULTS / f"{a.name}.json").write_text(json.dumps(results, indent=2) + "\n")
    plot(results, RESULTS / f"{a.name}.png")


def plot(results, path):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(10, 4))
    for name, r in results["methods"].items():
        ax1.plot(*zip(*r["fid_vs_steps"]), marker="o", label=name)
        ax2.plot(*zip(*r["fid_vs_nfe"]), marker="o", label=name)
    ax1.set(xlabel="training steps", ylabel="FID (classifier features)", title="FID vs training", yscale="log")
    ax2.set(xlabel="NFE", ylabel="FID (classifier features)", title="FID vs NFE (final models)", yscale="log")
    ax1.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=100)


if __name__ == "__main__":
    main()
