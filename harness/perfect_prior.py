"""A "perfect prior" MVDream MODEL: the optimal denoiser for the pack's toy object, for testing the SDS optimiser.

The prior is a point mass: the only image it knows is the toy object (:func:`kernels.toy_object.render_toy_object`,
white background) seen from the camera in the sample's MVDream camera vector. Its noise prediction is therefore
exact, and so is its denoised estimate ``x0``: whatever the noisy latent, ComfyUI's ``calculate_denoised`` returns
the encoding of that render. Score distillation driven by it must reconstruct the toy object (the camera vector
holds no distance or field of view, so both are fixed when the model is built).

Three parts:

* A TAESD VAE (ComfyUI's tiny-VAE key layout) planted so that its encoder is an exact linear map: latent channel c
  (c = 0, 1, 2) is ``A * (8x8 box average of colour c - 0.5)``, channel 3 the same for the grey (mean of the three
  colours), ``A`` = :data:`LATENT_GAIN`. Its decoder upsamples the box averages back (nearest), so previews look
  right. See :func:`planted_taesd_state_dict`.
* An MVDream checkpoint (released key layout, tiny random UNet) with that VAE, loadable by the pack's
  ``load_mvdream``: :func:`write_perfect_prior_checkpoint`.
* :class:`PerfectPriorUNet`, swapped in for ``model.model.diffusion_model`` of the loaded MODEL
  (:func:`install_perfect_prior`, :func:`load_perfect_prior`). ComfyUI's sampling code is otherwise unchanged.

How ComfyUI calls it (``BaseModel._apply_model``, EPS model): ``xc = x / sqrt(sigma^2 + 1)`` (the DDPM-normalised
``sqrt(abar) z0 + sqrt(1 - abar) eps``), ``t = model_sampling.timestep(sigma)``, which for SD's discrete schedule
is the index of the NEAREST schedule sigma (an integer), and extra inputs ``camera`` (B, 16) and ``num_views`` from
``MVDreamModel.extra_conds``. The UNet reads ``abar`` from ``sigma(t)``, so ``x0`` is exact at the schedule's
sigmas and off by the rounding of t elsewhere, as for any real discrete-time UNet.

Deliberately broken variants (``convention``) make tests that must fail: "mirrored_azimuth" renders the object
from azimuth ``-a``, "no_flip" forgets to undo MVDream's OpenGL->Blender flip.
"""
from __future__ import annotations

import math
import sys
import weakref
from pathlib import Path

import torch
import torch.nn.functional as F
from safetensors.torch import save_file
from torch import Tensor

from .inprocess import init_comfy
from .pack import register_pack
from .tiny_models import VAE_PREFIX, mvdream_checkpoint_state_dict, prefixed

#: A: latent = A * (box average - 0.5), so latents of [0, 1] images lie in [-A/2, A/2]
LATENT_GAIN = 4.0
#: TAESD's ``vae_scale``: the decoder sees latent * scale, small enough for its tanh clamp to be nearly linear
#: (relative error < (A/2 * scale)^2 / 27, about 4e-5) and a power of two, so encoding stays exact.
VAE_SCALE = 1.0 / 64.0
#: Added to every planted activation so ReLUs pass them unchanged (and gradients flow at black pixels).
ACTIVATION_OFFSET = 1.0
#: Downscale factor of TAESD (three stride-2 convolutions).
DOWNSCALE = 8

CONVENTIONS = ("official", "mirrored_azimuth", "no_flip")


def _comfy_ready() -> None:
    if "comfy.model_management" not in sys.modules:
        init_comfy()
    register_pack()


# ------------------------------------------------------------------------------------------------ the VAE

