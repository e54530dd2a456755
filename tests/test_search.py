"""The search: spaces, the strategy's determinism, executors (local pool and Ray), resume, the CLI."""

from __future__ import annotations

import json

import numpy as np
import onnx
import pytest
from _tiny_models import tiny_cnn

from onnxcomp.cli import main
from onnxcomp.errors import BadInputError, PipelineSyntaxError
from onnxcomp.model import model_bytes, save_model
from onnxcomp.pipeline import Pipeline
from onnxcomp.search.driver import TrialCache, run_search
from onnxcomp.search.executors import LocalPool, RayExecutor
from onnxcomp.search.space import default_space, space_from_mapping
from onnxcomp.search.strategy import Strategy, pareto_front, warm_start
from onnxcomp.search.trial import FEASIBLE, INFEASIBLE, Job, TrialResult, run_trial
from onnxcomp.tolerance import Tolerance

# codebook with plain k-means and nearest rounding: the probe test relies on bits=2 breaking conv1
SPACE = {"passes": [
    {"codebook": {"bits": [2, 3, 4, 6, 8], "min_params": 16, "weighting": "none", "compensate": "none"}},
    {"tucker": {"rank": [0.5, 0.75], "objective": "macs", "round": 1, "min_gain": -1, "required": False}},
]}


def _job(tol=None, objectives=("lzma",)):
    model = tiny_cnn()
    rng = np.random.default_rng(0)
    fit = {"x": rng.standard_normal((24, 3, 16, 16)).astype(np.float32)}
    held = {"x": rng.standard_normal((32, 3, 16, 16)).astype(np.float32)}
    return Job(model_bytes(model), fit, held, tol or Tolerance(min_cosine=0.99), objectives, seed=3)


# ---------------------------------------------------------------------------------------------
# spaces
# ---------------------------------------------------------------------------------------------


def test_space_pipelines_parse():
    space = space_from_mapping(SPACE)
    text = space.pipeline({"codebook.bits": 4, "tucker.use": True, "tucker.rank": 0.5})
    assert text == "codebook{min_params=16,weighting=none,compensate=none,bits=4},tucker{objective=macs,round=1,min_gain=-1.0,rank=0.5}"
    Pipeline.parse(text)
    assert "tucker" not in space.pipeline({"codebook.bits": 4, "tucker.use": False})


def test_default_space_comes_from_option_metadata():
    with_data = default_space(has_data=True)
    names = [p.name for p in with_data.passes]
    assert {"tucker", "codebook", "trim", "int8"} <= set(names)
    assert "trim" not in [p.name for p in default_space(has_data=False).passes]  # trim needs data
    assert with_data.passes[names.index("codebook")].domains["avg_bits"].choices == (6.0, 5.0, 4.0, 3.0)
    for params in warm_start(with_data):
        Pipeline.parse(with_data.pipeline(params))


@pytest.mark.parametrize(("doc", "match"), [
    ({"passes": []}, "empty"),
    ({"passes": [{"tuker": {}}]}, "did you mean 'tucker'"),
    ({"passes": [{"tucker": {"rnak": [0.5]}}]}, "did you mean 'rank'"),
    ({"passes": [{"codebook": {"bits": []}}]}, "empty list"),
    ({"passes": [{"codebook": {"avg_bits": {"low": 5, "high": 2}}}]}, "empty"),
    ({"passes": [{"codebook": {"bits": 4}}]}, "nothing to search"),
    ({"nope": 1}, "passes"),
])
def test_bad_spaces_are_refused_with_the_reason(doc, match):
    with pytest.raises((BadInputError, PipelineSyntaxError), match=match):
        space_from_mapping(doc)


# ---------------------------------------------------------------------------------------------
# strategy and trials
# ---------------------------------------------------------------------------------------------


