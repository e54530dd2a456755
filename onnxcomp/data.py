"""Data sources for calibration and validation: one streaming interface over every kind of input.

`open_source(spec, model=...)` accepts:

* a ``.npz`` file: one array per model input (key = input name) with a leading sample axis, and an
  optional ``labels`` array (one integer class per sample). Arrays are read member by member,
  ``batch_size`` rows at a time, straight from the zip stream (compressed or not): the file is never
  loaded whole.
* a single ``.npy`` file: the samples of a single-input model (leading sample axis), memory-mapped.
* a folder of ``.npy`` / ``.npz`` files, in one of two layouts:

  - *per input*: every ``.npy`` is named after a model input (``x.npy``, ``mask.npy``, optionally
    ``labels.npy``) and holds all samples along its leading axis (memory-mapped);
  - *per sample*: any other names; files are taken in sorted name order. A ``.npy`` feeds the (single)
    model input; a ``.npz`` holds one array per input (and optionally ``labels``). An array with the
    input's rank holds several samples along its leading axis, one with one dimension less is a single
    sample. Labels of ``.npy`` sample files come from ``labels.npy`` in the same folder, in sample order.
* an image folder, as ``images:DIR?key=value&...`` or a plain folder that holds images (sidecar
  ``DIR/preprocess.json`` or ``DIR/preprocess.yaml`` with the same keys; the query wins). Keys:
  ``crop`` (center crop, ``224`` or ``224x192``; default: the model input's spatial size), ``size``
  (resize the shorter side to this first; default ``round(crop / 0.875)``), ``resize=shorter|exact``
  (``exact`` resizes straight to the crop size), ``mean`` / ``std`` (per channel, after dividing by
  ``scale``; default ImageNet), ``scale`` (default 255), ``bgr=0|1``, ``layout=nchw|nhwc`` (default:
  from the model input), ``input`` (which model input), ``labels=folders|none|FILE``. Images in
  sub-folders get the label of their sub-folder in sorted order (torchvision ImageFolder style); a
  ``labels.txt`` of ``relative/path label`` lines is used when present. Images are decoded a batch at a
  time with Pillow (imported only here).
* a dict ``{input name: array}`` (optionally ``labels``), an existing `DataSource`, or ``"random"``
  (``random?samples=16&seed=3``) for `random_source`.

Conventions: the leading dim of every model input is the sample axis. When the model declares it
symbolic, batches have ``batch_size`` samples (the last one may be shorter); when it is a fixed ``B``,
batches have exactly ``B`` samples and a remainder is dropped. Every source is checked against the
model's inputs (names, rank, fixed dims, dtype kind) when it is opened; a mismatch is a BadInputError
with a one-line message.
"""

from __future__ import annotations

import json
import math
import os
import re
import zipfile
from abc import ABC, abstractmethod
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from urllib.parse import parse_qsl

import numpy as np
import onnx

from onnxcomp.errors import BadInputError, first_line

Batch = tuple[dict[str, np.ndarray], "np.ndarray | None"]

LABELS_KEY = "labels"
IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".bmp", ".webp", ".tif", ".tiff", ".ppm", ".pgm")
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


# --------------------------------------------------------------------------------------------
# model inputs
# --------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class InputSpec:
    """A graph input that must be fed: name, numpy dtype and declared dims (int, symbol str or None)."""

    name: str
    dtype: np.dtype
    dims: tuple[int | str | None, ...] | None  # None: rank unknown

    @property
    def fixed_batch(self) -> int | None:
        """The leading dim when the model fixes it, else None (symbolic: any number of samples)."""
        if self.dims and isinstance(self.dims[0], int):
            return self.dims[0]
        return None


def model_inputs(model: onnx.ModelProto) -> list[InputSpec]:
    """The inputs a caller must feed (graph inputs that are not initializers), in graph order."""
    inits = {t.name for t in model.graph.initializer}
    out: list[InputSpec] = []
    for vi in model.graph.input:
        if vi.name in inits:
            continue
        tt = vi.type.tensor_type
        try:
            dtype = np.dtype(onnx.helper.tensor_dtype_to_np_dtype(tt.elem_type)) if tt.elem_type else np.dtype(np.float32)
        except Exception:
            dtype = np.dtype(np.float32)
        dims: tuple | None = None
        if tt.HasField("shape"):
            dims = tuple(
                d.dim_value if d.HasField("dim_value") and d.dim_value > 0 else (d.dim_param or None)
                for d in tt.shape.dim
            )
        out.append(InputSpec(vi.name, dtype, dims))
    return out


def _given_shape(spec: InputSpec, first: bool, input_shapes: dict[str, list[int]] | None) -> list[int] | None:
    shapes = input_shapes or {}
    if spec.name in shapes:
        return list(shapes[spec.name])
    if first and "" in shapes:
        return list(shapes[""])
    return None


def _check_input_shape_names(inputs: list[InputSpec], input_shapes: dict[str, list[int]] | None) -> None:
    names = {s.name for s in inputs}
    for key in input_shapes or {}:
        if key and key not in names:
            raise BadInputError(
                f"--input-shape names '{key}', but the model's inputs are: {', '.join(sorted(names)) or '(none)'}"
            )


# --------------------------------------------------------------------------------------------
# the interface
# --------------------------------------------------------------------------------------------
class DataSource(ABC):
    """A re-iterable stream of (feeds, labels) batches. Each `batches()` call starts over.

    Attributes: `input_names` (the keys of every feeds dict), `num_samples` (None if unknown),
    `has_labels`, `batch_size` (samples per batch; the last batch may be shorter) and `description`.
    """

    input_names: list[str]
    num_samples: int | None
    has_labels: bool
    batch_size: int
    description: str = "data"

    @abstractmethod
    def batches(self) -> Iterator[Batch]:
        """Yield ({input name: array with a leading sample axis}, labels (N,) int64 or None)."""

    def __iter__(self) -> Iterator[Batch]:
        return self.batches()

    def first_batch(self) -> Batch:
        """The first batch (BadInputError if the source is empty)."""
        for batch in self.batches():
            return batch
        raise BadInputError(f"{self.description}: no samples")

    def __repr__(self) -> str:
        n = "?" if self.num_samples is None else self.num_samples
        return f"<{type(self).__name__} {self.description}: {n} samples, inputs {self.input_names}>"