def planted_taesd_state_dict(latent_channels: int = 4) -> dict[str, Tensor]:
    """TAESD weights (keys ``taesd_encoder.*``, ``taesd_decoder.*``, ``vae_scale``, ``vae_shift``), float32.

    Encoder (input: ComfyUI's ``image * 2 - 1``, which TAESD maps back to the image in [0, 1]): the first conv
    copies RGB into channels 0..2 (plus :data:`ACTIVATION_OFFSET`), every Block's convs are zero (Block =
    ReLU(skip) = identity on non-negative activations), each stride-2 conv takes a 2x2 box average (taps [1:, 1:]
    = 1/4; with padding 1 they never reach the padding), the last conv is the affine map to
    ``A * (box - 0.5) * vae_scale``; ``encode`` divides by ``vae_scale``. Channel 3 is the grey channel, channels
    above 3 (if any) are zero.

    Decoder: Clamp (``3 tanh(x / 3)``, nearly linear on ``latent * vae_scale``), the first conv recovers the box
    averages (plus the offset), Blocks are identities, each conv after an upsampling copies channels, the last conv
    removes the offset. Decoding gives the nearest-upsampled box averages (colours in [0, 1]).
    """
    if latent_channels < 3:
        raise ValueError(f"latent_channels: {latent_channels}; the planted VAE needs at least 3 (RGB)")
    _comfy_ready()
    import comfy.taesd.taesd

    with torch.device("meta"):
        taesd = comfy.taesd.taesd.TAESD(latent_channels=latent_channels)
    sd = {k: torch.zeros(v.shape, dtype=torch.float32) for k, v in taesd.state_dict().items()}
    a, s, off = LATENT_GAIN, VAE_SCALE, ACTIVATION_OFFSET
    rgb = torch.arange(3)

    def centre(key: str, gain: float, channels: Tensor = rgb) -> None:
        sd[key][channels, channels, 1, 1] = gain

    def top_level_convs(seq: torch.nn.Sequential) -> list[tuple[str, torch.nn.Conv2d]]:
        return [(name, m) for name, m in seq.named_children() if isinstance(m, torch.nn.Conv2d)]

    enc = top_level_convs(taesd.taesd_encoder)
    first, last = enc[0][0], enc[-1][0]
    centre(f"taesd_encoder.{first}.weight", 1.0)
    sd[f"taesd_encoder.{first}.bias"][rgb] = off
    for name, m in enc[1:-1]:  # the stride-2 convolutions: exact 2x2 box averages
        assert m.stride == (2, 2) and m.padding == (1, 1), (name, m)
        sd[f"taesd_encoder.{name}.weight"][rgb, rgb, 1:, 1:] = 0.25
    centre(f"taesd_encoder.{last}.weight", a * s)
    sd[f"taesd_encoder.{last}.bias"][rgb] = -(off + 0.5) * a * s
    if latent_channels > 3:
        sd[f"taesd_encoder.{last}.weight"][3, rgb, 1, 1] = a * s / 3.0
        sd[f"taesd_encoder.{last}.bias"][3] = -(off + 0.5) * a * s

    dec = top_level_convs(taesd.taesd_decoder)
    first, last = dec[0][0], dec[-1][0]
    centre(f"taesd_decoder.{first}.weight", 1.0 / (a * s))
    sd[f"taesd_decoder.{first}.bias"][rgb] = 0.5 + off
    for name, _ in dec[1:-1]:  # the convolutions after each upsampling: copy
        centre(f"taesd_decoder.{name}.weight", 1.0)
    centre(f"taesd_decoder.{last}.weight", 1.0)
    sd[f"taesd_decoder.{last}.bias"][rgb] = -off

    sd["vae_scale"] = torch.tensor(s, dtype=torch.float32)
    sd["vae_shift"] = torch.tensor(0.0, dtype=torch.float32)
    return sd


