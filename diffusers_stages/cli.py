"""The ``diffusers-stages`` command. Each subcommand registers itself in ``COMMANDS``."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

DEMO_RUNS = {
    "baseline": ["--model_type", "unified", "--noise_process", "edm"],
    "multistage_fdm": [
        "--model_type",
        "multi_decoder",
        "--num_stages",
        "3",
        "--noise_process",
        "edm_fdm",
        "--decoder_block_out_channels",
        "32,64,64;32,64,64;16,32,32",
    ],
}


def _demo(args: argparse.Namespace) -> int:
    """The main job: train a unified EDM baseline and a multi-stage FDM model on the same data and budget, then
    sample both, and write a side-by-side grid, an FID table (offline classifier features) and the pipelines."""
    import torch
    from PIL import Image, ImageDraw

    from .evaluation import write_json
    from .trainer import parse_args, train

    out = Path(args.output_dir)
    rows = {}
    for name, flags in DEMO_RUNS.items():
        print(f"== training {name} ({args.max_train_steps} steps on {args.dataset}) ==", flush=True)
        run_args = parse_args(
            [
                "--dataset_name",
                args.dataset,
                "--resolution",
                str(args.resolution),
                "--max_train_steps",
                str(args.max_train_steps),
                "--train_batch_size",
                str(args.train_batch_size),
                "--learning_rate",
                str(args.learning_rate),
                "--num_inference_steps",
                str(args.num_inference_steps),
                "--eval_fid_samples",
                str(args.fid_samples),
                "--checkpointing_steps",
                str(args.max_train_steps),
                "--checkpoints_total_limit",
                "1",
                "--validation_steps",
                "0",
                "--use_ema",
                "--ema_decay",
                "0.995",
                "--seed",
                str(args.seed),
                "--output_dir",
                str(out / name),
                "--report_to",
                "tensorboard",
                *flags,
            ]
        )
        torch.manual_seed(args.seed)
        rows[name] = train(run_args)
    grids = [Image.open(out / name / "samples.png").convert("RGB") for name in DEMO_RUNS]
    w, h = grids[0].size
    canvas = Image.new("RGB", (len(grids) * w + (len(grids) - 1) * 8, h + 20), "white")
    draw = ImageDraw.Draw(canvas)
    for i, (name, grid) in enumerate(zip(DEMO_RUNS, grids)):
        canvas.paste(grid, (i * (w + 8), 20))
        fid_text = f"  FID {rows[name]['fid']:.1f}" if "fid" in rows[name] else ""
        draw.text((i * (w + 8) + 4, 4), f"{name}{fid_text}", fill="black")
    canvas.save(out / "comparison.png")
    table = ["| model | noise process | decoders | steps | FID (classifier features) |", "|---|---|---|---|---|"]
    for name, m in rows.items():
        decoders = len(m["stage_boundaries"]) + 1 if m["model_type"] == "multi_decoder" else 1
        table.append(
            f"| {name} | {m['noise_process']} | {decoders} | {m['max_train_steps']} | {m.get('fid', float('nan')):.2f} |"
        )
    (out / "results.md").write_text("\n".join(table) + "\n")
    write_json(rows, out / "results.json")
    print("\n".join(table))
    print(f"side-by-side samples: {out / 'comparison.png'}; pipelines: {out / 'baseline'}, {out / 'multistage_fdm'}")
    return 0


def _add_demo(sub) -> None:
    p = sub.add_parser("demo", help="the main job: baseline vs multi-stage FDM on the embedded digits, offline")
    p.add_argument("--dataset", default="digits", help="'digits' (embedded), 'mnist', or a path")
    p.add_argument("--resolution", type=int, default=16)
    p.add_argument("--max_train_steps", type=int, default=600)
    p.add_argument("--train_batch_size", type=int, default=64)
    p.add_argument("--learning_rate", type=float, default=1e-3)
    p.add_argument("--num_inference_steps", type=int, default=18)
    p.add_argument("--fid_samples", type=int, default=500)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--output_dir", default="outputs/demo")
    p.set_defaults(func=_demo)


COMMANDS = [_add_demo]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="diffusers-stages", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)
    for add in COMMANDS:
        add(sub)
    args = parser.parse_args(argv)
    return args.func(args)


if __name__ == "__main__":
    sys.exit(main())