def test_same_seed_same_trials_whatever_the_order_results_come_back():
    space = space_from_mapping(SPACE)

    def drive(reverse):
        s = Strategy(space, ("lzma",), seed=5)
        seen = []
        for _ in range(4):
            asked = s.ask(3)
            seen += [p for _, _, p in asked]
            results = [TrialResult(n, p, FEASIBLE, {"lzma": 1.0 / (1 + len(p) % 7)}) for n, _, p in asked]
            s.tell(list(reversed(results)) if reverse else results)
        return seen

    assert drive(False) == drive(True)


def test_a_trial_is_judged_and_measured():
    job = _job(objectives=("lzma", "macs"))
    good = run_trial(job, 0, "codebook{bits=8,min_params=16,weighting=none}")
    assert good.status == FEASIBLE and good.values["lzma"] < 1.0 and good.values["macs"] == pytest.approx(1.0)
    bad = run_trial(job, 1, "codebook{bits=1,min_params=16,weighting=none}")
    assert bad.status == INFEASIBLE and "min_cosine" in bad.reason or "cosine" in bad.reason
    crash = run_trial(job, 2, "codebook{bits=99}")
    assert crash.status == "failed" and crash.reason


def test_pareto_front_keeps_only_undominated_feasible():
    rs = [TrialResult(0, "a", FEASIBLE, {"x": 0.5, "y": 0.5}), TrialResult(1, "b", FEASIBLE, {"x": 0.4, "y": 0.9}),
          TrialResult(2, "c", FEASIBLE, {"x": 0.6, "y": 0.6}), TrialResult(3, "d", INFEASIBLE, {"x": 0.1, "y": 0.1})]
    assert [r.number for r in pareto_front(rs, ("x", "y"))] == [1, 0]


# ---------------------------------------------------------------------------------------------
# executors, cache, resume
# ---------------------------------------------------------------------------------------------


def _search(executor, job, cache=None, trials=6):
    return run_search(job, space_from_mapping(SPACE), executor, trials=trials, batch=3, coarse_samples=16, cache=cache)


def test_local_pool_and_ray_give_the_same_front(tmp_path):
    ray = pytest.importorskip("ray", reason="Ray is not installed (pip install 'onnxcomp[ray]')")
    job = _job()
    pool = LocalPool(job, 2)
    try:
        local = _search(pool, job)
    finally:
        pool.close()
    if ray.is_initialized():
        ray.shutdown()
    rex = RayExecutor(job, "local", 2)
    try:
        remote = _search(rex, job)
    finally:
        rex.close()
    assert [t.pipeline for t in local.trials] == [t.pipeline for t in remote.trials]
    assert [(t.pipeline, t.status) for t in local.front] == [(t.pipeline, t.status) for t in remote.front]
    assert [t.values for t in local.trials] == [t.values for t in remote.trials]
    assert local.best is not None and local.best.status == FEASIBLE


class _Counting:
    """An in-process executor that records the (pipeline, samples) it really ran, and can be
    interrupted after some trials as Ctrl-C would."""

    name = "counting"

    def __init__(self, job, stop_after=None):
        self.job, self.ran, self.stop_after = job, [], stop_after

    def run(self, trials, held, on_result=None, guarded=False):
        out = []
        for n, p in trials:
            if self.stop_after is not None and len(self.ran) >= self.stop_after:
                raise KeyboardInterrupt
            self.ran.append((p, held, guarded))
            out.append(run_trial(self.job, n, p, held, guarded=guarded))
            if on_result is not None:
                on_result(out[-1])
        return out


def test_resume_repeats_no_finished_trial(tmp_path):
    job = _job()
    first = _Counting(job, stop_after=6)  # the 2 probes, the first batch of 3, and one trial of the second
    with pytest.raises(KeyboardInterrupt):
        _search(first, job, TrialCache(tmp_path, job.digest()))
    assert sum(1 for *_, guarded in first.ran if guarded) == 2
    again = _Counting(job)
    res = _search(again, job, TrialCache(tmp_path, job.digest()))
    assert len(res.trials) == 6
    assert not set(first.ran) & set(again.ran)  # nothing that finished is run again, probes included
    assert res.cached >= 6  # the 6 finished, and any pipeline the sampler drew twice
    fresh = _search(_Counting(job), job)  # and the resumed search is the uninterrupted one
    assert [(t.pipeline, t.status, t.values) for t in res.trials] == [(t.pipeline, t.status, t.values) for t in fresh.trials]


