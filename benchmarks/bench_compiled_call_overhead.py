"""Per-call overhead of the compiled multi-decoder model against the compiled stock UNet running the same modules.

At a tiny input the forward's compute is small, so the CPU time per call is mostly what runs around the kernels
(dynamo's guards, the Python wrapper): the multi-decoder model with ``stage=0`` and `plain_unet` (a stock
`UNet2DModel` holding the encoder and decoder 0) compile to the same inductor kernels, so their ratio is the routing
overhead of a compiled call. Paired rounds in alternating order, process CPU time, one thread.

Usage: ``python benchmarks/bench_compiled_call_overhead.py [--size 8] [--rounds 30] [--calls 20]``
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch
from bench_multi_decoder import PIXEL_CONFIG, PIXEL_WIDTHS, STAGES, plain_unet
from diffusers import UNet2DModel

from diffusers_stages import MultiDecoderUNet2DModel


def cpu_seconds(fn, calls: int) -> float:
    start = time.process_time()
    for _ in range(calls):
        fn()
    return time.process_time() - start


@torch.no_grad()
def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--size", type=int, default=8, help="Input height and width (batch 1).")
    p.add_argument("--rounds", type=int, default=30)
    p.add_argument("--calls", type=int, default=20, help="Calls per side and round.")
    args = p.parse_args(argv)
    torch.set_num_threads(1)
    torch.manual_seed(0)
    model = MultiDecoderUNet2DModel.from_unet(UNet2DModel(**PIXEL_CONFIG), STAGES, PIXEL_WIDTHS).eval()
    x, t = torch.randn(1, 3, args.size, args.size), torch.tensor(100)
    plain, multi = torch.compile(plain_unet(model, 0), fullgraph=True), torch.compile(model, fullgraph=True)
    sides = {"stock": lambda: plain(x, t), "multi": lambda: multi(x, t, stage=0)}
    for fn in sides.values():
        cpu_seconds(fn, 5)  # compile and warm up
    times = {name: [] for name in sides}
    for r in range(args.rounds):
        for name in sorted(sides, reverse=bool(r % 2)):
            times[name].append(cpu_seconds(sides[name], args.calls))
    ratios = [m / s for m, s in zip(times["multi"], times["stock"])]
    ms = {name: 1000 * statistics.median(v) / args.calls for name, v in times.items()}
    print(
        f"input 1x3x{args.size}x{args.size}: stock {ms['stock']:.2f} ms/call, multi-decoder {ms['multi']:.2f} ms/call"
    )
    print(f"multi / stock per round: median {statistics.median(ratios):.3f}, quartiles {statistics.quantiles(ratios)}")


if __name__ == "__main__":
    main()
