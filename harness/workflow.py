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


def _accepts(wanted: str, given: str) -> bool:
    """Whether an input of type ``wanted`` takes a link of type ``given`` (ComfyUI's rule: equal, a "*" on
    either side, or one of the comma-separated types)."""
    if "*" in (wanted, given):
        return True
    return bool(set(wanted.split(",")) & set(given.split(",")))


def _value_problem(spec: list, value: Any) -> str | None:
    """Why ``value`` is not allowed for a widget input declared as ``spec``, or None."""
    kind = spec[0]
    options = spec[1] if len(spec) > 1 and isinstance(spec[1], dict) else {}
    choices = kind if isinstance(kind, list) else options.get("options") if kind == "COMBO" else None
    if choices is not None:
        return None if value in choices else f"{value!r} is not one of its {len(choices)} choices"
    if kind == "BOOLEAN":
        return None if isinstance(value, bool) else f"{value!r} is not a boolean"
    if kind == "STRING":
        return None if isinstance(value, str) else f"{value!r} is not a string"
    if kind in ("INT", "FLOAT"):
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            return f"{value!r} is not a number"
        if kind == "INT" and value != int(value):
            return f"{value!r} is not a whole number"
        if value != value:
            return "is NaN"
        if "min" in options and value < options["min"]:
            return f"{value!r} is below its minimum {options['min']!r}"
        if "max" in options and value > options["max"]:
            return f"{value!r} is above its maximum {options['max']!r}"
    return None


def check_workflow(workflow: dict, object_info: dict) -> list[str]:
    """Everything in a UI-format ``workflow`` that the server described by ``object_info`` would refuse or
    that ComfyUI does not check itself (V3 combo values, NaN): unknown node types, links between unmatched
    types, required inputs left unconnected, and widget values that are not allowed (a combo value not in its
    list, e.g. a model file the server does not have; a number outside its range). Returns one line per problem;
    an empty list is a workflow that validates."""
    problems: list[str] = []
    nodes = {n["id"]: n for n in workflow["nodes"] if n["type"] not in SKIPPED_TYPES}
    unknown = [n for n in nodes.values() if n["type"] not in object_info]
    problems += [f"node {n['id']}: type {n['type']!r} is unknown to the server" for n in unknown]
    if unknown:
        return problems
    for link_id, src, src_slot, dst, dst_slot, link_type in (link[:6] for link in workflow.get("links", [])):
        if src not in nodes or dst not in nodes:
            continue  # a note or a muted node
        outputs = object_info[nodes[src]["type"]]["output"]
        given = outputs[src_slot] if src_slot < len(outputs) else None
        target = nodes[dst]["inputs"][dst_slot]["name"] if dst_slot < len(nodes[dst].get("inputs", [])) else None
        info = object_info[nodes[dst]["type"]]["input"]
        spec = info.get("required", {}).get(target) or info.get("optional", {}).get(target)
        if given is None or spec is None:
            problems.append(f"link {link_id}: node {src} output {src_slot} -> node {dst} input {target!r} do not "
                            f"exist")
            continue
        wanted = "COMBO" if isinstance(spec[0], list) else spec[0]
        if not _accepts(wanted, given if isinstance(given, str) else "COMBO"):
            problems.append(f"link {link_id}: node {src} ({nodes[src]['type']}) gives {given}, but node {dst} "
                            f"({nodes[dst]['type']}) input {target!r} takes {wanted}")
        if link_type != given and isinstance(given, str) and not _accepts(link_type, given):
            problems.append(f"link {link_id}: saved as {link_type}, but its source gives {given}")
    prompt = ui_to_api({**workflow, "nodes": [n for n in workflow["nodes"] if n["id"] in nodes]}, object_info)
    for node_id, node in prompt.items():
        info = object_info[node["class_type"]]["input"]
        for section in ("required", "optional"):
            for name, spec in info.get(section, {}).items():
                value = node["inputs"].get(name)
                where = f"node {node_id} ({node['class_type']}) input {name!r}"
                if value is None:
                    if section == "required":
                        problems.append(f"{where}: required, but neither linked nor set")
                    continue
                if isinstance(value, list) and len(value) == 2 and isinstance(value[0], str):
                    continue  # a link, checked above
                if _is_widget(spec):
                    problem = _value_problem(spec, value)
                    if problem:
                        problems.append(f"{where}: {problem}")
    return problems
