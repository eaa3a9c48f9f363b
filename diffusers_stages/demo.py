"""The main job (`diffusers-stages demo`): the study's best configuration against the baseline, on a CPU budget.

In the study (`benchmarks/results/study.md`, issue 18: MNIST, 2,000 steps) no method beat its baseline at the default
sampling budget in both feature spaces; the one clear gain was EDM-FDM at low NFE (5-9 Heun evaluations), where the
EDM baseline falls apart. So the demo trains the unified EDM baseline and the unified EDM-FDM model on the same data,
budget and seeds, scores both at a default and at low sampling budgets (Heun: ``NFE = 2 n - 1`` for ``n`` steps), and
says, per budget, whether FDM wins. Everything it reports is measured in the run; at the demo's own budget (600 steps
on the embedded digits) FDM has won only at NFE 5 so far.
"""

from __future__ import annotations

import argparse
from pathlib import Path

import torch

from .training import TrainingConfig

#: run name -> its `TrainingConfig` fields on top of the demo's shared ones
DEMO_RUNS = {"baseline": dict(noise_process="edm"), "fdm": dict(noise_process="edm_fdm")}


def demo_config(args: argparse.Namespace, name: str, seed: int) -> TrainingConfig:
    """The `TrainingConfig` of run ``name`` with ``seed``: the demo's data, UNet, budget, EMA, one checkpoint."""
    return TrainingConfig(
        dataset_name=args.dataset,
        resolution=args.resolution,
        block_out_channels=list(args.block_out_channels),
        max_train_steps=args.max_train_steps,
        train_batch_size=args.train_batch_size,
        learning_rate=args.learning_rate,
        num_inference_steps=args.num_inference_steps,
        eval_fid_samples=0,  # scored below, at both sampling budgets
        checkpointing_steps=args.max_train_steps,
        checkpoints_total_limit=1,
        validation_steps=0,
        use_ema=True,
        ema_decay=0.995,
        seed=seed,
        output_dir=str(Path(args.output_dir) / f"{name}-seed{seed}"),
        overwrite_output_dir=args.overwrite_output_dir,
        report_to="none",
        **DEMO_RUNS[name],
    )


def score(folder: str, args: argparse.Namespace, real: torch.Tensor, extractor) -> dict[int, float]:
    """FID of the pipeline in ``folder`` at each sampler step count of `budgets`, ``args.fid_samples`` samples each;
    keyed by NFE."""
    from .evaluation.fid import fid
    from .pipelines import load_pipeline
    from .training import sample_images

    pipe = load_pipeline(folder)
    pipe.unet.eval()
    return {2 * n - 1: fid(extractor, real, sample_images(pipe, args.fid_samples, n, seed=1)) for n in budgets(args)}


def budgets(args: argparse.Namespace) -> list[int]:
    """The Heun step counts scored: the default budget, then each low one."""
    return [args.num_inference_steps, *args.low_nfe_steps]


def mean_std(values: list[float]) -> str:
    t = torch.tensor(values, dtype=torch.float64)
    return f"{t.mean():.2f} ± {t.std():.2f}" if len(values) > 1 else f"{t.mean():.2f}"


def results_table(fids: dict[str, list[dict[int, float]]]) -> list[str]:
    """Markdown rows: FID mean ± std over seeds per run and NFE, the per-seed values, and the ratio to the baseline."""
    table = ["| model | NFE | FID (mean ± std over seeds) | per seed | ratio to baseline |", "|---|---|---|---|---|"]
    for name, runs in fids.items():
        for nfe in runs[0]:
            values = [r[nfe] for r in runs]
            ratio = sum(values) / sum(r[nfe] for r in fids["baseline"])
            per_seed = ", ".join(f"{v:.2f}" for v in values)
            table.append(f"| {name} | {nfe} | {mean_std(values)} | {per_seed} | {ratio:.2f} |")
    return table


def comparison_grid(args: argparse.Namespace, fids: dict[str, list[dict[int, float]]]) -> None:
    """``comparison.png``: 64 samples of every run (columns, first seed) at each sampling budget (rows), with FIDs."""
    from diffusers.utils import make_image_grid
    from PIL import Image, ImageDraw

    from .data import tensor_to_pil
    from .pipelines import load_pipeline
    from .training import sample_images

    out, cell, pad = Path(args.output_dir), 8 * args.resolution * 2, 8
    steps = budgets(args)
    canvas = Image.new("RGB", (len(fids) * (cell + pad), len(steps) * (cell + 20)), "white")
    draw = ImageDraw.Draw(canvas)
    for col, name in enumerate(fids):
        pipe = load_pipeline(str(out / f"{name}-seed{args.seeds[0]}"))
        for row, n in enumerate(steps):
            grid = make_image_grid(tensor_to_pil(sample_images(pipe, 64, n, seed=0)), rows=8, cols=8)
            x, y = col * (cell + pad), row * (cell + 20)
            canvas.paste(grid.convert("RGB").resize((cell, cell), Image.NEAREST), (x, y + 20))
            draw.text((x + 4, y + 4), f"{name}  NFE {2 * n - 1}  FID {fids[name][0][2 * n - 1]:.1f}", fill="black")
    canvas.save(out / "comparison.png")


def verdicts(fids: dict[str, list[dict[int, float]]]) -> list[str]:
    """One line per run and NFE: its mean FID as a ratio of the baseline's, and whether it wins."""
    lines = []
    for name, runs in fids.items():
        if name == "baseline":
            continue
        for nfe in runs[0]:
            ratio = sum(r[nfe] for r in runs) / sum(r[nfe] for r in fids["baseline"])
            outcome = "wins" if ratio < 1 else "does not win"
            lines.append(f"{name} at NFE {nfe}: {ratio:.2f}x the baseline's FID over {len(runs)} seeds: {outcome}")
    return lines


def run_demo(args: argparse.Namespace) -> dict:
    """Train every `DEMO_RUNS` entry for every seed (all configs checked first), score them, write ``results.md``,
    ``results.json`` and ``comparison.png`` into ``args.output_dir``; returns the FIDs."""
    from .data import dataset_to_tensor, load_image_dataset
    from .evaluation.classifier import ClassifierFeatureExtractor, load_or_train_classifier
    from .training import train
    from .utils import write_json

    configs = {(n, s): demo_config(args, n, s) for n in DEMO_RUNS for s in args.seeds}
    for (name, seed), config in configs.items():
        print(f"== training {name}, seed {seed} ({args.max_train_steps} steps on {args.dataset}) ==", flush=True)
        train(config)
    real = dataset_to_tensor(load_image_dataset(args.dataset), resolution=args.resolution, channels=1)
    extractor = ClassifierFeatureExtractor(load_or_train_classifier(args.dataset, progress=False))
    fids = {n: [score(configs[n, s].output_dir, args, real, extractor) for s in args.seeds] for n in DEMO_RUNS}
    comparison_grid(args, fids)
    table = results_table(fids) + [""] + verdicts(fids)
    out = Path(args.output_dir)
    (out / "results.md").write_text("\n".join(table) + "\n")
    write_json(
        {n: [{str(k): v for k, v in r.items()} for r in runs] for n, runs in fids.items()}, out / "results.json"
    )
    print("\n".join(table))
    print(
        f"side-by-side samples: {out / 'comparison.png'}; pipelines: {', '.join(c.output_dir for c in configs.values())}"
    )
    return fids
