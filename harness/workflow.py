"""Turn a UI-format workflow (what ComfyUI saves and the template browser loads) into an API-format prompt.

The UI format keeps widget values as a positional list per node; the API format names every input. The
mapping needs the server's ``/object_info`` (input order and which inputs are widgets), as the frontend does.
Handles links, widget values (including the extra "control after generate" value behind seed widgets),
widgets converted to inputs, muted nodes and notes. Bypassed nodes, reroutes, primitive nodes and groups
nodes are refused with a clear error rather than guessed.
"""
from __future__ import annotations

from typing import Any

WIDGET_TYPES = {"INT", "FLOAT", "STRING", "BOOLEAN", "COMBO"}
SKIPPED_TYPES = {"Note", "MarkdownNote"}
MODE_MUTED = 2
MODE_BYPASS = 4


def _is_widget(spec: list) -> bool:
    kind = spec[0]
    return isinstance(kind, list) or kind in WIDGET_TYPES


def _has_control_value(spec: list, name: str) -> bool:
    options = spec[1] if len(spec) > 1 and isinstance(spec[1], dict) else {}
    return bool(options.get("control_after_generate")) or (spec[0] == "INT" and name in ("seed", "noise_seed"))


def ui_to_api(workflow: dict, object_info: dict) -> dict[str, dict[str, Any]]:
    """Return the API prompt ``{node_id: {"class_type", "inputs"}}`` of a UI-format ``workflow``."""
    links = {link[0]: (str(link[1]), link[2]) for link in workflow.get("links", [])}
    prompt: dict[str, dict[str, Any]] = {}
    for node in workflow["nodes"]:
        kind = node["type"]
        if kind in SKIPPED_TYPES or node.get("mode", 0) == MODE_MUTED:
            continue
        if node.get("mode", 0) == MODE_BYPASS:
            raise ValueError(f"node {node['id']} ({kind}) is bypassed; un-bypass or remove it first")
        if kind not in object_info:
            raise ValueError(f"node {node['id']} has type {kind!r}, which this ComfyUI does not know "
                             f"(is the custom node pack installed?)")
        info = object_info[kind]
        inputs: dict[str, Any] = {}
        for slot in node.get("inputs", []):
            if slot.get("link") is not None:
                if slot["link"] not in links:
                    raise ValueError(f"node {node['id']} ({kind}) input {slot['name']!r} points at missing link "
                                     f"{slot['link']}")
                src, src_slot = links[slot["link"]]
                inputs[slot["name"]] = [src, src_slot]
        values = list(node.get("widgets_values") or [])
        if not isinstance(node.get("widgets_values", []), list):
            raise ValueError(f"node {node['id']} ({kind}) stores widget values as a dict; not supported")
        i = 0
        order = info.get("input_order", {})
        for section in ("required", "optional"):
            for name in order.get(section, []):
                spec = info["input"][section][name]
                if not _is_widget(spec):
                    continue
                if i >= len(values):
                    break
                if name not in inputs:  # a widget converted to an input keeps its slot in widgets_values
                    inputs[name] = values[i]
                i += 1
                if _has_control_value(spec, name):
                    i += 1
        prompt[str(node["id"])] = {"class_type": kind, "inputs": inputs}
    return prompt
