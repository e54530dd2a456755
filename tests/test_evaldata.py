"""onnxcomp.evaldata: deterministic glyph and text-line data, the rasteriser, rapidocr preprocessing."""

from __future__ import annotations

import hashlib
import math

import numpy as np
import pytest

from onnxcomp import evaldata as ed
from onnxcomp.errors import BadInputError


def _sha(*arrays: np.ndarray) -> str:
    h = hashlib.sha256()
    for a in arrays:
        h.update(np.ascontiguousarray(a).tobytes())
    return h.hexdigest()


# ------------------------------------------------------------------------------------------
# rasteriser


def _rect(x0, y0, x1, y1, clockwise=True):
    pts = [(x0, y0), (x1, y0), (x1, y1), (x0, y1)]
    if not clockwise:
        pts = pts[::-1]
    return np.array([(*pts[i], *pts[(i + 1) % 4]) for i in range(4)], dtype=np.float64)


def test_rasterize_exact_square_and_half_covered_pixels():
    cov = ed.rasterize(_rect(1.5, 2.0, 3.5, 4.0), np.zeros(4, dtype=np.int64), 1, 6, 6)[0]
    expected = np.zeros((6, 6))
    expected[2:4, 2] = 1.0
    expected[2:4, 1] = 0.5  # sub-sample centres 1.125, 1.375 out; 1.625, 1.875 in
    expected[2:4, 3] = 0.5
    np.testing.assert_array_equal(cov, expected)


def test_rasterize_nonzero_winding_holes_and_overlaps():
    outer, hole = _rect(0, 0, 8, 8), _rect(2, 2, 6, 6, clockwise=False)
    cov = ed.rasterize(np.concatenate([outer, hole]), np.zeros(8, dtype=np.int64), 1, 8, 8)[0]
    assert cov[3:5, 3:5].max() == 0.0 and cov[0, :].min() == 1.0 and cov.sum() == 64 - 16
    # same-direction overlap stays fully covered (non-zero rule, not even-odd)
    cov = ed.rasterize(np.concatenate([outer, _rect(2, 2, 6, 6)]), np.zeros(8, dtype=np.int64), 1, 8, 8)[0]
    assert cov.min() == 1.0


def test_rasterize_separates_images_and_clips_outside():
    segs = np.concatenate([_rect(-5, -5, 2, 2), _rect(6, 6, 20, 20)])
    owner = np.array([0] * 4 + [1] * 4)
    cov = ed.rasterize(segs, owner, 2, 8, 8)
    assert cov[0].sum() == 4 and cov[0, :2, :2].min() == 1.0
    assert cov[1].sum() == 4 and cov[1, 6:, 6:].min() == 1.0


# ------------------------------------------------------------------------------------------
# glyphs


def test_glyph_dataset_shapes_ranges_and_balanced_labels():
    x, y = ed.glyph_dataset("test", "all", n=124)
    assert x.shape == (124, 1, 32, 32) and x.dtype == np.float32
    assert y.dtype == np.int64 and np.array_equal(y, np.tile(np.arange(62), 2))
    assert 0.0 <= x.min() and x.max() <= 1.0
    levels = np.rint(x.astype(np.float64) * 255.0)  # values are 8-bit levels / 255
    assert np.array_equal(levels.astype(np.float32) / np.float32(255.0), x)
    # every image shows something: ink brighter than the background somewhere
    assert (x.reshape(124, -1).max(1) - np.median(x.reshape(124, -1), 1) > 0.25).all()


def test_glyph_dataset_is_deterministic_and_prefix_stable():
    x1, y1 = ed.glyph_dataset("calib", "all", n=100, seed=3)
    x2, y2 = ed.glyph_dataset("calib", "all", n=100, seed=3)
    assert x1.tobytes() == x2.tobytes() and y1.tobytes() == y2.tobytes()
    x3, y3 = ed.glyph_dataset("calib", "all", n=40, seed=3)
    assert x3.tobytes() == x1[:40].tobytes() and np.array_equal(y3, y1[:40])


def test_glyph_golden_bytes():
    """Same bytes on any machine: pins the renderer, the random stream and matplotlib's font files."""
    x, y = ed.glyph_dataset("test", "all", n=62)
    assert _sha(x, y) == GLYPH_TEST_62_SHA256


GLYPH_TEST_62_SHA256 = "f55cfbb844b10c3e134be235466e2eca2af99795e23f4741ffdb4db018a6ff6b"


