"""The refocus sampler: Attend-and-Excite over the views of multi-view generation (Grounded-Dreamer stage 1).

During the first ``refocus_steps`` sampling steps the latent is moved, before each step, down the gradient of the
refocusing loss (:mod:`kernels.attention`): the cross-attention maps of the subject words at the UNet level of 1/4
of the latent resolution (8x8 for MVDream's 32x32 latents), from a conditional-only pass, are smoothed, and the
weakest subject in its weakest view drives the loss. At the steps named in ``thresholds`` the update is repeated
until every subject reaches the threshold or ``max_tries`` runs out. Then the wrapped sampler (DDIM by default)
takes its step.

Step sizes follow Attend-and-Excite, whose latent is the unit-variance ``z = c_in x`` (``c_in = 1/sqrt(1+s^2)`` for
eps models). ComfyUI's samplers work on ``x``; an update ``z -= a dL/dz`` is ``x -= a dL/dx / c_in^2`` in x.

During the refocus phase each step of the wrapped sampler runs on its own (so multistep samplers restart their
history after each refocused step); the remaining steps run in one call. With no subject words the wrapped
sampler runs untouched.
"""
from __future__ import annotations

import contextlib
import logging
from dataclasses import dataclass, field

import torch
from torch import Tensor

import comfy.model_patcher
import comfy.samplers
import comfy.utils
from comfy_api.latest import io

from ..kernels.attention import (find_subject_tokens, parse_subjects, parse_thresholds, refocus_loss,
                                 refocus_step_size, smooth_maps, subject_maps)
from .common import PREVIEW_MAX_PX, check_interrupt, to_pil
from .types import CAMERA_KEY, CATEGORY
from .validation import Compose3DNode

log = logging.getLogger("compose3d.refocus")

#: Attend-and-Excite's temperature on the attention probabilities before the softmax over words.
TEMPERATURE = 100.0


# ------------------------------------------------------------------------------------------------- subjects

@dataclass(frozen=True)
class Subjects:
    """Subject words resolved against the prompt with the model's real tokenizer."""

    names: list[str]
    positions: list[list[int]]  # per subject, its token positions (start token = 0)
    last_token: int  # position of the end token; words are 1 .. last_token - 1


def resolve_subjects(clip, prompt: str, subjects_text: str) -> Subjects | None:
    """Map comma-separated subject words to token positions of ``prompt``; None when no subjects are given.

    Raises:
        ValueError: empty entries, words not in the prompt (the message lists the prompt's tokens), or a prompt
            longer than one 77-token window.
    """
    names = parse_subjects(subjects_text)
    if not names:
        return None
    if not prompt.strip():
        raise ValueError("prompt: empty; give the same text as the positive prompt so subject words can be found")
    outer = clip.tokenizer
    inner = getattr(outer, outer.clip)  # the SDTokenizer of the model's CLIP (clip_l / clip_h)

    def token_ids(text: str) -> list[list[int]]:
        chunks = outer.tokenize_with_weights(text)[outer.clip_name]
        return [[t for t, *_ in chunk] for chunk in chunks]

    end = inner.end_token

    def end_of(chunk: list[int]) -> int:
        return chunk.index(end, 1) if end in chunk[1:] else len(chunk)

    chunks = token_ids(prompt)
    ids = chunks[0]
    last = end_of(ids)
    if len(chunks) > 1:
        count = sum(end_of(c) - 1 for c in chunks)
        raise ValueError(f"prompt: {count} tokens; refocusing needs the prompt to fit one "
                         f"{inner.max_length - 2}-token window")

    def word(t: int) -> str:
        return inner.inv_vocab.get(t, str(t)).replace("</w>", "")

    names_of_tokens = [word(t) for t in ids[1:last]]
    subject_ids = []
    for name in names:
        sub = token_ids(name)[0]
        subject_ids.append(sub[1:end_of(sub)])
    positions = find_subject_tokens(ids[:last], subject_ids, names, names_of_tokens)
    return Subjects(names, positions, last)


# ------------------------------------------------------------------------------------------------ capture

