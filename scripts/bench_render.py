"""Benchmark: render throughput and peak memory of the pack's renderer against a naive pure-torch reference,
plus marching-cubes time. Prints ratios measured in this one run (not a test; nothing fails on a slow machine).

Usage: python scripts/bench_render.py [--rays 4096] [--samples 64] [--repeats 5] [--device cpu|cuda]

The field is the CPU/GPU default of NeRF From Views, with its occupancy grid carved to the visual hull of the
built-in test object (as at the start of a reconstruction). "ours" = render_rays (one-call hash lookup with a
scatter-add backward, occupancy skipping); "naive" = the same field evaluated at every sample with a per-level
hash loop and torch's embedding backward, the straightforward implementation. Each variant runs in its own
process so its peak memory (RSS on the CPU, allocator peak on CUDA) is its own.
"""
from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # the repository root, for the harness package
from harness.pack import register_pack  # noqa: E402


def build(device: str):
    import torch

    from compose3d.kernels.background import SolidBackground
    from compose3d.kernels.cameras import concat_cameras, orbit_cameras
    from compose3d.kernels.field import config_for_device
    from compose3d.kernels.nerf import NeRF
    from compose3d.kernels.rays import camera_rays
    from compose3d.kernels.toy_object import render_toy_object

    nerf = NeRF.create(config_for_device(device, blob_density=0.0, density_activation="exp"),
                       background=SolidBackground(), device=device)
    cams = concat_cameras(orbit_cameras(8, 15.0, 0, 360, 2.5, 40), orbit_cameras(8, 45.0, 22.5, 360, 2.5, 40))
    _, masks, _ = render_toy_object(cams, 64, 64)
    nerf.occupancy.carve(cams.c2w, cams.pixel_intrinsics(64, 64), masks)
    origins, dirs = camera_rays(cams, 64, 64)
    gen = torch.Generator().manual_seed(0)
    pick = torch.randint(0, origins[..., 0].numel(), (1 << 16,), generator=gen)
    return nerf, origins.reshape(-1, 3)[pick].to(device), dirs.reshape(-1, 3)[pick].to(device)


def naive_encode(grid, x):
    """Per-level loop, integer corner coordinates, torch's embedding (sort-based backward)."""
    import torch
    import torch.nn.functional as F

    x = x.clamp(0, 1)
    corners = torch.tensor([[i >> 2 & 1, i >> 1 & 1, i & 1] for i in range(8)], device=x.device)
    feats = []
    for level in range(grid.levels):
        res = int(grid.resolutions[level])
        pos = x * res
        cell = pos.floor().long().clamp_max(res - 1)
        frac = pos - cell
        v = cell[:, None, :] + corners  # (P, 8, 3)
        if level < grid.dense_levels:
            idx = v[..., 0] + v[..., 1] * (res + 1) + v[..., 2] * (res + 1) ** 2
        else:
            idx = ((v[..., 0] * 1) ^ (v[..., 1] * 2654435761) ^ (v[..., 2] * 805459861)) & grid.table_mask
        start = int(grid.offsets[level])
        f = F.embedding(idx + start, grid.table)  # (P, 8, F)
        w = torch.where(corners.bool(), frac[:, None, :], 1 - frac[:, None, :]).prod(-1)
        feats.append((f * w[..., None]).sum(1))
    return torch.cat(feats, -1)


def naive_render(nerf, origins, dirs, samples):
    """Every sample of every ray through the field, no skipping."""
    import torch

    from compose3d.kernels.rays import ray_aabb
    from compose3d.kernels.volume_rendering import accumulate, render_weights

    field = nerf.field
    t_near, t_far, hit = ray_aabb(origins, dirs, field.aabb)
    t_far = torch.where(hit, t_far, t_near)
    edges = torch.linspace(0, 1, samples + 1, device=origins.device)
    ts = t_near[:, None] + (t_far - t_near)[:, None] * edges
    mid = 0.5 * (ts[:, :-1] + ts[:, 1:])
    pts = (origins[:, None] + dirs[:, None] * mid[..., None]).reshape(-1, 3)
    c = field.config
    h = naive_encode(field.encoding, (pts + c.bound) / (2 * c.bound))
    sigma = field.activation(field.density_net(h).squeeze(-1) + field.blob(pts)).view(len(origins), samples)
    rgb = torch.sigmoid(field.color_net(h)).view(len(origins), samples, 3)
    w, _, _ = render_weights(ts[:, :-1], ts[:, 1:], sigma * hit[:, None])
    return accumulate(w, rgb) + (1 - accumulate(w)) * nerf.background(dirs), pts.shape[0]


