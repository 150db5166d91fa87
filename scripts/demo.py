"""The main job: run an example workflow headless in a real ComfyUI through its HTTP API, print the results.

Usage: python scripts/demo.py [--workflow example_workflows/<name>.json] [--dir demo_run]

Starts ComfyUI (``COMFYUI_PATH`` or the tree harness/comfyui.py unpacks) with its own base directory,
queues the workflow, follows it on the websocket, and prints where every output file went.
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))  # the repository root, for the harness package

from harness.comfyui import default_cache, ensure_comfyui  # noqa: E402
from harness.server import ComfyServer  # noqa: E402
from harness.workflow import ui_to_api  # noqa: E402

DEFAULT_WORKFLOW = ROOT / "example_workflows" / "Reconstruction demo.json"


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--workflow", type=Path, default=DEFAULT_WORKFLOW, help="UI-format workflow to run")
    parser.add_argument("--dir", type=Path, default=ROOT / "demo_run",
                        help="ComfyUI base directory for the run (output/ ends up in it)")
    parser.add_argument("--timeout", type=float, default=3600.0, help="seconds to wait for the workflow")
    args = parser.parse_args()

    comfyui = ensure_comfyui(default_cache())
    base = args.dir.resolve()
    server = ComfyServer(comfyui=comfyui, base=base, models=base / "models", pack_root=ROOT,
                         python=sys.executable)
    print(f"[demo] starting ComfyUI from {comfyui} (log: {server.log_path})", flush=True)
    server.start()
    try:
        workflow = json.loads(args.workflow.read_text())
        prompt = ui_to_api(workflow, server.get_json("/object_info"))
        print(f"[demo] queueing {args.workflow.name} ({len(prompt)} nodes)", flush=True)

        shown_tenth: dict[str, int] = {}

        def report(msg, _server):  # one line per node per tenth of its progress
            if msg["type"] == "progress":
                d = msg["data"]
                tenth = 10 * d["value"] // max(d["max"], 1)
                if tenth > shown_tenth.get(d["node"], -1):
                    shown_tenth[d["node"]] = tenth
                    kind = prompt.get(d["node"], {}).get("class_type", "")
                    print(f"[demo]   node {d['node']} {kind}: {d['value']}/{d['max']}", flush=True)

        result = server.run(prompt, timeout=args.timeout, on_message=report)
        if result.status != "success":
            print(f"[demo] workflow ended with {result.status}: {json.dumps(result.error, indent=1)}")
            return 1
        print("[demo] done. Files written:")
        previews = 0
        for node_id, shown in result.outputs.items():
            kind = prompt[node_id]["class_type"]
            for item in shown.get("images", []) + shown.get("3d", []):
                if item.get("type") != "output":
                    previews += 1
                    continue
                print(f"  {kind} (node {node_id}): {base / 'output' / item.get('subfolder', '') / item['filename']}")
            for text in shown.get("text", []):
                print(f"  {kind} (node {node_id}) says: {text[:200]}")
        if previews:
            print(f"  (+{previews} preview images in {base / 'temp'})")
        print(f"[demo] open the workflow in ComfyUI to look at them: {args.workflow}")
        return 0
    finally:
        server.stop()


if __name__ == "__main__":
    raise SystemExit(main())
