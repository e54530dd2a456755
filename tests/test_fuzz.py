"""A CI-sized fuzz run (benchmarks/fuzz.py runs the 1000-graph version): 50 random conv graphs,
every pipeline of onnxcomp.fuzz.PIPELINES, no problem of any kind."""

from __future__ import annotations

from collections import Counter

import numpy as np

from onnxcomp.fuzz import PIPELINES, fuzz, random_graph


def test_generated_graphs_are_valid_and_varied():
    import onnx

    seen = Counter()
    for i in range(60):
        g = random_graph(np.random.default_rng([7, i]))
        onnx.checker.check_model(g.model, full_check=True)
        seen.update(n.op_type for n in g.model.graph.node)
        seen.update({f"opset{g.model.opset_import[0].version}"})
        seen.update(a.s.decode() for n in g.model.graph.node for a in n.attribute if a.name == "auto_pad")
        seen.update("grouped" for n in g.model.graph.node for a in n.attribute if a.name == "group" and a.i > 1)
        seen.update("symbolic" for d in g.model.graph.input[0].type.tensor_type.shape.dim[2:] if d.dim_param)
    for thing in ("Conv", "BatchNormalization", "Add", "Concat", "Split", "Gemm", "SAME_UPPER", "VALID", "grouped",
                  "symbolic", "opset11", "opset21"):
        assert seen[thing], thing


def test_fuzz_50_graphs_every_pipeline_no_problem():
    """50 graphs, each on a rotating window of 3 pipelines (every pipeline on about 50 * 3 / len
    graphs; `benchmarks/fuzz.py` runs every pipeline on every graph)."""
    per_graph = 3
    results = fuzz(50, seed=0, per_graph=per_graph)
    problems = [f"{r.pipeline} on {g.description}: {p}" for g, runs in results for r in runs for p in r.problems]
    assert not problems, "\n".join(problems[:20])
    runs = [r for _, rs in results for r in rs]
    assert len(runs) == 50 * per_graph
    ran = Counter(r.pipeline for r in runs)
    assert set(ran) == {spec for spec, *_ in PIPELINES}
    assert min(ran.values()) >= 50 * per_graph // len(PIPELINES)
    rewritten = Counter()
    for r in runs:
        rewritten[r.pipeline] += r.rewritten
    # the full-rank rewrite touches every graph's decomposable layers: the checks saw real rewrites
    full = "tucker{rank=1.0,round=1,min_gain=-10,iterations=0,objective=macs}"
    assert rewritten[full] >= ran[full]
    # and the dense Winograd rewrite found eligible layers
    assert rewritten["winograd{objective=macs,tile=4}"] >= 1
