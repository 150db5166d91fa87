"""Every input of every Compose3D node, sent wrong over HTTP, gives a clear error naming that input.

The cases are built from ``GET /object_info``, so a new node or input is covered without editing this file:
for each widget input its range, its type and its options give out-of-range values (as constants and through
links from core Primitive nodes, which ComfyUI does not range-check), values of the wrong type, NaN and
infinities, unknown dropdown options and, for inputs marked as file names, unusable names; each socket input gets
a constant where a link belongs and a link of the wrong type. The node under test sits in a small graph whose
other inputs come from :data:`PROVIDERS` (by socket type) and whose outputs go to core ``PreviewAny``.

A case passes when ComfyUI refuses the prompt with an error attributed to the input (its own checks), or the
node fails with a message that starts with the input's name and is not a bare Python exception. After the bad
cases of a node, its good prompt must still run.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable

import pytest

from comfy_execution.graph_utils import GraphBuilder
from compose3d.nodes import NODES
from harness.server import PromptRejected

pytestmark = pytest.mark.server

WIDGET_TYPES = {"INT", "FLOAT", "STRING", "BOOLEAN", "COMBO"}
#: Exception types whose bare message ("'gltf'", "'NoneType' object has no attribute ...") tells a user nothing.
BARE_EXCEPTIONS = {"KeyError", "AttributeError", "TypeError", "IndexError", "AssertionError", "RuntimeError",
                   "ZeroDivisionError", "NameError", "UnboundLocalError", "OverflowError"}

#: Small values for the good prompt of each node, so it runs in seconds (the defaults are valid but slower).
FAST = {
    "Compose3D_TestObjectViews": {"width": 16, "height": 16},
    "Compose3D_NeRFFromViews": {"steps": 2, "rays_per_step": 256, "samples_per_ray": 16},
    "Compose3D_RenderNeRF": {"width": 16, "height": 16, "samples_per_ray": 16},
    "Compose3D_ExportMesh": {"resolution": 32, "threshold": 1.0, "max_faces": 500, "colors": "vertex",
                             "texture_size": 64, "filename_prefix": "c3d_bad_inputs/mesh"},
    "Compose3D_RefocusSampler": {"prompt": "a cat", "subjects": ""},
    "Compose3D_SDSOptimizer": {"steps": 2, "low_resolution": 64, "low_batch": 4, "high_resolution": 64,
                               "high_batch": 4, "samples_per_ray": 16, "checkpoint_every": 0,
                               "checkpoint_prefix": "c3d_bad_inputs/sds"},
    "Compose3D_SD3AttentionCapture": {"blocks": "1", "t_high": 950.0, "steps": 4, "resolution": 64, "map_size": 8},
    "Compose3D_PartAffinityNeRF": {"steps": 2, "rays_per_step": 64, "train_size": 8},
    "Compose3D_RenderPartMaps": {"size": 8, "samples_per_ray": 16},
    "Compose3D_PartMapsFromMasks": {"parts": "object"},
    "Compose3D_TestObjectPartMaps": {"size": 16},
    "Compose3D_MixedScoreSampler": {"steps": 1},
    "Compose3D_ViewConsistency": {"steps": 2, "rays_per_step": 64, "samples_per_ray": 16},
    "Compose3D_IdentityTuner": {"steps": 1, "batch_size": 1, "augmentations": 1,
                                "filename_prefix": "c3d_bad_inputs/identity"},
    "Compose3D_SubjectPriorTuner": {"steps": 1, "filename_prefix": "c3d_bad_inputs/subject_prior"},
}

#: Socket types a node gets from other providers than the shared ones (SD3 nodes need an SD3 model).
NODE_PROVIDERS = {
    "Compose3D_SD3AttentionCapture": {"MODEL": "_sd3_model", "CLIP": "_sd3_clip", "VAE": "_sd3_vae"},
    # the multi-view model's conditionings carry cameras (the tiny MVDream stands in for the 2D model too)
    "Compose3D_MixedScoreGuider": {"CONDITIONING": "_mv_conditioning"},
    "Compose3D_MixedScoreSampler": {"CONDITIONING": "_mv_conditioning"},
    # image prompts need an SD1.5-family UNet (the adapter's layers and 768-wide context)
    "Compose3D_ApplyIPAdapter": {"MODEL": "_sd15_model"},
    "Compose3D_IdentityTuner": {"MODEL": "_sd15_model", "CLIP": "_sd15_clip", "VAE": "_sd15_vae"},
}


# ------------------------------------------------------------------------------------------------ the graph

class Graph:
    """A GraphBuilder with one provider node per socket type (so views, masks and cameras agree)."""

    def __init__(self, tiny_models):
        self.g = GraphBuilder(prefix="")
        self.tiny_models = tiny_models
        self.made: dict[str, Any] = {}

    def provide(self, io_type: str):
        if io_type not in self.made:
            if io_type not in PROVIDERS:
                raise AssertionError(f"no provider for socket type {io_type}: add one to PROVIDERS in "
                                     f"{__name__} so nodes with {io_type} inputs are covered")
            self.made[io_type] = PROVIDERS[io_type](self)
        return self.made[io_type]


def _cameras(graph: Graph):
    node = graph.g.node("Compose3D_OrbitCameras", views=4, elevation=20.0, azimuth_start=0.0, azimuth_span=360.0,
                        distance=2.5, fov=40.0)
    return node.out(0)


def _views(graph: Graph):
    return graph.g.node("Compose3D_TestObjectViews", cameras=graph.provide("C3D_CAMERAS"), width=24, height=24,
                        background="white")


def _nerf(graph: Graph):
    views = graph.provide("_views")
    # trained enough (the reconstruction server test's settings) to have a surface at density 1
    node = graph.g.node("Compose3D_NeRFFromViews", images=views.out(0), cameras=graph.provide("C3D_CAMERAS"),
                        masks=views.out(1), steps=60, rays_per_step=1024, samples_per_ray=64, learning_rate=0.01,
                        background="white", seed=11)
    return node.out(0)


def _mvdream(graph: Graph):
    return graph.g.node("Compose3D_MVDreamLoader", ckpt_name=graph.tiny_models.mvdream_checkpoint)


def _sd3(graph: Graph):
    return graph.g.node("CheckpointLoaderSimple", ckpt_name=graph.tiny_models.sd3_checkpoint)


def _sd15(graph: Graph):
    return graph.g.node("CheckpointLoaderSimple", ckpt_name=graph.tiny_models.sd15_2d_checkpoint)


def _part_maps(graph: Graph):
    return graph.g.node("Compose3D_TestObjectPartMaps", cameras=graph.provide("C3D_CAMERAS"), size=16).out(0)


def _part_field(graph: Graph):
    return graph.g.node("Compose3D_PartAffinityNeRF", part_maps=graph.provide("C3D_PART_MAPS"),
                        nerf=graph.provide("C3D_NERF"), steps=2, rays_per_step=64, train_size=8,
                        learning_rate=0.01, normalize=True, seed=0).out(0)


def _conditioning(graph: Graph):
    return graph.g.node("CLIPTextEncode", text="a cat", clip=graph.provide("CLIP")).out(0)


def _mv_conditioning(graph: Graph):
    return graph.g.node("Compose3D_MVDreamConditioning", conditioning=graph.provide("CONDITIONING"),
                        cameras=graph.provide("C3D_CAMERAS")).out(0)


PROVIDERS: dict[str, Callable[[Graph], Any]] = {
    "C3D_CAMERAS": _cameras,
    "_views": _views,
    "IMAGE": lambda graph: graph.provide("_views").out(0),
    "MASK": lambda graph: graph.provide("_views").out(1),
    "C3D_NERF": _nerf,
    "_mvdream": _mvdream,
    "MODEL": lambda graph: graph.provide("_mvdream").out(0),
    "CLIP": lambda graph: graph.provide("_mvdream").out(1),
    "VAE": lambda graph: graph.provide("_mvdream").out(2),
    "CONDITIONING": _conditioning,
    "_sd3": _sd3,
    "_sd3_model": lambda graph: graph.provide("_sd3").out(0),
    "_sd3_clip": lambda graph: graph.provide("_sd3").out(1),
    "_sd3_vae": lambda graph: graph.provide("_sd3").out(2),
    "C3D_PART_MAPS": _part_maps,
    "C3D_PART_FIELD": _part_field,
    "_mv_conditioning": _mv_conditioning,
    "C3D_LAMBDA_SCHEDULE": lambda graph: graph.g.node("Compose3D_LambdaSchedule", kind="linear", start=0.3, end=0.9,
                                                      points="").out(0),
    "LATENT": lambda graph: graph.g.node("EmptyLatentImage", width=64, height=64, batch_size=4).out(0),
    "_sd15": _sd15,
    "_sd15_model": lambda graph: graph.provide("_sd15").out(0),
    "_sd15_clip": lambda graph: graph.provide("_sd15").out(1),
    "_sd15_vae": lambda graph: graph.provide("_sd15").out(2),
    "C3D_IP_ADAPTER": lambda graph: graph.g.node("Compose3D_IPAdapterLoader",
                                                 ipadapter_name=graph.tiny_models.ip_adapter).out(0),
    "CLIP_VISION": lambda graph: graph.g.node("CLIPVisionLoader", clip_name=graph.tiny_models.clip_vision).out(0),
    "CLIP_VISION_OUTPUT": lambda graph: graph.g.node("CLIPVisionEncode", clip_vision=graph.provide("CLIP_VISION"),
                                                     image=graph.provide("IMAGE"), crop="center").out(0),
}


@dataclass(frozen=True)
class InputSpec:
    name: str
    io_type: str  # "INT", "COMBO", "C3D_NERF"...
    options: dict
    required: bool


def node_inputs(info: dict) -> list[InputSpec]:
    """The inputs of one /object_info entry, in order."""
    specs = []
    for category in ("required", "optional"):
        for name, entry in info["input"].get(category, {}).items():
            io_type, options = entry[0], (entry[1] if len(entry) > 1 else {})
            if isinstance(io_type, list):  # legacy combo format
                io_type, options = "COMBO", {**options, "options": io_type}
            specs.append(InputSpec(name, io_type, options, category == "required"))
    return specs


def good_value(node_id: str, spec: InputSpec) -> Any:
    fast = FAST.get(node_id, {})
    if spec.name in fast:
        return fast[spec.name]
    if "default" in spec.options:
        return spec.options["default"]
    if spec.io_type == "COMBO":
        return spec.options["options"][0]
    return {"INT": 0, "FLOAT": 0.0, "STRING": "", "BOOLEAN": False}[spec.io_type]


def build(node_id: str, info: dict, tiny_models, changes: dict[str, Callable[[Graph], Any]] | None = None):
    """The node's good prompt, with ``changes`` (input name -> graph -> value or link) applied.

    Returns (prompt, id of the node under test).
    """
    graph = Graph(tiny_models)
    values = {}
    for spec in node_inputs(info):
        if changes and spec.name in changes:
            values[spec.name] = changes[spec.name](graph)
        elif spec.io_type in WIDGET_TYPES:
            values[spec.name] = good_value(node_id, spec)
            if node_id == "Compose3D_MVDreamLoader" and spec.name == "ckpt_name":
                values[spec.name] = tiny_models.mvdream_checkpoint
            if node_id == "Compose3D_IPAdapterLoader" and spec.name == "ipadapter_name":
                values[spec.name] = tiny_models.ip_adapter
        elif spec.required:
            values[spec.name] = graph.provide(NODE_PROVIDERS.get(node_id, {}).get(spec.io_type, spec.io_type))
    node = graph.g.node(node_id, **values)
    if not info["output_node"]:
        for index in range(len(info["output"])):
            graph.g.node("PreviewAny", source=node.out(index))
    return graph.g.finalize(), node.id


# ------------------------------------------------------------------------------------------------- the cases

@dataclass(frozen=True)
class Case:
    input_name: str
    label: str
    change: Callable[[Graph], Any]


def constant(value) -> Callable[[Graph], Any]:
    return lambda graph: value


def linked(node_id: str, value) -> Callable[[Graph], Any]:
    """The value through a core primitive node (ComfyUI range-checks constants, not links)."""
    return lambda graph: graph.g.node(node_id, value=value).out(0)


def wrong_link(io_type: str) -> Callable[[Graph], Any]:
    """A link from a node whose output is of another type than ``io_type``."""
    def change(graph: Graph):
        if io_type == "C3D_CAMERAS":
            return graph.g.node("PrimitiveInt", value=1).out(0)
        return graph.provide("C3D_CAMERAS")
    return change


def bad_cases(spec: InputSpec) -> list[Case]:
    """Every wrong value the input's /object_info entry implies."""
    o, name = spec.options, spec.name
    cases: list[Case] = []
    if spec.io_type == "INT":
        if o.get("min") is not None:
            cases += [Case(name, "below-min", constant(o["min"] - 1)),
                      Case(name, "linked-below-min", linked("PrimitiveInt", o["min"] - 1))]
        if o.get("max") is not None:
            cases += [Case(name, "above-max", constant(o["max"] + 1)),
                      Case(name, "linked-above-max", linked("PrimitiveInt", o["max"] + 1))]
        cases += [Case(name, "text", constant("three")), Case(name, "nan", constant(float("nan"))),
                  Case(name, "linked-float", linked("PrimitiveFloat", 2.5))]
    elif spec.io_type == "FLOAT":
        if o.get("min") is not None:
            low = o["min"] - max(1.0, abs(o["min"]))
            cases += [Case(name, "below-min", constant(low)), Case(name, "linked-below-min",
                                                                   linked("PrimitiveFloat", low))]
        if o.get("max") is not None:
            high = o["max"] + max(1.0, abs(o["max"]))
            cases += [Case(name, "above-max", constant(high)), Case(name, "linked-above-max",
                                                                    linked("PrimitiveFloat", high))]
        cases += [Case(name, "nan", constant(float("nan"))), Case(name, "inf", constant(float("inf"))),
                  Case(name, "-inf", constant(-float("inf"))), Case(name, "text", constant("three")),
                  Case(name, "linked-nan", linked("PrimitiveFloat", float("nan")))]
    elif spec.io_type == "COMBO":
        cases += [Case(name, "unknown-option", constant("no-such-option")),
                  Case(name, "number", constant(12345)),
                  Case(name, "linked-unknown-option", linked("PrimitiveString", "no-such-option"))]
    elif spec.io_type == "STRING":
        if o.get("compose3d_file_name"):
            cases += [Case(name, "control-chars", constant("bad\nname\x00")),
                      Case(name, "escaping", constant("../../outside")),
                      Case(name, "absolute", constant("/tmp/absolute")),
                      Case(name, "empty", constant("   ")),
                      Case(name, "linked-control-chars", linked("PrimitiveString", "tab\there"))]
    elif spec.io_type != "BOOLEAN":  # sockets
        cases += [Case(name, "constant-for-link", constant(5)),
                  Case(name, "text-for-link", constant("a camera")),
                  Case(name, "wrong-link-type", wrong_link(spec.io_type))]
    return cases


