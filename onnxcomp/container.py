"""`.onnxc` containers: a model's universally quantized weights as lossless-coded integer codes.

`pack(model)` stores every weight that `uquant` quantized (found through the model's metadata and
checked by re-quantizing it exactly) as its integer codes plus, when it has zeros, a bit mask; all
other tensors stay in the model skeleton. The whole body is coded by a standard lossless coder
(lzma from the standard library, or zstd from the `zstandard` package). `unpack` restores the
model's exact bytes (the deterministic serialization of the model as loaded, external data inline:
the input file itself when onnxcomp wrote it): the header carries their SHA-256, checked
before anything is written, so a damaged, truncated or foreign file is refused (BadInputError).

Layout: MAGIC (8 bytes) | header length (8 bytes, little endian) | header (JSON, UTF-8) | body
(coded). The decoded body is the skeleton (a ModelProto, the packed tensors' data emptied) followed by
each packed tensor's mask (numpy packbits, when it has zeros) and codes (little-endian int8/16/32).
"""

from __future__ import annotations

import hashlib
import json
import lzma
import struct
from dataclasses import dataclass

import numpy as np
import onnx
from onnx import numpy_helper

from onnxcomp.errors import BadInputError, first_line
from onnxcomp.linalg import uquant as uq

MAGIC = b"ONNXC\x00\x01\n"
FORMAT_VERSION = 1
CODERS = ("lzma", "zstd")


@dataclass
class PackStats:
    """What `pack` did: bytes of the model serialized and of the container, tensors packed as codes
    and left raw (with why), and the codes' entropy bound (bits) for comparison with the coder."""

    model_bytes: int
    packed_bytes: int
    coded_tensors: int
    raw_tensors: dict[str, str]
    entropy_bytes: int

    @property
    def ratio(self) -> float:
        return self.model_bytes / max(self.packed_bytes, 1)


# The codes are nearly independent small integers: what pays is the literal coder, not the match
# finder. Measured on 4-bit codes of zoo resnet18: preset 6 reaches 1.12x the codes' entropy at
# 0.9 MB/s; optimal parsing with a binary-tree-2 match finder and no literal context (lc=lp=pb=0)
# 1.09x at 4.5 MB/s. zstd level 9: 1.18x at 30 MB/s (level 19: 1.02x at 0.7 MB/s).
_LZMA_FILTERS = [{"id": lzma.FILTER_LZMA2, "preset": 6, "lc": 0, "lp": 0, "pb": 0, "mode": lzma.MODE_NORMAL,
                  "mf": lzma.MF_BT2, "nice_len": 64, "depth": 8}]


def _coder(name: str):
    if name == "lzma":
        return (lambda b: lzma.compress(b, format=lzma.FORMAT_XZ, filters=_LZMA_FILTERS)), lzma.decompress
    if name == "zstd":
        try:
            import zstandard
        except ImportError:
            raise BadInputError("coder zstd needs the zstandard package (pip install zstandard)") from None
        return (lambda b: zstandard.ZstdCompressor(level=9).compress(b)), (
            lambda b: zstandard.ZstdDecompressor().decompressobj().decompress(b))
    raise BadInputError(f"unknown coder {name!r}; expected one of {', '.join(CODERS)}")


def _code_dtype(codes: np.ndarray) -> np.dtype:
    lo, hi = (int(codes.min()), int(codes.max())) if codes.size else (0, 0)
    for dt in (np.int8, np.int16, np.int32):
        info = np.iinfo(dt)
        if info.min <= lo and hi <= info.max:
            return np.dtype(dt).newbyteorder("<")
    return np.dtype(np.int64).newbyteorder("<")


def _float_values(t: onnx.TensorProto) -> np.ndarray:
    return numpy_helper.to_array(t).astype(np.float32)


