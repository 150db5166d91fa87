"""The pack's one validation layer: every node's inputs are checked against the node's own schema before it runs,
and model files are opened through one function.

Why the pack needs it: ComfyUI 0.3.75 checks a prompt's constants for range and type, but it does not check the
values of V3 dropdowns (an unknown option reached the node as a bare ``KeyError``), lets NaN through its range
checks (``nan < min`` is false), and checks nothing at all for values that arrive through links (an INT from a
math node, an IMAGE from another pack) or for constants given where a socket expects a link.

How nodes use it: subclass :class:`Compose3DNode` instead of ``io.ComfyNode`` and write ``define_schema`` and
``execute`` as usual. Before ``execute`` runs, :func:`check_inputs` checks every input against the schema:

* INT: a whole number inside [min, max]; FLOAT: a finite number inside [min, max];
* COMBO: one of the node's own options (the message lists them);
* STRING: text; inputs made with :func:`file_name_input` must also be usable as a file name in the output
  folder (no control characters, no absolute path, no ``..``) and reach ``execute`` stripped;
* BOOLEAN: true or false;
* sockets: a value of the socket's type (:data:`SOCKETS`), e.g. a camera rig for ``C3D_CAMERAS`` or a finite
  (B, H, W, C) tensor for ``IMAGE``; a constant sent where a link belongs is refused.

Every message starts with the input's name, says what was expected and what came, so ComfyUI shows e.g.
``format: 'gltf' is not one of the options: 'glb', 'obj', 'ply'``. Problems are raised as
:class:`InputError` (a ValueError) when the node runs, for constants and linked values alike.
"""
from __future__ import annotations

import functools
import logging
import math
import os
import pickle
from dataclasses import dataclass
from numbers import Integral, Real
from typing import Any, Callable

import torch

from comfy_api.latest import io

from ..kernels.cameras import Cameras
from ..kernels.ip_adapter import IPAdapter
from ..kernels.checks import check_choice, check_file_name
from ..kernels.nerf import NeRF
from ..kernels.part_field import PartField
from ..kernels.part_maps import PartMaps
from ..kernels.score_mixing import LambdaSchedule

log = logging.getLogger("compose3d.validation")

#: Key in a STRING input's options (and so in /object_info) marking text that becomes a file name.
FILE_NAME_KEY = "compose3d_file_name"


class InputError(ValueError):
    """An input of a node is unusable; the message starts with the input's name and says what to do."""


class ModelFileError(ValueError):
    """A model file cannot be read; the message names the file and says what to do."""


# --------------------------------------------------------------------------------------------------- sockets

@dataclass(frozen=True)
class Socket:
    """What a value arriving at a socket of one type must be."""

    description: str  # what the user should connect, e.g. "a camera rig (e.g. from Orbit Cameras)"
    check: Callable[[Any], str | None]  # None if the value is usable, else what is wrong with it


def _instance_of(kind: Callable[[], type]) -> Callable[[Any], str | None]:
    def check(value):
        expected = kind()
        return None if isinstance(value, expected) else f"got {_describe(value)}"
    return check


def _float_tensor(kinds: str, layout: str, one: str, shape_ok: Callable[[torch.Size], bool]):
    """A check for tensors of ``layout`` (e.g. IMAGE batches (B, H, W, C)) holding finite floats."""
    def check(value) -> str | None:
        if not isinstance(value, torch.Tensor):
            return f"got {_describe(value)}"
        if not shape_ok(value.shape) or 0 in value.shape:
            return f"got a tensor of shape {tuple(value.shape)}; {kinds} are {layout}"
        if not value.is_floating_point():
            return f"got a {value.dtype} tensor; {kinds} are floating point in [0, 1]"
        if not bool(torch.isfinite(value).all()):
            return f"got {one} holding NaN or infinite values"
        return None
    return check


def _conditioning(value) -> str | None:
    """CONDITIONING: a non-empty list of [tensor (B, L, C), dict]."""
    if not isinstance(value, list) or not value:
        return f"got {_describe(value)}"
    for entry in value:
        if not (isinstance(entry, (list, tuple)) and len(entry) == 2 and isinstance(entry[0], torch.Tensor)
                and isinstance(entry[1], dict)):
            return f"got a list holding {_describe(entry)}; conditioning entries are [tensor, dict]"
    return None


