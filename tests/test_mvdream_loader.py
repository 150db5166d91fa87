"""The MVDream loader on files in the released layouts, on pickles, and on broken checkpoints."""
from __future__ import annotations

import pathlib

import pytest
import torch
from safetensors.torch import load_file, save_file

from compose3d.nodes.mvdream import MVDreamLoader
from compose3d.nodes.mvdream_model import CheckpointError, load_mvdream
from compose3d.nodes.validation import InputError, ModelFileError
from harness.inprocess import run_node
from harness.tiny_models import mvdream_checkpoint_state_dict


class CodeOnUnpickle:
    """Unpickling this object creates the marker file (a stand-in for arbitrary code)."""

    def __init__(self, marker: pathlib.Path):
        self.marker = marker

    def __reduce__(self):
        return (pathlib.Path.touch, (self.marker,))


@pytest.fixture(scope="module")
def released_sd21(tiny_models):
    return load_file(str(tiny_models.path("checkpoints", tiny_models.mvdream_checkpoint)))


def unet_weight(model, key: str) -> torch.Tensor:
    return model.model.diffusion_model.state_dict()[key]


def test_pickled_checkpoint_loads_as_tensors_and_equals_the_safetensors(comfy_inprocess, tmp_path, released_sd21):
    path = tmp_path / "sd-v2.1-base-4view.pt"
    torch.save(dict(released_sd21), path)  # MVDream's release: a pickled state dict
    with torch.inference_mode():
        model, clip, vae = load_mvdream(str(path))
    for key in ("camera_embed.2.weight", "input_blocks.0.0.weight",
                "output_blocks.7.1.transformer_blocks.0.attn1.to_q.weight"):
        torch.testing.assert_close(unet_weight(model, key), released_sd21["model.diffusion_model." + key].float())
    # a {"state_dict": ...} wrapper (Lightning checkpoints) is unwrapped
    wrapped = tmp_path / "wrapped.ckpt"
    torch.save({"state_dict": dict(released_sd21), "epoch": 3}, wrapped)
    with torch.inference_mode():
        model2, _, _ = load_mvdream(str(wrapped))
    torch.testing.assert_close(unet_weight(model2, "camera_embed.0.bias"), unet_weight(model, "camera_embed.0.bias"))


def test_sd15_4view_layout_loads_with_clip_l(comfy_inprocess, tmp_path):
    import comfy.supported_models

    path = tmp_path / "sd-v1.5-4view.safetensors"
    save_file(mvdream_checkpoint_state_dict("sd15", seed=15), str(path))
    with torch.inference_mode():
        model, clip, vae = load_mvdream(str(path))
        cond = clip.encode_from_tokens_scheduled(clip.tokenize("a cat"))
    assert isinstance(model.model.model_config, comfy.supported_models.SD15)
    assert clip.tokenizer.clip_name == "l" and cond[0][0].shape == (1, 77, 64)
    assert model.model.diffusion_model.camera_embed[0].weight.shape == (256, 16)


def test_pickle_that_would_run_code_is_refused_without_running_it(comfy_inprocess, tmp_path, released_sd21):
    marker = tmp_path / "code-ran"
    evil = tmp_path / "evil.pt"
    torch.save({"state_dict": {"model.diffusion_model.camera_embed.0.weight": torch.zeros(2)},
                "payload": CodeOnUnpickle(marker)}, evil)
    assert not marker.exists()
    with pytest.raises(ModelFileError) as err:
        load_mvdream(str(evil))
    assert not marker.exists()  # nothing of the pickle ran
    message = str(err.value)
    assert message.startswith("evil.pt: refused to load")
    assert "weights_only=True" in message and "scripts/convert_to_safetensors.py" in message


def test_missing_and_unexpected_keys_are_named(comfy_inprocess, tmp_path, released_sd21):
    sd = dict(released_sd21)
    gone = "model.diffusion_model.output_blocks.7.1.transformer_blocks.0.attn2.to_v.weight"
    del sd[gone]
    sd["model.diffusion_model.extra_block.weight"] = torch.zeros(3)
    path = tmp_path / "broken.safetensors"
    save_file(sd, str(path))
    with pytest.raises(CheckpointError) as err:
        load_mvdream(str(path))
    message = str(err.value)
    assert message.startswith("broken.safetensors: not a complete MVDream checkpoint")
    assert f"missing 1 UNet key(s): {gone}" in message
    assert "unexpected 1 UNet key(s): model.diffusion_model.extra_block.weight" in message


def test_keys_outside_every_part_are_named_and_ldm_schedule_buffers_are_ignored(comfy_inprocess, tmp_path,
                                                                                  released_sd21):
    sd = dict(released_sd21)
    sd["alphas_cumprod"] = torch.linspace(1, 0, 1000)  # LDM checkpoints carry the DDPM schedule: not an error
    path = tmp_path / "with_schedule.safetensors"
    save_file(sd, str(path))
    with torch.inference_mode():
        load_mvdream(str(path))
    for extra, part in [("cond_stage_model.model.visual.proj", "text encoder"), ("mystery", "checkpoint")]:
        save_file({**sd, extra: torch.zeros(2)}, str(path))
        with pytest.raises(CheckpointError, match=f"unexpected 1 {part} key\\(s\\): {extra}"):
            load_mvdream(str(path))


def test_missing_vae_and_text_encoder_keys_are_named(comfy_inprocess, tmp_path, released_sd21):
    for gone, part in [("first_stage_model.taesd_decoder.14.conv.2.weight", "VAE"),
                       ("cond_stage_model.model.ln_final.weight", "text encoder")]:
        sd = dict(released_sd21)
        del sd[gone]
        path = tmp_path / "partial.safetensors"
        save_file(sd, str(path))
        with pytest.raises(CheckpointError, match=f"missing 1 {part} key"):
            load_mvdream(str(path))
    sd = {k: v for k, v in released_sd21.items() if k != "first_stage_model.taesd_decoder.1.weight"}
    save_file(sd, str(path))
    with pytest.raises(CheckpointError, match="not a VAE ComfyUI recognises"):
        load_mvdream(str(path))


def test_plain_sd_checkpoint_is_rejected_with_a_pointer_to_the_core_loader(comfy_inprocess, tiny_models):
    with pytest.raises(CheckpointError, match=r"no 'model\.diffusion_model\.camera_embed\.\*' weights.*"
                                              r"core 'Load Checkpoint' node"):
        run_node(MVDreamLoader, ckpt_name=tiny_models.sd15_checkpoint)


def test_file_that_is_not_a_checkpoint_gets_a_clear_error(comfy_inprocess, tmp_path):
    junk = tmp_path / "junk.pt"
    junk.write_bytes(b"not a pickle at all")
    with pytest.raises(ModelFileError,
                       match=r"^junk\.pt: not a readable PyTorch checkpoint .*download or copy it again"):
        load_mvdream(str(junk))


def test_a_checkpoint_name_that_is_not_in_the_folder_is_named_with_the_files_there(comfy_inprocess, tiny_models):
    with pytest.raises(InputError, match=r"^ckpt_name: 'nope-4view.safetensors' is not one of the options: .*"
                                         + tiny_models.mvdream_checkpoint):
        run_node(MVDreamLoader, ckpt_name="nope-4view.safetensors")
