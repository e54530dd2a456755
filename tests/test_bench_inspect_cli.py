"""The `validate`, `bench` and `inspect` verbs end to end (and `optimize --validate`)."""

from __future__ import annotations

import json

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from _tiny_models import perturb, tiny_cnn

from onnxcomp.cli import main
from onnxcomp.model import save_model


@pytest.fixture
def paths(tmp_path):
    m = tiny_cnn(spatial=(8, 8))
    ref = save_model(m, tmp_path / "ref.onnx")
    bad = save_model(perturb(m, "w2", (0, 0, 0, 0), 1e-2), tmp_path / "bad.onnx")
    return m, ref, bad


def _json(capsys):
    return json.loads(capsys.readouterr().out)


def test_validate_passes_against_itself_and_its_normalized_copy(paths, tmp_path, capsys):
    _, ref, _ = paths
    assert main(["validate", str(ref), str(ref)]) == 0
    out = capsys.readouterr().out
    assert "logits" in out and "PASS" in out and "rtol=0.0001, atol=1e-05" in out
    norm = tmp_path / "norm.onnx"
    assert main(["optimize", str(ref), "-o", str(norm), "-p", "normalize", "-q", "--json"]) == 0
    capsys.readouterr()
    assert main(["validate", str(ref), str(norm), "--json"]) == 0
    assert _json(capsys)["passed"] is True


def test_validate_fails_on_a_perturbed_weight_naming_the_output(paths, capsys):
    _, ref, bad = paths
    assert main(["validate", str(ref), str(bad)]) == 1
    out = capsys.readouterr().out
    assert "FAIL: output 'logits'" in out and "values beyond atol" in out
    assert main(["validate", str(ref), str(bad), "--json"]) == 1
    res = _json(capsys)
    assert res["passed"] is False and res["summary"]["worst_output"] == "logits"
    assert main(["validate", str(ref), str(bad), "--min-cosine", "0.99"]) == 0


def test_validate_with_labels_reports_accuracy(paths, tmp_path, capsys):
    m, ref, bad = paths
    x = np.random.default_rng(0).standard_normal((10, 3, 8, 8)).astype(np.float32)
    pred = ort.InferenceSession(m.SerializeToString(), providers=["CPUExecutionProvider"]).run(None, {"x": x})[0].argmax(1)
    labels = pred.copy()
    labels[:4] = (labels[:4] + 1) % 10
    np.savez(tmp_path / "val.npz", x=x, labels=labels)
    assert main(["validate", str(ref), str(bad), "--data", str(tmp_path / "val.npz"), "--json",
                 "--max-top1-drop", "5"]) == 0
    out = _json(capsys)
    assert out["outputs"][0]["ref_top1_acc"] == pytest.approx(60.0)
    assert out["summary"]["ref_top1_acc"] == pytest.approx(60.0) and out["samples"] == 10
    assert main(["validate", str(ref), str(ref), "--data", str(tmp_path / "val.npz")]) == 0
    assert "acc ref" in capsys.readouterr().out


def test_validate_symbolic_dim_without_input_shape_is_exit_2_naming_the_dim(tmp_path, capsys):
    sym = save_model(tiny_cnn(spatial=("height", 8)), tmp_path / "sym.onnx")
    assert main(["validate", str(sym), str(sym)]) == 2
    err = capsys.readouterr().err
    assert "dim 2 'height' is symbolic" in err and "--input-shape" in err and len(err.strip().splitlines()) == 1
    assert main(["validate", str(sym), str(sym), "--input-shape", "x:1,3,8,8"]) == 0


def test_validate_bad_inputs_are_exit_2(paths, tmp_path, capsys):
    _, ref, _ = paths
    other = save_model(tiny_cnn(spatial=(8, 8), classes=4), tmp_path / "other.onnx")
    assert main(["validate", str(ref), str(other)]) == 2
    assert "has shape" in capsys.readouterr().err
    assert main(["validate", str(ref), str(tmp_path / "missing.onnx")]) == 2


