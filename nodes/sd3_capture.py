"""SD3 attention capture (DreamBeast, mechanism 1): where each part phrase sits in each view, read from SD3.

Each view is encoded by the VAE, noised SDEdit-style and denoised by SD3 through ComfyUI's own sampling (model
loading, CFG, the SD3 conditioning), with the prompt plus a view word ("..., back view") from the view's camera.
Above ``sdedit_timestep`` every step starts again from the view noised to that step (the view anchors the
image); below it the run continues freely, as in DreamBeast's code. While the timestep is inside the window, the
joint attention of the chosen MMDiT blocks is read through :func:`nodes.attention_patch.patch_mmdit_attention`:
the model's own attention runs unchanged, and next to it the probabilities (or raw scores) of the part phrases'
text tokens are computed in chunks of image queries and added to a (views x image tokens x kept tokens)
accumulator. Only steps that matter run: anchored steps outside the window are skipped (each would be
overwritten), and the run stops below the window.

The MODEL passed in is never changed: the hooks live on a clone's options, their state in closures.
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass

import torch
from comfy_api.latest import io

import comfy.model_management
import comfy.sample
import comfy.samplers
from comfy.ldm.modules.diffusionmodules.mmdit import MMDiT

from ..kernels.attention import selected_probabilities, selected_scores
from ..kernels.cameras import Cameras, view_directions
from ..kernels.part_maps import (MapAccumulator, PartMaps, heat_map_preview, official_part_maps,
                                 probability_part_maps, resize_maps, token_grid)
from .attention_patch import JointAttentionCall, patch_mmdit_attention
from .common import Progress, check_interrupt, preview_with_legend
from ..kernels.tokens import parse_phrases
from .tokens import PhraseWording, PhraseTokens, locate_phrases
from .types import CATEGORY, CamerasType, PartMapsType
from .validation import Compose3DNode

#: Most views sampled in one batch (one view word's views run in batches of this many).
MAX_BATCH = 4
PARTS = PhraseWording("parts", "part phrases", "'head, wings, tail'", "the attention capture")
NORMALIZATIONS = ("official", "probability")
TEXT_TOKENS = {"clip": ("l", "g"), "clip and t5": ("l", "g", "t5xxl")}
#: SD3's latents are 1/8 of the image and its patches 2x2 latents: one image token per 16x16 pixels.
PIXELS_PER_TOKEN = 16


@dataclass(frozen=True)
class CaptureSettings:
    """What to read and when. Timesteps are SD3's (sigma x 1000)."""

    blocks: tuple[int, ...] = (11,)
    t_low: float = 100.0
    t_high: float = 450.0
    sdedit_timestep: float = 500.0
    steps: int = 50
    cfg: float = 7.0
    normalization: str = "official"

    def records(self, t: float) -> bool:
        return self.t_low <= t <= self.t_high


@dataclass(frozen=True)
class StepPlan:
    """Which steps of the sigma schedule run. ``sigmas`` (S + 1,) is the slice handed to the sampler; step i
    runs from sigmas[i] to sigmas[i + 1] when ``run[i]``; ``anchored[i]``: it starts from the view noised to
    sigmas[i] instead of the previous step's result."""

    sigmas: torch.Tensor
    run: tuple[bool, ...]
    anchored: tuple[bool, ...]

    @property
    def model_calls(self) -> int:
        return sum(self.run)


def plan_steps(full_sigmas: torch.Tensor, timestep, settings: CaptureSettings) -> StepPlan:
    """The steps of ``full_sigmas`` (N + 1,) a capture needs; ``timestep(sigma) -> t``."""
    t = [float(timestep(s)) for s in full_sigmas[:-1]]
    n = len(t)
    stop = next((i for i in range(n) if t[i] < settings.t_low), n)  # nothing below the window is needed
    anchored = [t[i] > settings.sdedit_timestep for i in range(stop)]
    run = []
    for i in range(stop):
        next_is_free = i + 1 < stop and not anchored[i + 1]
        run.append(settings.records(t[i]) or not anchored[i] or next_is_free)
    first = next((i for i in range(stop) if run[i]), stop)
    if first == stop:
        raise ValueError(f"t_low/t_high: no step of the {settings.steps}-step schedule falls in the window "
                         f"[{settings.t_low:g}, {settings.t_high:g}]; widen the window or use more steps")
    return StepPlan(full_sigmas[first:stop + 1], tuple(run[first:]), tuple(anchored[first:]))


