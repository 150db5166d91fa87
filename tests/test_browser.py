"""The pack in the real ComfyUI frontend (the version ComfyUI pins), in Debian's headless Chromium via Playwright.

A user's first steps: the page loads with the pack's extension and every pack node registered, nothing on the page
reports an error that involves the pack, and every example workflow opens from the template browser with all of
its nodes known and no missing-node dialog. A screenshot of each opened workflow is kept under
``test-artifacts/browser/`` (``COMPOSE3D_ARTIFACTS`` moves it). A deliberately broken workflow (an unknown node
type) shows that the checks can fail.
"""
from __future__ import annotations

import json
import os
from pathlib import Path
from urllib.parse import unquote

import numpy as np
import pytest
from PIL import Image

from harness.browser import CHROMIUM_ARGS, Frontend, chromium_path
from harness.paths import PACK_ROOT
from test_server import TEST_SIZES
from test_server_make_your_3d import subject_photo
from test_server_parts import TEST_SIZES as PART_TEST_SIZES
from tiny_runs import TINY_RUNS

pytestmark = [pytest.mark.server, pytest.mark.browser]

ARTIFACTS = Path(os.environ.get("COMPOSE3D_ARTIFACTS", PACK_ROOT / "test-artifacts")) / "browser"
MODULE = "compose3d"  # the pack's entry in the template browser (its folder name under custom_nodes)
PACK_PATTERN = r"compose3d"  # what ties a page error to the pack (our URLs, node types, extension file)
WORKFLOWS = sorted((PACK_ROOT / "example_workflows").glob("*.json"))
#: Nodes that show a progress preview while they run, and the height (canvas units) the preview needs below their
#: widgets: inside the node or free below it, so the growing preview covers no neighbour.
PREVIEW_NODES = ["Compose3D_NeRFFromViews", "Compose3D_SDSOptimizer", "Compose3D_PartAffinityNeRF",
                 "Compose3D_IdentityTuner", "Compose3D_SubjectPriorTuner", "Compose3D_SD3AttentionCapture",
                 "Compose3D_RenderPartMaps", "Compose3D_TestObjectPartMaps"]
PREVIEW_ROOM = 256


@pytest.fixture(scope="module")
def browser():
    from playwright.sync_api import sync_playwright

    with sync_playwright() as p:
        chromium = p.chromium.launch(executable_path=chromium_path(), headless=True, args=list(CHROMIUM_ARGS))
        try:
            yield chromium
        finally:
            chromium.close()


@pytest.fixture(scope="module")
def frontend(browser, comfy_server):
    return Frontend(browser, comfy_server.url).open()


def pack_node_types(comfy_server) -> list[str]:
    info = comfy_server.get_json("/object_info")
    return sorted(name for name, node in info.items() if node.get("python_module", "").endswith(MODULE))


def open_template(frontend, stem: str, sizes: dict[str, dict] | None = None):
    """Open example workflow ``stem`` from the template browser and set ``sizes`` ({node type or "type|title":
    {widget: value}}), then start watching live previews and the end of the next run; returns the report mark."""
    workflow = json.loads((PACK_ROOT / "example_workflows" / f"{stem}.json").read_text())
    mark = frontend.report.mark()
    frontend.load_template(MODULE, stem, expected_nodes=len(workflow["nodes"]))
    for key, values in (sizes or {}).items():
        node_type, _, title = key.partition("|")
        frontend.set_widgets(node_type, values, title or None)
    frontend.watch_previews()
    frontend.watch_execution()
    return mark


def test_the_frontend_loads_the_pack_extension_and_every_node_without_errors(frontend, comfy_server):
    assert "Compose3D.core" in frontend.extension_names()
    types = pack_node_types(comfy_server)
    assert len(types) >= 20, types
    unknown = [t for t, known in frontend.registered(types).items() if not known]
    assert not unknown, f"the frontend did not register {unknown}"
    # Our extension's URL, node types and ids all contain "compose3d": no console error, uncaught exception or
    # failed request may mention it. (The frontend logs errors of its own at start-up, e.g. a TypeError in its
    # graph view and 404s for user settings; those name no extension.)
    assert not frontend.report.mentioning(PACK_PATTERN), frontend.report.mentioning(PACK_PATTERN)