# ---------------------------------------------------------------------------------------------
# the CLI
# ---------------------------------------------------------------------------------------------


def _cli_files(tmp_path):
    """(model, data, space) files for a CLI search on the tiny model."""
    import yaml

    src, data, space = tmp_path / "m.onnx", tmp_path / "d.npz", tmp_path / "space.yaml"
    save_model(tiny_cnn(), src)
    np.savez(data, x=np.random.default_rng(1).standard_normal((64, 3, 16, 16)).astype(np.float32))
    space.write_text(yaml.safe_dump(SPACE))
    return src, data, space


def test_cli_search_writes_the_best_model(tmp_path, capsys):
    src, data, space = _cli_files(tmp_path)
    out = tmp_path / "best.onnx"
    code = main(["search", str(src), "--data", str(data), "--space", str(space), "-o", str(out), "--trials", "4",
                 "--workers", "1", "--min-cosine", "0.99", "--no-cache", "--json", "-q"])
    assert code == 0
    doc = json.loads(capsys.readouterr().out)
    assert doc["best"]["status"] == FEASIBLE and doc["output"] == str(out)
    written = onnx.load(str(out))
    meta = {p.key: p.value for p in written.metadata_props}
    assert meta["onnxcomp.pipeline"] == str(Pipeline.parse(doc["best"]["pipeline"]))


@pytest.mark.parametrize(("argv", "match"), [
    (["--trials", "0"], "at least one trial"),
    (["--objective", "lzma", "--objective", "macs", "--objective", "file"], "at most two"),
    (["--ray", "127.0.0.1:1"], "cannot reach"),
])
def test_cli_bad_input_is_one_line_exit_2(tmp_path, capsys, argv, match):
    src, data, _ = _cli_files(tmp_path)
    if "--ray" in argv:
        pytest.importorskip("ray")
    code = main(["search", str(src), "--data", str(data), "--no-cache", "-q", *argv])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and len(err) == 1 and match in err[0], err


def _no_network(page: str) -> bool:
    import re

    return not re.search(r"""(src|href)\s*=\s*["']?(https?:)?//""", page) and "@import" not in page


def test_search_html_report_is_self_contained(tmp_path, capsys):
    from html.parser import HTMLParser

    src, data, space = _cli_files(tmp_path)
    page_path = tmp_path / "r.html"
    code = main(["search", str(src), "--data", str(data), "--space", str(space), "--trials", "3", "--workers", "1",
                 "--min-cosine", "0.99", "--no-cache", "-q", "--report", str(page_path), "--reference", "none"])
    assert code == 0
    page = page_path.read_text()
    HTMLParser().feed(page)
    assert page.startswith("<!DOCTYPE html>") and "data:image/png;base64," in page and _no_network(page)
    assert page.count("<tr") >= 4 and "Best feasible" in page


def test_optimize_html_report_is_self_contained(tmp_path):
    src, data = tmp_path / "m.onnx", tmp_path / "d.npz"
    save_model(tiny_cnn(), src)
    np.savez(data, x=np.random.default_rng(1).standard_normal((64, 3, 16, 16)).astype(np.float32))
    page_path = tmp_path / "r.html"
    code = main(["optimize", str(src), "-o", str(tmp_path / "o.onnx"), "-p", "codebook{bits=6,min_params=16}",
                 "--data", str(data), "-q", "--report", str(page_path)])
    assert code == 0
    page = page_path.read_text()
    assert "codebook: every layer" in page and "conv1" in page and _no_network(page)
    assert "data:image/png;base64," in page  # the per-layer chart