def judge(node_id: str, input_name: str, prompt_node: str, outcome) -> str | None:
    """None if ``outcome`` (a PromptRejected or a RunResult) is a clear error naming the input; else why not."""
    if isinstance(outcome, PromptRejected):
        errors = outcome.node_errors.get(prompt_node, {}).get("errors", [])
        if any(e.get("extra_info", {}).get("input_name") == input_name for e in errors):
            return None
        return f"refused, but no error names {input_name}: {outcome.node_errors}"
    if outcome.status != "error":
        return f"ran to {outcome.status!r} instead of failing"
    error = outcome.error
    if error.get("node_id") != prompt_node:
        return f"failed in another node ({error.get('node_type')}): {error.get('exception_message')}"
    kind = error.get("exception_type", "").rsplit(".", 1)[-1]
    message = error.get("exception_message", "")
    if kind in BARE_EXCEPTIONS:
        return f"bare {kind}: {message}"
    if not message.startswith(f"{input_name}: ") or len(message) < len(input_name) + 12:
        return f"{kind} does not start with '{input_name}: ' and say what is wrong: {message!r}"
    return None


def run_case(server, prompt: dict):
    try:
        return server.run(prompt, timeout=120)
    except PromptRejected as rejected:
        return rejected


NODE_IDS = [node.GET_SCHEMA().node_id for node in NODES]


