"""The real ComfyUI frontend in Debian's headless Chromium, driven by Playwright (no browser download).

:func:`chromium_path` finds the system Chromium (``COMPOSE3D_CHROMIUM`` or ``chromium`` on PATH;
``scripts/setup.sh`` installs Debian's package when it is missing). :class:`Frontend` opens a ComfyUI server's page,
records what the page reports (console errors, uncaught exceptions, failed requests) and works the template
browser as a user does.
"""
from __future__ import annotations

import os
import re
import shutil
import time
from dataclasses import dataclass, field
from pathlib import Path

#: Chromium flags for a closed network: no background connections, no sandbox (tests run as root in CI).
CHROMIUM_ARGS = ("--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                 "--disable-background-networking", "--disable-component-update", "--disable-sync",
                 "--disable-dev-shm-usage")
VIEWPORT = {"width": 1600, "height": 1000}


def chromium_path() -> str:
    """Debian's Chromium: ``COMPOSE3D_CHROMIUM`` if set, else ``chromium`` on PATH. Raises with what to do."""
    found = os.environ.get("COMPOSE3D_CHROMIUM") or shutil.which("chromium") or shutil.which("chromium-browser")
    if not found or not Path(found).exists():
        raise RuntimeError("no Chromium found: the browser tests drive Debian's Chromium (scripts/setup.sh installs "
                           "the 'chromium' package with apt-get when it can); or set COMPOSE3D_CHROMIUM")
    return found


@dataclass
class PageReport:
    """What the page reported: console errors, uncaught exceptions and HTTP failures (status >= 400) of the
    server's own origin; ``offsite`` keeps the console errors of requests to other hosts (the frontend looks node
    types up on its registry, which a closed network cannot reach) apart."""
    console_errors: list[str] = field(default_factory=list)
    exceptions: list[str] = field(default_factory=list)
    failed_requests: list[str] = field(default_factory=list)
    offsite: list[str] = field(default_factory=list)

    def mark(self) -> tuple[int, int, int]:
        return len(self.console_errors), len(self.exceptions), len(self.failed_requests)

    def since(self, mark: tuple[int, int, int]) -> "PageReport":
        a, b, c = mark
        return PageReport(self.console_errors[a:], self.exceptions[b:], self.failed_requests[c:])

    def mentioning(self, pattern: str) -> list[str]:
        """Every entry whose text (message, stack or URL) matches ``pattern`` (case-insensitive)."""
        rx = re.compile(pattern, re.IGNORECASE)
        return [e for e in self.console_errors + self.exceptions + self.failed_requests if rx.search(e)]


