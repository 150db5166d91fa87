"""The validation layer in-process: input checks against node schemas, socket values, model files."""
from __future__ import annotations

import math

import pytest
import torch
from safetensors.torch import load_file, save_file

from comfy_api.latest import io
from compose3d.kernels.cameras import orbit_cameras
from compose3d.kernels.checks import check_choice, check_file_name
from compose3d.nodes import NODES
from compose3d.nodes.mvdream_model import load_mvdream
from compose3d.nodes.nerf import RenderNeRF
from compose3d.nodes.toy_object import ToyObjectViews as ObjectViewsNode
from compose3d.nodes.validation import (SOCKETS, Compose3DNode, InputError, ModelFileError, check_inputs,
                                        read_model_file)
from harness.inprocess import run_node


@pytest.fixture(scope="module")
def rig():
    return orbit_cameras(views=2, elevation=20.0, azimuth_start=0.0, azimuth_span=360.0, distance=2.5, fov=40.0)


def test_every_node_of_the_pack_is_checked_and_every_socket_type_it_uses_is_known():
    assert all(issubclass(node, Compose3DNode) for node in NODES)
    assert all(getattr(node.execute.__func__, "_compose3d_checked", False) for node in NODES)
    used = {spec.get_io_type() for node in NODES for spec in node.define_schema().inputs}
    assert used - {"INT", "FLOAT", "STRING", "BOOLEAN", "COMBO"} <= set(SOCKETS)


def test_unknown_option_names_the_input_and_lists_the_options(comfy_inprocess, rig):
    with pytest.raises(InputError) as raised:
        run_node(ObjectViewsNode, cameras=rig, width=16, height=16, background="purple")
    assert str(raised.value) == "background: 'purple' is not one of the options: 'white', 'black', 'gray'"
    with pytest.raises(InputError, match=r"^background: True is not one of the options"):
        run_node(ObjectViewsNode, cameras=rig, width=16, height=16, background=True)


@pytest.mark.parametrize("value,message", [
    (float("nan"), "width: expected a whole number, got nan"),
    (2.5, "width: expected a whole number, got 2.5"),
    (True, "width: expected a whole number, got bool True"),
    ("16", "width: expected a whole number, got str '16'"),
    (4, "width: expected a whole number in [8, 4096], got 4"),
    (5000, "width: expected a whole number in [8, 4096], got 5000"),
])
def test_bad_whole_numbers_are_refused_naming_the_input(comfy_inprocess, rig, value, message):
    with pytest.raises(InputError) as raised:
        run_node(ObjectViewsNode, cameras=rig, width=value, height=16, background="white")
    assert str(raised.value) == message


def test_whole_valued_floats_and_numpy_ints_are_taken_as_ints(comfy_inprocess, rig):
    import numpy as np

    checked = check_inputs(ObjectViewsNode, {"cameras": rig, "width": 16.0, "height": np.int64(24),
                                             "background": "gray"})
    assert type(checked["width"]) is int and type(checked["height"]) is int
    assert (checked["width"], checked["height"]) == (16, 24)


@pytest.mark.parametrize("value,message", [
    (float("nan"), "elevation: expected a finite number, got nan"),
    (float("inf"), "elevation: expected a finite number, got inf"),
    (-float("inf"), "elevation: expected a finite number, got -inf"),
    (95.0, "elevation: expected a number in [-89.9, 89.9], got 95"),
    ("high", "elevation: expected a number, got str 'high'"),
])
def test_bad_numbers_are_refused_naming_the_input(comfy_inprocess, value, message):
    from compose3d.nodes.cameras import OrbitCameras

    with pytest.raises(InputError) as raised:
        run_node(OrbitCameras, views=4, elevation=value, azimuth_start=0.0, azimuth_span=360.0, distance=2.0,
                 fov=40.0)
    assert str(raised.value) == message