def pack(model: onnx.ModelProto, coder: str = "lzma") -> tuple[bytes, PackStats]:
    """The container for `model` and what went into it. BadInputError for a model with external
    data still on disk or over protobuf's 2 GB limit once serialized."""
    from onnxcomp.model import model_bytes
    from onnxcomp.passes.uquant import recorded_steps

    compress, _ = _coder(coder)
    if any(t.data_location == onnx.TensorProto.EXTERNAL for t in model.graph.initializer):
        raise BadInputError("pack: the model's external data is not loaded (load it with its data first)")
    try:
        original = model_bytes(model)
    except ValueError as exc:
        raise BadInputError(f"pack: the model does not serialize ({first_line(exc)}); models over 2 GB are not supported") from None
    steps = recorded_steps(model)
    skeleton = onnx.ModelProto()
    skeleton.CopyFrom(model)
    entries, chunks, raw = [], [], {}
    entropy_bits = 0.0
    for t in skeleton.graph.initializer:
        if t.name not in steps:
            continue
        step, seed = steps[t.name]
        if t.data_type != onnx.TensorProto.FLOAT:
            raw[t.name] = "not float32 any more"
            continue
        values = _float_values(t)
        if np.any((values == 0) & np.signbit(values)):  # -0.0 would come back as +0.0
            raw[t.name] = "holds -0.0 (changed after uquant)"
            continue
        codes = uq.codes_of(values, step, seed, t.name)
        if codes is None:
            raw[t.name] = "its values are no longer the recorded quantization (changed after uquant)"
            continue
        mask = values != 0
        dt = _code_dtype(codes)
        field = "raw_data" if t.HasField("raw_data") else "float_data"
        entry = {"name": t.name, "dims": list(t.dims), "step": step, "seed": seed, "codes": int(codes.size),
                 "code_dtype": dt.str, "mask": bool(codes.size != values.size), "field": field}
        if entry["mask"]:
            chunks.append(np.packbits(mask.reshape(-1)).tobytes())
        chunks.append(codes.astype(dt).tobytes())
        entries.append(entry)
        _, counts = np.unique(codes, return_counts=True)
        p = counts / codes.size if codes.size else counts
        entropy_bits += float(-(counts * np.log2(p)).sum()) if codes.size else 0.0
        t.ClearField("raw_data")
        t.ClearField("float_data")
    skel = skeleton.SerializeToString(deterministic=True)
    body = skel + b"".join(chunks)
    header = {"format": "onnxcomp-pack", "version": FORMAT_VERSION, "coder": coder, "skeleton_bytes": len(skel),
              "model_sha256": hashlib.sha256(original).hexdigest(), "body_sha256": hashlib.sha256(body).hexdigest(),
              "tensors": entries}
    head = json.dumps(header, sort_keys=True).encode()
    blob = MAGIC + struct.pack("<Q", len(head)) + head + compress(body)
    if unpack(blob) != original:  # never hand out a container that does not give the model back
        raise RuntimeError("pack: the container does not restore the model exactly")
    stats = PackStats(len(original), len(blob), len(entries), raw, int(np.ceil(entropy_bits / 8)))
    return blob, stats


def unpack(blob: bytes) -> bytes:
    """The exact model bytes a container holds; BadInputError naming the problem for anything else."""
    if len(blob) < len(MAGIC) + 8 or not blob.startswith(MAGIC):
        raise BadInputError("not an onnxcomp pack file (no .onnxc signature)")
    (n,) = struct.unpack("<Q", blob[len(MAGIC):len(MAGIC) + 8])
    start = len(MAGIC) + 8
    if n > len(blob) - start:
        raise BadInputError("damaged pack file: truncated header")
    try:
        header = json.loads(blob[start:start + n].decode())
        version, coder = header["version"], header["coder"]
        entries, skel_n = header["tensors"], int(header["skeleton_bytes"])
    except (ValueError, KeyError, TypeError, UnicodeDecodeError):
        raise BadInputError("damaged pack file: unreadable header") from None
    if header.get("format") != "onnxcomp-pack" or version != FORMAT_VERSION:
        raise BadInputError(f"unsupported pack file (format {header.get('format')!r} version {version!r})")
    _, decompress = _coder(str(coder))
    try:
        body = decompress(blob[start + n:])
    except Exception as exc:  # lzma.LZMAError, zstandard.ZstdError: a damaged stream
        raise BadInputError(f"damaged pack file: the {coder} stream does not decode ({first_line(exc, 80)})") from None
    if hashlib.sha256(body).hexdigest() != header.get("body_sha256"):
        raise BadInputError("damaged pack file: body checksum mismatch")
    try:
        model = onnx.ModelProto.FromString(body[:skel_n])
        by_name = {t.name: t for t in model.graph.initializer}
        pos = skel_n
        for e in entries:
            t = by_name[e["name"]]
            count = int(np.prod(e["dims"], dtype=np.int64))
            if e["mask"]:
                nbytes = (count + 7) // 8
                mask = np.unpackbits(np.frombuffer(body, np.uint8, nbytes, pos), count=count).astype(bool)
                pos += nbytes
            else:
                mask = np.ones(count, dtype=bool)
            dt = np.dtype(e["code_dtype"])
            codes = np.frombuffer(body, dt, int(e["codes"]), pos)
            pos += codes.nbytes
            values = uq.dequantize(codes, mask, float(e["step"]), int(e["seed"]), e["name"])
            if e["field"] == "raw_data":
                t.raw_data = values.astype("<f4").tobytes()
            else:
                t.float_data.extend(values.tolist())
    except (KeyError, ValueError, TypeError, IndexError) as exc:
        raise BadInputError(f"damaged pack file: {first_line(exc, 80)}") from None
    except Exception as exc:  # protobuf's DecodeError
        raise BadInputError(f"damaged pack file: the model skeleton does not parse ({first_line(exc, 80)})") from None
    restored = model.SerializeToString(deterministic=True)
    if hashlib.sha256(restored).hexdigest() != header.get("model_sha256"):
        raise BadInputError("damaged pack file: the restored model's checksum does not match")
    return restored