# --------------------------------------------------------------------------------------------
# columns: something that yields an input's rows in order
# --------------------------------------------------------------------------------------------
class _Column(ABC):
    shape: tuple[int, ...]
    dtype: np.dtype

    @abstractmethod
    def chunks(self, rows: int) -> Iterator[np.ndarray]:
        """Consecutive blocks of `rows` rows (the last may be shorter)."""


class _ArrayColumn(_Column):
    """An in-memory or memory-mapped array: rows are slices (copied only when the batch is built)."""

    def __init__(self, array: np.ndarray):
        self.array = array
        self.shape = tuple(array.shape)
        self.dtype = array.dtype

    def chunks(self, rows: int) -> Iterator[np.ndarray]:
        for start in range(0, self.shape[0], rows):
            yield np.asarray(self.array[start : start + rows])


class _NpzColumn(_Column):
    """One member of an .npz, read sequentially from the zip stream `rows` rows at a time."""

    def __init__(self, path: Path, member: str):
        self.path, self.member = path, member
        with zipfile.ZipFile(path) as zf, zf.open(member) as fh:
            shape, fortran, dtype = _read_npy_header(fh, f"{path}:{member}")
        self.shape, self.dtype, self.fortran = shape, dtype, fortran and len(shape) > 1

    def chunks(self, rows: int) -> Iterator[np.ndarray]:
        if self.fortran:  # column-major rows are not contiguous: the member has to be read whole
            with np.load(self.path, allow_pickle=False) as npz:
                yield from _ArrayColumn(npz[self.member[:-4]]).chunks(rows)
            return
        row_shape = self.shape[1:]
        row_bytes = int(math.prod(row_shape)) * self.dtype.itemsize
        with zipfile.ZipFile(self.path) as zf, zf.open(self.member) as fh:
            _read_npy_header(fh, self.member)
            left = self.shape[0]
            while left > 0:
                n = min(rows, left)
                buf = _read_exact(fh, n * row_bytes, f"{self.path}:{self.member}")
                yield np.frombuffer(buf, dtype=self.dtype).reshape((n, *row_shape))
                left -= n


def _read_npy_header(fh, where: str) -> tuple[tuple[int, ...], bool, np.dtype]:
    fmt = np.lib.format
    try:
        version = fmt.read_magic(fh)
        if version == (1, 0):
            shape, fortran, dtype = fmt.read_array_header_1_0(fh)
        else:
            shape, fortran, dtype = fmt.read_array_header_2_0(fh)
    except Exception as exc:
        raise BadInputError(f"{where}: not a readable .npy array ({first_line(exc)})") from None
    if dtype.hasobject:
        raise BadInputError(f"{where}: object arrays are not supported (save numeric arrays)")
    return tuple(int(d) for d in shape), bool(fortran), dtype


def _read_exact(fh, n: int, where: str) -> bytes:
    buf = fh.read(n)
    if len(buf) != n:
        raise BadInputError(f"{where}: truncated array data")
    return buf


# --------------------------------------------------------------------------------------------
# shared checks and batching
# --------------------------------------------------------------------------------------------
def _dtype_for(spec: InputSpec | None, data_dtype: np.dtype, what: str) -> np.dtype:
    """The dtype to feed: the model's, when the data's kind can be converted without meaning loss."""
    if spec is None:
        return np.dtype(data_dtype)
    want = spec.dtype
    if data_dtype == want:
        return want
    k_data, k_want = np.dtype(data_dtype).kind, want.kind
    ok = (
        (k_want in "fc" and k_data in "fiub")
        or (k_want in "iu" and k_data in "iub")
        or (k_want == "b" and k_data == "b")
    )
    if not ok:
        raise BadInputError(f"{what}: data dtype {np.dtype(data_dtype)} does not fit the model's {want} input")
    return want


def _check_rows(spec: InputSpec | None, row_shape: tuple[int, ...], what: str) -> None:
    """`row_shape` is one sample's shape; it must match the model input's dims after the first."""
    if spec is None or spec.dims is None:
        return
    want = spec.dims[1:]
    if len(spec.dims) == 0:
        raise BadInputError(f"{what}: the model input '{spec.name}' is a scalar; it cannot take a sample axis")
    if len(row_shape) != len(want):
        raise BadInputError(
            f"{what}: samples of shape {list(row_shape)} do not fit model input '{spec.name}' "
            f"{_dims_text(spec.dims)} (data needs a leading sample axis and rank {len(spec.dims)})"
        )
    for k, (have, need) in enumerate(zip(row_shape, want, strict=True)):
        if isinstance(need, int) and have != need:
            raise BadInputError(
                f"{what}: dim {k + 1} is {have} but model input '{spec.name}' {_dims_text(spec.dims)} needs {need}"
            )


def _dims_text(dims) -> str:
    return "[" + ",".join("?" if d is None else str(d) for d in dims) + "]"


def _match_names(have: list[str], inputs: list[InputSpec] | None, what: str) -> None:
    if inputs is None:
        return
    want = {s.name for s in inputs}
    missing = sorted(want - set(have))
    extra = sorted(set(have) - want)
    if missing or extra:
        parts = []
        if missing:
            parts.append(f"missing input(s) {', '.join(missing)}")
        if extra:
            parts.append(f"unknown name(s) {', '.join(extra)}")
        raise BadInputError(f"{what}: {'; '.join(parts)} (model inputs: {', '.join(sorted(want))})")


def _as_labels(arr: np.ndarray, what: str) -> np.ndarray:
    a = np.asarray(arr)
    if a.ndim == 2 and a.shape[1] == 1:
        a = a[:, 0]
    if a.ndim != 1:
        raise BadInputError(f"{what}: labels must be one integer per sample, got shape {list(a.shape)}")
    if a.dtype.kind not in "iub":
        if a.dtype.kind == "f" and a.size and np.all(np.isfinite(a)) and np.all(a == np.round(a)):
            return a.astype(np.int64)
        raise BadInputError(f"{what}: labels must be integers, got {a.dtype}")
    return a.astype(np.int64)


