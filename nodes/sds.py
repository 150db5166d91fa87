"""The SDS optimiser node: text to 3D with MVDream's multi-view score distillation (+ Grounded-Dreamer's hybrid).

ComfyUI glue around :mod:`kernels.distill`:

- the MODEL and the VAE load together through ComfyUI's model management: the SDS loop runs as a
  ``comfy.samplers.Sampler`` inside a ``CFGGuider`` (as core's LoRA training does), with the VAE as an additional
  model, so lowvram/offload modes, the MODEL's patches, wrappers and LoRAs all apply;
- each step's prediction goes through ComfyUI's own machinery: the step's cameras are attached to the processed
  conditioning and turned into model inputs by the MODEL's ``extra_conds`` (as ``Compose3D_MVDreamConditioning``
  does), cond and uncond run batched in ``calc_cond_batch``, guidance is ``cfg_function`` (so CFG patches apply);
- encoding keeps gradients (:func:`nodes.training.encode_with_grad`, a posterior sample as MVDream);
- checkpoints (field, background, occupancy grid, optimiser, random stream, step) are safetensors with a JSON
  header, written every N steps, at the end and when the run is interrupted; ``resume_from`` continues one.
"""
from __future__ import annotations

import hashlib
import logging
import os
import resource
import time
from dataclasses import dataclass

import torch

import comfy.model_management
import comfy.samplers
import folder_paths
from comfy_api.latest import io

from ..kernels.background import LearnedBackground
from ..kernels.cameras import orbit_cameras
from ..kernels.part_field import PartField, render_part_maps
from ..kernels.part_maps import colored_preview
from ..kernels.part_modulation import DREAMBEAST_MODULATION_START, DREAMBEAST_STEPS, ModulationSettings
from ..kernels.distill import (BACKGROUND_KINDS, LOSSES, PhaseTimer, References, SDSReport, SDSRun, SDSSettings,
                               StepResult, json_ready, make_background, sds_step, sds_start)
from ..kernels.field import FieldConfig, config_for_device
from ..kernels.nerf import NeRF
from ..kernels.renderer import RenderSettings, render_views
from ..kernels.sds import CameraRanges
from ..kernels.training import (OccupancySchedule, OccupancyUpdates, StepDone, TrainingState, load_optimizer_state,
                                make_optimizer, read_checkpoint, set_learning_rates, train, write_checkpoint)
from ..kernels.reconstruct import nerf_param_groups
from .common import Progress, check_interrupt, compute_device
from .mvdream_model import MVDreamModel
from .nerf import check_views, preview_render
from .part_modulation import PartModulator
from .tokens import PhraseWording, resolve_phrases
from .training import LoopSampler, encode_with_grad
from .types import CAMERA_KEY, CATEGORY, SDS_REPORT_KEY, VIEWS_KEY, CamerasType, NeRFType, PartFieldType
from .validation import Compose3DNode, InputError, file_name_input

log = logging.getLogger("compose3d.sds")

CHECKPOINT_FORMAT = "compose3d.sds_checkpoint/1"
VIEWS_PER_OBJECT = 4  # MVDream's models are trained on 4 views of one object
PREVIEW_SIZE = 128
LEARNED_KINDS = ("learned", "random")  # backgrounds that train a LearnedBackground (see make_background)
PARTS = PhraseWording("parts", "part phrases", "'head, wings, tail'", "the part modulation")


def preview_cameras():
    """The 4 cameras of the progress previews and the ``previews`` output."""
    return orbit_cameras(4, elevation=15.0, distance=2.5, fov=40.0)


# ------------------------------------------------------------------------------------------------ checks

def check_model(model, vae) -> None:
    """Raise InputError unless ``model`` is an MVDream MODEL and ``vae`` encodes into its latent space."""
    if not isinstance(model.model, MVDreamModel):
        raise InputError(f"model: the SDS optimiser needs an MVDream MODEL (from 'Load MVDream Checkpoint'); this "
                         f"is a {type(model.model).__name__}, which has no camera input")
    channels = model.model.latent_format.latent_channels
    vae_channels = getattr(vae, "latent_channels", None)
    if vae_channels != channels:
        raise InputError(f"vae: its latents have {vae_channels} channels but the model denoises {channels}-channel "
                         f"latents; use the VAE of the MVDream checkpoint")


