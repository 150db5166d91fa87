"""The ``C3D_NERF`` value: a radiance field with everything needed to render it and to keep training it."""
from __future__ import annotations

import copy
from dataclasses import dataclass, field as dc_field

import torch
from torch import nn

from .background import SolidBackground
from .field import FieldConfig, RadianceField
from .occupancy import OccupancyGrid
from .renderer import RenderSettings


@dataclass
class NeRF:
    """Field + background + occupancy grid + render settings + training state.

    Treat as immutable between nodes: :meth:`clone` before training or changing it.

    Attributes:
        field: the radiance field (its box is ``[-bound, bound]^3``).
        background: maps ray directions to colours.
        occupancy: grid of occupied cells used to skip empty space.
        render: samples per ray and chunk size.
        training: optimiser state and step count of the last training (``{}`` for a fresh field).
    """

    field: RadianceField
    background: nn.Module
    occupancy: OccupancyGrid
    render: RenderSettings = RenderSettings()
    training: dict = dc_field(default_factory=dict)

    @classmethod
    def create(cls, config: FieldConfig = FieldConfig(), background: nn.Module | None = None,
               occupancy_resolution: int = 64, render: RenderSettings = RenderSettings(),
               device: torch.device | str = "cpu", seed: int = 0) -> "NeRF":
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            field = RadianceField(config)
        bg = background if background is not None else SolidBackground()
        occupancy = OccupancyGrid(field.aabb, occupancy_resolution)
        for module in (field, bg, occupancy):
            module.to(device)
        return cls(field, bg, occupancy, render)

    @property
    def device(self) -> torch.device:
        return next(self.field.parameters()).device

    @property
    def steps_trained(self) -> int:
        return int(self.training.get("steps", 0))

    def step_size(self) -> float:
        """Typical distance between samples along a ray crossing the box."""
        return 2.0 * self.field.config.bound * 3 ** 0.5 / self.render.samples_per_ray

    def occupancy_threshold(self) -> float:
        """Density whose interval opacity ``1 - exp(-sigma * step)`` is 1%: below it a cell counts as empty."""
        return 0.01 / self.step_size()

    def visible_density(self, x: torch.Tensor) -> torch.Tensor:
        """(P, 3) -> (P,) density as the renderer sees it: zero in cells the occupancy grid marks empty.

        Outside the cells that training sampled, the hash grid's values are arbitrary (hash collisions with
        trained cells); rendering skips them, and so must anything else that reads the density (mesh export).
        """
        return torch.where(self.occupancy.query(x), self.field.density(x), torch.zeros((), device=x.device))

    def clone(self) -> "NeRF":
        return copy.deepcopy(self)

    def to(self, device: torch.device | str) -> "NeRF":
        """This NeRF on ``device``: itself if already there, else a moved copy (the original is untouched)."""
        if torch.device(device) == self.device:
            return self
        moved = self.clone()
        for module in (moved.field, moved.background, moved.occupancy):
            module.to(device)
        return moved

    def __repr__(self) -> str:
        c = self.field.config
        return (f"NeRF(bound={c.bound}, levels={c.levels}, table=2^{c.log2_table_size}, "
                f"steps_trained={self.steps_trained}, occupied={self.occupancy.occupied_fraction():.1%})")
