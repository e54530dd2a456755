"""Model I/O: load any .onnx (with external data), save atomically, keep outputs loadable by onnxruntime."""

from __future__ import annotations

import functools
import os
import tempfile
from pathlib import Path

import onnx
from google.protobuf.message import DecodeError

from onnxcomp.errors import BadInputError, first_line

# protobuf refuses to serialize a message of 2 GiB or more; stay clear of it.
_PROTOBUF_LIMIT = 2**31 - 2**24


def load_model(path: str | os.PathLike, *, load_external_data: bool = True) -> onnx.ModelProto:
    """Read an ONNX file. Any unreadable input raises BadInputError with a one-line message."""
    p = Path(path)
    if not p.exists():
        raise BadInputError(f"{p}: no such file")
    if p.is_dir():
        raise BadInputError(f"{p}: is a directory, expected an .onnx file")
    try:
        model = onnx.load(str(p), load_external_data=False)
    except (DecodeError, RuntimeWarning, ValueError, OSError) as exc:
        raise BadInputError(f"{p}: not a readable ONNX model ({first_line(exc)})") from None
    except Exception as exc:  # protobuf raises assorted types for garbage input
        raise BadInputError(f"{p}: not a readable ONNX model ({first_line(exc)})") from None
    if not model.HasField("graph") or not model.opset_import or (not model.graph.node and not model.graph.output):
        # A file cut at a field boundary still parses: require the parts every model has.
        raise BadInputError(f"{p}: not an ONNX model (empty or truncated: no graph or no opset)")
    if load_external_data:
        try:
            onnx.external_data_helper.load_external_data_for_model(model, str(p.parent))
        except Exception as exc:
            raise BadInputError(f"{p}: cannot read its external data ({first_line(exc)})") from None
    return model


def as_model(model_or_path: onnx.ModelProto | str | os.PathLike) -> onnx.ModelProto:
    """Accept a ModelProto (returned as is) or a path (loaded)."""
    if isinstance(model_or_path, onnx.ModelProto):
        return model_or_path
    return load_model(model_or_path)


@functools.lru_cache(maxsize=1)
def max_runtime_ir_version() -> int:
    """Highest IR version the installed onnxruntime loads, probed once on a one-node model.

    onnx >= 1.23 stamps IR 14 on new models while some onnxruntime releases stop at 13, so the
    probe is the only reliable answer.
    """
    import onnxruntime as ort
    from onnx import TensorProto, helper

    graph = helper.make_graph(
        [helper.make_node("Identity", ["x"], ["y"])],
        "probe",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1])],
    )
    for ir in range(onnx.IR_VERSION, 6, -1):
        probe = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 13)])
        probe.ir_version = ir
        try:
            ort.InferenceSession(probe.SerializeToString(), providers=["CPUExecutionProvider"])
            return ir
        except Exception:
            continue
    return 7


def runtime_compatible(model: onnx.ModelProto) -> onnx.ModelProto:
    """Clamp the model's IR version to what onnxruntime accepts (in place; returns the model)."""
    limit = max_runtime_ir_version()
    if model.ir_version > limit or model.ir_version == 0:
        model.ir_version = limit
    return model


def convert_opset(model: onnx.ModelProto, opset: int, purpose: str) -> tuple[onnx.ModelProto, str]:
    """`model` at default-domain `opset` (onnx's version converter, then its checker), or `model`
    itself with the reason it stays; the note says which, and for what (`purpose`)."""
    from onnxcomp.graph import opset_version

    try:
        out = onnx.version_converter.convert_version(model, opset)
        onnx.checker.check_model(out)
        return out, f"converted from opset {opset_version(model)} to {opset} for {purpose}"
    except Exception as exc:  # the converter lacks adapters for some ops
        return model, f"opset {opset_version(model)} kept: conversion to {opset} failed ({first_line(exc, 120)})"


def model_bytes(model: onnx.ModelProto) -> bytes:
    """Deterministic serialization (used for saving and for byte-identical checks)."""
    return model.SerializeToString(deterministic=True)