def test_bench_reports_interleaved_latency(paths, capsys):
    _, ref, bad = paths
    args = ["bench", str(ref), str(bad), "--runs", "4", "--rounds", "2", "--warmup", "1", "--threads", "1", "-q"]
    assert main([*args, "--json"]) == 0
    res = _json(capsys)
    assert [r["name"] for r in res["results"]] == [str(ref), str(bad)]
    assert res["results"][0]["ratio"] == 1.0 and res["results"][1]["runs"] == 8
    assert res["input_shapes"] == {"x": [1, 3, 8, 8]} and res["results"][0]["macs"] > 0
    assert main([*args, "--input-shape", "x:2,3,8,8"]) == 0
    out = capsys.readouterr().out
    assert "p50 ms" in out and "x:2x3x8x8" in out


def test_inspect_table_and_json(paths, capsys):
    _, ref, _ = paths
    assert main(["inspect", str(ref), "--input-shape", "x:1,3,8,8"]) == 0
    out = capsys.readouterr().out
    for word in ("conv1", "conv2", "fc", "Gemm", "3x3", "MACs", "bytes on disk"):
        assert word in out
    assert main(["inspect", str(ref), "--input-shape", "x:1,3,8,8", "--json", "--lzma-preset", "0"]) == 0
    res = _json(capsys)
    assert res["macs"] == 8 * 64 * 27 + 16 * 16 * 72 + 160 and res["macs_complete"]
    assert sum(layer["mac_share"] for layer in res["layers"]) == pytest.approx(1.0)
    assert res["lzma_bytes"] > 0 and res["file_bytes"] == ref.stat().st_size


def test_inspect_zoo_resnet18_total(tmp_path, capsys):
    zoo = pytest.importorskip("onnxcomp.zoo")
    path = save_model(zoo.build("resnet18"), tmp_path / "r18.onnx")
    assert main(["inspect", str(path), "--json"]) == 0  # symbolic batch -> 1
    res = _json(capsys)
    assert abs(res["macs"] / 1e9 - 1.81) / 1.81 < 0.02
    assert len([la for la in res["layers"] if la["op"] == "Conv"]) == 20


def test_optimize_validate_records_the_check(paths, tmp_path, capsys):
    _, ref, _ = paths
    report = tmp_path / "r.json"
    out = tmp_path / "o.onnx"
    assert main(["optimize", str(ref), "-o", str(out), "-p", "normalize", "--validate", "--rtol", "1e-4",
                 "--atol", "1e-5", "--report", str(report), "-q"]) == 0
    rep = json.loads(report.read_text())
    assert rep["validation"]["passed"] is True and rep["validation"]["summary"]["max_abs_err"] == 0.0
    assert "validation: pass" in capsys.readouterr().out


def test_validate_a_batch_1_export_and_data_it_cannot_take(paths, tmp_path, capsys):
    """A candidate with a fixed batch of 1 and data onnxruntime rejects used to end in exit 3."""
    m, ref, _ = paths
    b1 = onnx.ModelProto()
    b1.CopyFrom(m)
    for vi in (b1.graph.input[0], b1.graph.output[0]):
        vi.type.tensor_type.shape.dim[0].Clear()
        vi.type.tensor_type.shape.dim[0].dim_value = 1
    cand = save_model(b1, tmp_path / "b1.onnx")
    assert main(["validate", str(ref), str(cand), "--samples", "5", "--json"]) == 0
    assert _json(capsys)["samples"] == 5
    x = np.random.default_rng(0).standard_normal((4, 3, 8, 8)).astype(np.float32)
    np.savez(tmp_path / "d.npz", x=x)
    assert main(["validate", str(ref), str(cand), "--data", str(tmp_path / "d.npz")]) == 0
    capsys.readouterr()
    x[1, 0, 0, 0] = np.inf
    np.savez(tmp_path / "inf.npz", x=x)
    assert main(["validate", str(ref), str(ref), "--data", str(tmp_path / "inf.npz")]) == 2
    assert "NaN or infinite" in capsys.readouterr().err
    assert main(["validate", str(ref), str(ref), "--samples", "0"]) == 2  # used to mean "the default 8"


def test_inspect_and_bench_refuse_input_shapes_that_do_not_fit(paths, capsys):
    _, ref, _ = paths
    for shape, words in [("x:1,3,8", "3 dims given"), ("y:1,3,8,8", "names 'y'"), ("x:1,3,16,16", "fixes it to 8")]:
        assert main(["inspect", str(ref), "--input-shape", shape]) == 2
        err = capsys.readouterr().err
        assert words in err and len(err.strip().splitlines()) == 1
    assert main(["bench", str(ref), "--input-shape", "x:1,3,8", "-q"]) == 2
    capsys.readouterr()
