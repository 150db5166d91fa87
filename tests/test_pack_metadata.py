"""The pack's metadata as ComfyUI and the Comfy Registry read it."""
from __future__ import annotations

import tomllib

from harness.paths import PACK_ROOT


def test_pyproject_parses_with_comfyuis_own_config_parser():
    from comfy_config import config_parser

    config = config_parser.extract_node_configuration(str(PACK_ROOT))
    assert config.project.name == "compose3d"
    assert config.tool_comfy.display_name == "Compose3D"
    assert config.tool_comfy.publisher_id == "compose3d"
    assert config.tool_comfy.web == "web" and (PACK_ROOT / "web").is_dir()


def test_license_and_comfyui_requirement_are_declared():
    data = tomllib.loads((PACK_ROOT / "pyproject.toml").read_text())
    assert data["project"]["license"] == "GPL-3.0-or-later"
    assert "GNU GENERAL PUBLIC LICENSE" in (PACK_ROOT / "LICENSE").read_text()[:200]
    assert data["tool"]["comfy"]["requires-comfyui"].startswith(">=")


def test_requirements_txt_and_pyproject_list_the_same_dependencies():
    data = tomllib.loads((PACK_ROOT / "pyproject.toml").read_text())
    lines = (PACK_ROOT / "requirements.txt").read_text().splitlines()
    listed = [line.strip() for line in lines if line.strip() and not line.lstrip().startswith("#")]
    assert sorted(listed) == sorted(data["project"]["dependencies"])
