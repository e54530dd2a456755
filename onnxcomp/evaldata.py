"""Deterministic evaluation data with real labels, generated on the fly (no torch, no download).

Two families:

* **Glyphs** (`glyph_dataset`): 62 classes ``0-9A-Za-z`` (class k is ``GLYPH_CLASSES[k]``), one
  grey-scale glyph per image (white ink on a dark background, values in [0, 1], NCHW float32),
  rendered from the fonts that ship inside matplotlib (DejaVu Sans / Sans Mono / Serif, STIX General,
  Computer Modern; ``GLYPH_FONTS``) with a random affine (rotation, scale, aspect, shear, shift), random
  contrast and pixel noise. Glyphs sit on a fixed baseline at a fixed cap height, so upper and lower
  case differ by size and position as in real text. Splits ``train`` / ``calib`` / ``test`` draw from
  independent random streams over the same fonts (the test split measures generalisation to new
  renderings, not to unseen typefaces). ``task="digits"`` keeps classes 0-9 only (the *specialized
  task* for value-locality trimming); labels stay in the 62-class space and a model's prediction is
  the argmax over all 62 logits (`accuracy`).
* **PP-OCR text-line orientation** (`ppocr_cls_dataset`): text lines (words, numbers, codes) rendered
  dark on light in several fonts and sizes, half of them rotated 180 degrees (label 1, else 0),
  preprocessed exactly as rapidocr-onnxruntime feeds its ``ch_ppocr_mobile_v2.0_cls`` model.

Determinism: outlines are rasterised here in numpy (scan-line, non-zero winding, supersampled), with
random numbers taken from the raw PCG64 bit stream and only elementwise IEEE arithmetic (no BLAS, no
libm), so the same call gives the same bytes on any machine with the same font files. Sample ``i`` of
a split depends only on (seed, split, task, size, i): asking for fewer samples returns a prefix.
"""

from __future__ import annotations

import functools
import importlib.util
import io
import math
import os
import tempfile
import zipfile
from collections.abc import Sequence
from pathlib import Path

import numpy as np

from onnxcomp.errors import BadInputError
from onnxcomp.model import default_file_mode

GLYPH_CLASSES = "0123456789ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz"
NUM_GLYPH_CLASSES = len(GLYPH_CLASSES)
DIGIT_CLASSES = tuple(range(10))

# Files under matplotlib's mpl-data/fonts/ttf (present in every matplotlib wheel since 2.0).
GLYPH_FONTS: tuple[str, ...] = (
    "DejaVuSans.ttf",
    "DejaVuSans-Bold.ttf",
    "DejaVuSans-Oblique.ttf",
    "DejaVuSans-BoldOblique.ttf",
    "DejaVuSansMono.ttf",
    "DejaVuSansMono-Bold.ttf",
    "DejaVuSerif.ttf",
    "DejaVuSerif-Bold.ttf",
    "DejaVuSerif-Italic.ttf",
    "DejaVuSerif-BoldItalic.ttf",
    "STIXGeneral.ttf",
    "STIXGeneralBol.ttf",
    "STIXGeneralItalic.ttf",
    "STIXGeneralBolIta.ttf",
    "cmr10.ttf",
    "cmb10.ttf",
    "cmss10.ttf",
    "cmtt10.ttf",
    "cmti10.ttf",
)

SPLITS = ("train", "calib", "test")
TASKS = ("all", "digits")
# Default sample counts per (split, task): balanced, class k at positions i with i % n_classes == k.
DEFAULT_N = {
    ("train", "all"): 62 * 600,
    ("calib", "all"): 62 * 8,
    ("test", "all"): 62 * 100,
    ("train", "digits"): 10 * 600,
    ("calib", "digits"): 10 * 20,
    ("test", "digits"): 10 * 100,
}

PPOCR_REC_SHAPE = (3, 48, 320)
PPOCR_CLS_SHAPE = (3, 48, 192)  # rapidocr config.yaml: Cls.cls_image_shape
PPOCR_CLS_LABELS = ("0", "180")  # rapidocr config.yaml: Cls.label_list

_SPLIT_CODE = {"train": 1, "calib": 2, "test": 3}
_TASK_CODE = {"all": 0, "digits": 1}
_SUPERSAMPLE = 4  # sub-samples per pixel side; coverage has 17 levels before noise
_CURVE_STEPS = 6  # line segments per quadratic / cubic Bezier piece