@pytest.mark.parametrize("path", WORKFLOWS, ids=lambda p: p.stem)
def test_every_example_workflow_opens_from_the_template_browser(frontend, path):
    workflow = json.loads(path.read_text())
    mark = frontend.report.mark()
    frontend.load_template(MODULE, path.stem, expected_nodes=len(workflow["nodes"]))
    shot = frontend.screenshot(ARTIFACTS / f"{path.stem}.png")
    nodes = frontend.graph_nodes()
    assert sorted(n["type"] for n in nodes) == sorted(n["type"] for n in workflow["nodes"])
    assert all(n["known"] for n in nodes), [n["type"] for n in nodes if not n["known"]]
    dialogs = frontend.dialogs()
    assert not [d for d in dialogs if "missing" in d.lower()], dialogs
    errors = frontend.report.since(mark)
    assert not errors.mentioning(PACK_PATTERN), errors.mentioning(PACK_PATTERN)
    assert not errors.exceptions, errors.exceptions
    assert shot.stat().st_size > 10_000
    controls = frontend.seed_controls()  # long runs keep their seed, so an unchanged graph is not re-run
    assert all(value == "fixed" for _, value in controls), controls
    cramped = [r for r in frontend.preview_room(PREVIEW_NODES) if r["height"] + r["gap"] < r["needed"] + PREVIEW_ROOM]
    assert not cramped, cramped  # a running node's preview would grow over its neighbour below
    left, top = frontend.graph_corner()  # the saved view opens the graph clear of the sidebar and the top bars
    sidebar, bars = frontend.chrome_edges(path.stem)
    assert left >= sidebar and top >= bars, (left, top, sidebar, bars)
    frontend.close_dialogs()


def test_running_the_camera_rig_shows_the_rig_picture_and_its_json_on_the_preview_node(frontend):
    """Queued from the Run button: Preview Cameras shows its drawing and, in its text box, the rig as JSON."""
    mark = open_template(frontend, "Camera rig")
    frontend.run()
    text = frontend.wait_for_node("Compose3D_PreviewCameras", "node.widgets?.find(w => w.name === "
                                  "'compose3d_report')?.value")
    images = frontend.wait_for_node("Compose3D_PreviewCameras", "node.imgs?.length")
    frontend.screenshot(ARTIFACTS / "Camera rig_run.png")
    rig = json.loads(text)
    assert rig["views"] == 4 and rig["elevation_deg"] == [15.0] * 4 and len(rig["c2w"]) == 4
    assert images == 1
    saved = frontend.page.evaluate("() => window.app.graph.serialize().nodes.find("
                                   "n => n.type === 'Compose3D_PreviewCameras').widgets_values ?? []")
    assert not any(isinstance(v, str) and '"views"' in v for v in saved), saved  # the report is not saved
    assert not frontend.report.since(mark).mentioning(PACK_PATTERN)


def toy_colour_pixels(path: Path) -> int:
    """How many pixels of a screenshot have the toy's yellow (its head): a textured mesh shows it, a grey or
    untextured one does not."""
    rgb = np.asarray(Image.open(path).convert("RGB")).astype(int)
    r, g, b = rgb[..., 0], rgb[..., 1], rgb[..., 2]
    return int(((r - b > 70) & (g - b > 50)).sum())