class AttentionCapture:
    """attn2 replacements that compute cross-attention explicitly at one resolution and keep its probabilities.

    Blocks at other resolutions run ComfyUI's attention (or the replacement already installed there).
    ``probs`` collects (B, h*w, T) head-averaged probabilities, one entry per captured layer; :meth:`start` sets
    the resolution and clears them before each pass.
    """

    def __init__(self):
        self.height, self.width = 0, 0
        self.probs: list[Tensor] = []

    def start(self, height: int, width: int) -> None:
        self.height, self.width = height, width
        self.probs = []

    def model_options(self, diffusion_model, model_options: dict) -> dict:
        """A copy of ``model_options`` with a capturing attn2 replacement on every transformer block.

        Keys are ComfyUI's most specific ones, (block, number, index in the SpatialTransformer), so they win over
        replacements registered per block; those already installed are kept as the fallback.
        """
        options = comfy.model_patcher.create_model_options_clone(model_options)
        options["transformer_options"] = dict(options.get("transformer_options", {}))
        existing = options["transformer_options"].get("patches_replace", {}).get("attn2", {})
        for name, number, index in transformer_blocks(diffusion_model):
            fallback = existing.get((name, number, index), existing.get((name, number)))
            options = comfy.model_patcher.set_model_options_patch_replace(
                options, self._patch(fallback), "attn2", name, number, index)
        return options

    def _patch(self, fallback):
        from comfy.ldm.modules.attention import optimized_attention

        def attn2(q, k, v, extra_options):
            check_interrupt()  # refocus passes (forward + backward) are long: answer a Cancel per block
            shape = extra_options.get("activations_shape")
            if shape is None or tuple(shape[-2:]) != (self.height, self.width):
                if fallback is not None:
                    return fallback(q, k, v, extra_options)
                return optimized_attention(q, k, v, extra_options["n_heads"])
            heads, dim = extra_options["n_heads"], extra_options["dim_head"]
            b, lq, _ = q.shape
            qh = q.float().reshape(b, lq, heads, dim).transpose(1, 2)
            kh = k.float().reshape(b, -1, heads, dim).transpose(1, 2)
            vh = v.float().reshape(b, -1, heads, dim).transpose(1, 2)
            probs = torch.softmax(qh @ kh.transpose(-1, -2) * dim ** -0.5, dim=-1)  # (B, H, Lq, T)
            self.probs.append(probs.mean(dim=1))
            out = (probs @ vh).transpose(1, 2).reshape(b, lq, heads * dim)
            return out.to(q.dtype)

        return attn2


def transformer_blocks(diffusion_model) -> list[tuple[str, int, int]]:
    """(block, number, index) of every BasicTransformerBlock of an SD UNet, as ComfyUI keys its attention patches."""
    from comfy.ldm.modules.attention import SpatialTransformer

    found = []
    groups = [("input", i, b) for i, b in enumerate(diffusion_model.input_blocks)] + \
             [("middle", 0, diffusion_model.middle_block)] + \
             [("output", i, b) for i, b in enumerate(diffusion_model.output_blocks)]
    for name, number, block in groups:
        for layer in block or ():  # a UNet may have no middle block
            if isinstance(layer, SpatialTransformer):
                found += [(name, number, index) for index in range(len(layer.transformer_blocks))]
    return found


@contextlib.contextmanager
def autograd_weights(diffusion_model: torch.nn.Module):
    """Let autograd save the model's weights even if they were created in inference mode.

    ComfyUI loads and patches weights inside ``torch.inference_mode``; such tensors cannot be saved for backward.
    An identity weight function makes ComfyUI's ops use a fresh copy of each weight per call (the mechanism LoRA
    training uses); it is removed afterwards. Nothing happens when all weights are ordinary tensors.
    """
    modules = [m for m in diffusion_model.modules() if hasattr(m, "weight_function")
               and any(p.is_inference() for p in m.parameters(recurse=False))]
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


# ------------------------------------------------------------------------------------------------- sampler

@dataclass
class RefocusSettings:
    subjects: Subjects
    refocus_steps: int = 25
    step_size: float = 20.0
    thresholds: dict[int, float] = field(default_factory=lambda: {0: 0.05, 10: 0.5, 20: 0.8})
    max_tries: int = 20
    smoothing_sigma: float = 0.5


