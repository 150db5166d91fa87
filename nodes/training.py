"""Training glue on the ComfyUI side: gradients through weights ComfyUI loaded, VAE encoding with gradients, and
running a training loop where ComfyUI's sampling would run (so model management, patches and wrappers apply).

ComfyUI runs every prompt under ``torch.inference_mode()``, so the weights it loads during a prompt are inference
tensors, which autograd refuses to save for a backward pass. Training code enters ``torch.inference_mode(False)``
and lets the frozen weights take part in autograd through:

- :func:`autograd_weights`: an identity weight function on every ComfyUI-ops layer (the mechanism LoRA training
  uses): each call computes with a fresh, ordinary copy of the weight.
- :func:`autograd_tensors`: the same, for everything a weight function does not reach (plain parameters and
  buffers such as TAESD's ``vae_scale``): ordinary copies stand in for them while the context is open.

:func:`encode_with_grad` encodes images with a ComfyUI VAE so that gradients reach the pixels (SDS on latents).

:func:`run_loop` runs a loop body as a ``comfy.samplers.Sampler`` inside a ``CFGGuider`` (as core's LoRA training
does): the guider loads the MODEL and its additional models, registers hooks and wrappers, and cleans up after.
:func:`trainable` opens the autograd context for a diffusion model's forward and backward passes;
:func:`positive_conds` and :func:`denoising_loss` are the standard diffusion fine-tuning step through ComfyUI's
own conditioning and batching code (``encode_model_conds``, ``calc_cond_batch``).
"""
from __future__ import annotations

import contextlib

import torch
from torch import Tensor

import comfy.model_management
import comfy.sampler_helpers
import comfy.samplers

from ..kernels.checks import check_shape


@contextlib.contextmanager
def autograd_weights(diffusion_model: torch.nn.Module):
    """Let autograd save the model's weights even if they were created in inference mode.

    ComfyUI loads and patches weights inside ``torch.inference_mode``; such tensors cannot be saved for backward.
    An identity weight function makes ComfyUI's ops use a fresh copy of each weight per call (the mechanism LoRA
    training uses); it is removed afterwards. Nothing happens when all weights are ordinary tensors.
    """
    modules = [m for m in diffusion_model.modules() if hasattr(m, "weight_function")
               and any(refused_by_autograd(p) for p in m.parameters(recurse=False))]
    saved = []
    for m in modules:
        saved.append((m, m.__dict__.get("weight_function"), m.__dict__.get("bias_function")))
        m.weight_function = list(m.weight_function) + [_identity]
        m.bias_function = list(m.bias_function) + [_identity]
    try:
        yield
    finally:
        for m, wf, bf in saved:
            for name, old in (("weight_function", wf), ("bias_function", bf)):
                if old is None:
                    m.__dict__.pop(name, None)
                else:
                    setattr(m, name, old)


def _identity(t: Tensor) -> Tensor:
    return t


def refused_by_autograd(t: Tensor) -> bool:
    """Whether autograd would refuse to save ``t`` for backward: an inference tensor, or any tensor without a
    version counter (the check autograd makes when it saves a tensor; seen on CUDA as "Inference tensors do not
    track version counter")."""
    if t.is_inference():
        return True
    try:
        t._version
    except RuntimeError:
        return True
    return False


@contextlib.contextmanager
def autograd_tensors(module: torch.nn.Module):
    """Replace, while open, every inference-mode parameter and buffer of ``module`` that :func:`autograd_weights`
    does not cover (anything but the ``weight``/``bias`` of ComfyUI-ops layers) by an ordinary frozen copy.

    Use together with :func:`autograd_weights`. The copies are made here (outside inference mode) and the
    originals are put back on exit; gradients never flow into the copies (``requires_grad=False``).
    """
    swapped = []
    with torch.inference_mode(False):
        for m in module.modules():
            covered = ("weight", "bias") if hasattr(m, "weight_function") else ()
            for store in (m._parameters, m._buffers):
                for name, tensor in list(store.items()):
                    if tensor is None or name in covered or not refused_by_autograd(tensor):
                        continue
                    copy = tensor.detach().clone()
                    store[name] = torch.nn.Parameter(copy, requires_grad=False) if store is m._parameters else copy
                    swapped.append((store, name, tensor))
    try:
        yield
    finally:
        for store, name, tensor in reversed(swapped):
            store[name] = tensor


