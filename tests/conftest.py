"""Shared fixtures: a real ComfyUI (in-process and as a headless server) and tiny real-format models.

Importing this file puts ComfyUI on ``sys.path``, selects the CPU, and registers the pack as the package
``compose3d``, so test modules can ``import compose3d.kernels...`` and ``import comfy...``.
"""
from __future__ import annotations

import pytest

from harness.inprocess import init_comfy, use_folders
from harness.paths import PACK_ROOT, comfyui_root, python_for_server
from harness.report import SUMMARY_LINES
from harness.server import ComfyServer
from harness.tiny_models import TinyModels, build_tiny_models

init_comfy()


#: Prompts the soak test sends when --soak-prompts is not given (sized for CI: about a minute on two cores).
SOAK_PROMPTS_CI = 300


def pytest_addoption(parser: pytest.Parser) -> None:
    parser.addoption("--soak-prompts", type=int, default=SOAK_PROMPTS_CI,
                     help=f"prompts the soak test sends (default {SOAK_PROMPTS_CI}; e.g. 2000 for a long soak: "
                          f"bash scripts/test.sh -m soak --soak-prompts 2000)")


def pytest_terminal_summary(terminalreporter, exitstatus, config: pytest.Config) -> None:
    lines = config.stash.get(SUMMARY_LINES, [])
    if lines:
        terminalreporter.section("Compose3D figures")
        for line in lines:
            terminalreporter.write_line(line)


def pytest_collection_finish(session: pytest.Session) -> None:
    # A run that selects no test is a broken run, not a green one: never let pytest end with "no tests".
    if not session.items:
        raise pytest.UsageError("no tests were collected: check the test paths and -k/-m filters")


@pytest.fixture(scope="session")
def tiny_models(tmp_path_factory) -> TinyModels:
    """The tiny models of this session, written once into a temporary models folder."""
    return build_tiny_models(tmp_path_factory.mktemp("models"))


@pytest.fixture(scope="session")
def comfy_inprocess(tmp_path_factory, tiny_models):
    """ComfyUI imported in this process, its folders pointed at temporary ones and the tiny models."""
    base = tmp_path_factory.mktemp("inprocess")
    use_folders(tiny_models.root, base / "output", base / "temp", base / "input")
    return base


@pytest.fixture(scope="session")
def comfy_server(tmp_path_factory, tiny_models):
    """A real ComfyUI server on a free loopback port, with this pack and the tiny models; stopped at the end."""
    server = ComfyServer(comfyui=comfyui_root(), base=tmp_path_factory.mktemp("comfy-base"),
                         models=tiny_models.root, pack_root=PACK_ROOT, python=python_for_server())
    server.start()
    try:
        yield server
    finally:
        server.stop()