def _part_maps(value) -> str | None:
    """C3D_PART_MAPS: a PartMaps whose maps are finite, (V, K, H, W), one camera per view."""
    if not isinstance(value, PartMaps):
        return f"got {_describe(value)}"
    maps = value.maps
    if not isinstance(maps, torch.Tensor) or maps.ndim != 4 or 0 in maps.shape:
        return f"got part maps holding {_describe(maps)}; maps are (views, parts, H, W)"
    if len(value.cameras) != maps.shape[0]:
        return f"got part maps of {maps.shape[0]} views with {len(value.cameras)} cameras"
    if len(value.parts) != maps.shape[1]:
        return f"got part maps of {maps.shape[1]} parts named {list(value.parts)}"
    if not bool(torch.isfinite(maps).all()):
        return "got part maps holding NaN or infinite values"
    return None


def _latent(value) -> str | None:
    """LATENT: a dict whose "samples" is a finite (B, C, H, W) float tensor."""
    if not isinstance(value, dict) or not isinstance(value.get("samples"), torch.Tensor):
        return f"got {_describe(value)}"
    samples = value["samples"]
    if samples.ndim != 4 or 0 in samples.shape:
        return f"got a latent of shape {tuple(samples.shape)}; image latents are (B, C, H, W)"
    if not samples.is_floating_point() or not bool(torch.isfinite(samples).all()):
        return "got a latent holding NaN, infinite or non-float values"
    return None


def _clip_vision_output(value) -> str | None:
    """CLIP_VISION_OUTPUT: ComfyUI's clip_vision.Output with finite (B, E) ``image_embeds``."""
    embeds = getattr(value, "image_embeds", None)
    if not isinstance(embeds, torch.Tensor):
        return f"got {_describe(value)}"
    if embeds.ndim != 2 or 0 in embeds.shape or not bool(torch.isfinite(embeds).all()):
        return f"got image embeddings of shape {tuple(embeds.shape)} (expected finite (B, E))"
    return None


def _comfy_class(module: str, name: str) -> Callable[[], type]:
    def get() -> type:
        import importlib

        return getattr(importlib.import_module(module), name)
    return get


#: What each socket type used by a Compose3D input must carry. A node input of a type missing here is a
#: programming error that :func:`check_inputs` reports (and the pack's tests catch before release).
SOCKETS: dict[str, Socket] = {
    "C3D_CAMERAS": Socket("a camera rig (e.g. from Orbit Cameras)", _instance_of(lambda: Cameras)),
    "C3D_NERF": Socket("a NeRF (e.g. from NeRF From Views)", _instance_of(lambda: NeRF)),
    "C3D_PART_MAPS": Socket("part maps (e.g. from SD3 Attention Capture)", _part_maps),
    "C3D_PART_FIELD": Socket("a part field (e.g. from Part-Affinity NeRF)", _instance_of(lambda: PartField)),
    "C3D_LAMBDA_SCHEDULE": Socket("a lambda schedule (e.g. from Lambda Schedule)",
                                  _instance_of(lambda: LambdaSchedule)),
    "LATENT": Socket("a LATENT (e.g. from Empty Latent Image)", _latent),
    "IMAGE": Socket("an IMAGE batch (B, H, W, C) with values in [0, 1]",
                    _float_tensor("IMAGE batches", "(B, H, W, C)", "an image batch",
                                  lambda shape: len(shape) == 4 and 1 <= shape[-1] <= 4)),
    "MASK": Socket("a MASK (B, H, W) with values in [0, 1]",
                   _float_tensor("masks", "(B, H, W) or (H, W)", "a mask", lambda shape: len(shape) in (2, 3))),
    "CONDITIONING": Socket("a CONDITIONING (e.g. from CLIP Text Encode)", _conditioning),
    "CLIP": Socket("a CLIP text encoder (e.g. from a checkpoint loader)",
                   _instance_of(_comfy_class("comfy.sd", "CLIP"))),
    "VAE": Socket("a VAE (e.g. from a checkpoint loader)", _instance_of(_comfy_class("comfy.sd", "VAE"))),
    "MODEL": Socket("a MODEL (e.g. from a checkpoint loader)",
                    _instance_of(_comfy_class("comfy.model_patcher", "ModelPatcher"))),
    "C3D_IP_ADAPTER": Socket("an image-prompt adapter (e.g. from Load IP-Adapter)",
                             _instance_of(lambda: IPAdapter)),
    "CLIP_VISION": Socket("a CLIP vision model (e.g. from Load CLIP Vision)",
                          _instance_of(_comfy_class("comfy.clip_vision", "ClipVisionModel"))),
    "CLIP_VISION_OUTPUT": Socket("a CLIP vision output (e.g. from CLIP Vision Encode)", _clip_vision_output),
}