@pytest.mark.parametrize(("doc", "match"), [
    ({"passes": [{"tucker": 0.5}]}, "mapping of options"),
    ({"passes": [{"winograd": {"tile": {"low": 2, "high": 6}}}]}, "tile"),
])
def test_malformed_space_entries_are_bad_input(doc, match):
    with pytest.raises((BadInputError, PipelineSyntaxError), match=match):
        space_from_mapping(doc)


def test_time_budget_bounds_the_whole_search(monkeypatch):
    """A fake clock: every trial takes 10 s. With a 100 s budget, the warm start's 2 probes (20 s),
    then batches of 2 on one worker (20 s each), each followed by re-judging the front's best on all
    samples (10 s): asking stops while the slowest batch, its re-judging and one more round for the
    front's last members still fit, and the search ends within the budget."""
    import onnxcomp.search.driver as driver

    clock = [0.0]
    monkeypatch.setattr(driver.time, "perf_counter", lambda: clock[0])
    job = _job()

    class Slow(_Counting):
        def run(self, trials, held, on_result=None, guarded=False):
            out = super().run(trials, held, on_result, guarded)
            clock[0] += 10.0 * len(trials)
            return out

    res = run_search(job, space_from_mapping(SPACE), Slow(job), trials=50, batch=2, time_budget=100.0, coarse_samples=16)
    # probes to 20 s, 2 batches and their rounds to 80 s; a 3rd would need 20 + 2 x 10 s more
    assert len(res.trials) == 4
    assert res.seconds <= 100.0 and any("time budget" in n for n in res.notes)
    assert res.best is not None and res.best.samples == 32  # re-judged on every held-out sample


def test_two_objectives_give_a_pareto_front():
    """NSGA-II on lzma and MACs: the front's members are feasible and none dominates another."""
    space = {"passes": [
        {"codebook": {"bits": [3, 4, 6, 8], "min_params": 16, "weighting": "none", "required": False}},
        {"tucker": {"rank": [0.25, 0.5, 0.75], "objective": "macs", "round": 1, "min_gain": -1, "required": False}},
    ]}
    job = _job(tol=Tolerance(min_cosine=0.9), objectives=("lzma", "macs"))
    res = run_search(job, space_from_mapping(space), _Counting(job), trials=12, batch=4, coarse_samples=16)
    assert res.front and all(r.status == FEASIBLE for r in res.front)
    for a in res.front:
        for b in res.front:
            if a is not b:
                assert not (all(a.values[o] <= b.values[o] for o in ("lzma", "macs"))
                            and any(a.values[o] < b.values[o] for o in ("lzma", "macs")))
    assert len({r.pipeline for r in res.trials}) > 1


# ---------------------------------------------------------------------------------------------
# the warm start's probes, domain ends, user metrics, worker threads
# ---------------------------------------------------------------------------------------------


def test_probes_leave_fragile_layers_out_of_the_first_trials():
    """At bits=2 the guard puts conv1 back (on the tiny model, min cosine 0.9): the space then offers
    leaving it out, and the first trial is codebook at its strongest without it, which holds where
    the same setting with conv1 breaks the tolerance. Tucker at rank 0.5 holds only with every layer
    put back, so its trials start mild."""
    from onnxcomp.search.driver import probe_passes

    job = _job(tol=Tolerance(min_cosine=0.9))
    runner = _Counting(job)
    probes = probe_passes(job, space_from_mapping(SPACE), runner, 16)
    assert [g for *_, g in runner.ran] == [True, True]  # both probes ran under the guard
    codebook, tucker = probes.results
    assert codebook.figures["restored"] == {"codebook": ["conv1"]} and codebook.figures["rewritten"]["codebook"] == 2
    assert probes.strong == ["codebook"]
    assert sorted(tucker.figures["restored"]["tucker"]) == ["conv1", "conv2", "fc"]
    assert any("every layer it rewrites put back" in n for n in probes.notes)
    dom = {p.name: p for p in probes.space.passes}["codebook"].domains["exclude"]
    assert dom.choices == (None, "^conv1$")
    assert "exclude" not in {p.name: p for p in probes.space.passes}["tucker"].domains
    first = probes.space.pipeline(warm_start(probes.space, probes.strong)[0])
    assert first == "codebook{min_params=16,weighting=none,compensate=none,bits=2,exclude=^conv1$}"
    assert run_trial(job, 0, first, 16).status == FEASIBLE
    assert run_trial(job, 1, "codebook{min_params=16,weighting=none,compensate=none,bits=2}", 16).status == INFEASIBLE
    for params in warm_start(probes.space, probes.strong):  # every warm-start trial leaves conv1 out
        assert "exclude=^conv1$" in probes.space.pipeline(params)


