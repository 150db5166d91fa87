"""Interrupting a running prompt over HTTP, the way a user presses Cancel while a node reports progress."""
from __future__ import annotations

import json
import threading
import time
from dataclasses import dataclass


@dataclass
class InterruptedRun:
    result: object  # headless.RunResult
    stopped_after: float | None  # seconds from the interrupt to ComfyUI's execution_interrupted message
    progress_after: int  # progress messages of the node after the interrupt was sent


def interrupt_at_first_progress(server, prompt: dict, node_id: str, timeout: float = 120.0) -> InterruptedRun:
    """Queue ``prompt``, send /interrupt when ``node_id`` first reports progress, wait for the prompt to end.

    If the prompt never ends as interrupted, it is interrupted again afterwards so no long loop outlives the test.
    """
    return _interrupted_run(server, prompt, node_id, timeout, delay=None)


def interrupt_after_start(server, prompt: dict, node_id: str, delay: float, timeout: float = 120.0
                          ) -> InterruptedRun:
    """Queue ``prompt`` and send /interrupt ``delay`` seconds after ``node_id`` starts executing, whatever it
    reports meanwhile (so the interrupt lands inside a step, however long the step is).

    ``stopped_after``: seconds from the interrupt to ComfyUI's execution_interrupted message;
    ``progress_after``: progress messages of the node after the interrupt. A prompt that does not end as
    interrupted is interrupted again afterwards so no long loop outlives the test.
    """
    return _interrupted_run(server, prompt, node_id, timeout, delay=delay)


def _interrupted_run(server, prompt: dict, node_id: str, timeout: float, delay: float | None) -> InterruptedRun:
    """Interrupt ``delay`` s after ``node_id`` starts, or at its first progress message when ``delay`` is None."""
    seen: dict = {"interrupted_at": None, "ended_at": None, "progress_after": 0, "timer": None}

    def fire(srv):
        seen["interrupted_at"] = time.monotonic()
        srv.interrupt()

    def on_message(msg, srv):
        mine = msg.get("data", {}).get("node") == node_id
        if msg["type"] == "executing" and mine and delay is not None and seen["timer"] is None:
            seen["timer"] = threading.Timer(delay, fire, args=(srv,))
            seen["timer"].start()
        elif msg["type"] == "progress" and mine:
            if seen["interrupted_at"] is not None:
                seen["progress_after"] += 1
            elif delay is None:
                fire(srv)
        elif msg["type"] == "execution_interrupted":
            seen["ended_at"] = time.monotonic()

    try:
        result = server.run(prompt, timeout=timeout, on_message=on_message)
    finally:
        if seen["timer"] is not None:
            seen["timer"].cancel()
        if seen["ended_at"] is None:
            server.interrupt()
    stopped = None
    if seen["interrupted_at"] is not None and seen["ended_at"] is not None:
        stopped = seen["ended_at"] - seen["interrupted_at"]
    return InterruptedRun(result, stopped, seen["progress_after"])


def assert_server_still_serves(server, views: int, elevation: float) -> None:
    """A small prompt (a camera rig and its preview) still runs and gives the rig asked for."""
    from comfy_execution.graph_utils import GraphBuilder

    g = GraphBuilder(prefix="")
    rig = g.node("Compose3D_OrbitCameras", views=views, elevation=elevation, azimuth_start=0.0, azimuth_span=360.0,
                 distance=2.5, fov=40.0)
    preview = g.node("Compose3D_PreviewCameras", cameras=rig.out(0))
    result = server.run(g.finalize(), timeout=60)
    assert result.status == "success", result.error
    assert json.loads(result.outputs[preview.id]["text"][0])["views"] == views
    assert server.alive()