def test_the_demo_runs_from_the_run_button_with_a_live_preview_and_its_mesh_in_preview3d(frontend):
    """The README's main job as a user runs it (at the server tests' sizes): the reconstruction shows its progress
    preview while it trains, then the input views, the turntable and the exported mesh appear."""
    mark = open_template(frontend, "Reconstruction demo", TEST_SIZES)
    frontend.run()
    assert frontend.wait_for_node("SaveAnimatedWEBP", "node.imgs?.length", timeout=300) == 1
    assert frontend.wait_for_node("PreviewImage", "node.imgs?.length") == 20  # the input views: 8 + 8 + 4 cameras
    mesh = frontend.wait_for_node("Preview3D", "node.widgets.find(w => w.name === 'model_file')?.value")
    frontend.screenshot(ARTIFACTS / "Reconstruction demo_run.png")
    assert mesh.startswith("Compose3D/demo_toy") and mesh.endswith(".glb"), mesh
    shot = ARTIFACTS / "Reconstruction demo_preview3d.png"
    coloured = frontend.wait_until(lambda: toy_colour_pixels(frontend.node_screenshot("Preview3D", shot)) > 200,
                                   timeout=30)
    assert coloured, f"Preview3D does not show the .glb in the toy's colours ({toy_colour_pixels(shot)} pixels)"
    nerf = next(n["id"] for n in frontend.graph_nodes() if n["type"] == "Compose3D_NeRFFromViews")
    assert str(nerf) in frontend.previews_seen()
    errors = frontend.report.since(mark)
    assert not errors.mentioning(PACK_PATTERN) and not errors.exceptions, (errors.mentioning(PACK_PATTERN),
                                                                           errors.exceptions)


def test_the_frontends_own_vue_i18n_shows_our_locale_strings_verbatim(frontend, comfy_server):
    """What GET /i18n serves for "en" (locales/en), put through the vue-i18n build the page itself loads (its
    import map's), set up as the frontend does: every message shows exactly the schema's text (vue-i18n syntax
    such as "|" in a tooltip is escaped by scripts/make_locales.py)."""
    from test_locales import entry_from_object_info, leaves

    served = comfy_server.get_json("/i18n")["en"]
    info = comfy_server.get_json("/object_info")
    # the plain text the frontend shows without our locale, straight from /object_info: the oracle
    expected = leaves({"nodeDefs": {name: entry_from_object_info(node) for name, node in info.items()
                                    if node.get("python_module", "").endswith(MODULE)}})
    module = frontend.page.evaluate("""() => {
        const map = JSON.parse(document.querySelector('script[type=importmap]').textContent);
        return map.imports['vue-i18n'];
    }""")
    shown = frontend.page.evaluate("""async ([module, messages, keys]) => {
        const { createI18n } = await import(module);
        const i18n = createI18n({ legacy: false, locale: 'en', fallbackLocale: 'en', messages: { en: {} },
                                  missingWarn: false, fallbackWarn: false });
        i18n.global.mergeLocaleMessage('en', messages);
        const shown = {};
        for (const key of keys) {
            try { shown[key] = i18n.global.te(key) ? i18n.global.t(key) : null; }
            catch (e) { shown[key] = 'compile error: ' + e.message; }
        }
        return shown;
    }""", [module, served, sorted(expected)])
    wrong = {key: (shown[key], text) for key, text in expected.items() if shown[key] != text}
    assert not wrong, f"{len(wrong)} messages the frontend would show differently (shown, schema): {wrong}"
    tooltip = shown["nodeDefs.Compose3D_ViewConsistency.outputs.2.tooltip"]
    assert "|" in tooltip  # a vue-i18n plural separator, shown as text because it is escaped


