"""Subnormal numbers on this CPU: what they cost a matrix product, and what the mixture step's products cost.

    .venv/bin/python benchmarks/subnormals.py --data-root ../shared/data/binarized_mnist

1. The mixture prior's weight gradient has the shape of G^T F, G (100, 500) the gradient of the component
   log-densities and F (100, 40) the latents: timed with G random, with G's entries subnormal (1e-40), at
   3.2e-38 (normal, but their products with F are subnormal: logsumexp's old gradient of a raised term)
   and zero, each with one column of ones.
2. torch.profiler over 20 training steps of speed.py's mog500 workload (K = 500, d = 40, batch 100, after
   two epochs of 10,000 images): the self time per call of the matrix products by shape.
"""

from __future__ import annotations

import argparse
import time

import torch


def per_call_us(fn, n: int = 200) -> float:
    fn()
    started = time.perf_counter()
    for _ in range(n):
        fn()
    return (time.perf_counter() - started) / n * 1e6


def products() -> None:
    f = torch.randn(100, 40, generator=torch.Generator().manual_seed(0))
    for label, fill in (("random", None), ("subnormal 1e-40", 1e-40), ("3.2e-38", 3.2e-38), ("zero", 0.0)):
        g = torch.randn(100, 500) if fill is None else torch.full((100, 500), fill)
        g[:, 0] = 1.0
        print(f"G^T F, G {label:16s} {per_call_us(lambda: g.t() @ f):9.1f} us")


def profile_mixture_step(data_root: str) -> None:
    import speed
    from torch.profiler import ProfilerActivity, profile

    import pyro_vae

    data = pyro_vae.load_dataset("binarized-mnist", data_root)
    x = data.train[:10_000]
    _, step, _, _, _ = speed._pair(data, torch.device("cpu"), "mog")
    epoch = speed.epochs_of(step, x)
    epoch(), epoch()
    with profile(activities=[ProfilerActivity.CPU], record_shapes=True) as prof:
        for i in range(0, 2000, 100):
            step(x[i : i + 100])
    rows = [e for e in prof.key_averages(group_by_input_shape=True) if e.key in ("aten::mm", "aten::addmm")]
    for e in sorted(rows, key=lambda e: -e.self_cpu_time_total)[:10]:
        print(f"{e.key:11s} {str(e.input_shapes):45s} {e.self_cpu_time_total / e.count:8.1f} us a call x {e.count}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data-root", required=True)
    args = parser.parse_args()
    products()
    profile_mixture_step(args.data_root)


if __name__ == "__main__":
    main()
