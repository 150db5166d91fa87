"""Example workflows at test size, as a user would shrink them in the frontend: widget values per node type.

The server lists the tiny models under the file names the templates' loaders use
(:meth:`harness.tiny_models.TinyModels.link_standard_names`), so only sizes change: step counts, resolutions, ray
counts, and where files go. Values apply to every node of the type (e.g. both camera rings of a template get 4 views); a key "type|title"
applies to the node of that title only (after the type's own values).
The server tests check each template's outputs in detail with their own, finer settings; the browser test runs
these from the Run button (tests/test_browser.py).
"""
from __future__ import annotations

from test_server_parts import TEST_SIZES as PART_SIZES
from test_server_sds import FAST_SDS


def mesh_and_turntable(prefix: str, threshold: float = 1.0) -> dict[str, dict]:
    """Export Mesh and the turntable (Orbit Cameras -> Render NeRF) at test sizes; the mesh goes to ``prefix``."""
    return {"Compose3D_ExportMesh": {"filename_prefix": f"{prefix}/mesh", "resolution": 32, "threshold": threshold,
                                     "max_faces": 2000, "colors": "vertex", "texture_size": 64},
            "Compose3D_RenderNeRF": {"width": 16, "height": 16, "samples_per_ray": 16},
            "Compose3D_OrbitCameras": {"views": 4}}


def sds(prefix: str, **changes) -> dict[str, dict]:
    return {"Compose3D_SDSOptimizer": {**FAST_SDS, "checkpoint_prefix": f"{prefix}/sds", **changes}}


#: template stem -> ({node type: {widget: value}}, node types whose live preview must show while it runs)
TINY_RUNS: dict[str, tuple[dict[str, dict], list[str]]] = {
    "MVDream 4 views with refocus": (
        {"BasicScheduler": {"steps": 4},
         # the first 2 steps refocused, one refinement try at step 0 (0.5 is out of reach for random weights)
         "Compose3D_RefocusSampler": {"refocus_steps": 2, "thresholds": "0: 0.5", "max_tries": 1},
         "SaveImage": {"filename_prefix": "c3d_browser/refocus"}},
        ["SamplerCustom"]),  # the refocus sampler's subject maps show on the sampling node
    "Text to 3D - SDS": (
        {**sds("c3d_browser/sds"), **mesh_and_turntable("c3d_browser/sds")},
        ["Compose3D_SDSOptimizer"]),
    "Text to 3D - Grounded-Dreamer": (
        {"BasicScheduler": {"steps": 3}, "EmptyLatentImage": {"width": 64, "height": 64},
         "Compose3D_RefocusSampler": {"refocus_steps": 1, "thresholds": "", "max_tries": 1},
         **sds("c3d_browser/gd", reference_fit=0.5), **mesh_and_turntable("c3d_browser/gd")},
        ["Compose3D_SDSOptimizer"]),
    "Mixed-score 4 views": (
        {"EmptyLatentImage": {"width": 64, "height": 64}, "BasicScheduler": {"steps": 3},
         "Compose3D_ViewConsistency": {"steps": 5, "rays_per_step": 256, "samples_per_ray": 16},
         "SaveImage": {"filename_prefix": "c3d_browser/mixed"}},
        []),
    "Text to 3D - mixed score without distillation": (
        {"EmptyLatentImage": {"width": 64, "height": 64}, "Compose3D_MixedScoreSampler": {"steps": 3},
         "Compose3D_NeRFFromViews": {"steps": 30, "rays_per_step": 1024, "samples_per_ray": 16},
         # random-weight views train a diffuse cloud (density about 1.8 to 2.4 after 30 steps): cut it in the middle
         **mesh_and_turntable("c3d_browser/mixed3d", threshold=2.1)},
        ["Compose3D_NeRFFromViews"]),
    "Text to 3D - DreamBeast parts": (
        {**mesh_and_turntable("c3d_browser/dreambeast"),
         # 8 steps: plain SDS to step 2, then modulated (from step round(0.4314 * 8) = 3) to the end
         **sds("c3d_browser/dreambeast", steps=8, checkpoint_every=0),
         "Compose3D_SDSOptimizer|SDS: plain, steps 0-1000 of 7000": {"end_at_step": 2},
         "Compose3D_SDSOptimizer|SDS: part-modulated, steps 1000-7000": {"start_at_step": 2},
         "Compose3D_SDSCameras": {"groups": 2},
         "Compose3D_RenderNeRF": {"width": 32, "height": 32, "samples_per_ray": 16},
         "Compose3D_SD3AttentionCapture": PART_SIZES["Compose3D_SD3AttentionCapture"],
         "Compose3D_PartAffinityNeRF": PART_SIZES["Compose3D_PartAffinityNeRF"]},
        ["Compose3D_SDSOptimizer", "Compose3D_SD3AttentionCapture"]),
    "Make-Your-3D - subject photo to 3D": (
        {"EmptyLatentImage": {"width": 64, "height": 64}, "KSampler": {"steps": 2},
         "Compose3D_IdentityTuner": {"steps": 2, "batch_size": 2, "augmentations": 1,
                                     "filename_prefix": "c3d_browser/identity"},
         "Compose3D_SubjectPriorTuner": {"steps": 2, "filename_prefix": "c3d_browser/subject"},
         **sds("c3d_browser/my3d"), **mesh_and_turntable("c3d_browser/my3d")},
        ["Compose3D_SDSOptimizer"]),
}
