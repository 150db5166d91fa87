"""Volume rendering in the batched (padded) layout: R rays x S samples, invalid samples have zero density.

Quadrature of the emission-absorption model (Max 1995), as NeRF and nerfacc:
``alpha_i = 1 - exp(-sigma_i * delta_i)``, ``T_i = exp(-sum_{j<i} sigma_j delta_j)``, ``w_i = T_i * alpha_i``.
Everything is differentiable w.r.t. ``sigmas`` (and the accumulated values).
"""
from __future__ import annotations

import torch
from torch import Tensor


def render_weights(t_starts: Tensor, t_ends: Tensor, sigmas: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    """Per-sample weights of R rays with S samples each.

    Args:
        t_starts, t_ends: (R, S) sample intervals along each ray (ascending).
        sigmas: (R, S) densities (0 for padding).

    Returns:
        weights: (R, S) ``T_i * alpha_i``; transmittance: (R, S) ``T_i``; alphas: (R, S).

    Example:
        >>> t = torch.tensor([[0.0, 1.0, 2.0]])
        >>> w, _, _ = render_weights(t[:, :-1], t[:, 1:], torch.tensor([[0.0, 1e9]]))
        >>> w  # the second interval is opaque
        tensor([[0., 1.]])
    """
    tau = sigmas * (t_ends - t_starts)
    alphas = 1.0 - torch.exp(-tau)
    exclusive = torch.cumsum(tau, dim=-1) - tau
    transmittance = torch.exp(-exclusive)
    return transmittance * alphas, transmittance, alphas


def accumulate(weights: Tensor, values: Tensor | None = None) -> Tensor:
    """Sum of ``weights`` (R, S) times ``values`` (R, S, C) over samples -> (R, C); opacity (R, 1) if None."""
    if values is None:
        return weights.sum(dim=-1, keepdim=True)
    return torch.einsum("rs,rsc->rc", weights, values)