class Frontend:
    """One page of a ComfyUI server's frontend.

    Args:
        browser: a Playwright ``Browser``.
        url: the server's address (``ComfyServer.url``).
    """

    def __init__(self, browser, url: str):
        self.url = url
        self.report = PageReport()
        self.served: list[str] = []  # "status url" of every response from the server's own origin
        self.page = browser.new_page(viewport=VIEWPORT)
        self.page.on("console", self._console)
        self.page.on("pageerror", lambda error: self.report.exceptions.append(f"{error}\n{error.stack or ''}"))
        self.page.on("response", self._response)

    def _console(self, message) -> None:
        if message.type == "error":
            where = message.location.get("url", "") if message.location else ""
            offsite = where.startswith(("http://", "https://")) and not where.startswith(self.url)
            (self.report.offsite if offsite else self.report.console_errors).append(f"{message.text} @ {where}")

    def _response(self, response) -> None:
        if response.url.startswith(self.url):
            self.served.append(f"{response.status} {response.url}")
        if response.status >= 400 and response.url.startswith(self.url):
            self.report.failed_requests.append(f"{response.status} {response.url}")

    def open(self, timeout: float = 90.0) -> "Frontend":
        """Load the app and wait until its graph and the node definitions are there."""
        self.page.goto(self.url, wait_until="load", timeout=timeout * 1000)
        self.page.wait_for_function("() => window.app && window.app.graph && window.LiteGraph && "
                                    "Object.keys(window.LiteGraph.registered_node_types).length > 0",
                                    timeout=timeout * 1000)
        return self

    # -- what the app knows ------------------------------------------------------------------------
    def extension_names(self) -> list[str]:
        return self.page.evaluate("() => (window.app.extensions || []).map(e => e.name)")

    def registered(self, node_types: list[str]) -> dict[str, bool]:
        return self.page.evaluate("types => Object.fromEntries(types.map(t => "
                                  "[t, t in window.LiteGraph.registered_node_types]))", node_types)

    def graph_nodes(self) -> list[dict]:
        """The open graph's nodes: id, type, title, and whether the frontend knows the type."""
        return self.page.evaluate("() => window.app.graph._nodes.map(n => ({id: n.id, type: n.type, "
                                  "title: n.title, known: n.type in window.LiteGraph.registered_node_types}))")

    def seed_controls(self) -> list[tuple[str, str]]:
        """(node type, "control after generate" value) of every seed control in the open graph."""
        return [tuple(x) for x in self.page.evaluate(
            "() => window.app.graph._nodes.flatMap(n => (n.widgets || [])"
            ".filter(w => w.name === 'control_after_generate').map(w => [n.type, w.value]))")]

    def new_node_seed_control(self, node_type: str) -> str | None:
        """The seed control's value of a ``node_type`` node freshly created (as the node library adds one)."""
        return self.page.evaluate("""type => {
            const node = window.LiteGraph.createNode(type);
            const w = (node.widgets || []).find(w => w.name === 'control_after_generate');
            return w ? w.value : null;
        }""", node_type)

    def run(self) -> None:
        """Press the Run button (queues the open workflow)."""
        self.page.get_by_role("button", name="Run").first.click()

    def wait_for_node(self, node_type: str, condition: str, timeout: float = 120.0):
        """Wait until the JavaScript expression ``condition`` (over ``node``, the first ``node_type`` node of the
        open graph) is truthy, and return its value."""
        return self.page.wait_for_function(
            f"type => {{ const node = window.app.graph._nodes.find(n => n.type === type); "
            f"return node ? ({condition}) : null; }}", arg=node_type, timeout=timeout * 1000).json_value()

    def preview_room(self, node_types: list[str]) -> list[dict]:
        """For each node of ``node_types`` in the open graph: the height its slots and widgets need
        (``computeSize``), its height, and the free height below it down to the next node that overlaps its
        column (canvas units; a large number when none) — the room a progress preview can take."""
        return self.page.evaluate("""types => {
            const nodes = window.app.graph._nodes, title = window.LiteGraph.NODE_TITLE_HEIGHT;
            return nodes.filter(n => types.includes(n.type)).map(n => {
                const [x0, y0] = n.pos, x1 = x0 + n.size[0], y1 = y0 + n.size[1];
                const below = nodes.filter(m => m !== n && m.pos[0] < x1 && m.pos[0] + m.size[0] > x0
                                                 && m.pos[1] - title >= y1 - 5);
                const gap = Math.min(1e6, ...below.map(m => m.pos[1] - title - y1));
                return {id: n.id, type: n.type, needed: n.computeSize()[1], height: n.size[1], gap};
            });
        }""", node_types)

    def set_widgets(self, node_type: str, values: dict, title: str | None = None) -> None:
        """Set widget values on every ``node_type`` node of the open graph (only the one titled ``title`` if
        given), as typing them in would."""
        self.page.evaluate("""([type, values, title]) => {
            const nodes = window.app.graph._nodes.filter(n => n.type === type && (title === null || n.title === title));
            if (!nodes.length) throw new Error(`no ${type} node titled ${title}`);
            for (const node of nodes)
                for (const [name, value] of Object.entries(values)) {
                    const widget = node.widgets.find(w => w.name === name);
                    widget.value = value;
                    widget.callback?.(value);
                }
        }""", [node_type, values, title])

    def watch_previews(self) -> None:
        """Start noting which nodes get a live preview (``app.nodePreviewImages``) while a prompt runs."""
        self.page.evaluate("""() => { window.__c3dPreviews = new Set(); clearInterval(window.__c3dWatch);
            window.__c3dWatch = setInterval(() => { for (const id of Object.keys(window.app.nodePreviewImages || {}))
                window.__c3dPreviews.add(id); }, 50); }""")

    def watch_execution(self) -> None:
        """Start listening for the end of the next prompt (the server's execution_success / _error /
        _interrupted messages, as the frontend receives them)."""
        self.page.evaluate("""() => { window.__c3dEnd = null;
            if (window.__c3dEndListening) return;
            window.__c3dEndListening = true;
            const api = window.app.api;
            api.addEventListener('execution_success', () => { window.__c3dEnd = {status: 'success'}; });
            api.addEventListener('execution_interrupted', () => { window.__c3dEnd = {status: 'interrupted'}; });
            api.addEventListener('execution_error', e => { window.__c3dEnd = {status: 'error',
                node: e.detail?.node_type, message: e.detail?.exception_message}; });
        }""")

    def wait_for_execution(self, timeout: float = 300.0) -> dict:
        """How the prompt queued since :meth:`watch_execution` ended: ``{"status": "success"}``, or the error's
        node type and message."""
        return self.page.wait_for_function("() => window.__c3dEnd", timeout=timeout * 1000).json_value()

    def wait_for_results(self, node_types: list[str], timeout: float = 60.0) -> dict[str, list]:
        """Wait until every node of ``node_types`` in the open graph has its result to show (its images in the
        frontend's output store, which a node draws from once it is on screen, or a model file in Preview3D) and
        return, per node type, what each node shows: image counts or model file names.
        On a timeout, raises AssertionError naming what each node shows."""
        state = """types => {
            const shown = {};
            for (const node of window.app.graph._nodes.filter(n => types.includes(n.type))) {
                const value = node.type === 'Preview3D'
                    ? node.widgets.find(w => w.name === 'model_file')?.value || null
                    : window.app.nodeOutputs?.[String(node.id)]?.images?.length || node.imgs?.length || null;
                (shown[node.type] ??= []).push(value ?? `nothing on node ${node.id} (${node.title})`);
            }
            return shown;
        }"""
        try:
            return self.page.wait_for_function(
                f"types => {{ const shown = ({state})(types); "
                f"return Object.values(shown).flat().some(v => String(v).startsWith('nothing')) ? null : shown; }}",
                arg=node_types, timeout=timeout * 1000).json_value()
        except Exception as error:  # playwright's TimeoutError
            if "Timeout" not in type(error).__name__:
                raise
            raise AssertionError(f"not every result showed: {self.page.evaluate(state, node_types)}") from None

    def previews_seen(self) -> list[str]:
        """Ids of the nodes that showed a live preview since :meth:`watch_previews` (as strings)."""
        return self.page.evaluate("() => [...(window.__c3dPreviews || [])]")

    def legend_pixels(self, node_type: str) -> list[dict]:
        """The part legend the pack's extension drew on the first ``node_type`` node, read back from the canvas:
        for each chip, its part name, the colour it should have and the canvas pixel at its centre (r, g, b).
        The node is centred at scale 1 first, so it is drawn in full detail."""
        return self.page.evaluate("""async type => {
            const canvas = window.app.canvas, node = window.app.graph._nodes.find(n => n.type === type);
            canvas.ds.scale = 1;
            canvas.centerOnNode(node);
            canvas.setDirty(true, true);
            await new Promise(r => requestAnimationFrame(() => requestAnimationFrame(r)));
            const widget = node.widgets.find(w => w.name === 'compose3d_legend');
            const ds = canvas.ds, ratio = canvas.canvas.width / canvas.canvas.getBoundingClientRect().width;
            const ctx = canvas.canvas.getContext('2d');
            return (widget?.drawnChips ?? []).map(c => {
                const x = (node.pos[0] + c.x + c.size / 2 + ds.offset[0]) * ds.scale * ratio;
                const y = (node.pos[1] + c.y + c.size / 2 + ds.offset[1]) * ds.scale * ratio;
                const [r, g, b] = ctx.getImageData(Math.round(x), Math.round(y), 1, 1).data;
                return {name: c.name, color: c.color, pixel: [r, g, b], layout: widget.value.layout};
            });
        }""", node_type)

    def wait_until(self, check, timeout: float = 60.0, poll_ms: int = 250):
        """Poll ``check()`` (Python) until it returns something truthy, letting the page's events reach Python
        meanwhile (Playwright's sync API delivers them only while one of its calls runs); returns that value,
        or the last falsy one on timeout."""
        deadline = time.monotonic() + timeout
        while True:
            value = check()
            if value or time.monotonic() > deadline:
                return value
            self.page.wait_for_timeout(poll_ms)

    def node_screenshot(self, node_type: str, path: Path) -> Path:
        """A screenshot of the first ``node_type`` node alone, centred at scale 1 (its DOM widgets included)."""
        box = self.page.evaluate("""async type => {
            const canvas = window.app.canvas, node = window.app.graph._nodes.find(n => n.type === type);
            canvas.ds.scale = 1;
            canvas.centerOnNode(node);
            canvas.setDirty(true, true);
            await new Promise(r => requestAnimationFrame(() => requestAnimationFrame(r)));
            const rect = canvas.canvas.getBoundingClientRect(), ds = canvas.ds;
            const title = window.LiteGraph.NODE_TITLE_HEIGHT;
            return {x: (node.pos[0] + ds.offset[0]) * ds.scale + rect.left,
                    y: (node.pos[1] - title + ds.offset[1]) * ds.scale + rect.top,
                    width: node.size[0] * ds.scale, height: (node.size[1] + title) * ds.scale};
        }""", node_type)
        self.page.wait_for_timeout(1000)  # a WebGL view draws its next frame
        path.parent.mkdir(parents=True, exist_ok=True)
        self.page.screenshot(path=str(path), clip=box)
        return path

    def graph_corner(self) -> tuple[float, float]:
        """Screen position (page pixels) of the open graph's top-left corner, node title bars included."""
        return tuple(self.page.evaluate("""() => {
            const ds = window.app.canvas.ds, rect = window.app.canvas.canvas.getBoundingClientRect();
            const title = window.LiteGraph.NODE_TITLE_HEIGHT, nodes = window.app.graph._nodes;
            return [Math.min(...nodes.map(n => (n.pos[0] + ds.offset[0]) * ds.scale + rect.left)),
                    Math.min(...nodes.map(n => (n.pos[1] - title + ds.offset[1]) * ds.scale + rect.top))];
        }"""))

    def chrome_edges(self, workflow_name: str) -> tuple[float, float]:
        """(right edge of the left sidebar, lowest bottom edge of the top bars showing ``workflow_name``: the tab
        and the floating name badge), in page pixels: what covers the canvas's top-left corner."""
        button = self.page.get_by_role("button", name="Templates").first.bounding_box()
        names = self.page.get_by_text(workflow_name, exact=True)
        bottoms = [box["y"] + box["height"] for box in (names.nth(i).bounding_box() for i in range(names.count()))
                   if box and box["x"] < VIEWPORT["width"] / 2]
        return button["x"] + button["width"], max(bottoms, default=0.0)

    def dialogs(self) -> list[str]:
        """The text of every open dialog."""
        boxes = self.page.locator("[role=dialog]")
        return [boxes.nth(i).inner_text() for i in range(boxes.count())]

    def close_dialogs(self) -> None:
        for _ in range(3):
            if not self.page.locator("[role=dialog]").count():
                return
            self.page.keyboard.press("Escape")
            time.sleep(0.3)

    # -- the template browser ------------------------------------------------------------------------
    def open_templates(self) -> None:
        """Open the template browser (the sidebar's Templates button) unless it is open."""
        if not self.page.get_by_text("All Templates", exact=True).count():
            self.page.get_by_role("button", name="Templates").first.click()
        self.page.get_by_text("All Templates", exact=True).first.wait_for(timeout=30_000)

    def load_template(self, module: str, card: str, expected_nodes: int, timeout: float = 30.0) -> None:
        """Click ``card`` under ``module`` and wait until a graph of ``expected_nodes`` nodes is open."""
        self.open_templates()
        dialog = self.page.locator("[role=dialog]").filter(has_text="All Templates")  # not the workflow tabs
        dialog.get_by_text(module, exact=True).first.click()
        dialog.get_by_text(card, exact=True).first.click()
        self.page.wait_for_function(f"() => window.app.graph._nodes.length === {int(expected_nodes)}",
                                    timeout=timeout * 1000)
        time.sleep(1.0)  # let the canvas draw (and any dialog open) before it is looked at

    def load_graph(self, workflow: dict) -> None:
        """Load a UI-format workflow the way a dropped file is loaded (``app.loadGraphData``)."""
        self.page.evaluate("wf => window.app.loadGraphData(wf)", workflow)
        time.sleep(1.0)

    def screenshot(self, path: Path) -> Path:
        path.parent.mkdir(parents=True, exist_ok=True)
        self.page.screenshot(path=str(path))
        return path
