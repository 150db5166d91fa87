"""The pack inside a real ComfyUI server, driven over HTTP and the websocket like a user's client."""
from __future__ import annotations

import io
import json
import re
from pathlib import Path
from urllib.parse import quote

import numpy as np
import pytest
from PIL import Image

from comfy_execution.graph_utils import GraphBuilder
from compose3d.nodes import NODES
from harness.paths import PACK_ROOT
from harness.server import PromptRejected
from harness.workflow import check_workflow, ui_to_api
from oracles import mvdream_get_camera, orbit_c2w

pytestmark = pytest.mark.server

ORBIT_DEFAULTS = dict(views=4, elevation=15.0, azimuth_start=0.0, azimuth_span=360.0, distance=2.0, fov=40.0)


def camera_prompt(**overrides) -> tuple[dict, str]:
    g = GraphBuilder(prefix="")
    rig = g.node("Compose3D_OrbitCameras", **{**ORBIT_DEFAULTS, **overrides})
    preview = g.node("Compose3D_PreviewCameras", cameras=rig.out(0))
    return g.finalize(), preview.id


def test_pack_loads_without_import_failure(comfy_server):
    log = comfy_server.log_text()
    failed = [line for line in log.splitlines() if "IMPORT FAILED" in line and "compose3d" in line]
    assert failed == []
    assert re.search(r"\d+\.\d+ seconds: \S*custom_nodes/compose3d", log), "ComfyUI did not report loading the pack"


def test_object_info_lists_every_node_from_the_pack(comfy_server):
    info = comfy_server.get_json("/object_info")
    ours = {name: v for name, v in info.items() if name.startswith("Compose3D_")}
    expected = {node.GET_SCHEMA().node_id for node in NODES}
    assert set(ours) == expected
    assert {v["python_module"] for v in ours.values()} == {"custom_nodes.compose3d"}
    assert ours["Compose3D_OrbitCameras"]["output"] == ["C3D_CAMERAS"]
    assert ours["Compose3D_OrbitCameras"]["category"] == "Compose3D/cameras"


def test_every_pack_node_has_a_description_and_a_tooltip_on_every_input_and_output(comfy_server):
    """What the frontend shows on hover, read from /object_info as the frontend reads it."""
    info = comfy_server.get_json("/object_info")
    missing = []
    for name, node in sorted(info.items()):
        if not name.startswith("Compose3D_"):
            continue
        if len(node.get("description") or "") < 20:
            missing.append(f"{name}: description")
        for section in ("required", "optional"):
            for key, spec in node["input"].get(section, {}).items():
                options = spec[1] if len(spec) > 1 and isinstance(spec[1], dict) else {}
                if not options.get("tooltip"):
                    missing.append(f"{name}: input {key}")
        tips = list(node.get("output_tooltips") or [])
        for i, output in enumerate(node.get("output_name", [])):
            if i >= len(tips) or not tips[i]:
                missing.append(f"{name}: output {output}")
    assert not missing, missing


def test_orbit_cameras_over_http_gives_the_official_rig(comfy_server):
    prompt, preview_id = camera_prompt(views=6, elevation=25.0, azimuth_start=30.0, distance=1.5)
    result = comfy_server.run(prompt)
    assert result.status == "success", result.error
    shown = result.outputs[preview_id]
    summary = json.loads(shown["text"][0])
    np.testing.assert_allclose(summary["mvdream"], mvdream_get_camera(6, 25.0, 30.0, 360.0), atol=1e-6)
    np.testing.assert_allclose(np.array(summary["c2w"]).reshape(-1, 4, 4),
                               orbit_c2w(6, 25.0, 30.0, 360.0, 1.5), atol=1e-5)
    assert summary["fov_y_deg"] == pytest.approx([40.0] * 6)
    (image,) = shown["images"]
    png = comfy_server.get_bytes(f"/view?filename={image['filename']}&subfolder={image['subfolder']}"
                                 f"&type={image['type']}")
    assert Image.open(io.BytesIO(png)).size == (512, 256)