def anchored_euler(model, x, sigmas, extra_args=None, callback=None, disable=None, plan: StepPlan | None = None):
    """A ComfyUI sampler function: Euler steps of the flow ODE that follow ``plan`` (re-noise the view before
    anchored steps, skip steps that need not run). ``model`` is ComfyUI's KSamplerX0Inpaint, which holds the
    view's latent and the noise."""
    extra_args = extra_args or {}
    scaling = model.inner_model.inner_model.model_sampling.noise_scaling
    s_in = x.new_ones([x.shape[0]])
    for i in range(len(sigmas) - 1):
        check_interrupt()
        if plan.anchored[i]:
            x = scaling(sigmas[i], model.noise, model.latent_image)
        if not plan.run[i]:
            continue
        denoised = model(x, sigmas[i] * s_in, **extra_args)
        if callback is not None:
            callback({"i": i, "denoised": denoised, "x": x, "sigma": sigmas[i]})
        x = x + (x - denoised) / sigmas[i] * (sigmas[i + 1] - sigmas[i])
    return x


class AttentionRecorder:
    """The capture's state: the accumulator and which views the running sampling call belongs to."""

    def __init__(self, settings: CaptureSettings, columns: list[int], views: int, image_tokens: int, timestep,
                 device: torch.device):
        self.settings = settings
        self.columns = torch.tensor(columns, dtype=torch.long)
        self.accumulator = MapAccumulator(views, image_tokens, len(columns), device=device)
        self.timestep = timestep
        self.view_index: torch.Tensor | None = None  # (B,) views of the current sampling call
        self.calls = 0

    def handle(self, call: JointAttentionCall) -> torch.Tensor:
        out = call.default()
        options = call.transformer_options
        sigmas = options.get("sigmas")
        if self.view_index is None or sigmas is None:
            return out
        if not self.settings.records(float(self.timestep(sigmas.flatten()[0]))):
            return out
        chunks = options.get("cond_or_uncond") or [0]
        batch = call.q.shape[0] // len(chunks)
        if batch != self.view_index.shape[0] or batch * len(chunks) != call.q.shape[0]:
            raise RuntimeError(f"attention capture: a batch of {call.q.shape[0]} in {len(chunks)} parts does not "
                               f"match the {self.view_index.shape[0]} views being sampled")
        if int(self.columns.max()) >= call.text_length:
            raise RuntimeError(f"attention capture: token column {int(self.columns.max())} is beyond the "
                               f"{call.text_length} text tokens the model got")
        if self.columns.device != call.q.device:
            self.columns = self.columns.to(call.q.device)  # once: the capture's calls are on one device
        cols = self.columns
        for n, kind in enumerate(chunks):
            if kind != 0:  # only the conditional (prompt) half
                continue
            rows = slice(n * batch, (n + 1) * batch)
            q_img = call.q[rows, call.text_length:].float()
            if self.settings.normalization == "probability":
                values = selected_probabilities(q_img, call.k[rows].float(), call.heads, cols)
            else:
                values = selected_scores(q_img, call.k[rows, :call.text_length].float(), cols)
            self.accumulator.add(self.view_index, values)
            self.calls += 1
        return out


def check_capture_model(model) -> MMDiT:
    """The MMDiT of an SD3 MODEL, or a ValueError naming the input."""
    diffusion_model = getattr(getattr(model, "model", None), "diffusion_model", None)
    if not isinstance(diffusion_model, MMDiT):
        raise ValueError(f"model: expected an SD3 model (an MMDiT, e.g. sd3_medium from Load Checkpoint), got "
                         f"{type(diffusion_model).__name__}; attention capture reads SD3's joint attention")
    return diffusion_model


def parse_blocks(text: str, depth: int) -> tuple[int, ...]:
    """``"11"`` or ``"10, 11"`` -> block indices, each in [0, depth)."""
    try:
        blocks = tuple(int(b) for b in text.replace(" ", "").split(",") if b != "")
    except ValueError:
        raise ValueError(f"blocks: {text!r} is not a comma-separated list of block numbers, e.g. '11' or "
                         f"'10, 11'") from None
    if not blocks:
        raise ValueError("blocks: empty; name at least one joint-attention block, e.g. '11'")
    return check_blocks(blocks, depth)


