"""Universal quantization (the math and the `uquant` pass) and the .onnxc container (pack / unpack)."""

from __future__ import annotations

import numpy as np
import onnx
import pytest
from _helpers import ort_run
from _tiny_models import tiny_cnn
from onnx import numpy_helper

from onnxcomp.cli import main
from onnxcomp.container import pack, unpack
from onnxcomp.errors import BadInputError, PipelineSyntaxError
from onnxcomp.linalg import uquant as uq
from onnxcomp.model import model_bytes, save_model
from onnxcomp.passes import REWRITTEN, SKIPPED, Context, get_pass
from onnxcomp.passes.uquant import METADATA_KEY, recorded_steps

# ---------------------------------------------------------------------------------------------
# the math
# ---------------------------------------------------------------------------------------------


def test_quantization_error_is_bounded_and_zeros_stay():
    rng = np.random.default_rng(0)
    w = rng.standard_normal(5000).astype(np.float32)
    w[::7] = 0.0
    q, codes = uq.quantize(w, 0.1, seed=3, key="w")
    assert np.all(q[w == 0] == 0)
    assert codes.size == np.count_nonzero(w)
    assert np.abs(q - w).max() <= 0.05 + 1e-6


def test_dither_makes_the_error_independent_of_the_weights():
    """Plain rounding of a constant step/4 errs by -step/4 every time; the dithered quantizer's error
    is uniform with mean 0 whatever the weights (what makes it universal)."""
    w = np.full(20000, 0.025, dtype=np.float32)
    q, _ = uq.quantize(w, 0.1, seed=0, key="const")
    err = q.astype(np.float64) - w
    assert abs(err.mean()) < 0.002
    assert np.abs(err).max() <= 0.05 + 1e-6
    assert err.std() == pytest.approx(0.1 / np.sqrt(12), rel=0.05)


def test_codes_round_trip_to_the_same_bits():
    w = np.random.default_rng(1).standard_normal((16, 8, 3, 3)).astype(np.float32)
    q, codes = uq.quantize(w, uq.step_for_bits(w, 4), seed=5, key="layer/w")
    step = uq.step_for_bits(w, 4)
    back = uq.codes_of(q, step, 5, "layer/w")
    assert np.array_equal(back, codes)
    assert uq.dequantize(codes, q != 0, step, 5, "layer/w").tobytes() == q.tobytes()
    assert uq.codes_of(q, step, 6, "layer/w") is None  # another seed: not this quantization
    assert uq.codes_of(w, step, 5, "layer/w") is None  # unquantized weights


def test_step_for_bits_spans_the_range():
    w = np.array([-1.0, 0.0, 0.5, 2.0], dtype=np.float32)
    assert uq.step_for_bits(w, 4) == pytest.approx(3.0 / 15)
    assert uq.step_for_bits(np.zeros(4, np.float32), 4) == 0.0
    assert uq.step_for_bits(np.full(8, 0.3, np.float32), 4) == 0.0  # one value: left exact


# ---------------------------------------------------------------------------------------------
# the pass
# ---------------------------------------------------------------------------------------------


def _quantized(model, **options):
    return get_pass("uquant")(**{"min_params": 16, **options}).run(model, Context())


def test_pass_quantizes_weights_and_records_the_steps():
    model = tiny_cnn()
    res = _quantized(model, bits=6, seed=7)
    done = [r for r in res.layers if r.action == REWRITTEN]
    assert done and all(r.figures["levels"] <= 2**6 + 1 for r in done)
    steps = recorded_steps(res.model)
    assert set(steps) == {n.input[1] for n in res.model.graph.node if n.name in {r.node for r in done}}
    init = {t.name: numpy_helper.to_array(t) for t in res.model.graph.initializer}
    orig = {t.name: numpy_helper.to_array(t) for t in model.graph.initializer}
    for name, (step, seed) in steps.items():
        assert seed == 7
        assert np.abs(init[name] - orig[name]).max() <= step / 2 + 1e-6
        assert uq.codes_of(init[name], step, seed, name) is not None
    x = {"x": np.random.default_rng(0).standard_normal((2, 3, 16, 16)).astype(np.float32)}
    a, b = ort_run(model, x), ort_run(res.model, x)
    for k in a:
        assert np.allclose(a[k], b[k], atol=0.1 * np.abs(a[k]).max())


