"""Benchmark: the cost of multi-decoder routing, mixed-stage batches, and parameters / MACs per stage.

For the paper's tailored decoders (192 / 128 / 16 base channels over a 128-channel encoder, widest at LOW noise)
scaled down to this machine (64-channel encoder, decoders 96 / 64 / 8), with the paper's CIFAR-10 boundaries
(t = 0.442, 0.631 of T = 1000), it measures in one run:

1. latency of one forward of the multi-decoder model at stage k against a plain diffusers UNet running the very same
   encoder and decoder k modules (the stock `forward`): the eager routing overhead (target ratio <= 1.01);
   with ``--compile``, the same pair under `torch.compile` (target <= 1.01), the multi-decoder once with one
   timestep tensor for the batch (routed in the graph by ``torch.cond``, as stock pipelines call it) and once with
   ``stage=k`` (nothing routed);
2. a mixed batch (samples spread over all stages) against single-stage batches of the same size, and against
   running each stage's sub-batch as its own forward;
3. parameters and MACs per stage (encoder + decoder k), against the single-decoder UNet.

Each ratio is the median over rounds of a paired measurement (both sides back to back, in random order; the pairs
in a shuffled order each round); times are medians. Usage: ``python benchmarks/bench_multi_decoder.py [--rounds 20]
[--batch_size 4] [--compile]``; smoke test: ``--rounds 1 --batch_size 3 --compile --compile_backend eager``.
"""

from __future__ import annotations

import argparse
import inspect
import json
import platform
import random
import statistics
import time
from pathlib import Path

import torch
from diffusers import UNet2DConditionModel, UNet2DModel
from tqdm.auto import tqdm

from diffusers_stages import (
    MultiDecoderUNet2DConditionModel,
    MultiDecoderUNet2DModel,
    TimestepStages,
    count_macs,
    count_parameters,
    stage_report,
)

STAGES = TimestepStages.from_fractions([0.442, 0.631])
PIXEL_CONFIG = dict(
    sample_size=32,
    in_channels=3,
    out_channels=3,
    layers_per_block=2,
    block_out_channels=(64, 128, 128),
    down_block_types=("DownBlock2D", "AttnDownBlock2D", "DownBlock2D"),
    up_block_types=("UpBlock2D", "AttnUpBlock2D", "UpBlock2D"),
    norm_num_groups=8,
    attention_head_dim=8,
)
PIXEL_WIDTHS = [[96, 192, 192], [64, 128, 128], [8, 16, 16]]  # 192 / 128 / 16 over 128, scaled by 1/2
CONDITION_CONFIG = dict(
    sample_size=16,
    in_channels=4,
    out_channels=4,
    layers_per_block=2,
    block_out_channels=(64, 128),
    down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"),
    up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"),
    cross_attention_dim=64,
    norm_num_groups=32,
)
CONDITION_WIDTHS = [[64, 160], [64, 128], [32, 64]]  # 256 / 192 / 128 over 224 (latent diffusion), scaled


def single_decoder_unet(model):
    """The stock diffusers UNet of the model's config (the encoder's widths everywhere)."""
    names = [n for n in inspect.signature(model._unet_class.__init__).parameters if n != "self"]
    return model._unet_class(**{n: model.config[n] for n in names}).eval()


def plain_unet(model, stage: int):
    """A stock diffusers UNet whose modules are the multi-decoder model's encoder and decoder ``stage``."""
    unet = single_decoder_unet(model)
    for name in model._encoder_modules:
        setattr(unet, name, getattr(model, name))
    decoder = model.decoders[stage]
    unet.up_blocks, unet.conv_norm_out, unet.conv_act, unet.conv_out = (
        decoder.up_blocks,
        decoder.conv_norm_out,
        decoder.conv_act,
        decoder.conv_out,
    )
    return unet.eval()


CLOCKS = {"wall": time.perf_counter, "cpu": time.process_time}
CLOCK = CLOCKS["wall"]


def timed(fn) -> float:
    start = CLOCK()
    fn()
    return CLOCK() - start


def compiled_variants(model, plains, stage_t, make_inputs, backend: str) -> tuple[dict, dict]:
    """
    Compiled multi-decoder (one timestep tensor: in-graph routing; ``stage=k``) and compiled stock UNets, and the
    variants that failed to compile or run, with their error (timed no further).
    """
    torch._dynamo.config.cache_size_limit = max(torch._dynamo.config.cache_size_limit, 4 * len(plains))
    multi = torch.compile(model, fullgraph=True, backend=backend)
    variants, failures = {}, {}
    for k, plain in enumerate(plains):
        args, kwargs = make_inputs(stage_t[k])
        args = (args[0], stage_t[k][0])  # one timestep for the whole batch, as the stock pipelines pass it
        compiled_plain = torch.compile(plain, fullgraph=True, backend=backend)
        variants[f"compiled_plain_{k}"] = lambda p=compiled_plain, a=args, kw=kwargs: p(*a, **kw)
        variants[f"compiled_multi_{k}"] = lambda a=args, kw=kwargs: multi(*a, **kw)
        variants[f"compiled_stage_{k}"] = lambda a=args, kw=kwargs, k=k: multi(*a, **kw, stage=k)
        reference = plain(*args, **kwargs).sample
        for key in (f"compiled_multi_{k}", f"compiled_stage_{k}"):
            try:
                output = variants[key]().sample
            except Exception as error:  # e.g. inductor's torch.cond stride assertion (docs/models.md)
                failures[key] = f"{type(error).__name__}: {str(error).strip().splitlines()[0]}"
                del variants[key]
                continue
            torch.testing.assert_close(output, reference, atol=1e-4, rtol=1e-4)
    return variants, failures


