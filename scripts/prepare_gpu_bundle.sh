#!/usr/bin/env bash
# Prepare what scripts/bench_gpu.sh needs on a GPU machine that has torch but no package registries:
#   .dev/comfyui  the pinned ComfyUI tree (from harness.comfyui's cache), without its tests and the two largest
#                 tokenizers no benchmark uses (about 12 MB)
#   .whl/         wheels, for that machine's Python (PY_VERSION, default 3.12), of the imports of ComfyUI and of the
#                 pack that such an image may lack (about 43 MB), at the versions of this checkout's .venv
# Both folders are added to .git/info/exclude. Run after scripts/setup.sh; carry both folders to the machine.
set -euo pipefail
cd "$(dirname "$0")/.."
PY_VERSION=${PY_VERSION:-3.12}
PACKAGES=(av torchsde trampoline kornia kornia_rs trimesh xatlas)
for p in /.dev/ /.whl/; do grep -qx "$p" .git/info/exclude 2>/dev/null || echo "$p" >> .git/info/exclude; done
comfy=$(.venv/bin/python -c "import sys; sys.path.insert(0, '.'); from harness.paths import comfyui_root
print(comfyui_root())")
rm -rf .dev/comfyui && mkdir -p .dev && cp -a "$comfy" .dev/comfyui
rm -rf .dev/comfyui/tests .dev/comfyui/tests-unit .dev/comfyui/comfy/text_encoders/{llama,qwen25}_tokenizer
find .dev/comfyui -name __pycache__ -prune -exec rm -rf {} +
pins=()
for p in "${PACKAGES[@]}"; do
  pins+=("$p==$(.venv/bin/python -m pip show "$p" | awk '/^Version:/{print $2}')")
done
rm -rf .whl
python3 -m pip download -q --no-deps --only-binary=:all: --python-version "$PY_VERSION" --implementation cp \
  --platform manylinux_2_28_x86_64 --platform manylinux_2_27_x86_64 --platform manylinux_2_17_x86_64 \
  --platform manylinux2014_x86_64 --platform manylinux1_x86_64 -d .whl "${pins[@]}"
du -sh .dev/comfyui .whl
