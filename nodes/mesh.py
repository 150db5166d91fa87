"""Mesh exporter node: NeRF density -> clean, coloured mesh file in ComfyUI's output folder."""
from __future__ import annotations

from pathlib import Path, PurePosixPath

import torch
from comfy_api.latest import Types, io

import folder_paths

from ..kernels.mesh_extract import clean_mesh, extract_mesh, simplify_mesh
from ..kernels.mesh_files import MESH_FORMATS, write_mesh
from ..kernels.mesh_texture import bake_uv_texture, bake_vertex_colors
from .common import Progress, interruptible
from .types import CATEGORY, NeRFType
from .validation import Compose3DNode, file_name_input

COLOR_MODES = ("texture", "vertex", "none")
SEAL_FRACTION = 0.02
#: Points per field evaluation while meshing and baking: an interrupt is checked before each (~0.15 s on 2 cores).
FIELD_CHUNK = 1 << 16


def core_mesh(mesh) -> Types.MESH:
    """trimesh -> ComfyUI's core MESH (batch of one): vertices (1, V, 3) float32, faces (1, F, 3) int64."""
    vertices = torch.as_tensor(mesh.vertices, dtype=torch.float32)[None]
    faces = torch.as_tensor(mesh.faces, dtype=torch.int64)[None]
    return Types.MESH(vertices, faces)


class ExportMesh(Compose3DNode):
    @classmethod
    def define_schema(cls) -> io.Schema:
        return io.Schema(
            node_id="Compose3D_ExportMesh",
            display_name="Export Mesh",
            category=f"{CATEGORY}/mesh",
            description="Extracts the surface where the NeRF's density crosses the threshold (marching cubes), "
                        "keeps the largest parts, optionally simplifies, bakes colours (UV texture via xatlas, "
                        "or vertex colours) and writes .glb/.obj/.ply into the output folder. Wire 'path' into "
                        "Preview3D to look at it.",
            inputs=[
                NeRFType.Input("nerf", tooltip="The NeRF to mesh (e.g. from SDS Optimizer or NeRF From Views)."),
                file_name_input("filename_prefix", default="Compose3D/mesh",
                                tooltip="Relative to the output folder; a counter and the extension are added."),
                io.Combo.Input("format", options=list(MESH_FORMATS), default="glb",
                               tooltip="glb (binary glTF), obj (+ .mtl and .png when textured) or ply "
                                       "(vertex colours only)."),
                io.Int.Input("resolution", default=256, min=32, max=1024, step=8,
                             tooltip="Marching-cubes grid cells per axis."),
                io.Float.Input("threshold", default=10.0, min=0.0, max=10000.0, step=0.1,
                               tooltip="Density of the surface. Lower it if the mesh is empty or has holes "
                                       "(short trainings give low densities); raise it to shave off haze."),
                io.Int.Input("keep_components", default=1, min=0, max=1000,
                             tooltip="Keep this many largest connected parts (0 keeps all)."),
                io.Int.Input("max_faces", default=100000, min=0, max=10000000,
                             tooltip="Simplify to about this many faces (0: no simplification)."),
                io.Combo.Input("colors", options=list(COLOR_MODES), default="texture",
                               tooltip="texture: UV atlas + image (ply falls back to vertex colours); "
                                       "vertex: per-vertex colours; none: geometry only."),
                io.Int.Input("texture_size", default=1024, min=64, max=8192, step=64,
                             tooltip="Side of the square baked texture in pixels (colors 'texture' only)."),
            ],
            outputs=[io.String.Output(display_name="path", tooltip="File path relative to the output folder."),
                     io.Mesh.Output(display_name="mesh",
                                    tooltip="The cleaned, simplified geometry as a core MESH (without colours).")],
            is_output_node=True,
        )

    @classmethod
    def execute(cls, nerf, filename_prefix, format, resolution, threshold, keep_components, max_faces, colors,
                texture_size) -> io.NodeOutput:
        progress = Progress(4)
        field = nerf.field
        with torch.no_grad():
            # Seal pores narrower than ~2% of the box so the porous inside of a NeRF is filled, not meshed.
            mesh = extract_mesh(interruptible(nerf.visible_density), field.aabb, resolution=resolution,
                                threshold=threshold, chunk=FIELD_CHUNK,
                                seal_radius=max(1, round(SEAL_FRACTION * resolution)))
            progress.update(1)
            mesh = clean_mesh(mesh, keep_components=keep_components)
            if max_faces > 0:
                mesh = simplify_mesh(mesh, max_faces)
            progress.update(2)
            geometry = core_mesh(mesh)  # before baking: a UV atlas splits vertices at its seams
            color_fn = interruptible(lambda x: field.color(x.to(nerf.device)).cpu())
            if colors == "texture" and format != "ply":
                mesh = bake_uv_texture(mesh, color_fn, texture_size=texture_size, chunk=FIELD_CHUNK)
            elif colors != "none":
                mesh = bake_vertex_colors(mesh, color_fn, chunk=FIELD_CHUNK)
            progress.update(3)
        output_dir = folder_paths.get_output_directory()
        folder, name, counter, subfolder, _ = folder_paths.get_save_image_path(filename_prefix, output_dir)
        filename = f"{name}_{counter:05}_.{format}"
        write_mesh(mesh, Path(folder) / filename, format)
        progress.update(4)
        relative = str(PurePosixPath(subfolder.replace("\\", "/")) / filename) if subfolder else filename
        shown = {"3d": [{"filename": filename, "subfolder": subfolder, "type": "output"}]}
        return io.NodeOutput(relative, geometry, ui=shown)
