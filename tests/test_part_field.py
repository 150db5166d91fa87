"""Part-Affinity NeRF: part maps of a few views -> part maps of new views, on the test object whose parts are known.

Oracle: the toy's exact part maps (which solid, and which half of the body, each ray hits first), rendered
analytically for held-out cameras. The field is trained on the exact geometry (a density that is the toy's
inside), so what is checked is the part field and its training, not a reconstruction.
"""
from __future__ import annotations

import pytest
import torch
from torch import nn

from compose3d.kernels.background import SolidBackground
from compose3d.kernels.cameras import concat_cameras, orbit_cameras
from compose3d.kernels.nerf import NeRF
from compose3d.kernels.occupancy import OccupancyGrid
from compose3d.kernels.part_field import PartField, PartFitSettings, fit_part_field, render_part_maps
from compose3d.kernels.part_maps import PartMaps
from compose3d.kernels.renderer import RenderSettings
from compose3d.kernels.toy_object import TOY_PARTS, inside_object, render_toy_part_maps

SIZE = 64
#: A working field reaches this mean IoU on held-out views; one trained with shuffled cameras stays far below.
GOOD_IOU = 0.85


class ToyGeometry(nn.Module):
    """The toy's exact geometry as a density field: 300 inside a solid, 0 outside."""

    def __init__(self):
        super().__init__()
        self.unused = nn.Parameter(torch.zeros(1))  # a field has parameters (the renderer asks for their device)
        self.register_buffer("aabb", torch.tensor([[-1.0] * 3, [1.0] * 3]))

    def density(self, x):
        return 300.0 * inside_object(x).float()


@pytest.fixture(scope="module")
def geometry() -> NeRF:
    nerf = NeRF(ToyGeometry(), SolidBackground(), OccupancyGrid(torch.tensor([[-1.0] * 3, [1.0] * 3]), 64),
                RenderSettings(48))
    nerf.occupancy.update(lambda x: 300.0 * inside_object(x, margin=-0.05).float(), threshold=1.0)
    return nerf


TRAIN = concat_cameras(orbit_cameras(4, 15.0, 0.0, distance=3.0), orbit_cameras(4, 45.0, 45.0, distance=3.0))
HELD_OUT = orbit_cameras(4, 30.0, 20.0, distance=3.0)


def mean_iou(predicted: torch.Tensor, truth: torch.Tensor) -> float:
    """Mean over parts of the IoU of the arg-max labels, on the pixels where the object is."""
    hit = truth.sum(1) > 0.5
    label, true_label = predicted.argmax(1), truth.argmax(1)
    ious = []
    for k in range(truth.shape[1]):
        a, b = (label == k) & hit, (true_label == k) & hit
        ious.append(float((a & b).sum()) / max(1.0, float((a | b).sum())))
    return sum(ious) / len(ious)


def trained_iou(geometry: NeRF, maps: torch.Tensor, cameras) -> float:
    field = PartField.on_geometry(geometry, TOY_PARTS, seed=0)
    fit_part_field(field, PartMaps(maps, cameras, TOY_PARTS, "exact"),
                   PartFitSettings(steps=120, rays_per_step=1024, train_size=SIZE))
    rendered = render_part_maps(field, HELD_OUT, SIZE, SIZE)
    assert rendered.maps.shape == (4, len(TOY_PARTS), SIZE, SIZE) and rendered.kind == "rendered"
    return mean_iou(rendered.maps, render_toy_part_maps(HELD_OUT, SIZE, SIZE))


def test_exact_maps_of_8_views_give_the_parts_of_new_views(geometry):
    assert trained_iou(geometry, render_toy_part_maps(TRAIN, SIZE, SIZE), TRAIN) >= GOOD_IOU


def test_noisy_maps_still_give_the_parts_of_new_views(geometry):
    exact = render_toy_part_maps(TRAIN, SIZE, SIZE)
    noisy = (exact + 0.3 * torch.randn(exact.shape, generator=torch.Generator().manual_seed(0))).clamp(0, 1)
    assert trained_iou(geometry, noisy, TRAIN) >= GOOD_IOU


def test_a_field_trained_with_shuffled_cameras_does_not(geometry):
    shuffled = TRAIN[[3, 0, 6, 1, 7, 2, 5, 4]]
    assert trained_iou(geometry, render_toy_part_maps(TRAIN, SIZE, SIZE), shuffled) < 0.7


def test_the_geometry_nerf_is_not_changed_and_not_trained(geometry):
    before = {k: v.clone() for k, v in geometry.occupancy.state_dict().items()}
    field = PartField.on_geometry(geometry, TOY_PARTS)
    fit_part_field(field, PartMaps(render_toy_part_maps(TRAIN, 16, 16), TRAIN, TOY_PARTS, "exact"),
                   PartFitSettings(steps=2, rays_per_step=64, train_size=16))
    assert field.model.field.geometry is not geometry.field
    assert all(torch.equal(v, geometry.occupancy.state_dict()[k]) for k, v in before.items())
    assert not any(p.requires_grad for p in field.field.geometry.parameters())
