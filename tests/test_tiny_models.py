"""The tiny test models load through ComfyUI's real loaders and run a forward pass."""
from __future__ import annotations

import torch
from safetensors import safe_open


def load_checkpoint(tiny_models, name):
    """What core CheckpointLoaderSimple does: comfy.sd.load_checkpoint_guess_config on a checkpoints file."""
    import comfy.sd
    import folder_paths

    path = folder_paths.get_full_path_or_raise("checkpoints", name)
    model, clip, vae, _ = comfy.sd.load_checkpoint_guess_config(
        path, output_vae=True, output_clip=True, embedding_directory=folder_paths.get_folder_paths("embeddings"))
    return model, clip, vae


def denoise_once(model, latent, context, **extra):
    """One model call at a mid-range sigma through ComfyUI's sampling wrapper: returns denoised x0."""
    import comfy.model_management

    comfy.model_management.load_models_gpu([model])
    sigma = model.model.model_sampling.percent_to_sigma(0.5)
    sigmas = torch.full((latent.shape[0],), float(sigma))
    with torch.inference_mode():
        return model.model.apply_model(latent, sigmas, c_crossattn=context, **extra)


def test_tiny_sd3_checkpoint_is_detected_as_sd3_and_denoises(comfy_inprocess, tiny_models):
    import comfy.latent_formats
    import comfy.model_base
    import comfy.supported_models

    model, clip, vae = load_checkpoint(tiny_models, tiny_models.sd3_checkpoint)
    assert type(model.model) is comfy.model_base.SD3
    assert type(model.model.model_config) is comfy.supported_models.SD3
    assert isinstance(model.model.latent_format, comfy.latent_formats.SD3)
    # The tiny checkpoint carries CLIP-L only: an SD3 CLIP whose context is CLIP-L's 768 channels padded to 4096.
    tokens = clip.tokenize("a cat with wings", return_word_ids=True)
    assert set(tokens) == {"l", "g", "t5xxl"}
    context, pooled = clip.encode_from_tokens(clip.tokenize("a cat with wings"), return_pooled=True)
    assert context.shape == (1, 77, 4096) and pooled.shape == (1, 2048)
    assert torch.all(context[..., 768:] == 0) and bool((context[0, 1, :768] != context[0, 2, :768]).any())
    latent = torch.randn(2, 16, 16, 16, generator=torch.Generator().manual_seed(0))
    x0 = denoise_once(model, latent, torch.randn(2, 7, 4096), y=torch.randn(2, 2048))
    assert x0.shape == latent.shape and torch.isfinite(x0).all()
    with torch.inference_mode():
        image = vae.decode(latent[:1])
    assert image.shape == (1, 128, 128, 3) and float(image.min()) >= 0.0 and float(image.max()) <= 1.0


def test_tiny_sd3_diffusion_model_loads_through_the_unet_loader(comfy_inprocess, tiny_models):
    import comfy.model_base
    import comfy.sd
    import folder_paths

    path = folder_paths.get_full_path_or_raise("diffusion_models", tiny_models.sd3_diffusion_model)
    model = comfy.sd.load_diffusion_model(path)
    assert type(model.model) is comfy.model_base.SD3
    assert model.model.diffusion_model.depth == 2  # joint blocks


def test_tiny_sd15_checkpoint_is_detected_as_sd15_and_denoises(comfy_inprocess, tiny_models):
    import comfy.model_base
    import comfy.supported_models

    model, clip, vae = load_checkpoint(tiny_models, tiny_models.sd15_checkpoint)
    assert type(model.model.model_config) is comfy.supported_models.SD15
    assert model.model.model_type == comfy.model_base.ModelType.EPS
    latent = torch.randn(2, 4, 8, 8, generator=torch.Generator().manual_seed(1))
    x0 = denoise_once(model, latent, torch.randn(2, 77, 768))
    assert x0.shape == latent.shape and torch.isfinite(x0).all()
    with torch.inference_mode():
        image = vae.decode(latent)
        pixels = vae.encode(image)
    assert image.shape == (2, 64, 64, 3)
    assert pixels.shape == (2, 4, 8, 8)


def test_tiny_mvdream_checkpoint_has_the_released_key_layout(tiny_models):
    path = tiny_models.path("checkpoints", tiny_models.mvdream_checkpoint)
    with safe_open(str(path), "pt") as f:
        keys = set(f.keys())
        shapes = {k: tuple(f.get_slice(k).get_shape()) for k in keys if "camera_embed" in k}
    assert shapes == {  # Linear(16, D), SiLU, Linear(D, D), D = 4 x 64 base channels
        "model.diffusion_model.camera_embed.0.weight": (256, 16),
        "model.diffusion_model.camera_embed.0.bias": (256,),
        "model.diffusion_model.camera_embed.2.weight": (256, 256),
        "model.diffusion_model.camera_embed.2.bias": (256,),
    }
    # SD2.1's UNet layout (4 levels of one res-block: input blocks 0..7, output blocks 0..7), the OpenCLIP text tower, a VAE.
    assert {"model.diffusion_model.time_embed.0.weight", "model.diffusion_model.input_blocks.7.0.in_layers.2.weight",
            "model.diffusion_model.output_blocks.7.1.transformer_blocks.0.attn2.to_k.weight",
            "cond_stage_model.model.token_embedding.weight", "cond_stage_model.model.positional_embedding",
            "cond_stage_model.model.transformer.resblocks.1.attn.in_proj_weight",
            "cond_stage_model.model.text_projection"} <= keys
    assert any(k.startswith("first_stage_model.") for k in keys)


def test_tiny_models_are_reproducible(tmp_path, tiny_models):
    from harness.tiny_models import build_tiny_models, file_digest

    again = build_tiny_models(tmp_path)
    for folder, name in [("checkpoints", tiny_models.sd15_checkpoint), ("checkpoints", tiny_models.sd3_checkpoint),
                         ("checkpoints", tiny_models.mvdream_checkpoint)]:
        assert file_digest(again.path(folder, name)) == file_digest(tiny_models.path(folder, name))
        # SD3's CLIP-L has a fixed real size in ComfyUI (246 MB in float16); everything else stays tiny.
        limit = 260e6 if name == tiny_models.sd3_checkpoint else 40e6
        assert again.path(folder, name).stat().st_size < limit