# ----------------------------------------------------------------------------------------------
# random numbers: raw PCG64 bits only (the one stream numpy guarantees stable across versions)


class _Stream:
    """Uniform doubles from PCG64's raw 64-bit output; identical on every platform and numpy."""

    def __init__(self, *key: int):
        self._bits = np.random.PCG64(np.random.SeedSequence([int(k) & 0xFFFFFFFF for k in key]))

    def uniform(self, shape: int | tuple[int, ...]) -> np.ndarray:
        count = int(np.prod(shape))
        raw = self._bits.random_raw(count)
        return ((raw >> np.uint64(11)).astype(np.float64) * (1.0 / 9007199254740992.0)).reshape(shape)


def _lerp(u: np.ndarray, lo: float, hi: float) -> np.ndarray:
    return lo + (hi - lo) * u


# ----------------------------------------------------------------------------------------------
# fonts -> flattened outlines (segments in font units, y up)


def font_dir() -> Path:
    """Folder of the TrueType fonts bundled with matplotlib (found without importing matplotlib)."""
    spec = importlib.util.find_spec("matplotlib")
    if spec is None or not spec.submodule_search_locations:
        raise BadInputError("evaluation data needs matplotlib's bundled fonts: pip install 'onnxcomp[eval]'")
    path = Path(next(iter(spec.submodule_search_locations))) / "mpl-data" / "fonts" / "ttf"
    if not path.is_dir():
        raise BadInputError(f"matplotlib has no font folder at {path}")
    return path


def _flatten_pen_class():
    from fontTools.pens.basePen import BasePen

    class FlattenPen(BasePen):
        """Collects a glyph outline as straight segments (x0, y0, x1, y1)."""

        def __init__(self, glyph_set):
            super().__init__(glyph_set)
            self.segments: list[tuple[float, float, float, float]] = []
            self._start = None

        def _moveTo(self, pt):
            self._start = pt

        def _lineTo(self, pt):
            x0, y0 = self._getCurrentPoint()
            self.segments.append((x0, y0, pt[0], pt[1]))

        def _qCurveToOne(self, pt1, pt2):
            x0, y0 = self._getCurrentPoint()
            px, py = x0, y0
            for j in range(1, _CURVE_STEPS + 1):
                t = j / _CURVE_STEPS
                a, b, c = (1 - t) * (1 - t), 2 * (1 - t) * t, t * t
                qx = a * x0 + b * pt1[0] + c * pt2[0]
                qy = a * y0 + b * pt1[1] + c * pt2[1]
                self.segments.append((px, py, qx, qy))
                px, py = qx, qy

        def _curveToOne(self, pt1, pt2, pt3):
            x0, y0 = self._getCurrentPoint()
            px, py = x0, y0
            for j in range(1, _CURVE_STEPS + 1):
                t = j / _CURVE_STEPS
                s = 1 - t
                a, b, c, d = s * s * s, 3 * s * s * t, 3 * s * t * t, t * t * t
                qx = a * x0 + b * pt1[0] + c * pt2[0] + d * pt3[0]
                qy = a * y0 + b * pt1[1] + c * pt2[1] + d * pt3[1]
                self.segments.append((px, py, qx, qy))
                px, py = qx, qy

        def _closePath(self):
            cur = self._getCurrentPoint()
            if cur is not None and self._start is not None and tuple(cur) != tuple(self._start):
                self.segments.append((cur[0], cur[1], self._start[0], self._start[1]))

        _endPath = _closePath  # a fill treats open contours as closed

    return FlattenPen


class _Font:
    """Flattened outlines, advances and cap height of one font file."""

    def __init__(self, path: Path):
        try:
            from fontTools.ttLib import TTFont
        except ImportError:
            raise BadInputError("evaluation data needs fontTools: pip install 'onnxcomp[eval]'") from None
        import logging

        logging.getLogger("fontTools").setLevel(logging.ERROR)  # cm fonts carry odd timestamps
        self.name = path.name
        self._tt = TTFont(str(path), lazy=True)
        self._glyph_set = self._tt.getGlyphSet()
        self._cmap = self._tt.getBestCmap()
        self.units_per_em = float(self._tt["head"].unitsPerEm)
        self._hmtx = self._tt["hmtx"]
        self._pen = _flatten_pen_class()
        self._cache: dict[str, np.ndarray] = {}
        h = self.outline("H")
        self.cap_height = float(max(h[:, 1].max(), h[:, 3].max()))

    def has(self, ch: str) -> bool:
        return ord(ch) in self._cmap

    def outline(self, ch: str) -> np.ndarray:
        """(E, 4) float64 segments x0, y0, x1, y1 in font units (y up)."""
        seg = self._cache.get(ch)
        if seg is None:
            pen = self._pen(self._glyph_set)
            self._glyph_set[self._cmap[ord(ch)]].draw(pen)
            seg = np.asarray(pen.segments, dtype=np.float64).reshape(-1, 4)
            self._cache[ch] = seg
        return seg

    def advance(self, ch: str) -> float:
        if ch == " " and not self.has(" "):
            return 0.3 * self.units_per_em
        return float(self._hmtx[self._cmap[ord(ch)]][0])


