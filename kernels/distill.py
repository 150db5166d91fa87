"""Text to 3D by score distillation: the SDS training step of a NeRF, with Grounded-Dreamer's hybrid warm start.

One step (:func:`sds_step`): draw a camera batch (:func:`sds.sample_cameras`), render it with the pack's renderer,
encode the renders with gradients (the caller's ``encode``), noise the latents at one t, ask the caller's
``predict`` for the denoised latents with and without guidance, and backpropagate the SDS loss (MVDream's
x0-reconstruction or classic SDS) plus the regularisers into the field. With reference views (the hybrid), the
first steps fit them with the photometric loss alone; from then on SDS enters with a warm-start timestep range and
the reference loss is added with a weight that decays.

The diffusion model stays outside: ``encode(images (B, H, W, 3)) -> latents (B, C, h, w)`` (differentiable) and
``predict(x_noisy, sigma, cameras, views) -> (x0_cfg, x0_cond)`` (no gradients) are given by the caller (the node
wraps ComfyUI's VAE and MODEL). The loop itself is :func:`training.train`: resumable, interruptible, all-or-nothing
steps.

Rendering with gradients for a whole image batch: when the batch has few samples it is rendered once with its
graph; otherwise it is rendered once without a graph, the loss's gradient w.r.t. the images is computed, and the
rays are rendered again chunk by chunk, each chunk backpropagating its share, so memory stays bounded by one chunk.
"""
from __future__ import annotations

import contextlib
import math
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field as dc_field

import torch
from torch import Tensor, nn

from .background import LearnedBackground, SolidBackground
from .cameras import Cameras
from .nerf import NeRF
from .rays import camera_rays
from .reconstruct import PosedPixels, photometric_step
from .renderer import rays_per_chunk, render_rays
from .sds import (Anneal, CameraRanges, ResolutionSchedule, TimestepRange, classic_sds_loss, eps_of, noised,
                  opaque_loss, sample_cameras, sample_timestep, sds_weight, sparsity_loss, x0_reconstruction_loss)
from .training import Step

#: Batches with at most this many samples (rays x samples per ray) are rendered once, keeping their graph.
GRAPH_SAMPLES = 1 << 22

LOSSES = ("x0_reconstruction", "classic")
BACKGROUND_KINDS = ("learned", "random", "white", "black", "gray")
SOLID_COLOURS = {"white": (1.0, 1.0, 1.0), "black": (0.0, 0.0, 0.0), "gray": (0.5, 0.5, 0.5)}

Encode = Callable[[Tensor, torch.Generator], Tensor]
Predict = Callable[[Tensor, float, Tensor, int], tuple[Tensor, Tensor]]


# ------------------------------------------------------------------------------------------------ settings

@dataclass(frozen=True)
class References:
    """Grounded-Dreamer's hybrid: reference views fitted first, then kept while SDS refines.

    Attributes:
        images: (N, H, W, 3) in [0, 1]; cameras: N cameras; masks: (N, H, W) or None.
        fit_fraction: the first ``fit_fraction`` of the steps use the photometric loss alone.
        weight_start, weight_end: the reference loss weight when SDS enters and at the last step (linear decay).
        warm_max_t: the timestep range during SDS is MVDream's annealed range with its maximum capped here
            (t starts at ``warm_max_t`` instead of 0.98), so SDS refines instead of repainting the composition.
        rays_per_step: reference pixels per step.
    """

    images: Tensor
    cameras: Cameras
    masks: Tensor | None = None
    fit_fraction: float = 0.2
    weight_start: float = 1000.0
    weight_end: float = 100.0
    warm_max_t: float = 0.5
    rays_per_step: int = 4096
    mask_weight: float = 0.1


