"""A real ComfyUI server, headless on a free loopback port, and a small client for its HTTP/websocket API.

Used by the demo (scripts/demo.py) and by the tests (tests/conftest.py).
"""
from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import time
import urllib.error
import urllib.request
import uuid
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import websocket

MODEL_FOLDERS = ("checkpoints", "diffusion_models", "vae", "text_encoders", "loras", "clip_vision", "ipadapter")


class PromptRejected(Exception):
    """ComfyUI's validation refused the prompt (POST /prompt answered 400), or part of it: when some outputs are
    valid ComfyUI answers 200, queues those and names the others' errors in ``node_errors``, which the frontend
    shows as errors; so does this client."""

    def __init__(self, body: dict):
        self.body = body
        super().__init__(json.dumps(body, indent=1)[:4000])

    @property
    def node_errors(self) -> dict:
        return self.body.get("node_errors", {})


@dataclass
class RunResult:
    """What one queued prompt did, as seen over the websocket and in /history."""

    prompt_id: str
    status: str  # "success", "error" or "interrupted"
    outputs: dict[str, Any]
    messages: list[dict] = field(default_factory=list)
    previews: int = 0  # binary preview frames received
    history: dict = field(default_factory=dict)

    @property
    def error(self) -> dict | None:
        for m in self.messages:
            if m["type"] == "execution_error":
                return m["data"]
        return None

    def progress(self, node: str | None = None) -> list[dict]:
        return [m["data"] for m in self.messages if m["type"] == "progress"
                and (node is None or m["data"].get("node") == node)]


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def write_extra_model_paths(models: Path, config: Path) -> None:
    lines = ["compose3d_tests:", f"    base_path: {models}"]
    lines += [f"    {kind}: {kind}" for kind in MODEL_FOLDERS]
    config.write_text("\n".join(lines) + "\n")