@dataclass
class RefocusReport:
    """What refocusing saw: per refocused step, each subject's attention in its weakest view (objects averaged)."""

    steps: list[int] = field(default_factory=list)
    before: list[list[float]] = field(default_factory=list)  # at the step's start
    refined: list[list[float]] = field(default_factory=list)  # after the refinement tries, before the last update
    tries: list[int] = field(default_factory=list)
    maps: Tensor | None = None  # (B, K, h, w) last smoothed maps


class Refocuser:
    """Measures the refocusing loss of a latent and moves the latent down its gradient."""

    def __init__(self, model_wrap, model_options: dict, settings: RefocusSettings):
        self.base_model = model_wrap.inner_model
        if not hasattr(self.base_model.diffusion_model, "input_blocks"):
            raise ValueError(f"refocus sampler: {type(self.base_model.diffusion_model).__name__} is not an "
                             f"SD-style UNet; refocusing works with MVDream (and SD1.x/2.x) models")
        self.settings = settings
        positive = model_wrap.conds.get("positive") or []
        if not positive:
            raise ValueError("refocus sampler: the sampling run has no positive conditioning")
        self.positive = positive
        cams = positive[0].get(CAMERA_KEY)
        self.views = 1 if cams is None else int(cams.shape[0])
        self.capture = AttentionCapture()
        self.model_options = self.capture.model_options(self.base_model.diffusion_model, model_options)

    def measure(self, x: Tensor, sigma: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        """Loss (summed over objects), per-object per-subject attention (B/V, K), smoothed maps (B, K, h, w).

        Differentiable w.r.t. ``x`` when called with grad enabled.
        """
        s = self.settings
        height, width = x.shape[-2] // 4, x.shape[-1] // 4
        capture = self.capture
        capture.start(height, width)
        timestep = sigma.reshape(1).expand(x.shape[0]).clone()
        comfy.samplers.calc_cond_batch(self.base_model, [self.positive], x, timestep, self.model_options)
        if not capture.probs:
            raise ValueError(f"refocus sampler: the model has no cross-attention at {height}x{width} (1/4 of the "
                             f"latent); refocusing needs an SD-style UNet such as MVDream's")
        probs = torch.stack(capture.probs).mean(dim=0)  # (B, h*w, T), averaged over layers (and heads)
        capture.probs = []  # hold no graph between passes
        if probs.shape[0] % self.views:
            raise ValueError(f"refocus sampler: a batch of {probs.shape[0]} is not a multiple of "
                             f"{self.views} views")
        maps = subject_maps(probs, s.subjects.positions, height, width, s.subjects.last_token, TEMPERATURE)
        maps = smooth_maps(maps, 3, s.smoothing_sigma)
        losses, per_object = [], []
        for obj in maps.split(self.views, dim=0):  # (V, K, h, w) per object
            loss, per_token = refocus_loss(obj)
            losses.append(loss)
            per_object.append(per_token)
        return torch.stack(losses).sum(), torch.stack(per_object), maps

    def update(self, x: Tensor, sigma: Tensor, step_size: float) -> tuple[Tensor, Tensor, Tensor, Tensor]:
        """One gradient step; returns (new x, loss, per-object attention before the step, maps)."""
        with torch.inference_mode(False), torch.enable_grad():
            xg = x.detach().clone().requires_grad_(True)
            with autograd_weights(self.base_model.diffusion_model):
                loss, per_object, maps = self.measure(xg, sigma.detach().clone())
            grad, = torch.autograd.grad(loss, xg)
        c_in = self.base_model.model_sampling.calculate_input(sigma.reshape(1), torch.ones_like(x[:1]))
        scale = step_size / c_in.flatten()[0].item() ** 2
        x_new = (x.detach() - scale * grad.to(x.dtype)).detach()
        return x_new, loss.detach(), per_object.detach(), maps.detach()

    def per_object(self, mask: Tensor, x: Tensor) -> Tensor:
        """(objects,) bool -> a mask broadcastable over the latent batch x (views of an object together)."""
        return mask.repeat_interleave(self.views).reshape(-1, *[1] * (x.ndim - 1)).to(x.device)

    def refocus(self, x: Tensor, sigma: Tensor, step: int, total_steps: int, report: RefocusReport,
                show) -> Tensor:
        s = self.settings
        step_size = refocus_step_size(step, total_steps, s.step_size)
        x_new, loss, attention, maps = self.update(x, sigma, step_size)
        report.steps.append(step)
        report.before.append(attention.mean(dim=0).tolist())
        tries = 0
        threshold = s.thresholds.get(step)
        if threshold is not None:
            # Iterative refinement: keep updating while a subject is below the threshold in some view, then
            # take the regular update (x_new is always one update past the last measured latent).
            # Objects of a batch are refined independently: only those still below the threshold move.
            while float(attention.min()) < threshold and tries < s.max_tries:
                check_interrupt()
                below = attention.amin(dim=1) < threshold  # (objects,)
                x = torch.where(self.per_object(below, x), x_new, x)
                x_new, loss, attention, maps = self.update(x, sigma, step_size)
                tries += 1
                show(maps)
        report.refined.append(attention.mean(dim=0).tolist())
        report.tries.append(tries)
        report.maps = maps
        return x_new


class RefocusKSampler(comfy.samplers.Sampler):
    """A SAMPLER that refocuses the latent before the first steps of a wrapped ComfyUI sampler.

    ``last_report`` holds the :class:`RefocusReport` of the latest sampling run (for benchmarks and tests).
    """

    def __init__(self, base: comfy.samplers.KSAMPLER, settings: RefocusSettings | None):
        self.base = base
        self.settings = settings
        self.last_report: RefocusReport | None = None

    def max_denoise(self, model_wrap, sigmas):
        return self.base.max_denoise(model_wrap, sigmas)

    def sample(self, model_wrap, sigmas, extra_args, callback, noise, latent_image=None, denoise_mask=None,
               disable_pbar=False):
        if self.settings is None:
            return self.base.sample(model_wrap, sigmas, extra_args, callback, noise, latent_image, denoise_mask,
                                    disable_pbar)
        base = self.base
        extra_args["denoise_mask"] = denoise_mask
        model_k = comfy.samplers.KSamplerX0Inpaint(model_wrap, sigmas)
        model_k.latent_image = latent_image
        if base.inpaint_options.get("random", False):
            generator = torch.manual_seed(extra_args.get("seed", 41) + 1)
            model_k.noise = torch.randn(noise.shape, generator=generator, device="cpu").to(noise.dtype).to(
                noise.device)
        else:
            model_k.noise = noise
        x = model_wrap.inner_model.model_sampling.noise_scaling(sigmas[0], noise, latent_image,
                                                                self.max_denoise(model_wrap, sigmas))
        total = len(sigmas) - 1
        refocus_steps = min(self.settings.refocus_steps, total)
        refocuser = Refocuser(model_wrap, extra_args["model_options"], self.settings)
        unused = sorted(k for k in self.settings.thresholds if k >= refocus_steps)
        if unused:
            log.warning("refocus: thresholds at steps %s are never reached (only the first %d of %d steps are "
                        "refocused)", unused, refocus_steps, total)
        report = RefocusReport()
        bar = comfy.utils.ProgressBar(total)
        names = self.settings.subjects.names
        done = [0]  # steps finished, for the progress value sent with map previews

        def show(maps: Tensor) -> None:
            bar.update_absolute(done[0], total, ("JPEG", to_pil(maps_grid(maps, refocuser.views)), PREVIEW_MAX_PX))

        def run(x, first, last, seed_offset):
            k_callback = None
            if callback is not None:
                k_callback = lambda d: callback(first + d["i"], d["denoised"], d["x"], total)  # noqa: E731
            args = dict(extra_args)
            if "seed" in args and seed_offset:
                args["seed"] = args["seed"] + seed_offset  # fresh noise for ancestral steps run one at a time
            return base.sampler_function(model_k, x, sigmas[first:last + 1], extra_args=args, callback=k_callback,
                                         disable=True, **base.extra_options)

        for i in range(refocus_steps):
            check_interrupt()
            x = refocuser.refocus(x, sigmas[i], i, total, report, show)
            x = run(x, i, i + 1, i)
            done[0] = i + 1
            show(report.maps)
            log.info("refocus step %d/%d: attention in the weakest view %s (%d refinement tries)", i + 1,
                     refocus_steps, ", ".join(f"{n} {a:.3f}" for n, a in zip(names, report.before[-1])),
                     report.tries[-1])
        if refocus_steps < total:
            x = run(x, refocus_steps, total, refocus_steps)
        self.last_report = report
        return model_wrap.inner_model.model_sampling.inverse_noise_scaling(sigmas[-1], x)


def maps_grid(maps: Tensor, views: int, cell: int = 96) -> Tensor:
    """(B, K, h, w) maps of the first object -> (K * cell, V * cell, 3) image: a row per subject, a column per view."""
    first = maps[:views].float().clamp(0, 1)  # (V, K, h, w)
    up = torch.nn.functional.interpolate(first, size=(cell, cell), mode="nearest")  # (V, K, cell, cell)
    rows = [torch.cat(list(up[:, k]), dim=1) for k in range(up.shape[1])]  # each (cell, V*cell)
    grid = torch.cat(rows, dim=0)
    # white lines between cells
    grid[::cell, :] = 1.0
    grid[:, ::cell] = 1.0
    return grid[..., None].expand(*grid.shape, 3).cpu()


# ---------------------------------------------------------------------------------------------------- node

class RefocusSampler(Compose3DNode):
    """SAMPLER: DDIM (or any sampler) with Grounded-Dreamer's multi-view attention refocusing."""

    @classmethod
    def define_schema(cls) -> io.Schema:
        return io.Schema(
            node_id="Compose3D_RefocusSampler",
            display_name="Refocus Sampler (multi-view Attend-and-Excite)",
            category=f"{CATEGORY}/mvdream",
            description="A SAMPLER for SamplerCustom / SamplerCustomAdvanced. During the first steps it moves the "
                        "latent so that every subject word gets attention in every view (Grounded-Dreamer's "
                        "refocusing of Attend-and-Excite), then samples with the chosen sampler. The node's "
                        "preview shows each subject's attention per view (a row per subject, a column per view) "
                        "while refocusing. With no subject words it is the plain sampler.",
            inputs=[
                io.Clip.Input("clip", tooltip="The CLIP that encoded the positive prompt (for its tokenizer)."),
                io.String.Input("prompt", multiline=True, default="",
                                tooltip="The positive prompt, exactly as encoded (connect the same text)."),
                io.String.Input("subjects", default="",
                                tooltip="Subject words of the prompt that must all appear, comma-separated, e.g. "
                                        "'cat, dog'. Empty: no refocusing."),
                io.Combo.Input("sampler_name", options=comfy.samplers.SAMPLER_NAMES, default="ddim",
                               tooltip="The sampler that takes each step."),
                io.Int.Input("refocus_steps", default=25, min=0, max=10000,
                             tooltip="Refocus before each of the first N steps (25 of 50 in Attend-and-Excite)."),
                io.Float.Input("step_size", default=20.0, min=0.0, max=1000.0, step=0.1,
                               tooltip="Latent update size, shrinking as sqrt(linspace(1, 0.5)) over the steps."),
                io.String.Input("thresholds", default="0: 0.05, 10: 0.5, 20: 0.8",
                                tooltip="At these steps, repeat the update until every subject's attention in its "
                                        "weakest view reaches the value ('step: value', comma-separated)."),
                io.Int.Input("max_tries", default=20, min=0, max=1000,
                             tooltip="Most repeated updates at a threshold step."),
                io.Float.Input("smoothing_sigma", default=0.5, min=0.01, max=10.0, step=0.01,
                               tooltip="Sigma of the 3x3 Gaussian that smooths the attention maps."),
            ],
            outputs=[io.Sampler.Output(display_name="SAMPLER")],
        )

    @classmethod
    def execute(cls, clip, prompt: str, subjects: str, sampler_name: str, refocus_steps: int, step_size: float,
                thresholds: str, max_tries: int, smoothing_sigma: float) -> io.NodeOutput:
        resolved = resolve_subjects(clip, prompt, subjects)
        parsed = parse_thresholds(thresholds)
        settings = None
        if resolved is not None and refocus_steps > 0:
            settings = RefocusSettings(resolved, refocus_steps, step_size, parsed, max_tries, smoothing_sigma)
        return io.NodeOutput(RefocusKSampler(comfy.samplers.sampler_object(sampler_name), settings))

