"""Make-Your-3D's two tuners: identity-aware tuning of a 2D model's image prompt, subject-prior tuning of MVDream.

Identity-aware tuning (``Compose3D_IdentityTuner``): the 2D MODEL with an image-prompt adapter learns the subject
from its multi-views. Each view gets a view-direction prompt ("<prompt>, front view"...); augmented versions of
the views go through the CLIP image encoder; the denoising loss on the views, conditioned on their prompt and on
their own augmented embedding, trains only the adapter's image cross-attention projections (every ``to_k_ip`` /
``to_v_ip``). The UNet, its text cross-attention and the adapter's image projection stay frozen. Output: the
personalised MODEL (the tuned adapter applied with the subject image) and the tuned adapter, also written in the
released layout to ``output/ipadapter`` (listed by Load IP-Adapter).

Subject-prior tuning (``Compose3D_SubjectPriorTuner``): MVDream learns the subject from the personalised outputs
and their cameras. A LoRA on the multi-view self-attention only (``attn1`` q/k/v/out of every transformer block)
is trained with ComfyUI's own weight adapters (``comfy.weight_adapter``, as core's LoRA training) on the
denoising loss of the views as one multi-view object. Optional normal maps (from any normal estimator) are a
second target: the same cameras, the prompt with ", normal map" appended, weighted by ``normal_weight``. Output:
the patched MODEL and the LoRA in ComfyUI's format written to ``output/loras`` (listed by core Load LoRA).

Both run their loop where ComfyUI's sampling would run (:func:`nodes.training.run_loop`), so the MODEL is loaded,
patched and cleaned up by ComfyUI's model management; gradients exist only inside the loop
(:func:`nodes.training.trainable`); the progress bar shows a preview of the current x0 prediction and the loss;
Cancel stops within a step. Neither tuner changes its input MODEL or adapter.

The paper gives no hyper-parameters; the defaults are the usual ones of the methods it builds on (IP-Adapter:
AdamW at 1e-4, weight decay 0.01; LoRA: rank 8, AdamW at 1e-4) with step counts sized for minutes per subject.
"""
from __future__ import annotations

import copy
import json
import logging
import os
import time
from dataclasses import dataclass, field

import torch
from torch import Tensor

import comfy.model_management
import folder_paths
from comfy.weight_adapter.lora import LoRAAdapter
from comfy_api.latest import io

from ..kernels.augment import augment_views
from ..kernels.ip_adapter import IPAdapter
from ..kernels.training import ParamGroup, Step, StepDone, TrainingState, make_optimizer, train
from .common import (Progress, check_interrupt, interrupt_hooks, latent_preview_image, progress_text,
                     with_interrupt_points)
from .ip_adapter import (OUTPUT_ADAPTERS, OUTPUT_LORAS, ImagePrompt, adapter_blocks, apply_image_prompt,
                         check_embeds, image_prompt, register_folders)
from .mvdream_model import MVDreamModel
from .training import denoising_loss, positive_conds, run_loop, trainable
from .types import CAMERA_KEY, CATEGORY, TUNING_REPORT_KEY, VIEWS_KEY, CamerasType, IPAdapterType
from .validation import Compose3DNode, InputError, file_name_input

log = logging.getLogger("compose3d.make_your_3d")

DEFAULT_VIEW_PROMPTS = "front view\nside view\nback view\nside view"  # MVDream's 4-view rig, azimuth 0..270
NORMAL_SUFFIX = "normal map"
#: The module names (inside each transformer block) that the subject-prior LoRA trains: multi-view self-attention.
SELF_ATTENTION_LINEARS = ("attn1.to_q", "attn1.to_k", "attn1.to_v", "attn1.to_out.0")
ENCODE_CHUNK = 16  # images per CLIP-vision call
#: A training step keeps activations (and the frozen weights' per-call copies) for the backward pass: ComfyUI is
#: asked to free memory for this many times the step's batch (its estimate is for inference), so a model loads in
#: lowvram mode rather than running out. Measured on the CPU with real-size SD1.5/MVDream at 256 px: a step grew
#: the process by about 9x ComfyUI's inference estimate for its batch (scripts/bench_make_your_3d.py).
TRAINING_MEMORY_FACTOR = 10


