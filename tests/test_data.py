"""Data sources: every format streams the right samples in batches, re-iterates, and rejects data that
does not fit the model with a one-line BadInputError."""

from __future__ import annotations

import json

import numpy as np
import pytest
from _tiny_models import tiny_cnn
from onnx import TensorProto, helper

from onnxcomp.data import DataSource, model_inputs, open_source, random_source
from onnxcomp.errors import BadInputError


def _collect(src: DataSource):
    xs, labels = [], []
    sizes = []
    for feeds, lab in src.batches():
        sizes.append(next(iter(feeds.values())).shape[0])
        xs.append(feeds)
        labels.append(lab)
    return xs, labels, sizes


def _stack(batches, name):
    return np.concatenate([b[name] for b in batches])


@pytest.fixture
def model():
    return tiny_cnn(spatial=(8, 8))


@pytest.fixture
def samples():
    rng = np.random.default_rng(1)
    return rng.standard_normal((11, 3, 8, 8)).astype(np.float32), rng.integers(0, 10, 11)


@pytest.mark.parametrize("compressed", [False, True])
def test_npz_streams_batches_with_labels_and_reiterates(tmp_path, model, samples, compressed):
    x, y = samples
    path = tmp_path / "d.npz"
    (np.savez_compressed if compressed else np.savez)(path, x=x, labels=y)
    src = open_source(str(path), model=model, batch_size=4)
    assert src.input_names == ["x"] and src.num_samples == 11 and src.has_labels
    for _ in range(2):  # re-iterable: each call starts over
        xs, labels, sizes = _collect(src)
        assert sizes == [4, 4, 3]
        np.testing.assert_array_equal(_stack(xs, "x"), x)
        np.testing.assert_array_equal(np.concatenate(labels), y)
        assert all(b["x"].dtype == np.float32 for b in xs)


def test_npz_is_read_from_the_zip_stream_not_loaded_whole(tmp_path, model, samples, monkeypatch):
    x, _ = samples
    path = tmp_path / "d.npz"
    np.savez(path, x=x.astype(np.float64))  # float64 data is cast to the model's float32

    def no_load(*a, **k):
        raise AssertionError("np.load must not be used for a C-ordered npz member")

    monkeypatch.setattr(np, "load", no_load)
    src = open_source(path, model=model, batch_size=5, limit=7)
    xs, labels, sizes = _collect(src)
    assert sizes == [5, 2] and labels == [None, None]
    np.testing.assert_array_equal(_stack(xs, "x"), x[:7])
    assert xs[0]["x"].dtype == np.float32


def test_npz_arr_0_feeds_a_single_input_model(tmp_path, model, samples):
    x, _ = samples
    np.savez(tmp_path / "d.npz", x)
    src = open_source(tmp_path / "d.npz", model=model)
    np.testing.assert_array_equal(_stack(_collect(src)[0], "x"), x)


def test_wrong_names_shapes_and_dtypes_are_one_line_errors(tmp_path, model, samples):
    x, y = samples
    np.savez(tmp_path / "a.npz", image=x)
    with pytest.raises(BadInputError, match=r"missing input\(s\) x.*unknown name\(s\) image"):
        open_source(tmp_path / "a.npz", model=model)
    np.savez(tmp_path / "b.npz", x=x[:, :2])
    with pytest.raises(BadInputError, match=r"dim 1 is 2 but model input 'x' \[N,3,8,8\] needs 3"):
        open_source(tmp_path / "b.npz", model=model)
    np.savez(tmp_path / "c.npz", x=x[0])
    with pytest.raises(BadInputError, match="leading sample axis"):
        open_source(tmp_path / "c.npz", model=model)
    np.savez(tmp_path / "d.npz", x=x, labels=y[:5])
    with pytest.raises(BadInputError, match="disagree on the number of samples"):
        open_source(tmp_path / "d.npz", model=model)
    with pytest.raises(BadInputError, match="no such data file"):
        open_source(tmp_path / "missing.npz", model=model)
    (tmp_path / "bad.npz").write_bytes(b"not a zip")
    with pytest.raises(BadInputError, match="not a readable .npz"):
        open_source(tmp_path / "bad.npz", model=model)
    with pytest.raises(BadInputError, match="does not fit the model's int64"):
        open_source({"ids": np.zeros((2, 4), np.float32)}, model=_int_model())


