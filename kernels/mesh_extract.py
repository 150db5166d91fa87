"""Meshes, stage 1 of 3: density field -> density grid -> marching cubes -> clean -> simplify.

Colours or a UV texture are baked onto the result by :mod:`mesh_texture`; :mod:`mesh_files` writes it to a file.

Conventions:

* World frame as in :mod:`cameras` (right-handed, y up). An ``aabb`` is a (2, 3) tensor: min corner, max corner.
* Density grid: ``grid[i, j, k]`` is the density at ``(x_i, y_j, z_k)`` with
  ``x = torch.linspace(aabb[0, 0], aabb[1, 0], R)`` (both ends included) and likewise for y and z.
* Faces are wound counter-clockwise seen from outside, so face normals point out of the dense region
  (towards lower density).
* Density callables get float32 points that :func:`sample_density_grid` creates on ``aabb``'s device. Outputs may
  live on any device.

Example::

    >>> mesh = extract_mesh(density_fn, aabb, resolution=256, threshold=10.0)
    >>> mesh = simplify_mesh(clean_mesh(mesh), target_faces=50_000)
"""
from __future__ import annotations

from typing import Callable

import numpy as np
import torch
import trimesh
from scipy.ndimage import binary_closing, binary_fill_holes
from skimage.measure import marching_cubes

from .checks import check_finite, check_int_range, check_range

DensityFn = Callable[[torch.Tensor], torch.Tensor]  # (P,3) float32 world points -> (P,) float32 density

MIN_RESOLUTION = 16
MAX_RESOLUTION = 1024

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


def check_chunk(chunk: int) -> int:
    """Return ``chunk`` (points per field call) if a whole number in [1, 2**30]; else raise ValueError('chunk: ...')."""
    return check_int_range("chunk", chunk, 1, 1 << 30)


def check_mesh(mesh: trimesh.Trimesh) -> trimesh.Trimesh:
    """Return ``mesh`` if it is a trimesh.Trimesh with at least one face; raise ValueError('mesh: ...')."""
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
    chunk = check_chunk(chunk)
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
    return grid_to_mesh(grid, box.cpu().numpy(), level)


def grid_to_mesh(grid: np.ndarray, box: np.ndarray, level: float) -> trimesh.Trimesh:
    """Extract the ``density == level`` iso-surface of an already sampled density grid by marching cubes (skimage).

    The second half of :func:`extract_mesh`, for a grid from :func:`sample_density_grid` (optionally through
    :func:`fill_cavities`). Its arguments are not validated; :func:`extract_mesh` checks them.

    Args:
        grid: (Rx, Ry, Rz) float numpy density grid, at least 2 points per axis (:func:`sample_density_grid` gives
            R x R x R float32); ``grid[i, j, k]`` is the density at ``(x_i, y_j, z_k)``, the box's corners included
            (``x = linspace(box[0, 0], box[1, 0], Rx)``, likewise for y and z).
        box: (2, 3) float64 numpy array, min corner then max corner of the sampled box, in world units.
        level: iso-level in density units; the dense region (density > level) is the object.

    Returns:
        trimesh.Trimesh (not processed): (V, 3) float64 world vertices
        (``voxel index * (box[1] - box[0]) / (shape - 1) + box[0]``), (F, 3) int64 faces whose normals point
        out of the dense region (the winding is checked by a vote of up to 4096 faces and flipped if needed).

    Raises:
        NoSurfaceError: (a ValueError, message 'threshold: ...' with the grid's density range and a suggestion)
            when ``level`` is not strictly between the grid's minimum and maximum or no face is found.
    """
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
    check_mesh(mesh)
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
    check_mesh(mesh)
    target = check_int_range("target_faces", target_faces, 4, 1 << 31)
    if len(mesh.faces) <= target:
        return mesh.copy()
    return mesh.simplify_quadric_decimation(face_count=target)