@dataclass
class TuningReport:
    """What one tuning run did (handed to ``model_options[TUNING_REPORT_KEY]`` if set, for tests/benchmarks)."""

    kind: str
    steps: int = 0
    losses: list[float] = field(default_factory=list)
    seconds: float = 0.0
    seconds_per_step: float = 0.0
    peak_memory_bytes: int = 0
    memory_kind: str = ""
    trained_parameters: int = 0
    file: str = ""
    interrupted: bool = False


# ------------------------------------------------------------------------------------------ shared pieces

def check_same_size(**images: Tensor | None) -> None:
    """Refuse IMAGE inputs of different sizes, naming them."""
    given = {k: tuple(v.shape[1:3]) for k, v in images.items() if v is not None}
    if len(set(given.values())) > 1:
        sizes = ", ".join(f"{k} {h}x{w}" for k, (h, w) in given.items())
        raise InputError(f"{next(iter(given))}: the images must all have one size, got {sizes}; resize them "
                         f"(e.g. with core Upscale Image) first")


def check_latent_size(images: Tensor, vae, what: str) -> None:
    ratio = vae.spacial_compression_encode()
    h, w = images.shape[1:3]
    if h % ratio or w % ratio or h < 2 * ratio or w < 2 * ratio:
        raise InputError(f"{what}: {h}x{w} images do not fit the VAE, whose latents are 1/{ratio} of the image: "
                         f"use sides that are multiples of {ratio} (e.g. 256 or 512)")


def encode_latents(vae, model, images: Tensor) -> Tensor:
    """(N, H, W, 3) images -> (N, C, h, w) latents in the MODEL's latent space (posterior mode; CPU, float32)."""
    latents = vae.encode(images[..., :3])
    return model.model.process_latent_in(latents).float().cpu()


def encode_texts(clip, texts: list[str]) -> dict[str, Tensor]:
    """Each distinct text -> its (1, L, C) CLIP context (CPU, float32)."""
    out = {}
    for text in dict.fromkeys(texts):
        cond = clip.encode_from_tokens_scheduled(clip.tokenize(text))
        out[text] = cond[0][0].float().cpu()
    return out


def with_suffix(prompt: str, suffix: str) -> str:
    prompt, suffix = prompt.strip(), suffix.strip()
    return f"{prompt}, {suffix}" if prompt and suffix else prompt or suffix


def draw_sigmas(model, count: int, generator: torch.Generator, t_range: tuple[int, int]) -> Tensor:
    """(count,) noise levels at integer timesteps drawn uniformly from [t_range[0], t_range[1])."""
    t = torch.randint(t_range[0], t_range[1], (count,), generator=generator).float()
    return model.model_sampling.sigma(t)


def output_file(folder: str, prefix: str) -> tuple[str, str]:
    """(absolute path, name relative to ``output/<folder>``) of the next ``<prefix>_00001_.safetensors``."""
    register_folders()
    base = os.path.join(folder_paths.get_output_directory(), folder)
    directory, name, counter, subfolder, _ = folder_paths.get_save_image_path(prefix, base)
    os.makedirs(directory, exist_ok=True)
    file = f"{name}_{counter:05}_.safetensors"
    return os.path.join(directory, file), os.path.join(subfolder, file) if subfolder else file


def _memory_start(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)


def _memory_peak(device: torch.device) -> tuple[int, str]:
    if device.type == "cuda":
        return int(torch.cuda.max_memory_allocated(device)), "GPU allocated"
    import resource

    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024, "process peak RSS"


