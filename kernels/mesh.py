"""Meshes: density field -> marching cubes -> clean -> simplify -> colours or UV texture -> file.

Conventions:

* World frame as in :mod:`cameras` (right-handed, y up). An ``aabb`` is a (2, 3) tensor: min corner, max corner.
* Density grid: ``grid[i, j, k]`` is the density at ``(x_i, y_j, z_k)`` with
  ``x = torch.linspace(aabb[0, 0], aabb[1, 0], R)`` (both ends included) and likewise for y and z.
* Faces are wound counter-clockwise seen from outside, so face normals point out of the dense region
  (towards lower density).
* UVs follow trimesh (and OpenGL): u to the right, v up, ``v = 0`` is the **bottom** row of the image.
  trimesh flips v to glTF's top-left origin when it writes a .glb and back when it reads one. Texel
  ``(row r, column c)`` of an ``S x S`` texture has its centre at ``uv = ((c + 0.5) / S, 1 - (r + 0.5) / S)``.
* Field callables get float32 points: :func:`sample_density_grid` creates them on ``aabb``'s device, the bake
  functions on the CPU (a model on a GPU moves them itself). Outputs may live on any device.

Example::

    >>> mesh = extract_mesh(density_fn, aabb, resolution=256, threshold=10.0)
    >>> mesh = simplify_mesh(clean_mesh(mesh), target_faces=50_000)
    >>> files = write_mesh(bake_uv_texture(mesh, color_fn), Path("out/model.glb"), "glb")
"""
from __future__ import annotations

import pathlib
import re
from typing import Callable

import numpy as np
import torch
import trimesh
import xatlas
from PIL import Image
from scipy.ndimage import binary_closing, binary_fill_holes
from skimage.measure import marching_cubes

from .checks import check_finite, check_int_range, check_range

DensityFn = Callable[[torch.Tensor], torch.Tensor]  # (P,3) float32 world points -> (P,) float32 density
ColorFn = Callable[[torch.Tensor], torch.Tensor]  # (P,3) float32 world points -> (P,3) float32 rgb in [0,1]

MIN_RESOLUTION = 16
MAX_RESOLUTION = 1024
MIN_TEXTURE_SIZE = 16
MAX_TEXTURE_SIZE = 8192
MAX_PADDING = 64
MESH_FORMATS = ("glb", "obj", "ply")

#: Barycentric tolerance of the texture rasteriser: texels on a shared edge count as covered.
_BARY_EPS = 1e-6
#: How many faces vote on the winding of a marching-cubes mesh.
_WINDING_VOTES = 4096


class NoSurfaceError(ValueError):
    """The density never crosses the threshold inside the box, so there is no surface to extract."""


# ----------------------------------------------------------------------------------------------- checks


def _check_aabb(aabb: torch.Tensor) -> torch.Tensor:
    """Return ``aabb`` as a (2, 3) float64 tensor on its device; raise ValueError('aabb: ...') if unusable."""
    box = torch.as_tensor(aabb)
    if tuple(box.shape) != (2, 3):
        raise ValueError(f"aabb: expected shape (2, 3) (min corner, max corner), got {tuple(box.shape)}")
    box = box.detach().to(torch.float64)
    if not bool(torch.isfinite(box).all()):
        raise ValueError(f"aabb: expected finite numbers, got {box.tolist()}")
    if not bool((box[1] > box[0]).all()):
        raise ValueError(f"aabb: max corner must exceed min corner on every axis, got {box.tolist()}")
    return box


def _check_chunk(chunk: int) -> int:
    return check_int_range("chunk", chunk, 1, 1 << 30)


def _check_mesh(mesh: trimesh.Trimesh) -> trimesh.Trimesh:
    if not isinstance(mesh, trimesh.Trimesh):
        raise ValueError(f"mesh: expected a trimesh.Trimesh, got {type(mesh).__name__}")
    if len(mesh.faces) == 0:
        raise ValueError("mesh: has no faces")
    return mesh


# ------------------------------------------------------------------------------------- field evaluation


