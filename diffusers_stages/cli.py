"""The ``diffusers-stages`` command. Each subcommand registers itself in ``COMMANDS``."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path


def _demo(args: argparse.Namespace) -> int:
    """Offline smoke job: real data, the FID classifier, and a tiny SD pipeline sampled, saved and reloaded."""
    import numpy as np
    import torch
    from diffusers import DiffusionPipeline

    from .data import dataset_to_tensor, load_image_dataset
    from .evaluation import ClassifierFeatureExtractor, fid, load_or_train_classifier, save_image_grid, write_json
    from .stages import TimestepStages
    from .testing import tiny_stable_diffusion_pipeline

    out = Path(args.output_dir)
    ds = load_image_dataset(args.dataset, resolution=args.resolution)
    real = dataset_to_tensor(ds, channels=1)
    save_image_grid(real[:64], out / "real_grid.png", rows=8, scale=4)
    classifier = load_or_train_classifier(args.dataset, resolution=args.resolution)
    extractor = ClassifierFeatureExtractor(classifier)
    half = len(real) // 2
    fid_real = fid(extractor, real[:half], real[half:])
    fid_noise = fid(extractor, real[:half], torch.rand_like(real[half:]) * 2 - 1)

    pipe = tiny_stable_diffusion_pipeline()
    kwargs = dict(num_inference_steps=2, output_type="np")
    images = pipe("a digit", generator=torch.Generator().manual_seed(0), **kwargs).images
    pipe.save_pretrained(out / "tiny_sd_pipeline")
    TimestepStages.uniform(args.num_stages).save_pretrained(out / "tiny_sd_pipeline")
    reloaded = DiffusionPipeline.from_pretrained(out / "tiny_sd_pipeline")
    reloaded.set_progress_bar_config(disable=True)
    again = reloaded("a digit", generator=torch.Generator().manual_seed(0), **kwargs).images
    report = {
        "dataset": args.dataset,
        "num_images": len(real),
        "classifier_test_accuracy": classifier.config.test_accuracy,
        "fid_real_half_vs_half": fid_real,
        "fid_real_vs_uniform_noise": fid_noise,
        "tiny_sd_reload_max_abs_diff": float(np.abs(images - again).max()),
    }
    write_json(report, out / "demo_report.json")
    for k, v in report.items():
        print(f"{k:32s} {v}")
    return 0


def _add_demo(sub) -> None:
    p = sub.add_parser("demo", help="offline smoke job on the embedded digits dataset")
    p.add_argument("--dataset", default="digits", help="'digits' (embedded), 'mnist', or a path")
    p.add_argument("--resolution", type=int, default=16)
    p.add_argument("--num_stages", type=int, default=3)
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
