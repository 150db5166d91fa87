"""The refocus sampler: Attend-and-Excite over the views of multi-view generation (Grounded-Dreamer stage 1).

During the first ``refocus_steps`` sampling steps the latent is moved, before each step, down the gradient of the
refocusing loss (:mod:`kernels.refocus`): the cross-attention maps of the subject words at the UNet level of 1/4
of the latent resolution (8x8 for MVDream's 32x32 latents), from a conditional-only pass, are smoothed, and the
weakest subject in its weakest view drives the loss. At the steps named in ``thresholds`` the update is repeated
until every subject reaches the threshold or ``max_tries`` runs out. Then the wrapped sampler (DDIM by default)
takes its step.

Step sizes follow Attend-and-Excite, whose latent is the unit-variance ``z = c_in x`` (``c_in = 1/sqrt(1+s^2)`` for
eps models). ComfyUI's samplers work on ``x``; an update ``z -= a dL/dz`` is ``x -= a dL/dx / c_in^2`` in x.

During the refocus phase each step of the wrapped sampler runs on its own (so multistep samplers restart their
history after each refocused step); the remaining steps run in one call. With no subject words the wrapped
sampler runs untouched. The cross-attention is captured through :mod:`nodes.attention_patch`.
"""
from __future__ import annotations

import functools
import logging
from dataclasses import dataclass, field

import torch
from torch import Tensor

import comfy.samplers
import comfy.utils
from comfy_api.latest import io

from ..kernels.refocus import parse_thresholds, refocus_loss, refocus_step_size, smooth_maps, subject_maps
from .attention_patch import explicit_attention, patch_unet_attention
from .common import PREVIEW_MAX_PX, check_interrupt, to_pil
from .tokens import PhraseWording, resolve_phrases
from .training import autograd_weights
from .types import CAMERA_KEY, CATEGORY, REFOCUS_REPORT_KEY
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


#: How the refocus sampler's messages about its subject words are worded.
SUBJECT_WORDING = PhraseWording(input_name="subjects", items="subject words", example="'cat, dog'",
                                purpose="refocusing")


def resolve_subjects(clip, prompt: str, subjects_text: str) -> Subjects | None:
    """Map comma-separated subject words to token positions of ``prompt``; None when no subjects are given.

    Raises:
        ValueError: empty entries, words not in the prompt (the message lists the prompt's tokens), or a prompt
            longer than one 77-token window.
    """
    found = resolve_phrases(clip, prompt, subjects_text, SUBJECT_WORDING)
    if found is None:
        return None
    return Subjects(found.phrases, found.primary.positions, found.primary.last_token)


# ------------------------------------------------------------------------------------------------ capture

class AttentionCapture:
    """attn2 replacements that compute cross-attention explicitly at one resolution and keep its probabilities.

    Blocks at other resolutions run their fallback (the replacement installed before, or ComfyUI's attention).
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
        """A copy of ``model_options`` with a capturing attn2 replacement on every transformer block."""
        return patch_unet_attention(model_options, diffusion_model, "attn2", self._patch)

    def _patch(self, key, fallback):
        def attn2(q, k, v, extra_options):
            check_interrupt()  # refocus passes (forward + backward) are long: answer a Cancel per block
            shape = extra_options.get("activations_shape")
            if shape is None or tuple(shape[-2:]) != (self.height, self.width):
                return fallback(q, k, v, extra_options)
            out, probs = explicit_attention(q, k, v, extra_options, keep=slice(None))
            self.probs.append(probs)
            return out

        return attn2


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


@dataclass(frozen=True)
class Measurement:
    """The refocusing loss of one latent: ``loss`` (scalar, summed over objects), ``attention`` (objects, K) each
    subject's attention in its weakest view, ``maps`` (B, K, h, w) the smoothed subject maps."""
    loss: Tensor
    attention: Tensor
    maps: Tensor


class Refocuser:
    """Measures the refocusing loss of a latent and moves the latent down its gradient."""

    def __init__(self, model_wrap, model_options: dict, settings: RefocusSettings):
        self.base_model = model_wrap.inner_model
        self.settings = settings
        positive = model_wrap.conds.get("positive") or []
        if not positive:
            raise ValueError("refocus sampler: the sampling run has no positive conditioning")
        self.positive = positive
        cams = positive[0].get(CAMERA_KEY)
        self.views = 1 if cams is None else int(cams.shape[0])
        self.capture = AttentionCapture()
        try:
            self.model_options = self.capture.model_options(self.base_model.diffusion_model, model_options)
        except ValueError as e:
            raise ValueError(f"refocus sampler: {e}; refocusing works with MVDream (and SD1.x/2.x) models") from None

    def measure(self, x: Tensor, sigma: Tensor) -> Measurement:
        """The loss of latent ``x`` (B, C, H, W) at ``sigma``; differentiable w.r.t. ``x`` with grad enabled."""
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
        return Measurement(torch.stack(losses).sum(), torch.stack(per_object), maps)

    def update(self, x: Tensor, sigma: Tensor, step_size: float) -> tuple[Tensor, Measurement]:
        """One gradient step: (the moved latent, the measurement of ``x`` it came from, detached)."""
        with torch.inference_mode(False), torch.enable_grad():
            xg = x.detach().clone().requires_grad_(True)
            with autograd_weights(self.base_model.diffusion_model):
                m = self.measure(xg, sigma.detach().clone())
            grad, = torch.autograd.grad(m.loss, xg)
        c_in = self.base_model.model_sampling.calculate_input(sigma.reshape(1), torch.ones_like(x[:1]))
        scale = step_size / c_in.flatten()[0].item() ** 2
        x_new = (x.detach() - scale * grad.to(x.dtype)).detach()
        return x_new, Measurement(m.loss.detach(), m.attention.detach(), m.maps.detach())

    def per_object(self, mask: Tensor, x: Tensor) -> Tensor:
        """(objects,) bool -> a mask broadcastable over the latent batch x (views of an object together)."""
        return mask.repeat_interleave(self.views).reshape(-1, *[1] * (x.ndim - 1)).to(x.device)

    def refocus(self, x: Tensor, sigma: Tensor, step: int, total_steps: int, report: RefocusReport,
                show) -> Tensor:
        s = self.settings
        step_size = refocus_step_size(step, total_steps, s.step_size)
        x_new, m = self.update(x, sigma, step_size)
        report.steps.append(step)
        report.before.append(m.attention.mean(dim=0).tolist())
        tries = 0
        threshold = s.thresholds.get(step)
        if threshold is not None:
            # Iterative refinement: keep updating while a subject is below the threshold in some view, then
            # take the regular update (x_new is always one update past the last measured latent).
            # Objects of a batch are refined independently: only those still below the threshold move.
            while float(m.attention.min()) < threshold and tries < s.max_tries:
                check_interrupt()
                below = m.attention.amin(dim=1) < threshold  # (objects,)
                x = torch.where(self.per_object(below, x), x_new, x)
                x_new, m = self.update(x, sigma, step_size)
                tries += 1
                show(m.maps)
        report.refined.append(m.attention.mean(dim=0).tolist())
        report.tries.append(tries)
        report.maps = m.maps
        return x_new


