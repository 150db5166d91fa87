"""Part-Affinity NeRF (DreamBeast, mechanism 2): part maps of a few views -> part maps of any view.

A :class:`PartAffinityField` keeps the geometry of a trained NeRF (its density, frozen) and learns K part
affinities per point with its own hash grid and tiny MLP (sigmoid outputs, one channel per part, any K). It is
rendered by the pack's one renderer as a C = K channel field over a zero background, so a rendered map is the
opacity-weighted affinity along each ray, and it is fitted to part maps with the same photometric step and
training loop as reconstruction (:func:`kernels.reconstruct.photometric_step`, :func:`kernels.training.train`):
MSE between rendered and given maps at random pixels of the views.
"""
from __future__ import annotations

import copy
from dataclasses import dataclass
from typing import Callable

import torch
from torch import Tensor, nn

from .cameras import Cameras
from .field import mlp
from .hashgrid import HashGrid
from .nerf import NeRF
from .part_maps import PartMaps, resize_maps
from .rays import camera_rays
from .reconstruct import PhotometricLoss, PosedPixels, photometric_step
from .renderer import RenderSettings, render_views
from .training import ParamGroup, Step, StepDone, TrainingState, make_optimizer, train


@dataclass(frozen=True)
class PartFieldConfig:
    """Sizes of the affinity network: a small hash grid and a tiny MLP (the geometry comes from the NeRF)."""

    levels: int = 8
    features_per_level: int = 2
    log2_table_size: int = 16
    base_resolution: int = 16
    per_level_scale: float = 1.4473
    hidden: int = 32


class ZeroBackground(nn.Module):
    """A background of ``channels`` zeros: no part is seen where a ray hits nothing."""

    def __init__(self, channels: int):
        super().__init__()
        self._channels = channels

    @property
    def channels(self) -> int:
        return self._channels

    def forward(self, directions: Tensor) -> Tensor:
        return directions.new_zeros(directions.shape[0], self._channels)


class PartAffinityField(nn.Module):
    """(P, 3) points -> density (P,) of the frozen geometry, affinities (P, K) in (0, 1).

    Args:
        geometry: a field with ``density(x)``, ``aabb`` and ``config.bound`` (a NeRF's radiance field); its
            parameters are frozen (``requires_grad`` off) and its density is read without a graph.
        parts: K.
    """

    def __init__(self, geometry: nn.Module, parts: int, config: PartFieldConfig = PartFieldConfig()):
        super().__init__()
        if parts < 1:
            raise ValueError(f"parts: at least one part is needed, got {parts}")
        self.geometry = geometry.requires_grad_(False)
        self.config = config
        self.encoding = HashGrid(config.levels, config.features_per_level, config.log2_table_size,
                                 config.base_resolution, config.per_level_scale)
        self.net = mlp(self.encoding.output_dim, config.hidden, parts)
        self.register_buffer("aabb", geometry.aabb.detach().clone(), persistent=False)

    @property
    def channels(self) -> int:
        return self.net[-1].out_features

    def affinity(self, x: Tensor) -> Tensor:
        """(P, 3) world -> (P, K) in (0, 1)."""
        low, high = self.aabb[0], self.aabb[1]
        return torch.sigmoid(self.net(self.encoding((x - low) / (high - low))))

    def density(self, x: Tensor) -> Tensor:
        with torch.no_grad():
            return self.geometry.density(x)

    def forward(self, x: Tensor) -> tuple[Tensor, Tensor]:
        return self.density(x), self.affinity(x)

    def trainable_groups(self, lr: float) -> list[ParamGroup]:
        """``"part grid"`` (the hash table) at ``lr``, ``"part network"`` (the MLP) at ``lr / 10``."""
        return [ParamGroup("part grid", [self.encoding.table], lr),
                ParamGroup("part network", list(self.net.parameters()), lr / 10)]