@pytest.fixture(scope="module")
def object_info(comfy_server) -> dict:
    return comfy_server.get_json("/object_info")


@pytest.mark.parametrize("node_id", NODE_IDS)
def test_every_bad_input_of_the_node_gives_a_clear_error_naming_it(comfy_server, object_info, tiny_models,
                                                                    node_id):
    info = object_info[node_id]
    prompt, under_test = build(node_id, info, tiny_models)
    good = comfy_server.run(prompt, timeout=240)
    assert good.status == "success", good.error

    cases = [case for spec in node_inputs(info) for case in bad_cases(spec)]
    assert cases, f"{node_id} has no input that can be wrong"
    failures = []
    for case in cases:
        bad_prompt, bad_node = build(node_id, info, tiny_models, {case.input_name: case.change})
        problem = judge(node_id, case.input_name, bad_node, run_case(comfy_server, bad_prompt))
        if problem is not None:
            failures.append(f"{case.input_name} [{case.label}]: {problem}")
    assert failures == [], f"{len(failures)} of {len(cases)} bad inputs of {node_id} lack a clear error:\n" + \
        "\n".join(failures)

    again = comfy_server.run(prompt, timeout=240)
    assert again.status == "success", again.error


def test_the_cases_cover_every_kind_of_input_the_pack_has(object_info):
    """Each input type of the pack's nodes yields cases (a new type without cases would go unchecked)."""
    kinds = {spec.io_type for node_id in NODE_IDS for spec in node_inputs(object_info[node_id])}
    without = sorted(k for k in kinds if k != "STRING" and k != "BOOLEAN"
                     and not bad_cases(InputSpec("x", k, {"min": 0, "max": 1}, True)))
    assert without == []
    file_names = [(n, s.name) for n in NODE_IDS for s in node_inputs(object_info[n])
                  if s.options.get("compose3d_file_name")]
    assert ("Compose3D_ExportMesh", "filename_prefix") in file_names