def test_sockets_take_real_values_and_refuse_others(comfy_inprocess, tiny_models, rig):
    from compose3d.kernels.field import config_for_device
    from compose3d.kernels.nerf import NeRF
    from compose3d.kernels.part_field import PartField
    from compose3d.kernels.part_maps import PartMaps
    from compose3d.kernels.score_mixing import LambdaSchedule

    model, clip, vae = load_mvdream(str(tiny_models.path("checkpoints", tiny_models.mvdream_checkpoint)))
    import comfy.clip_vision

    from compose3d.kernels.ip_adapter import IPAdapter
    from harness.tiny_models import ip_adapter_state_dict

    embeds = comfy.clip_vision.Output()
    embeds["image_embeds"] = torch.randn(1, 768)
    with torch.inference_mode():
        conditioning = clip.encode_from_tokens_scheduled(clip.tokenize("a cat"))
    nerf = NeRF.create(config_for_device("cpu"), device=torch.device("cpu"))
    part_maps = PartMaps(torch.rand(2, 3, 8, 8), rig, ("a", "b", "c"), "exact")
    good = {
        "C3D_CAMERAS": rig, "C3D_NERF": nerf, "C3D_PART_MAPS": part_maps,
        "C3D_PART_FIELD": PartField.on_geometry(nerf, ("a", "b")),
        "IMAGE": torch.rand(2, 8, 8, 3), "MASK": torch.rand(2, 8, 8), "CONDITIONING": conditioning,
        "CLIP": clip, "VAE": vae, "MODEL": model,
        "C3D_LAMBDA_SCHEDULE": LambdaSchedule("linear", 0.3, 0.9), "LATENT": {"samples": torch.zeros(4, 4, 8, 8)},
        "C3D_IP_ADAPTER": IPAdapter.from_state_dict(ip_adapter_state_dict([8], embed_dim=4, cross_dim=8, seed=0)),
        "CLIP_VISION": comfy.clip_vision.load(str(tiny_models.path("clip_vision", tiny_models.clip_vision))),
        "CLIP_VISION_OUTPUT": embeds,
    }
    assert set(good) == set(SOCKETS)
    for io_type, socket in SOCKETS.items():
        assert socket.check(good[io_type]) is None, io_type
        for other, value in good.items():
            if other != io_type and not {other, io_type} <= {"IMAGE", "MASK"}:
                assert socket.check(value) is not None, (io_type, other)
        assert socket.check(5) == "got int 5"
    assert SOCKETS["IMAGE"].check(torch.rand(8, 8, 3)) == ("got a tensor of shape (8, 8, 3); IMAGE batches are "
                                                           "(B, H, W, C)")
    nan_image = torch.rand(1, 4, 4, 3)
    nan_image[0, 1, 2, 0] = math.nan
    assert SOCKETS["IMAGE"].check(nan_image) == "got an image batch holding NaN or infinite values"
    assert SOCKETS["MASK"].check(torch.full((1, 4, 4), math.inf)) == "got a mask holding NaN or infinite values"
    assert SOCKETS["LATENT"].check({"samples": torch.full((1, 4, 8, 8), math.nan)}) == \
        "got a latent holding NaN, infinite or non-float values"
    assert SOCKETS["LATENT"].check({"samples": torch.zeros(4, 8, 8)}) == \
        "got a latent of shape (4, 8, 8); image latents are (B, C, H, W)"
    assert SOCKETS["CONDITIONING"].check([["text", {}]]).startswith("got a list holding")
    nan_embeds = comfy.clip_vision.Output()
    nan_embeds["image_embeds"] = torch.full((1, 768), math.nan)
    assert SOCKETS["CLIP_VISION_OUTPUT"].check(nan_embeds) == \
        "got image embeddings of shape (1, 768) (expected finite (B, E))"
    nan_maps = PartMaps(torch.rand(2, 3, 8, 8), rig, ("a", "b", "c"), "exact")
    nan_maps.maps[0, 1, 2, 3] = math.nan
    assert SOCKETS["C3D_PART_MAPS"].check(nan_maps) == "got part maps holding NaN or infinite values"
    broken = PartMaps(torch.rand(2, 3, 8, 8), rig, ("a", "b", "c"), "exact")
    object.__setattr__(broken, "cameras", rig[:1])  # made by another pack without the constructor's checks
    assert SOCKETS["C3D_PART_MAPS"].check(broken) == "got part maps of 2 views with 1 cameras"


def test_a_constant_where_a_link_belongs_names_the_socket(comfy_inprocess, rig):
    with pytest.raises(InputError) as raised:
        run_node(RenderNeRF, nerf="my nerf", cameras=rig, width=8, height=8, samples_per_ray=0)
    assert str(raised.value) == ("nerf: expected a NeRF (e.g. from NeRF From Views) connected from another node; "
                                 "got str 'my nerf'")
    with pytest.raises(InputError, match=r"^cameras: missing; connect or set it"):
        run_node(ObjectViewsNode, cameras=None, width=16, height=16, background="white")