def _batch_plan(inputs: list[InputSpec] | None, batch_size: int) -> tuple[int, bool]:
    """(samples per batch, exact): a fixed leading dim in the model forces exact batches of it."""
    if batch_size < 1:
        raise BadInputError(f"batch size must be at least 1, got {batch_size}")
    fixed = {s.fixed_batch for s in inputs or [] if s.fixed_batch is not None}
    if len(fixed) > 1:
        raise BadInputError(f"model inputs fix different leading (batch) dims {sorted(fixed)}; cannot batch samples")
    if fixed:
        return fixed.pop(), True
    return batch_size, False


def _rebatch(
    chunks: Iterator[tuple[dict[str, np.ndarray], np.ndarray | None]],
    batch_size: int,
    exact: bool,
    limit: int | None,
    dtypes: dict[str, np.dtype],
    where: str | None = None,
) -> Iterator[Batch]:
    """Regroup chunks of any length into batches of `batch_size` samples, stopping at `limit`.
    With `where` (the source's description), a float input holding NaN or inf is a BadInputError
    naming the input and the first bad sample: calibration on such data proves and fits nothing."""
    pend: list[tuple[dict[str, np.ndarray], np.ndarray | None]] = []
    pending = 0
    emitted = 0
    cap = limit

    def flush(n: int) -> Batch:
        nonlocal pend, pending
        taken: list[tuple[dict[str, np.ndarray], np.ndarray | None]] = []
        need = n
        while need > 0:
            feeds, labels = pend[0]
            m = next(iter(feeds.values())).shape[0] if feeds else (0 if labels is None else len(labels))
            if m <= need:
                taken.append(pend.pop(0))
                need -= m
            else:
                taken.append(({k: v[:need] for k, v in feeds.items()}, None if labels is None else labels[:need]))
                pend[0] = ({k: v[need:] for k, v in feeds.items()}, None if labels is None else labels[need:])
                need = 0
        pending -= n
        names = list(taken[0][0])
        out = {
            k: np.ascontiguousarray(
                np.concatenate([t[0][k] for t in taken]) if len(taken) > 1 else taken[0][0][k], dtype=dtypes.get(k)
            )
            for k in names
        }
        labels = None
        if taken[0][1] is not None:
            labels = np.concatenate([t[1] for t in taken]).astype(np.int64)
        return out, labels

    def checked(batch: Batch) -> Batch:
        if where is not None:
            for name, v in batch[0].items():
                if v.dtype.kind in "fc" and not np.isfinite(v).all():
                    bad = ~np.isfinite(v.reshape(v.shape[0], -1)).all(axis=1) if v.ndim else np.array([True])
                    first = emitted - v.shape[0] + int(np.argmax(bad)) if v.ndim else 0
                    raise BadInputError(f"{where}: input '{name}' holds NaN or infinite values (first in sample "
                                        f"{first}, {int(bad.sum())} bad samples in its batch); give finite data")
        return batch

    for feeds, labels in chunks:
        m = next(iter(feeds.values())).shape[0]
        if cap is not None:
            m = min(m, cap - emitted - pending)
            if m <= 0:
                break
            feeds = {k: v[:m] for k, v in feeds.items()}
            labels = None if labels is None else labels[:m]
        if m == 0:
            continue
        pend.append((feeds, labels))
        pending += m
        while pending >= batch_size:
            emitted += batch_size
            yield checked(flush(batch_size))
        if cap is not None and emitted + pending >= cap:
            break
    if pending and not exact:
        emitted += pending
        yield checked(flush(pending))


def _capped(n: int | None, limit: int | None, batch: int, exact: bool) -> int | None:
    if n is None:
        return None
    if limit is not None:
        n = min(n, limit)
    if exact:
        n -= n % batch
    return n


# --------------------------------------------------------------------------------------------
# array sources (.npz, .npy, folder of .npy per input, dict)
# --------------------------------------------------------------------------------------------
class ArraySource(DataSource):
    """Columns of equal length (one per input, plus optional labels) batched row-wise."""

    def __init__(
        self,
        columns: dict[str, _Column],
        labels: _Column | None,
        *,
        inputs: list[InputSpec] | None,
        batch_size: int,
        limit: int | None,
        description: str,
    ):
        self.description = description
        _match_names(list(columns), inputs, description)
        if not columns:
            raise BadInputError(f"{description}: no input arrays")
        lengths = {name: col.shape[0] if col.shape else None for name, col in columns.items()}
        for name, n in lengths.items():
            if n is None:
                raise BadInputError(f"{description}: '{name}' is a scalar; arrays need a leading sample axis")
        if labels is not None:
            lengths[LABELS_KEY] = labels.shape[0] if labels.shape else None
        if len(set(lengths.values())) != 1:
            detail = ", ".join(f"{k}={v}" for k, v in lengths.items())
            raise BadInputError(f"{description}: arrays disagree on the number of samples ({detail})")
        specs = {s.name: s for s in inputs or []}
        self.dtypes = {}
        for name, col in columns.items():
            _check_rows(specs.get(name), col.shape[1:], f"{description}: '{name}'")
            self.dtypes[name] = _dtype_for(specs.get(name), col.dtype, f"{description}: '{name}'")
        if labels is not None:
            if len(labels.shape) not in (1, 2) or (len(labels.shape) == 2 and labels.shape[1] != 1):
                raise BadInputError(f"{description}: labels must be one integer per sample, got shape {list(labels.shape)}")
            if labels.dtype.kind not in "iubf":
                raise BadInputError(f"{description}: labels must be integers, got {labels.dtype}")
        self.columns = columns
        self.labels = labels
        self.input_names = list(columns)
        self.has_labels = labels is not None
        self.batch_size, self.exact = _batch_plan(inputs, batch_size)
        self.limit = limit
        self.num_samples = _capped(next(iter(lengths.values())), limit, self.batch_size, self.exact)

    def batches(self) -> Iterator[Batch]:
        return _rebatch(self._chunks(), self.batch_size, self.exact, self.num_samples, self.dtypes, self.description)

    def _chunks(self) -> Iterator[tuple[dict[str, np.ndarray], np.ndarray | None]]:
        iters = {name: col.chunks(self.batch_size) for name, col in self.columns.items()}
        lab = self.labels.chunks(self.batch_size) if self.labels is not None else None
        while True:
            try:
                feeds = {name: next(it) for name, it in iters.items()}
            except StopIteration:
                return
            labels = _as_labels(next(lab), self.description) if lab is not None else None
            yield feeds, labels


