"""Cameras: the one camera convention of the pack.

Conventions (the MVDream / OpenGL ones, so MVDream camera vectors come out without extra flips):

* World frame: right-handed, **y up**. The object sits at the origin.
* Camera frame: OpenGL. x points right, y up, the camera looks along **-z**.
* ``c2w`` maps camera coordinates to world coordinates: ``p_world = c2w[:3, :3] @ p_cam + c2w[:3, 3]``.
  Its columns are ``[right, up, -forward, position]``.
* Orbit positions: elevation ``e`` above the x-z plane, azimuth ``a`` measured from +z towards +x:
  ``p = distance * (cos e sin a, sin e, cos e cos a)``.
* MVDream camera vector (``mvdream/camera_utils.py`` in the official code): the c2w with its translation
  rescaled to unit length, left-multiplied by the OpenGL->Blender flip
  ``[[1,0,0,0],[0,0,-1,0],[0,1,0,0],[0,0,0,1]]``, flattened row-major to 16 numbers. Distance and field of
  view are not encoded.
* Intrinsics are stored normalised to a unit square image (``fx = fy = 0.5 / tan(fov_y / 2)``,
  ``cx = cy = 0.5``); :meth:`Cameras.pixel_intrinsics` scales them to ``height x width`` pixels (square pixels,
  ``fov_y`` is the vertical field of view).

Example::

    >>> cams = orbit_cameras(views=4, elevation=15.0)
    >>> cams.c2w.shape, cams.mvdream.shape
    (torch.Size([4, 4, 4]), torch.Size([4, 16]))
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

from .checks import check_int_range, check_range

#: OpenGL (y up) -> Blender (z up) world flip used by MVDream's camera vectors. (4, 4)
OPENGL_TO_BLENDER = torch.tensor(
    [[1.0, 0.0, 0.0, 0.0],
     [0.0, 0.0, -1.0, 0.0],
     [0.0, 1.0, 0.0, 0.0],
     [0.0, 0.0, 0.0, 1.0]], dtype=torch.float64)

WORLD_UP = (0.0, 1.0, 0.0)

MAX_VIEWS = 1024


@dataclass(frozen=True)
class Cameras:
    """A batch of ``N`` pinhole cameras. The value behind the ``C3D_CAMERAS`` socket; treat it as immutable.

    Attributes:
        c2w: (N, 4, 4) float32 camera-to-world matrices (OpenGL camera frame, y-up world).
        intrinsics: (N, 3, 3) float32 intrinsics normalised to a unit square image.
        mvdream: (N, 16) float32 MVDream camera vectors (see module docstring).
        fov_y: (N,) float32 vertical field of view in radians.
        elevation_deg: (N,) float32 elevation of each camera in degrees (for prompts and previews).
        azimuth_deg: (N,) float32 azimuth of each camera in degrees.
    """

    c2w: Tensor
    intrinsics: Tensor
    mvdream: Tensor
    fov_y: Tensor
    elevation_deg: Tensor
    azimuth_deg: Tensor

    def __len__(self) -> int:
        return self.c2w.shape[0]

    def __getitem__(self, index) -> "Cameras":
        """The cameras selected by ``index`` (an int, slice, index list or bool mask), as a new rig."""
        if isinstance(index, int):
            index = slice(index, index + 1 if index != -1 else None)
        return Cameras(*(getattr(self, f)[index] for f in self.__dataclass_fields__))

    @property
    def positions(self) -> Tensor:
        """(N, 3) camera centres in world coordinates."""
        return self.c2w[:, :3, 3]

    def pixel_intrinsics(self, height: int, width: int) -> Tensor:
        """(N, 3, 3) intrinsics for an image of ``height x width`` pixels (square pixels, fov_y vertical)."""
        height = check_int_range("height", height, 1, 1 << 16)
        width = check_int_range("width", width, 1, 1 << 16)
        k = self.intrinsics.clone()
        k[:, 0, 0] = self.intrinsics[:, 1, 1] * height  # square pixels: fx follows fy
        k[:, 1, 1] = self.intrinsics[:, 1, 1] * height
        k[:, 0, 2] = 0.5 * width
        k[:, 1, 2] = 0.5 * height
        return k

    def to(self, device: torch.device | str) -> "Cameras":
        return Cameras(*(getattr(self, f).to(device) for f in self.__dataclass_fields__))

    def __repr__(self) -> str:
        return (f"Cameras(views={len(self)}, elevation_deg={self.elevation_deg.tolist()}, "
                f"azimuth_deg={self.azimuth_deg.tolist()})")


def orbit_azimuths(views: int, start_deg: float, span_deg: float) -> Tensor:
    """(views,) float64 azimuths ``start + span * i / views`` in degrees, as MVDream's ``get_camera``."""
    i = torch.arange(views, dtype=torch.float64)
    return start_deg + span_deg * i / views