@functools.cache
def _font(name: str) -> _Font:
    path = font_dir() / name
    if not path.is_file():
        raise BadInputError(f"font {name} not found in {path.parent}")
    return _Font(path)


# ----------------------------------------------------------------------------------------------
# rasteriser


def rasterize(segments: np.ndarray, owner: np.ndarray, n_images: int, height: int, width: int,
              supersample: int = _SUPERSAMPLE) -> np.ndarray:
    """Fill closed outlines with the non-zero winding rule; return coverage (n, height, width) in [0, 1].

    ``segments`` is (E, 4) float64 ``x0, y0, x1, y1`` in pixel units (x right, y down, pixel (r, c)
    spans [c, c+1) x [r, r+1)); ``owner[e]`` is the image segment e belongs to. Each pixel is sampled
    on a ``supersample`` x ``supersample`` grid. Only elementwise arithmetic: bit-reproducible.
    """
    ss = int(supersample)
    rows, cols = height * ss, width * ss
    out = np.zeros((n_images, height, width), dtype=np.float64)
    if len(segments) == 0 or n_images == 0:
        return out
    x0, y0, x1, y1 = (segments[:, k] * ss for k in range(4))
    keep = y0 != y1
    x0, y0, x1, y1, owner = x0[keep], y0[keep], x1[keep], y1[keep], np.asarray(owner)[keep]
    ylo, yhi = np.minimum(y0, y1), np.maximum(y0, y1)
    # sample row r (centre r + 0.5) is crossed when ylo <= r + 0.5 < yhi
    r_lo = np.clip(np.ceil(ylo - 0.5), 0, rows).astype(np.int64)
    r_hi = np.clip(np.ceil(yhi - 0.5), 0, rows).astype(np.int64)
    count = r_hi - r_lo
    edge = np.repeat(np.arange(len(count)), count)
    first = np.cumsum(count) - count
    r = r_lo[edge] + (np.arange(len(edge)) - first[edge])
    yc = r + 0.5
    xc = x0[edge] + (yc - y0[edge]) * ((x1[edge] - x0[edge]) / (y1[edge] - y0[edge]))
    # the crossing changes the winding of sample columns c with c + 0.5 > xc
    k = np.clip(np.ceil(xc - 0.5), 0, cols).astype(np.int64)
    direction = np.where(y1 > y0, 1.0, -1.0)[edge]
    flat = (owner[edge].astype(np.int64) * rows + r) * (cols + 1) + k
    diff = np.bincount(flat, weights=direction, minlength=n_images * rows * (cols + 1))
    winding = np.cumsum(diff.reshape(n_images, rows, cols + 1)[:, :, :cols], axis=2)
    inside = (winding != 0).reshape(n_images, height, ss, width, ss)
    return inside.sum(axis=(2, 4), dtype=np.int64) / float(ss * ss)


def _affine(seg: np.ndarray, m: np.ndarray) -> np.ndarray:
    """Apply per-segment 2x3 matrices m (E, 6: a, b, c, d, e, f; x' = a x + b y + c, y' = d x + e y + f)."""
    a, b, c, d, e, f = (m[:, i] for i in range(6))
    out = np.empty_like(seg)
    for j in (0, 2):
        x, y = seg[:, j], seg[:, j + 1]
        out[:, j] = a * x + b * y + c
        out[:, j + 1] = d * x + e * y + f
    return out


def _rotation(u: np.ndarray, max_deg: float) -> tuple[np.ndarray, np.ndarray]:
    """cos, sin of a random angle in [-max_deg, max_deg] via t = tan(angle / 2): no libm per sample."""
    t = _lerp(u, -math.tan(math.radians(max_deg) / 2), math.tan(math.radians(max_deg) / 2))
    den = 1.0 + t * t
    return (1.0 - t * t) / den, (2.0 * t) / den