@torch.no_grad()
def bench(name, model, make_inputs, batch_size, rounds, seed=0, compile_backend=None):
    """All timings of one model; ``make_inputs(t)`` returns the forward arguments for timesteps ``t``."""
    model.eval()
    g = torch.Generator().manual_seed(seed)
    stage_t = [STAGES.sample_timesteps(k, batch_size, generator=g) for k in range(STAGES.num_stages)]
    mixed_t = STAGES.sample_timesteps(torch.arange(batch_size) % STAGES.num_stages, generator=g)
    mixed_t = mixed_t[torch.randperm(batch_size, generator=g)]
    plains = [plain_unet(model, k) for k in range(STAGES.num_stages)]
    variants = {}
    for k in range(STAGES.num_stages):
        args, kwargs = make_inputs(stage_t[k])
        torch.testing.assert_close(model(*args, **kwargs).sample, plains[k](*args, **kwargs).sample, atol=1e-5, rtol=0)
        variants[f"plain_{k}"] = lambda p=plains[k], a=args, kw=kwargs: p(*a, **kw)
        variants[f"multi_{k}"] = lambda a=args, kw=kwargs: model(*a, **kw)
    mixed_args, mixed_kwargs = make_inputs(mixed_t)
    variants["mixed"] = lambda: model(*mixed_args, **mixed_kwargs)
    subs = [make_inputs(mixed_t[STAGES.stage_index(mixed_t) == k]) for k in range(STAGES.num_stages)]
    variants["split"] = lambda: [model(*a, **kw) for a, kw in subs]
    pairs = [(f"multi_{k}", f"plain_{k}") for k in range(STAGES.num_stages)] + [("mixed", "split")]
    failures = {}
    if compile_backend:
        compiled, failures = compiled_variants(model, plains, stage_t, make_inputs, compile_backend)
        variants.update(compiled)
        for k in range(STAGES.num_stages):
            pairs += [(key, f"compiled_plain_{k}") for key in (f"compiled_multi_{k}", f"compiled_stage_{k}")]
        pairs = [pair for pair in pairs if pair[0] in variants]
    for fn in variants.values():  # warm-up
        fn()
    # paired, interleaved measurements: the two sides of every ratio run back to back (in random order), and the
    # pairs in a random order each round, so that load drifts of a shared machine cancel in the per-round ratios
    times = {key: [] for key in variants}
    ratios = {pair: [] for pair in pairs}
    rng = random.Random(seed)
    for _ in tqdm(range(rounds), desc=f"{name}: interleaved rounds"):
        rng.shuffle(pairs)
        for pair in pairs:
            sides = list(pair)
            rng.shuffle(sides)
            measured = {key: timed(variants[key]) for key in sides}
            for key, value in measured.items():
                times[key].append(value)
            ratios[pair].append(measured[pair[0]] / measured[pair[1]])
    median = {key: statistics.median(v) for key, v in times.items()}
    median_ratio = {pair[0]: statistics.median(v) for pair, v in ratios.items()}

    args, kwargs = make_inputs(stage_t[0])
    report = stage_report(model, args[0], timesteps=[float(t[0]) for t in stage_t], **kwargs)
    baseline = single_decoder_unet(model)
    base_params, base_macs = count_parameters(baseline), count_macs(baseline, *args, **kwargs)
    rows = []
    for k, r in enumerate(report):
        rows.append(
            dict(
                stage=k,
                timesteps=STAGES.timestep_range(k),
                decoder_block_out_channels=model.decoders[k].block_out_channels,
                latency_multi_s=median[f"multi_{k}"],
                latency_plain_s=median[f"plain_{k}"],
                latency_ratio=median_ratio[f"multi_{k}"],
                **(
                    dict(
                        compiled_multi_over_stock=median_ratio.get(f"compiled_multi_{k}"),
                        compiled_stage_over_stock=median_ratio.get(f"compiled_stage_{k}"),
                    )
                    if compile_backend
                    else {}
                ),
                parameters=r.parameters,
                parameters_ratio=r.parameters / base_params,
                macs=r.macs,
                macs_ratio=r.macs / base_macs,
            )
        )
    mixed = dict(
        mixed_s=median["mixed"],
        split_s=median["split"],
        mixed_over_split=median_ratio["mixed"],
        **{f"mixed_over_single_stage_{k}": median["mixed"] / median[f"multi_{k}"] for k in range(STAGES.num_stages)},
    )
    return dict(
        model=name,
        config=dict(model.config),
        batch_size=batch_size,
        rounds=rounds,
        baseline_parameters=base_params,
        baseline_macs=base_macs,
        stages=rows,
        mixed_batch=mixed,
        compile_failures=failures,
    )