def check_resolutions(vae, sizes: dict[str, int]) -> None:
    ratio = vae.spacial_compression_encode()
    for name, size in sizes.items():
        if size % ratio:
            raise InputError(f"{name}: {size} px is not a multiple of the VAE's downscale factor {ratio}; use e.g. "
                             f"{max(ratio, size // ratio * ratio)} or {(size // ratio + 1) * ratio}")


def check_batches(batches: dict[str, int]) -> None:
    for name, batch in batches.items():
        if batch % VIEWS_PER_OBJECT:
            raise InputError(f"{name}: {batch} is not a multiple of {VIEWS_PER_OBJECT}; each object in a batch is "
                             f"seen by {VIEWS_PER_OBJECT} cameras (MVDream's views)")


def check_references(images, cameras, masks, background: str) -> bool:
    """Raise InputError on an incomplete or inconsistent set of reference views; whether any are given."""
    if images is None and cameras is None and masks is None:
        return False
    if images is None:
        raise InputError("reference_images: missing; reference cameras or masks need the reference views too")
    if cameras is None:
        raise InputError("reference_cameras: missing; reference views need their cameras (e.g. the Orbit Cameras "
                         "that made them)")
    try:
        check_views(images, cameras, masks)
    except ValueError as e:
        raise InputError(f"reference_{e}") from None
    if masks is not None and background in LEARNED_KINDS:
        raise InputError(f"background: with reference masks pick the solid colour behind the reference views "
                         f"(white for MVDream's), not {background!r}")
    return True


def step_slice(steps: int, start_at_step: int, end_at_step: int) -> tuple[int, int]:
    """The steps ``[start, end)`` this node runs of a ``steps``-step schedule (``end_at_step`` past the end means
    the end), as KSampler (Advanced) does; raise InputError when that leaves none."""
    end = min(end_at_step, steps)
    if start_at_step >= end:
        raise InputError(f"start_at_step: {start_at_step} leaves no steps to run (the schedule has {steps} steps and "
                         f"this node stops at step {end}); lower it, or raise steps / end_at_step")
    return start_at_step, end


@dataclass(frozen=True)
class Modulation:
    """The checked part-modulation inputs: the part field, each part's token columns and the settings."""

    part_field: PartField
    parts: list[str]
    token_groups: list[list[int]]
    settings: ModulationSettings

    def config(self) -> dict:
        """JSON-able, for checkpoints (a resume must use the same part field and settings)."""
        return {"parts": self.parts, "tokens": self.token_groups,
                "settings": json_ready(vars(self.settings).copy()),
                "digest": tensor_digest(*(p for p in self.part_field.field.parameters()))}


def check_modulation(part_field, clip, prompt: str, parts: str, settings: ModulationSettings, steps: int,
                     run: tuple[int, int]) -> Modulation | None:
    """Raise InputError on inconsistent part-modulation inputs; the checked modulation, or None when it is off."""
    blank = not parts.strip()
    if part_field is None:
        if not blank:
            raise InputError("part_field: missing; part phrases modulate the attention with a part field (from "
                             "Part-Affinity NeRF). Connect one, or clear 'parts'")
        return None
    if blank:
        raise InputError(f"parts: empty; with a part field give its parts' phrases as they appear in the prompt, "
                         f"in the field's order (this field's parts: {', '.join(part_field.parts)})")
    if clip is None:
        raise InputError("clip: missing; the part modulation needs the CLIP that encoded the prompt, to find the "
                         "part phrases' tokens")
    try:
        found = resolve_phrases(clip, prompt, parts, PARTS)
    except ValueError as e:
        raise InputError(str(e)) from None
    if len(found.phrases) != len(part_field.parts):
        raise InputError(f"parts: {len(found.phrases)} part phrases ({', '.join(found.phrases)}) but the part field "
                         f"has {len(part_field.parts)} parts ({', '.join(part_field.parts)}); give one phrase per "
                         f"part, in the field's order")
    first, stop = settings.window(steps)
    if stop <= run[0] or first >= run[1]:
        raise InputError(f"modulation_start: the modulation window (steps {first}-{stop} of {steps}) lies outside "
                         f"the steps this node runs ({run[0]}-{run[1]}); move the window or the run's steps")
    try:
        columns = found.context_columns()
    except ValueError as e:
        raise InputError(f"clip: {e}") from None
    return Modulation(part_field, found.phrases, columns, settings)


def ranges(low: float, high: float, name: str) -> tuple[float, float]:
    if low > high:
        raise InputError(f"{name}_min: {low:g} is above {name}_max {high:g}")
    return (low, high)


