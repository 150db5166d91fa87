"""Meshes, stage 2 of 3: colour baking from a colour field -> vertex colours, or a UV atlas (xatlas) and texture.

Meshes come from :mod:`mesh_extract`; :mod:`mesh_files` writes the result to a file.

Conventions:

* World frame as in :mod:`cameras` (right-handed, y up).
* UVs follow trimesh (and OpenGL): u to the right, v up, ``v = 0`` is the **bottom** row of the image.
  trimesh flips v to glTF's top-left origin when it writes a .glb and back when it reads one. Texel
  ``(row r, column c)`` of an ``S x S`` texture has its centre at ``uv = ((c + 0.5) / S, 1 - (r + 0.5) / S)``.
* Colour callables get float32 points on the CPU (a model on a GPU moves them itself). Outputs may live on any
  device.

Example::

    >>> textured = bake_uv_texture(simplify_mesh(mesh, target_faces=50_000), color_fn, texture_size=1024)
    >>> coloured = bake_vertex_colors(mesh, color_fn)
"""
from __future__ import annotations

from typing import Callable

import numpy as np
import torch
import trimesh
import xatlas
from PIL import Image

from .checks import check_int_range
from .mesh_extract import check_chunk, check_mesh

ColorFn = Callable[[torch.Tensor], torch.Tensor]  # (P,3) float32 world points -> (P,3) float32 rgb in [0,1]

MIN_TEXTURE_SIZE = 16
MAX_TEXTURE_SIZE = 8192
MAX_PADDING = 64

#: Barycentric tolerance of the texture rasteriser: texels on a shared edge count as covered.
_BARY_EPS = 1e-6


# ------------------------------------------------------------------------------------- field evaluation


def _eval_colors(color_fn: ColorFn, points: np.ndarray, chunk: int) -> np.ndarray:
    """Evaluate ``color_fn`` on (P, 3) points in chunks on the CPU. Returns (P, 3) float32 clipped to [0, 1]."""
    points = np.ascontiguousarray(points, dtype=np.float32)
    out = np.empty((len(points), 3), np.float32)
    with torch.no_grad():
        for start in range(0, len(points), chunk):
            block = torch.from_numpy(points[start:start + chunk])
            rgb = torch.as_tensor(color_fn(block))
            if tuple(rgb.shape) != (len(block), 3):
                raise ValueError(f"color_fn: expected shape ({len(block)}, 3) for {len(block)} points, "
                                 f"got {tuple(rgb.shape)}")
            out[start:start + len(block)] = rgb.detach().to("cpu", torch.float32).numpy()
    bad = int(np.isnan(out).any(axis=1).sum())
    if bad:
        raise ValueError(f"color_fn: returned NaN for {bad} of {len(points)} points")
    return np.clip(out, 0.0, 1.0)


def _to_rgba8(rgb: np.ndarray) -> np.ndarray:
    """(P, 3) float in [0, 1] -> (P, 4) uint8 RGBA with alpha 255 (rounded to nearest)."""
    rgba = np.full((len(rgb), 4), 255, np.uint8)
    rgba[:, :3] = np.round(np.clip(rgb, 0.0, 1.0) * 255.0).astype(np.uint8)
    return rgba


# ---------------------------------------------------------------------------------------------- colour


def bake_vertex_colors(mesh: trimesh.Trimesh, color_fn: ColorFn, chunk: int = 1 << 18) -> trimesh.Trimesh:
    """Colour every vertex with the colour field at its position.

    Args:
        mesh: trimesh.Trimesh with (V, 3) vertices.
        color_fn: (P, 3) float32 CPU world points -> (P, 3) float rgb; values are clipped to [0, 1].
        chunk: points per call of ``color_fn``.

    Returns:
        A new trimesh.Trimesh (same vertices and faces) with (V, 4) uint8 RGBA vertex colours
        (``round(255 * rgb)``, alpha 255).
    """
    check_mesh(mesh)
    chunk = check_chunk(chunk)
    rgba = _to_rgba8(_eval_colors(color_fn, mesh.vertices, chunk))
    return trimesh.Trimesh(vertices=mesh.vertices.copy(), faces=mesh.faces.copy(), vertex_colors=rgba,
                           process=False)


