"""Meshes, stage 3 of 3: write a mesh with its vertex colours or UV texture as .glb, .obj (+ .mtl, .png) or .ply.

Geometry comes from :mod:`mesh_extract`; vertex colours and UV textures (in trimesh's UV convention, described
in :mod:`mesh_texture`) from :mod:`mesh_texture`.

Example::

    >>> files = write_mesh(bake_uv_texture(mesh, color_fn), Path("out/model.glb"), "glb")
"""
from __future__ import annotations

import pathlib
import re

import trimesh
from PIL import Image

from .mesh_extract import check_mesh

MESH_FORMATS = ("glb", "obj", "ply")


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
    check_mesh(mesh)
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
