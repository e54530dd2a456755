"""Model sizes: bytes on disk (protobuf + external data files), bytes after lzma (the honest size of
a codebook or sparse model, whose raw bytes overstate it), and the serialized size of a proto."""

from __future__ import annotations

import lzma
import os
from collections.abc import Iterable
from pathlib import Path

import onnx

from onnxcomp.errors import BadInputError, first_line

LZMA_PRESET = 6  # xz's default
_CHUNK = 1 << 22


def external_data_files(path: str | os.PathLike) -> list[Path]:
    """The external-data files an .onnx file refers to (resolved beside it), without loading them."""
    p = Path(path)
    try:
        model = onnx.load(str(p), load_external_data=False)
    except Exception as exc:
        raise BadInputError(f"{p}: not a readable ONNX model ({first_line(exc)})") from None
    files: dict[str, None] = {}
    for tensor in onnx.external_data_helper._get_all_tensors(model):
        if tensor.data_location == onnx.TensorProto.EXTERNAL:
            for entry in tensor.external_data:
                if entry.key == "location":
                    files[entry.value] = None
    return [p.parent / name for name in files]


def file_bytes(path: str | os.PathLike) -> int:
    """Bytes on disk: the .onnx file plus every external-data file it uses."""
    p = Path(path)
    if not p.is_file():
        raise BadInputError(f"{p}: no such file")
    total = p.stat().st_size
    for f in external_data_files(p):
        if not f.exists():
            raise BadInputError(f"{p}: external data file {f.name} is missing")
        total += f.stat().st_size
    return total


def _compressed_size(chunks: Iterable[bytes | memoryview], preset: int) -> int:
    comp = lzma.LZMACompressor(format=lzma.FORMAT_XZ, preset=preset)
    size = 0
    for chunk in chunks:
        size += len(comp.compress(chunk))
    size += len(comp.flush())
    return size


def _file_chunks(paths: Iterable[Path]) -> Iterable[bytes]:
    for f in paths:
        with open(f, "rb") as fh:
            while True:
                block = fh.read(_CHUNK)
                if not block:
                    break
                yield block


def lzma_bytes(model_or_path: onnx.ModelProto | str | os.PathLike, preset: int = LZMA_PRESET) -> int:
    """Size after xz/lzma compression at `preset`: of the files on disk for a path (protobuf and
    external data, streamed), or of the deterministic serialization for a ModelProto."""
    if isinstance(model_or_path, onnx.ModelProto):
        data = model_or_path.SerializeToString(deterministic=True)
        view = memoryview(data)
        return _compressed_size((view[i : i + _CHUNK] for i in range(0, len(view), _CHUNK)), preset)
    p = Path(model_or_path)
    if not p.is_file():
        raise BadInputError(f"{p}: no such file")
    return _compressed_size(_file_chunks([p, *external_data_files(p)]), preset)


_EXACT_BELOW = 64 * 2**20


def serialized_bytes(model: onnx.ModelProto) -> int:
    """Bytes of the model as one protobuf (weights inline): exact below 64 MB of tensor payload;
    above, the payloads plus the rest of the message, within a few bytes of framing per tensor (what
    the file and its external data hold), without serializing the weights (which needs a full
    transient copy, and fails past protobuf's 2 GB limit)."""
    from onnxcomp.model import _payload_bytes

    payload = _payload_bytes(model)
    if payload <= _EXACT_BELOW:
        return int(model.ByteSize())
    # ByteSize() serializes the whole message under upb: a transient copy of every weight
    from onnxcomp.shapes import weightless

    return payload + int(weightless(model, max_elements=0).ByteSize())