# ------------------------------------------------------------------------------------------------ model glue

class MVDreamPredictor:
    """``predict(x_noisy, sigma, cameras (B, 16), views) -> (x0_cfg, x0_cond)`` through ComfyUI's sampling code."""

    def __init__(self, guider: comfy.samplers.CFGGuider, model_options: dict, guidance: float):
        self.model = guider.inner_model
        self.conds = guider.conds
        self.model_options = model_options
        self.guidance = guidance
        self.device = guider.model_patcher.load_device

    def __call__(self, x_noisy: torch.Tensor, sigma: float, cameras: torch.Tensor, views: int):
        x = x_noisy.to(self.device)
        step = {}
        for kind in ("positive", "negative"):
            entries = [{**c, CAMERA_KEY: cameras, VIEWS_KEY: views} for c in self.conds[kind]]
            step[kind] = comfy.samplers.encode_model_conds(self.model.extra_conds, entries, x, self.device, kind)
        cond, uncond = step["positive"], step["negative"]
        timestep = torch.full((x.shape[0],), sigma, device=self.device, dtype=torch.float32)
        out = comfy.samplers.calc_cond_batch(self.model, [cond, uncond], x, timestep, self.model_options)
        for fn in self.model_options.get("sampler_pre_cfg_function", []):
            out = fn({"conds": [cond, uncond], "conds_out": out, "cond_scale": self.guidance, "timestep": timestep,
                      "input": x, "sigma": timestep, "model": self.model, "model_options": self.model_options})
        x0_cfg = comfy.samplers.cfg_function(self.model, out[0], out[1], self.guidance, x, timestep,
                                             self.model_options, cond, uncond)
        return x0_cfg, out[0]


def part_preview(part_field: PartField, camera, size: int = PREVIEW_SIZE) -> torch.Tensor:
    """(size, size, 3) the part field seen by ``camera``, each part in its colour (next to the RGB preview)."""
    with torch.no_grad():
        maps = render_part_maps(part_field, camera, size, size)
    return colored_preview(maps.maps)[0].to(torch.float32).cpu()


# ------------------------------------------------------------------------------------------------ checkpoints

def checkpoint_tensors(nerf: NeRF, state: TrainingState) -> tuple[dict, dict]:
    tensors = {f"field.{k}": v for k, v in nerf.field.state_dict().items()}
    tensors.update({f"background.{k}": v for k, v in nerf.background.state_dict().items()})
    tensors.update({f"occupancy.{k}": v for k, v in nerf.occupancy.state_dict().items()})
    state_tensors, state_meta = state.to_tensors()
    tensors.update({f"state.{k}": v for k, v in state_tensors.items()})
    return tensors, state_meta


def load_checkpoint_into(nerf: NeRF, state: TrainingState, tensors: dict, state_meta: dict) -> None:
    """Restore a checkpoint's field, background, occupancy grid and training state (call outside inference mode:
    the tensors are copied into ordinary ones, which the optimiser updates in place)."""
    tensors = {k: v.clone() for k, v in tensors.items()}
    for prefix, module in (("field.", nerf.field), ("background.", nerf.background), ("occupancy.", nerf.occupancy)):
        part = {k[len(prefix):]: v for k, v in tensors.items() if k.startswith(prefix)}
        module.load_state_dict(part)
    state.load_tensors({k[len("state."):]: v for k, v in tensors.items() if k.startswith("state.")}, state_meta)


def read_resume(path_text: str, config: dict) -> tuple[dict, dict]:
    """(tensors, meta) of the checkpoint ``path_text`` (relative to the output folder, or absolute), checked to
    belong to a run with ``config``."""
    path = path_text if os.path.isabs(path_text) else os.path.join(folder_paths.get_output_directory(), path_text)
    if not os.path.isfile(path):
        raise InputError(f"resume_from: no checkpoint at '{path_text}' (looked in {path}); give a path relative "
                         f"to the output folder, as the report shows, or leave it empty to start fresh")
    try:
        tensors, meta = read_checkpoint(path)
    except Exception as e:  # noqa: BLE001  (safetensors and JSON errors alike mean "not a checkpoint")
        raise InputError(f"resume_from: '{path_text}' is not a readable SDS checkpoint ({str(e).splitlines()[0]})") \
            from None
    if meta.get("format") != CHECKPOINT_FORMAT:
        raise InputError(f"resume_from: '{path_text}' is not an SDS checkpoint (format {meta.get('format')!r})")
    saved = meta.get("config", {})
    differ = sorted(k for k in set(saved) | set(config) if saved.get(k) != config.get(k))
    if differ:
        shown = "; ".join(f"{k}: saved {saved.get(k)!r}, now {config.get(k)!r}" for k in differ[:6])
        raise InputError(f"resume_from: '{path_text}' was saved by a run with other settings ({shown}); resume "
                         f"with the same settings and inputs, or start fresh")
    return tensors, meta


