"""Test harness: a real ComfyUI, in-process or as a headless server, and tiny real-format models."""
