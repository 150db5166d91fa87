"""locales/en/: the frontend's English strings for the pack's nodes, generated from the schemas by
scripts/make_locales.py, served by ComfyUI at GET /i18n and equal to /object_info. (That the frontend's own
vue-i18n shows them verbatim is checked in the page, in tests/test_browser.py.)"""
from __future__ import annotations

import importlib.util
import json

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