def _unwrap(vertices: np.ndarray, faces: np.ndarray, size: int, padding: int):
    """xatlas charts packed for a ``size`` texture. Returns (V', ) vertex map, (F, 3) faces, (V', 2) uv."""
    atlas = xatlas.Atlas()
    atlas.add_mesh(np.ascontiguousarray(vertices, np.float32), np.ascontiguousarray(faces, np.uint32))
    pack = xatlas.PackOptions()
    pack.resolution = size
    pack.padding = padding
    pack.bilinear = True
    atlas.generate(pack_options=pack)
    if atlas.atlas_count != 1:
        raise RuntimeError(f"xatlas packed the charts into {atlas.atlas_count} atlases instead of one")
    vmap, new_faces, uv = atlas[0]
    return vmap.astype(np.int64), new_faces.astype(np.int64), uv.astype(np.float64)


def _rasterize_uv(uv: np.ndarray, faces: np.ndarray, size: int, chunk: int):
    """Find the triangle and barycentrics under every texel centre of a ``size x size`` texture.

    Args:
        uv: (V, 2) float64 trimesh-convention UVs (v up); faces: (F, 3) int64.

    Returns:
        (tri, bary): (S, S) int64 triangle per texel (-1 = uncovered) and (S, S, 3) float64 barycentrics,
        indexed [row, column] with row 0 at the top of the image (v = 1).
    """
    pix = np.stack([uv[:, 0] * size, (1.0 - uv[:, 1]) * size], axis=-1)  # continuous (x, y) pixel coords
    tri_px = pix[faces]  # (F, 3, 2)
    a = tri_px[:, 0]
    e1, e2 = tri_px[:, 1] - a, tri_px[:, 2] - a
    det = e1[:, 0] * e2[:, 1] - e2[:, 0] * e1[:, 1]
    # texel (r, c) centre is (c + 0.5, r + 0.5): candidate columns are ceil(min - 0.5) .. floor(max - 0.5)
    lo = np.clip(np.ceil(tri_px.min(axis=1) - 0.5 - 1e-9), 0, size - 1).astype(np.int64)
    hi = np.clip(np.floor(tri_px.max(axis=1) - 0.5 + 1e-9), 0, size - 1).astype(np.int64)
    span = np.maximum(hi - lo + 1, 0)
    counts = np.where(np.abs(det) > 1e-12, span[:, 0] * span[:, 1], 0)

    tri_map = np.full((size, size), -1, np.int64)
    bary_map = np.zeros((size, size, 3), np.float64)
    ends = np.cumsum(counts)
    first = 0
    while first < len(faces):
        base = ends[first - 1] if first else 0
        last = max(int(np.searchsorted(ends, base + chunk, side="right")), first + 1)
        ids = np.arange(first, last)
        n = counts[ids]
        tid = np.repeat(ids, n)
        local = np.arange(int(n.sum())) - np.repeat(np.cumsum(n) - n, n)
        cols = lo[tid, 0] + local % span[tid, 0]
        rows = lo[tid, 1] + local // span[tid, 0]
        dx, dy = cols + 0.5 - a[tid, 0], rows + 0.5 - a[tid, 1]
        b1 = (dx * e2[tid, 1] - e2[tid, 0] * dy) / det[tid]
        b2 = (e1[tid, 0] * dy - dx * e1[tid, 1]) / det[tid]
        b0 = 1.0 - b1 - b2
        inside = (b0 >= -_BARY_EPS) & (b1 >= -_BARY_EPS) & (b2 >= -_BARY_EPS)
        rows, cols = rows[inside], cols[inside]
        tri_map[rows, cols] = tid[inside]
        bary_map[rows, cols] = np.stack([b0[inside], b1[inside], b2[inside]], axis=-1)
        first = last
    return tri_map, bary_map


