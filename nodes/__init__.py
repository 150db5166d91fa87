"""ComfyUI-facing code: one module per mechanism, thin over ``kernels``."""
from __future__ import annotations

from typing_extensions import override

from comfy_api.latest import ComfyExtension, io

from .cameras import CombineCameras, OrbitCameras, PreviewCameras, SDSCameras
from .ip_adapter import ApplyIPAdapter, IPAdapterLoader
from .make_your_3d import IdentityTuner, SubjectPriorTuner
from .mesh import ExportMesh
from .mixed_score import LambdaScheduleNode, MixedScoreGuiderNode, MixedScoreSampler
from .mvdream import MVDreamConditioning, MVDreamLoader
from .nerf import NeRFFromViews, RenderNeRF
from .part_field import PartAffinityNeRF, PartMapsFromMasks, PartMapsToMasks, RenderPartMaps, TestObjectPartMaps
from .refocus import RefocusSampler
from .sd3_capture import SD3AttentionCapture
from .sds import SDSOptimizer
from .toy_object import ToyObjectViews
from .view_consistency import ViewConsistencyScore

NODES: list[type[io.ComfyNode]] = [
    OrbitCameras,
    SDSCameras,
    CombineCameras,
    PreviewCameras,
    ToyObjectViews,
    NeRFFromViews,
    RenderNeRF,
    ExportMesh,
    MVDreamLoader,
    MVDreamConditioning,
    RefocusSampler,
    LambdaScheduleNode,
    MixedScoreGuiderNode,
    MixedScoreSampler,
    ViewConsistencyScore,
    SDSOptimizer,
    SD3AttentionCapture,
    PartAffinityNeRF,
    RenderPartMaps,
    PartMapsToMasks,
    PartMapsFromMasks,
    TestObjectPartMaps,
    IPAdapterLoader,
    ApplyIPAdapter,
    IdentityTuner,
    SubjectPriorTuner,
]


class Compose3DExtension(ComfyExtension):
    @override
    async def get_node_list(self) -> list[type[io.ComfyNode]]:
        return list(NODES)