def _density_values(name: str, out: torch.Tensor, count: int) -> np.ndarray:
    """(count,) float32 numpy from a density output of shape (count,) or (count, 1); NaN is an error."""
    out = torch.as_tensor(out)
    if out.numel() != count or out.dim() not in (1, 2) or (out.dim() == 2 and out.shape[1] != 1):
        raise ValueError(f"{name}: expected shape ({count},) for {count} points, got {tuple(out.shape)}")
    values = out.detach().reshape(count).to("cpu", torch.float32).numpy()
    bad = int(np.isnan(values).sum())
    if bad:
        raise ValueError(f"{name}: returned NaN for {bad} of {count} points; check the model for divergence")
    # +-inf (an overflowing exp activation) is a legal, very large density: keep it finite for marching cubes.
    return np.nan_to_num(values, posinf=np.finfo(np.float32).max, neginf=np.finfo(np.float32).min)


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


def sample_density_grid(density_fn: DensityFn, aabb: torch.Tensor, resolution: int,
                        chunk: int = 1 << 18) -> np.ndarray:
    """Evaluate a density field on a regular ``R x R x R`` grid spanning a box.

    Args:
        density_fn: maps (P, 3) float32 world points (on ``aabb``'s device) to (P,) float32 densities
            ((P, 1) is accepted). Called under ``torch.no_grad()`` with at most ``chunk`` points at a time.
        aabb: (2, 3) float tensor, min corner then max corner.
        resolution: R, grid points per axis, in [16, 1024]. Both box ends are sampled
            (``torch.linspace(min, max, R)`` per axis).
        chunk: points per call of ``density_fn``.

    Returns:
        (R, R, R) float32 numpy array, ``grid[i, j, k]`` = density at ``(x_i, y_j, z_k)``. +-inf outputs are
        clamped to the float32 range; NaN raises ValueError('density_fn: ...').
    """
    res = check_int_range("resolution", resolution, MIN_RESOLUTION, MAX_RESOLUTION)
    box = _check_aabb(aabb)
    chunk = _check_chunk(chunk)
    device = box.device
    axes = [torch.linspace(float(box[0, d]), float(box[1, d]), res, dtype=torch.float32, device=device)
            for d in range(3)]
    # One (R*R, 2) plane of (y, z) pairs; the points of flat indices [start, stop) are pieces of x-slabs of it.
    plane = torch.stack(torch.meshgrid(axes[1], axes[2], indexing="ij"), dim=-1).reshape(-1, 2)
    total = res ** 3
    grid = np.empty(total, np.float32)
    with torch.no_grad():
        for start in range(0, total, chunk):
            stop = min(start + chunk, total)
            points = _grid_points(axes[0], plane, start, stop)
            grid[start:stop] = _density_values("density_fn", density_fn(points), stop - start)
    return grid.reshape(res, res, res)


def _grid_points(xs: torch.Tensor, plane: torch.Tensor, start: int, stop: int) -> torch.Tensor:
    """(stop - start, 3) points of flat grid indices [start, stop) (C order: i * R*R + j * R + k).

    xs: (R,) x coordinates; plane: (R*R, 2) (y_j, z_k) pairs in C order.
    """
    size = len(plane)
    pieces = []
    pos = start
    while pos < stop:
        i, offset = divmod(pos, size)
        end = min(stop, (i + 1) * size)
        yz = plane[offset:offset + end - pos]
        pieces.append(torch.cat([xs[i].expand(len(yz), 1), yz], dim=1))
        pos = end
    return pieces[0] if len(pieces) == 1 else torch.cat(pieces)


# --------------------------------------------------------------------------------------- marching cubes


def _trilinear(grid: np.ndarray, points: np.ndarray) -> np.ndarray:
    """Trilinear lookup of (R, R, R) ``grid`` at (P, 3) fractional voxel indices (clamped to the grid)."""
    hi = np.array(grid.shape, np.float64) - 1.0
    p = np.clip(points, 0.0, hi)
    base = np.minimum(np.floor(p), hi - 1).astype(np.int64)
    t = p - base
    out = np.zeros(len(p), np.float64)
    for corner in range(8):
        offset = np.array([(corner >> 2) & 1, (corner >> 1) & 1, corner & 1])
        weight = np.prod(np.where(offset == 1, t, 1.0 - t), axis=1)
        idx = base + offset
        out += weight * grid[idx[:, 0], idx[:, 1], idx[:, 2]]
    return out