def tensor_digest(*tensors) -> str:
    h = hashlib.sha1()
    for t in tensors:
        if t is not None:
            h.update(t.detach().float().cpu().contiguous().numpy().tobytes())
    return h.hexdigest()[:16]


# ------------------------------------------------------------------------------------------------ the run

@dataclass
class RunInputs:
    settings: SDSSettings
    references: References | None
    checkpoint_every: int
    checkpoint_prefix: str
    resume: tuple[dict, dict] | None
    config: dict
    start: int = 0
    end: int | None = None  # None: settings.steps
    modulation: Modulation | None = None

    @property
    def stop(self) -> int:
        return self.settings.steps if self.end is None else self.end


def optimise(model, vae, positive, negative, nerf: NeRF, run_in: RunInputs, progress: Progress) -> SDSReport:
    """Train ``nerf`` in place; returns the report. Writes checkpoints; raises what interrupted it."""
    s = run_in.settings
    device = nerf.device
    report = SDSReport(memory_kind="GPU allocated" if device.type == "cuda" else "process peak RSS")
    optimizer = make_optimizer(nerf_param_groups(nerf, s.learning_rate), kind="adamw", weight_decay=s.weight_decay)
    groups = {g["name"]: g["lr"] for g in optimizer.param_groups}
    if "optimizer" in nerf.training and run_in.resume is None:
        try:
            load_optimizer_state(optimizer, nerf.training["optimizer"])  # a continued NeRF keeps its moments
        except ValueError:
            log.info("SDS: the connected NeRF's optimiser state does not fit; starting a fresh one")
        set_learning_rates(optimizer, groups)
        for g in optimizer.param_groups:
            g["weight_decay"] = s.weight_decay
    state = TrainingState(optimizer, torch.Generator().manual_seed(s.seed + run_in.start), run_in.start)
    steps_before = nerf.steps_trained
    if run_in.resume is not None:
        tensors, meta = run_in.resume
        load_checkpoint_into(nerf, state, tensors, meta["state"])
        steps_before = int(meta.get("steps_before", 0))
    timer = PhaseTimer(device)
    timer.attach(optimizer)
    schedule = OccupancySchedule(16, 0 if steps_before > 0 else 64)
    occupancy = OccupancyUpdates(nerf.occupancy, nerf.field.density, nerf.occupancy_threshold(), schedule)
    prefix = run_in.checkpoint_prefix
    preview_every = max(10, (run_in.stop - run_in.start) // 40)
    previews = preview_cameras()
    modulator = None
    if run_in.modulation is not None:
        m = run_in.modulation
        modulator = PartModulator(m.part_field.to(device), m.token_groups, m.settings, s.steps, s.cameras.views)

    def save(step: int) -> None:
        tensors, state_meta = checkpoint_tensors(nerf, state)
        relative = f"{prefix}_{step:06d}.safetensors"
        path = os.path.join(folder_paths.get_output_directory(), relative)
        os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
        meta = {"format": CHECKPOINT_FORMAT, "config": run_in.config, "state": state_meta,
                "steps_before": steps_before, "field": nerf.field.config.to_dict(),
                "samples_per_ray": nerf.render.samples_per_ray}
        write_checkpoint(path, tensors, meta)
        report.checkpoints.append(relative)

    def body(guider, model_options) -> None:
        if modulator is not None:
            model_options = modulator.model_options(guider.inner_model.diffusion_model, model_options)
        predictor = MVDreamPredictor(guider, model_options, s.guidance)
        sampling = guider.inner_model.model_sampling
        run = SDSRun(nerf, s,
                     encode=lambda images, gen: encode_with_grad(vae, images, model=model, generator=gen),
                     predict=predictor,
                     sigma_of=lambda t: float(sampling.sigma(torch.tensor(float(t)))),
                     timesteps=int(getattr(sampling, "num_timesteps", 1000)),
                     references=run_in.references, timer=timer, skip_empty=schedule.skips_empty,
                     before_predict=None if modulator is None else modulator.prepare)

        def finished(done: StepDone[StepResult]) -> None:
            r = done.result
            if r.sds is not None:
                report.sds_losses.append(r.sds)
            if r.reference is not None:
                report.reference_losses.append(r.reference)
            report.steps += 1
            if run_in.checkpoint_every and done.step % run_in.checkpoint_every == 0 and done.step < run_in.stop:
                save(done.step)
            preview = None
            if done.step % preview_every == 0 or done.step == run_in.stop:
                camera = previews[(done.step // preview_every) % 4]
                preview = preview_render(nerf, camera, PREVIEW_SIZE)
                if modulator is not None:
                    preview = torch.cat([preview.cpu(), part_preview(modulator.part_field, camera)], dim=1)
            progress.update(done.step - run_in.start, preview)

        nerf.field.train()
        try:
            train(state, lambda step: sds_step(run, step), run_in.stop - state.step, occupancy=occupancy,
                  on_step=finished, check_interrupt=check_interrupt)
        finally:
            nerf.field.eval()

    patcher = model.clone()
    patcher.set_additional_models("compose3d_sds_vae", [vae.patcher])
    guider = comfy.samplers.CFGGuider(patcher)
    guider.set_conds(positive, negative)
    guider.set_cfg(s.guidance)
    size, batch = s.resolution().largest()
    ratio = vae.spacial_compression_encode()
    channels = model.model.latent_format.latent_channels
    latent = torch.zeros(batch, channels, size // ratio, size // ratio)
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    start = time.perf_counter()
    try:
        guider.sample(latent, latent, LoopSampler(body), torch.tensor([1.0, 0.0]), seed=s.seed)
    except comfy.model_management.InterruptProcessingException:
        report.interrupted = True
        if run_in.checkpoint_every:
            save(state.step)
        log.info("SDS interrupted at step %d; checkpoint %s", state.step,
                 report.checkpoints[-1] if report.checkpoints else "(none)")
        raise
    finally:
        report.seconds = time.perf_counter() - start
        report.phases = dict(timer.totals)
        if device.type == "cuda":
            report.peak_memory_bytes = torch.cuda.max_memory_allocated(device)
        else:
            report.peak_memory_bytes = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
        nerf.training = {"steps": steps_before + state.step - run_in.start, "optimizer": optimizer.state_dict()}
        if modulator is not None:
            report.modulated_steps = modulator.stats.steps
    if run_in.checkpoint_every:
        save(state.step)
    return report


# ---------------------------------------------------------------------------------------------------- node

def _float(id: str, default: float, low: float, high: float, step: float, tooltip: str, **kw):
    return io.Float.Input(id, default=default, min=low, max=high, step=step, tooltip=tooltip, **kw)


class SDSOptimizer(Compose3DNode):
    """MVDream multi-view SDS: text to a NeRF, optionally warm-started from reference views (Grounded-Dreamer)."""

    @classmethod
    def define_schema(cls) -> io.Schema:
        return io.Schema(
            node_id="Compose3D_SDSOptimizer",
            display_name="SDS Optimizer (MVDream)",
            category=f"{CATEGORY}/sds",
            description="Optimises a NeRF so that MVDream, shown 4 renders at random cameras, finds them likely "
                        "for the prompt (multi-view score distillation). Defaults are MVDream's: 10,000 steps, "
                        "guidance 50, 64 px x 8 views then 256 px x 4, annealed timesteps. With reference views "
                        "(e.g. from the Refocus Sampler) it first fits them, then lets SDS refine from a lower "
                        "noise level while their weight decays (Grounded-Dreamer's hybrid). With a part field "
                        "(DreamBeast) the part maps rendered at each step's cameras modulate MVDream's cross- and "
                        "self-attention inside a step window. Checkpoints go to the output folder; 'resume_from' "
                        "continues one after a Cancel.",
            inputs=[
                io.Model.Input("model", tooltip="An MVDream MODEL (Load MVDream Checkpoint); its patches and LoRAs "
                                                "apply."),
                io.Vae.Input("vae", tooltip="The VAE of the MVDream checkpoint."),
                io.Conditioning.Input("positive", tooltip="The prompt, plain text conditioning (the node attaches "
                                                          "each step's cameras)."),
                io.Conditioning.Input("negative", tooltip="The negative prompt."),
                io.Int.Input("seed", default=0, min=0, max=0xFFFFFFFF,
                             tooltip="Field initialisation, cameras, timesteps and noise."),
                io.Int.Input("steps", default=10000, min=1, max=100000,
                             tooltip="Optimisation steps (MVDream: 10,000). Schedules scale with it."),
                _float("guidance_scale", 50.0, 1.0, 200.0, 0.5, "Classifier-free guidance (MVDream: 50)."),
                io.Combo.Input("loss", options=list(LOSSES), default="x0_reconstruction",
                               tooltip="x0_reconstruction: MVDream's loss on the denoised latents with std "
                                       "rescale; classic: DreamFusion's w(t)(eps_hat - eps)."),
                _float("std_rescale", 0.5, 0.0, 1.0, 0.01, "x0_reconstruction: blend towards the guided x0 "
                       "rescaled to the unguided std (MVDream: 0.5; 0 turns it off)."),
                _float("t_start", 0.98, 0.02, 0.98, 0.01, "Timestep range at step 0, as a fraction of the "
                       "training timesteps (min and max both start here)."),
                _float("t_min_end", 0.02, 0.01, 0.98, 0.01, "Lowest timestep fraction after annealing."),
                _float("t_max_end", 0.5, 0.01, 0.98, 0.01, "Highest timestep fraction after annealing."),
                _float("anneal_fraction", 0.8, 0.0, 1.0, 0.01, "The range anneals linearly over this fraction of "
                       "the steps (MVDream: 8,000 of 10,000)."),
                io.Int.Input("low_resolution", default=64, min=16, max=1024, step=8,
                             tooltip="Render size of the first phase (px)."),
                io.Int.Input("low_batch", default=8, min=4, max=64, step=4,
                             tooltip="Views per step in the first phase (4 per object)."),
                io.Int.Input("high_resolution", default=256, min=16, max=1024, step=8,
                             tooltip="Render size of the second phase (px)."),
                io.Int.Input("high_batch", default=4, min=4, max=64, step=4,
                             tooltip="Views per step in the second phase."),
                _float("high_from", 0.5, 0.0, 1.0, 0.01, "Fraction of the steps after which the second phase "
                       "starts (MVDream: 5,000 of 10,000)."),
                _float("elevation_min", 0.0, -80.0, 80.0, 1.0, "Camera elevation range (degrees)."),
                _float("elevation_max", 30.0, -80.0, 80.0, 1.0, "Camera elevation range (degrees)."),
                _float("fov_min", 15.0, 1.0, 120.0, 1.0, "Vertical field of view range (degrees)."),
                _float("fov_max", 60.0, 1.0, 120.0, 1.0, "Vertical field of view range (degrees)."),
                _float("distance_min", 0.8, 0.01, 100.0, 0.01, "Camera distance range, scaled by 1/tan(fov/2) so "
                       "the object keeps its size in the image."),
                _float("distance_max", 1.0, 0.01, 100.0, 0.01, "Camera distance range (see distance_min)."),
                _float("learning_rate", 0.01, 1e-5, 1.0, 0.0001, "AdamW step size of the hash grid; MLPs and "
                       "background use a tenth (MVDream: 0.01 / 0.001)."),
                _float("orientation_weight", 0.0, 0.0, 1000.0, 0.01, "Penalty on surfaces facing away from the "
                       "camera (normals by finite differences; costs extra density evaluations)."),
                _float("sparsity_weight", 0.0, 0.0, 1000.0, 0.01, "Penalty on opacity: keeps empty space empty."),
                _float("opaque_weight", 0.0, 0.0, 1000.0, 0.01, "Pushes each ray to be fully empty or opaque."),
                io.Combo.Input("background", options=list(BACKGROUND_KINDS), default="learned",
                               tooltip="learned: a small network of the view direction (MVDream); random: a "
                                       "random colour each step; or a fixed colour."),
                io.Int.Input("samples_per_ray", default=64, min=8, max=1024,
                             tooltip="Samples along each ray inside the box."),
                io.Int.Input("checkpoint_every", default=1000, min=0, max=100000,
                             tooltip="Write a checkpoint every N steps (also at the end and on Cancel); 0: never."),
                file_name_input("checkpoint_prefix", default="compose3d/sds",
                                tooltip="Checkpoint files: <prefix>_<step>.safetensors in the output folder."),
                io.String.Input("resume_from", default="",
                                tooltip="A checkpoint to continue (path relative to the output folder, as the "
                                        "report shows). Needs the same settings and inputs. Empty: start fresh."),
                NeRFType.Input("nerf", optional=True, tooltip="Continue training this NeRF instead of a new one."),
                io.Image.Input("reference_images", optional=True,
                               tooltip="Grounded-Dreamer: reference views to keep (e.g. the Refocus Sampler's 4)."),
                CamerasType.Input("reference_cameras", optional=True, tooltip="One camera per reference view."),
                io.Mask.Input("reference_masks", optional=True, tooltip="Object masks of the reference views."),
                _float("reference_fit", 0.2, 0.0, 1.0, 0.01, "Fraction of the steps that fit the reference views "
                       "alone before SDS enters."),
                _float("reference_weight_start", 1000.0, 0.0, 1e6, 1.0, "Reference loss weight when SDS enters."),
                _float("reference_weight_end", 100.0, 0.0, 1e6, 1.0, "Reference loss weight at the last step "
                       "(linear decay)."),
                _float("warm_start_max_t", 0.5, 0.02, 0.98, 0.01, "With references: SDS timesteps never exceed "
                       "this fraction, so SDS refines the fitted views instead of repainting them."),
                io.Int.Input("start_at_step", default=0, min=0, max=100000,
                             tooltip="Run the schedule from this step (as KSampler Advanced): continue a NeRF "
                                     "where an earlier SDS node stopped, with the same steps, so timesteps and "
                                     "resolutions carry on (DreamBeast: plain to 1000, then a second node from "
                                     "1000)."),
                io.Int.Input("end_at_step", default=100000, min=1, max=100000,
                             tooltip="Stop at this step of the schedule (beyond 'steps': run to the end)."),
                PartFieldType.Input("part_field", optional=True,
                                    tooltip="DreamBeast: a Part-Affinity NeRF. Its part maps, rendered at each "
                                            "step's cameras, steer MVDream's attention towards the parts."),
                io.Clip.Input("clip", optional=True, tooltip="With a part field: the CLIP that encoded the prompt "
                                                             "(to find the part phrases' tokens)."),
                io.String.Input("prompt", default="", multiline=True,
                                tooltip="With a part field: the positive prompt's text, exactly as encoded (link "
                                        "one text to both)."),
                io.String.Input("parts", default="",
                                tooltip="With a part field: comma-separated phrases of the prompt, one per part of "
                                        "the field, in its order (e.g. 'head, wings, tail')."),
                _float("cross_strength", 0.6, 0.0, 10.0, 0.05, "Cross-attention: each part's tokens gain "
                       "strength x log(m / mean m) where the part map m is (DreamBeast: 0.6; 0 turns it off)."),
                _float("self_strength", 1.2, 0.0, 10.0, 0.05, "Self-attention across the views: tokens gain "
                       "strength x log(part affinity) towards tokens of the same part (DreamBeast: 1.2; 0 off)."),
                _float("modulation_start", round(DREAMBEAST_MODULATION_START / DREAMBEAST_STEPS, 4), 0.0, 1.0,
                       0.0001, "The modulation starts at this fraction of the steps (DreamBeast: step 3020 of "
                       "7000)."),
                _float("modulation_end", 1.0, 0.0, 1.0, 0.0001, "The modulation stops at this fraction of the "
                       "steps (1: at the end)."),
            ],
            outputs=[NeRFType.Output(display_name="nerf", tooltip="The optimised NeRF, for Render NeRF, Export Mesh "
                                                                  "or further training."),
                     io.Image.Output(display_name="previews", tooltip="4 renders around the result."),
                     io.String.Output(display_name="report", tooltip="Time per step and per phase, peak memory, "
                                                                     "losses and the last checkpoint.")],
        )

    @classmethod
    def execute(cls, model, vae, positive, negative, seed, steps, guidance_scale, loss, std_rescale, t_start,
                t_min_end, t_max_end, anneal_fraction, low_resolution, low_batch, high_resolution, high_batch,
                high_from, elevation_min, elevation_max, fov_min, fov_max, distance_min, distance_max,
                learning_rate, orientation_weight, sparsity_weight, opaque_weight, background, samples_per_ray,
                checkpoint_every, checkpoint_prefix, resume_from, reference_fit, reference_weight_start,
                reference_weight_end, warm_start_max_t, start_at_step=0, end_at_step=100000, prompt="", parts="",
                cross_strength=0.6, self_strength=1.2,
                modulation_start=DREAMBEAST_MODULATION_START / DREAMBEAST_STEPS, modulation_end=1.0, nerf=None,
                reference_images=None, reference_cameras=None, reference_masks=None, part_field=None,
                clip=None) -> io.NodeOutput:
        check_model(model, vae)
        check_resolutions(vae, {"low_resolution": low_resolution, "high_resolution": high_resolution})
        check_batches({"low_batch": low_batch, "high_batch": high_batch})
        if t_min_end > t_max_end:
            raise InputError(f"t_min_end: {t_min_end:g} is above t_max_end {t_max_end:g}")
        has_refs = check_references(reference_images, reference_cameras, reference_masks, background)
        run_steps = step_slice(steps, start_at_step, end_at_step)
        if modulation_start >= modulation_end:
            raise InputError(f"modulation_start: {modulation_start:g} is not before modulation_end "
                             f"{modulation_end:g}")
        modulation = check_modulation(part_field, clip, prompt, parts,
                                      ModulationSettings(cross_strength, self_strength, modulation_start,
                                                         modulation_end), steps, run_steps)
        if reference_masks is not None and reference_masks.ndim == 2:
            reference_masks = reference_masks[None]
        cameras = CameraRanges(ranges(elevation_min, elevation_max, "elevation"), ranges(fov_min, fov_max, "fov"),
                               ranges(distance_min, distance_max, "distance"), True, VIEWS_PER_OBJECT)
        settings = SDSSettings(
            steps=steps, guidance=guidance_scale, loss=loss, std_rescale=std_rescale, t_min=(t_start, t_min_end),
            t_max=(t_start, t_max_end), anneal_fraction=anneal_fraction, low_resolution=low_resolution,
            low_batch=low_batch, high_resolution=high_resolution, high_batch=high_batch, high_from_fraction=high_from,
            cameras=cameras, learning_rate=learning_rate, orientation_weight=orientation_weight,
            sparsity_weight=sparsity_weight, opaque_weight=opaque_weight, background=background,
            samples_per_ray=samples_per_ray, seed=seed)
        references = None
        if has_refs:
            references = References(reference_images.clone().float(), reference_cameras,
                                    None if reference_masks is None else reference_masks.clone().float(),
                                    fit_fraction=reference_fit, weight_start=reference_weight_start,
                                    weight_end=reference_weight_end, warm_max_t=warm_start_max_t)
            if sds_start(settings, references) >= steps:
                log.warning("SDS: reference_fit %.2f of %d steps leaves no SDS steps", reference_fit, steps)
        device = compute_device()
        config = settings.to_config()
        config["references"] = None if references is None else {
            "digest": tensor_digest(references.images, references.cameras.c2w, references.masks),
            **json_ready({k: getattr(references, k) for k in ("fit_fraction", "weight_start", "weight_end",
                                                               "warm_max_t", "rays_per_step", "mask_weight")})}
        config["run"] = list(run_steps)
        config["modulation"] = None if modulation is None else modulation.config()
        config["nerf"] = None if nerf is None else {"steps_trained": nerf.steps_trained,
                                                    "digest": tensor_digest(nerf.field.encoding.table)}
        resume = read_resume(resume_from.strip(), config) if resume_from.strip() else None

        with torch.inference_mode(False), torch.enable_grad():
            if nerf is not None:
                result = nerf.clone().to(device)
                result.render = RenderSettings(samples_per_ray, result.render.chunk_rays)
                # a learned background keeps its training; a solid one is the colour picked now
                if background not in LEARNED_KINDS or not isinstance(result.background, LearnedBackground):
                    result.background = make_background(background, seed).to(device)
            else:
                field_config = config_for_device(device.type)
                if resume is not None:
                    field_config = FieldConfig(**resume[1]["field"])
                result = NeRF.create(field_config, background=make_background(background, seed),
                                     render=RenderSettings(samples_per_ray=samples_per_ray), device=device, seed=seed)
            run_in = RunInputs(settings, references, checkpoint_every, checkpoint_prefix, resume, config,
                               *run_steps, modulation)
            progress = Progress(run_steps[1] - run_steps[0])
            if resume is not None:
                progress.update(int(resume[1]["state"]["step"]) - run_steps[0])
            report = optimise(model, vae, positive, negative, result, run_in, progress)
        receiver = model.model_options.get(SDS_REPORT_KEY)
        if callable(receiver):
            receiver(report)
        log.info("%s", report.text())
        previews = render_views(result.field, result.background, preview_cameras(), PREVIEW_SIZE, PREVIEW_SIZE,
                                result.render, result.occupancy, with_normals=False)
        return io.NodeOutput(result, previews["features"].clamp(0, 1), report.text())