def test_a_domains_ends_follow_the_options_direction():
    from onnxcomp.search.space import Domain

    assert (Domain(choices=(8, 2, 4), stronger="lower").mildest(), Domain(choices=(8, 2, 4), stronger="lower").strongest()) == (8, 2)
    assert Domain(low=0.1, high=0.4, stronger="higher").strongest() == 0.4
    assert Domain(low=2, high=6, integer=True, stronger="lower").strongest() == 2
    assert Domain(choices=("macs:0.85", "macs:0.5")).strongest() == "macs:0.5"  # no direction: the order given
    space = space_from_mapping({"passes": [{"codebook": {"avg_bits": {"low": 2, "high": 6}}}]})
    assert space.alone_at_strongest(space.passes[0]) == "codebook{avg_bits=2.0}"


METRIC_SRC = '''
import os
import numpy as np

def threads_seen(ref, cand, labels):
    """The worker's ONNXCOMP_THREADS, as a score (so a test can read it back)."""
    return float(os.environ.get("ONNXCOMP_THREADS", "0")), True

def cosine(ref, cand, labels):
    (r,), (c,) = ref.values(), cand.values()
    r, c = r.reshape(len(r), -1), c.reshape(len(c), -1)
    cos = (r * c).sum(1) / (np.linalg.norm(r, axis=1) * np.linalg.norm(c, axis=1))
    return float(cos.min()), True
'''


def test_the_metric_travels_with_the_job_and_workers_get_their_share_of_threads(tmp_path):
    """The metric file's text is in the job (a worker without the file still runs it), and each
    local worker runs with ONNXCOMP_THREADS set to its share of the cores; the driver's own
    environment is left as it was."""
    import os

    path = tmp_path / "m.py"
    path.write_text(METRIC_SRC)
    base = _job()
    job = Job(base.model, base.fit, base.held, base.tolerance, base.objectives, seed=base.seed,
              metric=f"{path}:threads_seen", metric_source=METRIC_SRC)
    path.unlink()
    before = os.environ.get("ONNXCOMP_THREADS")
    pool = LocalPool(job, 2, threads=1)
    try:
        res = pool.run([(0, "codebook{bits=8,min_params=16,weighting=none}")], 16)
    finally:
        pool.close()
    assert res[0].status == FEASIBLE, res[0].reason
    assert res[0].figures["metric"]["candidate"] == 1.0
    assert os.environ.get("ONNXCOMP_THREADS") == before


def test_session_threads_default_to_the_environment(monkeypatch):
    from onnxcomp.runtime import session_options

    monkeypatch.setenv("ONNXCOMP_THREADS", "1")
    assert session_options().intra_op_num_threads == 1
    assert session_options(threads=2).intra_op_num_threads == 2
    monkeypatch.setenv("ONNXCOMP_THREADS", "zero")
    with pytest.raises(BadInputError, match="ONNXCOMP_THREADS"):
        session_options()


