"""Mixed-score sampling (seed 003): views from a multi-view model and a 2D model denoising together.

At each model call the guider evaluates both models' CFG predictions on the same latent batch and returns the
denoised estimate of the mixed score (:mod:`kernels.score_mixing`):

    eps_mix = lambda(t) * eps_mv + (1 - lambda(t)) * eps_2d  (+ w * (eps_mv - eps_mv_single))

The multi-view model (MVDream) sees the batch as objects of V views attending to each other; the 2D model sees
every view as an image of its own. Each model runs through ComfyUI's own ``sampling_function`` with its own
conditionings, CFG and model options, so its cond and uncond halves are batched as usual. ``eps_mv_single`` is
the multi-view model with cross-view attention off (:data:`types.SINGLE_VIEW_OPTION`).

Model management: the guider's ModelPatcher is a clone of the multi-view MODEL carrying the 2D MODEL as an
additional model, so ComfyUI's ``prepare_sampling`` loads both in one ``load_models_gpu`` call (lowvram and
offloading apply to both) and ``cleanup_models`` cleans both up. The 2D model gets what ``CFGGuider`` gives its
own model: hooks registered, ``pre_run``/``cleanup``, conds processed by its own ``BaseModel`` and a clone of its
model options.

Where lambda is 1 (0) and the consistency weight 0, only the multi-view (2D) model runs and its prediction is
returned unchanged, so such steps are exactly plain sampling with that model.
"""
from __future__ import annotations

import logging
from dataclasses import dataclass

import torch
from torch import Tensor

import comfy.hooks
import comfy.model_management
import comfy.model_patcher
import comfy.model_sampling
import comfy.sample
import comfy.sampler_helpers
import comfy.samplers
import comfy.utils
import latent_preview
from comfy_api.latest import io

from ..kernels.score_mixing import (KINDS, LambdaSchedule, consistency_eps, denoised_from_eps, eps_from_denoised,
                                    mix_eps, parse_points, plot_schedule)
from .types import CAMERA_KEY, CATEGORY, SINGLE_VIEW_OPTION, LambdaScheduleType
from .validation import Compose3DNode, InputError

log = logging.getLogger("compose3d.mixed_score")

#: Key of the 2D model among the guider's additional models.
ADDITIONAL_KEY = "compose3d_mixed_score_2d"
#: Default schedule: the seed gives no numbers, only "lambda small early, rising as t falls".
DEFAULT_START, DEFAULT_END = 0.3, 0.9
DEFAULT_POINTS = "0: 0.9, 500: 0.6, 1000: 0.3"


# ---------------------------------------------------------------------------------------------------- checks

def _prediction(sampling) -> str:
    for cls in type(sampling).__mro__:
        if cls.__name__ in ("EPS", "V_PREDICTION", "EDM", "CONST", "X0", "IMG_TO_IMG"):
            return {"EPS": "eps-prediction", "V_PREDICTION": "v-prediction"}.get(cls.__name__, cls.__name__)
    return type(sampling).__name__


def _schedule_text(sigmas: Tensor) -> str:
    return f"{len(sigmas)} sigmas from {float(sigmas[0]):.4g} to {float(sigmas[-1]):.4g}"


def check_pair(mv_model, model_2d) -> None:
    """Refuse model pairs that cannot share one sampling loop: another latent space or another noise schedule.

    Raises:
        InputError: naming ``model_2d``, which property differs and how.
    """
    lf_mv, lf_2d = mv_model.model.latent_format, model_2d.model.latent_format
    if (type(lf_mv) is not type(lf_2d) or lf_mv.latent_channels != lf_2d.latent_channels
            or lf_mv.scale_factor != lf_2d.scale_factor):
        raise InputError(
            f"model_2d: its latent space ({type(lf_2d).__name__}, {lf_2d.latent_channels} channels, scale "
            f"{lf_2d.scale_factor:g}) is not the multi-view model's ({type(lf_mv).__name__}, "
            f"{lf_mv.latent_channels} channels, scale {lf_mv.scale_factor:g}). Both models must denoise the same "
            f"latents: pair MVDream sd-v2.1-base-4view or sd-v1.5-4view with an SD1.x or SD2.x model.")
    ms_mv, ms_2d = mv_model.get_model_object("model_sampling"), model_2d.get_model_object("model_sampling")
    for name, ms in (("mv_model", ms_mv), ("model_2d", ms_2d)):
        if not isinstance(ms, comfy.model_sampling.EPS) or not hasattr(ms, "sigmas"):
            raise InputError(f"{name}: a {_prediction(ms)} model with a {type(ms).__name__} schedule; mixed-score "
                             f"sampling mixes eps- or v-prediction models on SD's discrete noise schedule.")
    a, b = ms_mv.sigmas.float().cpu(), ms_2d.sigmas.float().cpu()
    if a.shape != b.shape or not torch.allclose(a, b, rtol=1e-4, atol=1e-6):
        raise InputError(
            f"model_2d: its noise schedule ({_schedule_text(b)}) is not the multi-view model's ({_schedule_text(a)}). "
            f"The two scores can only be mixed at the same noise level: use models trained on one schedule (SD1.x "
            f"and SD2.x share it) and no sampling patch on only one of them.")