def _npz_source(path: Path, inputs, batch_size: int, limit: int | None) -> ArraySource:
    try:
        with zipfile.ZipFile(path) as zf:
            members = [m for m in zf.namelist() if m.endswith(".npy")]
    except (zipfile.BadZipFile, OSError) as exc:
        raise BadInputError(f"{path}: not a readable .npz file ({first_line(exc)})") from None
    columns: dict[str, _Column] = {}
    labels = None
    for m in members:
        key = m[:-4]
        if key == LABELS_KEY:
            labels = _NpzColumn(path, m)
        else:
            columns[key] = _NpzColumn(path, m)
    if inputs is not None and len(inputs) == 1 and len(columns) == 1 and inputs[0].name not in columns:
        # np.savez(path, arr) names the array arr_0: accept it for a single-input model.
        (only,) = columns
        if re.fullmatch(r"arr_\d+", only):
            columns = {inputs[0].name: columns[only]}
    return ArraySource(columns, labels, inputs=inputs, batch_size=batch_size, limit=limit, description=str(path))


def _load_npy(path: Path) -> np.ndarray:
    try:
        arr = np.load(path, mmap_mode="r", allow_pickle=False)
    except Exception as exc:
        raise BadInputError(f"{path}: not a readable .npy array ({first_line(exc)})") from None
    return arr


def _single_input(inputs: list[InputSpec] | None, what: str) -> str:
    if inputs is None:
        return "input"
    if len(inputs) != 1:
        names = ", ".join(s.name for s in inputs)
        raise BadInputError(f"{what}: a single array cannot feed a model with {len(inputs)} inputs ({names}); use .npz")
    return inputs[0].name


def _npy_dir_source(path: Path, inputs, batch_size: int, limit: int | None) -> DataSource:
    files = sorted(p for p in path.iterdir() if p.suffix in (".npy", ".npz") and p.is_file())
    names = {s.name for s in inputs} if inputs is not None else None
    npy = [p for p in files if p.suffix == ".npy"]
    per_input = (
        npy
        and len(npy) == len(files)
        and (names is None or all(p.stem in names or p.stem == LABELS_KEY for p in npy))
    )
    if per_input:
        columns: dict[str, _Column] = {p.stem: _ArrayColumn(_load_npy(p)) for p in npy if p.stem != LABELS_KEY}
        labels = _ArrayColumn(_load_npy(path / "labels.npy")) if (path / "labels.npy").exists() else None
        return ArraySource(columns, labels, inputs=inputs, batch_size=batch_size, limit=limit, description=str(path))
    return SampleFileSource(path, files, inputs=inputs, batch_size=batch_size, limit=limit)


class SampleFileSource(DataSource):
    """A folder of per-sample (or per-chunk) .npy / .npz files, in sorted name order."""

    def __init__(self, folder: Path, files: list[Path], *, inputs: list[InputSpec] | None, batch_size: int,
                 limit: int | None):
        self.description = str(folder)
        self.files = [f for f in files if f.name != "labels.npy"]
        if not self.files:
            raise BadInputError(f"{folder}: no .npy or .npz sample files")
        self.inputs = inputs
        specs = {s.name: s for s in inputs or []}
        single = _single_input(inputs, str(folder)) if any(f.suffix == ".npy" for f in self.files) else None
        self.counts: list[int] = []
        self.chunked: list[dict[str, bool]] = []  # per file, per input: holds a sample axis?
        self.dtypes: dict[str, np.dtype] = {}
        file_labels = False
        names: list[str] | None = None
        for f in self.files:
            if f.suffix == ".npy":
                heads = {single: _npy_file_header(f)}
            else:
                heads = _npz_headers(f)
            file_labels = file_labels or LABELS_KEY in heads
            heads.pop(LABELS_KEY, None)
            if names is None:
                names = list(heads)
                _match_names(names, inputs, str(f))
            elif set(heads) != set(names):
                raise BadInputError(f"{f}: holds {sorted(heads)}, but earlier files hold {sorted(names)}")
            count = None
            flags: dict[str, bool] = {}
            for name, (shape, dtype) in heads.items():
                spec = specs.get(name)
                rank = len(spec.dims) if spec is not None and spec.dims is not None else len(shape) + 1
                flags[name] = len(shape) == rank
                n, rows = (shape[0], shape[1:]) if flags[name] else (1, shape)
                _check_rows(spec, tuple(rows), f"{f}: '{name}'")
                self.dtypes[name] = _dtype_for(spec, dtype, f"{f}: '{name}'")
                if count is not None and n != count:
                    raise BadInputError(f"{f}: arrays disagree on the number of samples")
                count = n
            self.counts.append(int(count or 0))
            self.chunked.append(flags)
        self.input_names = list(names or [])
        self.labels_file = folder / "labels.npy" if (folder / "labels.npy").exists() else None
        total = sum(self.counts)
        if self.labels_file is not None:
            lab = _load_npy(self.labels_file)
            if lab.shape[:1] != (total,):
                raise BadInputError(f"{self.labels_file}: {lab.shape[0] if lab.ndim else 0} labels for {total} samples")
        self.file_labels = file_labels
        self.has_labels = self.labels_file is not None or file_labels
        self.batch_size, self.exact = _batch_plan(inputs, batch_size)
        self.num_samples = _capped(total, limit, self.batch_size, self.exact)

    def batches(self) -> Iterator[Batch]:
        return _rebatch(self._chunks(), self.batch_size, self.exact, self.num_samples, self.dtypes, self.description)

    def _chunks(self):
        all_labels = _as_labels(_load_npy(self.labels_file), str(self.labels_file)) if self.labels_file else None
        offset = 0
        for f, n, flags in zip(self.files, self.counts, self.chunked, strict=True):
            if f.suffix == ".npy":
                arrays = {self.input_names[0]: np.load(f, mmap_mode="r", allow_pickle=False)}
                labels = None
            else:
                with np.load(f, allow_pickle=False) as npz:
                    arrays = {k: npz[k] for k in npz.files}
                labels = arrays.pop(LABELS_KEY, None)
            feeds = {name: arr if flags[name] else arr[None] for name, arr in arrays.items()}
            if labels is not None:
                labels = _as_labels(np.atleast_1d(labels), str(f))
            elif all_labels is not None:
                labels = all_labels[offset : offset + n]
            elif self.file_labels:
                raise BadInputError(f"{f}: has no 'labels' while other sample files do")
            offset += n
            yield feeds, labels