def check_blocks(blocks, depth: int) -> tuple[int, ...]:
    """Sorted distinct block indices, each in [0, depth), or a ValueError naming ``blocks``."""
    bad = [b for b in blocks if not 0 <= b < depth]
    if bad:
        raise ValueError(f"blocks: {bad} not among this model's {depth} joint blocks (0 to {depth - 1})")
    return tuple(sorted(set(blocks)))


def check_views(views: torch.Tensor, cameras: Cameras) -> None:
    v, h, w = views.shape[:3]
    if len(cameras) != v:
        raise ValueError(f"cameras: {len(cameras)} cameras for {v} views; give one camera per view, in order")
    if h != w:
        raise ValueError(f"views: {w}x{h} images; give square views (e.g. Render NeRF with width = height)")


def view_prompts(prompt: str, cameras: Cameras, view_words: bool) -> list[str]:
    """The prompt of each view: ``"<prompt>, <front|side|back> view"`` (or the prompt alone)."""
    if not view_words:
        return [prompt] * len(cameras)
    return [f"{prompt.rstrip().rstrip(',')}, {d} view" for d in view_directions(cameras.azimuth_deg)]


def phrase_columns(found: PhraseTokens, text_tokens: str) -> list[list[int]]:
    """Per part, its tokens' columns in SD3's joint text context (CLIP part, or CLIP and T5)."""
    keys = [k for k in TEXT_TOKENS[text_tokens] if k in found.encoders]
    if not keys:
        raise ValueError(f"text_tokens: the CLIP has none of the text encoders {TEXT_TOKENS[text_tokens]}")
    return found.context_columns(keys)


def capture_part_maps(model, clip, vae, views: torch.Tensor, cameras: Cameras, prompt: str, parts: list[str],
                      negative: str, settings: CaptureSettings, resolution: int, map_size: int, seed: int,
                      text_tokens: str = "clip", view_words: bool = True,
                      on_progress=None) -> tuple[PartMaps, AttentionRecorder]:
    """Run the capture (see the module notes); returns the part maps and the recorder (for tests).

    ``on_progress(done, total, preview)`` is called after every model call; ``preview`` is None, or, after the
    last step of each batch of views, an (H, K * W, 3) heat-map picture of that batch's first view. Views
    that share a view word run as batches of at most :data:`MAX_BATCH`, so many views (DreamBeast records 80)
    need no more memory than a few.
    """
    mmdit = check_capture_model(model)
    check_views(views, cameras)
    settings = dataclasses.replace(settings, blocks=check_blocks(settings.blocks, len(mmdit.joint_blocks)))
    base = locate_phrases(clip, prompt, parts, PARTS)  # errors name the typed prompt's words
    prompts = view_prompts(prompt, cameras, view_words)
    groups: dict[str, list[int]] = {}
    for i, p in enumerate(prompts):
        groups.setdefault(p, []).append(i)
    columns = phrase_columns(base, text_tokens)
    for p in groups:  # the view word goes after the prompt: same positions, but it must fit the window
        if phrase_columns(locate_phrases(clip, p, parts, PARTS), text_tokens) != columns:
            raise ValueError(f"prompt: adding the view word moves the part phrases' tokens ({p!r}); shorten the "
                             f"prompt or turn view_words off")
    kept = sorted({c for cols in columns for c in cols})
    token_groups = [[kept.index(c) for c in cols] for cols in columns]

    model_sampling = model.get_model_object("model_sampling")
    full = comfy.samplers.calculate_sigmas(model_sampling, "simple", settings.steps).cpu()
    plan = plan_steps(full, model_sampling.timestep, settings)
    grid = resolution // PIXELS_PER_TOKEN
    device = comfy.model_management.get_torch_device()
    recorder = AttentionRecorder(settings, kept, len(cameras), grid * grid, model_sampling.timestep, device)
    patched = model.clone()
    patched.model_options = patch_mmdit_attention(model.model_options, list(settings.blocks), recorder.handle)
    sampler = comfy.samplers.KSAMPLER(anchored_euler, extra_options={"plan": plan})
    negative_cond = clip.encode_from_tokens_scheduled(clip.tokenize(negative))

    pixels = resize_maps(views[..., :3].float().permute(0, 3, 1, 2), (resolution, resolution))
    pixels = pixels.clamp(0, 1).permute(0, 2, 3, 1)
    generator = torch.Generator().manual_seed(seed)
    noise = None  # (V, C, h, w): one fixed noise per view, drawn once the latent shape is known
    batches = [(text, view_list[i:i + MAX_BATCH]) for text, view_list in groups.items()
               for i in range(0, len(view_list), MAX_BATCH)]
    done, total = 0, plan.model_calls * len(batches)

    def step_done(*_):
        nonlocal done
        done += 1
        if on_progress is not None and done % plan.model_calls:  # a group's last step shows its maps
            on_progress(done, total, None)

    for text, view_list in batches:
        check_interrupt()
        latent = comfy.sample.fix_empty_latent_channels(patched, vae.encode(pixels[view_list]))
        if noise is None:
            noise = torch.randn((len(cameras),) + tuple(latent.shape[1:]), generator=generator)
        positive = clip.encode_from_tokens_scheduled(clip.tokenize(text))
        recorder.view_index = torch.tensor(view_list, dtype=torch.long)
        comfy.sample.sample_custom(patched, noise[view_list], settings.cfg, sampler, plan.sigmas, positive,
                                   negative_cond, latent, callback=step_done, disable_pbar=True, seed=seed)
        if on_progress is not None:  # the maps of this group's first view, with the view under them
            shown = part_maps_of(recorder, view_list[:1], grid, token_groups, (grid * 4, grid * 4),
                                 settings.normalization)
            on_progress(done, total, heat_map_preview(shown, views[view_list[:1], ..., :3])[0])
    recorder.view_index = None
    maps = part_maps_of(recorder, list(range(len(cameras))), grid, token_groups, (map_size, map_size),
                        settings.normalization)
    return PartMaps(maps.float().contiguous(), cameras, tuple(parts), settings.normalization), recorder