@dataclass(frozen=True)
class SDSSettings:
    """Everything one SDS run depends on. Defaults are MVDream-threestudio's (``mvdream-sd21.yaml``), with the
    step counts of its schedules given as fractions of ``steps`` so that shorter runs keep their shape."""

    steps: int = 10000
    guidance: float = 50.0
    loss: str = "x0_reconstruction"
    std_rescale: float = 0.5
    t_min: tuple[float, float] = (0.98, 0.02)
    t_max: tuple[float, float] = (0.98, 0.50)
    anneal_fraction: float = 0.8
    low_resolution: int = 64
    low_batch: int = 8
    high_resolution: int = 256
    high_batch: int = 4
    high_from_fraction: float = 0.5
    cameras: CameraRanges = CameraRanges()
    learning_rate: float = 0.01  # hash grid; MLPs and background a tenth (MVDream: 1e-2 / 1e-3)
    weight_decay: float = 0.01  # AdamW's default, as MVDream
    orientation_weight: float = 0.0
    sparsity_weight: float = 0.0
    opaque_weight: float = 0.0
    background: str = "learned"
    samples_per_ray: int = 64
    seed: int = 0

    def __post_init__(self):
        if self.loss not in LOSSES:
            raise ValueError(f"loss: expected one of {LOSSES}, got {self.loss!r}")
        if self.background not in BACKGROUND_KINDS:
            raise ValueError(f"background: expected one of {BACKGROUND_KINDS}, got {self.background!r}")

    def resolution(self) -> ResolutionSchedule:
        switch = int(round(self.high_from_fraction * self.steps))
        if switch >= self.steps:
            return ResolutionSchedule(((0, self.low_resolution, self.low_batch),))
        if switch <= 0:
            return ResolutionSchedule(((0, self.high_resolution, self.high_batch),))
        return ResolutionSchedule(((0, self.low_resolution, self.low_batch),
                                   (switch, self.high_resolution, self.high_batch)))

    def to_config(self) -> dict:
        """JSON-able settings, for checkpoints (a resume must match them)."""
        data = asdict(self)
        data["cameras"] = asdict(self.cameras)
        return json_ready(data)