def _npy_file_header(path: Path) -> tuple[tuple[int, ...], np.dtype]:
    arr = _load_npy(path)
    return tuple(arr.shape), arr.dtype


def _npz_headers(path: Path) -> dict[str, tuple[tuple[int, ...], np.dtype]]:
    out = {}
    try:
        with zipfile.ZipFile(path) as zf:
            for m in zf.namelist():
                if m.endswith(".npy"):
                    with zf.open(m) as fh:
                        shape, _, dtype = _read_npy_header(fh, f"{path}:{m}")
                    out[m[:-4]] = (shape, dtype)
    except (zipfile.BadZipFile, OSError) as exc:
        raise BadInputError(f"{path}: not a readable .npz file ({first_line(exc)})") from None
    return out


# --------------------------------------------------------------------------------------------
# random data
# --------------------------------------------------------------------------------------------
class RandomSource(DataSource):
    """Deterministic random feeds: float inputs ~ N(0, 1), integer inputs uniform in [0, 8),
    bool inputs fair coins. Batch k is drawn from seed (seed, k), so every pass over it is identical."""

    def __init__(self, shapes: dict[str, list[int]], dtypes: dict[str, np.dtype], samples: int, batch_size: int,
                 exact: bool, seed: int, scalar: set[str]):
        self.shapes, self.dtypes, self.seed = shapes, dtypes, seed
        self.scalar = scalar
        self.input_names = list(shapes)
        self.batch_size, self.exact = batch_size, exact
        self.num_samples = _capped(samples, None, batch_size, exact)
        self.has_labels = False
        self.description = f"random data (seed {seed})"

    def batches(self) -> Iterator[Batch]:
        left = self.num_samples or 0
        k = 0
        while left > 0:
            n = min(self.batch_size, left)
            rng = np.random.default_rng([self.seed, k])
            feeds = {}
            for name, shape in self.shapes.items():
                full = shape if name in self.scalar else [n, *shape]
                feeds[name] = _random_array(rng, full, self.dtypes[name])
            yield feeds, None
            left -= n
            k += 1


def _random_array(rng: np.random.Generator, shape, dtype: np.dtype) -> np.ndarray:
    if dtype.kind == "f":
        return rng.standard_normal(size=shape, dtype=np.float32).astype(dtype, copy=False)
    if dtype.kind in "iu":
        return rng.integers(0, 8, size=shape).astype(dtype)
    if dtype.kind == "b":
        return rng.random(size=shape) < 0.5
    if dtype.kind == "c":
        return (rng.standard_normal(size=shape) + 1j * rng.standard_normal(size=shape)).astype(dtype)
    raise BadInputError(f"random data: cannot make inputs of dtype {dtype}")


def random_source(
    model: onnx.ModelProto,
    input_shapes: dict[str, list[int]] | None = None,
    samples: int = 8,
    batch_size: int = 8,
    seed: int = 0,
) -> DataSource:
    """Random data for every model input, honouring dtypes.

    Dims after the first come from the model, or, where the model has a symbol, from
    `input_shapes[name]` (a full shape; its leading dim is ignored: batching sets it). A symbolic
    dim with no value given is a BadInputError naming the input and the dim.
    """
    if samples < 1:
        raise BadInputError(f"random data needs at least one sample, got {samples}")
    inputs = model_inputs(model)
    if not inputs:
        raise BadInputError("the model has no inputs to feed")
    _check_input_shape_names(inputs, input_shapes)
    shapes: dict[str, list[int]] = {}
    dtypes: dict[str, np.dtype] = {}
    scalar: set[str] = set()
    for k, spec in enumerate(inputs):
        given = _given_shape(spec, k == 0, input_shapes)
        if spec.dims is None:
            if given is None:
                raise BadInputError(f"input '{spec.name}' has no declared shape; give --input-shape {spec.name}:D0,D1,...")
            dims: list = list(given)
        else:
            dims = list(spec.dims)
            if given is not None and len(given) != len(dims):
                raise BadInputError(
                    f"--input-shape {spec.name}: {len(given)} dims given, the model input has {len(dims)} {_dims_text(dims)}"
                )
        if len(dims) == 0:
            shapes[spec.name], dtypes[spec.name] = [], spec.dtype
            scalar.add(spec.name)
            continue
        rest: list[int] = []
        for j, d in enumerate(dims[1:], start=1):
            g = given[j] if given is not None else None
            if isinstance(d, int):
                if g is not None and g != d:
                    raise BadInputError(f"--input-shape {spec.name}: dim {j} is {g} but the model fixes it to {d}")
                rest.append(d)
            elif g is not None:
                rest.append(int(g))
            else:
                sym = f"'{d}'" if d else "(unnamed)"
                raise BadInputError(
                    f"input '{spec.name}' dim {j} {sym} is symbolic; give its size with --input-shape "
                    f"{spec.name}:{','.join(str(x) if isinstance(x, int) else 'N' for x in dims)}"
                )
        if any(v <= 0 for v in rest):
            raise BadInputError(f"--input-shape {spec.name}: dims must be positive")
        shapes[spec.name] = rest
        dtypes[spec.name] = spec.dtype
    batch, exact = _batch_plan(inputs, batch_size)
    if exact and samples < batch:
        samples = batch
    return RandomSource(shapes, dtypes, samples, batch, exact, seed, scalar)


