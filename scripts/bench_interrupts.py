"""Benchmark: what cutting steps into sample-bounded chunks costs, and how long a Cancel can wait.

Usage: python scripts/bench_interrupts.py [--device cpu|cuda] [--steps 4]

For NeRF training steps (rays per step x samples per ray) and for renders (with normals), one run measures the
time per step or render with the pack's chunking (``renderer.CHUNK_SAMPLES``) and with one chunk for the whole
batch (the behaviour before chunking), and the longest gap between two interrupt checks. Prints ratios measured
in this one run; nothing fails on a slow machine.
"""
from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # the repository root, for the harness package
from harness.pack import register_pack  # noqa: E402
from harness.toy_scene import toy_nerf, toy_views  # noqa: E402

WHOLE = 1 << 40  # a chunk budget no batch reaches: one chunk per step


def scene(device: str):
    return toy_views(64, views=8)


def new_nerf(device: str, samples: int):
    return toy_nerf(samples, device=device)


def timed_training(device, data, samples, rays, steps, budget) -> tuple[float, float]:
    """(seconds per step, longest gap between interrupt checks) with chunk budget ``budget``."""
    from compose3d.kernels import renderer
    from compose3d.kernels.reconstruct import FitSettings, fit_views

    renderer.CHUNK_SAMPLES = budget
    cameras, images, masks = data
    nerf = new_nerf(device, samples)
    fit_views(nerf, images, cameras, masks, FitSettings(steps=1, rays_per_step=rays))  # warm-up
    checks = []
    start = time.perf_counter()
    fit_views(nerf, images, cameras, masks, FitSettings(steps=steps, rays_per_step=rays),
              check_interrupt=lambda: checks.append(time.perf_counter()))
    total = time.perf_counter() - start
    gaps = [b - a for a, b in zip([start] + checks, checks + [start + total])]
    return total / steps, max(gaps)


def timed_render(device, data, samples, size, budget) -> tuple[float, float]:
    """(seconds per render of one view with normals, longest gap between progress calls)."""
    import torch

    from compose3d.kernels import renderer
    from compose3d.kernels.reconstruct import FitSettings, fit_views

    renderer.CHUNK_SAMPLES = budget
    cameras, images, masks = data
    nerf = new_nerf(device, samples)
    fit_views(nerf, images, cameras, masks, FitSettings(steps=20, rays_per_step=1024))
    settings = renderer.RenderSettings(samples, 8192)
    calls = []
    start = time.perf_counter()
    with torch.no_grad():
        renderer.render_views(nerf.field, nerf.background, cameras[:1], size, size, settings, nerf.occupancy,
                              with_normals=True, on_progress=lambda done, total: calls.append(time.perf_counter()))
    total = time.perf_counter() - start
    gaps = [b - a for a, b in zip([start] + calls[:-1], calls)]
    return total, max(gaps)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--steps", type=int, default=4)
    args = parser.parse_args()
    register_pack()
    import torch

    from compose3d.kernels import renderer

    budget = renderer.CHUNK_SAMPLES
    data = scene(args.device)
    print(f"device {args.device}, torch threads {torch.get_num_threads()}, chunk budget {budget} samples")
    print("training step         | chunked s/step | whole s/step | chunked/whole | longest wait chunked | whole")
    for samples, rays in ((64, 4096), (64, 16384), (512, 8192)):
        chunked, wait = timed_training(args.device, data, samples, rays, args.steps, budget)
        whole, whole_wait = timed_training(args.device, data, samples, rays, args.steps, WHOLE)
        print(f"{rays:6d} rays x {samples:4d} | {chunked:14.3f} | {whole:12.3f} | {chunked / whole:13.2f} | "
              f"{wait:18.3f} s | {whole_wait:.3f} s")
    print("render + normals      | chunked s      | whole-8192-ray chunks s | ratio | longest wait chunked | whole")
    for samples, size in ((96, 128), (512, 64)):
        chunked, wait = timed_render(args.device, data, samples, size, budget)
        whole, whole_wait = timed_render(args.device, data, samples, size, WHOLE)
        print(f"{size:4d}^2 x {samples:4d} samples | {chunked:12.3f} | {whole:23.3f} | {chunked / whole:5.2f} | "
              f"{wait:18.3f} s | {whole_wait:.3f} s")


if __name__ == "__main__":
    main()
