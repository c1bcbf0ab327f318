"""ONNX export, verification with onnxruntime, int8, and the model-store round trip."""

from __future__ import annotations

import json

import numpy as np
import onnxruntime as ort
import pytest
import torch

from export.__main__ import main as export_main
from export.card import read_embedded
from export.convolutionalize import convolutionalize
from export.geometry import geometry
from export.onnx_export import VerificationError, export_onnx, session, verify
from models.registry import build


@pytest.fixture(scope="module")
def lenet_onnx(tmp_path_factory):
    torch.manual_seed(0)
    model = build("lenet5-relu").eval()
    fcn = convolutionalize(model, (28, 28))
    path = tmp_path_factory.mktemp("onnx") / "lenet.onnx"
    export_onnx(fcn, 1, 28, path)
    return model, fcn, path


@pytest.mark.parametrize("shape", [(1, 1, 28, 28), (3, 1, 28, 28), (2, 1, 57, 100), (1, 1, 300, 29)])
def test_dynamic_batch_height_width(lenet_onnx, shape):
    _, fcn, path = lenet_onnx
    x = torch.randn(*shape)
    got = session(path).run(["scores"], {"input": x.numpy()})[0]
    with torch.no_grad():
        np.testing.assert_allclose(got, fcn(x).numpy(), rtol=1e-4, atol=1e-5)


def test_one_self_contained_file(lenet_onnx):
    _, _, path = lenet_onnx
    assert not list(path.parent.glob("*.data"))
    assert ort.InferenceSession(str(path), providers=["CPUExecutionProvider"]).get_inputs()[0].shape[2] == "H"


def test_verification_catches_a_wrong_model(lenet_onnx):
    model, _, path = lenet_onnx
    other = build("lenet5-relu").eval()  # different random weights
    geo = geometry(convolutionalize(model, (28, 28)), 28)
    verify(model, path, geo, torch.randn(4, 1, 28, 28), [torch.randn(1, 1, 40, 44)])
    with pytest.raises(VerificationError, match="window size"):
        verify(other, path, geo, torch.randn(4, 1, 28, 28), [torch.randn(1, 1, 40, 44)])


def test_export_cli_to_store_and_back(tmp_path, bentoml_home, trained_lenet):
    """train → export (fp32 + int8) → BentoML store → onnxruntime, card in both places."""
    import bentoml

    export_main(["--arch", "lenet5-relu", "--weights", str(trained_lenet), "--out", str(tmp_path),
                 "--int8", "--name", "digits"])
    fp32, int8 = bentoml.models.get("digits:latest"), bentoml.models.get("digits-int8:latest")
    card = fp32.info.metadata
    assert card["version"] == fp32.tag.version and card["name"] == "digits"
    assert card["labels"] == [str(d) for d in range(10)]
    assert card["input"] == {"mode": "L", "height": 28, "width": 28, "mean": [0.1307], "std": [0.3081],
                             "scale": 1 / 255, "channels": 1, "dtype": "uint8", "layout": "NCHW"}
    assert card["dense"]["stride"] == 4 and card["dense"]["exact"] is True
    assert card["dense"]["deviation"]["relative_diff"] <= 1e-4
    assert card["provenance"]["held_out_accuracy"] > 0.5
    assert read_embedded(fp32.path_of("model.onnx")) == json.loads(json.dumps(card))

    quant = int8.info.metadata["provenance"]["quantization"]
    assert quant["top1_agreement"] >= 0.98
    assert quant["fp32_accuracy"] - quant["int8_accuracy"] <= 0.01
    sess = ort.InferenceSession(int8.path_of("model.onnx"), providers=["CPUExecutionProvider"])
    assert sess.run(None, {"input": np.zeros((2, 1, 60, 60), np.float32)})[0].shape == (2, 10, 9, 9)


@pytest.mark.parametrize("arch", ["lenet5-classic", "alexnet", "allconv"])
def test_export_other_archs_records_deviation(tmp_path, arch):
    export_main(["--arch", arch, "--random-init", "--out", str(tmp_path), "--no-store"])
    card = read_embedded(tmp_path / f"{arch}.onnx")
    dev = card["dense"]["deviation"]
    assert 0 < dev["argmax_agreement"] <= 1 and dev["cells"] > 0
    assert card["dense"]["exact"] is (arch == "allconv")
    if arch == "alexnet":
        assert card["dense"]["receptive_field"] == 355 and dev["relative_diff"] > 1e-3