def orbit_positions(elevation_deg: Tensor, azimuth_deg: Tensor, distance: Tensor) -> Tensor:
    """(N, 3) camera centres ``distance * (cos e sin a, sin e, cos e cos a)``; inputs (N,) in degrees."""
    e = torch.deg2rad(elevation_deg)
    a = torch.deg2rad(azimuth_deg)
    unit = torch.stack([torch.cos(e) * torch.sin(a), torch.sin(e), torch.cos(e) * torch.cos(a)], dim=-1)
    return unit * distance.unsqueeze(-1)


def look_at(eye: Tensor, target: Tensor | None = None, up: tuple[float, float, float] = WORLD_UP) -> Tensor:
    """(N, 4, 4) OpenGL camera-to-world matrices of cameras at ``eye`` (N, 3) looking at ``target``.

    ``forward = normalise(target - eye)``, ``right = normalise(forward x up)``,
    ``up' = normalise(right x forward)``; rotation columns ``[right, up', -forward]``. ``target`` defaults
    to the origin; it may be (3,) or (N, 3). Undefined when ``forward`` is parallel to ``up``.
    """
    eye = eye.to(torch.float64)
    target = torch.zeros_like(eye) if target is None else target.to(torch.float64).expand_as(eye)
    up_vec = torch.tensor(up, dtype=torch.float64).expand_as(eye)
    forward = torch.nn.functional.normalize(target - eye, dim=-1)
    right = torch.nn.functional.normalize(torch.linalg.cross(forward, up_vec, dim=-1), dim=-1)
    new_up = torch.nn.functional.normalize(torch.linalg.cross(right, forward, dim=-1), dim=-1)
    c2w = torch.eye(4, dtype=torch.float64).repeat(eye.shape[0], 1, 1)
    c2w[:, :3, 0] = right
    c2w[:, :3, 1] = new_up
    c2w[:, :3, 2] = -forward
    c2w[:, :3, 3] = eye
    return c2w


def mvdream_camera_vectors(c2w: Tensor) -> Tensor:
    """(N, 16) MVDream camera vectors of (N, 4, 4) OpenGL c2w matrices (translation rescaled to unit length)."""
    m = c2w.to(torch.float64).clone()
    t = m[:, :3, 3]
    m[:, :3, 3] = t / t.norm(dim=-1, keepdim=True).clamp_min(1e-12)
    return (OPENGL_TO_BLENDER.to(m.device) @ m).reshape(-1, 16)


def normalized_intrinsics(fov_y: Tensor) -> Tensor:
    """(N, 3, 3) intrinsics on a unit square image for vertical fields of view ``fov_y`` (N,) in radians."""
    f = 0.5 / torch.tan(fov_y.to(torch.float64) / 2)
    k = torch.zeros(fov_y.shape[0], 3, 3, dtype=torch.float64)
    k[:, 0, 0] = f
    k[:, 1, 1] = f
    k[:, 0, 2] = 0.5
    k[:, 1, 2] = 0.5
    k[:, 2, 2] = 1.0
    return k


