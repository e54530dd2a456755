"""The trained reference models in models/ and the PP-OCR classifier reach their cards' accuracy."""

from __future__ import annotations

import json
import re
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import pytest

from onnxcomp import evaldata as ed
from onnxcomp.analysis import count_params, total_macs

MODELS = Path(__file__).resolve().parent.parent / "models"
GLYPH_MODELS = ("glyph_resnet", "glyph_mobilenetv2")
MAX_BYTES = 5 * 1024 * 1024
# PP-OCR orientation classifier on ppocr_cls_dataset(400, seed=0): measured 97.50% (models/ppocr_cls.md)
PPOCR_N, PPOCR_FLOOR, PPOCR_CLASS_FLOOR = 400, 95.0, 93.0


def card(name: str) -> dict:
    """The JSON block at the end of models/<name>.md."""
    text = (MODELS / f"{name}.md").read_text()
    blocks = re.findall(r"```json\n(.*?)\n```", text, flags=re.S)
    assert blocks, f"models/{name}.md has no ```json block"
    return json.loads(blocks[-1])


def session(path: Path) -> ort.InferenceSession:
    opts = ort.SessionOptions()
    opts.intra_op_num_threads = 1
    return ort.InferenceSession(str(path), opts, providers=["CPUExecutionProvider"])


def run(sess: ort.InferenceSession, x: np.ndarray, batch: int = 256) -> np.ndarray:
    name = sess.get_inputs()[0].name
    return np.concatenate([sess.run(None, {name: x[i:i + batch]})[0] for i in range(0, len(x), batch)])


@pytest.fixture(scope="module")
def glyph_test_data() -> dict:
    meta = card(GLYPH_MODELS[0])
    return {task: ed.glyph_dataset("test", task, 32, meta[f"test_{task}_subset_n"]) for task in ("all", "digits")}


@pytest.mark.parametrize("name", GLYPH_MODELS)
def test_glyph_model_file_graph_and_card(name):
    meta = card(name)
    path = MODELS / meta["model"]
    assert path.stat().st_size < MAX_BYTES and path.stat().st_size == meta["bytes"]
    model = onnx.load(str(path))
    onnx.checker.check_model(model)
    assert 13 <= model.opset_import[0].version <= 17
    ops = [n.op_type for n in model.graph.node]
    assert "BatchNormalization" in ops and "Conv" in ops  # BN not folded: normalize's job
    (inp,) = model.graph.input
    assert inp.name == meta["input"] and inp.type.tensor_type.shape.dim[0].dim_param  # dynamic batch
    assert count_params(model) == meta["params"]
    assert total_macs(model, {"input": [1, 1, 32, 32]}) == meta["macs"]


@pytest.mark.parametrize("name", GLYPH_MODELS)
def test_glyph_model_accuracy_matches_card(name, glyph_test_data):
    meta = card(name)
    sess = session(MODELS / meta["model"])
    for task, (x, y) in glyph_test_data.items():
        assert len(y) == meta[f"test_{task}_subset_n"]
        acc = ed.accuracy(run(sess, x), y)
        assert acc == pytest.approx(meta[f"test_{task}_subset_accuracy"], abs=0.5), (task, acc)
    # the digits task is scored over all 62 logits, not a 10-way restriction
    assert run(sess, glyph_test_data["digits"][0][:4]).shape == (4, 62)


@pytest.mark.parametrize("name", GLYPH_MODELS)
def test_glyph_model_dynamic_batch(name, glyph_test_data):
    sess = session(MODELS / card(name)["model"])
    x = glyph_test_data["all"][0][:7]
    full = run(sess, x)
    one = np.concatenate([run(sess, x[i:i + 1]) for i in range(7)])
    np.testing.assert_allclose(one, full, rtol=1e-4, atol=1e-4)


def test_ppocr_cls_accuracy_on_rendered_lines():
    pytest.importorskip("rapidocr_onnxruntime")
    sess = session(ed.ppocr_cls_model_path())
    x, y = ed.ppocr_cls_dataset(PPOCR_N, seed=0)
    logits = run(sess, x, batch=100)
    assert logits.shape == (PPOCR_N, 2)
    assert ed.accuracy(logits, y) >= PPOCR_FLOOR
    for label in (0, 1):  # both orientations, so a constant answer cannot pass
        assert ed.accuracy(logits[y == label], y[y == label]) >= PPOCR_CLASS_FLOOR
    meta = card("ppocr_cls")
    assert meta["n"] == PPOCR_N and meta["floor"] == PPOCR_FLOOR