def test_glyph_splits_seeds_and_tasks_differ():
    base = ed.glyph_dataset("test", n=62)[0]
    assert not np.array_equal(base, ed.glyph_dataset("calib", n=62)[0])
    assert not np.array_equal(base, ed.glyph_dataset("train", n=62)[0])
    assert not np.array_equal(base, ed.glyph_dataset("test", n=62, seed=1)[0])
    xd, yd = ed.glyph_dataset("test", "digits", n=30)
    assert np.array_equal(yd, np.tile(np.arange(10), 3))
    assert not np.array_equal(xd[:10], base[:10])


def test_glyph_size_parameter_scales_the_rendering():
    x, _ = ed.glyph_dataset("test", n=62, size=48)
    assert x.shape == (62, 1, 48, 48)


def test_glyph_default_sizes_and_bad_arguments():
    assert ed.DEFAULT_N[("test", "all")] == 6200 and ed.DEFAULT_N[("test", "digits")] == 1000
    assert ed.glyph_classes("digits") == tuple(range(10))
    with pytest.raises(BadInputError, match="split"):
        ed.glyph_dataset("valid")
    with pytest.raises(BadInputError, match="task"):
        ed.glyph_dataset("test", "letters")
    with pytest.raises(BadInputError):
        ed.glyph_dataset("test", n=-1)
    with pytest.raises(BadInputError, match="font"):
        ed.glyph_dataset("test", n=1, fonts=("NoSuchFont.ttf",))


def test_glyph_classes_look_like_their_glyphs():
    """A nearest-centroid classifier on raw pixels, fit on calib and scored on test, must beat chance
    by far: labels are attached to the right images (a shuffled labelling would score ~1.6%)."""
    xc, yc = ed.glyph_dataset("calib", "digits", n=200)
    xt, yt = ed.glyph_dataset("test", "digits", n=200)
    flat = lambda a: (a.reshape(len(a), -1) - a.reshape(len(a), -1).mean(1, keepdims=True))  # noqa: E731
    cent = np.stack([flat(xc)[yc == k].mean(0) for k in range(10)])
    pred = np.argmin(((flat(xt)[:, None, :] - cent[None]) ** 2).sum(-1), axis=1)
    assert np.mean(pred == yt) > 0.4


def test_accuracy():
    logits = np.array([[0.1, 0.9], [0.8, 0.2], [0.3, 0.7]])
    assert ed.accuracy(logits, np.array([1, 0, 0])) == pytest.approx(200 / 3)
    with pytest.raises(BadInputError):
        ed.accuracy(logits, np.array([1, 0]))
    with pytest.raises(BadInputError):
        ed.accuracy(np.zeros((0, 2)), np.zeros(0))


# ------------------------------------------------------------------------------------------
# PP-OCR text lines


def test_text_lines_are_deterministic_labelled_and_rotated():
    imgs, y, texts = ed.render_text_lines(8, seed=5)
    imgs2, y2, texts2 = ed.render_text_lines(8, seed=5)
    assert texts == texts2 and np.array_equal(y, y2) and all(np.array_equal(a, b) for a, b in zip(imgs, imgs2, strict=True))
    assert y.tolist() == [0, 1] * 4 and all(t.strip() for t in texts)
    for img in imgs:
        assert img.dtype == np.uint8 and img.ndim == 3 and img.shape[2] == 3 and img.shape[1] > img.shape[0]
    # orientation vs label is checked where it can be judged: the PP-OCR classifier scores the
    # rendered set at ~97% per class in tests/test_models.py (a label flip would score ~3%).


def test_text_lines_golden_bytes():
    imgs, y, texts = ed.render_text_lines(6, seed=0)
    assert texts == ["799", "SJ29 Home", "to BS5318 house", "data AQ8", "FOX not", "evening DT6318"]
    assert _sha(*imgs, y) == TEXT_LINES_6_SHA256


TEXT_LINES_6_SHA256 = "858a53de0912b30908752922997c417134f66d839d8f1dd1b3af6356501f30ed"


def test_ppocr_preprocess_matches_rapidocr():
    rapidocr = pytest.importorskip("rapidocr_onnxruntime.ch_ppocr_cls.text_cls")
    ref = rapidocr.TextClassifier.__new__(rapidocr.TextClassifier)
    ref.cls_image_shape = list(ed.PPOCR_CLS_SHAPE)
    imgs, _, _ = ed.render_text_lines(12, seed=1)
    rng = np.random.default_rng(0)
    extra = [rng.integers(0, 256, size=s, dtype=np.uint8) for s in [(30, 400, 3), (60, 40, 3), (48, 192, 3)]]
    widths = set()
    for img in imgs + extra:
        ours = ed.ppocr_cls_preprocess(img)
        theirs = ref.resize_norm_img(img)
        assert ours.dtype == np.float32 and ours.shape == (3, 48, 192)
        np.testing.assert_array_equal(ours, theirs)
        widths.add(min(192, math.ceil(48 * img.shape[1] / img.shape[0])))
    assert 192 in widths and min(widths) < 192  # both the squeezed and the padded case ran