def orbit_cameras(views: int = 4, elevation: float = 15.0, azimuth_start: float = 0.0,
                  azimuth_span: float = 360.0, distance: float = 2.0, fov: float = 40.0) -> Cameras:
    """A ring of ``views`` cameras around the origin, all looking at it (MVDream's ``get_camera`` layout).

    Args:
        views: number of cameras, 1..1024.
        elevation: elevation above the x-z plane, in (-90, 90) degrees.
        azimuth_start: azimuth of the first camera, degrees (0 looks from +z).
        azimuth_span: azimuth range covered in degrees, [-360, 360]; camera i sits at
            ``azimuth_start + azimuth_span * i / views``.
        distance: distance of each camera from the origin, > 0.
        fov: vertical field of view in (0, 180) degrees.

    The argument names are those of the Compose3D_OrbitCameras node inputs, so errors name the input.

    Returns:
        :class:`Cameras` with N = ``views``.

    Raises:
        ValueError naming the argument when a value is not finite or out of range.
    """
    views = check_int_range("views", views, 1, MAX_VIEWS)
    elevation = check_range("elevation", elevation, -90.0, 90.0, low_open=True, high_open=True,
                            unit="degrees")
    start = check_range("azimuth_start", azimuth_start, -3600.0, 3600.0, unit="degrees")
    span = check_range("azimuth_span", azimuth_span, -360.0, 360.0, unit="degrees")
    distance = check_range("distance", distance, 0.0, 1e4, low_open=True)
    fov = check_range("fov", fov, 0.0, 180.0, low_open=True, high_open=True, unit="degrees")

    def full(value: float) -> Tensor:
        return torch.full((views,), value, dtype=torch.float64)

    return spherical_cameras(full(elevation), orbit_azimuths(views, start, span), full(distance), full(fov))


def spherical_cameras(elevation_deg: Tensor, azimuth_deg: Tensor, distance: Tensor, fov_deg: Tensor) -> Cameras:
    """N cameras looking at the origin from the given spherical positions (all (N,), float64; degrees), with
    vertical field of view ``fov_deg``; the positions as :func:`orbit_positions`."""
    c2w = look_at(orbit_positions(elevation_deg, azimuth_deg, distance))
    fov_y = torch.deg2rad(fov_deg)
    return Cameras(
        c2w=c2w.float(),
        intrinsics=normalized_intrinsics(fov_y).float(),
        mvdream=mvdream_camera_vectors(c2w).float(),
        fov_y=fov_y.float(),
        elevation_deg=elevation_deg.float(),
        azimuth_deg=azimuth_deg.float(),
    )


def concat_cameras(*rigs: Cameras) -> Cameras:
    """One rig holding the cameras of ``rigs`` in order."""
    if not rigs:
        raise ValueError("cameras: nothing to combine")
    return Cameras(*(torch.cat([getattr(r, f).cpu() for r in rigs]) for f in Cameras.__dataclass_fields__))


def view_directions(azimuth_deg: Tensor, front_deg: float = 0.0) -> list[str]:
    """The direction word ("front", "side" or "back") of each camera, for view-dependent prompts.

    The object faces the camera at azimuth ``front_deg`` (default 0: the camera on +z). A camera within 45
    degrees of it sees the front, within 45 degrees of the opposite side the back, any other the side.

    >>> view_directions(torch.tensor([0.0, 90.0, 180.0, 270.0, -30.0]))
    ['front', 'side', 'back', 'side', 'front']
    """
    offset = torch.remainder(azimuth_deg.double() - front_deg + 180.0, 360.0) - 180.0  # in [-180, 180)
    return ["front" if abs(a) <= 45.0 else "back" if abs(a) >= 135.0 else "side" for a in offset.tolist()]