@pytest.mark.parametrize("field,value,error_type", [
    ("views", 0, "value_smaller_than_min"),
    ("elevation", 95.0, "value_bigger_than_max"),
    ("distance", float("inf"), "value_bigger_than_max"),
    ("fov", -float("inf"), "value_smaller_than_min"),
])
def test_out_of_range_camera_input_is_rejected_naming_it(comfy_server, field, value, error_type):
    prompt, _ = camera_prompt(**{field: value})
    with pytest.raises(PromptRejected) as rejected:
        comfy_server.queue(prompt)
    (node_error,) = rejected.value.node_errors.values()
    assert [(e["type"], e["extra_info"]["input_name"]) for e in node_error["errors"]] == [(error_type, field)]


def test_nan_camera_input_fails_with_an_error_naming_it(comfy_server):
    prompt, _ = camera_prompt(azimuth_span=float("nan"))
    result = comfy_server.run(prompt)
    assert result.status == "error"
    assert result.error["node_type"] == "Compose3D_OrbitCameras"
    assert result.error["exception_message"].startswith("azimuth_span: expected a finite number")


def test_wrong_link_type_is_refused_and_the_server_keeps_serving(comfy_server):
    g = GraphBuilder(prefix="")
    rig = g.node("Compose3D_OrbitCameras", **ORBIT_DEFAULTS)
    g.node("PreviewImage", images=rig.out(0))  # C3D_CAMERAS into an IMAGE input
    with pytest.raises(PromptRejected) as rejected:
        comfy_server.queue(g.finalize())
    errors = [e for node in rejected.value.node_errors.values() for e in node["errors"]]
    assert [e["type"] for e in errors] == ["return_type_mismatch"]
    assert "C3D_CAMERAS" in errors[0]["details"]
    prompt, preview_id = camera_prompt(views=2)
    result = comfy_server.run(prompt)
    assert result.status == "success"
    assert json.loads(result.outputs[preview_id]["text"][0])["views"] == 2
    assert comfy_server.alive()


def example_workflows() -> list[Path]:
    return sorted((PACK_ROOT / "example_workflows").glob("*.json"))


def test_example_workflows_are_served_as_templates_with_thumbnails(comfy_server):
    templates = comfy_server.get_json("/api/workflow_templates")
    assert sorted(templates["compose3d"]) == sorted(p.stem for p in example_workflows())
    for path in example_workflows():
        served = comfy_server.get_json(f"/api/workflow_templates/compose3d/{quote(path.name)}")  # spaces: %20
        assert served == json.loads(path.read_text())
        assert path.with_suffix(".jpg").is_file(), f"{path.name} has no thumbnail"


@pytest.mark.parametrize("path", example_workflows(), ids=lambda p: p.stem)
def test_every_example_workflow_validates_against_the_servers_object_info(comfy_server, tiny_models, path):
    """Every node exists, every link joins matching types, every required input is set and every widget value
    is allowed (combo values, model files included, and number ranges; ComfyUI 0.3.75 checks neither V3 combos
    nor NaN). The server lists the tiny models also under the standard file names the loaders use
    (``TinyModels.link_standard_names``), and the subject photo of Make-Your-3D is put in its input folder."""
    from test_server_make_your_3d import subject_photo

    subject_photo(comfy_server)
    workflow = json.loads(path.read_text())
    assert check_workflow(workflow, comfy_server.get_json("/object_info")) == []


