"""Camera rig nodes: build a ring of cameras, and look at one."""
from __future__ import annotations

import json

import torch
from comfy_api.latest import io, ui

from ..kernels.cameras import MAX_VIEWS, concat_cameras, orbit_cameras
from ..kernels.rig_preview import draw_rig
from ..kernels.sds import CameraRanges, sample_cameras
from .types import CATEGORY, CamerasType
from .validation import Compose3DNode


class OrbitCameras(Compose3DNode):
    """N cameras on a circle around the object, all looking at its centre (MVDream's camera layout)."""

    @classmethod
    def define_schema(cls) -> io.Schema:
        return io.Schema(
            node_id="Compose3D_OrbitCameras",
            display_name="Orbit Cameras",
            category=f"{CATEGORY}/cameras",
            description="A ring of cameras around the origin looking at it. Camera i sits at azimuth "
                        "start + span * i / views. Holds camera-to-world matrices, intrinsics and the "
                        "MVDream camera vectors.",
            inputs=[
                io.Int.Input("views", default=4, min=1, max=MAX_VIEWS,
                             tooltip="Number of cameras. MVDream generates 4 views."),
                io.Float.Input("elevation", default=15.0, min=-89.9, max=89.9, step=0.1,
                               tooltip="Degrees above the ground plane (MVDream's default is 15)."),
                io.Float.Input("azimuth_start", default=0.0, min=-360.0, max=360.0, step=0.1,
                               tooltip="Azimuth of the first camera in degrees; 0 looks at the front (+z)."),
                io.Float.Input("azimuth_span", default=360.0, min=-360.0, max=360.0, step=0.1,
                               tooltip="Degrees covered by the ring; 360 spaces the views evenly all around."),
                io.Float.Input("distance", default=2.0, min=0.01, max=100.0, step=0.01,
                               tooltip="Distance of the cameras from the centre, in scene units."),
                io.Float.Input("fov", default=40.0, min=1.0, max=179.0, step=0.1,
                               tooltip="Vertical field of view in degrees."),
            ],
            outputs=[CamerasType.Output(display_name="cameras",
                                        tooltip="The ring of cameras, in azimuth order (camera 0 at azimuth_start).")],
        )

    @classmethod
    def execute(cls, views: int, elevation: float, azimuth_start: float, azimuth_span: float,
                distance: float, fov: float) -> io.NodeOutput:
        cameras = orbit_cameras(views=views, elevation=elevation, azimuth_start=azimuth_start,
                                azimuth_span=azimuth_span, distance=distance, fov=fov)
        return io.NodeOutput(cameras)