def test_pass_step_option_and_skips():
    model = tiny_cnn()
    res = get_pass("uquant")(step=0.01).run(model, Context())  # default min_params=1024
    assert any(r.action == SKIPPED and "min_params" in r.reason for r in res.layers)
    for r in res.layers:
        if r.action == REWRITTEN:
            assert r.figures["step"] == 0.01
    with pytest.raises(PipelineSyntaxError, match="bits"):
        get_pass("uquant")(bits=0)
    with pytest.raises(PipelineSyntaxError, match="step"):
        get_pass("uquant")(step=-1)


def test_second_run_merges_metadata():
    model = tiny_cnn()
    first = _quantized(model, include="conv1", seed=1).model
    second = _quantized(first, exclude="conv1", seed=2).model
    seeds = {seed for _, seed in recorded_steps(second).values()}
    assert seeds == {1, 2}
    assert sum(p.key == METADATA_KEY for p in second.metadata_props) == 1


# ---------------------------------------------------------------------------------------------
# the container
# ---------------------------------------------------------------------------------------------


def _coders():
    out = ["lzma"]
    try:
        import zstandard  # noqa: F401

        out.append("zstd")
    except ImportError:
        pass
    return out


@pytest.mark.parametrize("coder", _coders())
def test_pack_unpack_is_byte_identical(coder):
    model = _quantized(tiny_cnn(), bits=4).model
    blob, stats = pack(model, coder)
    assert stats.coded_tensors == len(recorded_steps(model))
    assert unpack(blob) == model_bytes(model)
    assert pack(model, coder)[0] == blob  # deterministic


def test_pack_without_uquant_keeps_everything_and_says_so():
    model = tiny_cnn()
    blob, stats = pack(model)
    assert stats.coded_tensors == 0 and unpack(blob) == model_bytes(model)


def test_weights_changed_after_uquant_are_stored_as_they_are():
    model = _quantized(tiny_cnn(), bits=4).model
    name = next(iter(recorded_steps(model)))
    t = next(t for t in model.graph.initializer if t.name == name)
    arr = numpy_helper.to_array(t).copy()
    arr.flat[0] += 0.123
    t.CopyFrom(numpy_helper.from_array(arr, name))
    blob, stats = pack(model)
    assert name in stats.raw_tensors and unpack(blob) == model_bytes(model)


def test_float_data_storage_is_restored_exactly():
    model = _quantized(tiny_cnn(), bits=4).model
    name = next(iter(recorded_steps(model)))
    t = next(t for t in model.graph.initializer if t.name == name)
    values = numpy_helper.to_array(t).reshape(-1).tolist()
    t.ClearField("raw_data")
    t.float_data.extend(values)
    blob, stats = pack(model)
    assert name not in stats.raw_tensors and unpack(blob) == model_bytes(model)


@pytest.mark.parametrize("damage", ["empty", "foreign", "truncated_header", "truncated_body", "flipped", "version"])
def test_damaged_files_are_refused(damage):
    blob, _ = pack(_quantized(tiny_cnn(), bits=4).model)
    bad = {
        "empty": b"",
        "foreign": model_bytes(tiny_cnn()),
        "truncated_header": blob[:20],
        "truncated_body": blob[: len(blob) - 50],
        "flipped": blob[:-100] + bytes([blob[-100] ^ 0xFF]) + blob[-99:],
        "version": blob.replace(b'"version": 1', b'"version": 9', 1),
    }[damage]
    with pytest.raises(BadInputError):
        unpack(bad)


