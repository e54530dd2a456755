"""Models past protobuf's 2 GB limit: built on the fly with external data (a 2.2 GB lookup table
behind a small CNN), run through normalize and tucker from the CLI, written with external data,
and loaded by onnxruntime; int8 under the guard too. Needs ~7 GB of disk in the temp folder and
~13 GB of memory (int8: onnxruntime's quantizer holds several copies)."""

from __future__ import annotations

import shutil

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from onnx import TensorProto, helper, numpy_helper

from onnxcomp.cli import main

ROWS = 55_000_000  # x 10 float32 = 2.2 GB


def _big_model(folder) -> tuple:
    """x[N, 8, 16, 16] -> conv -> relu -> GAP -> fc -> logits; y = logits + table[argmax(logits)]."""
    rng = np.random.default_rng(0)
    data = folder / "big.onnx.data"
    chunk = 1_000_000
    with open(data, "wb") as fh:  # streamed: the table is never one 2 GB array or proto
        block = np.zeros((chunk, 10), np.float32)
        first = block.copy()
        first[:10] = np.eye(10, dtype=np.float32)
        fh.write(first.tobytes())
        for _ in range(ROWS // chunk - 1):
            fh.write(block.tobytes())
    table = onnx.TensorProto(name="table", data_type=TensorProto.FLOAT, dims=[ROWS, 10])
    for key, value in (("location", "big.onnx.data"), ("offset", "0"), ("length", str(ROWS * 40))):
        table.external_data.add(key=key, value=value)
    table.data_location = TensorProto.EXTERNAL
    w = numpy_helper.from_array((rng.standard_normal((32, 8, 3, 3)) * 0.2).astype(np.float32), "w")
    wf = numpy_helper.from_array((rng.standard_normal((10, 32)) * 0.3).astype(np.float32), "wf")
    nodes = [helper.make_node("Conv", ["x", "w"], ["c"], name="conv", pads=[1] * 4),
             helper.make_node("Relu", ["c"], ["r"], name="relu"),
             helper.make_node("GlobalAveragePool", ["r"], ["g"], name="gap"),
             helper.make_node("Flatten", ["g"], ["f"], name="flat"),
             helper.make_node("Gemm", ["f", "wf"], ["logits"], name="fc", transB=1),
             helper.make_node("ArgMax", ["logits"], ["am"], name="am", axis=1, keepdims=0),
             helper.make_node("Gather", ["table", "am"], ["bias"], name="lookup", axis=0),
             helper.make_node("Add", ["logits", "bias"], ["y"], name="add")]
    g = helper.make_graph(nodes, "big", [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", 8, 16, 16])],
                          [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["N", 10])], [w, wf, table])
    m = helper.make_model(g, opset_imports=[helper.make_opsetid("", 17)])
    m.ir_version = 8
    path = folder / "big.onnx"
    path.write_bytes(m.SerializeToString())
    return path, data


@pytest.fixture(scope="module")
def big(tmp_path_factory):
    folder = tmp_path_factory.mktemp("big")
    if shutil.disk_usage(folder).free < 8 * 2**30:
        pytest.skip("needs 8 GB free in the temp folder")
    try:
        yield (folder, *_big_model(folder))
    finally:
        shutil.rmtree(folder, ignore_errors=True)


def _check_written(folder, path, out, extra=()):
    assert sorted(p.name for p in folder.iterdir()) == sorted(["big.onnx", "big.onnx.data", out.name,
                                                               out.name + ".data", *extra])  # no temp file left
    assert out.stat().st_size < 100_000 and (folder / (out.name + ".data")).stat().st_size > 2**31
    x = np.random.default_rng(1).standard_normal((3, 8, 16, 16)).astype(np.float32)
    ref = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"]).run(None, {"x": x})[0]
    got = ort.InferenceSession(str(out), providers=["CPUExecutionProvider"]).run(None, {"x": x})[0]
    assert got.shape == ref.shape == (3, 10)
    return onnx.load(str(out), load_external_data=False)


@pytest.mark.slow
def test_a_model_over_2_gb_goes_through_normalize_and_tucker(big, capsys):
    folder, path, _ = big
    out = folder / "tucker.onnx"
    # objective=macs: this test is about a model over 2 GB, not about which option times faster (a
    # 30 us layer's Tucker-1 / Tucker-2 / no-rewrite choice under objective=latency depends on the machine)
    try:
        code = main(["optimize", str(path), "-o", str(out), "-p", "tucker{rank=0.5,round=1,min_gain=-1,objective=macs}",
                     "-q"])
        stdout, err = capsys.readouterr()
        assert code == 0, err
        assert "2.2" in next(line for line in stdout.splitlines() if line.startswith("file bytes"))
        written = _check_written(folder, path, out)
        assert "conv/tucker_core" in [n.name for n in written.graph.node]  # decomposed; the 2.2 GB table carried over
    finally:  # the next test checks the folder holds nothing else
        for f in (out, folder / "tucker.onnx.data"):
            f.unlink(missing_ok=True)


@pytest.mark.slow
def test_a_model_over_2_gb_goes_through_int8_under_the_guard(big, capsys):
    folder, path, _ = big
    data = folder / "d.npz"
    np.savez(data, x=np.random.default_rng(0).standard_normal((40, 8, 16, 16)).astype(np.float32))
    out = folder / "int8.onnx"
    # objective=any: whether int8 times faster on a 30 us layer is the machine's call, not this test's
    code = main(["optimize", str(path), "-o", str(out), "-p", "int8{samples=16,objective=any}", "--data", str(data),
                 "-q", "--no-normalize"])
    _, err = capsys.readouterr()
    assert code == 0, err
    written = _check_written(folder, path, out, extra=["d.npz"])
    assert "DequantizeLinear" in {n.op_type for n in written.graph.node}
