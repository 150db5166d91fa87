"""The kernel-side value and shape checks: what they accept, what they return, and the messages they give."""
from __future__ import annotations

import numpy as np
import pytest
import torch

from compose3d.kernels.checks import check_shape


def test_named_sizes_are_returned_and_must_agree():
    assert check_shape("images", torch.zeros(2, 8, 9, 3), ("B", "H", "W", 3)) == {"B": 2, "H": 8, "W": 9}
    assert check_shape("grid", np.zeros((4, 4, 4)), ("N", "N", "N")) == {"N": 4}
    with pytest.raises(ValueError, match=r"^grid: expected shape \(N, N, N\), got \(4, 4, 5\)$"):
        check_shape("grid", torch.zeros(4, 4, 5), ("N", "N", "N"))


def test_sizes_are_shared_across_calls():
    sizes = check_shape("q", torch.zeros(2, 7, 6), ("B", "L", "C"))
    assert check_shape("k", torch.zeros(2, 5, 6), ("B", "Lk", "C"), sizes=sizes) is sizes
    assert sizes == {"B": 2, "L": 7, "C": 6, "Lk": 5}
    with pytest.raises(ValueError, match=r"^v: expected shape \(B, Lk, C\), got \(3, 5, 6\)$"):
        check_shape("v", torch.zeros(3, 5, 6), ("B", "Lk", "C"), sizes=sizes)


def test_exact_sizes_ranks_leading_dimensions_and_notes():
    with pytest.raises(ValueError, match=r"^aabb: expected shape \(2, 3\) \(min corner, max corner\), got \(3,\)$"):
        check_shape("aabb", torch.zeros(3), (2, 3), note=" (min corner, max corner)")
    with pytest.raises(ValueError, match=r"^points: expected shape \(N,\), got \(2, 3\)$"):
        check_shape("points", torch.zeros(2, 3), ("N",))
    assert check_shape("rgb", torch.zeros(5, 4, 3), ("*", 3)) == {}
    assert check_shape("rgb", torch.zeros(3), ("*", 3)) == {}
    with pytest.raises(ValueError, match=r"^rgb: expected shape \(\.\.\., 3\), got \(3, 2\)$"):
        check_shape("rgb", torch.zeros(3, 2), ("*", 3))
    with pytest.raises(ValueError, match=r"^rgb: expected shape \(N, 3\), got a list$"):
        check_shape("rgb", [[0, 0, 0]], ("N", 3))
