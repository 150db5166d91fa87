"""Write the Part-Affinity example workflow (UI format) into example_workflows/.

Part maps - SD3 capture and Part-Affinity NeRF.json (DreamBeast, part 1): test-object views and a NeRF of them -> SD3 Attention Capture
(part maps of the views) -> Part-Affinity NeRF on the NeRF's geometry -> Render Part Maps for new views.

    python scripts/make_part_workflows.py [--no-thumbnail]   (the thumbnail trains two fields: ~4 min on a CPU)
"""
from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from harness.inprocess import init_comfy  # noqa: E402
from harness.ui_workflow import Workflow, schema_widgets  # noqa: E402

FOLDER = Path(__file__).resolve().parents[1] / "example_workflows"
NAME = "Part maps - SD3 capture and Part-Affinity NeRF.json"
SD3_CHECKPOINT = "sd3_medium_incl_clips.safetensors"
PROMPT = "a toy figure with a round head and a round body on a wooden base"
PARTS = "head, body, base"


def part_affinity() -> None:
    init_comfy()
    from compose3d.nodes.nerf import NeRFFromViews
    from compose3d.nodes.part_field import PartAffinityNeRF
    from compose3d.nodes.sd3_capture import SD3AttentionCapture

    w = Workflow()
    ring = w.node("Compose3D_OrbitCameras", (40, 60), (300, 200), [8, 15, 0, 360, 2.5, 40],
                  outputs=[("cameras", "C3D_CAMERAS")], title="Views (8 around)")
    views = w.node("Compose3D_TestObjectViews", (40, 310), (300, 130), [256, 256, "white"],
                   [("cameras", "C3D_CAMERAS", (ring, 0), False)], [("images", "IMAGE"), ("masks", "MASK")])
    nerf = w.node("Compose3D_NeRFFromViews", (40, 850), (300, 300), schema_widgets(NeRFFromViews, steps=500),
                  [("images", "IMAGE", (views, 0), False), ("cameras", "C3D_CAMERAS", (ring, 0), False),
                   ("masks", "MASK", (views, 1), False), ("nerf", "C3D_NERF", None, False)],
                  [("nerf", "C3D_NERF")])
    loader = w.node("CheckpointLoaderSimple", (380, 60), (320, 100), [SD3_CHECKPOINT],
                    outputs=[("MODEL", "MODEL"), ("CLIP", "CLIP"), ("VAE", "VAE")])
    capture = w.node("Compose3D_SD3AttentionCapture", (380, 210), (340, 640),
                     schema_widgets(SD3AttentionCapture, prompt=PROMPT, parts=PARTS),
                     [("model", "MODEL", (loader, 0), False), ("clip", "CLIP", (loader, 1), False),
                      ("vae", "VAE", (loader, 2), False), ("views", "IMAGE", (views, 0), False),
                      ("cameras", "C3D_CAMERAS", (ring, 0), False)],
                     [("part_maps", "C3D_PART_MAPS"), ("preview", "IMAGE")])
    # the capture and Render Part Maps show their previews on themselves, with the parts' legend
    field = w.node("Compose3D_PartAffinityNeRF", (760, 310), (320, 260), schema_widgets(PartAffinityNeRF),
                   [("part_maps", "C3D_PART_MAPS", (capture, 0), False), ("nerf", "C3D_NERF", (nerf, 0), False)],
                   [("part_field", "C3D_PART_FIELD")])
    new_views = w.node("Compose3D_OrbitCameras", (760, 60), (320, 200), [4, 30, 45, 360, 2.5, 40],
                       outputs=[("cameras", "C3D_CAMERAS")], title="New views")
    w.node("Compose3D_RenderPartMaps", (1120, 60), (360, 420), [256, 0],
           [("part_field", "C3D_PART_FIELD", (field, 0), False), ("cameras", "C3D_CAMERAS", (new_views, 0), False)],
           [("part_maps", "C3D_PART_MAPS"), ("preview", "IMAGE"), ("heat_maps", "IMAGE")])
    w.node("Note", (40, 490), (300, 330), ["DreamBeast's part knowledge, made 3D. SD3 reads each view of the object "
           "with the prompt plus a view word and its attention to each part phrase ('head, body, base') becomes a "
           "part map per view (block 11, timesteps 100-450, as DreamBeast). The Part-Affinity NeRF learns those "
           "parts on the NeRF's geometry, so Render Part Maps gives them for any camera. Needs an SD3 checkpoint "
           "with its text encoders (sd3_medium_incl_clips) in models/checkpoints; a GPU for 1024 px."])
    w.save(FOLDER, NAME)


def toy_part_field():
    """(nerf, part field): a NeRF fitted to 8 views of the test object and a part field trained on the object's
    exact part maps (SD3 weights cannot be had here). About 4 minutes on a CPU."""
    init_comfy()
    import torch

    from compose3d.kernels.background import SolidBackground
    from compose3d.kernels.cameras import orbit_cameras
    from compose3d.kernels.field import config_for_device
    from compose3d.kernels.nerf import NeRF
    from compose3d.kernels.part_field import PartField, PartFitSettings, fit_part_field
    from compose3d.kernels.part_maps import PartMaps
    from compose3d.kernels.reconstruct import FitSettings, fit_views
    from compose3d.kernels.toy_object import TOY_PARTS, render_toy_object, render_toy_part_maps

    torch.set_grad_enabled(True)
    ring = orbit_cameras(8, 15.0, distance=2.5)
    images, masks, _ = render_toy_object(ring, 64, 64)
    nerf = NeRF.create(config_for_device("cpu", blob_density=0.0, density_activation="exp"),
                       background=SolidBackground((1.0, 1.0, 1.0)))
    fit_views(nerf, images, ring, masks, FitSettings(steps=400, rays_per_step=2048))
    field = PartField.on_geometry(nerf, TOY_PARTS)
    fit_part_field(field, PartMaps(render_toy_part_maps(ring, 64, 64), ring, TOY_PARTS, "exact"),
                   PartFitSettings(steps=300, rays_per_step=2048))
    return nerf, field


def thumbnail() -> None:
    """A real output of the workflow's second half (:func:`toy_part_field`): its part maps from new views."""
    import torch

    from compose3d.kernels.cameras import orbit_cameras
    from compose3d.kernels.part_field import render_part_maps
    from compose3d.kernels.part_maps import colored_preview
    from compose3d.nodes.common import to_pil

    _, field = toy_part_field()
    shown = colored_preview(render_part_maps(field, orbit_cameras(4, 30.0, 45.0, distance=2.5), 128, 128).maps)
    grid = torch.cat([torch.cat([shown[0], shown[1]], dim=1), torch.cat([shown[2], shown[3]], dim=1)], dim=0)
    to_pil(grid).save(FOLDER / NAME.replace(".json", ".jpg"), quality=90)


if __name__ == "__main__":
    part_affinity()
    if "--no-thumbnail" not in sys.argv:
        thumbnail()
