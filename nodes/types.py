"""Custom socket types, conditioning keys and option keys of the pack.

Socket type names are part of the public API: saved workflows refer to them.
"""
from __future__ import annotations

from comfy_api.latest import io

CATEGORY = "Compose3D"

#: :class:`kernels.cameras.Cameras`
CamerasType = io.Custom("C3D_CAMERAS")

#: :class:`kernels.nerf.NeRF`
NeRFType = io.Custom("C3D_NERF")

#: :class:`kernels.part_maps.PartMaps`
PartMapsType = io.Custom("C3D_PART_MAPS")

#: :class:`kernels.part_field.PartField`
PartFieldType = io.Custom("C3D_PART_FIELD")

#: :class:`kernels.score_mixing.LambdaSchedule`
LambdaScheduleType = io.Custom("C3D_LAMBDA_SCHEDULE")

#: :class:`kernels.ip_adapter.IPAdapter`
IPAdapterType = io.Custom("C3D_IP_ADAPTER")

#: CONDITIONING key holding the (V, 16) MVDream camera vectors of one object's V views
#: (attached by ``Compose3D_MVDreamConditioning``, read by the MVDream model and the samplers).
CAMERA_KEY = "c3d_mvdream_cameras"
#: CONDITIONING key (optional): views per object when CAMERA_KEY holds the cameras of several objects (N = k * V);
#: without it the N cameras are one object's views.
VIEWS_KEY = "c3d_mvdream_views"
#: transformer_options key telling attention how many views make one object (views are contiguous in the batch).
VIEWS_OPTION = "c3d_num_views"
#: transformer_options key (True): the MVDream UNet attends within each view only (no cross-view attention), as if
#: every view were an object of its own; cameras are still embedded. The mixed-score guider's single-view pass.
SINGLE_VIEW_OPTION = "c3d_single_view"
#: MODEL option (``model.model_options[REFOCUS_REPORT_KEY] = fn``): the refocus sampler calls ``fn(report)`` with
#: each run's :class:`nodes.refocus.RefocusReport` (benchmarks and tests read reports this way).
REFOCUS_REPORT_KEY = "c3d_refocus_report"
#: MODEL option (``model.model_options[SDS_REPORT_KEY] = fn``): the SDS optimiser calls ``fn(report)`` with each run's
#: :class:`kernels.distill.SDSReport` (benchmarks read the per-phase timings this way).
SDS_REPORT_KEY = "c3d_sds_report"
#: MODEL option (``model.model_options[TUNING_REPORT_KEY] = fn``): the Make-Your-3D tuners call ``fn(report)`` with
#: each run's :class:`nodes.make_your_3d.TuningReport` (losses, timings, peak memory; tests and benchmarks read it).
TUNING_REPORT_KEY = "c3d_tuning_report"