def test_a_textured_obj_from_export_mesh_shows_textured_in_preview3d(frontend):
    """Runs after the demo test, at the same sizes: ComfyUI reuses the demo run's NeRF and only the export and
    the viewer run again. The hand-off to core Preview3D for .obj: the demo exports .obj (+ .mtl + .png) instead of .glb; the
    viewer fetches all three (the material names the texture next to it) and shows the toy in its colours."""
    mark = open_template(frontend, "Reconstruction demo", {
        **TEST_SIZES, "Compose3D_ExportMesh": {**TEST_SIZES["Compose3D_ExportMesh"], "format": "obj"}})
    served = len(frontend.served)
    frontend.run()
    mesh = frontend.wait_for_node("Preview3D", "(v => v?.endsWith('.obj') && v)(node.widgets.find("
                                  "w => w.name === 'model_file')?.value)", timeout=300)
    stem = mesh.rsplit("/", 1)[-1][:-len(".obj")]
    wanted = [f"filename={stem}.{ext}" for ext in ("obj", "mtl", "png")]

    def missing():
        fetched = [unquote(e) for e in frontend.served[served:] if e.startswith("200 ")]
        return [w for w in wanted if not any(w in e for e in fetched)]

    assert frontend.wait_until(lambda: not missing()), (missing(), frontend.served[served:])
    shot = ARTIFACTS / "Reconstruction demo_obj_preview3d.png"  # the texture shows once the viewer has loaded it
    coloured = frontend.wait_until(lambda: toy_colour_pixels(frontend.node_screenshot("Preview3D", shot)) > 200,
                                   timeout=30)
    assert coloured, f"the .obj shows without its texture ({toy_colour_pixels(shot)} toy-coloured pixels)"
    errors = frontend.report.since(mark)
    assert not errors.mentioning(PACK_PATTERN) and not errors.failed_requests, (errors.mentioning(PACK_PATTERN),
                                                                                errors.failed_requests)
    # the broken variant: the same mesh without colours shows no toy colour (only NeRF-free Export Mesh re-runs)
    frontend.set_widgets("Compose3D_ExportMesh", {"colors": "none"})
    frontend.run()
    frontend.wait_for_node("Preview3D", f"(v => v?.endsWith('.obj') && v !== {json.dumps(mesh)} && v)("
                           "node.widgets.find(w => w.name === 'model_file')?.value)", timeout=120)
    plain = ARTIFACTS / "Reconstruction demo_obj_uncoloured.png"  # once the viewer has swapped the file
    grey = frontend.wait_until(lambda: toy_colour_pixels(frontend.node_screenshot("Preview3D", plain)) < 20,
                               timeout=30)
    assert grey, toy_colour_pixels(plain)
    # (the viewer asks for a .mtl next to any .obj: for this one, which has none, the page logs a 404)


#: Core nodes that show a run's results, and what the template's run must have made them show.
RESULT_NODES = ["PreviewImage", "SaveImage", "SaveAnimatedWEBP", "Preview3D"]


@pytest.mark.parametrize("stem", sorted(TINY_RUNS))
def test_a_template_that_needs_models_runs_from_the_run_button_on_the_tiny_models(frontend, comfy_server, stem):
    """As a user with the models would: open the template, make it small (tests/tiny_runs.py: steps and sizes
    only; the loaders keep the template's file names, under which the server lists the tiny models), press Run.
    The run succeeds, the long node shows its live preview while it runs, and every preview/save node shows
    its images (Preview3D its mesh)."""
    sizes, live = TINY_RUNS[stem]
    workflow = json.loads((PACK_ROOT / "example_workflows" / f"{stem}.json").read_text())
    subject_photo(comfy_server)  # Make-Your-3D's subject.png, in the server's input folder
    mark = open_template(frontend, stem, sizes)
    frontend.run()
    end = frontend.wait_for_execution(timeout=300)
    assert end == {"status": "success"}, end
    wanted = sorted({n["type"] for n in workflow["nodes"]} & set(RESULT_NODES))
    shown = frontend.wait_for_results(wanted)
    frontend.screenshot(ARTIFACTS / f"{stem}_run.png")
    assert sorted(shown) == wanted, shown
    assert all(name.endswith(".glb") for name in shown.get("Preview3D", [])), shown
    seen = set(frontend.previews_seen())
    missing = [n["type"] for n in frontend.graph_nodes() if n["type"] in live and str(n["id"]) not in seen]
    assert not missing, f"no live preview on {missing}"
    frontend.close_dialogs()
    errors = frontend.report.since(mark)
    assert not errors.mentioning(PACK_PATTERN) and not errors.exceptions, (errors.mentioning(PACK_PATTERN),
                                                                           errors.exceptions)


