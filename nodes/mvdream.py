"""MVDream nodes: load a released MVDream checkpoint, and give its conditioning a camera rig."""
from __future__ import annotations

import torch

import folder_paths
import node_helpers
from comfy_api.latest import io

from .mvdream_model import load_mvdream
from .types import CAMERA_KEY, CATEGORY, CamerasType
from .validation import Compose3DNode


class MVDreamLoader(Compose3DNode):
    """MVDream checkpoint -> MODEL (multi-view UNet), CLIP and VAE, all under ComfyUI's model management."""

    @classmethod
    def define_schema(cls) -> io.Schema:
        return io.Schema(
            node_id="Compose3D_MVDreamLoader",
            display_name="Load MVDream Checkpoint",
            category=f"{CATEGORY}/mvdream",
            description="Loads an MVDream checkpoint (sd-v2.1-base-4view or sd-v1.5-4view layout) from the "
                        "checkpoints folder. The MODEL works with the core samplers; give its conditioning "
                        "cameras with 'MVDream Conditioning' to generate consistent views. Pickled .pt/.ckpt "
                        "files are read as tensors only, so they cannot run code.",
            inputs=[
                io.Combo.Input("ckpt_name", options=folder_paths.get_filename_list("checkpoints"),
                               tooltip="The MVDream checkpoint, e.g. sd-v2.1-base-4view.pt (or a .safetensors "
                                       "conversion of it)."),
            ],
            outputs=[
                io.Model.Output(display_name="MODEL", tooltip="MVDream's multi-view UNet."),
                io.Clip.Output(display_name="CLIP", tooltip="The checkpoint's text encoder."),
                io.Vae.Output(display_name="VAE", tooltip="The checkpoint's VAE (latents to images and back)."),
            ],
        )

    @classmethod
    def execute(cls, ckpt_name: str) -> io.NodeOutput:
        path = folder_paths.get_full_path_or_raise("checkpoints", ckpt_name)
        model, clip, vae = load_mvdream(path, embedding_directory=folder_paths.get_folder_paths("embeddings"))
        return io.NodeOutput(model, clip, vae)


class MVDreamConditioning(Compose3DNode):
    """Attach a camera rig to a conditioning so an MVDream MODEL generates one view per camera."""

    @classmethod
    def define_schema(cls) -> io.Schema:
        return io.Schema(
            node_id="Compose3D_MVDreamConditioning",
            display_name="MVDream Conditioning",
            category=f"{CATEGORY}/mvdream",
            description="Gives the conditioning the cameras' MVDream camera vectors. With V cameras, a latent "
                        "batch of V (or a multiple of V) makes V consistent views of one object (of several). "
                        "Route both the positive and the negative conditioning through this node.",
            inputs=[
                io.Conditioning.Input("conditioning", tooltip="A text conditioning (positive or negative) for the "
                                                              "MVDream MODEL, e.g. from CLIP Text Encode."),
                CamerasType.Input("cameras", tooltip="One camera per view, e.g. Orbit Cameras with 4 views at "
                                                     "elevation 15 (MVDream's training rig)."),
            ],
            outputs=[io.Conditioning.Output(display_name="conditioning",
                                            tooltip="The same conditioning carrying the cameras' MVDream "
                                                    "camera vectors.")],
        )

    @classmethod
    def execute(cls, conditioning, cameras) -> io.NodeOutput:
        vectors = cameras.mvdream.detach().to(torch.float32).cpu().clone()  # (V, 16)
        return io.NodeOutput(node_helpers.conditioning_set_values(conditioning, {CAMERA_KEY: vectors}))