def write_perfect_prior_checkpoint(path: str | Path, seed: int = 21) -> Path:
    """Write an MVDream checkpoint (sd-v2.1-base-4view key layout, tiny random UNet and text encoder) whose
    ``first_stage_model.*`` is the planted VAE (:func:`planted_taesd_state_dict`) as safetensors; returns the path.

    Its UNet is a placeholder: :func:`load_perfect_prior` replaces it after loading.
    """
    path = Path(path)
    sd = {k: v for k, v in mvdream_checkpoint_state_dict("sd21", seed=seed).items() if not k.startswith(VAE_PREFIX)}
    sd.update(prefixed(VAE_PREFIX, planted_taesd_state_dict(4)))
    path.parent.mkdir(parents=True, exist_ok=True)
    save_file(sd, str(path), metadata={"compose3d": "perfect prior test model (planted TAESD)"})
    return path


# ------------------------------------------------------------------------------------------------ cameras

def decode_mvdream_cameras(vectors: Tensor, distance: float, fov_deg: float, convention: str = "official"):
    """MVDream camera vectors (N, 16) -> :class:`kernels.cameras.Cameras` (N) at ``distance``, vertical fov.

    A vector is ``(OPENGL_TO_BLENDER @ M).flatten()`` with ``M`` the OpenGL c2w whose translation has unit length;
    the flip is undone (its inverse is its transpose) and the translation rescaled to ``distance``.
    ``convention``: "official" as above; "mirrored_azimuth" (wrong) negates the camera position's x (azimuth
    a -> -a) and re-aims the camera at the origin; "no_flip" (wrong) keeps the flipped matrix.
    """
    _comfy_ready()
    from compose3d.kernels.cameras import (OPENGL_TO_BLENDER, Cameras, look_at, mvdream_camera_vectors,
                                           normalized_intrinsics)

    if convention not in CONVENTIONS:
        raise ValueError(f"convention: {convention!r}; use one of {', '.join(CONVENTIONS)}")
    if vectors.ndim != 2 or vectors.shape[1] != 16:
        raise ValueError(f"camera vectors: shape {tuple(vectors.shape)}, expected (N, 16)")
    m = vectors.detach().to("cpu", torch.float64).reshape(-1, 4, 4)
    if convention != "no_flip":
        m = OPENGL_TO_BLENDER.T @ m
    c2w = m.clone()
    c2w[:, :3, 3] = F.normalize(m[:, :3, 3], dim=-1) * float(distance)
    if convention == "mirrored_azimuth":
        c2w = look_at(c2w[:, :3, 3] * torch.tensor([-1.0, 1.0, 1.0], dtype=torch.float64))
    n = c2w.shape[0]
    fov_y = torch.full((n,), math.radians(fov_deg), dtype=torch.float64)
    p = c2w[:, :3, 3]
    return Cameras(c2w=c2w.float(), intrinsics=normalized_intrinsics(fov_y).float(),
                   mvdream=mvdream_camera_vectors(c2w).float(), fov_y=fov_y.float(),
                   elevation_deg=torch.rad2deg(torch.asin((p[:, 1] / p.norm(dim=-1)).clamp(-1, 1))).float(),
                   azimuth_deg=torch.rad2deg(torch.atan2(p[:, 0], p[:, 2])).float())


# ------------------------------------------------------------------------------------------------ the UNet

