"""Radiance field for text-to-3D: hash-grid encoding + small MLPs for density and (view-independent) colour.

The field lives in the box ``[-bound, bound]^3``. Density is ``softplus(raw + blob)`` (or ``exp``) with the Magic3D/MVDream
"blob" bias ``blob_density * (1 - |x| / blob_radius)`` so training starts from a soft ball at the centre.
Colour is ``sigmoid`` of the colour MLP (albedo-like, view independent, so it can be baked into meshes).
"""
from __future__ import annotations

from dataclasses import asdict, dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .hashgrid import HashGrid


@dataclass(frozen=True)
class FieldConfig:
    """Sizes of a :class:`RadianceField`. Defaults follow MVDream's threestudio settings."""

    bound: float = 1.0
    levels: int = 16
    features_per_level: int = 2
    log2_table_size: int = 19
    base_resolution: int = 16
    per_level_scale: float = 1.4473
    hidden: int = 64
    blob_density: float = 10.0
    blob_radius: float = 0.5
    density_activation: str = "softplus"  # or "exp" (truncated-gradient exp, sharper surfaces sooner)

    def to_dict(self) -> dict:
        return asdict(self)


def config_for_device(device_type: str, **overrides) -> FieldConfig:
    """The field size to use on a device: MVDream's 16 levels x 2^19 on a GPU, 8 levels x 2^16 on a CPU
    (the finest level still resolves ~1/200 of the box, plenty for the image sizes a CPU can fit)."""
    base = FieldConfig() if device_type == "cuda" else FieldConfig(levels=8, log2_table_size=16)
    return FieldConfig(**{**base.to_dict(), **overrides})


class _TruncExp(torch.autograd.Function):
    """exp(x) whose gradient uses exp(min(x, 15)), so a large density cannot blow up the update (Instant-NGP)."""

    @staticmethod
    def forward(ctx, x: Tensor) -> Tensor:
        ctx.save_for_backward(x)
        return torch.exp(x)

    @staticmethod
    def backward(ctx, grad: Tensor) -> Tensor:
        (x,) = ctx.saved_tensors
        return grad * torch.exp(x.clamp(max=15.0))


ACTIVATIONS = {"softplus": F.softplus, "exp": _TruncExp.apply}


def mlp(inputs: int, hidden: int, outputs: int) -> nn.Sequential:
    return nn.Sequential(nn.Linear(inputs, hidden), nn.ReLU(inplace=True), nn.Linear(hidden, outputs))


class RadianceField(nn.Module):
    """density(x): (P, 3) world points -> (P,) >= 0; color(x): (P, 3) -> (P, 3) in (0, 1)."""

    def __init__(self, config: FieldConfig = FieldConfig()):
        super().__init__()
        self.config = config
        self.encoding = HashGrid(config.levels, config.features_per_level, config.log2_table_size,
                                 config.base_resolution, config.per_level_scale)
        self.density_net = mlp(self.encoding.output_dim, config.hidden, 1)
        self.color_net = mlp(self.encoding.output_dim, config.hidden, 3)
        if config.density_activation not in ACTIVATIONS:
            raise ValueError(f"density_activation: expected one of {sorted(ACTIVATIONS)}, "
                             f"got {config.density_activation!r}")
        self.activation = ACTIVATIONS[config.density_activation]
        self.register_buffer("aabb", torch.tensor([[-config.bound] * 3, [config.bound] * 3]), persistent=False)

    @property
    def channels(self) -> int:
        """C = 3: the renderer's feature channels are this field's RGB."""
        return self.color_net[-1].out_features

    def encode(self, x: Tensor) -> Tensor:
        """(P, 3) world -> (P, L * F) features of the normalised position."""
        return self.encoding((x + self.config.bound) / (2 * self.config.bound))

    def blob(self, x: Tensor) -> Tensor:
        """(P,) density bias of the initial blob."""
        c = self.config
        return c.blob_density * (1.0 - x.norm(dim=-1) / c.blob_radius)

    def _density_from(self, x: Tensor, h: Tensor) -> Tensor:
        return self.activation(self.density_net(h).squeeze(-1) + self.blob(x))

    def density(self, x: Tensor) -> Tensor:
        return self._density_from(x, self.encode(x))

    def color(self, x: Tensor) -> Tensor:
        return torch.sigmoid(self.color_net(self.encode(x)))

    def forward(self, x: Tensor) -> tuple[Tensor, Tensor]:
        """(P, 3) -> density (P,), rgb (P, 3), sharing one encoding pass."""
        h = self.encode(x)
        return self._density_from(x, h), torch.sigmoid(self.color_net(h))

    def normals(self, x: Tensor) -> Tensor:
        """(P, 3) unit normals ``-grad density / |grad density|`` (pointing out of dense regions).

        Works inside ``torch.inference_mode`` (leaves it locally); the result carries no graph.
        """
        with torch.inference_mode(False), torch.enable_grad():
            xg = x.detach().clone().requires_grad_(True)
            (grad,) = torch.autograd.grad(self.density(xg).sum(), xg)
        return F.normalize(-grad, dim=-1).detach()
