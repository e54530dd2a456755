"""The pass contract, for every registered pass (a pass that lands later is held to it for free):
the input model's bytes are unchanged, every candidate layer gets exactly one record, `repr` parses
back to the same config, and `modified` is true exactly when the model changed."""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest
from _tiny_models import tiny_cnn

from onnxcomp.data import open_source
from onnxcomp.model import model_bytes
from onnxcomp.passes.base import REWRITTEN, Context, registered_passes
from onnxcomp.pipeline import Pipeline

# Options that make each pass rewrite something on the tiny model (and exercise non-default values
# in the repr round trip). A pass without an entry runs with its defaults.
REWRITING = {
    "tucker": "rank=0.5,round=2,include=\"conv[12]|fc\",refit=sequential,objective=macs",
    "int8": "samples=16,calibrate=minmax,objective=any",
    "codebook": "bits=3,granularity=channel,min_params=16,storage=packed",
    "trim": "target=0.3,round=1,samples=16,metric=share",
    "winograd": "objective=macs,tile=2,sparsity=0.3:0.2,rounds=3",
    "uquant": "bits=4,min_params=16,seed=3",
}
BUILTIN = sorted(n for n, cls in registered_passes().items() if cls.__module__.startswith("onnxcomp.passes."))


def _without_shape_info(model) -> tuple:
    """What the model computes: nodes, initializers, inputs, outputs, opsets and functions, not the
    inferred shapes (`value_info`), metadata, or which empty proto2 fields happen to be set."""
    g = model.graph
    return (
        [n.SerializeToString(deterministic=True) for n in g.node],
        sorted(t.SerializeToString(deterministic=True) for t in g.initializer),
        [v.SerializeToString(deterministic=True) for v in g.input],
        [v.SerializeToString(deterministic=True) for v in g.output],
        sorted((o.domain, o.version) for o in model.opset_import),
        [f.SerializeToString(deterministic=True) for f in model.functions],
    )


def _data(model):
    x = np.random.default_rng(0).standard_normal((32, 3, 16, 16)).astype(np.float32)
    return open_source({"x": x}, model=model, batch_size=8)


def test_every_builtin_pass_is_covered():
    assert {"normalize", "tucker", "int8"} <= set(BUILTIN)


@pytest.mark.parametrize("name", BUILTIN)
@pytest.mark.parametrize("configured", [False, True], ids=["defaults", "rewriting"])
def test_pass_contract(name, configured):
    cls = registered_passes()[name]
    spec = f"{name}{{{REWRITING[name]}}}" if configured and name in REWRITING else name
    p = Pipeline.parse(spec, normalize=False).passes[0]
    # repr parses back to the same config
    again = Pipeline.parse(repr(p), normalize=False).passes[0]
    assert type(again) is cls and dataclasses.asdict(again.config) == dataclasses.asdict(p.config), repr(p)
    model = tiny_cnn()
    before = model_bytes(model)
    ctx = Context(data=_data(model), input_shapes={"x": [1, 3, 16, 16]})
    try:
        result = p.run(model, ctx)
    except Exception as exc:  # a pass may refuse (bad input), never crash
        from onnxcomp.errors import BadInputError

        assert isinstance(exc, BadInputError), exc
        return
    assert model_bytes(model) == before  # the input is never modified
    # one record per candidate layer (normalize canonicalises the whole graph: its records are per
    # fold it made or refused, not per conv, so it is held to "no layer twice" only)
    candidates = [n.name for n in p.candidates(model)]
    records = [r.node for r in result.layers if r.node in candidates]
    if name != "normalize":
        assert sorted(records) == sorted(candidates), (records, candidates)
    assert len(records) == len(set(records))
    changed = _without_shape_info(result.model) != _without_shape_info(model)
    assert result.modified == changed, (result.modified, changed, result.figures)
    if configured and name in REWRITING:
        assert any(r.action == REWRITTEN for r in result.layers)
    # every skip says why
    assert all(r.reason for r in result.layers if r.action != REWRITTEN)