def _points_outward(grid: np.ndarray, verts: np.ndarray, faces: np.ndarray) -> bool:
    """True when most face normals of a mesh in voxel coordinates point towards lower density.

    Steps half a voxel from a sample of face centroids to each side of the face and compares the densities.
    """
    step = max(1, len(faces) // _WINDING_VOTES)
    tri = verts[faces[::step]].astype(np.float64)
    normals = np.cross(tri[:, 1] - tri[:, 0], tri[:, 2] - tri[:, 0])
    length = np.linalg.norm(normals, axis=1, keepdims=True)
    keep = length[:, 0] > 1e-12
    normals = normals[keep] / length[keep]
    centres = tri[keep].mean(axis=1)
    front = _trilinear(grid, centres + 0.5 * normals)
    back = _trilinear(grid, centres - 0.5 * normals)
    return int((front < back).sum()) >= int((front > back).sum())


def _no_surface_message(threshold: float, low: float, high: float) -> str:
    span = f"the grid's density ranges from {low:g} to {high:g}"
    if low == high:
        return (f"threshold: {threshold:g} is never crossed: density_fn is {low:g} everywhere in the grid; "
                f"check that aabb encloses the object and that the model is trained")
    if threshold >= high:
        hint = f"lower threshold below {high:g} (e.g. {low + 0.5 * (high - low):g})"
    else:
        hint = f"raise threshold above {low:g} (e.g. {low + 0.5 * (high - low):g})"
    return f"threshold: {threshold:g} is not crossed anywhere inside the grid ({span}); {hint}, or enlarge aabb"


def fill_cavities(grid: np.ndarray, level: float, seal_radius: int = 0) -> np.ndarray:
    """(R, R, R) density grid with the object's inside made solid, so marching cubes sees its outer surface only.

    A radiance field's interior is unconstrained by images and often porous. The solid part (density >
    ``level``) is first closed morphologically with a ball of ``seal_radius`` cells (sealing pores narrower than
    the ball; 0 skips this), then every cell it encloses is raised to the densest value. Returns a new grid.
    """
    solid = grid > level
    sealed = solid
    if seal_radius > 0:
        r = seal_radius
        z, y, x = np.ogrid[-r:r + 1, -r:r + 1, -r:r + 1]
        ball = x * x + y * y + z * z <= r * r
        padded = np.pad(solid, r + 1)
        sealed = binary_closing(padded, structure=ball)[r + 1:-r - 1, r + 1:-r - 1, r + 1:-r - 1]
    filled = binary_fill_holes(sealed)
    out = grid.copy()
    out[filled & ~solid] = max(float(grid.max()), level + 1.0)
    return out


def extract_mesh(density_fn: DensityFn, aabb: torch.Tensor, resolution: int = 256, threshold: float = 10.0,
                 chunk: int = 1 << 18, fill_interior: bool = True, seal_radius: int = 0) -> trimesh.Trimesh:
    """Extract the ``density == threshold`` iso-surface of a density field by marching cubes (skimage).

    Args:
        density_fn: (P, 3) float32 world points -> (P,) float32 density (see :func:`sample_density_grid`).
        aabb: (2, 3) float tensor, min corner then max corner of the sampled box.
        resolution: grid points per axis, in [16, 1024]; the voxel size is ``(max - min) / (resolution - 1)``.
        threshold: iso-level; the dense region (density > threshold) is the object.
        chunk: points per call of ``density_fn``.
        fill_interior: make the inside solid first (:func:`fill_cavities`), keeping only outer surfaces.
        seal_radius: pores narrower than a ball of this many cells are sealed before filling.

    Returns:
        trimesh.Trimesh (not processed): (V, 3) float64 world vertices (``voxel index * spacing + aabb min``),
        (F, 3) int64 faces whose normals point out of the dense region. Closed where the object lies inside
        the box; open where it touches the box.

    Raises:
        NoSurfaceError: (a ValueError, message 'threshold: ...' with the grid's density range and a suggestion)
            when the threshold is not crossed inside the grid.
        ValueError: 'resolution: ...', 'aabb: ...', 'density_fn: ...' for bad inputs.
    """
    res = check_int_range("resolution", resolution, MIN_RESOLUTION, MAX_RESOLUTION)
    level = check_finite("threshold", threshold)
    box = _check_aabb(aabb)
    grid = sample_density_grid(density_fn, box, res, chunk)
    if fill_interior:
        grid = fill_cavities(grid, level, seal_radius)
    return _grid_to_mesh(grid, box.cpu().numpy(), level)


def _grid_to_mesh(grid: np.ndarray, box: np.ndarray, level: float) -> trimesh.Trimesh:
    """Marching cubes on an (R, R, R) grid over the (2, 3) float64 ``box``; faces oriented outward."""
    low, high = float(grid.min()), float(grid.max())
    if not low < level < high:
        raise NoSurfaceError(_no_surface_message(level, low, high))
    verts, faces, _, _ = marching_cubes(grid, level=level, gradient_direction="ascent", allow_degenerate=False)
    if len(faces) == 0:
        raise NoSurfaceError(_no_surface_message(level, low, high))
    faces = faces.astype(np.int64)
    # 'ascent' winds faces outward for a field that is high inside; check it instead of trusting it.
    if not _points_outward(grid, verts, faces):
        faces = faces[:, ::-1].copy()
    spacing = (box[1] - box[0]) / (np.array(grid.shape, np.float64) - 1.0)
    world = verts.astype(np.float64) * spacing + box[0]
    return trimesh.Trimesh(vertices=world, faces=faces, process=False)


# ------------------------------------------------------------------------------------------ clean-up


def clean_mesh(mesh: trimesh.Trimesh, keep_components: int = 1, min_component_fraction: float = 0.0,
               min_face_area: float = 0.0) -> trimesh.Trimesh:
    """Repair a marching-cubes mesh and drop small floating pieces.

    Steps: merge duplicate vertices; drop degenerate faces and faces with area < ``min_face_area``; split into
    connected components (pieces sharing a vertex are one component) and keep the ``keep_components`` largest
    by face count (0 keeps all), also dropping every component with fewer than
    ``min_component_fraction * (faces of the largest)`` faces; remove unreferenced vertices.

    Args:
        mesh: trimesh.Trimesh with (V, 3) vertices and (F, 3) faces (visuals are carried along).
        keep_components: whole number >= 0.
        min_component_fraction: in [0, 1].
        min_face_area: >= 0, in world units squared.

    Returns:
        A new trimesh.Trimesh; ``mesh`` is not modified.
    """
    _check_mesh(mesh)
    keep_components = check_int_range("keep_components", keep_components, 0, 1 << 31)
    fraction = check_range("min_component_fraction", min_component_fraction, 0.0, 1.0)
    min_area = check_range("min_face_area", min_face_area, 0.0, float("inf"), high_open=True)

    out = mesh.copy()
    out.merge_vertices()
    valid = out.nondegenerate_faces()
    if min_area > 0.0:
        valid &= out.area_faces >= min_area
    if not valid.any():
        largest = float(out.area_faces.max()) if len(out.faces) else 0.0
        raise ValueError(f"min_face_area: {min_area:g} removes every face (largest face area is {largest:g})")
    out.update_faces(valid)

    labels = _face_components(out.faces, len(out.vertices))
    sizes = np.bincount(labels)
    order = np.argsort(-sizes, kind="stable")
    if keep_components:
        order = order[:keep_components]
    order = order[sizes[order] >= fraction * sizes.max()]
    out.update_faces(np.isin(labels, order))
    out.remove_unreferenced_vertices()
    return out


def _face_components(faces: np.ndarray, vertex_count: int) -> np.ndarray:
    """(F,) int64 component label per face; faces sharing a vertex are in the same component."""
    edges = np.concatenate([faces[:, [0, 1]], faces[:, [1, 2]]])
    vertex_labels = trimesh.graph.connected_component_labels(edges, node_count=vertex_count)
    return np.asarray(vertex_labels, np.int64)[faces[:, 0]]


def simplify_mesh(mesh: trimesh.Trimesh, target_faces: int) -> trimesh.Trimesh:
    """Quadric-error decimation (fast_simplification) to about ``target_faces`` faces.

    Args:
        mesh: trimesh.Trimesh with (F, 3) faces.
        target_faces: whole number >= 4.

    Returns:
        A new trimesh.Trimesh with about ``target_faces`` faces (vertex positions float64). Visuals are dropped,
        so simplify before baking colours. A plain copy when ``mesh`` already has <= target_faces faces.
    """
    _check_mesh(mesh)
    target = check_int_range("target_faces", target_faces, 4, 1 << 31)
    if len(mesh.faces) <= target:
        return mesh.copy()
    return mesh.simplify_quadric_decimation(face_count=target)


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
    _check_mesh(mesh)
    chunk = _check_chunk(chunk)
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
    _check_mesh(mesh)
    size = check_int_range("texture_size", texture_size, MIN_TEXTURE_SIZE, MAX_TEXTURE_SIZE)
    padding = check_int_range("padding", padding, 0, MAX_PADDING)
    chunk = _check_chunk(chunk)

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


# ----------------------------------------------------------------------------------------------- files


def _texture_image(mesh: trimesh.Trimesh):
    """The mesh's UV texture as a PIL image, or None when it has no (uv, image) pair."""
    visual = mesh.visual
    if getattr(visual, "kind", None) != "texture" or getattr(visual, "uv", None) is None:
        return None
    image = getattr(visual.material, "baseColorTexture", None)
    if image is None:
        image = getattr(visual.material, "image", None)
    return image


def _safe_stem(stem: str) -> str:
    """A file stem usable as an OBJ material name and texture file name (no whitespace)."""
    return re.sub(r"[^A-Za-z0-9_.-]", "_", stem) or "mesh"


def _write_obj(mesh: trimesh.Trimesh, path: pathlib.Path) -> list[pathlib.Path]:
    image = _texture_image(mesh)
    if image is None:
        path.write_text(trimesh.exchange.obj.export_obj(mesh, include_texture=False))
        return [path]
    name = _safe_stem(path.stem)
    # A fresh PNG-less image (format None) makes trimesh name the texture '<name>.png'.
    png = Image.frombytes(image.mode, image.size, image.tobytes()).convert("RGB")
    material = trimesh.visual.material.SimpleMaterial(image=png, diffuse=[255, 255, 255, 255], name=name)
    textured = trimesh.Trimesh(vertices=mesh.vertices, faces=mesh.faces, process=False,
                               visual=trimesh.visual.TextureVisuals(uv=mesh.visual.uv, material=material))
    text, extra = trimesh.exchange.obj.export_obj(textured, include_texture=True, return_texture=True,
                                                 mtl_name=f"{name}.mtl")
    path.write_text(text)
    written = [path]
    for file_name in (f"{name}.mtl", f"{name}.png"):
        target = path.parent / file_name
        target.write_bytes(extra[file_name])
        written.append(target)
    return written


def _write_ply(mesh: trimesh.Trimesh, path: pathlib.Path) -> list[pathlib.Path]:
    if _texture_image(mesh) is not None:
        mesh = trimesh.Trimesh(vertices=mesh.vertices, faces=mesh.faces, visual=mesh.visual.to_color(),
                               process=False)
    path.write_bytes(trimesh.exchange.ply.export_ply(mesh, encoding="binary"))
    return [path]


def write_mesh(mesh: trimesh.Trimesh, path: pathlib.Path, file_format: str) -> list[pathlib.Path]:
    """Write a mesh with its colours or texture.

    Args:
        mesh: trimesh.Trimesh, plain, with vertex colours or with a UV texture (:func:`bake_uv_texture`).
        path: the main file, with the suffix of ``file_format``; its folder must exist.
        file_format: 'glb', 'obj' or 'ply'.
            'glb': one binary glTF file (texture embedded).
            'obj': '<stem>.obj' plus, for a textured mesh, '<stem>.mtl' and '<stem>.png' next to it (the stem with
            characters other than letters, digits, '_', '-', '.' replaced by '_'), so exports into one folder
            never share a material or texture file.
            'ply': binary PLY; a UV texture is converted to (V, 4) uint8 vertex colours first
            (``mesh.visual.to_color()``), since PLY cannot hold one.

    Returns:
        Every file written, the main file first.
    """
    _check_mesh(mesh)
    fmt = str(file_format).lower()
    if fmt not in MESH_FORMATS:
        raise ValueError(f"file_format: expected one of {', '.join(MESH_FORMATS)}, got {file_format!r}")
    path = pathlib.Path(path)
    if path.suffix.lower() != f".{fmt}":
        raise ValueError(f"path: expected a '.{fmt}' file for file_format {fmt!r}, got {str(path)!r}")
    if not path.parent.is_dir():
        raise ValueError(f"path: folder {str(path.parent)!r} does not exist")
    if fmt == "glb":
        path.write_bytes(trimesh.exchange.gltf.export_glb(mesh))
        return [path]
    if fmt == "obj":
        return _write_obj(mesh, path)
    return _write_ply(mesh, path)
