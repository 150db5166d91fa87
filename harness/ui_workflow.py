"""Build UI-format workflows (what the template browser loads) in code, for the example-workflow scripts."""
from __future__ import annotations

import json
import uuid
from pathlib import Path


class Workflow:
    def __init__(self):
        self.nodes, self.links = [], []

    def node(self, kind: str, pos, size, widgets=(), inputs=(), outputs=(), title=None):
        """``inputs``: (name, type, (from node, slot) or None, is_widget); ``outputs``: (name, type)."""
        node = {"id": len(self.nodes) + 1, "type": kind, "pos": list(pos), "size": list(size), "flags": {},
                "order": len(self.nodes), "mode": 0, "inputs": [],
                "outputs": [{"name": n, "type": t, "links": [], "slot_index": i} for i, (n, t) in enumerate(outputs)],
                "properties": {"Node name for S&R": kind}, "widgets_values": list(widgets)}
        if title:
            node["title"] = title
        self.nodes.append(node)
        for slot, (name, kind_, source, widget) in enumerate(inputs):
            entry = {"name": name, "type": kind_, "link": None}
            if widget:
                entry["widget"] = {"name": name}
            node["inputs"].append(entry)
            if source is not None:
                self.link(source, node["id"], slot)
        return node["id"]

    def link(self, source, target: int, slot: int) -> None:
        origin, out_slot = source
        link_id = len(self.links) + 1
        out = self.nodes[origin - 1]["outputs"][out_slot]
        self.links.append([link_id, origin, out_slot, target, slot, out["type"]])
        out["links"].append(link_id)
        self.nodes[target - 1]["inputs"][slot]["link"] = link_id

    def save(self, folder: Path, name: str) -> None:
        data = {"id": str(uuid.uuid5(uuid.NAMESPACE_URL, name)), "revision": 0, "last_node_id": len(self.nodes),
                "last_link_id": len(self.links), "nodes": self.nodes, "links": self.links, "groups": [],
                "config": {}, "extra": {"ds": opening_view(self.nodes)}, "version": 0.4}
        (folder / name).write_text(json.dumps(data, indent=1) + "\n")


#: Where a workflow's top-left node lands when it opens, in screen pixels from the canvas's corner: right of the
#: frontend's left sidebar (about 60 px) and below its banner, tab bar and floating menus (about 130 px).
OPENING_CORNER = (100, 150)
#: Height of a node's title bar above its ``pos`` (LiteGraph's NODE_TITLE_HEIGHT), in canvas units.
TITLE_HEIGHT = 30


def opening_view(nodes: list[dict], scale: float = 0.75) -> dict:
    """The saved view (``extra.ds``) that opens ``nodes`` at ``scale`` with their top-left corner (title bars
    included) at :data:`OPENING_CORNER`. The frontend draws canvas point p at screen (p + offset) * scale."""
    left = min(n["pos"][0] for n in nodes)
    top = min(n["pos"][1] for n in nodes) - TITLE_HEIGHT
    return {"scale": scale, "offset": [round(OPENING_CORNER[0] / scale - left, 1),
                                       round(OPENING_CORNER[1] / scale - top, 1)]}


def schema_widgets(node_cls, **changes) -> list:
    """A V3 node's widget values in schema order: its defaults with ``changes``, and 'fixed' after a seed."""
    values = []
    for spec in node_cls.define_schema().inputs:
        if spec.get_io_type() not in ("INT", "FLOAT", "STRING", "COMBO", "BOOLEAN"):
            continue
        values.append(changes.get(spec.id, spec.default))
        if spec.id == "seed":
            values.append("fixed")
    return values
