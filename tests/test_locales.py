"""locales/en/: the frontend's English strings for the pack's nodes, generated from the schemas by
scripts/make_locales.py, served by ComfyUI at GET /i18n, equal to /object_info, and shown verbatim by the
frontend's own vue-i18n."""
from __future__ import annotations

import importlib.util
import json
import re
import shutil
import subprocess
from pathlib import Path

import pytest

from harness.paths import PACK_ROOT

SCRIPT = PACK_ROOT / "scripts" / "make_locales.py"
LOCALES = PACK_ROOT / "locales" / "en"
RUN_IT = "run: python scripts/make_locales.py (and commit locales/en/)"


@pytest.fixture(scope="module")
def script():
    spec = importlib.util.spec_from_file_location("make_locales", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="module")
def nodes(script):
    return script.pack_nodes()


def read_locale(name: str) -> dict:
    return json.loads((LOCALES / name).read_text(encoding="utf-8"))


def leaves(tree: dict, prefix: str = "") -> dict[str, str]:
    """Dotted message key -> message, as vue-i18n resolves keys in nested messages."""
    out = {}
    for key, value in tree.items():
        path = f"{prefix}{key}"
        if isinstance(value, dict):
            out.update(leaves(value, path + "."))
        else:
            out[path] = value
    return out


# -- the committed files are what the schemas give now ----------------------------------------------------------
def test_committed_locales_are_generated_from_the_current_schemas(script, nodes):
    files = script.generate(nodes)
    assert sorted(files) == ["main.json", "nodeDefs.json"]
    wrong = script.stale(files)
    assert not wrong, f"locales/en/{', '.join(wrong)} differ from the node schemas: {RUN_IT}"


def test_every_pack_node_input_and_output_has_its_strings(script, nodes):
    defs = read_locale("nodeDefs.json")
    assert set(defs) == {node.GET_SCHEMA().node_id for node in nodes}
    for node in nodes:
        schema = node.GET_SCHEMA()
        entry = defs[schema.node_id]
        assert entry["display_name"] and entry["description"], schema.node_id
        assert set(entry.get("inputs", {})) == {i.id.replace(".", "_") for i in schema.inputs}, schema.node_id
        assert sorted(int(k) for k in entry.get("outputs", {})) == list(range(len(schema.outputs))), schema.node_id
        for key, item in {**entry.get("inputs", {}), **entry.get("outputs", {})}.items():
            assert item.get("name") and item.get("tooltip"), f"{schema.node_id}: {key}"
    categories = read_locale("main.json")["nodeCategories"]
    assert {seg for node in nodes for seg in node.GET_SCHEMA().category.split("/")} == set(categories)
    assert categories["Compose3D"] == "Compose3D"


def test_messages_escape_vue_i18n_syntax(script):
    assert script.escape_message("Per view: [a | b]") == "Per view: [a {'|'} b]"
    assert script.escape_message("{x} a@b $1 50% %{y}") == "{'{'}x{'}'} a{'@'}b {'$'}1 50% {'%'}{'{'}y{'}'}"
    assert script.escape_message("plain (text), 'quoted' \"too\"") == "plain (text), 'quoted' \"too\""


# -- the frontend's own vue-i18n shows exactly the schema's text ------------------------------------------------
NODE_CHECK = """
import { createI18n } from './vue-i18n.mjs';
import { readFileSync } from 'node:fs';
const input = JSON.parse(readFileSync(0, 'utf8'));
// As the frontend sets it up (createI18n, composition mode) and loads GET /i18n (mergeLocaleMessage).
const i18n = createI18n({ legacy: false, locale: 'en', fallbackLocale: 'en', messages: { en: {} },
                          missingWarn: false, fallbackWarn: false });
i18n.global.mergeLocaleMessage('en', input.messages);
const shown = {};
for (const key of input.keys) {
  try { shown[key] = i18n.global.te(key) ? i18n.global.t(key) : null; }
  catch (e) { shown[key] = 'compile error: ' + e.message; }
}
process.stdout.write(JSON.stringify(shown));
"""


def frontend_vue_i18n(tmp_path: Path) -> Path:
    """The frontend's vue-i18n build (the one its index.html import map loads), made importable by Node."""
    import comfyui_frontend_package

    static = Path(comfyui_frontend_package.__file__).parent / "static"
    html = (static / "index.html").read_text(encoding="utf-8")
    paths = {name: re.search(rf'"{name}"\s*:\s*"([^"]+)"', html) for name in ("vue", "vue-i18n")}
    if not all(paths.values()):
        pytest.skip("the frontend's index.html import map names no vue / vue-i18n build")
    vue = (static / paths["vue"].group(1)).resolve()
    source = (static / paths["vue-i18n"].group(1)).read_text(encoding="utf-8")
    patched = re.sub(r'from\s*"vue"', f'from"{vue.as_uri()}"', source)
    assert patched != source, "vue-i18n no longer imports 'vue' the way this test patches it"
    (tmp_path / "vue-i18n.mjs").write_text(patched, encoding="utf-8")
    (tmp_path / "check.mjs").write_text(NODE_CHECK, encoding="utf-8")
    return tmp_path / "check.mjs"