def test_the_workflow_check_catches_a_wrong_model_file_a_bad_combo_and_a_mismatched_link(comfy_server):
    """The broken variant: the same check on a damaged copy of the refocus template names each problem."""
    workflow = json.loads((PACK_ROOT / "example_workflows" / "MVDream 4 views with refocus.json").read_text())
    by_type = {n["type"]: n for n in workflow["nodes"]}
    by_type["Compose3D_MVDreamLoader"]["widgets_values"][0] = "sd-v2.1-base-4view.ckpt"
    by_type["BasicScheduler"]["widgets_values"][0] = "not_a_scheduler"
    decode = by_type["VAEDecode"]
    samples = next(i for i in decode["inputs"] if i["name"] == "samples")
    link = next(link for link in workflow["links"] if link[0] == samples["link"])
    link[1], link[2] = by_type["Compose3D_MVDreamLoader"]["id"], 0  # the MODEL where a LATENT belongs
    problems = check_workflow(workflow, comfy_server.get_json("/object_info"))
    assert any("'sd-v2.1-base-4view.ckpt' is not one of" in p for p in problems), problems
    assert any("'not_a_scheduler' is not one of" in p for p in problems), problems
    assert any("gives MODEL, but" in p and "'samples' takes LATENT" in p for p in problems), problems


#: Loader nodes whose files (real weights) the test machine does not have. Workflows using them run in their own
#: tests with the tiny models substituted (test_server_mvdream.py for the MVDream ones).
MODEL_LOADERS = {"Compose3D_MVDreamLoader", "CheckpointLoaderSimple", "UNETLoader", "CLIPVisionLoader",
                 "Compose3D_IPAdapterLoader"}


def runs_as_shipped(path: Path) -> bool:
    return not any(node.get("type") in MODEL_LOADERS for node in json.loads(path.read_text())["nodes"])


# Workflows that load an MVDream checkpoint run in their own server tests with a tiny checkpoint in its place.
RUN_WITH_TINY_MODELS = {
    "MVDream 4 views with refocus": "tests/test_server_mvdream.py",
    "Text to 3D - SDS": "tests/test_server_sds.py",
    "Text to 3D - Grounded-Dreamer": "tests/test_server_sds.py",
    "Part maps - SD3 capture and Part-Affinity NeRF": "tests/test_server_parts.py",
    "Text to 3D - DreamBeast parts": "tests/test_server_sds.py",
    "Mixed-score 4 views": "tests/test_server_mixed.py",
    "Text to 3D - mixed score without distillation": "tests/test_server_mixed.py",
    "Make-Your-3D - subject photo to 3D": "tests/test_server_make_your_3d.py",
}


def test_workflows_that_need_model_files_run_in_their_own_server_tests():
    assert sorted(p.stem for p in example_workflows() if not runs_as_shipped(p)) == sorted(RUN_WITH_TINY_MODELS)
    for stem, test_file in RUN_WITH_TINY_MODELS.items():
        assert f"{stem}.json" in (PACK_ROOT / test_file).read_text(), (stem, test_file)


#: Test sizes for the long nodes of templates that run as shipped: the test checks that the template's graph runs
#: over HTTP; the full-size run is the README's main job (scripts/demo.sh runs Reconstruction demo as shipped,
#: about 4 minutes here) and the reconstruction's quality is test_reconstruction.py's.
TEST_SIZES = {"Compose3D_NeRFFromViews": {"steps": 60},
              "Compose3D_ExportMesh": {"resolution": 64, "threshold": 1.0, "texture_size": 256},
              "Compose3D_RenderNeRF": {"width": 32, "height": 32}}


@pytest.mark.parametrize("path", [p for p in example_workflows() if runs_as_shipped(p)], ids=lambda p: p.stem)
def test_example_workflow_runs_over_http(comfy_server, path):
    prompt = ui_to_api(json.loads(path.read_text()), comfy_server.get_json("/object_info"))
    for node in prompt.values():
        node["inputs"].update(TEST_SIZES.get(node["class_type"], {}))
    result = comfy_server.run(prompt)
    assert result.status == "success", result.error
    assert result.outputs, "the workflow shows nothing"


def test_frontend_extension_is_served(comfy_server):
    scripts = comfy_server.get_json("/extensions")
    ours = [s for s in scripts if s.startswith("/extensions/compose3d/")]
    assert ours == ["/extensions/compose3d/compose3d.js"]
    source = comfy_server.get_bytes(ours[0]).decode()
    assert source == (PACK_ROOT / "web" / "compose3d.js").read_text()