def refocus_sampler(base: comfy.samplers.KSAMPLER, settings: RefocusSettings | None) -> comfy.samplers.KSAMPLER:
    """A SAMPLER that refocuses the latent before the first steps of ``base`` (a core KSAMPLER), or ``base``
    itself when there is nothing to refocus. Its sampler function wraps ``base``'s (core samplers wrap each other
    the same way); the SAMPLER keeps no state: each run's :class:`RefocusReport` goes to the log, the node's
    previews, and the callable under ``model_options[REFOCUS_REPORT_KEY]`` if the MODEL has one."""
    if settings is None:
        return base
    function = functools.partial(refocus_sampling, base_function=base.sampler_function, settings=settings)
    return comfy.samplers.KSAMPLER(function, extra_options=base.extra_options, inpaint_options=base.inpaint_options)


def refocus_sampling(model_k, x: Tensor, sigmas: Tensor, extra_args: dict, callback, disable, *, base_function,
                     settings: RefocusSettings, **base_options) -> Tensor:
    """A k-diffusion-style sampler function: refocus before each of the first steps, each step taken by
    ``base_function`` on its own, then the remaining steps in one call of it.

    ``x`` is the noised latent (B, C, H, W), ``sigmas`` (S + 1,), ``model_k`` core's KSamplerX0Inpaint around
    the sampling run's guider; returns the sampled latent (still noise-scaled, as KSAMPLER expects).
    """
    model_wrap = model_k.inner_model
    total = len(sigmas) - 1
    refocus_steps = min(settings.refocus_steps, total)
    refocuser = Refocuser(model_wrap, extra_args["model_options"], settings)
    unused = sorted(k for k in settings.thresholds if k >= refocus_steps)
    if unused:
        log.warning("refocus: thresholds at steps %s are never reached (only the first %d of %d steps are "
                    "refocused)", unused, refocus_steps, total)
    report = RefocusReport()
    bar = comfy.utils.ProgressBar(total)
    done = [0]  # steps finished, for the progress value sent with map previews

    def show(maps: Tensor) -> None:
        bar.update_absolute(done[0], total, ("JPEG", to_pil(maps_grid(maps, refocuser.views)), PREVIEW_MAX_PX))

    def run(x, first, last, seed_offset):
        k_callback = None
        if callback is not None:
            k_callback = lambda d: callback({**d, "i": first + d["i"]})  # noqa: E731
        args = dict(extra_args)
        if "seed" in args and seed_offset:
            args["seed"] = args["seed"] + seed_offset  # fresh noise for ancestral steps run one at a time
        return base_function(model_k, x, sigmas[first:last + 1], extra_args=args, callback=k_callback,
                             disable=True, **base_options)

    for i in range(refocus_steps):
        check_interrupt()
        x = refocuser.refocus(x, sigmas[i], i, total, report, show)
        x = run(x, i, i + 1, i)
        done[0] = i + 1
        show(report.maps)
        log.info("refocus step %d/%d: attention in the weakest view %s (%d refinement tries)", i + 1,
                 refocus_steps, ", ".join(f"{n} {a:.3f}" for n, a in zip(settings.subjects.names,
                                                                          report.before[-1])),
                 report.tries[-1])
    if refocus_steps < total:
        x = run(x, refocus_steps, total, refocus_steps)
    receiver = extra_args["model_options"].get(REFOCUS_REPORT_KEY)
    if callable(receiver):
        receiver(report)
    return x


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
            outputs=[io.Sampler.Output(display_name="SAMPLER", tooltip="The refocusing sampler, for SamplerCustom "
                                                                       "or SamplerCustomAdvanced.")],
        )

    @classmethod
    def execute(cls, clip, prompt: str, subjects: str, sampler_name: str, refocus_steps: int, step_size: float,
                thresholds: str, max_tries: int, smoothing_sigma: float) -> io.NodeOutput:
        resolved = resolve_subjects(clip, prompt, subjects)
        parsed = parse_thresholds(thresholds)
        settings = None
        if resolved is not None and refocus_steps > 0:
            settings = RefocusSettings(resolved, refocus_steps, step_size, parsed, max_tries, smoothing_sigma)
        return io.NodeOutput(refocus_sampler(comfy.samplers.sampler_object(sampler_name), settings))