def hex_rgb(color: str) -> tuple[int, int, int]:
    return tuple(int(color[i:i + 2], 16) for i in (1, 3, 5))


def test_the_part_affinity_template_runs_on_the_tiny_sd3_with_labelled_part_previews_on_its_nodes(frontend):
    """From the Run button, with the tiny SD3 listed under the template's file name: SD3 Attention Capture shows
    its heat maps on itself and Render Part Maps its coloured parts, each with the extension's legend drawn
    above them, read back from the canvas pixels (a chip's pixel is its part's colour)."""
    mark = open_template(frontend, "Part maps - SD3 capture and Part-Affinity NeRF", PART_TEST_SIZES)
    frontend.run()
    # the run's images replace the live preview: one per view (8 captured, 4 rendered)
    shown = "node.widgets?.some(w => w.name === 'compose3d_legend') && node.imgs?.length === {0} && {0}"
    assert frontend.wait_for_node("Compose3D_RenderPartMaps", shown.format(4), timeout=300) == 4
    assert frontend.wait_for_node("Compose3D_SD3AttentionCapture", shown.format(8)) == 8
    for node_type, layout in (("Compose3D_SD3AttentionCapture", "columns"), ("Compose3D_RenderPartMaps", "colors")):
        chips = frontend.legend_pixels(node_type)
        frontend.screenshot(ARTIFACTS / f"Part maps_run_{node_type.split('_')[1]}.png")
        assert [c["name"] for c in chips] == ["head", "body", "base"], (node_type, chips)
        assert all(c["layout"] == layout for c in chips)
        off = [c for c in chips if max(abs(a - b) for a, b in zip(c["pixel"], hex_rgb(c["color"]))) > 3]
        assert not off, off  # each chip is on the canvas in its part's colour
    seen = frontend.previews_seen()
    ids = {n["type"]: str(n["id"]) for n in frontend.graph_nodes()}
    assert ids["Compose3D_SD3AttentionCapture"] in seen, seen
    saved = frontend.page.evaluate("() => JSON.stringify(window.app.graph.serialize())")
    assert "drawnChips" not in saved and '"layout"' not in saved  # the legend is not saved with the workflow
    errors = frontend.report.since(mark)
    assert not errors.mentioning(PACK_PATTERN) and not errors.exceptions, (errors.mentioning(PACK_PATTERN),
                                                                           errors.exceptions)


def test_a_pack_node_added_by_hand_starts_with_a_fixed_seed(frontend):
    for node_type in ("Compose3D_NeRFFromViews", "Compose3D_SDSOptimizer", "Compose3D_IdentityTuner"):
        assert frontend.new_node_seed_control(node_type) == "fixed", node_type
    assert frontend.new_node_seed_control("KSampler") == "randomize"  # core nodes keep the frontend's default


def test_a_workflow_with_an_unknown_node_type_is_caught(frontend):
    """The broken variant: the same checks flag a node type the server does not have."""
    broken = json.loads(WORKFLOWS[0].read_text())
    broken["nodes"][0]["type"] = "Compose3D_NoSuchNode"
    frontend.load_graph(broken)
    nodes = frontend.graph_nodes()
    unknown = [n["type"] for n in nodes if not n["known"]]
    missing = [d for d in frontend.dialogs() if "missing" in d.lower()]
    frontend.screenshot(ARTIFACTS / "broken_unknown_node.png")
    frontend.close_dialogs()
    assert unknown == ["Compose3D_NoSuchNode"]
    assert missing and "Compose3D_NoSuchNode" in missing[0], missing
