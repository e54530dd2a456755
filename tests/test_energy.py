"""The row-stationary energy model against a hand-computed layer, codebook weights, cost files."""

from __future__ import annotations

import json

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

from onnxcomp.energy import DEFAULT_COSTS, LayerShape, layer_energy, load_costs, model_energy
from onnxcomp.errors import BadInputError
from onnxcomp.passes import Context, get_pass


def _conv_model() -> onnx.ModelProto:
    """x [1, 2, 7, 7] -> Conv 3x3, 4 filters, no padding -> y [1, 4, 5, 5]."""
    w = np.random.default_rng(0).standard_normal((4, 2, 3, 3)).astype(np.float32)
    g = helper.make_graph([helper.make_node("Conv", ["x", "w"], ["y"], name="conv", kernel_shape=[3, 3])], "g",
                          [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 2, 7, 7])],
                          [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 4, 5, 5])],
                          [numpy_helper.from_array(w, "w")])
    m = helper.make_model(g, opset_imports=[helper.make_opsetid("", 17)])
    m.ir_version = 8
    return m


# By hand, with Eyeriss' costs (DRAM 200, buffer 6, array 2, RF 1, MAC 1), one pass of filters and of
# channels: MACs 4*2*9*25 = 1800; weights 72 (DRAM 72, buffer 72, array 72*Ho=360, RF 1800); inputs 98
# (DRAM 98, buffer 98, array 98*Kh=294, RF 1800); psums 100 (DRAM 100, buffer 100, array 100*Kh=300,
# RF 3600). Energy: MAC 1800 + DRAM 200*270 + buffer 6*270 + array 2*954 + RF 7200 = 66528.
HAND = 66528.0
# 4-bit codebook (16 entries): weights at DRAM and buffer 72/4 + 16 = 34, array 360/4 = 90:
# 1800 + 200*232 + 6*232 + 2*684 + 7200 = 58160.
HAND_CODEBOOK = 58160.0


def test_a_hand_computed_layer():
    e = layer_energy("conv", LayerShape(4, 2, 3, 3, 5, 5, 98), DEFAULT_COSTS)
    assert e.macs == 1800 and e.total == pytest.approx(HAND)
    assert e.accesses["weights"]["array"] == 360 and e.accesses["inputs"]["array"] == 294
    assert e.accesses["psums"] == {"dram": 100, "buffer": 100, "array": 300, "rf": 3600}


def test_passes_over_filters_and_channels_multiply_buffer_and_array_traffic():
    one = layer_energy("c", LayerShape(32, 32, 3, 3, 5, 5, 32 * 49), DEFAULT_COSTS)
    assert one.accesses["inputs"]["buffer"] == 2 * 32 * 49  # ceil(32 / 16) passes over the filters
    assert one.accesses["psums"]["buffer"] == 32 * 25 * 3  # written twice, read back once


def test_the_model_and_its_codebook_version():
    model = _conv_model()
    (layer,), missing = model_energy(model)
    assert not missing and layer.total == pytest.approx(HAND)
    coded = get_pass("codebook")(bits=4, min_params=16).run(model, Context()).model
    (layer,), _ = model_energy(coded)
    assert layer.total == pytest.approx(HAND_CODEBOOK)


def test_cost_files(tmp_path):
    path = tmp_path / "costs.json"
    path.write_text(json.dumps({"dram": 100}))
    costs = load_costs(path)
    e = layer_energy("conv", LayerShape(4, 2, 3, 3, 5, 5, 98), costs)
    assert e.total == pytest.approx(HAND - 100 * 270)
    for bad in ({"dramm": 1}, {"dram": -1}, {"word_bits": 0}, [1, 2]):
        path.write_text(json.dumps(bad))
        with pytest.raises(BadInputError):
            load_costs(path)
    path.write_text("{not json")
    with pytest.raises(BadInputError, match="not a readable JSON"):
        load_costs(path)


def test_inspect_energy_against_a_baseline(tmp_path, capsys):
    from onnxcomp.cli import main

    base, coded = tmp_path / "base.onnx", tmp_path / "coded.onnx"
    onnx.save(_conv_model(), base)
    onnx.save(get_pass("codebook")(bits=4, min_params=16).run(_conv_model(), Context()).model, coded)
    assert main(["inspect", str(coded), "--energy", "--baseline", str(base)]) == 0
    out = capsys.readouterr().out
    assert f"{HAND_CODEBOOK:.4g}" in out and f"baseline: {HAND:.4g}" in out and "1.14x" in out