def _describe(value) -> str:
    """Short description of a value for messages: its type and, for small plain values, the value."""
    if isinstance(value, (bool, int, float, str)) or value is None:
        text = repr(value)
        return f"{type(value).__name__} {text[:60] + '...' if len(text) > 60 else text}"
    if isinstance(value, torch.Tensor):
        return f"a tensor of shape {tuple(value.shape)}"
    return f"a {type(value).__name__}"


# ---------------------------------------------------------------------------------------------------- inputs

def file_name_input(id: str, **kwargs) -> io.String.Input:
    """A STRING input whose text becomes a file name (or ``folder/name`` prefix) in the output folder."""
    text = io.String.Input(id, **kwargs)
    text.extra_dict[FILE_NAME_KEY] = True
    return text


def _check_int(name: str, value, spec) -> int:
    if isinstance(value, bool) or not isinstance(value, (Integral, Real)):
        raise InputError(f"{name}: expected a whole number, got {_describe(value)}")
    if not isinstance(value, Integral):
        if not math.isfinite(value) or not float(value).is_integer():
            raise InputError(f"{name}: expected a whole number, got {value!r}")
    v = int(value)
    low, high = spec.min, spec.max
    if (low is not None and v < low) or (high is not None and v > high):
        raise InputError(f"{name}: expected a whole number in [{_bound(low)}, {_bound(high)}], got {v}")
    return v


def _check_float(name: str, value, spec) -> float:
    if isinstance(value, bool) or not isinstance(value, Real):
        raise InputError(f"{name}: expected a number, got {_describe(value)}")
    v = float(value)
    if not math.isfinite(v):
        raise InputError(f"{name}: expected a finite number, got {v!r}")
    low, high = spec.min, spec.max
    if (low is not None and v < low) or (high is not None and v > high):
        raise InputError(f"{name}: expected a number in [{_bound(low)}, {_bound(high)}], got {v:g}")
    return v


def _bound(value) -> str:
    return "..." if value is None else f"{value:g}"


def _check_string(name: str, value, spec) -> str:
    if not isinstance(value, str):
        raise InputError(f"{name}: expected text, got {_describe(value)}")
    if spec.extra_dict.get(FILE_NAME_KEY):
        try:
            return check_file_name(name, value)
        except ValueError as e:
            raise InputError(str(e)) from None
    return value


def _check_combo(name: str, value, spec) -> Any:
    try:
        return check_choice(name, value, list(spec.options or []))
    except ValueError as e:
        raise InputError(str(e)) from None


def _check_boolean(name: str, value, spec) -> bool:
    if not isinstance(value, bool):
        raise InputError(f"{name}: expected true or false, got {_describe(value)}")
    return value


def _check_socket(name: str, value, spec) -> Any:
    io_type = spec.get_io_type()
    socket = SOCKETS.get(io_type)
    if socket is None:
        raise InputError(f"{name}: the pack cannot check {io_type} inputs (a Compose3D bug: add {io_type} to "
                         f"nodes.validation.SOCKETS)")
    problem = socket.check(value)
    if problem is not None:
        raise InputError(f"{name}: expected {socket.description} connected from another node; {problem}")
    return value


_WIDGETS: dict[str, Callable[[str, Any, Any], Any]] = {
    "INT": _check_int, "FLOAT": _check_float, "STRING": _check_string, "COMBO": _check_combo,
    "BOOLEAN": _check_boolean,
}


def check_inputs(node_cls: type[io.ComfyNode], inputs: dict[str, Any]) -> dict[str, Any]:
    """``inputs`` checked against ``node_cls``'s schema: the values ``execute`` should get.

    Raises:
        InputError: the first unusable input, named, with what was expected and what came.
    """
    schema = node_cls.define_schema()
    checked = dict(inputs)
    for spec in schema.inputs:
        name = spec.id
        value = inputs.get(name)
        if value is None:
            if not spec.optional:
                raise InputError(f"{name}: missing; connect or set it")
            continue
        check = _WIDGETS.get(spec.get_io_type(), _check_socket)
        checked[name] = check(name, value, spec)
    return checked