def _context_width(model) -> int | None:
    config = getattr(model.model, "model_config", None)
    return None if config is None else config.unet_config.get("context_dim")


def check_conditioning(name: str, conditioning, model, which: str, cameras: bool) -> None:
    """The conditioning's text width fits ``model``; with ``cameras`` it must carry MVDream cameras."""
    width = _context_width(model)
    for tensor, extras in conditioning:
        if width is not None and tensor.shape[-1] != width:
            raise InputError(f"{name}: a conditioning {tensor.shape[-1]} wide, but the {which} model reads "
                             f"{width}-wide text; encode the prompt with that model's own CLIP.")
        if cameras and CAMERA_KEY not in extras:
            raise InputError(f"{name}: no cameras; route the multi-view model's conditioning through "
                             f"'MVDream Conditioning' so it generates one view per camera.")


def camera_count(conditioning) -> int:
    """Cameras (views of one object, or of several objects) in the multi-view conditioning."""
    return int(conditioning[0][1][CAMERA_KEY].shape[0])


def check_batch(name: str, batch: int, cameras: int) -> None:
    if batch % cameras:
        raise InputError(f"{name}: a batch of {batch} latents is not a multiple of the {cameras} cameras of the "
                         f"multi-view conditioning; set the latent batch size to {cameras} (one object) or a "
                         f"multiple of it.")


# ---------------------------------------------------------------------------------------------------- guider

@dataclass(frozen=True)
class MixSettings:
    schedule: LambdaSchedule
    cfg_mv: float = 7.5
    cfg_2d: float = 7.5
    consistency: float = 0.0  # weight of eps_consis


