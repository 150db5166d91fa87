"""Part-Affinity NeRF nodes: train a part field on part maps, render part maps from any cameras, maps -> MASKs."""
from __future__ import annotations

import torch
from comfy_api.latest import io

from ..kernels.part_field import PartField, PartFieldConfig, PartFitSettings, fit_part_field, render_part_maps
from ..kernels.part_maps import PartMaps, colored_preview, heat_map_preview
from ..kernels.tokens import PhraseWording, parse_phrases
from ..kernels.toy_object import TOY_PARTS, render_toy_part_maps
from ..kernels.renderer import RenderSettings
from .common import Progress, check_interrupt, compute_device, preview_with_legend
from .types import CATEGORY, CamerasType, NeRFType, PartFieldType, PartMapsType
from .validation import Compose3DNode

PREVIEW_SIZE = 96
PART_NAMES = PhraseWording("parts", "part names", "'head, body'", "part maps")


class PartAffinityNeRF(Compose3DNode):
    """Trains a part-affinity field (DreamBeast) on part maps, on the geometry of a NeRF."""

    @classmethod
    def define_schema(cls) -> io.Schema:
        return io.Schema(
            node_id="Compose3D_PartAffinityNeRF",
            display_name="Part-Affinity NeRF",
            category=f"{CATEGORY}/parts",
            description="Learns, for every point of the NeRF's object, how much it belongs to each part, from "
                        "part maps of a few views (e.g. SD3 Attention Capture). Rendered with the NeRF's own "
                        "geometry, it gives part maps for any camera (Render Part Maps). The NeRF is not changed.",
            inputs=[
                PartMapsType.Input("part_maps", tooltip="Part maps with their cameras (the training views)."),
                NeRFType.Input("nerf", tooltip="The object whose geometry the parts live on (the NeRF the views "
                                               "were rendered from)."),
                io.Int.Input("steps", default=500, min=1, max=100000,
                             tooltip="Training steps (DreamBeast: 2000). ~300 fit 8 views of 64 px on a CPU."),
                io.Int.Input("rays_per_step", default=4096, min=64, max=262144, step=64,
                             tooltip="Map pixels rendered per step."),
                io.Int.Input("train_size", default=64, min=8, max=1024, step=8,
                             tooltip="The maps are resized to this square size for training (DreamBeast: 64)."),
                io.Float.Input("learning_rate", default=0.01, min=1e-5, max=1.0, step=0.0001,
                               tooltip="Adam step size of the part hash grid (the MLP uses a tenth)."),
                io.Boolean.Input("normalize", default=True,
                                 tooltip="Min-max each view's map of each part to 0..1 before training "
                                         "(DreamBeast's targets; needed for probability maps, which are small)."),
                io.Int.Input("seed", default=0, min=0, max=0xFFFFFFFF, tooltip="Initialisation and ray sampling."),
            ],
            outputs=[PartFieldType.Output(display_name="part_field",
                                          tooltip="The trained part field on the NeRF's geometry, for Render Part "
                                                  "Maps or the SDS Optimizer.")],
        )

    @classmethod
    def execute(cls, part_maps, nerf, steps, rays_per_step, train_size, learning_rate, normalize,
                seed) -> io.NodeOutput:
        device = compute_device()
        progress = Progress(steps)
        preview_every = max(25, steps // 10)
        settings = PartFitSettings(steps=steps, rays_per_step=rays_per_step, train_size=train_size,
                                   lr=learning_rate, normalize=normalize, seed=seed)
        with torch.inference_mode(False), torch.enable_grad():
            field = PartField.on_geometry(nerf.to(device), part_maps.parts, PartFieldConfig(), seed=seed)

            def on_step(done) -> None:
                preview = None
                if done.count % preview_every == 0 or done.count == done.total:
                    shown = render_part_maps(field, part_maps.cameras[:1], PREVIEW_SIZE, PREVIEW_SIZE)
                    preview = colored_preview(shown.maps)[0]
                progress.update(done.count, preview)

            fit_part_field(field, part_maps, settings, on_step=on_step, check_interrupt=check_interrupt)
        return io.NodeOutput(field)


class RenderPartMaps(Compose3DNode):
    """Renders a part field's maps from any cameras."""

    @classmethod
    def define_schema(cls) -> io.Schema:
        return io.Schema(
            node_id="Compose3D_RenderPartMaps",
            is_output_node=True,  # shows its preview on itself, with the parts' legend
            display_name="Render Part Maps",
            category=f"{CATEGORY}/parts",
            description="Part maps of a part field seen from the given cameras (one map per view and part, 0..1), "
                        "with a preview colouring each part.",
            inputs=[
                PartFieldType.Input("part_field", tooltip="The part field to render (from Part-Affinity NeRF)."),
                CamerasType.Input("cameras", tooltip="The cameras to render from; one map per camera and part."),
                io.Int.Input("size", default=256, min=8, max=4096, step=8, tooltip="Side of the square maps."),
                io.Int.Input("samples_per_ray", default=0, min=0, max=1024,
                             tooltip="0 uses the geometry NeRF's own setting."),
            ],
            outputs=[PartMapsType.Output(display_name="part_maps",
                                         tooltip="One map per camera and part (0..1), with the cameras."),
                     io.Image.Output(display_name="preview", tooltip="Each part in its own colour."),
                     io.Image.Output(display_name="heat_maps", tooltip="Per view, each part's map side by side.")],
        )

    @classmethod
    def execute(cls, part_field, cameras, size, samples_per_ray) -> io.NodeOutput:
        device = compute_device()
        field = part_field.to(device)
        settings = None if samples_per_ray == 0 else RenderSettings(samples_per_ray, field.model.render.chunk_rays)
        progress = Progress(len(cameras) * size * size)
        maps = render_part_maps(field, cameras, size, size, settings,
                                on_progress=lambda done, total: progress.update(done))
        colored = colored_preview(maps.maps)
        return io.NodeOutput(maps, colored, heat_map_preview(maps.maps),
                             ui=preview_with_legend(cls, colored, maps.parts, "colors"))


class PartMapsToMasks(Compose3DNode):
    """One part's maps as MASKs, for core nodes (compositing, inpainting, ...)."""

    @classmethod
    def define_schema(cls) -> io.Schema:
        return io.Schema(
            node_id="Compose3D_PartMapsToMasks",
            display_name="Part Maps To Masks",
            category=f"{CATEGORY}/parts",
            description="The maps of one part, one MASK per view: its map min-max normalised to 0..1, or, with "
                        "a threshold, 1 where the normalised map reaches it.",
            inputs=[
                PartMapsType.Input("part_maps", tooltip="The part maps to take one part from."),
                io.String.Input("part", default="",
                                tooltip="The part phrase (as in the maps); empty takes the first part."),
                io.Float.Input("threshold", default=0.0, min=0.0, max=1.0, step=0.01,
                               tooltip="0 keeps the soft map; above 0, a hard mask of the pixels at or above it."),
            ],
            outputs=[io.Mask.Output(display_name="masks",
                                    tooltip="The part's normalised (or thresholded) map, one MASK per view "
                                            "(N, H, W) in 0..1.")],
        )

    @classmethod
    def execute(cls, part_maps, part, threshold) -> io.NodeOutput:
        name = part.strip()
        if name and name not in part_maps.parts:
            listing = ", ".join(repr(p) for p in part_maps.parts)
            raise ValueError(f"part: {name!r} is not one of the maps' parts: {listing}")
        index = part_maps.parts.index(name) if name else 0
        masks = part_maps.normalized()[:, index]
        if threshold > 0:
            masks = (masks >= threshold).float()
        return io.NodeOutput(masks.contiguous())


class PartMapsFromMasks(Compose3DNode):
    """Part maps from MASKs (a segmenter's, or drawn): the way to bring one's own parts to a part field."""

    @classmethod
    def define_schema(cls) -> io.Schema:
        return io.Schema(
            node_id="Compose3D_PartMapsFromMasks",
            display_name="Part Maps From Masks",
            category=f"{CATEGORY}/parts",
            description="Makes part maps from masks: the first part's mask of every view, then the second "
                        "part's, and so on (parts x views masks), with the views' cameras.",
            inputs=[
                io.Mask.Input("masks", tooltip="parts x views masks, part by part, views in camera order."),
                CamerasType.Input("cameras", tooltip="The cameras of the views."),
                io.String.Input("parts", default="head, body",
                                tooltip="Comma-separated part names, in the order of the masks."),
            ],
            outputs=[PartMapsType.Output(display_name="part_maps",
                                         tooltip="One map per view and part (the masks clamped to 0..1), with the "
                                                 "cameras.")],
        )

    @classmethod
    def execute(cls, masks, cameras, parts) -> io.NodeOutput:
        names = parse_phrases(parts, PART_NAMES)
        if not names:
            raise ValueError("parts: no part names; give at least one, e.g. 'head, body'")
        masks = masks[None] if masks.ndim == 2 else masks
        views, count = len(cameras), masks.shape[0]
        if count != views * len(names):
            raise ValueError(f"masks: {count} masks for {len(names)} parts x {views} cameras (expected "
                             f"{views * len(names)}); give every part's mask for every view, part by part")
        maps = masks.float().reshape(len(names), views, *masks.shape[1:]).transpose(0, 1).contiguous().cpu()
        return io.NodeOutput(PartMaps(maps.clamp(0.0, 1.0), cameras, tuple(names), "exact"))


class TestObjectPartMaps(Compose3DNode):
    """Exact part maps of the built-in test object (ground truth for the part field)."""

    @classmethod
    def define_schema(cls) -> io.Schema:
        return io.Schema(
            node_id="Compose3D_TestObjectPartMaps",
            is_output_node=True,  # shows its preview on itself, with the parts' legend
            display_name="Test Object Part Maps",
            category=f"{CATEGORY}/testing",
            description=f"Exact part maps of the built-in toy (Test Object Views) from the given cameras: parts "
                        f"{', '.join(TOY_PARTS)} (the body cut into its left and right halves).",
            inputs=[
                CamerasType.Input("cameras", tooltip="The cameras to make the maps from; one map per camera and "
                                                     "part."),
                io.Int.Input("size", default=64, min=8, max=4096, step=8, tooltip="Side of the square maps."),
            ],
            outputs=[PartMapsType.Output(display_name="part_maps",
                                         tooltip="Exact 0/1 maps of the toy's parts, one per camera and part, "
                                                 "with the cameras."),
                     io.Image.Output(display_name="preview", tooltip="Each part in its own colour.")],
        )

    @classmethod
    def execute(cls, cameras, size) -> io.NodeOutput:
        maps = PartMaps(render_toy_part_maps(cameras, size, size), cameras, TOY_PARTS, "exact")
        colored = colored_preview(maps.maps)
        return io.NodeOutput(maps, colored, ui=preview_with_legend(cls, colored, maps.parts, "colors"))
