"""Framework-free compute for Compose3D: plain torch/numpy, never ``comfy``.

Everything here can be used and tested outside ComfyUI.
"""