# ----------------------------------------------------------------------------------------------
# glyphs

_GLYPH_PARAMS = 11  # uniforms per glyph sample


def _check_choice(value: str, allowed: Sequence[str], what: str) -> None:
    if value not in allowed:
        raise BadInputError(f"unknown {what} {value!r}: expected one of {', '.join(allowed)}")


def glyph_classes(task: str = "all") -> tuple[int, ...]:
    """Label ids (into GLYPH_CLASSES) that a task draws from."""
    _check_choice(task, TASKS, "task")
    return DIGIT_CLASSES if task == "digits" else tuple(range(NUM_GLYPH_CLASSES))


def glyph_dataset(split: str = "test", task: str = "all", size: int = 32, n: int | None = None,
                  seed: int = 0, fonts: Sequence[str] = GLYPH_FONTS) -> tuple[np.ndarray, np.ndarray]:
    """Render glyph images with labels: x float32 (n, 1, size, size) in [0, 1], y int64 in [0, 62).

    Sample i has class ``glyph_classes(task)[i % n_classes]`` (so any prefix of n_classes * k
    samples is balanced) and a random font and augmentation from the (seed, split, task, size) stream.
    ``n`` defaults to ``DEFAULT_N[(split, task)]``. Pixel values are multiples of 1/255.
    """
    _check_choice(split, SPLITS, "split")
    classes = glyph_classes(task)
    if n is None:
        n = DEFAULT_N[(split, task)]
    if int(n) < 0 or int(size) < 8:
        raise BadInputError(f"glyph_dataset needs n >= 0 and size >= 8 (got n={n}, size={size})")
    n, size = int(n), int(size)
    if not fonts:
        raise BadInputError("glyph_dataset needs at least one font")
    font_objs = [_font(f) for f in fonts]

    key = (seed, _SPLIT_CODE[split], _TASK_CODE[task], size)
    params = _Stream(*key, 0).uniform((n, _GLYPH_PARAMS))
    noise_stream = _Stream(*key, 1)  # drawn chunk by chunk, in sample order
    labels = np.asarray([classes[i % len(classes)] for i in range(n)], dtype=np.int64)

    images = np.empty((n, 1, size, size), dtype=np.float32)
    chunk = 512
    for start in range(0, n, chunk):
        stop = min(n, start + chunk)
        cov = _render_glyphs(font_objs, labels[start:stop], params[start:stop], size)
        noise = noise_stream.uniform((stop - start, size, size))
        images[start:stop, 0] = _compose_glyphs(cov, params[start:stop], noise)
    return images, labels


def _render_glyphs(fonts: list[_Font], labels: np.ndarray, p: np.ndarray, size: int) -> np.ndarray:
    n = len(labels)
    font_idx = np.minimum((p[:, 0] * len(fonts)).astype(np.int64), len(fonts) - 1)
    cos, sin = _rotation(p[:, 1], 10.0)
    scale = _lerp(p[:, 2], 0.85, 1.12)
    aspect = _lerp(p[:, 3], 0.9, 1.1)
    shear = _lerp(p[:, 4], -0.15, 0.15)
    shift_x = _lerp(p[:, 5], -2.0, 2.0) * (size / 32.0)
    shift_y = _lerp(p[:, 6], -1.5, 1.5) * (size / 32.0)
    cap_px = 17.0 * size / 32.0
    baseline = 23.5 * size / 32.0
    centre = size / 2.0

    segs, owners, mats = [], [], []
    for i in range(n):
        font = fonts[font_idx[i]]
        seg = font.outline(GLYPH_CLASSES[labels[i]])
        s = cap_px / font.cap_height
        xs = np.concatenate([seg[:, 0], seg[:, 2]])
        cx = 0.5 * (xs.min() + xs.max())
        # font units -> base pixels: u = s (x - cx) + centre, v = baseline - s y; then, about the
        # centre, scale (sx, sy), shear, rotate; then shift.
        sx, sy = scale[i] * aspect[i], scale[i] / aspect[i]
        # A = R @ [[1, shear], [0, 1]] @ diag(sx, sy), written out elementwise
        a11, a12 = cos[i] * sx, (cos[i] * shear[i] - sin[i]) * sy
        a21, a22 = sin[i] * sx, (sin[i] * shear[i] + cos[i]) * sy
        # base map B: (x, y) -> (s x - s cx + centre, -s y + baseline); total = A (B - centre) + centre + shift
        bx, by = -s * cx, baseline - centre
        m = (a11 * s, -a12 * s, a11 * bx + a12 * by + centre + shift_x[i],
             a21 * s, -a22 * s, a21 * bx + a22 * by + centre + shift_y[i])
        segs.append(seg)
        owners.append(np.full(len(seg), i, dtype=np.int64))
        mats.append(np.tile(np.asarray(m, dtype=np.float64), (len(seg), 1)))
    seg_all = _affine(np.concatenate(segs), np.concatenate(mats))
    return rasterize(seg_all, np.concatenate(owners), n, size, size)


