"""Write the pack's English locale files (locales/en/) from the node schemas, the one source of truth.

ComfyUI serves ``<pack>/locales/<lang>/main.json`` (with ``nodeDefs.json`` merged in under the key ``nodeDefs``)
at ``GET /i18n``; the frontend merges that into its vue-i18n messages and looks our strings up by these keys
(ComfyUI frontend 1.32.9):

    nodeDefs.<node id>.display_name                  node title, node library, search
    nodeDefs.<node id>.description                   node tooltip
    nodeDefs.<node id>.inputs.<input id>.name        input slot / widget label (falls back to the input id)
    nodeDefs.<node id>.inputs.<input id>.tooltip     input and widget tooltips
    nodeDefs.<node id>.outputs.<index>.name          output slot label (read when the name differs from the type)
    nodeDefs.<node id>.outputs.<index>.tooltip       output tooltip
    nodeCategories.<one segment of a category>       node library folders ("Compose3D/cameras" is two segments)

Ids in keys go through the frontend's ``normalizeI18nKey`` ("." becomes "_"). Values are vue-i18n messages, in
which ``{ } @ $ |`` (and ``%`` before ``{``) are syntax: those characters are written as literal interpolations
(``{'|'}``), so the frontend shows exactly the schema's text.

    python scripts/make_locales.py           write locales/en/*.json
    python scripts/make_locales.py --check   exit 1 if the committed files differ from the schemas

Runs on the CPU (ComfyUI imported with --cpu); nothing here needs a GPU.
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

LOCALE_DIR = ROOT / "locales" / "en"
#: Characters vue-i18n's message compiler treats as syntax (interpolation, linked messages, plural cases); "%" only
#: before "{" (the "%{name}" form).
SPECIAL = "{}@$|"


def normalize_key(key: str) -> str:
    """The frontend's ``normalizeI18nKey``: a dot would split the message path."""
    return key.replace(".", "_")


def escape_message(text: str) -> str:
    """``text`` as a vue-i18n message that displays exactly ``text`` (syntax characters as ``{'c'}`` literals)."""
    return "".join(f"{{'{c}'}}" if c in SPECIAL or (c == "%" and text[i + 1:i + 2] == "{") else c
                   for i, c in enumerate(text))


def escape_tree(obj):
    """``obj`` with every string value escaped (keys are kept)."""
    if isinstance(obj, dict):
        return {key: escape_tree(value) for key, value in obj.items()}
    return escape_message(obj) if isinstance(obj, str) else obj


def pack_nodes() -> list:
    """The pack's node classes, imported the way the tests import them (ComfyUI on the CPU)."""
    from harness.inprocess import init_comfy

    init_comfy("cpu")
    from compose3d.nodes import NODES

    return list(NODES)


def node_entry(schema) -> dict:
    """One ``nodeDefs`` entry (plain text): what /object_info says of the node, under the keys the frontend reads."""
    entry: dict = {}
    if schema.display_name:
        entry["display_name"] = schema.display_name
    if schema.description:
        entry["description"] = schema.description
    inputs = {}
    for inp in schema.inputs:
        item = {"name": inp.display_name or inp.id}
        if inp.tooltip:
            item["tooltip"] = inp.tooltip
        key = normalize_key(inp.id)
        if key in inputs:
            raise ValueError(f"{schema.node_id}: input {inp.id!r} and another share the locale key {key!r}")
        inputs[key] = item
    if inputs:
        entry["inputs"] = inputs
    outputs = {}
    for index, out in enumerate(schema.outputs):
        # /object_info's output_name: the display name, else the type (comfy_api's Schema.get_v1_info).
        item = {"name": out.display_name or out.io_type}
        if out.tooltip:
            item["tooltip"] = out.tooltip
        outputs[str(index)] = item
    if outputs:
        entry["outputs"] = outputs
    return entry


def node_defs(nodes) -> dict:
    """nodeDefs.json's content as plain text (not yet escaped)."""
    defs = {}
    for node in nodes:
        schema = node.GET_SCHEMA()
        if "." in schema.node_id:
            # The node library looks nodeDefs up by the raw id, the canvas by the normalized one.
            raise ValueError(f"node id {schema.node_id!r} has a dot: the frontend would look it up two ways")
        defs[schema.node_id] = node_entry(schema)
    return defs


def main_messages(nodes) -> dict:
    """main.json's content as plain text: the node library's folder names, one per category segment (in English
    the segment itself; listed so that the keys exist for other languages)."""
    segments = {seg for node in nodes for seg in (node.GET_SCHEMA().category or "").split("/") if seg}
    return {"nodeCategories": {seg: seg for seg in segments}}


def render(obj: dict) -> str:
    return json.dumps(obj, indent=2, sort_keys=True, ensure_ascii=False) + "\n"


def generate(nodes=None) -> dict[str, str]:
    """File name (under locales/en/) -> the text it should hold."""
    nodes = pack_nodes() if nodes is None else nodes
    return {"main.json": render(escape_tree(main_messages(nodes))),
            "nodeDefs.json": render(escape_tree(node_defs(nodes)))}


def stale(files: dict[str, str]) -> list[str]:
    """The files of ``files`` that are missing from locales/en/ or hold other text."""
    return sorted(name for name, text in files.items()
                  if not (LOCALE_DIR / name).is_file() or (LOCALE_DIR / name).read_text(encoding="utf-8") != text)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--check", action="store_true", help="only compare; exit 1 if locales/en/ is stale")
    args = parser.parse_args(argv)
    files = generate()
    if args.check:
        wrong = stale(files)
        if wrong:
            print(f"stale: {', '.join(wrong)} in {LOCALE_DIR}; run: python scripts/make_locales.py", file=sys.stderr)
            return 1
        print("locales/en is up to date")
        return 0
    LOCALE_DIR.mkdir(parents=True, exist_ok=True)
    for name, text in files.items():
        (LOCALE_DIR / name).write_text(text, encoding="utf-8")
        print(f"wrote {(LOCALE_DIR / name).relative_to(ROOT)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