def test_judge_rejects_a_bare_python_error_and_an_unnamed_message():
    """The judge can fail: what today's unvalidated nodes gave (a bare KeyError) is not a clear error."""
    class Result:
        status = "error"

        def __init__(self, kind, message):
            self.error = {"node_id": "1", "exception_type": kind, "exception_message": message}

    assert judge("N", "format", "1", Result("KeyError", "'gltf'")) == "bare KeyError: 'gltf'"
    assert judge("N", "format", "1", Result("ValueError", "unknown format 'gltf'")).startswith("ValueError does")
    assert judge("N", "format", "1", Result("custom_nodes.compose3d.nodes.validation.InputError",
                                            "format: 'gltf' is not one of the options: 'glb', 'obj'")) is None


def test_a_bad_input_after_a_long_node_loses_nothing_the_fixed_prompt_reuses_its_result(comfy_server,
                                                                                       object_info, tiny_models):
    """A wrong dropdown value in Export Mesh is reported before Export Mesh works; the trained NeRF upstream
    is kept in ComfyUI's cache, so the corrected prompt does not train it again."""
    info = object_info["Compose3D_ExportMesh"]
    bad, export_id = build("Compose3D_ExportMesh", info, tiny_models, {"format": constant("gltf")})
    failed = comfy_server.run(bad, timeout=240)
    assert failed.status == "error"
    assert failed.error["exception_message"].strip() == "format: 'gltf' is not one of the options: 'glb', 'obj', 'ply'"
    nerf_id = next(i for i, n in bad.items() if n["class_type"] == "Compose3D_NeRFFromViews")
    good, _ = build("Compose3D_ExportMesh", info, tiny_models, {"format": constant("obj")})
    fixed = comfy_server.run(good, timeout=240)
    assert fixed.status == "success", fixed.error
    cached = [m["data"]["nodes"] for m in fixed.messages if m["type"] == "execution_cached"]
    assert cached and nerf_id in cached[0]
    assert [p for p in fixed.progress(nerf_id)] == []  # the NeRF did not train again
    assert fixed.outputs[export_id]["3d"][0]["filename"].endswith(".obj")