@contextlib.contextmanager
def _posterior_sample(first_stage_model: torch.nn.Module, generator: torch.Generator | None):
    """While open, a KL VAE's encoder returns a posterior sample ``mean + std * noise`` (noise drawn from
    ``generator``) instead of the posterior mode. No-op without a generator or for VAEs without a posterior."""
    regularizer = getattr(first_stage_model, "regularization", None)
    if generator is None or type(regularizer).__name__ != "DiagonalGaussianRegularizer":
        yield
        return

    def sample(module, args, output):
        mean, logvar = torch.chunk(args[0], 2, dim=1)  # DiagonalGaussianDistribution's split and clamp
        std = torch.exp(0.5 * torch.clamp(logvar, -30.0, 20.0))
        noise = torch.randn(mean.shape, generator=generator, device=generator.device, dtype=torch.float32)
        return mean + std * noise.to(mean.device, mean.dtype), output[1]

    handle = regularizer.register_forward_hook(sample)
    try:
        yield
    finally:
        handle.remove()


def encode_with_grad(vae, images: Tensor, model=None, generator: torch.Generator | None = None) -> Tensor:
    """Encode ``images`` with a ComfyUI ``VAE`` so that gradients reach them.

    Args:
        vae: a ComfyUI VAE (from a checkpoint or VAE loader), image VAEs with 2-D latents (KL or TAESD).
        images: (B, H, W, 3) in [0, 1], usually requiring grad (e.g. NeRF renders). Cropped like
            ``vae.encode`` crops them when H or W is not a multiple of the VAE's downscale factor.
        model: a ComfyUI MODEL: if given, the latents are put into its latent space
            (``model.model.process_latent_in``, e.g. x 0.18215 for SD1/SD2), the space its UNet denoises.
        generator: draw a posterior sample (``mean + std * noise``) from a KL VAE instead of its mode, with noise
            from this generator (MVDream's SDS encodes this way). TAESD has no posterior: its encoding is returned.

    Returns:
        (B, C, H/f, W/f) float32 latents on the VAE's device, differentiable w.r.t. ``images``. Without ``model``
        and ``generator`` they equal ``vae.encode(images)`` (which returns them detached, on the intermediate
        device). The whole batch is encoded at once (``vae.encode`` splits batches to fit free memory).

    Works inside ComfyUI's ``torch.inference_mode()``: the VAE is loaded onto its device and the encoding runs
    under ``inference_mode(False)``, with weights loaded earlier in inference mode made usable by autograd
    (:func:`autograd_weights`, :func:`autograd_tensors`).
    """
    check_shape("images", images, ("B", "H", "W", 3), note=" (an IMAGE batch)")
    vae.throw_exception_if_invalid()
    if getattr(vae, "latent_dim", 2) != 2:
        raise ValueError("vae: encoding with gradients supports image VAEs (2-D latents); this VAE has "
                         f"{vae.latent_dim}-D latents (a video or audio VAE)")
    with torch.inference_mode(False), torch.enable_grad():  # ops under inference mode would cut the graph
        pixels = vae.vae_encode_crop_pixels(images).movedim(-1, 1)  # (B, 3, H', W')
    memory = vae.memory_used_encode(pixels.shape, vae.vae_dtype)
    with torch.inference_mode(False):  # weights moved onto the device now are ordinary tensors
        comfy.model_management.load_models_gpu([vae.patcher], memory_required=memory,
                                               force_full_load=vae.disable_offload)
    first_stage = vae.first_stage_model
    with torch.inference_mode(False), torch.enable_grad(), autograd_weights(first_stage), \
            autograd_tensors(first_stage), _posterior_sample(first_stage, generator):
        x = vae.process_input(pixels).to(vae.vae_dtype).to(vae.device)
        latents = first_stage.encode(x).float()
        if model is not None:
            latents = model.model.process_latent_in(latents)
    return latents