class ComfyServer:
    """Starts ComfyUI's ``main.py`` with its own base directory and a registered models folder.

    Args:
        comfyui: the ComfyUI tree (holds main.py).
        base: base directory (custom_nodes/, input/, output/, temp/, user/ are made in it; the pack is linked
            into custom_nodes/).
        models: models folder registered through ``--extra-model-paths-config``.
        pack_root: this pack's folder.
        python: interpreter that runs ComfyUI.
        extra_args: more ComfyUI arguments (``--cpu`` is passed unless ``cpu=False``).
        env: variables added to the server's environment (e.g. a private ``TMPDIR``).
    """

    def __init__(self, comfyui: Path, base: Path, models: Path, pack_root: Path, python: str,
                 extra_args: tuple[str, ...] = (), cpu: bool = True, env: dict[str, str] | None = None):
        self.comfyui = comfyui
        self.python = python
        self.cpu = cpu
        self.base = base
        self.models = models
        self.pack_root = pack_root
        self.extra_args = extra_args
        self.env = dict(env or {})
        self.port = 0
        self.proc: subprocess.Popen | None = None
        self.log_path = base / "server.log"

    # -- life cycle ---------------------------------------------------------------------------------
    def start(self, timeout: float = 300.0) -> "ComfyServer":
        for sub in ("custom_nodes", "input", "output", "temp", "user"):
            (self.base / sub).mkdir(parents=True, exist_ok=True)
        link = self.base / "custom_nodes" / "compose3d"
        if not link.exists():
            link.symlink_to(self.pack_root, target_is_directory=True)
        for kind in MODEL_FOLDERS:
            (self.models / kind).mkdir(parents=True, exist_ok=True)
        config = self.base / "extra_model_paths.yaml"
        write_extra_model_paths(self.models, config)
        self.port = free_port()
        cmd = [self.python, "main.py", *(["--cpu"] if self.cpu else []), "--listen", "127.0.0.1", "--port", str(self.port),
               "--disable-auto-launch", "--base-directory", str(self.base),
               "--extra-model-paths-config", str(config),
               "--database-url", f"sqlite:///{self.base / 'user' / 'comfyui.db'}", *self.extra_args]
        env = dict(os.environ, PYTHONUNBUFFERED="1", **self.env)
        self._log = open(self.log_path, "wb")
        self.proc = subprocess.Popen(cmd, cwd=self.comfyui, stdout=self._log, stderr=subprocess.STDOUT,
                                     env=env, start_new_session=True)
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"ComfyUI exited with {self.proc.returncode} while starting:\n{self.log_tail()}")
            try:
                self.get_json("/system_stats", timeout=2)
                return self
            except (OSError, urllib.error.URLError):
                time.sleep(0.5)
        self.stop()
        raise RuntimeError(f"ComfyUI did not answer within {timeout:.0f} s:\n{self.log_tail()}")

    def stop(self) -> None:
        if self.proc is None:
            return
        if self.proc.poll() is None:
            try:
                os.killpg(self.proc.pid, signal.SIGTERM)
                self.proc.wait(timeout=20)
            except (subprocess.TimeoutExpired, ProcessLookupError):
                try:
                    os.killpg(self.proc.pid, signal.SIGKILL)
                except ProcessLookupError:
                    pass
                self.proc.wait(timeout=20)
        self._log.close()
        self.proc = None

    def alive(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def log_text(self) -> str:
        return self.log_path.read_text(errors="replace") if self.log_path.exists() else ""

    def log_tail(self, n: int = 60) -> str:
        return "\n".join(self.log_text().splitlines()[-n:])

    # -- HTTP ---------------------------------------------------------------------------------------
    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def request(self, method: str, path: str, body: Any = None, timeout: float = 30) -> tuple[int, Any]:
        data = None if body is None else json.dumps(body).encode()
        req = urllib.request.Request(self.url + path, data=data, method=method,
                                     headers={"Content-Type": "application/json"})
        try:
            with urllib.request.urlopen(req, timeout=timeout) as resp:
                raw = resp.read()
                status = resp.status
        except urllib.error.HTTPError as e:
            raw, status = e.read(), e.code
        try:
            return status, json.loads(raw) if raw else None
        except json.JSONDecodeError:
            return status, raw.decode(errors="replace")

    def get_json(self, path: str, timeout: float = 30) -> Any:
        with urllib.request.urlopen(self.url + path, timeout=timeout) as resp:
            return json.loads(resp.read())

    def get_bytes(self, path: str, timeout: float = 30) -> bytes:
        with urllib.request.urlopen(self.url + path, timeout=timeout) as resp:
            return resp.read()

    def queue(self, prompt: dict, client_id: str | None = None) -> str:
        """POST /prompt; returns the prompt id or raises PromptRejected with ComfyUI's errors."""
        status, body = self.request("POST", "/prompt", {"prompt": prompt, "client_id": client_id or "tests"})
        if status != 200 or (isinstance(body, dict) and body.get("node_errors")):
            raise PromptRejected(body if isinstance(body, dict) else {"error": body})
        return body["prompt_id"]

    def interrupt(self) -> None:
        self.request("POST", "/interrupt", {})

    # -- websocket ----------------------------------------------------------------------------------
    def connect(self, client_id: str) -> websocket.WebSocket:
        ws = websocket.WebSocket()
        ws.connect(f"ws://127.0.0.1:{self.port}/ws?clientId={client_id}", timeout=30)
        return ws

    def run(self, prompt: dict, timeout: float = 300.0, on_message=None) -> RunResult:
        """Queue ``prompt``, follow it on the websocket until it ends, and read its /history entry.

        ``on_message(message, server)`` is called for every JSON message (e.g. to interrupt on progress).
        """
        client_id = uuid.uuid4().hex
        ws = self.connect(client_id)
        try:
            prompt_id = self.queue(prompt, client_id)
            messages: list[dict] = []
            previews = 0
            status = None
            finished = False  # ComfyUI sends "executing" with node None once the history entry is written
            deadline = time.monotonic() + timeout
            while not finished:
                if time.monotonic() > deadline:
                    raise TimeoutError(f"prompt {prompt_id} still running after {timeout:.0f} s; "
                                       f"messages so far: {[m['type'] for m in messages]}")
                ws.settimeout(max(1.0, deadline - time.monotonic()))
                frame = ws.recv()
                if isinstance(frame, bytes):
                    previews += 1
                    continue
                msg = json.loads(frame)
                data = msg.get("data", {})
                if data.get("prompt_id") not in (None, prompt_id):
                    continue
                messages.append(msg)
                if on_message is not None:
                    on_message(msg, self)
                kind = msg["type"]
                if kind == "execution_error":
                    status = "error"
                elif kind == "execution_interrupted":
                    status = "interrupted"
                elif kind == "execution_success":
                    status = "success"
                elif kind == "executing" and data.get("node") is None and data.get("prompt_id") == prompt_id:
                    finished = True
        finally:
            ws.close()
        history = self.get_json(f"/history/{prompt_id}").get(prompt_id, {})
        if status is None:  # e.g. every output was cached: no success message, the history says
            status = "success" if history.get("status", {}).get("completed") else "error"
        return RunResult(prompt_id, status, history.get("outputs", {}), messages, previews, history)