class Tuning:
    """The loop both tuners share: AdamW over the trained parameters, :func:`kernels.training.train`, a progress
    bar with an x0 preview and the loss, the report."""

    def __init__(self, kind: str, model, steps: int, seed: int):
        self.model = model
        self.steps = steps
        self.seed = seed
        self.report = TuningReport(kind)
        self.progress = Progress(max(steps, 1))
        self.preview_every = max(1, steps // 20)

    def run(self, params: list[torch.nn.Parameter], lr: float, patcher, context: Tensor, latent: Tensor,
            step_body) -> None:
        """Train ``params``: ``step_body(base_model, model_options, step) -> (loss, x0 preview latent)`` computes
        and back-propagates one step's loss (inside :func:`trainable`)."""
        self.report.trained_parameters = sum(p.numel() for p in params)
        device = self.model.load_device
        _memory_start(device)
        start = time.perf_counter()

        def body(guider_model, model_options) -> None:
            base = guider_model.inner_model
            optimizer = make_optimizer([ParamGroup("trained", params, lr)], kind="adamw", betas=(0.9, 0.999),
                                       eps=1e-8, weight_decay=0.01)
            state = TrainingState(optimizer, torch.Generator().manual_seed(self.seed))
            last = {}

            def step_fn(step: Step) -> float:
                with trainable(base.diffusion_model):
                    loss, preview = step_body(base, model_options, step)
                last["preview"] = preview
                return loss

            def finished(done: StepDone[float]) -> None:
                self.report.losses.append(done.result)
                self.report.steps = done.step
                shown = None
                if done.step % self.preview_every == 0 or done.step == self.steps:
                    shown = latent_preview_image(self.model, last["preview"])
                    progress_text(f"step {done.step}/{self.steps}  loss {done.result:.4f}")
                self.progress.update(done.step, shown)

            try:
                train(state, step_fn, self.steps, on_step=finished, check_interrupt=check_interrupt)
            finally:
                optimizer.zero_grad(set_to_none=True)
                del optimizer, state

        try:
            if self.steps > 0:
                run_loop(patcher, [[context, {}]], [[context, {}]], latent, body, self.seed)
        except comfy.model_management.InterruptProcessingException:
            self.report.interrupted = True
            raise
        finally:
            self.report.seconds = time.perf_counter() - start
            self.report.seconds_per_step = self.report.seconds / max(self.report.steps, 1)
            self.report.peak_memory_bytes, self.report.memory_kind = _memory_peak(device)
            for p in params:
                p.grad = None


def _steps_input(default: int, tooltip: str) -> io.Int.Input:
    return io.Int.Input("steps", default=default, min=0, max=100000, tooltip=tooltip)


def _seed_input() -> io.Int.Input:
    return io.Int.Input("seed", default=0, min=0, max=0xFFFFFFFF, control_after_generate=True,
                        tooltip="Seeds the noise, timesteps, view choices and augmentations: a seed repeats a run.")


# --------------------------------------------------------------------------------------- identity tuning

def view_prompts(prompt: str, lines: str, views: int) -> list[str]:
    """The prompt of each view: ``prompt`` + the view's suffix (one suffix per line, repeated over the views)."""
    suffixes = [line.strip() for line in lines.splitlines() if line.strip()] or [""]
    return [with_suffix(prompt, suffixes[i % len(suffixes)]) for i in range(views)]


def encode_images(clip_vision, images: Tensor) -> Tensor:
    """(N, H, W, 3) -> (N, E) ``image_embeds`` with the CLIP vision model (centre crop, as CLIP Vision Encode)."""
    with interrupt_hooks(clip_vision.model):  # a ViT pass takes seconds on a CPU: answer Cancel per layer
        out = [clip_vision.encode_image(images[i:i + ENCODE_CHUNK]).image_embeds.float().cpu()
               for i in range(0, images.shape[0], ENCODE_CHUNK)]
    return torch.cat(out)


def trainable_copy(adapter: IPAdapter, device) -> IPAdapter:
    """A float32 copy of ``adapter`` on ``device`` whose image cross-attention projections require gradients."""
    with torch.inference_mode(False):
        tuned = copy.deepcopy(adapter).to(device=device, dtype=torch.float32)
        tuned.requires_grad_(False)
        for p in tuned.cross_attention_parameters():
            p.requires_grad_(True)
    return tuned


def tune_identity(model, adapter: IPAdapter, clip_vision, vae, clip, subject: Tensor, views: Tensor, prompt: str,
                  prompts_text: str, steps: int, lr: float, batch: int, augmentations: int, weight: float,
                  seed: int) -> tuple[object, IPAdapter, TuningReport]:
    """Identity-aware tuning; returns (personalised MODEL, tuned adapter (CPU), report)."""
    blocks = adapter_blocks(model, adapter)
    subject_embeds = encode_images(clip_vision, subject[..., :3])
    check_embeds(subject_embeds, adapter, "clip_vision")
    check_latent_size(views, vae, "views")

    generator = torch.Generator().manual_seed(seed)
    texts = view_prompts(prompt, prompts_text, views.shape[0])
    contexts = encode_texts(clip, texts)
    latents = encode_latents(vae, model, views)  # (N, C, h, w)
    augmented, source = augment_views(views[..., :3].float().cpu(), augmentations, generator)
    embeds = encode_images(clip_vision, augmented)  # (N * A, E)

    device = model.load_device
    tuned = trainable_copy(adapter, device)
    with torch.inference_mode(False), torch.no_grad():
        tokens = tuned.image_tokens(embeds.to(device))  # (N * A, T, C): the projection is frozen
        blank = tuned.image_tokens(torch.zeros_like(embeds[:1]).to(device))
    prompt_state = ImagePrompt(tuned, tokens[:1], blank, float(weight))
    patched = with_interrupt_points(apply_image_prompt(model, prompt_state, blocks))
    run = Tuning("identity", model, steps, seed)
    count = tokens.shape[0]
    batch = min(batch, count)

    def step_body(base, model_options, step: Step):
        rows = torch.randperm(count, generator=step.generator)[:batch]
        chosen = [int(source[r]) for r in rows]
        x0 = latents[chosen].to(device)
        noise = torch.randn(x0.shape, generator=step.generator).to(device)
        sigmas = draw_sigmas(base, len(chosen), step.generator, (0, _timesteps(base))).to(device)
        groups: dict[int, list[int]] = {}
        for j, v in enumerate(chosen):  # one forward per context length (prompts of one length stack)
            groups.setdefault(contexts[texts[v]].shape[1], []).append(j)
        total, preview = 0.0, None
        for members in groups.values():
            idx = torch.tensor(members)
            context = torch.cat([contexts[texts[chosen[j]]] for j in members]).to(device)
            prompt_state.cond = tokens[rows[idx].to(tokens.device)]
            conds = positive_conds(base, context, x0[idx])
            loss, denoised = denoising_loss(base, model_options, conds, x0[idx], noise[idx], sigmas[idx])
            step.check_interrupt()
            (loss * len(members) / len(chosen)).backward()
            total += float(loss.detach()) * len(members) / len(chosen)
            preview = denoised[0].detach() if preview is None else preview
        return total, preview

    first_context = contexts[texts[0]].to(device)
    latent = torch.zeros((TRAINING_MEMORY_FACTOR * batch,) + tuple(latents.shape[1:]))
    try:
        run.run(tuned.cross_attention_parameters(), lr, patched, first_context, latent, step_body)
    finally:
        with torch.inference_mode(False):
            tuned.requires_grad_(False)
            tuned.to("cpu")
        prompt_state.cond = tokens[:1].detach().cpu()
    personalised = apply_image_prompt(model, image_prompt(tuned, subject_embeds, weight), blocks)
    return personalised, tuned, run.report


def _timesteps(base) -> int:
    return int(getattr(base.model_sampling, "num_timesteps", 1000))


def write_weights(sd: dict[str, Tensor], folder: str, prefix: str, meta: dict) -> str:
    """Write ``sd`` to ``output/<folder>/<prefix>_NNNNN_.safetensors`` with ``meta`` as JSON in the header; returns
    the name the folder's loader lists it under (Load IP-Adapter for ``ipadapter``, core Load LoRA for ``loras``)."""
    from safetensors.torch import save_file

    path, name = output_file(folder, prefix)
    save_file(sd, path, metadata={"compose3d": json.dumps(meta)})
    return name


class IdentityTuner(Compose3DNode):
    """2D MODEL + IP-Adapter + subject multi-views -> personalised MODEL, tuned adapter (also written)."""

    @classmethod
    def define_schema(cls) -> io.Schema:
        return io.Schema(
            node_id="Compose3D_IdentityTuner",
            display_name="Identity Tuner (Make-Your-3D)",
            category=f"{CATEGORY}/make_your_3d",
            description="Identity-aware tuning: teaches a 2D model's image prompt the subject from its multi-views "
                        "(e.g. MVDream sd-v1.5-4view with the subject as image prompt). Only the adapter's image "
                        "cross-attention (to_k_ip/to_v_ip) trains, on the views with view-direction prompts and "
                        "augmented image embeddings; the model and everything else stay frozen. Writes the tuned "
                        "adapter to output/ipadapter (Load IP-Adapter lists it).",
            inputs=[
                io.Model.Input("model", tooltip="The 2D model (SD1.5 family), without the adapter applied."),
                IPAdapterType.Input("ipadapter", tooltip="The image-prompt adapter to tune (a copy is tuned)."),
                io.ClipVision.Input("clip_vision", tooltip="The image encoder the adapter was trained with."),
                io.Vae.Input("vae", tooltip="The 2D model's VAE, to encode the views to latents."),
                io.Clip.Input("clip", tooltip="The 2D model's text encoder, for the view-direction prompts."),
                io.Image.Input("subject", tooltip="The subject photo: the personalised MODEL's image prompt."),
                io.Image.Input("views", tooltip="The subject's multi-views (one batch, one size), e.g. from "
                                                "MVDream with the subject as image prompt."),
                io.String.Input("prompt", default="a photo of the subject", multiline=True,
                                tooltip="What the views show; each view's prompt appends its direction."),
                io.String.Input("view_prompts", default=DEFAULT_VIEW_PROMPTS, multiline=True,
                                tooltip="One direction per line for views 1, 2, ... (repeated if there are more "
                                        "views), appended to the prompt."),
                _steps_input(300, "Optimiser steps (0: the adapter as given)."),
                io.Float.Input("learning_rate", default=1e-4, min=1e-7, max=1.0, step=1e-5,
                               tooltip="AdamW learning rate of the image cross-attention projections."),
                io.Int.Input("batch_size", default=4, min=1, max=64, tooltip="Views per step."),
                io.Int.Input("augmentations", default=4, min=1, max=32,
                             tooltip="Versions of each view for the image encoder (the first is the view "
                                     "itself; the others are cropped, flipped and colour-jittered)."),
                io.Float.Input("weight", default=1.0, min=0.0, max=3.0, step=0.05,
                               tooltip="Image-prompt weight during tuning and in the personalised MODEL."),
                _seed_input(),
                file_name_input("filename_prefix", default="compose3d_identity",
                                tooltip="File name of the tuned adapter inside output/ipadapter."),
            ],
            outputs=[
                io.Model.Output(display_name="MODEL", tooltip="The personalised model: the tuned adapter applied "
                                                              "with the subject image."),
                IPAdapterType.Output(display_name="IPADAPTER", tooltip="The tuned adapter."),
                io.String.Output(display_name="adapter_file", tooltip="Its name in Load IP-Adapter's list."),
            ],
        )

    @classmethod
    def execute(cls, model, ipadapter, clip_vision, vae, clip, subject, views, prompt, view_prompts, steps,
                learning_rate, batch_size, augmentations, weight, seed, filename_prefix) -> io.NodeOutput:
        personalised, tuned, report = tune_identity(model, ipadapter, clip_vision, vae, clip, subject, views,
                                                    prompt, view_prompts, steps, learning_rate, batch_size,
                                                    augmentations, weight, seed)
        meta = {"format": "ip-adapter (basic)", "tuned_by": "Compose3D_IdentityTuner", "steps": report.steps,
                "learning_rate": learning_rate, "seed": seed, "views": int(views.shape[0]), "prompt": prompt}
        report.file = write_weights(tuned.layout_state_dict(), OUTPUT_ADAPTERS, filename_prefix, meta)
        _publish(model, report)
        return io.NodeOutput(personalised, tuned, report.file)


def _publish(model, report: TuningReport) -> None:
    hook = model.model_options.get(TUNING_REPORT_KEY)
    if hook is not None:
        hook(report)
    log.info("%s tuning: %d steps in %.1f s (%.2f s/step), loss %s -> %s", report.kind, report.steps,
             report.seconds, report.seconds_per_step,
             f"{report.losses[0]:.4f}" if report.losses else "-", f"{report.losses[-1]:.4f}" if report.losses else "-")


# ---------------------------------------------------------------------------------- subject-prior tuning

def self_attention_modules(model) -> list[tuple[str, torch.nn.Module]]:
    """(name, module) of every multi-view self-attention projection of the MODEL's UNet, names as
    ``model.model.named_modules()`` gives them (``diffusion_model....attn1.to_q``): the LoRA's targets."""
    return [(name, m) for name, m in model.model.named_modules()
            if name.startswith("diffusion_model.") and name.endswith(SELF_ATTENTION_LINEARS)
            and hasattr(m, "weight_function")]


def lora_state_dict(adapters: dict[str, torch.nn.Module]) -> dict[str, Tensor]:
    """ComfyUI's LoRA format: ``<module>.lora_up.weight`` (out, r), ``<module>.lora_down.weight`` (r, in),
    ``<module>.alpha`` () per module (CPU float32 copies): weight + alpha / r * up @ down."""
    sd = {}
    for name, a in adapters.items():
        sd[f"{name}.lora_up.weight"] = a.lora_up.weight.detach().float().cpu().contiguous()
        sd[f"{name}.lora_down.weight"] = a.lora_down.weight.detach().float().cpu().contiguous()
        sd[f"{name}.alpha"] = a.alpha.detach().float().cpu().reshape(())
    return sd


def check_mvdream(model) -> None:
    if not isinstance(model.model, MVDreamModel):
        raise InputError(f"model: the subject-prior tuner trains MVDream's multi-view self-attention, but this MODEL "
                         f"is {type(model.model).__name__}; load MVDream with 'Load MVDream Checkpoint'")


def tune_subject_prior(model, vae, clip, images: Tensor, cameras, normals: Tensor | None, prompt: str, steps: int,
                       lr: float, rank: int, alpha: float, views_per_step: int, normal_weight: float,
                       seed: int) -> tuple[object, dict[str, Tensor], TuningReport]:
    """Subject-prior tuning; returns (MODEL with the trained LoRA as weight wrappers, LoRA state dict, report)."""
    check_mvdream(model)
    if len(cameras) != images.shape[0]:
        raise InputError(f"cameras: {len(cameras)} cameras for {images.shape[0]} images; give one camera per image "
                         f"(the rig the images were made with)")
    if normals is not None and normals.shape[0] != images.shape[0]:
        raise InputError(f"normals: {normals.shape[0]} normal maps for {images.shape[0]} images; give one per image")
    check_same_size(images=images, normals=normals)
    check_latent_size(images, vae, "images")

    device = model.load_device
    generator = torch.Generator().manual_seed(seed)
    texts = [prompt.strip(), with_suffix(prompt, NORMAL_SUFFIX)]
    contexts = encode_texts(clip, texts)
    latents = encode_latents(vae, model, images)
    normal_latents = None if normals is None else encode_latents(vae, model, normals)
    vectors = cameras.mvdream.detach().float().cpu()
    count = images.shape[0]
    views = min(views_per_step, count)

    patcher = model.clone()
    adapters: dict[str, torch.nn.Module] = {}
    with torch.inference_mode(False):
        for name, m in self_attention_modules(model):
            shape = m.weight.shape
            adapter = LoRAAdapter.create_train(torch.empty(shape), rank=rank, alpha=alpha)
            torch.nn.init.kaiming_uniform_(adapter.lora_up.weight, a=5 ** 0.5, generator=generator)
            adapters[name] = adapter.to(device)
            patcher.add_weight_wrapper(f"{name}.weight", adapters[name])
    params = [p for a in adapters.values() for n, p in a.named_parameters() if n != "alpha"]

    def step_body(base, model_options, step: Step):
        chosen = torch.randperm(count, generator=step.generator)[:views]
        cams = vectors[chosen].to(device)
        sigma = draw_sigmas(base, 1, step.generator, (0, _timesteps(base))).to(device).expand(views)
        targets = [(latents, texts[0], 1.0)]
        if normal_latents is not None and normal_weight > 0:
            targets.append((normal_latents, texts[1], normal_weight))
        total, preview = 0.0, None
        for source, text, w in targets:
            x0 = source[chosen].to(device)
            noise = torch.randn(x0.shape, generator=step.generator).to(device)
            conds = positive_conds(base, contexts[text].to(device), x0, {CAMERA_KEY: cams, VIEWS_KEY: views})
            loss, denoised = denoising_loss(base, model_options, conds, x0, noise, sigma)
            step.check_interrupt()
            (w * loss).backward()
            total += w * float(loss.detach())
            preview = denoised[0].detach() if preview is None else preview
        return total, preview

    run = Tuning("subject-prior", model, steps, seed)
    latent = torch.zeros((TRAINING_MEMORY_FACTOR * views * (2 if normals is not None else 1),)
                         + tuple(latents.shape[1:]))
    try:
        run.run(params, lr, patcher, contexts[texts[0]].to(device), latent, step_body)
    finally:
        with torch.inference_mode(False):
            for a in adapters.values():
                a.requires_grad_(False)
    return patcher, lora_state_dict(adapters), run.report


class SubjectPriorTuner(Compose3DNode):
    """MVDream MODEL + personalised views with cameras -> MODEL with a multi-view self-attention LoRA (written)."""

    @classmethod
    def define_schema(cls) -> io.Schema:
        return io.Schema(
            node_id="Compose3D_SubjectPriorTuner",
            display_name="Subject-Prior Tuner (Make-Your-3D)",
            category=f"{CATEGORY}/make_your_3d",
            description="Subject-prior tuning: teaches MVDream the subject from the personalised model's outputs "
                        "and their cameras. A LoRA on the multi-view self-attention only (attn1 q/k/v/out) trains "
                        "with ComfyUI's weight adapters; the views of a step are one multi-view object. Optional "
                        "normal maps (any normal estimator, same views and cameras) are a second target with the "
                        "prompt + ', normal map'. Writes the LoRA to output/loras (core Load LoRA lists it).",
            inputs=[
                io.Model.Input("model", tooltip="MVDream (from Load MVDream Checkpoint)."),
                io.Vae.Input("vae", tooltip="MVDream's VAE, to encode the images (and normals) to latents."),
                io.Clip.Input("clip", tooltip="MVDream's text encoder."),
                io.Image.Input("images", tooltip="The personalised views (one batch, one size)."),
                CamerasType.Input("cameras", tooltip="One camera per image, in the same order."),
                io.String.Input("prompt", default="a 3D model of the subject", multiline=True,
                                tooltip="What the images show; the normal maps train with ', normal map' appended."),
                _steps_input(300, "Optimiser steps (0: no change)."),
                io.Float.Input("learning_rate", default=1e-4, min=1e-7, max=1.0, step=1e-5,
                               tooltip="AdamW learning rate of the LoRA."),
                io.Int.Input("rank", default=8, min=1, max=256, tooltip="LoRA rank."),
                io.Float.Input("alpha", default=8.0, min=0.01, max=1024.0, step=0.5,
                               tooltip="LoRA alpha: the update is scaled by alpha / rank."),
                io.Int.Input("views_per_step", default=4, min=1, max=16,
                             tooltip="Views trained together as one object per step (MVDream was trained on 4); "
                                     "with more images a random subset is drawn each step."),
                io.Float.Input("normal_weight", default=0.5, min=0.0, max=10.0, step=0.05,
                               tooltip="Weight of the normal-map target (if normals are connected)."),
                _seed_input(),
                file_name_input("filename_prefix", default="compose3d_subject_prior",
                                tooltip="File name of the LoRA inside output/loras."),
                io.Image.Input("normals", optional=True,
                               tooltip="Normal maps of the images (same count, size and cameras), from any "
                                       "normal estimator, as RGB images."),
            ],
            outputs=[
                io.Model.Output(display_name="MODEL", tooltip="MVDream with the trained LoRA."),
                io.String.Output(display_name="lora_name", tooltip="The LoRA's name in core Load LoRA's list."),
            ],
        )

    @classmethod
    def execute(cls, model, vae, clip, images, cameras, prompt, steps, learning_rate, rank, alpha, views_per_step,
                normal_weight, seed, filename_prefix, normals=None) -> io.NodeOutput:
        patched, sd, report = tune_subject_prior(model, vae, clip, images, cameras, normals, prompt, steps,
                                                 learning_rate, rank, alpha, views_per_step, normal_weight, seed)
        meta = {"tuned_by": "Compose3D_SubjectPriorTuner", "targets": "multi-view self-attention (attn1)",
                "rank": rank, "alpha": alpha, "steps": report.steps, "learning_rate": learning_rate, "seed": seed,
                "views": int(images.shape[0]), "normals": normals is not None, "prompt": prompt}
        report.file = write_weights(sd, OUTPUT_LORAS, filename_prefix, meta)
        _publish(model, report)
        return io.NodeOutput(patched, report.file)
