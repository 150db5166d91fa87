"""Custom socket types of the pack (part of the public API: saved workflows refer to these names)."""
from __future__ import annotations

from comfy_api.latest import io

CATEGORY = "Compose3D"

#: :class:`kernels.cameras.Cameras`
CamerasType = io.Custom("C3D_CAMERAS")

#: :class:`kernels.nerf.NeRF`
NeRFType = io.Custom("C3D_NERF")
