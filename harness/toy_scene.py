"""The toy object as a reconstruction problem: posed views of it and the NeRF the tests and benchmarks fit to them.

Imports the pack (``compose3d``) on first use, as ComfyUI imports it.
"""
from __future__ import annotations

from .pack import register_pack


def toy_views(size: int, views: int = 4, elevation: float = 20.0, background=(1.0, 1.0, 1.0)):
    """The toy object seen by ``views`` cameras evenly around it (distance 2.5, fov 40 degrees).

    Returns (cameras (N), images (N, size, size, 3) over ``background``, masks (N, size, size)).
    """
    register_pack()
    from compose3d.kernels.cameras import orbit_cameras
    from compose3d.kernels.toy_object import render_toy_object

    cameras = orbit_cameras(views=views, elevation=elevation, azimuth_start=0.0, azimuth_span=360.0, distance=2.5,
                            fov=40.0)
    images, masks, _ = render_toy_object(cameras, size, size, background)
    return cameras, images, masks


def toy_nerf(samples_per_ray: int, device: str = "cpu", seed: int = 3, **create):
    """A fresh NeRF for fitting the toy views: the device's field size without the initial blob, truncated-exp
    density, white background; ``create`` goes to ``NeRF.create`` (e.g. ``occupancy_resolution``)."""
    register_pack()
    from compose3d.kernels.background import SolidBackground
    from compose3d.kernels.field import config_for_device
    from compose3d.kernels.nerf import NeRF
    from compose3d.kernels.renderer import RenderSettings

    return NeRF.create(config_for_device(device, blob_density=0.0, density_activation="exp"),
                       background=SolidBackground((1.0, 1.0, 1.0)),
                       render=RenderSettings(samples_per_ray=samples_per_ray),
                       device=device, seed=seed, **create)