def save_model(
    model: onnx.ModelProto,
    path: str | os.PathLike,
    *,
    protect: tuple[str | os.PathLike, ...] = (),
    external_data: bool | None = None,
) -> Path:
    """Write `model` to `path` atomically (temp file in the same folder, then rename).

    Refuses to overwrite any file in `protect` (the inputs) or an external-data file they use.
    Uses external data when asked or when the protobuf would pass the 2 GB limit; the data file is
    named `<file>.data` beside it. The model's IR version is clamped in place (`runtime_compatible`).
    """
    out = check_output_path(path)
    runtime_compatible(model)
    # ByteSize() serializes the whole message under upb (seconds and a full copy for a 550 MB
    # model), so decide from the tensor payloads; a model still too big fails to serialize below.
    too_big = _payload_bytes(model) > _PROTOBUF_LIMIT
    if external_data is None:
        external_data = too_big
    elif too_big and not external_data:
        raise BadInputError(f"{out}: the model is over 2 GB; it can only be saved with external data")
    targets = [out, out.parent / (out.name + ".data")] if external_data else [out]
    _refuse_to_overwrite(targets, [Path(p) for p in protect])
    try:
        fd, tmp = tempfile.mkstemp(prefix=f".{out.name}.", suffix=".tmp", dir=str(out.parent))
    except OSError as exc:
        raise BadInputError(f"{out}: cannot write here ({exc.strerror or first_line(exc)})") from None
    os.close(fd)
    os.chmod(tmp, default_file_mode())  # mkstemp makes 0600; give the file the usual permissions
    tmp_data = out.parent / (Path(tmp).name + ".data")
    try:
        if external_data:
            data_name = out.name + ".data"
            work = onnx.ModelProto()
            work.CopyFrom(model)
            onnx.external_data_helper.convert_model_to_external_data(
                work, all_tensors_to_one_file=True, location=tmp_data.name, size_threshold=1024
            )
            onnx.save_model(work, tmp)
            # Point the tensors at the final data-file name, then move both into place.
            for tensor in onnx.external_data_helper._get_all_tensors(work):
                for entry in tensor.external_data:
                    if entry.key == "location":
                        entry.value = data_name
            with open(tmp, "wb") as fh:
                fh.write(model_bytes(work))
            os.chmod(tmp_data, default_file_mode())  # onnx writes it 0600, like mkstemp
            os.replace(tmp_data, out.parent / data_name)
        else:
            with open(tmp, "wb") as fh:
                fh.write(model_bytes(model))
        os.replace(tmp, out)
    except BaseException as exc:
        for leftover in (tmp, tmp_data):
            if os.path.exists(leftover):
                os.unlink(leftover)
        if isinstance(exc, OSError):  # disk full, permissions, ...: the user's environment, not a bug
            raise BadInputError(f"{out}: cannot write ({exc.strerror or first_line(exc)})") from None
        raise
    return out


def check_output_path(path: str | os.PathLike, *, protect: tuple[str | os.PathLike, ...] = ()) -> Path:
    """`path` as a Path if a file can be written there: BadInputError when it is a directory, its
    folder does not exist, or it names one of the `protect` files. Lets a command refuse a bad
    output path before doing any work."""
    out = Path(path)
    if out.is_dir():
        raise BadInputError(f"{out}: is a directory, expected an output file path")
    if not out.parent.exists():
        raise BadInputError(f"{out.parent}: output folder does not exist")
    for p in protect:
        if _same_file(out, Path(p)):
            raise BadInputError(f"{out}: refusing to overwrite an input; choose another output path")
    return out


def save_text(path: str | os.PathLike, text: str, *, protect: tuple[str | os.PathLike, ...] = ()) -> Path:
    """Write `text` (UTF-8) to `path` atomically (see `save_bytes`)."""
    return save_bytes(path, text.encode("utf-8"), protect=protect)


def save_bytes(path: str | os.PathLike, data: bytes, *, protect: tuple[str | os.PathLike, ...] = ()) -> Path:
    """Write `data` to `path` atomically: a temp file in the same folder, then a rename, so a reader
    never sees half a report or image. Same path checks as `check_output_path`."""
    out = check_output_path(path, protect=protect)
    try:
        fd, tmp = tempfile.mkstemp(prefix=f".{out.name}.", suffix=".tmp", dir=str(out.parent))
    except OSError as exc:
        raise BadInputError(f"{out}: cannot write here ({exc.strerror or first_line(exc)})") from None
    try:
        with os.fdopen(fd, "wb") as fh:
            fh.write(data)
        os.chmod(tmp, default_file_mode())
        os.replace(tmp, out)
    except BaseException as exc:
        if os.path.exists(tmp):
            os.unlink(tmp)
        if isinstance(exc, OSError):
            raise BadInputError(f"{out}: cannot write ({exc.strerror or first_line(exc)})") from None
        raise
    return out


def _refuse_to_overwrite(targets: list[Path], protect: list[Path]) -> None:
    """BadInputError if writing `targets` would replace a protected model or one of its external-data
    files. A protected model's external-data references are read (protobuf only, no weights) only
    for an existing target not named *.onnx, so the common case costs no extra parse."""
    for target in targets:
        for p in protect:
            if _same_file(target, p):
                raise BadInputError(f"{target}: refusing to overwrite the input model; choose another output path")
        if not target.exists() or target.suffix == ".onnx":
            continue
        for p in protect:
            if not p.is_file():
                continue
            try:
                ref = onnx.load(str(p), load_external_data=False)
            except Exception:
                continue
            for tensor in onnx.external_data_helper._get_all_tensors(ref):
                for entry in tensor.external_data:
                    if entry.key == "location" and _same_file(target, p.parent / entry.value):
                        raise BadInputError(
                            f"{target}: refusing to overwrite the external data of input {p}; choose another output path"
                        )


def _payload_bytes(model: onnx.ModelProto) -> int:
    """Bytes of the initializers stored inside the protobuf (dims x item size; no serialization)."""
    total = 0
    for t in model.graph.initializer:
        if t.data_location == onnx.TensorProto.EXTERNAL:
            continue
        n = 1
        for d in t.dims:
            n *= int(d)
        try:
            item = onnx.helper.tensor_dtype_to_np_dtype(t.data_type).itemsize
        except Exception:
            item = 8
        total += n * item
    return total


def _same_file(a: Path, b: Path) -> bool:
    """True when both paths exist and name the same file (symlinks and hard links included)."""
    try:
        return a.exists() and b.exists() and os.path.samefile(a, b)
    except OSError:
        return False


def default_file_mode() -> int:
    """0o666 minus the process umask: the mode a plain open() would give a new file."""
    mask = os.umask(0)
    os.umask(mask)
    return 0o666 & ~mask
