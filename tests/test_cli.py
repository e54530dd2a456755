"""The `onnxcomp` command line: `passes`, `zoo`, `optimize` — outputs, exit codes, determinism."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import pytest

from onnxcomp.cli import main
from onnxcomp.model import load_model, model_bytes
from onnxcomp.passes import base
from onnxcomp.passes.base import registered_passes

sys.path.insert(0, str(Path(__file__).parent))
from test_pipeline import PerturbPass, tiny_model  # noqa: E402


def run_cli(capsys, *argv: str) -> tuple[int, str, str]:
    """Run `onnxcomp argv...` in process; returns (exit code, stdout, stderr)."""
    try:
        code = main([str(a) for a in argv])
    except SystemExit as exc:  # argparse usage errors
        code = int(exc.code or 0)
    out, err = capsys.readouterr()
    return code, out, err


@pytest.fixture(scope="module")
def r18(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("zoo") / "r18.onnx"
    assert main(["zoo", "resnet18", "-o", str(path)]) == 0
    return path


@pytest.fixture
def tiny(tmp_path) -> Path:
    path = tmp_path / "tiny.onnx"
    path.write_bytes(model_bytes(tiny_model()))
    return path


# -- passes ---------------------------------------------------------------------------------------
def test_passes_lists_every_pass_with_its_options(capsys):
    code, out, err = run_cli(capsys, "passes")
    assert code == 0 and err == ""
    for name, cls in registered_passes().items():
        assert f"{name}: {cls.summary}" in out
        for f in cls.Config.fields():
            if f.name not in ("include", "exclude", "ops"):
                assert f"  {f.name}=" in out, (name, f.name)
    assert "fold_bn=True (bool)" in out
    assert "include=REGEX" in out


def test_passes_json(capsys):
    code, out, _ = run_cli(capsys, "passes", "--json")
    assert code == 0
    info = json.loads(out)
    assert [p["name"] for p in info] == list(registered_passes())
    norm = next(p for p in info if p["name"] == "normalize")
    opts = {o["name"]: o for o in norm["options"]}
    assert opts["fold_bn"] == {"name": "fold_bn", "type": "bool", "default": True, "help": opts["fold_bn"]["help"],
                               "choices": [], "common": False, "search": None, "stronger": None}
    assert opts["include"]["common"] is True and opts["fold_bn"]["help"]
    codebook = {o["name"]: o for o in next(p for p in info if p["name"] == "codebook")["options"]}
    assert codebook["avg_bits"]["search"] == [6.0, 5.0, 4.0, 3.0]  # the default search space, documented
    assert codebook["avg_bits"]["stronger"] == "lower"  # and which way it compresses more
    assert norm["needs_data"] is False and "Conv" in norm["ops"]


def test_passes_json_shows_test_passes_with_choices(capsys, monkeypatch):
    from test_pipeline import ScalePass

    monkeypatch.setattr(ScalePass, "name", "t_scale", raising=False)
    monkeypatch.setitem(base._REGISTRY, "t_scale", ScalePass)
    _, out, _ = run_cli(capsys, "passes", "--json")
    scale = next(p for p in json.loads(out) if p["name"] == "t_scale")
    opts = {o["name"]: o for o in scale["options"]}
    assert opts["mode"]["choices"] == ["plain", "noisy"] and opts["factor"]["type"] == "float"
    _, text, _ = run_cli(capsys, "passes")
    assert "  mode=plain (str) (plain|noisy)" in text


# -- zoo ------------------------------------------------------------------------------------------
def test_zoo_writes_a_loadable_model(r18, capsys):
    model = load_model(r18)
    onnx.checker.check_model(model)
    from onnxcomp.zoo import trainable_params

    assert trainable_params(model) == 11_689_512
    mask = os.umask(0)
    os.umask(mask)
    assert r18.stat().st_mode & 0o777 == 0o666 & ~mask  # what open() would give under this umask, not mkstemp's 0600


def test_zoo_console_script(tmp_path):
    """The installed entry point, end to end in a fresh process."""
    exe = shutil.which("onnxcomp") or pytest.skip("console script not installed")
    out = tmp_path / "m.onnx"
    proc = subprocess.run([exe, "zoo", "mobilenetv2", "-o", str(out)], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    assert "mobilenetv2: 3,504,872 parameters" in proc.stdout and "300.77M MACs" in proc.stdout
    sess = ort.InferenceSession(str(out), providers=["CPUExecutionProvider"])
    (y,) = sess.run(None, {"input": np.zeros((1, 3, 224, 224), np.float32)})
    assert y.shape == (1, 1000)


def test_zoo_bad_name_and_bad_folder(capsys, tmp_path):
    code, out, err = run_cli(capsys, "zoo", "resnet19", "-o", tmp_path / "x.onnx")
    assert code == 2 and len(err.strip().splitlines()) == 1 and "resnet19" in err
    code, _, err = run_cli(capsys, "zoo", "mobilenetv2", "-o", tmp_path / "nope" / "x.onnx")
    assert code == 2 and len(err.strip().splitlines()) == 1 and "does not exist" in err


# -- optimize -------------------------------------------------------------------------------------
def test_optimize_normalize_writes_model_report_and_table(r18, tmp_path, capsys):
    out, rep = tmp_path / "o.onnx", tmp_path / "r.json"
    code, stdout, err = run_cli(capsys, "optimize", r18, "-o", out, "-p", "normalize", "--report", rep, "-q")
    assert code == 0, err
    report = json.loads(rep.read_text())
    assert report["pipeline"] == "normalize" and [p["name"] for p in report["passes"]] == ["normalize"]
    assert report["passes"][0]["figures"]["bn_folded"] == 20
    assert report["before"]["macs"] == report["after"]["macs"] == 1_814_073_344
    # the human table
    assert "pass" in stdout and "rewritten" in stdout
    assert any(line.startswith("normalize") for line in stdout.splitlines())
    assert "params" in stdout and "MACs" in stdout
    # the output runs in onnxruntime and computes what the input computes
    x = np.random.default_rng(0).standard_normal((2, 3, 224, 224)).astype(np.float32)
    ref = ort.InferenceSession(str(r18), providers=["CPUExecutionProvider"]).run(None, {"input": x})[0]
    got = ort.InferenceSession(str(out), providers=["CPUExecutionProvider"]).run(None, {"input": x})[0]
    np.testing.assert_allclose(got, ref, rtol=1e-4, atol=1e-4)
    assert not any(n.op_type == "BatchNormalization" for n in load_model(out).graph.node)


def test_optimize_json_on_stdout(tiny, tmp_path, capsys):
    code, stdout, _ = run_cli(capsys, "optimize", tiny, "-o", tmp_path / "o.onnx", "--json", "-q")
    assert code == 0
    assert json.loads(stdout)["passes"][0]["name"] == "normalize"


def test_optimize_is_deterministic(r18, tmp_path, capsys):
    outs = []
    for k in range(2):
        out = tmp_path / f"o{k}.onnx"
        code, _, err = run_cli(capsys, "optimize", r18, "-o", out, "-p", "normalize", "--seed", "3", "-q")
        assert code == 0, err
        outs.append(out.read_bytes())
    assert outs[0] == outs[1]


def test_bad_pipeline_string_exits_2_with_one_line(tiny, tmp_path, capsys):
    out = tmp_path / "o.onnx"
    code, stdout, err = run_cli(capsys, "optimize", tiny, "-o", out, "-p", "normalize,tuker{rank=3}")
    assert code == 2
    lines = err.strip().splitlines()
    assert len(lines) == 1 and "column 11" in lines[0] and "tuker" in lines[0]
    assert not out.exists()
    code, _, err = run_cli(capsys, "optimize", tiny, "-o", out, "-p", "normalize{fold_bn=perhaps}")
    assert code == 2 and len(err.strip().splitlines()) == 1 and "expected bool" in err


def test_output_equal_to_input_is_refused(tiny, capsys, monkeypatch):
    before = tiny.read_bytes()
    code, _, err = run_cli(capsys, "optimize", tiny, "-o", tiny)
    assert code == 2 and len(err.strip().splitlines()) == 1 and "refusing to overwrite" in err
    monkeypatch.chdir(tiny.parent)  # the same file under another spelling, and through a symlink
    code, _, _ = run_cli(capsys, "optimize", tiny, "-o", f"./{tiny.name}")
    assert code == 2
    link = tiny.parent / "link.onnx"
    link.symlink_to(tiny)
    code, _, _ = run_cli(capsys, "optimize", link, "-o", tiny)
    assert code == 2
    assert tiny.read_bytes() == before


@pytest.mark.parametrize("content", [b"", b"not an onnx model at all", "truncated"])
def test_unreadable_input_exits_2_and_is_left_alone(tmp_path, capsys, content):
    src = tmp_path / "in.onnx"
    src.write_bytes(model_bytes(tiny_model())[:57] if content == "truncated" else content)
    before = src.read_bytes()
    out = tmp_path / "o.onnx"
    code, _, err = run_cli(capsys, "optimize", src, "-o", out)
    assert code == 2 and len(err.strip().splitlines()) == 1 and "Traceback" not in err
    assert src.read_bytes() == before and not out.exists()


def test_missing_input_and_bad_flags_exit_2(tmp_path, capsys):
    code, _, err = run_cli(capsys, "optimize", tmp_path / "nope.onnx", "-o", tmp_path / "o.onnx")
    assert code == 2 and "no such file" in err
    code, _, err = run_cli(capsys, "optimize", tmp_path / "nope.onnx")  # -o missing
    assert code == 2 and len(err.strip().splitlines()) == 1
    code, _, _ = run_cli(capsys)
    assert code == 2


@pytest.fixture
def perturb_registered(monkeypatch):
    monkeypatch.setattr(PerturbPass, "name", "t_perturb", raising=False)
    monkeypatch.setitem(base._REGISTRY, "t_perturb", PerturbPass)


@pytest.mark.usefixtures("perturb_registered")
def test_validation_failure_exits_1_and_rollback_recovers(tiny, tmp_path, capsys):
    pytest.importorskip("onnxcomp.validation", reason="onnxcomp.validation not written yet")
    tol = ["--rtol", "1e-4", "--atol", "1e-5"]
    out, rep = tmp_path / "o.onnx", tmp_path / "r.json"
    code, _, err = run_cli(capsys, "optimize", tiny, "-o", out, "-p", "t_perturb{bad=conv2}", "--validate-each",
                           "--on-fail", "stop", *tol, "--report", rep, "-q")
    assert code == 1 and len(err.strip().splitlines()) == 1 and "conv2" in err
    assert json.loads(rep.read_text())["passes"][-1]["validation"]["passed"] is False
    assert not out.exists()  # a pass that fails under the guard writes nothing
    for on_fail in ([], ["--on-fail", "rollback"], ["--on-fail", "repair"]):  # repair is the default
        out.unlink(missing_ok=True)
        code, stdout, err = run_cli(capsys, "optimize", tiny, "-o", out, "-p", "t_perturb{bad=conv2}", "--validate-each",
                                    *on_fail, *tol, "--report", rep, "-q")
        assert code == 0, err
        assert json.loads(rep.read_text())["passes"][-1]["rolled_back"] == ["conv2"]
        assert out.exists()
    # a final check that fails still writes the model (a result, not a crash) and exits 1
    out2 = tmp_path / "o2.onnx"
    code, stdout, err = run_cli(capsys, "optimize", tiny, "-o", out2, "-p", "t_perturb{bad=conv3}", "--validate",
                                *tol, "-q")
    assert code == 1 and out2.exists() and "FAIL" in stdout


@pytest.mark.usefixtures("perturb_registered")
def test_no_normalize_flag(tiny, tmp_path, capsys):
    rep = tmp_path / "r.json"
    for flags, passes in ([[], ["normalize", "t_perturb"]], [["--no-normalize"], ["t_perturb"]]):
        code, _, err = run_cli(capsys, "optimize", tiny, "-o", tmp_path / "o.onnx", "-p", "t_perturb", *flags,
                               "--report", rep, "-q")
        assert code == 0, err
        assert [p["name"] for p in json.loads(rep.read_text())["passes"]] == passes
        ops = [n.op_type for n in load_model(tmp_path / "o.onnx").graph.node]
        assert ("BatchNormalization" in ops) == ("--no-normalize" in flags)


@pytest.mark.usefixtures("perturb_registered")
def test_a_tolerance_flag_is_never_silently_ignored(tiny, tmp_path, capsys):
    """`--min-cosine` without `--validate` used to be accepted and never checked."""
    out, rep = tmp_path / "o.onnx", tmp_path / "r.json"
    code, _, err = run_cli(capsys, "optimize", tiny, "-o", out, "-p", "t_perturb{bad=conv3}", "--min-cosine",
                           "0.999", "--report", rep, "-q")
    assert code == 1 and "final model broke the tolerance" in err
    assert json.loads(rep.read_text())["validation"]["passed"] is False
    code, _, err = run_cli(capsys, "optimize", tiny, "-o", out, "-p", "t_perturb", "--min-cosine", "0.999",
                           "--report", rep, "-q")
    assert code == 0 and json.loads(rep.read_text())["validation"]["passed"] is True
    code, _, err = run_cli(capsys, "optimize", tiny, "-o", tmp_path / "o2.onnx", "-p", "t_perturb", "--on-fail",
                           "rollback", "-q")
    assert code == 2 and "needs the guard" in err and not (tmp_path / "o2.onnx").exists()


@pytest.mark.parametrize("where", ["missing-folder", "a-folder", "the-input", "the-output"])
def test_unwritable_report_path_is_exit_2_before_any_output(tiny, tmp_path, capsys, where):
    """A bad --report path used to fail with an internal error after the model had been written."""
    out = tmp_path / "o.onnx"
    report = {"missing-folder": tmp_path / "nope" / "r.json", "a-folder": tmp_path, "the-input": tiny,
              "the-output": out}[where]
    before = tiny.read_bytes()
    code, _, err = run_cli(capsys, "optimize", tiny, "-o", out, "--report", report, "-q")
    assert code == 2, err
    assert len(err.strip().splitlines()) == 1 and "internal error" not in err
    assert not out.exists() and tiny.read_bytes() == before


def test_optimize_console_script_bad_pipeline(tiny, tmp_path):
    exe = shutil.which("onnxcomp") or pytest.skip("console script not installed")
    proc = subprocess.run([exe, "optimize", str(tiny), "-o", str(tmp_path / "o.onnx"), "-p", "normalize,"],
                          capture_output=True, text=True, timeout=120, env={**os.environ, "ONNXCOMP_TRACEBACK": ""})
    assert proc.returncode == 2
    assert proc.stderr.strip().splitlines() == [proc.stderr.strip()] and "trailing ','" in proc.stderr


def test_report_table_shows_growth_instead_of_0_00x():
    """A model that grew 300x (a ConstantOfShape model after folding) showed 'reduction 0.00x'."""
    from onnxcomp.cli.optimize_cmd import render_report
    from onnxcomp.pipeline import Report

    report = Report(pipeline="normalize", seed=0, before={"params": 10, "macs": 100, "bytes": 15_000},
                    after={"params": 10, "macs": 100, "bytes": 4_950_000})
    sizes = {line.split()[0]: line.split()[-1] for line in render_report(report).splitlines()[2:] if line.strip()}
    assert sizes["file"] == "0.003x" and sizes["params"] == "1.00x"


def test_errors_print_as_one_line_even_when_a_message_has_several(monkeypatch, capsys):
    from onnxcomp.errors import BadInputError

    def explode(args):
        raise BadInputError("first part\n  second part\n")

    monkeypatch.setattr("onnxcomp.cli.passes_cmd.run", explode)
    code, _, err = run_cli(capsys, "passes")
    assert code == 2 and err == "onnxcomp: error: first part second part\n"
