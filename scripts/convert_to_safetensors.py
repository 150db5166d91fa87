"""Convert a pickled checkpoint that you trust (.pt/.ckpt/.pth/.bin) into a .safetensors file.

    python scripts/convert_to_safetensors.py IN.pt [OUT.safetensors]

Loading a pickle can run any code stored in it, which is why Compose3D's loader reads pickles as tensors only and
refuses files that hold anything else (the released MVDream ``.pt`` files hold more). This script loads the whole
pickle (``torch.load(weights_only=False)``), so run it only on files from a source you trust. It unwraps a
top-level ``"state_dict"``, keeps the tensors (other entries are listed and dropped) and writes them, contiguous
and on the CPU, next to the input (``IN.safetensors``) or to OUT. An existing output file is never overwritten.
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path


def default_output(source: Path) -> Path:
    return source.with_suffix(".safetensors")


def tensors_of(data, name: str) -> tuple[dict, list[str]]:
    """The tensors of a loaded checkpoint (a top-level "state_dict" unwrapped) and the names of what was dropped."""
    import torch

    if isinstance(data, dict) and isinstance(data.get("state_dict"), dict):
        data = data["state_dict"]
    if not isinstance(data, dict):
        raise ValueError(f"{name} holds a {type(data).__name__}, not a dict of tensors")
    tensors, dropped = {}, []
    for key, value in data.items():
        if isinstance(value, torch.Tensor):
            tensors[str(key)] = value.detach().to("cpu").contiguous()
        else:
            dropped.append(f"{key} ({type(value).__name__})")
    return tensors, dropped


def convert(source: Path, target: Path) -> int:
    """Write ``source``'s tensors to ``target``; returns the number of tensors written."""
    import torch
    from safetensors.torch import save_file

    if target.exists():
        raise FileExistsError(f"{target} already exists; not overwriting it (delete it or name another output)")
    print(f"WARNING: loading {source} with torch.load(weights_only=False) runs any code stored in the file. "
          f"Only continue with files from a source you trust.", file=sys.stderr, flush=True)
    data = torch.load(source, map_location="cpu", weights_only=False)
    tensors, dropped = tensors_of(data, source.name)
    if not tensors:
        raise ValueError(f"{source.name} holds no tensors")
    if dropped:
        shown = ", ".join(dropped[:10]) + (f" ... and {len(dropped) - 10} more" if len(dropped) > 10 else "")
        print(f"dropped {len(dropped)} entries that are not tensors: {shown}", file=sys.stderr)
    # Tensors sharing memory (tied weights, views of one buffer) are refused by save_file: copy them apart.
    by_storage: dict[int, list[str]] = {}
    for key, t in tensors.items():
        by_storage.setdefault(t.untyped_storage().data_ptr(), []).append(key)
    for keys in by_storage.values():
        if len(keys) > 1:
            for key in keys:
                tensors[key] = tensors[key].clone()
    target.parent.mkdir(parents=True, exist_ok=True)
    save_file(tensors, str(target), metadata={"converted_from": source.name})
    return len(tensors)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description="Convert a trusted pickled checkpoint to .safetensors.")
    parser.add_argument("source", type=Path, help="the pickled checkpoint (.pt, .ckpt, .pth, .bin)")
    parser.add_argument("target", type=Path, nargs="?", help="the .safetensors file to write "
                                                             "(default: next to the source)")
    args = parser.parse_args(argv)
    source: Path = args.source
    target: Path = args.target or default_output(source)
    if not source.is_file():
        print(f"error: {source} is not a file", file=sys.stderr)
        return 2
    if target.resolve() == source.resolve():
        print("error: the output would replace the input; name another output", file=sys.stderr)
        return 2
    try:
        count = convert(source, target)
    except (FileExistsError, ValueError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    print(f"wrote {count} tensors to {target}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
