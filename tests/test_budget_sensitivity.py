"""tucker{budget=...}: with data, the cut goes where the measured model-output error per MAC saved is
smallest (allocate=sensitivity), not where the weight energy says (allocate=energy)."""

from __future__ import annotations

import numpy as np
import onnxruntime as ort
import pytest

from onnxcomp import evaldata
from onnxcomp.data import open_source
from onnxcomp.model import load_model, model_bytes
from onnxcomp.passes.base import REWRITTEN, Context
from onnxcomp.pipeline import Pipeline


def _accuracy(model, x, y) -> float:
    sess = ort.InferenceSession(model_bytes(model), providers=["CPUExecutionProvider"])
    return evaldata.accuracy(sess.run(None, {sess.get_inputs()[0].name: x})[0], y)


def test_sensitivity_allocation_beats_energy_on_the_ppocr_classifier():
    """Measured here: at budget=macs:0.9 (weights), the energy product cuts Conv@42 and loses 15.75
    points (97.50 -> 81.75 on 400 lines); measured sensitivity cuts Conv@47 instead, same MACs."""
    pytest.importorskip("rapidocr_onnxruntime")
    model = load_model(evaldata.ppocr_cls_model_path())
    x_cal, y_cal = evaldata.ppocr_cls_dataset(128, seed=0)
    x_test, y_test = evaldata.ppocr_cls_dataset(400, seed=1)
    model = Pipeline.parse("normalize").run(model, Context())[0]
    base = _accuracy(model, x_test, y_test)
    acc, chosen, macs = {}, {}, {}
    for how in ("energy", "sensitivity"):
        ctx = Context(data=open_source({"x": x_cal, "labels": y_cal}, model=model), input_shapes={"x": [1, 3, 48, 192]})
        out, report = Pipeline.parse(f"tucker{{budget=macs:0.9,allocate={how}}}", normalize=False).run(model, ctx)
        figures = report.passes[0].figures
        assert figures["budget_allocation"] == how
        macs[how] = figures["budget_achieved"]
        chosen[how] = {r["node"] for r in report.passes[0].layers if r["action"] == REWRITTEN}
        acc[how] = _accuracy(out, x_test, y_test)
        if how == "sensitivity":
            probes = [r["figures"].get("sensitivity_probes") for r in report.passes[0].layers]
            assert any(probes)  # every measured option is in the report
    assert macs["sensitivity"] <= macs["energy"] <= 0.9  # the same budget, met
    assert acc["sensitivity"] > acc["energy"] + 3.0, (base, acc, chosen)
    assert np.isfinite(base) and base - acc["sensitivity"] < base - acc["energy"]
