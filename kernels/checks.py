"""Input checks at the boundary, with messages that name the argument, what was expected and what came."""
from __future__ import annotations

import math
import re
from collections.abc import Sequence
from numbers import Real


def check_finite(name: str, value: Real) -> float:
    """Return ``value`` as float; raise ValueError naming ``name`` if it is not a finite number."""
    try:
        v = float(value)
    except (TypeError, ValueError):
        raise ValueError(f"{name}: expected a number, got {value!r}") from None
    if not math.isfinite(v):
        raise ValueError(f"{name}: expected a finite number, got {value!r}")
    return v


def check_range(name: str, value: Real, low: float, high: float, *, low_open: bool = False,
                high_open: bool = False, unit: str = "") -> float:
    """Return ``value`` as a finite float inside [low, high] (or open ends); raise ValueError naming ``name``."""
    v = check_finite(name, value)
    too_low = v <= low if low_open else v < low
    too_high = v >= high if high_open else v > high
    if too_low or too_high:
        lo = "(" if low_open else "["
        hi = ")" if high_open else "]"
        unit = f" {unit}" if unit else ""
        raise ValueError(f"{name}: expected a value in {lo}{low:g}, {high:g}{hi}{unit}, got {v:g}")
    return v


def check_int_range(name: str, value: int, low: int, high: int) -> int:
    """Return ``value`` as int inside [low, high]; raise ValueError naming ``name``."""
    if isinstance(value, bool) or not isinstance(value, (int,)) and not (
            isinstance(value, float) and value.is_integer()):
        raise ValueError(f"{name}: expected a whole number, got {value!r}")
    v = int(value)
    if not low <= v <= high:
        raise ValueError(f"{name}: expected a whole number in [{low}, {high}], got {v}")
    return v


def _shown_options(options: Sequence, limit: int = 20) -> str:
    shown = ", ".join(repr(o) for o in list(options)[:limit])
    more = len(options) - limit
    return shown + (f" ... and {more} more" if more > 0 else "")


def check_choice(name: str, value, options: Sequence, *, what: str = "option") -> object:
    """Return ``value`` if it is one of ``options``; else ValueError naming ``name`` and listing the options.

    >>> check_choice("format", "glb", ["glb", "obj"])
    'glb'
    """
    if any(type(value) is type(option) and value == option for option in options):  # True is not 1
        return value
    if not options:
        raise ValueError(f"{name}: {value!r} cannot be chosen: there is no {what} to choose from")
    raise ValueError(f"{name}: {value!r} is not one of the {what}s: {_shown_options(options)}")


#: Characters never allowed in a file name we write: ASCII control characters and the ones Windows reserves.
_CONTROL = {chr(c) for c in range(32)} | {"\x7f"}
_RESERVED = set('<>:"|?*')


def check_file_name(name: str, text: str) -> str:
    """Return ``text`` stripped, if it can name a file (or a ``folder/file`` prefix) inside an output folder.

    Refused, with a ValueError naming ``name``: non-strings, empty text, control characters (newlines, tabs,
    NUL...), characters Windows reserves (``<>:"|?*``), absolute paths (``/x``, ``C:\\x``, ``\\\\server``) and
    ``..`` parts, which would leave the folder.

    >>> check_file_name("filename_prefix", " Compose3D/mesh ")
    'Compose3D/mesh'
    """
    if not isinstance(text, str):
        raise ValueError(f"{name}: expected text, got {type(text).__name__} {text!r}")
    stripped = text.strip()
    if not stripped:
        raise ValueError(f"{name}: empty; give a name such as 'Compose3D/mesh'")
    bad = sorted({c for c in stripped if c in _CONTROL})
    if bad:
        codes = ", ".join(f"U+{ord(c):04X}" for c in bad)
        raise ValueError(f"{name}: {text!r} contains control characters ({codes}); file names may hold only "
                         f"printable characters")
    if stripped.startswith(("/", "\\")) or re.match(r"^[A-Za-z]:", stripped):
        raise ValueError(f"{name}: {text!r} is an absolute path; give a path relative to the output folder, "
                         f"such as 'Compose3D/mesh'")
    reserved = sorted({c for c in stripped if c in _RESERVED})
    if reserved:
        raise ValueError(f"{name}: {text!r} contains {' '.join(reserved)}, which file names may not hold on "
                         f"every system; use letters, digits, '-', '_', '.' and '/' for folders")
    if ".." in stripped.replace("\\", "/").split("/"):
        raise ValueError(f"{name}: {text!r} contains '..'; files must stay inside the output folder")
    return stripped


def check_shape(name: str, tensor, shape: Sequence[int | str], *, sizes: dict[str, int] | None = None,
                note: str = "") -> dict[str, int]:
    """Check a tensor's shape against a pattern, in the manner of kornia's ``KORNIA_CHECK_SHAPE``.

    Args:
        name: the argument's name, first in the message.
        tensor: anything with ``.shape``.
        shape: one entry per dimension: an int (that exact size), a name such as ``"B"`` (any size; the same name
            must have the same size everywhere it appears, also across calls sharing ``sizes``), or ``"*"`` as
            the first entry (any number of leading dimensions, including none).
        sizes: named sizes already known (updated in place with the ones found here).
        note: text put after the expected shape in the message (e.g. ``" (min corner, max corner)"``).

    Returns:
        ``sizes``: each name's size.

    Raises:
        ValueError: ``"{name}: expected shape (B, H, W, 3){note}, got (2, 5)"``.

    >>> check_shape("images", torch.zeros(2, 8, 9, 3), ("B", "H", "W", 3))
    {'B': 2, 'H': 8, 'W': 9}
    """
    sizes = {} if sizes is None else sizes
    pattern = list(shape)
    got = tuple(getattr(tensor, "shape", ()))
    leading = bool(pattern) and pattern[0] == "*"
    if leading:
        pattern = pattern[1:]
    expected = "(" + ", ".join(str(p) for p in (["..."] if leading else []) + pattern) + \
        ("," if len(pattern) == 1 and not leading else "") + ")"
    ok = hasattr(tensor, "shape") and (len(got) >= len(pattern) if leading else len(got) == len(pattern))
    found: dict[str, int] = {}
    if ok:
        for want, size in zip(pattern, got[len(got) - len(pattern):]):
            if isinstance(want, str):
                known = sizes.get(want, found.get(want))
                if known is not None and known != size:
                    ok = False
                found.setdefault(want, size)
            elif size != want:
                ok = False
    if not ok:
        shown = got if hasattr(tensor, "shape") else f"a {type(tensor).__name__}"
        raise ValueError(f"{name}: expected shape {expected}{note}, got {shown}")
    sizes.update(found)
    return sizes