def _dilate(rgb: np.ndarray, covered: np.ndarray, iterations: int) -> np.ndarray:
    """Grow (S, S, 3) colours into uncovered texels: each pass gives every uncovered texel next to a covered
    one the mean of its covered 8-neighbours. Texels still uncovered afterwards get the mean colour."""
    rgb, covered = rgb.copy(), covered.copy()
    size_y, size_x = covered.shape
    for _ in range(iterations):
        if covered.all():
            break
        padded_rgb = np.pad(rgb * covered[..., None], ((1, 1), (1, 1), (0, 0)))
        padded_cov = np.pad(covered, 1).astype(np.float32)
        total = np.zeros_like(rgb)
        count = np.zeros(covered.shape, np.float32)
        for dy in (-1, 0, 1):
            for dx in (-1, 0, 1):
                if dy or dx:
                    total += padded_rgb[1 + dy:1 + dy + size_y, 1 + dx:1 + dx + size_x]
                    count += padded_cov[1 + dy:1 + dy + size_y, 1 + dx:1 + dx + size_x]
        grow = ~covered & (count > 0)
        rgb[grow] = total[grow] / count[grow, None]
        covered |= grow
    if covered.any() and not covered.all():
        rgb[~covered] = rgb[covered].mean(axis=0)
    return rgb


def bake_uv_texture(mesh: trimesh.Trimesh, color_fn: ColorFn, texture_size: int = 1024, padding: int = 2,
                    chunk: int = 1 << 18) -> trimesh.Trimesh:
    """UV-unwrap a mesh with xatlas and paint a texture from a colour field.

    Every texel whose centre lies in a triangle in UV space gets ``color_fn`` at the 3D point with the same
    barycentric coordinates; colours are then grown ``padding`` texels into the empty space around the charts
    (so bilinear filtering at chart borders does not pick up background) and the rest is filled with the mean.
    xatlas dominates the cost (about 10 s per 50k faces on one CPU core): simplify first.

    Args:
        mesh: trimesh.Trimesh with (V, 3) vertices and (F, 3) faces.
        color_fn: (P, 3) float32 CPU world points -> (P, 3) float rgb; values are clipped to [0, 1].
        texture_size: S, texture width and height in texels, in [16, 8192].
        padding: texels between charts (xatlas) and dilation passes, in [0, 64].
        chunk: (triangle, texel) candidate pairs per rasterisation step and points per ``color_fn`` call.

    Returns:
        A new trimesh.Trimesh with vertices split at UV seams ((V', 3) float64, V' >= V, same surface), (F, 3)
        faces and ``TextureVisuals``: (V', 2) uv in trimesh's convention (v = 0 at the bottom of the image) and a
        ``PBRMaterial`` (white base colour factor, metallic 0, roughness 1) whose base colour texture is an
        ``S x S`` RGB PIL image.
    """
    check_mesh(mesh)
    size = check_int_range("texture_size", texture_size, MIN_TEXTURE_SIZE, MAX_TEXTURE_SIZE)
    padding = check_int_range("padding", padding, 0, MAX_PADDING)
    chunk = check_chunk(chunk)

    vmap, faces, uv = _unwrap(mesh.vertices, mesh.faces, size, padding)
    vertices = np.asarray(mesh.vertices, np.float64)[vmap]
    tri, bary = _rasterize_uv(uv, faces, size, chunk)
    covered = tri >= 0
    corners = vertices[faces[tri[covered]]]  # (N, 3, 3)
    points = np.einsum("nk,nkd->nd", bary[covered], corners)
    rgb = np.zeros((size, size, 3), np.float32)
    rgb[covered] = _eval_colors(color_fn, points, chunk)
    rgb = _dilate(rgb, covered, padding)
    image = Image.fromarray(np.round(np.clip(rgb, 0.0, 1.0) * 255.0).astype(np.uint8))  # (S, S, 3): RGB
    material = trimesh.visual.material.PBRMaterial(
        baseColorTexture=image, baseColorFactor=[255, 255, 255, 255], metallicFactor=0.0, roughnessFactor=1.0)
    visual = trimesh.visual.TextureVisuals(uv=uv, material=material)
    return trimesh.Trimesh(vertices=vertices, faces=faces, visual=visual, process=False)