def test_the_frontends_vue_i18n_shows_the_schema_text_verbatim(script, nodes, tmp_path):
    node = shutil.which("node")
    if node is None:
        pytest.skip("no Node.js to run the frontend's vue-i18n")
    check = frontend_vue_i18n(tmp_path)
    # What GET /i18n serves for "en": main.json with nodeDefs.json under "nodeDefs".
    messages = {**read_locale("main.json"), "nodeDefs": read_locale("nodeDefs.json")}
    expected = leaves({**script.main_messages(nodes), "nodeDefs": script.node_defs(nodes)})
    done = subprocess.run([node, str(check)], input=json.dumps({"messages": messages, "keys": sorted(expected)}),
                          capture_output=True, text=True, timeout=60, cwd=tmp_path)
    assert done.returncode == 0, done.stderr[-2000:]
    shown = json.loads(done.stdout)
    wrong = {key: (shown[key], text) for key, text in expected.items() if shown[key] != text}
    assert not wrong, f"{len(wrong)} messages the frontend would show differently (shown, schema): {wrong}"
    assert shown["nodeDefs.Compose3D_OrbitCameras.display_name"] == "Orbit Cameras"


# -- a real server serves them, and they agree with /object_info ------------------------------------------------
def entry_from_object_info(node: dict) -> dict:
    """The nodeDefs entry (plain text) that /object_info's view of a node implies, built independently of the
    script: the frontend falls back to exactly these values when a key is missing."""
    entry: dict = {}
    for field in ("display_name", "description"):
        if node.get(field):
            entry[field] = node[field]
    inputs = {}
    for section in ("required", "optional"):
        for key, spec in node["input"].get(section, {}).items():
            options = spec[1] if len(spec) > 1 and isinstance(spec[1], dict) else {}
            item = {"name": options.get("display_name") or key}
            if options.get("tooltip"):
                item["tooltip"] = options["tooltip"]
            inputs[key.replace(".", "_")] = item
    if inputs:
        entry["inputs"] = inputs
    tips = list(node.get("output_tooltips") or [])
    outputs = {}
    for index, name in enumerate(node.get("output_name") or []):
        item = {"name": name}
        if index < len(tips) and tips[index]:
            item["tooltip"] = tips[index]
        outputs[str(index)] = item
    if outputs:
        entry["outputs"] = outputs
    return entry


@pytest.fixture(scope="module")
def served(comfy_server):
    return comfy_server.get_json("/i18n"), comfy_server.get_json("/object_info")


@pytest.mark.server
def test_i18n_serves_the_english_strings(served):
    i18n, info = served
    en = i18n["en"]
    orbit = en["nodeDefs"]["Compose3D_OrbitCameras"]
    assert orbit["display_name"] == "Orbit Cameras" == info["Compose3D_OrbitCameras"]["display_name"]
    views_tooltip = info["Compose3D_OrbitCameras"]["input"]["required"]["views"][1]["tooltip"]
    assert orbit["inputs"]["views"] == {"name": "views", "tooltip": views_tooltip}
    assert orbit["outputs"]["0"]["name"] == "cameras"
    assert en["nodeCategories"]["Compose3D"] == "Compose3D" and en["nodeCategories"]["cameras"] == "cameras"


@pytest.mark.server
def test_i18n_agrees_with_object_info_for_every_pack_node(script, served):
    i18n, info = served
    defs = i18n["en"]["nodeDefs"]
    ours = {name: node for name, node in info.items() if node.get("python_module") == "custom_nodes.compose3d"}
    assert ours and set(ours) <= set(defs), f"nodes without strings: {sorted(set(ours) - set(defs))}; {RUN_IT}"
    assert not set(defs) - set(info), f"strings for nodes the server does not have: {sorted(set(defs) - set(info))}"
    differ = sorted(name for name, node in ours.items()
                    if defs[name] != script.escape_tree(entry_from_object_info(node)))
    assert not differ, f"/i18n disagrees with /object_info for {differ}: {RUN_IT}"
    categories = i18n["en"]["nodeCategories"]
    for node in ours.values():
        for seg in node["category"].split("/"):
            assert categories.get(seg) == script.escape_message(seg), (node["name"], seg)