def _compose_glyphs(cov: np.ndarray, p: np.ndarray, noise: np.ndarray) -> np.ndarray:
    bg = _lerp(p[:, 7], 0.0, 0.3)[:, None, None]
    ink = _lerp(p[:, 8], 0.65, 1.0)[:, None, None]
    amp = _lerp(p[:, 9], 0.0, 0.15)[:, None, None]
    img = bg + (ink - bg) * cov + amp * (2.0 * noise - 1.0)
    q = np.rint(np.clip(img, 0.0, 1.0) * 255.0).astype(np.uint8)
    return q.astype(np.float32) / np.float32(255.0)


def accuracy(logits: np.ndarray, labels: np.ndarray) -> float:
    """Top-1 accuracy in percent: argmax over all logits (all 62 for the digits task too) == label."""
    logits = np.asarray(logits)
    labels = np.asarray(labels)
    if logits.ndim != 2 or len(logits) != len(labels):
        raise BadInputError(f"accuracy needs logits (N, C) and N labels, got {logits.shape} and {labels.shape}")
    if len(labels) == 0:
        raise BadInputError("accuracy of an empty set is undefined")
    return float(100.0 * np.mean(np.argmax(logits, axis=1) == labels))


# ----------------------------------------------------------------------------------------------
# PP-OCR text-line orientation

_WORDS = (
    "the of and to in is for on with as by at from this that not are be or have was will can all new "
    "more one about your our page home search free time price order total date name number account "
    "service information contact report business online system data water market product school "
    "power energy street north south city house table window paper letter invoice receipt amount "
    "station open close left right under over after before between quick brown fox jumps lazy dog "
    "morning evening summer winter yellow purple orange green black white silver golden river bridge "
    "garden doctor teacher engine camera signal bottle ticket coffee bread butter island market "
    "Monday Friday London Paris Berlin Tokyo Sydney Boston Total Invoice Name Address Phone Email"
).split()
_LINE_PARAMS = 20


def _line_text(u: np.ndarray) -> str:
    """A short line: 1-4 tokens, words (lower / Capitalised / UPPER), numbers or codes."""
    digits = "0123456789"
    n_tok = 1 + int(u[0] * 4)
    toks = []
    for j in range(n_tok):
        a, b = u[1 + 3 * j], u[2 + 3 * j]
        if a < 0.65:
            w = _WORDS[int(b * len(_WORDS)) % len(_WORDS)]
            c = u[3 + 3 * j]
            w = w.capitalize() if c < 0.25 else (w.upper() if c < 0.35 else w)
        elif a < 0.85:
            w = str(int(b * 10 ** (1 + int(u[3 + 3 * j] * 5))))
        else:
            length = 3 + int(b * 5)
            w = "".join((GLYPH_CLASSES[10 + int(((b * 7919 + k * 0.6180339887) % 1.0) * 26)]
                         if k < 2 else digits[int(((b * 104729 + k * 0.7548776662) % 1.0) * 10)])
                        for k in range(length))
        toks.append(w)
    return " ".join(toks)