def _int_model():
    g = helper.make_graph(
        [helper.make_node("Cast", ["ids"], ["y"], to=TensorProto.FLOAT)],
        "ints",
        [helper.make_tensor_value_info("ids", TensorProto.INT64, ["N", 4])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["N", 4])],
    )
    m = helper.make_model(g, opset_imports=[helper.make_opsetid("", 17)])
    m.ir_version = 8
    return m


def test_npy_folder_per_input_layout(tmp_path, model, samples):
    x, y = samples
    np.save(tmp_path / "x.npy", x)
    np.save(tmp_path / "labels.npy", y)
    src = open_source(tmp_path, model=model, batch_size=8)
    xs, labels, sizes = _collect(src)
    assert sizes == [8, 3] and src.has_labels
    np.testing.assert_array_equal(_stack(xs, "x"), x)
    np.testing.assert_array_equal(np.concatenate(labels), y)


def test_npy_folder_per_sample_layout_mixes_single_samples_and_chunks(tmp_path, model, samples):
    x, y = samples
    for i in range(5):  # five single samples (rank 3) ...
        np.save(tmp_path / f"s{i:02d}.npy", x[i])
    np.save(tmp_path / "s05.npy", x[5:])  # ... then a chunk of six (rank 4)
    np.save(tmp_path / "labels.npy", y)
    src = open_source(tmp_path, model=model, batch_size=4)
    assert src.num_samples == 11 and src.has_labels
    xs, labels, sizes = _collect(src)
    assert sizes == [4, 4, 3]
    np.testing.assert_array_equal(_stack(xs, "x"), x)
    np.testing.assert_array_equal(np.concatenate(labels), y)


def test_npz_sample_files_carry_their_own_labels(tmp_path, model, samples):
    x, y = samples
    for i in range(3):
        np.savez(tmp_path / f"b{i}.npz", x=x[i], labels=np.int64(y[i]))
    src = open_source(tmp_path, model=model, batch_size=2)
    xs, labels, _ = _collect(src)
    np.testing.assert_array_equal(_stack(xs, "x"), x[:3])
    np.testing.assert_array_equal(np.concatenate(labels), y[:3])


def test_dict_and_existing_source(model, samples):
    x, y = samples
    src = open_source({"x": x, "labels": y}, model=model, batch_size=6, limit=9)
    assert src.num_samples == 9
    assert [b[0]["x"].shape[0] for b in src.batches()] == [6, 3]
    assert open_source(src, model=model) is src


def test_random_source_is_deterministic_and_honours_dtypes():
    g = helper.make_graph(
        [helper.make_node("Cast", ["ids"], ["f"], to=TensorProto.FLOAT),
         helper.make_node("Add", ["f", "h"], ["y"])],
        "mixed",
        [helper.make_tensor_value_info("ids", TensorProto.INT64, ["B", 4]),
         helper.make_tensor_value_info("h", TensorProto.FLOAT, ["B", "D"])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, None)],
    )
    m = helper.make_model(g, opset_imports=[helper.make_opsetid("", 17)])
    with pytest.raises(BadInputError, match=r"input 'h' dim 1 'D' is symbolic.*--input-shape h:N,N"):
        random_source(m, {})
    src = random_source(m, {"h": [1, 4]}, samples=5, batch_size=2, seed=3)
    a = [f for f, _ in src.batches()]
    b = [f for f, _ in src.batches()]
    assert [f["ids"].shape for f in a] == [(2, 4), (2, 4), (1, 4)]
    assert a[0]["ids"].dtype == np.int64 and a[0]["h"].dtype == np.float32
    assert all(np.array_equal(p["h"], q["h"]) for p, q in zip(a, b, strict=True))
    other = [f for f, _ in random_source(m, {"h": [1, 4]}, samples=5, batch_size=2, seed=4).batches()]
    assert not np.array_equal(a[0]["h"], other[0]["h"])
    with pytest.raises(BadInputError, match="names 'x'"):
        random_source(m, {"x": [1, 4]})
    with pytest.raises(BadInputError, match="fixes it to 4"):
        random_source(m, {"ids": [1, 5], "h": [1, 4]})