def test_ppocr_cls_dataset_shapes():
    x, y = ed.ppocr_cls_dataset(6, seed=0)
    assert x.shape == (6, 3, 48, 192) and x.dtype == np.float32 and y.tolist() == [0, 1, 0, 1, 0, 1]
    assert x.min() >= -1.0 and x.max() <= 1.0


# ------------------------------------------------------------------------------------------
# files and CLI


def test_save_npz_roundtrip_and_byte_identical(tmp_path):
    x, y = ed.glyph_dataset("calib", "digits", n=20)
    a, b = tmp_path / "a.npz", tmp_path / "b.npz"
    ed.save_npz(a, x, y, "input")
    ed.save_npz(b, x, y, "input")
    assert a.read_bytes() == b.read_bytes()
    with np.load(a) as npz:
        assert sorted(npz.files) == ["input", "labels"]
        assert npz["input"].tobytes() == x.tobytes() and np.array_equal(npz["labels"], y)
    assert not list(tmp_path.glob("*.tmp"))


def test_save_npz_is_read_by_the_data_module(tmp_path):
    from onnx import TensorProto, helper

    from onnxcomp.data import open_source

    x, y = ed.glyph_dataset("calib", "digits", n=20)
    path = tmp_path / "calib.npz"
    ed.save_npz(path, x, y, "input")
    graph = helper.make_graph([helper.make_node("Identity", ["input"], ["out"])], "g",
                              [helper.make_tensor_value_info("input", TensorProto.FLOAT, ["N", 1, 32, 32])],
                              [helper.make_tensor_value_info("out", TensorProto.FLOAT, ["N", 1, 32, 32])])
    source = open_source(str(path), model=helper.make_model(graph))
    feeds, labels = zip(*source.batches(), strict=True)
    assert np.concatenate([f["input"] for f in feeds]).tobytes() == x.tobytes()
    assert np.array_equal(np.concatenate(labels), y)


def test_save_npz_rejects_bad_arguments(tmp_path):
    x = np.zeros((3, 1, 4, 4), np.float32)
    with pytest.raises(BadInputError):
        ed.save_npz(tmp_path / "a.npz", x, np.zeros(3, np.int64), "labels")
    with pytest.raises(BadInputError):
        ed.save_npz(tmp_path / "a.npz", x, np.zeros(2, np.int64), "input")


def test_main_writes_a_data_set(tmp_path, capsys):
    out = tmp_path / "d.npz"
    assert ed.main(["glyphs", str(out), "--split", "calib", "--task", "digits", "-n", "10"]) == 0
    with np.load(out) as npz:
        assert npz["input"].shape == (10, 1, 32, 32) and npz["labels"].tolist() == list(range(10))
    assert ed.main(["glyphs", str(out), "-n", "10", "--input-name", "labels"]) == 2


def test_ctc_greedy_decoding_merges_repeats_and_drops_blanks():
    chars = ["blank", "a", "b", " "]
    path = [[0, 1, 1, 0, 1, 2, 2, 3, 0], [3, 3, 2, 0, 0, 0, 0, 0, 0]]
    scores = np.eye(4)[np.array(path)]
    assert ed.ctc_greedy_texts(scores, chars) == ["aab", "b"]  # a blank separates a repeat; spaces stripped


def test_text_accuracy_counts_lines_and_edits():
    lines, chars = ed.text_accuracy(["abc", "abd", ""], ["abc", "abc", "xy"])
    assert lines == pytest.approx(100 / 3)
    assert chars == pytest.approx(100 * (1 - 3 / 8))  # one substitution, two deletions over 8 characters
    with pytest.raises(BadInputError):
        ed.text_accuracy(["a"], ["a", "b"])


def test_ppocr_recognizer_reads_its_rendered_lines():
    pytest.importorskip("rapidocr_onnxruntime")
    from onnxcomp.runtime import make_session

    path = ed.ppocr_cls_model_path().parent / "ch_PP-OCRv4_rec_infer.onnx"
    chars = ed.ctc_characters(path)
    assert chars[0] == "blank" and chars[-1] == " " and len(chars) == 6625
    x, texts = ed.ppocr_rec_dataset(n=8, seed=1)
    sess = make_session(str(path))
    out = sess.run(None, {sess.get_inputs()[0].name: x})[0]
    lines, char_acc = ed.text_accuracy(ed.ctc_greedy_texts(out, chars), texts)
    assert lines >= 75 and char_acc >= 95  # the fp32 model reads the rendered Latin lines
