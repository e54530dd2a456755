"""onnxcomp.sensitivity and `onnxcomp sensitivity`: per-layer damage of a pass, alone, cached."""

from __future__ import annotations

import json

import numpy as np
import onnx
import pytest
from test_guard import NoisePass, noise_registered, run_cli, seq_data, seq_model  # noqa: F401

from onnxcomp.data import open_source
from onnxcomp.passes.base import Context
from onnxcomp.pipeline import Pipeline
from onnxcomp.sensitivity import analyse
from onnxcomp.validation import compare


@pytest.fixture
def cache(tmp_path, monkeypatch):
    monkeypatch.setenv("ONNXCOMP_CACHE_DIR", str(tmp_path / "cache"))
    return tmp_path / "cache"


def test_each_layer_is_measured_alone_and_the_ruined_one_stands_out(cache):
    model = seq_model()
    source = open_source(seq_data(), model=model)
    p = Pipeline.parse("t_noise{mild=1e-3,ruin=conv3}", normalize=False).passes[0]
    result = analyse(model, p, Context(data=source), source)
    assert [s.node for s in result.layers] == ["conv1", "conv2", "conv3", "conv4"]
    worst = max(result.layers, key=lambda s: s.rel_l2)
    assert worst.node == "conv3" and worst.sequence_agreement < 50
    # (the random-weight head has near-ties, so 1e-3 noise may flip a position or two)
    assert all(s.rel_l2 < 0.01 and s.agreement > 99.0 for s in result.layers if s.node != "conv3")
    # independently: the model with only conv3 rewritten
    only = Pipeline.parse("t_noise{mild=1e-3,ruin=conv3,include='^conv3$'}", normalize=False).run(model, Context())[0]
    check = compare(model, only, source, None).output("y")
    assert worst.sqnr_db == pytest.approx(check.sqnr_db) and worst.agreement == pytest.approx(check.top1_agreement)
    assert result.kinds == {"y": "sequence"} and result.samples == 96
    # cached: the second call runs no pass
    runs = NoisePass.runs
    again = analyse(model, p, Context(data=source), source)
    assert again.cached and NoisePass.runs == runs and [s.rel_l2 for s in again.layers] == [s.rel_l2 for s in result.layers]
    # a different config is a different entry
    other = Pipeline.parse("t_noise{mild=2e-3,ruin=conv3}", normalize=False).passes[0]
    assert not analyse(model, other, Context(data=source), source).cached


def test_cli_table_json_and_plot(cache, tmp_path, capsys):
    model_path = tmp_path / "seq.onnx"
    onnx.save(seq_model(), model_path)
    data = tmp_path / "d.npz"
    np.savez(data, **seq_data())
    plot = tmp_path / "s.png"
    code, out, err = run_cli(capsys, "sensitivity", model_path, "-p", "t_noise{ruin=conv2}", "--data", data,
                             "--plot", plot, "--json", "-q")
    assert code == 0, err
    d = json.loads(out)
    assert [x["node"] for x in d["layers"]] == ["conv1", "conv2", "conv3", "conv4"]
    assert "held-out" in d["data"] and d["samples"] < 96  # measured on samples the pass did not calibrate on
    assert plot.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    code, out, _ = run_cli(capsys, "sensitivity", model_path, "-p", "t_noise{ruin=conv2}", "--data", data, "-q")
    assert code == 0 and "(cached)" in out and "conv2" in out
    for argv, msg in ((["-p", "t_noise,t_noise", "--data", data], "takes one pass"),
                      (["-p", "t_noise"], "needs --data")):
        code, _, err = run_cli(capsys, "sensitivity", model_path, *argv, "-q")
        assert code == 2 and msg in err and len(err.strip().splitlines()) == 1