# --------------------------------------------------------------------------------------------
# image folders
# --------------------------------------------------------------------------------------------
@dataclass
class ImageSpec:
    """Preprocessing for an image folder (see the module docstring for the keys)."""

    crop: tuple[int, int] | None = None
    size: int | None = None
    resize: str = "shorter"
    mean: tuple[float, ...] = IMAGENET_MEAN
    std: tuple[float, ...] = IMAGENET_STD
    scale: float = 255.0
    bgr: bool = False
    layout: str | None = None
    input: str | None = None
    labels: str | None = None

    @classmethod
    def from_options(cls, opts: dict[str, str], where: str) -> ImageSpec:
        spec = cls()
        known = {"crop", "size", "resize", "mean", "std", "scale", "bgr", "layout", "input", "labels"}
        for key, raw in opts.items():
            if key not in known:
                raise BadInputError(f"{where}: unknown image option '{key}' (known: {', '.join(sorted(known))})")
            val = str(raw).strip()
            try:
                if key == "crop":
                    parts = [int(v) for v in re.split(r"[x,]", val) if v]
                    if len(parts) not in (1, 2) or min(parts) <= 0:
                        raise ValueError
                    spec.crop = (parts[0], parts[-1])
                elif key == "size":
                    spec.size = int(val)
                    if spec.size <= 0:
                        raise ValueError
                elif key == "resize":
                    if val not in ("shorter", "exact"):
                        raise ValueError
                    spec.resize = val
                elif key in ("mean", "std"):
                    vals = tuple(float(v) for v in val.split(",") if v.strip())
                    if not vals or (key == "std" and any(v == 0 for v in vals)):
                        raise ValueError
                    setattr(spec, key, vals)
                elif key == "scale":
                    spec.scale = float(val)
                    if spec.scale <= 0:
                        raise ValueError
                elif key == "bgr":
                    if val.lower() not in ("0", "1", "true", "false", "yes", "no"):
                        raise ValueError
                    spec.bgr = val.lower() in ("1", "true", "yes")
                elif key == "layout":
                    if val.lower() not in ("nchw", "nhwc"):
                        raise ValueError
                    spec.layout = val.lower()
                else:
                    setattr(spec, key, val)
            except ValueError:
                raise BadInputError(f"{where}: bad value for image option {key}={raw}") from None
        return spec


def _read_sidecar(folder: Path) -> dict[str, str]:
    for name in ("preprocess.json", "preprocess.yaml", "preprocess.yml"):
        p = folder / name
        if p.exists():
            try:
                if p.suffix == ".json":
                    doc = json.loads(p.read_text())
                else:
                    import yaml

                    doc = yaml.safe_load(p.read_text())
            except Exception as exc:
                raise BadInputError(f"{p}: cannot parse ({first_line(exc)})") from None
            if not isinstance(doc, dict):
                raise BadInputError(f"{p}: expected a mapping of preprocessing options")
            return {
                str(k): ",".join(str(x) for x in v) if isinstance(v, (list, tuple)) else str(v) for k, v in doc.items()
            }
    return {}


def _list_images(folder: Path) -> list[tuple[Path, str | None]]:
    """(image path, class folder name or None), sorted: top-level images, then one level of folders."""
    out: list[tuple[Path, str | None]] = []
    for p in sorted(folder.iterdir()):
        if p.is_file() and p.suffix.lower() in IMAGE_SUFFIXES:
            out.append((p, None))
    for d in sorted(p for p in folder.iterdir() if p.is_dir()):
        for p in sorted(d.iterdir()):
            if p.is_file() and p.suffix.lower() in IMAGE_SUFFIXES:
                out.append((p, d.name))
    return out


