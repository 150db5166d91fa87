"""A built-in test object: exact views of a synthetic toy, for demos and for checking a setup."""
from __future__ import annotations

from comfy_api.latest import io

from ..kernels.toy_object import render_toy_object
from .common import BACKGROUNDS
from .types import CATEGORY, CamerasType
from .validation import Compose3DNode



class ToyObjectViews(Compose3DNode):
    @classmethod
    def define_schema(cls) -> io.Schema:
        return io.Schema(
            node_id="Compose3D_TestObjectViews",
            display_name="Test Object Views",
            category=f"{CATEGORY}/testing",
            description="Exact renders of a built-in toy (two spheres on a box, smoothly coloured) from the given "
                        "cameras, with masks. Made at run time: no data is downloaded.",
            inputs=[
                CamerasType.Input("cameras", tooltip="The cameras to render from; one image per camera."),
                io.Int.Input("width", default=128, min=8, max=4096, step=8,
                             tooltip="Width of each rendered image in pixels."),
                io.Int.Input("height", default=128, min=8, max=4096, step=8,
                             tooltip="Height of each rendered image in pixels."),
                io.Combo.Input("background", options=list(BACKGROUNDS), default="white",
                               tooltip="Colour behind the object."),
            ],
            outputs=[io.Image.Output(display_name="images",
                                     tooltip="The toy seen by each camera (N, H, W, 3) in 0..1, over the "
                                             "background."),
                     io.Mask.Output(display_name="masks",
                                    tooltip="Exact object silhouettes (1 = object), one per image (N, H, W).")],
        )

    @classmethod
    def execute(cls, cameras, width, height, background) -> io.NodeOutput:
        rgb, mask, _ = render_toy_object(cameras, height, width, BACKGROUNDS[background])
        return io.NodeOutput(rgb, mask)