def render_text_lines(n: int = 400, seed: int = 0, fonts: Sequence[str] = GLYPH_FONTS
                      ) -> tuple[list[np.ndarray], np.ndarray, list[str]]:
    """Render text-line crops: (images uint8 HxWx3, labels int64 (0 upright, 1 rotated 180), texts).

    Line i has label i % 2; its text, font, height (cap 12-36 px), margins, slight rotation, colours
    and noise come from the (seed) stream. Crops are what a text detector would hand the classifier.
    """
    if int(n) < 0:
        raise BadInputError(f"render_text_lines needs n >= 0 (got {n})")
    n = int(n)
    font_objs = [_font(f) for f in fonts]
    params = _Stream(seed, 7, 0).uniform((n, _LINE_PARAMS))
    images, texts = [], []
    labels = np.asarray([i % 2 for i in range(n)], dtype=np.int64)
    for i in range(n):
        p = params[i]
        text = _line_text(p[:13])
        font = font_objs[min(int(p[13] * len(font_objs)), len(font_objs) - 1)]
        cap = _lerp(p[14], 12.0, 36.0)
        s = cap / font.cap_height
        height = int(round(cap * _lerp(p[15], 1.7, 2.3)))
        baseline = height * _lerp(p[16], 0.66, 0.74)
        margin = cap * _lerp(p[17], 0.15, 0.6)
        segs, pen_x = [], 0.0
        for ch in text:
            if ch != " " and font.has(ch):
                seg = font.outline(ch).copy()
                seg[:, 0] += pen_x
                seg[:, 2] += pen_x
                segs.append(seg)
            pen_x += font.advance(ch)
        width = int(math.ceil(pen_x * s + 2 * margin))
        cos, sin = _rotation(p[18:19], 1.5)
        seg = np.concatenate(segs) if segs else np.zeros((0, 4))
        cx, cy = width / 2.0, height / 2.0
        # glyph units -> pixels (x right, y down), then a slight rotation about the crop centre
        ux, uy = s, baseline
        m = (cos[0] * ux, sin[0] * s, cos[0] * (margin - cx) - sin[0] * (uy - cy) + cx,
             sin[0] * ux, -cos[0] * s, sin[0] * (margin - cx) + cos[0] * (uy - cy) + cy)
        mats = np.tile(np.asarray(m, dtype=np.float64), (len(seg), 1))
        cov = rasterize(_affine(seg, mats), np.zeros(len(seg), dtype=np.int64), 1, height, width)[0]
        images.append(_compose_line(cov, p[19], seed, i))
        texts.append(text)
        if labels[i] == 1:
            images[-1] = np.ascontiguousarray(images[-1][::-1, ::-1])
    return images, labels, texts


def _compose_line(cov: np.ndarray, u: float, seed: int, i: int) -> np.ndarray:
    h, w = cov.shape
    r = _Stream(seed, 7, 1, i).uniform(8 + h * w * 3)
    bg = _lerp(r[:3], 150.0, 255.0)
    bg = 0.7 * bg + 0.3 * bg.mean()  # mostly grey-ish paper
    fg = _lerp(r[3:6], 0.0, 90.0)
    amp = _lerp(r[6], 0.0, 14.0)
    noise = (2.0 * r[8:].reshape(h, w, 3) - 1.0) * amp
    img = bg[None, None, :] + (fg - bg)[None, None, :] * cov[:, :, None] + noise
    return np.rint(np.clip(img, 0.0, 255.0)).astype(np.uint8)


def ppocr_cls_preprocess(img: np.ndarray, shape: tuple[int, int, int] = PPOCR_CLS_SHAPE) -> np.ndarray:
    """One crop (uint8 HxWx3) -> float32 (3, 48, 192) exactly as rapidocr's TextClassifier does it.

    Resize (cv2 bilinear) to height 48 keeping the aspect ratio, width capped at 192; scale to
    [-1, 1] by (x / 255 - 0.5) / 0.5; CHW; zero-pad on the right to width 192.
    """
    import cv2

    c, h_out, w_max = shape
    h, w = img.shape[:2]
    ratio = w / float(h)
    w_out = w_max if math.ceil(h_out * ratio) > w_max else int(math.ceil(h_out * ratio))
    resized = cv2.resize(img, (w_out, h_out)).astype("float32")
    if c == 1:
        resized = resized[np.newaxis, :] / 255
    else:
        resized = resized.transpose((2, 0, 1)) / 255
    resized -= 0.5
    resized /= 0.5
    out = np.zeros((c, h_out, w_max), dtype=np.float32)
    out[:, :, :w_out] = resized
    return out