def run_variant(variant: str, mode: str, rays: int, samples: int, repeats: int, device: str) -> dict:
    import torch

    from compose3d.kernels.renderer import render_rays

    torch.manual_seed(0)
    nerf, origins, dirs = build(device)

    def once(i):
        o, d = origins[i * rays % len(origins):][:rays], dirs[i * rays % len(dirs):][:rays]
        with torch.set_grad_enabled(mode == "fwd+bwd"):
            if variant == "ours":
                out = render_rays(nerf.field, nerf.background, o, d, samples, occupancy=nerf.occupancy)
                rgb, evaluated = out["features"], int(out["samples"])
            else:
                rgb, evaluated = naive_render(nerf, o, d, samples)
            if mode == "fwd+bwd":
                rgb.square().mean().backward()
        if device == "cuda":
            torch.cuda.synchronize()
        return evaluated

    once(0)  # warm-up
    if device == "cuda":
        torch.cuda.reset_peak_memory_stats()
    start = time.perf_counter()
    evaluated = sum(once(i + 1) for i in range(repeats))
    seconds = (time.perf_counter() - start) / repeats
    peak = (torch.cuda.max_memory_allocated() if device == "cuda"
            else resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024)
    return {"seconds": seconds, "ray_samples_per_s": rays * samples / seconds,
            "field_evals": evaluated / repeats, "peak_bytes": peak}


def marching_cubes_times(device: str) -> list[tuple[int, float, float, int]]:
    import torch

    from compose3d.kernels.mesh_extract import fill_cavities, grid_to_mesh, sample_density_grid

    nerf, _, _ = build(device)
    rows = []
    with torch.no_grad():
        for res in (128, 256):
            t0 = time.perf_counter()
            grid = sample_density_grid(nerf.visible_density, nerf.field.aabb, res)
            t1 = time.perf_counter()
            grid = fill_cavities(grid, 1.0, seal_radius=max(1, round(0.02 * res)))
            mesh = grid_to_mesh(grid, nerf.field.aabb.cpu().double().numpy(), 1.0)
            t2 = time.perf_counter()
            rows.append((res, t1 - t0, t2 - t1, len(mesh.faces)))
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rays", type=int, default=4096)
    parser.add_argument("--samples", type=int, default=64)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--variant", help=argparse.SUPPRESS)
    parser.add_argument("--mode", help=argparse.SUPPRESS)
    args = parser.parse_args()
    register_pack()
    if args.variant:
        print(json.dumps(run_variant(args.variant, args.mode, args.rays, args.samples, args.repeats, args.device)))
        return
    import torch

    print(f"device {args.device}, torch {torch.__version__}, {torch.get_num_threads()} threads, "
          f"{args.rays} rays x {args.samples} samples, mean of {args.repeats} repeats after a warm-up")
    results = {}
    for mode in ("fwd", "fwd+bwd"):
        for variant in ("naive", "ours"):
            out = subprocess.run([sys.executable, __file__, "--variant", variant, "--mode", mode, "--rays",
                                  str(args.rays), "--samples", str(args.samples), "--repeats", str(args.repeats),
                                  "--device", args.device], capture_output=True, text=True, check=True)
            results[(variant, mode)] = json.loads(out.stdout.strip().splitlines()[-1])
    print(f"{'mode':8} {'variant':6} {'s/batch':>8} {'ray samples/s':>14} {'field evals':>12} {'peak MiB':>9}")
    for (variant, mode), r in results.items():
        print(f"{mode:8} {variant:6} {r['seconds']:8.3f} {r['ray_samples_per_s']:14.3g} {r['field_evals']:12.0f} "
              f"{r['peak_bytes'] / 2**20:9.0f}")
    for mode in ("fwd", "fwd+bwd"):
        n, o = results[("naive", mode)], results[("ours", mode)]
        print(f"{mode}: ours is {n['seconds'] / o['seconds']:.1f}x faster, peak memory ratio ours/naive "
              f"{o['peak_bytes'] / n['peak_bytes']:.2f}")
    print("marching cubes (sample grid s, fill+cubes s, faces):")
    for res, sample_s, cubes_s, faces in marching_cubes_times(args.device):
        print(f"  {res}^3: {sample_s:.2f} s + {cubes_s:.2f} s, {faces} faces")


if __name__ == "__main__":
    main()
