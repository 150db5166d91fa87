"""scripts/convert_to_safetensors.py, run as a user runs it: a trusted pickle in, a .safetensors file out."""
from __future__ import annotations

import subprocess
import sys

import torch
from safetensors import safe_open
from safetensors.torch import load_file

from harness.paths import PACK_ROOT

SCRIPT = PACK_ROOT / "scripts" / "convert_to_safetensors.py"


def convert(*args) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, str(SCRIPT), *map(str, args)], capture_output=True, text=True,
                          timeout=120)


def test_converts_a_wrapped_state_dict_to_contiguous_tensors_and_never_overwrites(tmp_path):
    gen = torch.Generator().manual_seed(0)
    weight = torch.randn(3, 4, generator=gen)
    transposed = torch.randn(4, 5, generator=gen).t()  # not contiguous
    state = {"model.weight": weight, "model.tied": weight, "model.t": transposed,
             "model.half": torch.randn(2, 2, generator=gen).half(), "model.steps": torch.arange(5),
             "note": "not a tensor", "nested": {"x": torch.ones(1)}}
    source = tmp_path / "trusted.ckpt"
    torch.save({"state_dict": state, "epoch": 7, "global_step": 100}, source)

    done = convert(source)
    assert done.returncode == 0, done.stderr
    assert "weights_only=False" in done.stderr and "trust" in done.stderr  # the warning comes first
    assert done.stderr.index("WARNING") < done.stderr.index("dropped")
    target = tmp_path / "trusted.safetensors"
    assert target.is_file()
    loaded = load_file(target)
    assert sorted(loaded) == ["model.half", "model.steps", "model.t", "model.tied", "model.weight"]
    for key in loaded:
        assert loaded[key].dtype == state[key].dtype
        assert torch.equal(loaded[key], state[key]), key
    assert loaded["model.t"].is_contiguous() and loaded["model.t"].shape == (5, 4)
    with safe_open(str(target), "pt") as f:
        assert f.metadata() == {"converted_from": "trusted.ckpt"}

    before = target.read_bytes()
    again = convert(source, target)
    assert again.returncode != 0
    assert "already exists" in again.stderr
    assert target.read_bytes() == before


def test_a_bare_state_dict_goes_to_the_named_output(tmp_path):
    state = {"a": torch.linspace(0, 1, 6).reshape(2, 3), "b": torch.tensor([1, 2, 3], dtype=torch.int32)}
    source = tmp_path / "bare.pt"
    torch.save(state, source)
    target = tmp_path / "out" / "converted.safetensors"
    done = convert(source, target)
    assert done.returncode == 0, done.stderr
    assert str(target) in done.stdout
    loaded = load_file(target)
    assert loaded.keys() == state.keys()
    assert all(torch.equal(loaded[k], state[k]) for k in state)
    assert not (tmp_path / "bare.safetensors").exists()