def test_check_choice_compares_types_so_true_is_not_one():
    assert check_choice("n", 1, [1, 2]) == 1
    with pytest.raises(ValueError, match=r"^n: True is not one of the options: 1, 2$"):
        check_choice("n", True, [1, 2])
    with pytest.raises(ValueError, match=r"^ckpt_name: 'x' cannot be chosen: there is no option to choose from"):
        check_choice("ckpt_name", "x", [])
    with pytest.raises(ValueError, match=r"'o0', 'o1', .* 'o19' \.\.\. and 5 more$"):
        check_choice("n", "x", [f"o{i}" for i in range(25)])


@pytest.mark.parametrize("text", ["Compose3D/mesh", "my mesh-01.v2", "deep/er/folder/name", "ünïcödé/名前"])
def test_ordinary_file_names_pass_stripped(text):
    assert check_file_name("prefix", f"  {text} ") == text


def test_file_name_of_another_type_is_refused():
    with pytest.raises(ValueError, match=r"^prefix: expected text, got int 3$"):
        check_file_name("prefix", 3)


def test_file_name_inputs_are_marked_in_the_schema():
    from compose3d.nodes.mesh import ExportMesh

    marked = [s.id for s in ExportMesh.define_schema().inputs if isinstance(s, io.String.Input)
              and s.as_dict().get("compose3d_file_name")]
    assert marked == ["filename_prefix"]


# ---------------------------------------------------------------------------------------------- model files

@pytest.fixture(scope="module")
def small_safetensors(tmp_path_factory):
    path = tmp_path_factory.mktemp("files") / "small.safetensors"
    save_file({"a": torch.arange(1000, dtype=torch.float32), "b": torch.ones(3, 4)}, str(path),
              metadata={"kind": "test"})
    return path


def test_a_good_safetensors_file_reads_as_safetensors_reads_it(comfy_inprocess, small_safetensors):
    sd, metadata = read_model_file(str(small_safetensors))
    oracle = load_file(str(small_safetensors))
    assert sorted(sd) == sorted(oracle) and all(torch.equal(sd[k], oracle[k]) for k in oracle)
    assert metadata == {"kind": "test"}


@pytest.mark.parametrize("damage,detail", [
    ("empty", "the file is empty (0 bytes)"),
    ("truncated", "not a readable .safetensors file"),
    ("header-cut", "not a readable .safetensors file"),
    ("random", "not a readable .safetensors file"),
    ("pickle-named-safetensors", "not a readable .safetensors file"),
])
def test_a_damaged_safetensors_file_is_named_with_what_to_do(comfy_inprocess, small_safetensors, tmp_path,
                                                             damage, detail):
    data = small_safetensors.read_bytes()
    broken = {"empty": b"", "truncated": data[: len(data) - 100], "header-cut": data[:20],
              "random": bytes(range(256)) * 8}.get(damage)
    path = tmp_path / "model.safetensors"
    if broken is None:
        torch.save({"a": torch.zeros(2)}, path)
    else:
        path.write_bytes(broken)
    with pytest.raises(ModelFileError) as raised:
        read_model_file(str(path))
    message = str(raised.value)
    assert message.startswith(f"model.safetensors: {detail}")
    assert "download or copy it again" in message


def test_a_truncated_pickle_and_a_missing_file_are_named(comfy_inprocess, tmp_path):
    good = tmp_path / "good.pt"
    torch.save({"state_dict": {"w": torch.zeros(100)}}, good)
    sd, metadata = read_model_file(str(good))
    assert list(sd) == ["w"] and metadata is None
    cut = tmp_path / "cut.ckpt"
    cut.write_bytes(good.read_bytes()[:200])
    with pytest.raises(ModelFileError, match=r"^cut\.ckpt: not a readable PyTorch checkpoint \(.*; 200 bytes\)\. "
                                             r"The file is damaged or incomplete"):
        read_model_file(str(cut))
    with pytest.raises(ModelFileError, match=r"^gone\.safetensors: cannot be opened \(No such file or directory\)"):
        read_model_file(str(tmp_path / "gone.safetensors"))
    other = tmp_path / "weights.gguf"
    other.write_bytes(b"GGUF")
    with pytest.raises(ModelFileError, match=r"^weights\.gguf: unknown model file type"):
        read_model_file(str(other))


def test_the_mvdream_loader_names_a_truncated_checkpoint(comfy_inprocess, tiny_models, tmp_path):
    data = tiny_models.path("checkpoints", tiny_models.mvdream_checkpoint).read_bytes()
    path = tmp_path / "half-4view.safetensors"
    path.write_bytes(data[: len(data) // 2])
    with pytest.raises(ModelFileError, match=r"^half-4view\.safetensors: not a readable \.safetensors file "
                                             r"\(.*\d+ bytes\)\. The file is damaged or incomplete"):
        load_mvdream(str(path))