def ppocr_cls_dataset(n: int = 400, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """Rendered text lines for PP-OCR's orientation classifier: x float32 (n, 3, 48, 192), y int64.

    y = 0 for upright lines and 1 for lines rotated 180 degrees, the class order of rapidocr's
    ``label_list`` ['0', '180']. Needs opencv (brought by rapidocr-onnxruntime).
    """
    images, labels, _ = render_text_lines(n, seed)
    x = np.zeros((len(images),) + PPOCR_CLS_SHAPE, dtype=np.float32)
    for i, img in enumerate(images):
        x[i] = ppocr_cls_preprocess(img)
    return x, labels


def ppocr_rec_dataset(n: int = 128, seed: int = 0) -> tuple[np.ndarray, list[str]]:
    """Upright rendered text lines for PP-OCR's recognizer: x float32 (n, 3, 48, 320) and their texts.

    Preprocessed as rapidocr's TextRecognizer does at its base width 320 (height 48 keeping the
    aspect ratio, width capped, [-1, 1], zero-padded on the right). The recognizer's output is
    [N, T, 6625] CTC scores: a sequence-kind output.
    """
    images, labels, texts = render_text_lines(2 * int(n), seed)
    keep = [i for i in range(len(images)) if labels[i] == 0][: int(n)]
    x = np.zeros((len(keep), *PPOCR_REC_SHAPE), dtype=np.float32)
    for j, i in enumerate(keep):
        x[j] = ppocr_cls_preprocess(images[i], PPOCR_REC_SHAPE)
    return x, [texts[i] for i in keep]


def ppocr_det_dataset(n: int = 32, seed: int = 0, size: int = 320) -> np.ndarray:
    """Rendered pages of 3-6 text lines for PP-OCR's detector: float32 (n, 3, size, size), normalised
    as rapidocr's TextDetector does (x / 255 - ImageNet mean) / std; its output is a [N, 1, H, W]
    probability map (a regress-kind output)."""
    images, labels, _ = render_text_lines(12 * int(n), seed)
    upright = [img for img, lab in zip(images, labels, strict=True) if lab == 0]
    mean = np.asarray([0.485, 0.456, 0.406], dtype=np.float32)
    std = np.asarray([0.229, 0.224, 0.225], dtype=np.float32)
    out = np.zeros((int(n), 3, size, size), dtype=np.float32)
    rng = _Stream(seed, 7, 2).uniform((int(n), 16))
    k = 0
    for i in range(int(n)):
        page = np.full((size, size, 3), 235.0, dtype=np.float32)
        y = int(rng[i, 0] * 20)
        for j in range(3 + int(rng[i, 1] * 4)):
            img = upright[k % len(upright)]
            k += 1
            h, w = img.shape[:2]
            h, w = min(h, size - y), min(w, size - 8)
            if h < 8:
                break
            x0 = int(rng[i, 2 + j] * max(size - w - 8, 1)) + 4
            page[y:y + h, x0:x0 + w] = img[:h, :w]
            y += h + int(rng[i, 8 + j] * 16)
        out[i] = ((page / 255.0 - mean) / std).transpose(2, 0, 1)
    return out


@functools.lru_cache(maxsize=4)
def ctc_characters(model_path: str | Path) -> tuple[str, ...]:
    """The character list of a PP-OCR recognizer, as rapidocr decodes with it: "blank" at index 0, the
    model's `character` metadata (one per line), and a space at the end."""
    import onnx

    meta = {p.key: p.value for p in onnx.load(str(model_path), load_external_data=False).metadata_props}
    if "character" not in meta:
        raise BadInputError(f"{model_path}: no 'character' metadata (not a PP-OCR recognizer export)")
    return ("blank", *meta["character"].splitlines(), " ")  # read once per model (a tuple: cached, shared)


def ctc_greedy_texts(scores: np.ndarray, characters: Sequence[str]) -> list[str]:
    """Greedy CTC decoding of [N, T, C] scores: per position the argmax, repeats merged, blanks
    (index 0) dropped, leading and trailing spaces stripped."""
    texts = []
    for path in np.asarray(scores).argmax(axis=-1):
        keep = np.ones(len(path), dtype=bool)
        keep[1:] = path[1:] != path[:-1]
        texts.append("".join(characters[int(c)] for c in path[keep & (path != 0)]).strip())
    return texts


def text_accuracy(predicted: Sequence[str], truth: Sequence[str]) -> tuple[float, float]:
    """(% of lines read exactly, % character accuracy = 1 - edit distance / characters of the truth)."""
    if len(predicted) != len(truth) or not truth:
        raise BadInputError(f"text accuracy needs as many predictions as truths, got {len(predicted)} and {len(truth)}")
    edits = 0
    for a, b in zip(predicted, truth, strict=True):
        row = list(range(len(b) + 1))  # Levenshtein distance, one row at a time
        for i, ca in enumerate(a, 1):
            diag, row[0] = row[0], i
            for j, cb in enumerate(b, 1):
                diag, row[j] = row[j], min(row[j] + 1, row[j - 1] + 1, diag + (ca != cb))
        edits += row[-1]
    lines = 100.0 * float(np.mean([a == b for a, b in zip(predicted, truth, strict=True)]))
    return lines, 100.0 * (1.0 - edits / max(sum(len(b) for b in truth), 1))


def ppocr_cls_model_path() -> Path:
    """Path of the PP-OCR mobile v2.0 orientation classifier shipped inside rapidocr-onnxruntime."""
    spec = importlib.util.find_spec("rapidocr_onnxruntime")
    if spec is None or not spec.submodule_search_locations:
        raise BadInputError("the PP-OCR classifier ships with rapidocr-onnxruntime: pip install rapidocr-onnxruntime")
    path = Path(next(iter(spec.submodule_search_locations))) / "models" / "ch_ppocr_mobile_v2.0_cls_infer.onnx"
    if not path.is_file():
        raise BadInputError(f"rapidocr-onnxruntime has no classifier model at {path}")
    return path


# ----------------------------------------------------------------------------------------------
# files


def save_npz(path: str | os.PathLike, x: np.ndarray, y: np.ndarray | None, input_name: str) -> None:
    """Write ``{input_name: x, "labels": y}`` as .npz (what onnxcomp's data loader reads).

    The archive is byte-identical for identical arrays (fixed zip timestamps) and written atomically.
    """
    if not input_name or input_name == "labels":
        raise BadInputError(f"input name {input_name!r} is not usable as an .npz key")
    arrays = {input_name: np.ascontiguousarray(x)}
    if y is not None:
        if len(y) != len(x):
            raise BadInputError(f"{len(x)} inputs but {len(y)} labels")
        arrays["labels"] = np.ascontiguousarray(y)
    path = Path(path)
    fd, tmp = tempfile.mkstemp(prefix=path.name + ".", suffix=".tmp", dir=path.parent or ".")
    os.chmod(tmp, default_file_mode())  # mkstemp makes 0600
    try:
        with os.fdopen(fd, "wb") as fh, zipfile.ZipFile(fh, "w", zipfile.ZIP_STORED) as zf:
            for key, arr in arrays.items():
                buf = io.BytesIO()
                np.lib.format.write_array(buf, arr, allow_pickle=False)
                info = zipfile.ZipInfo(key + ".npy", date_time=(1980, 1, 1, 0, 0, 0))
                info.external_attr = 0o644 << 16
                zf.writestr(info, buf.getvalue())
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise


def main(argv: Sequence[str] | None = None) -> int:
    """``python -m onnxcomp.evaldata {glyphs,ppocr-cls} OUT.npz [...]``: write a data set to disk."""
    import argparse

    ap = argparse.ArgumentParser(prog="python -m onnxcomp.evaldata", description=main.__doc__)
    sub = ap.add_subparsers(dest="kind", required=True)
    g = sub.add_parser("glyphs", help="62-class glyph images (1x32x32)")
    g.add_argument("out")
    g.add_argument("--split", default="calib", choices=SPLITS)
    g.add_argument("--task", default="all", choices=TASKS)
    g.add_argument("--size", type=int, default=32)
    g.add_argument("-n", type=int, default=None)
    g.add_argument("--seed", type=int, default=0)
    g.add_argument("--input-name", default="input")
    for kind, n, what in (("ppocr-cls", 400, "text lines for the PP-OCR orientation classifier (3x48x192)"),
                          ("ppocr-rec", 128, "upright text lines for the PP-OCR recognizer (3x48x320, no labels)"),
                          ("ppocr-det", 32, "rendered pages for the PP-OCR detector (3x320x320, no labels)")):
        c = sub.add_parser(kind, help=what)
        c.add_argument("out")
        c.add_argument("-n", type=int, default=n)
        c.add_argument("--seed", type=int, default=0)
        c.add_argument("--input-name", default="x")
    args = ap.parse_args(argv)
    try:
        y = None
        if args.kind == "glyphs":
            x, y = glyph_dataset(args.split, args.task, args.size, args.n, args.seed)
        elif args.kind == "ppocr-cls":
            x, y = ppocr_cls_dataset(args.n, args.seed)
        elif args.kind == "ppocr-rec":
            x, _ = ppocr_rec_dataset(args.n, args.seed)
        else:
            x = ppocr_det_dataset(args.n, args.seed)
        save_npz(args.out, x, y, args.input_name)
    except BadInputError as exc:
        print(f"error: {exc}")
        return exc.exit_code
    print(f"wrote {args.out}: {args.input_name} {x.shape} {x.dtype}" + (f", labels {y.shape}" if y is not None else ""))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