class PerfectPriorUNet(torch.nn.Module):
    """Stands in for ``model.model.diffusion_model``: the exact noise prediction for the toy object.

    ``forward(xc (B, C, h, w), t (B,), camera=(B, 16), ...) -> eps (B, C, h, w)``:
    ``eps = (xc - sqrt(abar) z0) / sqrt(1 - abar)``, ``abar = 1 / (1 + sigma(t)^2)`` from the model's own
    ``model_sampling`` (read at each call, so object patches apply), ``z0`` = the model-space latents
    (``vae.encode`` then ``process_latent_in``) of the toy object rendered exactly at each sample's decoded camera
    (:func:`decode_mvdream_cameras`) at ``h*8 x w*8`` pixels over white. Text context, control and transformer
    options are ignored (cond and uncond agree). Nothing is cached between calls; within a call, identical
    cameras (e.g. of cond and uncond) are rendered once.

    Has no parameters; ``dtype`` (float32) is what ComfyUI casts ``xc`` and the conds to.
    """

    def __init__(self, base_model: torch.nn.Module, vae, distance: float, fov_deg: float,
                 convention: str = "official"):
        super().__init__()
        if convention not in CONVENTIONS:
            raise ValueError(f"convention: {convention!r}; use one of {', '.join(CONVENTIONS)}")
        self._base = weakref.ref(base_model)  # not a submodule: the base model owns this module
        self.vae = vae
        self.distance = float(distance)
        self.fov_deg = float(fov_deg)
        self.convention = convention
        self.dtype = torch.float32

    def target_latents(self, camera: Tensor, height: int, width: int) -> Tensor:
        """(B, 16) camera vectors -> (B, C, height, width) float32 model-space latents of the toy object's
        renders (on the VAE's output device)."""
        from compose3d.kernels.toy_object import render_toy_object

        unique, inverse = torch.unique(camera.detach().float().cpu(), dim=0, return_inverse=True)
        cameras = decode_mvdream_cameras(unique, self.distance, self.fov_deg, self.convention)
        ratio = self.vae.spacial_compression_encode()
        rgb, _, _ = render_toy_object(cameras, height * ratio, width * ratio, (1.0, 1.0, 1.0))
        latents = self._base_model().process_latent_in(self.vae.encode(rgb))
        return latents[inverse.to(latents.device)]

    def _base_model(self):
        base = self._base()
        if base is None:
            raise RuntimeError("PerfectPriorUNet: its model is gone")
        return base

    def forward(self, x: Tensor, timesteps: Tensor, context=None, y=None, control=None, transformer_options={},
                camera: Tensor | None = None, num_views: int = 1, **kwargs) -> Tensor:
        if camera is None:
            raise ValueError("PerfectPriorUNet: no camera input. The perfect prior renders the object from each "
                             "sample's MVDream camera; route the conditioning through "
                             "Compose3D_MVDreamConditioning (cameras under CAMERA_KEY).")
        if camera.shape != (x.shape[0], 16):
            raise ValueError(f"PerfectPriorUNet: camera shape {tuple(camera.shape)} for a batch of {x.shape[0]}; "
                             f"expected ({x.shape[0]}, 16)")
        with torch.no_grad():
            z0 = self.target_latents(camera, x.shape[-2], x.shape[-1]).to(x.device, torch.float64)
            sigma = self._base_model().model_sampling.sigma(timesteps).to(x.device, torch.float64)
            abar = (1.0 / (1.0 + sigma * sigma)).view(-1, *([1] * (x.ndim - 1)))
        eps = (x.to(torch.float64) - abar.sqrt() * z0) / (1.0 - abar).sqrt()
        return eps.to(x.dtype)


# ------------------------------------------------------------------------------------------------ loading

def install_perfect_prior(model, vae, distance: float, fov_deg: float,
                          convention: str = "official") -> PerfectPriorUNet:
    """Replace ``model.model.diffusion_model`` of an MVDream MODEL (ModelPatcher) by a :class:`PerfectPriorUNet`
    encoding with ``vae``; in place (every clone of the ModelPatcher shares it). Returns the new module."""
    base = model.model
    unet = PerfectPriorUNet(base, vae, distance, fov_deg, convention)
    base.diffusion_model = unet
    return unet


def load_perfect_prior(path: str | Path, distance: float, fov_deg: float, convention: str = "official"):
    """Load a :func:`write_perfect_prior_checkpoint` file with the pack's ``load_mvdream`` and install the perfect
    prior. Returns (MODEL ModelPatcher, VAE); cameras are placed at ``distance`` with vertical fov ``fov_deg``."""
    _comfy_ready()
    from compose3d.nodes.mvdream_model import load_mvdream

    model, _clip, vae = load_mvdream(str(path))
    install_perfect_prior(model, vae, distance, fov_deg, convention)
    return model, vae