def test_cli_pack_unpack_and_bad_file(tmp_path, capsys):
    src = tmp_path / "q.onnx"
    save_model(_quantized(tiny_cnn(), bits=4).model, src)
    assert main(["pack", str(src), "-o", str(tmp_path / "q.onnxc")]) == 0
    assert "ratio" in capsys.readouterr().out
    assert main(["unpack", str(tmp_path / "q.onnxc"), "-o", str(tmp_path / "back.onnx")]) == 0
    assert (tmp_path / "back.onnx").read_bytes() == src.read_bytes()
    (tmp_path / "junk.onnxc").write_bytes(b"ONNXC\x00\x01\n" + b"\xff" * 40)
    capsys.readouterr()
    assert main(["unpack", str(tmp_path / "junk.onnxc"), "-o", str(tmp_path / "out.onnx")]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "junk.onnxc" in err[0] and "damaged" in err[0]
    assert not (tmp_path / "out.onnx").exists()
    assert main(["unpack", str(tmp_path / "missing.onnxc"), "-o", str(tmp_path / "out.onnx")]) == 2
    assert main(["pack", str(src), "-o", str(src)]) == 2  # never overwrite the input


@pytest.mark.slow
def test_four_bit_resnet18_packs_at_least_8x(tmp_path):
    from onnxcomp import zoo

    model = _quantized(zoo.build("resnet18"), bits=4).model
    blob, stats = pack(model)
    assert stats.ratio >= 8.0, stats
    assert unpack(blob) == model_bytes(model)


def test_jointly_sparse_winograd_model_packs_with_masks():
    model = tiny_cnn()
    wino = get_pass("winograd")(objective="macs", tile="2", sparsity="0.5:0.5").run(model, Context()).model
    q = _quantized(wino, bits=4).model
    blob, stats = pack(q)
    assert stats.coded_tensors >= 1 and unpack(blob) == model_bytes(q)
    x = {"x": np.random.default_rng(0).standard_normal((1, 3, 16, 16)).astype(np.float32)}
    restored = onnx.load_from_string(unpack(blob))
    assert all(np.array_equal(a, b) for a, b in zip(ort_run(q, x).values(), ort_run(restored, x).values(), strict=True))


def test_unknown_ops_shared_weights_and_tiny_steps_are_skipped_untouched():
    from onnx import helper

    model = tiny_cnn()
    res = get_pass("uquant")(ops="Conv|Relu", min_params=16).run(model, Context())
    assert any(r.op == "Relu" and r.action == SKIPPED and "no weight" in r.reason for r in res.layers)
    # two convs read one weight; one of them is excluded: neither is quantized, the weight is untouched
    shared = onnx.ModelProto()
    shared.CopyFrom(model)
    conv1 = next(n for n in shared.graph.node if n.name == "conv1")
    twin = helper.make_node("Conv", ["x", conv1.input[1], conv1.input[2]], ["c1b"], name="conv1b", pads=[1, 1, 1, 1],
                            kernel_shape=[3, 3])
    shared.graph.node.insert(1, twin)
    shared.graph.output.append(helper.make_empty_tensor_value_info("c1b"))
    res = get_pass("uquant")(min_params=16, exclude="conv1b").run(shared, Context())
    recs = {r.node: r for r in res.layers}
    assert recs["conv1"].action == SKIPPED and "also read by conv1b" in recs["conv1"].reason
    w = {t.name: t for t in res.model.graph.initializer}[conv1.input[1]]
    assert w.SerializeToString() == {t.name: t for t in shared.graph.initializer}[conv1.input[1]].SerializeToString()
    both = get_pass("uquant")(min_params=16).run(shared, Context())
    recs = {r.node: r for r in both.layers}
    assert recs["conv1"].action == recs["conv1b"].action == REWRITTEN
    assert set(recs["conv1"].figures["shared_by"]) == {"conv1", "conv1b"}
    tiny = get_pass("uquant")(step=1e-20, min_params=16).run(model, Context())
    assert all(r.action == SKIPPED and "too fine" in r.reason for r in tiny.layers)


def test_negative_zero_is_stored_as_it_is():
    model = _quantized(tiny_cnn(), bits=4).model
    name = next(iter(recorded_steps(model)))
    t = next(t for t in model.graph.initializer if t.name == name)
    arr = numpy_helper.to_array(t).copy()
    arr.flat[0] = -0.0
    t.CopyFrom(numpy_helper.from_array(arr, name))
    blob, stats = pack(model)
    assert "-0.0" in stats.raw_tensors[name] and unpack(blob) == model_bytes(model)
