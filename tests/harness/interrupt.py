"""Interrupting a running prompt over HTTP, the way a user presses Cancel while a node reports progress."""
from __future__ import annotations

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
    seen: dict = {"interrupted_at": None, "ended_at": None, "progress_after": 0}

    def on_message(msg, srv):
        data = msg.get("data", {})
        if msg["type"] == "progress" and data.get("node") == node_id:
            if seen["interrupted_at"] is None:
                seen["interrupted_at"] = time.monotonic()
                srv.interrupt()
            else:
                seen["progress_after"] += 1
        elif msg["type"] == "execution_interrupted":
            seen["ended_at"] = time.monotonic()

    try:
        result = server.run(prompt, timeout=timeout, on_message=on_message)
    finally:
        if seen["ended_at"] is None:
            server.interrupt()
    stopped = None
    if seen["interrupted_at"] is not None and seen["ended_at"] is not None:
        stopped = seen["ended_at"] - seen["interrupted_at"]
    return InterruptedRun(result, stopped, seen["progress_after"])