class MixedScoreGuider(comfy.samplers.CFGGuider):
    """A GUIDER (for SamplerCustomAdvanced) whose prediction is the mixed score of a multi-view and a 2D model.

    ``predict_noise(x (B, C, H, W), sigma (B,)) -> x0 (B, C, H, W)``: B is a multiple of the cameras in the
    multi-view conditioning.
    """

    def __init__(self, mv_model, model_2d, settings: MixSettings):
        super().__init__(mv_model.clone())
        self.model_patcher.set_additional_models(ADDITIONAL_KEY, [model_2d])
        self.model_2d = model_2d
        self.settings = settings
        self.original_conds_2d: dict = {}
        self.lambdas: list[tuple[float, float]] = []  # (t, lambda) of each model call of the last run

    def set_conds(self, positive, negative, positive_2d=None, negative_2d=None):
        super().set_conds(positive, negative)
        self.cameras = camera_count(positive)
        if positive_2d is not None:
            self.original_conds_2d = {k: comfy.sampler_helpers.convert_cond(v)
                                      for k, v in (("positive", positive_2d), ("negative", negative_2d))}

    def set_cfg(self, cfg):  # CFGGuider's single CFG is the multi-view model's
        self.settings = MixSettings(self.settings.schedule, float(cfg), self.settings.cfg_2d,
                                    self.settings.consistency)

    # -- sampling run: the 2D model gets what CFGGuider gives its own model ------------------------------------

    def sample(self, noise, latent_image, sampler, sigmas, denoise_mask=None, callback=None, disable_pbar=False,
               seed=None):
        check_batch("latent_image", noise.shape[0], self.cameras)
        model_2d = self.model_2d
        conds = {k: [c.copy() for c in v] for k, v in self.original_conds_2d.items()}
        comfy.samplers.preprocess_conds_hooks(conds)
        options = comfy.model_patcher.create_model_options_clone(model_2d.model_options)
        hook_mode = model_2d.hook_mode
        try:
            if comfy.samplers.get_total_hook_groups_in_conds(conds) <= 1:
                model_2d.hook_mode = comfy.hooks.EnumHookMode.MinVram
            comfy.sampler_helpers.prepare_model_patcher(model_2d, conds, options)
            comfy.samplers.filter_registered_hooks_on_conds(conds, options)
            self.conds_2d, self.options_2d = conds, options
            self.lambdas = []
            return super().sample(noise, latent_image, sampler, sigmas, denoise_mask, callback, disable_pbar, seed)
        finally:
            comfy.samplers.cast_to_load_options(options, device=model_2d.offload_device)
            model_2d.hook_mode = hook_mode
            model_2d.restore_hook_patches()
            self.conds_2d = self.options_2d = None

    def inner_sample(self, noise, latent_image, device, sampler, sigmas, denoise_mask, callback, disable_pbar, seed,
                     latent_shapes=None):
        model_2d = self.model_2d
        base_2d = model_2d.model
        latent = latent_image
        if latent_image is not None and torch.count_nonzero(latent_image) > 0:
            latent = base_2d.process_latent_in(latent_image)
        comfy.samplers.cast_to_load_options(self.options_2d, device=device, dtype=model_2d.model_dtype())
        self.conds_2d = comfy.samplers.process_conds(base_2d, noise, self.conds_2d, device, latent, denoise_mask,
                                                     seed, latent_shapes=latent_shapes)
        self.options_2d.setdefault("transformer_options", {})["sample_sigmas"] = sigmas
        model_2d.pre_run()
        try:
            return super().inner_sample(noise, latent_image, device, sampler, sigmas, denoise_mask, callback,
                                        disable_pbar, seed, latent_shapes=latent_shapes)
        finally:
            model_2d.cleanup()

    # -- one model call ------------------------------------------------------------------------------------------

    def predict_noise(self, x, timestep, model_options={}, seed=None):
        s = self.settings
        t = float(self.inner_model.model_sampling.timestep(timestep[:1].float()).flatten()[0])
        lam = s.schedule(t)
        self.lambdas.append((t, lam))
        weight = s.consistency
        need_mv, need_2d = lam > 0.0 or weight != 0.0, lam < 1.0
        x0_mv = x0_2d = None
        if need_mv:
            x0_mv = comfy.samplers.sampling_function(self.inner_model, x, timestep, self.conds.get("negative"),
                                                     self.conds.get("positive"), s.cfg_mv, model_options, seed)
        if need_2d:
            x0_2d = comfy.samplers.sampling_function(self.model_2d.model, x, timestep, self.conds_2d.get("negative"),
                                                     self.conds_2d.get("positive"), s.cfg_2d, self.options_2d, seed)
        if weight == 0.0 and not need_2d:
            return x0_mv  # plain multi-view sampling
        if weight == 0.0 and not need_mv:
            return x0_2d  # plain 2D sampling of each view
        sigma = timestep.to(x.dtype)
        if bool((sigma <= 0).any()):  # eps is undefined at sigma 0; the x0 form of the same mixture
            return self._mix_denoised(x, x0_mv, x0_2d, lam, weight, timestep, model_options, seed)
        eps_mv = eps_from_denoised(x, x0_mv, sigma)
        eps_2d = eps_from_denoised(x, x0_2d, sigma) if need_2d else torch.zeros_like(x)
        consis = None
        if weight != 0.0:
            x0_single = self._single_view(x, timestep, model_options, seed)
            consis = consistency_eps(eps_mv, eps_from_denoised(x, x0_single, sigma))
        return denoised_from_eps(x, mix_eps(eps_mv, eps_2d, lam, consis, weight), sigma)

    def _single_view(self, x, timestep, model_options, seed):
        """The multi-view model's CFG prediction with every view attending to itself only."""
        options = dict(model_options)
        options["transformer_options"] = {**model_options.get("transformer_options", {}), SINGLE_VIEW_OPTION: True}
        return comfy.samplers.sampling_function(self.inner_model, x, timestep, self.conds.get("negative"),
                                                self.conds.get("positive"), self.settings.cfg_mv, options, seed)

    def _mix_denoised(self, x, x0_mv, x0_2d, lam, weight, timestep, model_options, seed):
        out = lam * x0_mv + (1.0 - lam) * (x0_2d if x0_2d is not None else torch.zeros_like(x))
        if weight != 0.0:
            out = out + weight * (x0_mv - self._single_view(x, timestep, model_options, seed))
        return out


