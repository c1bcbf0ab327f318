"""The conversion itself, in PyTorch: equal at the window size, and per cell equal to the classifier
on its crop where the net has no padding (measured, not asserted equal, where it has)."""

from __future__ import annotations

import pytest
import torch

from export.convolutionalize import convolutionalize
from export.geometry import geometry
from export.onnx_export import crops_logits, relative_diff
from models.cli import load_weights
from models.registry import build, get_arch, to_tensor

ARCHS = ["lenet5-relu", "lenet5-classic", "allconv", "alexnet"]


def _setup(arch):
    torch.manual_seed(0)
    spec = get_arch(arch)
    model = build(arch).eval()
    fcn = convolutionalize(model, (spec.input.height, spec.input.width))
    return spec, model, fcn, geometry(fcn, spec.input.height)


@pytest.mark.parametrize("arch", ARCHS)
def test_equal_at_the_window_size(arch):
    spec, model, fcn, _ = _setup(arch)
    x = torch.randn(3, spec.input.channels, spec.input.height, spec.input.width)
    with torch.no_grad():
        assert relative_diff(fcn(x)[:, :, 0, 0].numpy(), model(x).numpy()) < 1e-5


@pytest.mark.parametrize("arch", ARCHS)
def test_dense_map_against_every_crop(arch):
    spec, model, fcn, geo = _setup(arch)
    s = geo.stride
    x = torch.randn(1, spec.input.channels, geo.window + 3 * s + 1, geo.window + 2 * s + 2)
    with torch.no_grad():
        dense = fcn(x)[:, :, : geo.map_size(x.shape[2]), : geo.map_size(x.shape[3])].numpy()
    crops = crops_logits(model, x, geo)
    assert dense.shape == crops.shape == (1, len(spec.labels), 4, 3)
    if geo.exact:
        assert relative_diff(dense, crops) < 1e-5
    else:  # padded: the border context differs, and we say so rather than pretend
        assert relative_diff(dense, crops) > 1e-6


def test_exact_on_real_digits_with_trained_weights(trained_lenet, mnist):
    import numpy as np

    from models.pages import synth_page

    spec = get_arch("lenet5-relu")
    model = build("lenet5-relu").eval()
    load_weights(model, trained_lenet)
    fcn = convolutionalize(model, (28, 28))
    geo = geometry(fcn, 28)
    page = synth_page(np.random.default_rng(0), mnist[1].images, mnist[1].labels, 92, 120, 8)
    x = to_tensor(spec.input, page.image[None])
    with torch.no_grad():
        dense = fcn(x).numpy()
    crops = crops_logits(model, x, geo)
    assert dense.shape == crops.shape
    assert relative_diff(dense, crops) < 1e-5
    assert (dense.argmax(1) == crops.argmax(1)).all()


def test_alexnet_adaptive_pool_is_removed_and_global_pool_becomes_sliding():
    _, _, alex, _ = _setup("alexnet")
    assert not any(isinstance(m, torch.nn.AdaptiveAvgPool2d) for m in alex.modules())
    _, _, allconv, _ = _setup("allconv")
    pools = [m for m in allconv.modules() if isinstance(m, torch.nn.AvgPool2d)]
    assert len(pools) == 1 and pools[0].kernel_size == (4, 4) and pools[0].stride == 1


def test_unsupported_head_is_refused():
    model = build("lenet5-relu")
    model.classifier.append(torch.nn.BatchNorm1d(10))
    with pytest.raises(ValueError, match="cannot convolutionalize"):
        convolutionalize(model, (28, 28))
