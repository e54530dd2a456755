"""Model I/O: unreadable inputs give BadInputError / exit 2 with one line and no traceback and stay
byte-identical; saving is atomic, never overwrites the input, handles external data and writes an IR
version the installed onnxruntime accepts."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from _helpers import make_conv_model, ort_run
from onnx import numpy_helper

import onnxcomp.model as model_mod
from onnxcomp.cli import main
from onnxcomp.errors import EXIT_BAD_INPUT, BadInputError
from onnxcomp.model import load_model, max_runtime_ir_version, model_bytes, save_model

BAD_KINDS = ["missing", "directory", "text", "empty", "truncated-half", "truncated-at-field", "external-data-missing"]


def _write_model(path: Path, external: bool = False) -> onnx.ModelProto:
    model = make_conv_model(cin=16, cout=32)  # 4608 weights: above onnx's external-data threshold
    if external:
        onnx.save_model(model, str(path), save_as_external_data=True, all_tensors_to_one_file=True,
                        location=path.name + ".data", size_threshold=1024)
    else:
        path.write_bytes(model.SerializeToString())
    return model


def make_bad_input(kind: str, folder: Path) -> Path:
    """A path that load_model must refuse, of the given kind."""
    path = folder / f"{kind}.onnx"
    if kind == "missing":
        return path
    if kind == "directory":
        path.mkdir()
        return path
    if kind == "text":
        path.write_text("ir_version: 8\nthis is a text file, not a protobuf\n")
        return path
    if kind == "empty":
        path.write_bytes(b"")
        return path
    good = make_conv_model().SerializeToString()
    if kind == "truncated-half":
        path.write_bytes(good[: len(good) // 2])
        return path
    if kind == "truncated-at-field":
        # Cut exactly before the trailing opset_import field: the rest still parses as a ModelProto.
        model = make_conv_model()
        data = model.SerializeToString(deterministic=True)
        opset = model.opset_import[0].SerializeToString()
        cut = data.rfind(opset) - 2  # the field's tag and length bytes
        assert cut > 0
        path.write_bytes(data[:cut])
        return path
    if kind == "external-data-missing":
        _write_model(path, external=True)
        (folder / (path.name + ".data")).unlink()
        return path
    raise ValueError(kind)


def _snapshot(folder: Path) -> dict[str, bytes | None]:
    return {p.name: (p.read_bytes() if p.is_file() else None) for p in sorted(folder.iterdir())}


@pytest.mark.parametrize("kind", BAD_KINDS)
def test_load_model_rejects_bad_input(tmp_path, kind):
    path = make_bad_input(kind, tmp_path)
    before = _snapshot(tmp_path)
    with pytest.raises(BadInputError) as info:
        load_model(path)
    message = str(info.value)
    assert "\n" not in message and str(path.name) in message
    assert _snapshot(tmp_path) == before


@pytest.mark.parametrize("kind", BAD_KINDS)
def test_cli_rejects_bad_input_with_exit_2(tmp_path, kind, capsys):
    path = make_bad_input(kind, tmp_path)
    before = _snapshot(tmp_path)
    code = main(["optimize", str(path), "-o", str(tmp_path / "out.onnx"), "-p", "normalize", "-q"])
    err = capsys.readouterr().err
    assert code == EXIT_BAD_INPUT
    assert len(err.strip().splitlines()) == 1, err
    assert "Traceback" not in err and err.startswith("onnxcomp: error:")
    assert _snapshot(tmp_path) == before  # input untouched, no output, no temp file


def _console_script() -> str:
    found = Path(sys.executable).parent / "onnxcomp"
    return str(found) if found.exists() else (shutil.which("onnxcomp") or "onnxcomp")


@pytest.mark.parametrize("launcher", ["console-script", "python-m"])
def test_cli_subprocess_bad_input(tmp_path, launcher):
    path = make_bad_input("truncated-half", tmp_path)
    before = path.read_bytes()
    cmd = [_console_script()] if launcher == "console-script" else [sys.executable, "-m", "onnxcomp"]
    proc = subprocess.run([*cmd, "optimize", str(path), "-o", str(tmp_path / "out.onnx")],
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == EXIT_BAD_INPUT
    assert len(proc.stderr.strip().splitlines()) == 1, proc.stderr
    assert "Traceback" not in proc.stderr
    assert path.read_bytes() == before
    assert sorted(p.name for p in tmp_path.iterdir()) == [path.name]


def test_cli_optimize_normalize_writes_a_runnable_model(tmp_path, capsys):
    src = tmp_path / "in.onnx"
    model = _write_model(src)
    before = src.read_bytes()
    out = tmp_path / "out.onnx"
    assert main(["optimize", str(src), "-o", str(out), "-p", "normalize", "-q"]) == 0
    assert src.read_bytes() == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["in.onnx", "out.onnx"]
    saved = onnx.load(str(out))
    assert saved.ir_version <= max_runtime_ir_version()
    feeds = {"x": np.random.default_rng(0).standard_normal((2, 16, 8, 8)).astype(np.float32)}
    np.testing.assert_allclose(ort_run(saved, feeds)["y"], ort_run(model, feeds)["y"], rtol=1e-4, atol=1e-5)


# -- saving ----------------------------------------------------------------------------------------


def test_save_refuses_to_overwrite_the_input(tmp_path, capsys):
    src = tmp_path / "in.onnx"
    model = _write_model(src)
    before = src.read_bytes()
    with pytest.raises(BadInputError, match="refusing to overwrite"):
        save_model(model, src, protect=(src,))
    link = tmp_path / "link.onnx"
    link.symlink_to(src)
    with pytest.raises(BadInputError, match="refusing to overwrite"):
        save_model(model, link, protect=(src,))
    assert main(["optimize", str(src), "-o", str(src), "-q"]) == EXIT_BAD_INPUT
    err = capsys.readouterr().err
    assert len(err.strip().splitlines()) == 1 and "Traceback" not in err
    assert src.read_bytes() == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["in.onnx", "link.onnx"]


@pytest.mark.parametrize("external", [False, True], ids=["inline", "external-data"])
def test_save_is_atomic_when_serialization_fails(tmp_path, monkeypatch, external):
    out = tmp_path / "out.onnx"
    out.write_bytes(b"previous output")

    def broken(_model):
        raise RuntimeError("serialization failed")

    monkeypatch.setattr(model_mod, "model_bytes", broken)
    with pytest.raises(RuntimeError, match="serialization failed"):
        save_model(make_conv_model(cin=16, cout=32), out, external_data=external)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out.onnx"]  # no temp file, no .data
    assert out.read_bytes() == b"previous output"


def test_save_leaves_no_temp_files_and_uses_normal_permissions(tmp_path):
    out = tmp_path / "out.onnx"
    model = make_conv_model()
    save_model(model, out)
    save_model(model, out)  # overwriting a previous output is fine
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out.onnx"]
    mask = os.umask(0)
    os.umask(mask)
    assert out.stat().st_mode & 0o777 == 0o666 & ~mask


def test_save_is_deterministic(tmp_path):
    model = make_conv_model()
    save_model(model, tmp_path / "a.onnx")
    save_model(model, tmp_path / "b.onnx")
    assert (tmp_path / "a.onnx").read_bytes() == (tmp_path / "b.onnx").read_bytes()


def test_save_rejects_missing_folder_and_directory_target(tmp_path):
    model = make_conv_model()
    with pytest.raises(BadInputError, match="does not exist"):
        save_model(model, tmp_path / "nope" / "out.onnx")
    with pytest.raises(BadInputError, match="is a directory"):
        save_model(model, tmp_path)


def test_external_data_round_trip(tmp_path):
    model = make_conv_model(cin=16, cout=32)
    out = tmp_path / "ext.onnx"
    save_model(model, out, external_data=True)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ext.onnx", "ext.onnx.data"]
    assert out.stat().st_size < 2000 < (tmp_path / "ext.onnx.data").stat().st_size
    mask = os.umask(0)
    os.umask(mask)
    assert (tmp_path / "ext.onnx.data").stat().st_mode & 0o777 == out.stat().st_mode & 0o777 == 0o666 & ~mask
    loaded = load_model(out)
    want = {t.name: numpy_helper.to_array(t) for t in model.graph.initializer}
    got = {t.name: numpy_helper.to_array(t) for t in loaded.graph.initializer}
    assert want.keys() == got.keys()
    for name in want:
        np.testing.assert_array_equal(got[name], want[name])
    assert [n.SerializeToString() for n in loaded.graph.node] == [n.SerializeToString() for n in model.graph.node]
    # onnxruntime reads the external data from the path as well.
    sess = ort.InferenceSession(str(out), providers=["CPUExecutionProvider"])
    x = np.random.default_rng(0).standard_normal((1, 16, 8, 8)).astype(np.float32)
    np.testing.assert_allclose(sess.run(None, {"x": x})[0], ort_run(model, {"x": x})["y"], rtol=1e-5, atol=1e-6)
    # A model that was loaded with its external data can be saved again inline.
    save_model(loaded, tmp_path / "inline.onnx")
    assert model_bytes(onnx.load(str(tmp_path / "inline.onnx"))) == model_bytes(load_model(tmp_path / "inline.onnx"))


def test_output_ir_version_loads_in_onnxruntime(tmp_path):
    model = make_conv_model()
    model.ir_version = onnx.IR_VERSION  # what onnx stamps; may exceed what onnxruntime accepts
    out = tmp_path / "out.onnx"
    save_model(model, out)
    saved = onnx.load(str(out))
    assert 0 < saved.ir_version <= max_runtime_ir_version()
    ort.InferenceSession(str(out), providers=["CPUExecutionProvider"])


def test_save_refuses_to_overwrite_the_inputs_external_data(tmp_path):
    """Writing over the data file of an input model used to succeed and corrupt the input."""
    src = tmp_path / "a.onnx"
    onnx.save_model(make_conv_model(cin=16, cout=32), str(src), save_as_external_data=True,
                    all_tensors_to_one_file=True, location="b.onnx.data", size_threshold=1024)
    data = tmp_path / "b.onnx.data"
    before = data.read_bytes()
    model = make_conv_model(cin=16, cout=32)
    with pytest.raises(BadInputError, match="external data of input"):
        save_model(model, data, protect=(src,))
    # b.onnx is a new file, but with external data it would write b.onnx.data: the input's data
    with pytest.raises(BadInputError, match="external data of input"):
        save_model(model, tmp_path / "b.onnx", protect=(src,), external_data=True)
    assert data.read_bytes() == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a.onnx", "b.onnx.data"]
    save_model(model, tmp_path / "b.onnx", protect=(src,))  # inline: touches no input file
    save_model(model, tmp_path / "c.onnx", protect=(src,), external_data=True)
    assert data.read_bytes() == before
    np.testing.assert_array_equal(numpy_helper.to_array(load_model(src).graph.initializer[0]),
                                  numpy_helper.to_array(model.graph.initializer[0]))


def test_save_text_is_atomic_and_checks_the_path(tmp_path, monkeypatch):
    target = tmp_path / "r.json"
    model_mod.save_text(target, "first")
    assert target.read_text() == "first"

    class Boom(RuntimeError):
        pass

    real_fdopen = os.fdopen

    def failing_fdopen(fd, *a, **k):
        fh = real_fdopen(fd, *a, **k)
        fh.write = lambda _text: (_ for _ in ()).throw(Boom("disk gone"))
        return fh

    monkeypatch.setattr(model_mod.os, "fdopen", failing_fdopen)
    with pytest.raises(Boom):
        model_mod.save_text(target, "second")
    monkeypatch.undo()
    assert target.read_text() == "first" and sorted(p.name for p in tmp_path.iterdir()) == ["r.json"]
    with pytest.raises(BadInputError, match="output folder does not exist"):
        model_mod.save_text(tmp_path / "nope" / "r.json", "x")
    with pytest.raises(BadInputError, match="is a directory"):
        model_mod.save_text(tmp_path, "x")
    with pytest.raises(BadInputError, match="refusing to overwrite"):
        model_mod.save_text(target, "x", protect=(target,))