def make_guider(mv_model, model_2d, mv_positive, mv_negative, positive_2d, negative_2d, settings: MixSettings
                ) -> MixedScoreGuider:
    """Check the inputs (errors name them) and build the guider."""
    check_pair(mv_model, model_2d)
    if settings.consistency != 0.0:
        from .mvdream_model import MVDreamUNet

        if not isinstance(mv_model.model.diffusion_model, MVDreamUNet):
            raise InputError("consistency: the consistency term needs an MVDream mv_model (its single-view pass "
                             "turns MVDream's cross-view attention off); set it to 0 for this model.")
    check_conditioning("mv_positive", mv_positive, mv_model, "multi-view", cameras=True)
    check_conditioning("mv_negative", mv_negative, mv_model, "multi-view", cameras=True)
    check_conditioning("positive_2d", positive_2d, model_2d, "2D", cameras=False)
    check_conditioning("negative_2d", negative_2d, model_2d, "2D", cameras=False)
    if camera_count(mv_positive) != camera_count(mv_negative):
        raise InputError(f"mv_negative: {camera_count(mv_negative)} cameras, but mv_positive has "
                         f"{camera_count(mv_positive)}; give both the same camera rig.")
    guider = MixedScoreGuider(mv_model, model_2d, settings)
    guider.set_conds(mv_positive, mv_negative, positive_2d, negative_2d)
    return guider


# ---------------------------------------------------------------------------------------------------- nodes

def _model_inputs() -> list:
    return [
        io.Model.Input("mv_model", tooltip="The multi-view model (MVDream): its views attend to each other, which "
                                           "keeps them consistent."),
        io.Model.Input("model_2d", tooltip="A 2D model on the same latents and noise schedule (SD1.x or SD2.x, "
                                           "eps or v prediction): it sees each view as an image of its own and "
                                           "brings its richer textures."),
        io.Conditioning.Input("mv_positive", tooltip="The multi-view model's positive prompt, through 'MVDream "
                                                     "Conditioning' (one camera per view)."),
        io.Conditioning.Input("mv_negative", tooltip="The multi-view model's negative prompt, with the same cameras."),
        io.Conditioning.Input("positive_2d", tooltip="The 2D model's positive prompt, encoded with its own CLIP."),
        io.Conditioning.Input("negative_2d", tooltip="The 2D model's negative prompt."),
        LambdaScheduleType.Input("lambda_schedule", tooltip="lambda(t), the multi-view share of the score at each "
                                                            "timestep (from 'Lambda Schedule')."),
        io.Float.Input("cfg_mv", default=7.5, min=0.0, max=100.0, step=0.1, round=0.01,
                       tooltip="CFG scale of the multi-view model (MVDream samples with 7.5-10)."),
        io.Float.Input("cfg_2d", default=7.5, min=0.0, max=100.0, step=0.1, round=0.01,
                       tooltip="CFG scale of the 2D model."),
        io.Float.Input("consistency", default=0.0, min=-10.0, max=10.0, step=0.05,
                       tooltip="Weight of the consistency term eps_mv(all views) - eps_mv(each view alone). 0 "
                               "skips it; any other value costs one more multi-view pass per step."),
    ]


class LambdaScheduleNode(Compose3DNode):
    @classmethod
    def define_schema(cls) -> io.Schema:
        return io.Schema(
            node_id="Compose3D_LambdaSchedule",
            display_name="Lambda Schedule (mixed score)",
            category=f"{CATEGORY}/mixed_score",
            description="lambda(t) for mixed-score sampling: the share of the multi-view model in the score at "
                        "timestep t (1 = only the multi-view model, 0 = only the 2D model). The paper keeps "
                        "lambda small early (high t) and raises it as t falls. The preview plots the curve over "
                        "the sampling run, from t = 1000 (pure noise, left) to t = 0 (right).",
            inputs=[
                io.Combo.Input("kind", options=list(KINDS), default="linear",
                               tooltip="constant: 'start' everywhere; linear or cosine: from 'start' at t = 1000 to "
                                       "'end' at t = 0; piecewise: straight lines through 'points'."),
                io.Float.Input("start", default=DEFAULT_START, min=0.0, max=1.0, step=0.01,
                               tooltip="lambda at t = 1000, the first step (the constant's value)."),
                io.Float.Input("end", default=DEFAULT_END, min=0.0, max=1.0, step=0.01,
                               tooltip="lambda at t = 0, the last step (linear and cosine)."),
                io.String.Input("points", default=DEFAULT_POINTS,
                                tooltip="For 'piecewise': 't: lambda' pairs with t increasing in [0, 1000], "
                                        "lambda in [0, 1]; held at the end values outside them."),
            ],
            outputs=[LambdaScheduleType.Output(display_name="lambda_schedule", tooltip="The schedule, for the "
                                                                                         "mixed-score guider or sampler."),
                     io.Image.Output(display_name="preview", tooltip="The curve lambda(t).")],
        )

    @classmethod
    def execute(cls, kind: str, start: float, end: float, points: str) -> io.NodeOutput:
        parsed = parse_points(points) if kind == "piecewise" else ()
        schedule = LambdaSchedule(kind, start, end, parsed)
        return io.NodeOutput(schedule, plot_schedule(schedule)[None])