def test_fixed_leading_dim_forces_exact_batches(samples):
    m = tiny_cnn(spatial=(8, 8))
    m.graph.input[0].type.tensor_type.shape.dim[0].Clear()
    m.graph.input[0].type.tensor_type.shape.dim[0].dim_value = 2
    x, _ = samples
    src = open_source({"x": x}, model=m, batch_size=8)
    assert src.num_samples == 10  # 11 samples in pairs: the odd one is dropped
    assert {f["x"].shape[0] for f, _ in src.batches()} == {2}
    assert model_inputs(m)[0].fixed_batch == 2


def _write_png(path, rgb, size=(20, 12)):
    from PIL import Image

    Image.new("RGB", size, tuple(rgb)).save(path)


def test_image_folder_preprocessing_and_folder_labels(tmp_path):
    pytest.importorskip("PIL")
    m = tiny_cnn(spatial=(8, 8))
    for cls, color in (("cat", (255, 0, 0)), ("dog", (0, 128, 255))):
        (tmp_path / cls).mkdir()
        for i in range(3):
            _write_png(tmp_path / cls / f"{i}.png", color)
    src = open_source(f"images:{tmp_path}?mean=0.5&std=0.25", model=m, batch_size=4)
    assert src.num_samples == 6 and src.has_labels and src.input_names == ["x"]
    xs, labels, sizes = _collect(src)
    assert sizes == [4, 2]
    np.testing.assert_array_equal(np.concatenate(labels), [0, 0, 0, 1, 1, 1])
    x = _stack(xs, "x")
    assert x.shape == (6, 3, 8, 8) and x.dtype == np.float32
    # a flat colour survives resize + crop; (v/255 - 0.5) / 0.25 per channel
    np.testing.assert_allclose(x[0, :, 3, 3], [(1 - 0.5) / 0.25, -2.0, -2.0], atol=1e-6)
    np.testing.assert_allclose(x[3, :, 3, 3], [-2.0, (128 / 255 - 0.5) / 0.25, 2.0], atol=1e-6)
    bgr = open_source(f"images:{tmp_path}?mean=0.5&std=0.25&bgr=1", model=m)
    np.testing.assert_allclose(bgr.first_batch()[0]["x"][0, :, 3, 3], [-2.0, -2.0, 2.0], atol=1e-6)


def test_image_folder_sidecar_labels_file_and_errors(tmp_path):
    pytest.importorskip("PIL")
    m = tiny_cnn(spatial=(8, 8))
    for i in range(3):
        _write_png(tmp_path / f"img{i}.png", (10 * i, 20, 30))
    (tmp_path / "labels.txt").write_text("img0.png 7\nimg1.png 3\nimg2.png 5\n")
    (tmp_path / "preprocess.json").write_text(json.dumps({"mean": [0, 0, 0], "std": [1, 1, 1], "resize": "exact"}))
    src = open_source(str(tmp_path), model=m)  # a plain folder of images works too
    feeds, labels = src.first_batch()
    np.testing.assert_array_equal(labels, [7, 3, 5])
    np.testing.assert_allclose(feeds["x"][2, :, 0, 0], [20 / 255, 20 / 255, 30 / 255], atol=1e-6)
    with pytest.raises(BadInputError, match="crop=16x16 but model input 'x' needs 8x8"):
        open_source(f"images:{tmp_path}?crop=16", model=m)
    with pytest.raises(BadInputError, match="unknown image option 'colour'"):
        open_source(f"images:{tmp_path}?colour=1", model=m)
    sym = tiny_cnn(spatial=("H", "W"))
    with pytest.raises(BadInputError, match="symbolic height/width"):
        open_source(f"images:{tmp_path}", model=sym)
    assert open_source(f"images:{tmp_path}?crop=8", model=sym).first_batch()[0]["x"].shape == (3, 3, 8, 8)