@dataclass
class PartField:
    """The value behind the ``C3D_PART_FIELD`` socket: a part-affinity field on a NeRF's geometry.

    ``model`` is a :class:`NeRF` whose field is a :class:`PartAffinityField` and whose background is a
    :class:`ZeroBackground` (occupancy grid and render settings are the geometry NeRF's), so the renderer and the
    training loop handle it as any NeRF. Treat as immutable between nodes: :meth:`clone` before changing it.
    """

    model: NeRF
    parts: tuple[str, ...]

    @classmethod
    def on_geometry(cls, nerf: NeRF, parts: tuple[str, ...], config: PartFieldConfig = PartFieldConfig(),
                    seed: int = 0) -> "PartField":
        """A new, untrained part field on a copy of ``nerf``'s geometry (the NeRF itself is not changed)."""
        geometry = copy.deepcopy(nerf)
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            field = PartAffinityField(geometry.field, len(parts), config)
        field.to(geometry.device)
        model = NeRF(field, ZeroBackground(len(parts)).to(geometry.device), geometry.occupancy, geometry.render)
        return cls(model, tuple(parts))

    @property
    def field(self) -> PartAffinityField:
        return self.model.field

    @property
    def device(self) -> torch.device:
        return self.model.device

    def clone(self) -> "PartField":
        return copy.deepcopy(self)

    def to(self, device) -> "PartField":
        if torch.device(device) == self.device:
            return self
        moved = self.clone()
        moved.model = moved.model.to(device)
        return moved

    def __repr__(self) -> str:
        return f"PartField(parts={list(self.parts)}, steps_trained={self.model.steps_trained})"


@dataclass(frozen=True)
class PartFitSettings:
    steps: int = 500
    rays_per_step: int = 4096
    train_size: int = 64  # the maps are resized to this square size (DreamBeast: 64 px)
    lr: float = 1e-2
    normalize: bool = True  # min-max each view's map of each part first (DreamBeast's targets)
    seed: int = 0


def part_targets(maps: PartMaps, size: int, normalize: bool) -> Tensor:
    """(V, size, size, K) training targets from the maps."""
    values = maps.normalized() if normalize else maps.maps
    return resize_maps(values.float(), (size, size)).permute(0, 2, 3, 1).contiguous()


def fit_part_field(part_field: PartField, maps: PartMaps, settings: PartFitSettings = PartFitSettings(),
                   on_step: Callable[[StepDone[PhotometricLoss]], None] | None = None,
                   check_interrupt: Callable[[], None] | None = None) -> PartField:
    """Train ``part_field`` in place on ``maps`` (their cameras and parts); returns it.

    Each step renders ``rays_per_step`` random pixels of the views at ``train_size`` and minimises the MSE to
    the (normalised, resized) maps; samples skip the geometry's empty cells. ``on_step`` / ``check_interrupt``
    may raise to stop; the field then holds its last finished step.
    """
    if len(maps.parts) != part_field.field.channels:
        raise ValueError(f"part_maps: {len(maps.parts)} parts, but the part field has {part_field.field.channels}")
    s = settings.train_size
    origins, directions = camera_rays(maps.cameras, s, s, device="cpu")
    targets = part_targets(maps, s, settings.normalize)
    pixels = PosedPixels(origins.reshape(-1, 3), directions.reshape(-1, 3),
                         targets.reshape(-1, targets.shape[-1]), None)
    optimizer = make_optimizer(part_field.field.trainable_groups(settings.lr))
    start = part_field.model.steps_trained
    state = TrainingState(optimizer, torch.Generator().manual_seed(settings.seed + start), start)

    def step_fn(step: Step) -> PhotometricLoss:
        return photometric_step(part_field.model, pixels, step, settings.rays_per_step, 0.0, skip_empty=True)

    def finished(done: StepDone[PhotometricLoss]) -> None:
        part_field.model.training = {"steps": done.step}
        if on_step is not None:
            on_step(done)

    part_field.field.train()
    try:
        train(state, step_fn, settings.steps, on_step=finished, check_interrupt=check_interrupt)
    finally:
        part_field.field.eval()
    return part_field


def render_part_maps(part_field: PartField, cameras: Cameras, height: int, width: int,
                     settings: RenderSettings | None = None,
                     on_progress: Callable[[int, int], None] | None = None) -> PartMaps:
    """The part field's maps seen by ``cameras``: (N, K, H, W) opacity-weighted affinities in [0, 1]."""
    model = part_field.model
    out = render_views(model.field, model.background, cameras, height, width, settings or model.render,
                       model.occupancy, with_normals=False, on_progress=on_progress)
    maps = out["features"].permute(0, 3, 1, 2).clamp(0.0, 1.0).contiguous()
    return PartMaps(maps, cameras, part_field.parts, "rendered")
