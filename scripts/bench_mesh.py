"""Time the mesh kernel on an analytic density (a few Gaussian blobs): grid sampling, marching cubes, clean-up,
simplification and texture baking. Not a test; prints a table.

Usage (from the repository root)::

    .venv/bin/python scripts/bench_mesh.py [--resolutions 128 256] [--texture-size 1024] [--target-faces 50000]
                                           [--threads N]

``sample_density_grid`` is timed twice: with a trivial field (the kernel's own cost: building points, copying
out) and with the blob field (dominated by evaluating the field). On machines where torch's intra-op thread
pool is slow to wake (some sandboxes), ``--threads 1`` can be much faster.
"""
from __future__ import annotations

import argparse
import pathlib
import platform
import sys
import tempfile
import time

import torch

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[1]))  # the repository root, for the harness package
from harness.pack import register_pack  # noqa: E402


def _import_pack():
    """Register the repository as the package ``compose3d`` (as ComfyUI imports it) and return the mesh kernels
    (kernels.mesh_extract, kernels.mesh_texture, kernels.mesh_files)."""
    register_pack()
    from compose3d.kernels import mesh_extract, mesh_files, mesh_texture
    return mesh_extract, mesh_texture, mesh_files


BLOBS = torch.tensor([  # centre x, y, z, sigma, peak density
    [0.0, 0.0, 0.0, 0.30, 100.0],
    [0.35, 0.25, 0.0, 0.18, 80.0],
    [-0.3, 0.3, 0.2, 0.15, 80.0],
    [0.0, -0.4, -0.25, 0.2, 60.0],
    [-0.2, -0.1, 0.45, 0.12, 90.0],
])


def blob_density(points: torch.Tensor) -> torch.Tensor:
    """(P, 3) float32 -> (P,) float32: a sum of isotropic Gaussians (one lumpy, connected object)."""
    d2 = ((points[:, None, :] - BLOBS[None, :, :3]) ** 2).sum(-1)
    return (BLOBS[:, 4] * torch.exp(-0.5 * d2 / BLOBS[:, 3] ** 2)).sum(-1)


def blob_color(points: torch.Tensor) -> torch.Tensor:
    """(P, 3) float32 -> (P, 3) float32 rgb in [0, 1], smooth in position."""
    return torch.sigmoid(3.0 * torch.stack([points[:, 0] + points[:, 1], points[:, 1] - points[:, 2],
                                            torch.sin(4.0 * points[:, 2])], dim=-1))


def timed(fn, *args, **kwargs):
    start = time.perf_counter()
    out = fn(*args, **kwargs)
    return out, time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--resolutions", type=int, nargs="+", default=[128, 256])
    parser.add_argument("--texture-size", type=int, default=1024)
    parser.add_argument("--target-faces", type=int, default=50_000)
    parser.add_argument("--threshold", type=float, default=10.0)
    parser.add_argument("--threads", type=int, default=0, help="torch intra-op threads (0: torch's default)")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    mesh_extract, mesh_texture, mesh_files = _import_pack()
    aabb = torch.tensor([[-1.0, -1.0, -1.0], [1.0, 1.0, 1.0]])
    rows = []

    def row(step, res, seconds, mesh=None, note=""):
        counts = (len(mesh.vertices), len(mesh.faces)) if mesh is not None else ("", "")
        rows.append((step, res, f"{seconds:.3f}", *counts, note))

    print(f"python {platform.python_version()}, torch {torch.__version__}, {torch.get_num_threads()} torch threads",
          flush=True)
    mesh_extract.sample_density_grid(blob_density, aabb, 16)  # warm-up
    last = None
    for res in args.resolutions:
        _, t_trivial = timed(mesh_extract.sample_density_grid, lambda p: p[:, 0], aabb, res)
        row("sample_density_grid (trivial field)", res, t_trivial, note="kernel overhead")
        grid, t_grid = timed(mesh_extract.sample_density_grid, blob_density, aabb, res)
        row("sample_density_grid", res, t_grid, note=f"{res ** 3:,} points")
        # marching cubes + winding check + world mapping on the grid just sampled (grid_to_mesh, used by extract_mesh)
        _, t_mc = timed(mesh_extract.grid_to_mesh, grid, aabb.double().numpy(), args.threshold)
        row("marching cubes on the grid", res, t_mc, note="skimage + winding check")
        mesh, t_extract = timed(mesh_extract.extract_mesh, blob_density, aabb, res, args.threshold)
        row("extract_mesh (sample + cubes)", res, t_extract, mesh)
        clean, t_clean = timed(mesh_extract.clean_mesh, mesh)
        row("clean_mesh", res, t_clean, clean)
        simple, t_simple = timed(mesh_extract.simplify_mesh, clean, args.target_faces)
        row(f"simplify_mesh -> {args.target_faces}", res, t_simple, simple)
        colored, t_vc = timed(mesh_texture.bake_vertex_colors, simple, blob_color)
        row("bake_vertex_colors", res, t_vc, colored)
        last = simple

    size = args.texture_size
    textured, t_uv = timed(mesh_texture.bake_uv_texture, last, blob_color, size)
    row(f"bake_uv_texture {size}", args.resolutions[-1], t_uv, textured, "vertices split at UV seams")
    with tempfile.TemporaryDirectory() as folder:
        for fmt in ("glb", "obj", "ply"):
            files, t_write = timed(mesh_files.write_mesh, textured, pathlib.Path(folder) / f"bench.{fmt}", fmt)
            size_mb = sum(f.stat().st_size for f in files) / 1e6
            row(f"write_mesh {fmt}", args.resolutions[-1], t_write, note=f"{len(files)} file(s), {size_mb:.1f} MB")

    header = ("step", "res", "seconds", "vertices", "faces", "note")
    widths = [max(len(str(r[i])) for r in rows + [header]) for i in range(len(header))]
    for r in [header, tuple("-" * w for w in widths)] + rows:
        print("  ".join(str(v).ljust(w) if i in (0, 5) else str(v).rjust(w)
                        for i, (v, w) in enumerate(zip(r, widths))).rstrip())


if __name__ == "__main__":
    main()