# ------------------------------------------------------------------------------------------ training loops

class LoopSampler(comfy.samplers.Sampler):
    """A ``comfy.samplers.Sampler`` whose ``sample`` runs ``body(model_wrap, model_options)`` instead of sampling
    (the guider has loaded the models and processed the conditioning by then). Returns the latent unchanged."""

    def __init__(self, body):
        self.body = body

    def sample(self, model_wrap, sigmas, extra_args, callback, noise, latent_image=None, denoise_mask=None,
               disable_pbar=False):
        self.body(model_wrap, extra_args["model_options"])
        return latent_image


def run_loop(patcher, positive, negative, latent: Tensor, body, seed: int) -> None:
    """Run ``body(guider_model, model_options)`` with ``patcher`` (and its additional models) loaded by ComfyUI,
    as a CFGGuider would sample: ``guider_model.inner_model`` is the BaseModel and ``model_options`` the run's
    options (patches, wrappers). ``latent`` (B, C, h, w) only sizes the memory ComfyUI frees for the run."""
    guider = comfy.samplers.CFGGuider(patcher)
    guider.set_conds(positive, negative)
    guider.set_cfg(1.0)
    guider.sample(latent, latent, LoopSampler(body), torch.tensor([1.0, 0.0]), seed=seed)


@contextlib.contextmanager
def trainable(diffusion_model: torch.nn.Module):
    """Autograd for forward and backward passes through ``diffusion_model`` inside a prompt: leaves inference
    mode, enables gradients and lets autograd save the frozen weights (:func:`autograd_weights`,
    :func:`autograd_tensors`). Gradients reach only tensors that require them (the trained parameters)."""
    with torch.inference_mode(False), torch.enable_grad(), autograd_weights(diffusion_model), \
            autograd_tensors(diffusion_model):
        yield


def positive_conds(model, context: Tensor, x: Tensor, extra: dict | None = None) -> list[dict]:
    """Processed conditioning for one ``calc_cond_batch`` call: text ``context`` (B or 1, L, C) as a CONDITIONING
    entry with ``extra`` keys (e.g. MVDream cameras), turned into model inputs by the model's own ``extra_conds``
    for the batch ``x`` (B, C, h, w). A context with B rows conditions each sample on its own row."""
    entries = comfy.sampler_helpers.convert_cond([[context, dict(extra or {})]])
    return comfy.samplers.encode_model_conds(model.extra_conds, entries, x, x.device, "positive")


def denoising_loss(model, model_options: dict, conds: list[dict], x0: Tensor, noise: Tensor,
                   sigmas: Tensor) -> tuple[Tensor, Tensor]:
    """The diffusion training loss of one batch: MSE between the noise and the model's noise prediction.

    Args:
        model: the BaseModel (``guider_model.inner_model``).
        conds: from :func:`positive_conds` for this batch.
        x0: (B, C, h, w) clean latents in the model's latent space; noise: same shape, N(0, 1).
        sigmas: (B,) noise levels (``model.model_sampling.sigma(t)``).

    Returns:
        (loss, denoised): the scalar loss (differentiable inside :func:`trainable`) and the (B, C, h, w) x0
        prediction. ``x_t = noise_scaling(sigma, noise, x0)``; the noise prediction is
        ``(x_t - denoised) / sigma`` (for eps models exactly the UNet's output), so every prediction type trains
        on the same eps objective.
    """
    sampling = model.model_sampling
    xt = sampling.noise_scaling(sigmas.view(-1, 1, 1, 1), noise, x0)
    denoised = comfy.samplers.calc_cond_batch(model, [conds], xt, sigmas, model_options)[0]
    eps = (xt - denoised) / sigmas.view(-1, 1, 1, 1)
    return torch.nn.functional.mse_loss(eps.float(), noise.float()), denoised