class MixedScoreGuiderNode(Compose3DNode):
    @classmethod
    def define_schema(cls) -> io.Schema:
        return io.Schema(
            node_id="Compose3D_MixedScoreGuider",
            display_name="Mixed-Score Guider",
            category=f"{CATEGORY}/mixed_score",
            description="A GUIDER for SamplerCustomAdvanced (any sampler and scheduler): at each step the multi-view "
                        "and the 2D model denoise the same views and their scores are mixed, eps = lambda(t) eps_mv "
                        "+ (1 - lambda(t)) eps_2d: consistency from the multi-view model, texture from the 2D model. "
                        "Both models load together through ComfyUI's model management. The latent batch must be a "
                        "multiple of the cameras.",
            inputs=_model_inputs(),
            outputs=[io.Guider.Output(display_name="GUIDER", tooltip="The mixed-score guider, for "
                                                                     "SamplerCustomAdvanced.")],
        )

    @classmethod
    def execute(cls, mv_model, model_2d, mv_positive, mv_negative, positive_2d, negative_2d, lambda_schedule,
                cfg_mv: float, cfg_2d: float, consistency: float) -> io.NodeOutput:
        settings = MixSettings(lambda_schedule, cfg_mv, cfg_2d, consistency)
        return io.NodeOutput(make_guider(mv_model, model_2d, mv_positive, mv_negative, positive_2d, negative_2d,
                                         settings))


class MixedScoreSampler(Compose3DNode):
    @classmethod
    def define_schema(cls) -> io.Schema:
        return io.Schema(
            node_id="Compose3D_MixedScoreSampler",
            display_name="Mixed-Score DDIM Sampler",
            category=f"{CATEGORY}/mixed_score",
            description="Mixed-score sampling in one node: DDIM (eta 0) over 'steps' uniformly spaced timesteps, "
                        "each step denoised by the multi-view and the 2D model mixed by lambda(t). The same as "
                        "Mixed-Score Guider + SamplerCustomAdvanced with the 'ddim' sampler and the 'ddim_uniform' "
                        "scheduler.",
            inputs=_model_inputs() + [
                io.Latent.Input("latent_image", tooltip="Empty latents, one per view: a batch of as many (or a "
                                                        "multiple of as many) latents as cameras."),
                io.Int.Input("seed", default=0, min=0, max=0xFFFFFFFF, control_after_generate=True,
                             tooltip="Seed of the starting noise."),
                io.Int.Input("steps", default=50, min=1, max=1000, tooltip="DDIM steps (MVDream uses 50)."),
            ],
            outputs=[io.Latent.Output(display_name="LATENT", tooltip="The sampled views (decode with the VAE).")],
        )

    @classmethod
    def execute(cls, mv_model, model_2d, mv_positive, mv_negative, positive_2d, negative_2d, lambda_schedule,
                cfg_mv: float, cfg_2d: float, consistency: float, latent_image, seed: int, steps: int
                ) -> io.NodeOutput:
        settings = MixSettings(lambda_schedule, cfg_mv, cfg_2d, consistency)
        guider = make_guider(mv_model, model_2d, mv_positive, mv_negative, positive_2d, negative_2d, settings)
        check_batch("latent_image", latent_image["samples"].shape[0], guider.cameras)
        samples = mixed_ddim(guider, latent_image, seed, steps)
        out = latent_image.copy()
        out["samples"] = samples
        return io.NodeOutput(out)


def mixed_ddim(guider: MixedScoreGuider, latent: dict, seed: int, steps: int) -> Tensor:
    """DDIM (eta 0) sampling of ``latent`` with ``guider``, as SamplerCustomAdvanced runs it: (B, C, H, W)."""
    patcher = guider.model_patcher
    latent_image = comfy.sample.fix_empty_latent_channels(patcher, latent["samples"])
    noise = comfy.sample.prepare_noise(latent_image, seed, latent.get("batch_index"))
    sigmas = comfy.samplers.calculate_sigmas(patcher.get_model_object("model_sampling"), "ddim_uniform", steps)
    sampler = comfy.samplers.sampler_object("ddim")
    callback = latent_preview.prepare_callback(patcher, sigmas.shape[-1] - 1)
    samples = guider.sample(noise, latent_image, sampler, sigmas, denoise_mask=latent.get("noise_mask"),
                            callback=callback, disable_pbar=not comfy.utils.PROGRESS_BAR_ENABLED, seed=seed)
    log.info("mixed-score DDIM: %d steps, %s", steps, guider.settings.schedule.describe())
    return samples.to(comfy.model_management.intermediate_device())