class ImageFolderSource(DataSource):
    """Images decoded and preprocessed a batch at a time (resize, center crop, scale, mean/std)."""

    def __init__(self, folder: Path, spec: ImageSpec, *, inputs: list[InputSpec] | None,
                 input_shapes: dict[str, list[int]] | None,
                 batch_size: int, limit: int | None):
        self.description = f"images:{folder}"
        self.folder, self.spec = folder, spec
        files = _list_images(folder)
        if not files:
            raise BadInputError(f"{folder}: no image files ({', '.join(IMAGE_SUFFIXES)})")
        target = None
        if inputs is not None:
            if spec.input is not None:
                match = [s for s in inputs if s.name == spec.input]
                if not match:
                    raise BadInputError(f"{self.description}: input={spec.input} is not a model input")
                target = match[0]
            elif len(inputs) == 1:
                target = inputs[0]
            else:
                raise BadInputError(f"{self.description}: the model has {len(inputs)} inputs; say which with input=NAME")
        name = target.name if target is not None else (spec.input or "input")
        dims = list(target.dims) if target is not None and target.dims is not None else None
        given = _given_shape(target, True, input_shapes) if target is not None else None
        if given is not None and dims is not None and len(given) == len(dims):
            dims = [d if isinstance(d, int) else g for d, g in zip(dims, given, strict=True)]
        if dims is not None and len(dims) != 4:
            raise BadInputError(f"{self.description}: model input '{name}' {_dims_text(dims)} is not a 4-D image batch")
        layout = spec.layout
        if layout is None:
            layout = "nhwc" if dims is not None and dims[3] in (1, 3) and dims[1] not in (1, 3) else "nchw"
        channels = None
        hw: tuple[int | None, int | None] = (None, None)
        if dims is not None:
            c_dim, h_dim, w_dim = (dims[1], dims[2], dims[3]) if layout == "nchw" else (dims[3], dims[1], dims[2])
            channels = c_dim if isinstance(c_dim, int) else None
            hw = (h_dim if isinstance(h_dim, int) else None, w_dim if isinstance(w_dim, int) else None)
        crop = spec.crop
        if crop is None:
            if hw[0] is None or hw[1] is None:
                raise BadInputError(
                    f"{self.description}: model input '{name}' has symbolic height/width; give crop=HxW (or --input-shape)"
                )
            crop = (hw[0], hw[1])
        elif hw[0] is not None and hw[1] is not None and tuple(crop) != hw:
            raise BadInputError(f"{self.description}: crop={crop[0]}x{crop[1]} but model input '{name}' needs {hw[0]}x{hw[1]}")
        self.crop = crop
        self.size = spec.size if spec.size is not None else int(round(max(crop) / 0.875))
        self.channels = channels if channels is not None else 3
        if self.channels not in (1, 3):
            raise BadInputError(f"{self.description}: model input '{name}' has {self.channels} channels; images give 1 or 3")
        for key in ("mean", "std"):
            vals = getattr(spec, key)
            if len(vals) not in (1, self.channels):
                raise BadInputError(f"{self.description}: {key} has {len(vals)} values for {self.channels} channels")
        self.layout = layout
        self.dtype = target.dtype if target is not None else np.dtype(np.float32)
        if self.dtype.kind not in "fu":
            raise BadInputError(f"{self.description}: model input '{name}' has dtype {self.dtype}; images feed float or uint8")
        self.input_names = [name]
        self.labels_of = self._labels(files)
        self.files = [p for p, _ in files]
        self.has_labels = self.labels_of is not None
        self.batch_size, self.exact = _batch_plan(inputs, batch_size)
        self.num_samples = _capped(len(self.files), limit, self.batch_size, self.exact)
        _pillow(self.description)

    def _labels(self, files: list[tuple[Path, str | None]]) -> list[int] | None:
        mode = self.spec.labels
        txt = self.folder / "labels.txt"
        if mode is None:
            mode = "labels.txt" if txt.exists() else ("folders" if any(c is not None for _, c in files) else "none")
        if mode == "none":
            return None
        if mode == "folders":
            if any(c is None for _, c in files):
                raise BadInputError(f"{self.description}: labels=folders but some images are not in a class folder")
            classes = sorted({c for _, c in files if c is not None})
            index = {c: i for i, c in enumerate(classes)}
            return [index[c] for _, c in files if c is not None]
        path = Path(mode) if Path(mode).is_absolute() else self.folder / mode
        if not path.exists():
            raise BadInputError(f"{self.description}: labels file {path} does not exist")
        table: dict[str, int] = {}
        for k, line in enumerate(path.read_text().splitlines(), start=1):
            if not line.strip() or line.lstrip().startswith("#"):
                continue
            parts = line.rsplit(None, 1)
            try:
                table[parts[0].strip()] = int(parts[1])
            except (IndexError, ValueError):
                raise BadInputError(f"{path}:{k}: expected 'relative/path label'") from None
        out = []
        for p, _ in files:
            rel = p.relative_to(self.folder).as_posix()
            if rel not in table and p.name not in table:
                raise BadInputError(f"{path}: no label for {rel}")
            out.append(table.get(rel, table.get(p.name)))
        return out

    def batches(self) -> Iterator[Batch]:
        n = self.num_samples or 0
        for start in range(0, n, self.batch_size):
            stop = min(start + self.batch_size, n)
            arrays = [self.load(self.files[i]) for i in range(start, stop)]
            feeds = {self.input_names[0]: np.stack(arrays)}
            labels = np.asarray(self.labels_of[start:stop], dtype=np.int64) if self.labels_of is not None else None
            yield feeds, labels

    def load(self, path: Path) -> np.ndarray:
        """One preprocessed image as (C, H, W) or (H, W, C) in the model input's dtype."""
        image_mod = _pillow(self.description)
        try:
            with image_mod.open(path) as im:
                im = im.convert("RGB" if self.channels == 3 else "L")
                ch, cw = self.crop
                if self.spec.resize == "exact":
                    im = im.resize((cw, ch), image_mod.BILINEAR)
                else:
                    w, h = im.size
                    s = self.size / min(w, h)
                    nw, nh = max(cw, int(round(w * s))), max(ch, int(round(h * s)))
                    im = im.resize((nw, nh), image_mod.BILINEAR)
                    left, top = (nw - cw) // 2, (nh - ch) // 2
                    im = im.crop((left, top, left + cw, top + ch))
                arr = np.asarray(im, dtype=np.uint8)
        except OSError as exc:
            raise BadInputError(f"{path}: cannot decode image ({first_line(exc)})") from None
        if arr.ndim == 2:
            arr = arr[:, :, None]
        if self.spec.bgr and self.channels == 3:
            arr = arr[:, :, ::-1]
        if self.dtype.kind == "f":
            x = arr.astype(np.float32) / np.float32(self.spec.scale)
            mean = np.asarray(self.spec.mean[::-1] if self.spec.bgr and len(self.spec.mean) == 3 else self.spec.mean, np.float32)
            std = np.asarray(self.spec.std[::-1] if self.spec.bgr and len(self.spec.std) == 3 else self.spec.std, np.float32)
            x = ((x - mean) / std).astype(self.dtype)
        else:
            x = arr.astype(self.dtype)
        if self.layout == "nchw":
            x = np.transpose(x, (2, 0, 1))
        return np.ascontiguousarray(x)


def _pillow(where: str):
    try:
        from PIL import Image
    except ImportError:
        raise BadInputError(f"{where}: image folders need Pillow (pip install pillow)") from None
    return Image