def _ratio(value: float | None) -> str:
    return "failed (below)" if value is None else f"**{value:.3f}**"


def markdown(result) -> str:
    lines = [
        f"### {result['model']} (batch {result['batch_size']}, {result['rounds']} interleaved rounds, {CLOCK.__name__})",
        "",
        "| stage | timesteps | decoder widths | latency multi / plain (median paired ratio) | params (x single-decoder UNet) | MACs/forward (x) |",
        "|---|---|---|---|---|---|",
    ]
    for r in result["stages"]:
        lines.append(
            f"| {r['stage']} | {r['timesteps'][0]}-{r['timesteps'][1] - 1} | {r['decoder_block_out_channels']} | "
            f"{r['latency_multi_s'] * 1e3:.0f} / {r['latency_plain_s'] * 1e3:.0f} ms (**{r['latency_ratio']:.3f}**) | "
            f"{r['parameters'] / 1e6:.2f} M ({r['parameters_ratio']:.2f}) | {r['macs'] / 1e9:.3f} G "
            f"({r['macs_ratio']:.2f}) |"
        )
    if "compiled_multi_over_stock" in result["stages"][0]:
        lines += [
            "",
            "Compiled (fullgraph) multi-decoder over the compiled stock UNet of the same widths (median paired ratio):",
        ]
        for r in result["stages"]:
            lines.append(
                f"stage {r['stage']}: one timestep (in-graph routing) {_ratio(r['compiled_multi_over_stock'])}, "
                f"`stage={r['stage']}` {_ratio(r['compiled_stage_over_stock'])}"
            )
        lines += [f"{key} failed: {error}" for key, error in result["compile_failures"].items()]
    m = result["mixed_batch"]
    singles = ", ".join(f"stage {k}: {m[f'mixed_over_single_stage_{k}']:.2f}" for k in range(STAGES.num_stages))
    lines += [
        "",
        f"Mixed batch (all stages): {m['mixed_s'] * 1e3:.1f} ms; x{m['mixed_over_split']:.3f} of running each "
        f"stage's sub-batch as its own forward; against a single-stage batch of the same size: {singles}.",
        "",
    ]
    return "\n".join(lines)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--rounds", type=int, default=20)
    parser.add_argument("--batch_size", type=int, default=4)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument(
        "--clock",
        choices=sorted(CLOCKS),
        default="wall",
        help="'wall': latency; 'cpu': CPU time of this process (all threads), steadier on a shared, loaded machine",
    )
    parser.add_argument("--compile", action="store_true", help="also time torch.compile'd models (fullgraph)")
    parser.add_argument("--compile_backend", default="inductor", help="torch.compile backend ('eager' to smoke-test)")
    parser.add_argument("--only", choices=["pixel", "condition"], default=None, help="benchmark one model only")
    parser.add_argument("--output", default=str(Path(__file__).parent / "results" / "multi_decoder.json"))
    args = parser.parse_args(argv)
    if args.batch_size < STAGES.num_stages:
        parser.error(f"--batch_size must be at least {STAGES.num_stages} (a mixed batch holds every stage).")
    torch.set_num_threads(args.threads)
    global CLOCK
    CLOCK = CLOCKS[args.clock]

    torch.manual_seed(0)
    backend = args.compile_backend if args.compile else None
    results = []
    if args.only in (None, "pixel"):
        pixel = MultiDecoderUNet2DModel.from_unet(UNet2DModel(**PIXEL_CONFIG), STAGES, PIXEL_WIDTHS)
        x = torch.randn(args.batch_size, 3, 32, 32)
        results.append(
            bench(
                "MultiDecoderUNet2DModel 32x32, encoder 64-128-128",
                pixel,
                lambda t: ((x[: len(t)], t), {}),
                args.batch_size,
                args.rounds,
                compile_backend=backend,
            )
        )
    if args.only in (None, "condition"):
        condition = MultiDecoderUNet2DConditionModel.from_unet(
            UNet2DConditionModel(**CONDITION_CONFIG), STAGES, CONDITION_WIDTHS
        )
        latents, context = torch.randn(args.batch_size, 4, 16, 16), torch.randn(args.batch_size, 77, 64)
        results.append(
            bench(
                "MultiDecoderUNet2DConditionModel 16x16 latents, encoder 64-128, 77 tokens",
                condition,
                lambda t: ((latents[: len(t)], t), {"encoder_hidden_states": context[: len(t)]}),
                args.batch_size,
                args.rounds,
                compile_backend=backend,
            )
        )
    for result in results:
        print(markdown(result))
    out = Path(args.output)
    out.parent.mkdir(parents=True, exist_ok=True)
    machine = dict(
        clock=args.clock,
        compile_backend=backend,
        platform=platform.platform(),
        processor=platform.processor(),
        torch=torch.__version__,
        threads=torch.get_num_threads(),
    )
    out.write_text(json.dumps(dict(machine=machine, stages=STAGES.boundaries, results=results), indent=2, default=str))
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