def json_ready(value):
    """Tuples -> lists, recursively (so a dict compares equal to its JSON round trip)."""
    if isinstance(value, dict):
        return {k: json_ready(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [json_ready(v) for v in value]
    return value


def timestep_range(settings: SDSSettings, references: References | None) -> TimestepRange:
    """The annealed t range of a run: MVDream's over ``anneal_fraction`` of the steps; with references, over
    the same fraction of the SDS phase, starting when SDS enters, with both bounds capped at ``warm_max_t``."""
    if references is None:
        span = int(round(settings.anneal_fraction * settings.steps))
        return TimestepRange.mvdream(span, 0, settings.t_min, settings.t_max)
    start = sds_start(settings, references)
    span = int(round(settings.anneal_fraction * (settings.steps - start)))
    cap = references.warm_max_t
    low = (min(settings.t_min[0], cap), min(settings.t_min[1], cap))
    high = (min(settings.t_max[0], cap), min(settings.t_max[1], cap))
    return TimestepRange.mvdream(span, start, low, high)


def sds_start(settings: SDSSettings, references: References | None) -> int:
    """First step that uses SDS (0 without references)."""
    if references is None:
        return 0
    return int(round(references.fit_fraction * settings.steps))


def reference_weight(step: int, settings: SDSSettings, references: References) -> float:
    """Weight of the reference loss at ``step``: 1 (alone) before SDS enters, then linear from
    ``weight_start`` to ``weight_end`` at the last step."""
    start = sds_start(settings, references)
    if step < start:
        return 1.0
    return Anneal(references.weight_start, references.weight_end, start, settings.steps - 1).at(step)


def make_background(kind: str, seed: int = 0) -> nn.Module:
    """The NeRF's background for a ``background`` choice ("random" trains with a learned one; see
    :func:`step_background`); a learned one is initialised from ``seed`` (not the global random state), so runs
    with the same seed start alike."""
    if kind in ("learned", "random"):
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            return LearnedBackground()
    return SolidBackground(SOLID_COLOURS[kind])


def step_background(nerf: NeRF, kind: str, generator: torch.Generator) -> nn.Module:
    """The background a step renders over: "random" draws one solid colour per step (shared by the batch, so
    the object cannot hide in the background); otherwise the NeRF's own."""
    if kind != "random":
        return nerf.background
    colour = torch.rand(3, generator=generator)
    return SolidBackground(tuple(colour.tolist())).to(nerf.device)


# ------------------------------------------------------------------------------------------------ timings

class PhaseTimer:
    """Wall-clock time per phase (render, encode, unet, backward, optimizer...), synchronising CUDA so GPU work
    is charged to the phase that queued it."""

    def __init__(self, device: torch.device):
        self.cuda = torch.device(device).type == "cuda"
        self.totals: dict[str, float] = {}
        self.counts: dict[str, int] = {}

    def _sync(self) -> None:
        if self.cuda:
            torch.cuda.synchronize()

    @contextlib.contextmanager
    def phase(self, name: str):
        """Charge the ``with`` block's time to ``name`` (also when it raises)."""
        self._sync()
        start = time.perf_counter()
        try:
            yield
        finally:
            self._sync()
            self.add(name, time.perf_counter() - start)

    def add(self, name: str, seconds: float) -> None:
        self.totals[name] = self.totals.get(name, 0.0) + seconds
        self.counts[name] = self.counts.get(name, 0) + 1

    def attach(self, optimizer: torch.optim.Optimizer) -> None:
        """Charge ``optimizer.step`` to the phase "optimizer"."""
        start = {}

        def pre(*_):
            self._sync()
            start["t"] = time.perf_counter()

        def post(*_):
            self._sync()
            self.add("optimizer", time.perf_counter() - start["t"])

        optimizer.register_step_pre_hook(pre)
        optimizer.register_step_post_hook(post)


# ------------------------------------------------------------------------------------------------ one step

@dataclass
class StepResult:
    """One finished step: which losses ran and their values (floats), the t and render size used."""

    sds: float | None = None
    reference: float | None = None
    regularisers: float = 0.0
    t: int | None = None
    size: int = 0
    batch: int = 0


@dataclass
class SDSRun:
    """A run's fixed pieces: the NeRF being trained, its settings, the model callables and references.

    ``before_predict(step, cameras, latent size)``, when given, runs before each step's prediction (the part
    modulation renders the step's part maps there)."""

    nerf: NeRF
    settings: SDSSettings
    encode: Encode
    predict: Predict
    sigma_of: Callable[[int], float]
    timesteps: int
    references: References | None = None
    timer: PhaseTimer | None = None
    skip_empty: Callable[[int], bool] = lambda step: True
    before_predict: Callable[[int, Cameras, tuple[int, int]], None] | None = None
    _pixels: PosedPixels | None = dc_field(default=None, repr=False)

    def __post_init__(self):
        if self.timer is None:
            self.timer = PhaseTimer(self.nerf.device)
        if self.references is not None:
            r = self.references
            bg = self.nerf.background.rgb if isinstance(self.nerf.background, SolidBackground) else \
                torch.ones(3)
            self._pixels = PosedPixels.of_views(r.images, r.cameras, r.masks, bg)
        self.t_range = timestep_range(self.settings, self.references)
        self.resolution = self.settings.resolution()


def sds_step(run: SDSRun, step: Step) -> StepResult:
    """Accumulate the gradients of step ``step.index`` of ``run`` (a :func:`training.train` step function)."""
    s, result = run.settings, StepResult()
    start = sds_start(s, run.references)
    if run.references is not None:
        weight = reference_weight(step.index, s, run.references)
        with run.timer.phase("reference"):
            r = run.references
            loss = photometric_step(run.nerf, run._pixels, step, r.rays_per_step, r.mask_weight,
                                    run.skip_empty(step.index), weight=weight)
        result.reference = loss.loss
    if step.index < start:
        return result

    size, batch = run.resolution.at(step.index)
    gen = step.generator
    cameras = sample_cameras(batch, s.cameras, gen)
    background = step_background(run.nerf, s.background, gen)
    samples = run.nerf.render.samples_per_ray
    jitter = torch.rand(batch * size * size, samples, generator=gen)
    t = sample_timestep(run.t_range.bounds(step.index, run.timesteps), gen)
    sigma = run.sigma_of(t)
    result.t, result.size, result.batch = t, size, batch
    device = run.nerf.device
    origins, directions = (v.reshape(-1, 3) for v in camera_rays(cameras, size, size, device=device))
    renderer = BatchRender(run, background, origins, directions, jitter, step, skip=run.skip_empty(step.index))

    with run.timer.phase("render"):
        images = renderer.render().view(batch, size, size, 3)
    with run.timer.phase("encode"):
        latents = run.encode(images, gen)
    noise = torch.randn(latents.shape, generator=gen, dtype=torch.float32).to(latents.device)
    step.check_interrupt()
    if run.before_predict is not None:
        with run.timer.phase("part maps"):
            run.before_predict(step.index, cameras, tuple(latents.shape[-2:]))
    with run.timer.phase("unet"), torch.no_grad():
        x_noisy = noised(latents.detach(), noise, sigma)
        x0_cfg, x0_cond = run.predict(x_noisy, sigma, cameras.mvdream, s.cameras.views)
    with torch.inference_mode(False):
        x0_cfg, x0_cond = x0_cfg.float().clone(), x0_cond.float().clone()  # plain tensors for autograd
    with run.timer.phase("backward"):
        if s.loss == "x0_reconstruction":
            loss = x0_reconstruction_loss(latents, x0_cfg, x0_cond, s.cameras.views, s.std_rescale)
        else:
            loss = classic_sds_loss(latents, eps_of(x_noisy, x0_cfg, sigma), noise, sds_weight(sigma))
        result.regularisers = renderer.backward(loss)
    result.sds = float(loss.detach())
    return result


class BatchRender:
    """Renders a ray batch with gradients, in one pass with its graph or in two (see the module docstring),
    and adds the regularisers (per-ray opacity and orientation terms) to the backward pass."""

    def __init__(self, run: SDSRun, background: nn.Module, origins: Tensor, directions: Tensor, jitter: Tensor,
                 step: Step, skip: bool):
        self.run, self.background, self.step, self.skip = run, background, step, skip
        self.origins, self.directions, self.jitter = origins, directions, jitter
        samples = run.nerf.render.samples_per_ray
        self.chunks = torch.arange(origins.shape[0]).split(rays_per_chunk(samples))
        self.one_pass = origins.shape[0] * samples <= GRAPH_SAMPLES
        self.rays = origins.shape[0]
        self.regulariser_terms: list[Tensor] = []
        self.images: Tensor | None = None

    def _chunk(self, rays: Tensor) -> dict[str, Tensor]:
        self.step.check_interrupt()
        nerf, s = self.run.nerf, self.run.settings
        return render_rays(nerf.field, self.background, self.origins[rays], self.directions[rays],
                           nerf.render.samples_per_ray, occupancy=nerf.occupancy if self.skip else None,
                           jitter=self.jitter[rays], with_orientation=s.orientation_weight > 0)

    def _regularisers(self, out: dict[str, Tensor], share: float) -> Tensor | None:
        """The chunk's share of the batch's regularisers (means over all rays), or None when all are off."""
        s = self.run.settings
        total = None
        terms = ((s.sparsity_weight, lambda: sparsity_loss(out["opacity"])),
                 (s.opaque_weight, lambda: opaque_loss(out["opacity"])),
                 (s.orientation_weight, lambda: out["orientation"].mean()))
        for weight, term in terms:
            if weight > 0:
                value = weight * share * term()
                total = value if total is None else total + value
        return total

    def render(self) -> Tensor:
        """(R, 3) colours of the batch: with their graph (one pass) or a leaf requiring grad (two passes)."""
        parts = []
        if self.one_pass:
            for rays in self.chunks:
                out = self._chunk(rays)
                parts.append(out["features"])
                reg = self._regularisers(out, len(rays) / self.rays)
                if reg is not None:
                    self.regulariser_terms.append(reg)
            return torch.cat(parts)
        with torch.no_grad():
            for rays in self.chunks:
                parts.append(self._chunk(rays)["features"])
        self.images = torch.cat(parts).requires_grad_(True)
        return self.images

    def backward(self, loss: Tensor) -> float:
        """Backpropagate ``loss`` (a function of the rendered images) and the regularisers into the field;
        returns the regularisers' value."""
        if self.one_pass:
            total = loss
            reg_value = 0.0
            for reg in self.regulariser_terms:
                total = total + reg
                reg_value += float(reg.detach())
            total.backward()
            return reg_value
        (grad,) = torch.autograd.grad(loss, self.images)
        reg_value = 0.0
        for rays in self.chunks:
            out = self._chunk(rays)
            total = (out["features"] * grad[rays]).sum()
            reg = self._regularisers(out, len(rays) / self.rays)
            if reg is not None:
                total = total + reg
                reg_value += float(reg.detach())
            total.backward()
        return reg_value


# ------------------------------------------------------------------------------------------------- report

@dataclass
class SDSReport:
    """What a run measured: per-phase seconds (totals), steps, losses and peak memory."""

    steps: int = 0
    seconds: float = 0.0
    phases: dict[str, float] = dc_field(default_factory=dict)
    sds_losses: list[float] = dc_field(default_factory=list)
    reference_losses: list[float] = dc_field(default_factory=list)
    peak_memory_bytes: int = 0
    memory_kind: str = ""
    checkpoints: list[str] = dc_field(default_factory=list)
    interrupted: bool = False
    modulated_steps: int = 0

    def text(self) -> str:
        per = self.seconds / max(self.steps, 1)
        lines = [f"SDS: {self.steps} steps in {self.seconds:.1f} s ({per:.3f} s/step)"]
        if self.phases:
            parts = ", ".join(f"{k} {v / max(self.steps, 1) * 1000:.1f}" for k, v in self.phases.items())
            lines.append(f"per step (ms): {parts}")
        if self.peak_memory_bytes:
            lines.append(f"peak memory ({self.memory_kind}): {self.peak_memory_bytes / 2 ** 30:.2f} GiB")
        for name, values in (("sds loss", self.sds_losses), ("reference loss", self.reference_losses)):
            finite = [v for v in values if math.isfinite(v)]
            if finite:
                tail = finite[-min(len(finite), 50):]
                lines.append(f"{name}: first {finite[0]:.4g}, last-50 mean {sum(tail) / len(tail):.4g}")
        if self.modulated_steps:
            lines.append(f"part modulation: {self.modulated_steps} steps")
        if self.checkpoints:
            lines.append(f"checkpoint: {self.checkpoints[-1]}")
        if self.interrupted:
            lines.append("interrupted: resume from the checkpoint above")
        return "\n".join(lines)