def part_maps_of(recorder: AttentionRecorder, view_list: list[int], grid: int, token_groups: list[list[int]],
                 size: tuple[int, int], normalization: str) -> torch.Tensor:
    """(len(view_list), K, H, W) part maps of the views from what the recorder has accumulated so far."""
    token_maps = token_grid(recorder.accumulator.mean()[view_list].cpu(), grid, grid)  # (v, T, g, g)
    if normalization == "probability":
        return probability_part_maps(token_maps, token_groups, size)
    return official_part_maps(token_maps, token_groups, size)


class SD3AttentionCapture(Compose3DNode):
    """DreamBeast's part maps: SD3's attention to each part phrase, read while it denoises each view."""

    @classmethod
    def define_schema(cls) -> io.Schema:
        return io.Schema(
            node_id="Compose3D_SD3AttentionCapture",
            is_output_node=True,  # shows its preview on itself, with the parts' legend
            display_name="SD3 Attention Capture",
            category=f"{CATEGORY}/parts",
            description="Finds where each part phrase of the prompt is in each view: every view is noised and "
                        "denoised by SD3 (SDEdit) with the prompt plus a view word, and the attention its image "
                        "tokens pay to each part's text tokens in the chosen blocks and timesteps becomes one map "
                        "per view and part (DreamBeast). The model passed in is not changed.",
            inputs=[
                io.Model.Input("model", tooltip="An SD3 model (e.g. sd3_medium from Load Checkpoint)."),
                io.Clip.Input("clip", tooltip="SD3's text encoders (the same checkpoint's CLIP)."),
                io.Vae.Input("vae", tooltip="SD3's VAE, to encode the views."),
                io.Image.Input("views", tooltip="Square images of the object (e.g. Render NeRF), one per camera."),
                CamerasType.Input("cameras", tooltip="The cameras of the views, in order; they pick each view's "
                                                     "word (front/side/back) and travel with the maps."),
                io.String.Input("prompt", multiline=True, default="a cat with the wings of an eagle",
                                tooltip="What the object is; the part phrases must be words of it."),
                io.String.Input("parts", default="cat, wings",
                                tooltip="Comma-separated part phrases, each words of the prompt; one map each."),
                io.String.Input("negative", default="",
                                tooltip="Negative prompt for the CFG denoising (DreamBeast: empty)."),
                io.String.Input("blocks", default="11",
                                tooltip="Joint-attention blocks to read, comma-separated (SD3-medium has 24; "
                                        "DreamBeast reads 11)."),
                io.Float.Input("t_low", default=100.0, min=0.0, max=1000.0, step=1.0,
                               tooltip="Read attention at timesteps from this one..."),
                io.Float.Input("t_high", default=450.0, min=0.0, max=1000.0, step=1.0,
                               tooltip="...up to this one (SD3 timesteps, 1000 = pure noise)."),
                io.Float.Input("sdedit_timestep", default=500.0, min=0.0, max=1000.0, step=1.0,
                               tooltip="Above this timestep each step starts from the view noised to it; below "
                                       "it the denoising runs on freely (DreamBeast: 500)."),
                io.Int.Input("steps", default=50, min=1, max=1000, tooltip="Steps of the full sigma schedule."),
                io.Float.Input("cfg", default=7.0, min=0.0, max=100.0, step=0.1, tooltip="Classifier-free guidance."),
                io.Int.Input("resolution", default=1024, min=64, max=4096, step=64,
                             tooltip="The views are resized to this square size for SD3 (SD3-medium: 1024)."),
                io.Int.Input("map_size", default=256, min=8, max=2048, step=8,
                             tooltip="Side of the output maps (DreamBeast upsamples to 256)."),
                io.Combo.Input("normalization", options=list(NORMALIZATIONS), default="official",
                               tooltip="official: DreamBeast's raw scores, min-max per token and part (0..1). "
                                       "probability: exact attention probabilities (softmax over all keys), "
                                       "averaged."),
                io.Combo.Input("text_tokens", options=list(TEXT_TOKENS), default="clip",
                               tooltip="Which text tokens of a phrase to read: the CLIP part of SD3's context "
                                       "(DreamBeast) or also T5's."),
                io.Boolean.Input("view_words", default=True,
                                 tooltip="Add ', front view' / ', side view' / ', back view' from each camera."),
                io.Int.Input("seed", default=0, min=0, max=0xFFFFFFFF, tooltip="The noise added to the views."),
            ],
            outputs=[PartMapsType.Output(display_name="part_maps",
                                         tooltip="One map_size map per view and part phrase, with the cameras "
                                                 "(e.g. for Part-Affinity NeRF)."),
                     io.Image.Output(display_name="preview",
                                     tooltip="Per view, each part's map as a heat map over the view, side by side.")],
        )

    @classmethod
    def execute(cls, model, clip, vae, views, cameras, prompt, parts, negative, blocks, t_low, t_high,
                sdedit_timestep, steps, cfg, resolution, map_size, normalization, text_tokens, view_words,
                seed) -> io.NodeOutput:
        depth = len(check_capture_model(model).joint_blocks)
        for name, t in (("t_low", t_low), ("t_high", t_high)):
            if not 0.0 < t < 1000.0:
                raise ValueError(f"{name}: {t:g} is outside (0, 1000); SD3 timesteps run from 1000 (noise) to 0")
        if t_low > t_high:
            raise ValueError(f"t_low: {t_low:g} is above t_high {t_high:g}; the window is t_low..t_high")
        phrases = parse_phrases(parts, PARTS)
        if not phrases:
            raise ValueError(f"parts: no part phrases; give at least one, e.g. {PARTS.example}")
        settings = CaptureSettings(blocks=parse_blocks(blocks, depth),
                                   t_low=t_low, t_high=t_high, sdedit_timestep=sdedit_timestep, steps=steps,
                                   cfg=cfg, normalization=normalization)
        progress = Progress(1)

        def on_progress(done, total, preview):
            progress.total = total
            progress.update(done, preview)

        maps, _ = capture_part_maps(model, clip, vae, views, cameras, prompt, phrases, negative, settings,
                                    resolution, map_size, seed, text_tokens, view_words, on_progress)
        preview = heat_map_preview(maps.maps, views[..., :3])
        return io.NodeOutput(maps, preview, ui=preview_with_legend(cls, preview, maps.parts, "columns"))