class SDSCameras(Compose3DNode):
    """Random multi-view camera groups drawn as the SDS optimiser draws a step's cameras (MVDream's sampler)."""

    @classmethod
    def define_schema(cls) -> io.Schema:
        return io.Schema(
            node_id="Compose3D_SDSCameras",
            display_name="SDS Cameras",
            category=f"{CATEGORY}/cameras",
            description="Groups of cameras drawn like the SDS Optimizer's steps: per group one elevation, field "
                        "of view and distance from their ranges and 4 views 90 degrees apart from a random "
                        "azimuth. DreamBeast renders 20 such groups (80 views) of the half-trained NeRF for SD3 "
                        "Attention Capture.",
            inputs=[
                io.Int.Input("groups", default=20, min=1, max=MAX_VIEWS // 4,
                             tooltip="Camera groups (SDS steps); DreamBeast records 20."),
                io.Int.Input("views_per_group", default=4, min=1, max=16, tooltip="Views per group (MVDream: 4)."),
                io.Float.Input("elevation_min", default=0.0, min=-80.0, max=80.0, step=1.0,
                               tooltip="Elevation range in degrees (MVDream: 0-30)."),
                io.Float.Input("elevation_max", default=30.0, min=-80.0, max=80.0, step=1.0,
                               tooltip="Elevation range in degrees."),
                io.Float.Input("fov_min", default=15.0, min=1.0, max=120.0, step=1.0,
                               tooltip="Vertical field of view range in degrees (MVDream: 15-60)."),
                io.Float.Input("fov_max", default=60.0, min=1.0, max=120.0, step=1.0,
                               tooltip="Vertical field of view range in degrees."),
                io.Float.Input("distance_min", default=0.8, min=0.01, max=100.0, step=0.01,
                               tooltip="Distance range, scaled by 1/tan(fov/2) so the object keeps its size "
                                       "(MVDream: 0.8-1.0)."),
                io.Float.Input("distance_max", default=1.0, min=0.01, max=100.0, step=0.01,
                               tooltip="Distance range (see distance_min)."),
                io.Int.Input("seed", default=0, min=0, max=0xFFFFFFFF, tooltip="The draws."),
            ],
            outputs=[CamerasType.Output(display_name="cameras",
                                        tooltip="groups * views_per_group cameras; each group's views are "
                                                "contiguous.")],
        )

    @classmethod
    def execute(cls, groups, views_per_group, elevation_min, elevation_max, fov_min, fov_max, distance_min,
                distance_max, seed) -> io.NodeOutput:
        from .sds import ranges  # the SDS node's range check, same messages

        camera_ranges = CameraRanges(ranges(elevation_min, elevation_max, "elevation"),
                                     ranges(fov_min, fov_max, "fov"),
                                     ranges(distance_min, distance_max, "distance"), True, views_per_group)
        return io.NodeOutput(sample_cameras(groups * views_per_group, camera_ranges, torch.Generator().manual_seed(seed)))


class CombineCameras(Compose3DNode):
    """Two rigs as one (e.g. rings at two elevations for better coverage)."""

    @classmethod
    def define_schema(cls) -> io.Schema:
        return io.Schema(
            node_id="Compose3D_CombineCameras",
            display_name="Combine Cameras",
            category=f"{CATEGORY}/cameras",
            description="The cameras of 'first' followed by those of 'second'.",
            inputs=[CamerasType.Input("first", tooltip="Cameras that come first."),
                    CamerasType.Input("second", tooltip="Cameras appended after those of 'first'.")],
            outputs=[CamerasType.Output(display_name="cameras",
                                        tooltip="All cameras of 'first', then all of 'second', as one rig.")],
        )

    @classmethod
    def execute(cls, first, second) -> io.NodeOutput:
        return io.NodeOutput(concat_cameras(first, second))


def cameras_summary(cameras) -> dict:
    """JSON-ready description of a camera rig (what PreviewCameras shows as text)."""
    return {
        "views": len(cameras),
        "elevation_deg": [round(v, 6) for v in cameras.elevation_deg.tolist()],
        "azimuth_deg": [round(v, 6) for v in cameras.azimuth_deg.tolist()],
        "fov_y_deg": [round(v * 180.0 / 3.141592653589793, 6) for v in cameras.fov_y.tolist()],
        "c2w": [[round(x, 7) for x in m] for m in cameras.c2w.reshape(-1, 16).tolist()],
        "mvdream": [[round(x, 7) for x in m] for m in cameras.mvdream.tolist()],
    }


class PreviewCameras(Compose3DNode):
    """Shows a camera rig: a top and a front view of where each camera is and where it looks."""

    @classmethod
    def define_schema(cls) -> io.Schema:
        return io.Schema(
            node_id="Compose3D_PreviewCameras",
            display_name="Preview Cameras",
            category=f"{CATEGORY}/cameras",
            description="Draws the cameras seen from above and from the front (camera 0 in red) and "
                        "reports their matrices as JSON text.",
            inputs=[CamerasType.Input("cameras", tooltip="Cameras to show.")],
            outputs=[],
            is_output_node=True,
        )

    @classmethod
    def execute(cls, cameras) -> io.NodeOutput:
        picture = draw_rig(cameras.c2w).unsqueeze(0)
        shown = ui.PreviewImage(picture, cls=cls).as_dict()
        shown["text"] = (json.dumps(cameras_summary(cameras)),)
        return io.NodeOutput(ui=shown)