# --------------------------------------------------------------------------------------------
# entry point
# --------------------------------------------------------------------------------------------
def open_source(
    spec: Any,
    model: onnx.ModelProto | None = None,
    input_shapes: dict[str, list[int]] | None = None,
    batch_size: int = 8,
    limit: int | None = None,
) -> DataSource:
    """A DataSource for `spec` (see the module docstring), checked against `model`'s inputs when given.

    `limit` caps the number of samples; `batch_size` is the number of samples per batch unless the
    model fixes its leading dim.
    """
    if limit is not None and limit < 1:
        raise BadInputError(f"sample limit must be at least 1, got {limit}")
    inputs = model_inputs(model) if model is not None else None
    if inputs is not None:
        _check_input_shape_names(inputs, input_shapes)
    if isinstance(spec, DataSource):
        if inputs is not None:
            _match_names(spec.input_names, inputs, spec.description)
        return spec
    if isinstance(spec, dict):
        arrays = {str(k): np.asarray(v) for k, v in spec.items()}
        labels = arrays.pop(LABELS_KEY, None)
        if inputs is not None and len(inputs) == 1 and len(arrays) == 1 and inputs[0].name not in arrays:
            raise BadInputError(f"data: key '{next(iter(arrays))}' is not the model input '{inputs[0].name}'")
        columns: dict[str, _Column] = {k: _ArrayColumn(v) for k, v in arrays.items()}
        return ArraySource(columns, _ArrayColumn(labels) if labels is not None else None, inputs=inputs,
                           batch_size=batch_size, limit=limit, description="data")
    if isinstance(spec, np.ndarray):
        name = _single_input(inputs, "data")
        return ArraySource({name: _ArrayColumn(spec)}, None, inputs=inputs, batch_size=batch_size, limit=limit,
                           description="data")
    if spec is None:
        spec = "random"
    if not isinstance(spec, (str, os.PathLike)):
        raise BadInputError(f"data: cannot read {type(spec).__name__}; give a path, a dict of arrays or 'random'")
    text = os.fspath(spec)
    head, _, query = text.partition("?")
    if head == "random":
        if model is None:
            raise BadInputError("random data needs the model (to know its inputs)")
        opts = _query(query, "random")
        unknown = set(opts) - {"samples", "seed", "batch"}
        if unknown:
            raise BadInputError(f"random: unknown option(s) {', '.join(sorted(unknown))} (known: samples, seed, batch)")
        try:
            samples = int(opts.get("samples", limit or 8))
            seed = int(opts.get("seed", 0))
            bs = int(opts.get("batch", batch_size))
        except ValueError:
            raise BadInputError(f"random: options must be integers ({query})") from None
        return random_source(model, input_shapes, samples=samples, batch_size=bs, seed=seed)
    if head.startswith("images:"):
        folder = Path(head[len("images:"):])
        if not folder.is_dir():
            raise BadInputError(f"{folder}: image folder does not exist")
        opts = {**_read_sidecar(folder), **_query(query, text)}
        return ImageFolderSource(folder, ImageSpec.from_options(opts, text), inputs=inputs, input_shapes=input_shapes,
                                 batch_size=batch_size, limit=limit)
    path = Path(text)
    if not path.exists():
        raise BadInputError(f"{path}: no such data file or folder")
    if path.is_dir():
        entries = list(path.iterdir())
        if any(p.suffix in (".npy", ".npz") for p in entries if p.is_file()):
            if query:
                raise BadInputError(f"{text}: options after '?' apply to image folders only")
            return _npy_dir_source(path, inputs, batch_size, limit)
        if _list_images(path):
            opts = {**_read_sidecar(path), **_query(query, text)}
            return ImageFolderSource(path, ImageSpec.from_options(opts, text), inputs=inputs,
                                     input_shapes=input_shapes, batch_size=batch_size, limit=limit)
        raise BadInputError(f"{path}: folder holds no .npy, .npz or image files")
    if path.suffix == ".npz":
        return _npz_source(path, inputs, batch_size, limit)
    if path.suffix == ".npy":
        name = _single_input(inputs, str(path))
        return ArraySource({name: _ArrayColumn(_load_npy(path))}, None, inputs=inputs, batch_size=batch_size,
                           limit=limit, description=str(path))
    raise BadInputError(f"{path}: unknown data format (expected .npz, .npy, a folder, images:DIR or random)")


def _query(query: str, where: str) -> dict[str, str]:
    if not query:
        return {}
    try:
        pairs = parse_qsl(query, keep_blank_values=True, strict_parsing=True)
    except ValueError:
        raise BadInputError(f"{where}: cannot parse options '{query}' (expected key=value&key=value)") from None
    return dict(pairs)


# --------------------------------------------------------------------------------------------
# held-out split (the guard checks on samples the passes never fitted on)
# --------------------------------------------------------------------------------------------
HOLDOUT_FRACTION_EIGHTHS = 2  # 2/8: a quarter of the samples is held out
HOLDOUT_CAP = 256  # at most this many held-out samples (the rest calibrate)


def _held_mask(start: int, n: int) -> np.ndarray:
    """Which of samples start..start+n-1 are held out: Fibonacci hashing of the sample index, so the
    choice is deterministic, independent of batching, and unbiased on data ordered by class (an
    every-4th rule keeps only odd classes of a 62-class round-robin set)."""
    idx = np.arange(start + 1, start + n + 1, dtype=np.uint64)
    with np.errstate(over="ignore"):
        h = idx * np.uint64(0x9E3779B97F4A7C15)
    return (h >> np.uint64(61)) < HOLDOUT_FRACTION_EIGHTHS


def held_out_mask(n: int, cap: int = HOLDOUT_CAP) -> np.ndarray:
    """Which of `n` samples (in order) `holdout_split` holds out: the same rows whatever the batching."""
    held = _held_mask(0, n)
    return held & (np.cumsum(held) <= cap)


class SubsetSource(DataSource):
    """One side of a held-out split of `parent`: `held=True` yields the held-out samples (at most
    `cap`), `held=False` every other sample. Both sides together are the parent, each sample once."""

    def __init__(self, parent: DataSource, held: bool, cap: int = HOLDOUT_CAP):
        self.parent, self.held, self.cap = parent, held, cap
        self.input_names = list(parent.input_names)
        self.has_labels = parent.has_labels
        self.batch_size = parent.batch_size
        self.exact = bool(getattr(parent, "exact", False))
        self.dtypes: dict[str, np.dtype] = {}
        what = f"held-out samples (up to {cap})" if held else "calibration samples (held-out ones excluded)"
        self.description = f"{parent.description}, {what}"
        self.num_samples = None
        if parent.num_samples is not None:
            n = int(np.count_nonzero(self._select(0, parent.num_samples, 0)[0]))
            if self.exact:
                n -= n % self.batch_size
            self.num_samples = n

    def _select(self, start: int, n: int, held_before: int) -> tuple[np.ndarray, int]:
        """(rows of samples start..start+n-1 this side takes, held-out samples among them before the cap)."""
        held = _held_mask(start, n)
        count = int(np.count_nonzero(held))
        held &= np.cumsum(held) + held_before <= self.cap
        return (held if self.held else ~held), count

    def _chunks(self) -> Iterator[tuple[dict[str, np.ndarray], np.ndarray | None]]:
        start = held_seen = 0
        for feeds, labels in self.parent.batches():
            n = int(next(iter(feeds.values())).shape[0])
            for name, v in feeds.items():
                if v.ndim == 0 or v.shape[0] != n:
                    raise BadInputError(f"{self.parent.description}: input '{name}' has no sample axis to hold samples out of")
            take, held = self._select(start, n, held_seen)
            held_seen += held
            start += n
            if take.any():
                yield {k: v[take] for k, v in feeds.items()}, None if labels is None else labels[take]

    def batches(self) -> Iterator[Batch]:
        return _rebatch(self._chunks(), self.batch_size, self.exact, self.num_samples, self.dtypes)


def holdout_split(source: DataSource, cap: int = HOLDOUT_CAP) -> tuple[DataSource, DataSource]:
    """(calibration part, held-out part) of `source`: a quarter of its samples, at most `cap`, are
    held out (see `_held_mask`)."""
    return SubsetSource(source, held=False, cap=cap), SubsetSource(source, held=True, cap=cap)
