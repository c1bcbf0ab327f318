"""Geometry computed from the layers, checked by brute force: output sizes, stride, and which input
pixels can change which cells."""

from __future__ import annotations

import pytest
import torch

from export.convolutionalize import convolutionalize
from export.geometry import geometry
from models.registry import build, get_arch

EXPECTED = {  # arch: (stride, receptive field, receptive-field offset, exact)
    "lenet5-relu": (4, 28, 0, True),
    "allconv": (4, 28, 0, True),
    "lenet5-classic": (4, 32, -2, False),
    "alexnet": (32, 355, -66, False),
}


def _fcn(arch):
    torch.manual_seed(0)
    spec = get_arch(arch)
    fcn = convolutionalize(build(arch).eval(), (spec.input.height, spec.input.width))
    return spec, fcn, geometry(fcn, spec.input.height)


@pytest.mark.parametrize("arch", list(EXPECTED))
def test_geometry_values(arch):
    _, _, geo = _fcn(arch)
    assert (geo.stride, geo.receptive_field, geo.receptive_field_offset, geo.exact) == EXPECTED[arch]
    assert geo.offset == 0 and geo.window == get_arch(arch).input.height


@pytest.mark.parametrize("arch", list(EXPECTED))
def test_output_size_rule(arch):
    """The net emits at least the rule's cells, at most one overhanging cell more (padded nets)."""
    spec, fcn, geo = _fcn(arch)
    sizes = range(geo.window, geo.window + 2 * geo.stride + 1, 1 if geo.stride < 8 else 7)
    for size in sizes:
        with torch.no_grad():
            h = fcn(torch.zeros(1, spec.input.channels, size, geo.window)).shape[2]
        assert geo.map_size(size) <= h <= geo.map_size(size) + (0 if geo.exact else 1), size
    assert geo.map_size(geo.window - 1) == 0


@pytest.mark.parametrize("arch", ["lenet5-relu", "allconv", "lenet5-classic"])
def test_receptive_field_by_perturbation(arch):
    """Perturb one pixel row at a time: exactly the cells whose receptive field covers it change."""
    spec, fcn, geo = _fcn(arch)
    size = geo.window + 5 * geo.stride
    x = torch.rand(1, 1, size, geo.window)
    with torch.no_grad():
        base = fcn(x)[0, :, : geo.map_size(size), 0]
        for row in range(size):
            y = x.clone()
            y[0, 0, row, :] += 50.0
            changed = {i for i in range(base.shape[1])
                       if (fcn(y)[0, :, i, 0] - base[:, i]).abs().max() > 1e-6}
            start = geo.receptive_field_offset
            expected = {i for i in range(base.shape[1])
                        if start + i * geo.stride <= row < start + i * geo.stride + geo.receptive_field}
            assert changed == expected, (row, changed, expected)