class Compose3DNode(io.ComfyNode):
    """Base class of every Compose3D node: ``execute`` gets inputs that :func:`check_inputs` has checked.

    The check is added around each subclass's own ``execute`` when the subclass is created (ComfyUI's per-run
    class clones reuse the wrapped method instead of wrapping it again).
    """

    def __init_subclass__(cls, **kwargs):
        super().__init_subclass__(**kwargs)
        execute = cls.__dict__.get("execute")
        if execute is None or getattr(execute.__func__, "_compose3d_checked", False):
            return
        run = execute.__func__

        @functools.wraps(run)
        def checked_execute(node_cls, **inputs):
            return run(node_cls, **check_inputs(node_cls, inputs))

        checked_execute._compose3d_checked = True
        cls.execute = classmethod(checked_execute)


# ------------------------------------------------------------------------------------------------ model files

#: What to do about a model file that cannot be read.
REDOWNLOAD_HINT = ("The file is damaged or incomplete (an interrupted download or copy?) or is not a model file: "
                   "download or copy it again and check its size against the source.")
CONVERT_HINT = ("To use a pickled checkpoint that you trust, convert it once to .safetensors with "
                "'python scripts/convert_to_safetensors.py <file>' (from the Compose3D folder) and pick the new file.")
SAFETENSORS_SUFFIXES = (".safetensors", ".sft")
PICKLE_SUFFIXES = (".pt", ".pth", ".ckpt", ".bin")


def read_model_file(path: str) -> tuple[dict[str, torch.Tensor], dict | None]:
    """Tensors (and safetensors metadata, else None) of a model file; any reader error becomes a
    :class:`ModelFileError` naming the file and saying what to do.

    ``.safetensors``/``.sft`` go through ComfyUI's reader (its memory mapping and device settings apply).
    ``.pt``/``.pth``/``.ckpt``/``.bin`` are pickles, read with ``torch.load(weights_only=True)``: a pickle that
    would build any Python object other than tensors (and so could run code) is refused before any of it runs.
    A ``{"state_dict": {...}}`` wrapper is unwrapped; entries that are not tensors are dropped.
    """
    import comfy.utils

    name = os.path.basename(path)
    try:
        size = os.path.getsize(path)
    except OSError as e:
        raise ModelFileError(f"{name}: cannot be opened ({e.strerror or e}); check that the file exists and is "
                             f"readable.") from None
    if size == 0:
        raise ModelFileError(f"{name}: the file is empty (0 bytes). {REDOWNLOAD_HINT}")
    lower = path.lower()
    if lower.endswith(SAFETENSORS_SUFFIXES):
        try:
            sd, metadata = comfy.utils.load_torch_file(path, safe_load=True, return_metadata=True)
        except Exception as e:  # noqa: BLE001  (safetensors raises its own error types; all mean "unreadable")
            raise ModelFileError(f"{name}: not a readable .safetensors file ({_first_line(e)}; {size} bytes). "
                                 f"{REDOWNLOAD_HINT}") from None
        return sd, metadata
    if not lower.endswith(PICKLE_SUFFIXES):
        raise ModelFileError(f"{name}: unknown model file type; use a .safetensors file (or a .pt/.ckpt pickle).")
    try:
        data = torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as e:
        if "Unsupported global" not in str(e):  # torch's safe unpickler met bytes that are no pickle at all
            raise ModelFileError(f"{name}: not a readable PyTorch checkpoint (not a pickle of tensors; {size} "
                                 f"bytes). {REDOWNLOAD_HINT}") from None
        raise ModelFileError(
            f"{name}: refused to load. The pickle holds Python objects other than tensors, which could run code "
            f"when loaded, so only tensors are read (torch.load weights_only=True). {CONVERT_HINT}\n"
            f"Details: {_unsafe_global(e)}") from None
    except Exception as e:  # noqa: BLE001  (zip, pickle and OS errors alike)
        raise ModelFileError(f"{name}: not a readable PyTorch checkpoint ({_first_line(e)}; {size} bytes). "
                             f"{REDOWNLOAD_HINT}") from None
    if isinstance(data, dict) and isinstance(data.get("state_dict"), dict):
        data = data["state_dict"]
    if not isinstance(data, dict):
        raise ModelFileError(f"{name}: holds a {type(data).__name__}, not a state dict of tensors.")
    return {k: v for k, v in data.items() if isinstance(v, torch.Tensor)}, None


def _unsafe_global(error: BaseException) -> str:
    """The line of torch's weights-only error naming the refused Python object."""
    lines = [line.strip() for line in str(error).splitlines() if "Unsupported global" in line]
    return lines[0] if lines else _first_line(error)


def _first_line(error: BaseException) -> str:
    text = str(error).strip()
    return (text.splitlines()[0] if text else "") or type(error).__name__