def test_cli_search_with_a_bounded_metric(tmp_path, capsys):
    """--metric with --max-metric-drop is the verdict (no tolerance flag): a trial whose metric drops
    more is infeasible; the front table shows the metric's score."""
    src, data, space = _cli_files(tmp_path)
    (tmp_path / "m.py").write_text(METRIC_SRC)
    code = main(["search", str(src), "--data", str(data), "--space", str(space), "--trials", "6", "--workers", "1",
                 "--metric", f"{tmp_path / 'm.py'}:cosine", "--max-metric-drop", "0.01", "--no-cache", "--json",
                 "-q", "--reference", "none"])
    assert code == 0
    doc = json.loads(capsys.readouterr().out)
    for t in doc["trials"]:
        m = t["figures"]["metric"]
        assert m["reference"] == pytest.approx(1.0, abs=1e-6)
        assert (t["status"] == FEASIBLE) == (m["drop"] <= 0.01), t
    assert any(t["status"] == INFEASIBLE for t in doc["trials"])  # bits=2 breaks it
    assert doc["best"]["figures"]["metric"]["drop"] <= 0.01


def test_cli_search_refuses_an_unusable_metric(tmp_path, capsys):
    src, data, space = _cli_files(tmp_path)
    code = main(["search", str(src), "--data", str(data), "--space", str(space), "--metric", "nope.py:f",
                 "--no-cache", "-q"])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and len(err) == 1 and "nope.py" in err[0]


def test_refinement_fills_the_executor_width():
    """One objective: the front is one trial. When the best trials pass the coarse check and fail on
    every held-out sample, each refinement round re-judges as many candidates as the executor runs
    at once (4 here), not one per round; the best is a trial that passed on all of them."""
    job = _job()

    class Fake:
        name, workers = "fake", 4

        def __init__(self):
            self.fine_rounds = 0

        def run(self, trials, held, on_result=None, guarded=False):
            if held is None:
                self.fine_rounds += 1
            out = []
            for n, p in trials:
                value = 0.05 + 0.05 * ((n * 7) % 16)  # distinct per trial
                ok = held is not None or value > 0.4  # the smallest ones fail on every sample
                out.append(TrialResult(n, p, FEASIBLE if ok else INFEASIBLE, {"lzma": value},
                                       samples=16 if held else 32, figures={"restored": {}, "rewritten": {}}))
            return out

    fake = Fake()
    res = run_search(job, space_from_mapping(SPACE), fake, trials=16, batch=4, coarse_samples=16)
    failing = sum(1 for t in res.trials if t.status == INFEASIBLE)
    assert failing >= 4  # the case this test is about: several fail on every sample
    assert fake.fine_rounds <= -(-failing // 4) + 1
    assert res.best is not None and res.best.values["lzma"] == pytest.approx(0.45) and res.best.samples == 32


def test_past_the_budget_rejudging_goes_on_until_a_trial_holds(monkeypatch):
    """The budget runs out during the front's re-check while every trial re-judged so far failed on
    all held-out samples: the search does not end empty-handed (a 9-minute glyph_resnet search once
    wrote nothing after 52 feasible trials); it re-judges until one holds, and says it overran."""
    import onnxcomp.search.driver as driver

    clock = [0.0]
    monkeypatch.setattr(driver.time, "perf_counter", lambda: clock[0])
    job = _job()

    class Fake:
        name, workers = "fake", 2

        def run(self, trials, held, on_result=None, guarded=False):
            clock[0] += 10.0 if held is not None else 60.0  # re-judging is slower than a trial
            out = []
            for n, p in trials:
                value = 0.05 + 0.05 * ((n * 7) % 16)
                ok = held is not None or value > 0.4  # the smallest fail on every sample
                out.append(TrialResult(n, p, FEASIBLE if ok else INFEASIBLE, {"lzma": value},
                                       samples=16 if held else 32, figures={"restored": {}, "rewritten": {}}))
            return out

    # probes 10 s, the first batch of 4 to 20 s, its re-judging round (the two smallest, both failing
    # on every sample) to 80 s: past the 70 s budget with no re-judged trial held
    res = run_search(job, space_from_mapping(SPACE), Fake(), trials=16, batch=4, time_budget=70.0,
                     coarse_samples=16)
    assert len(res.trials) == 4
    assert res.best is not None and res.best.samples == 32 and res.best.status == FEASIBLE
    assert res.best.values["lzma"] == pytest.approx(0.75)  # the smallest of the four that holds
    assert any("exceeded" in n for n in res.notes)
