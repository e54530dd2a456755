"""Shared fixtures: the 12 real models (onnx's `light_*` zoo and rapidocr's PP-OCR), a tiny-model
builder, random inputs for any model, and a plain onnxruntime runner.

Tests that take `real_model_path` run once per real model (ids are the file stems).
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import numpy as np
import onnx
import pytest
from _helpers import (  # noqa: F401  (re-exported for tests that still take them from here)
    LIGHT_DIR,
    PPOCR_INPUT_SHAPES,
    input_shapes_for,
    light_model_paths,
    make_conv_model,
    ort_run,
    ppocr_model_paths,
    random_feeds,
)


def pytest_generate_tests(metafunc: pytest.Metafunc) -> None:
    if "real_model_path" in metafunc.fixturenames:
        params = [pytest.param(p, id=p.stem) for p in light_model_paths()]
        ppocr = ppocr_model_paths()
        if ppocr:
            params += [pytest.param(p, id=p.stem) for p in ppocr]
        else:
            params.append(pytest.param(None, id="ppocr", marks=pytest.mark.skip(reason="rapidocr-onnxruntime not installed")))
        metafunc.parametrize("real_model_path", params)


@pytest.fixture(scope="session")
def light_models() -> list[Path]:
    paths = light_model_paths()
    assert paths, f"no light_*.onnx models in {LIGHT_DIR}"  # how many depends on the onnx release
    return paths


@pytest.fixture(scope="session")
def ppocr_models() -> list[Path]:
    paths = ppocr_model_paths()
    if not paths:
        pytest.skip("rapidocr-onnxruntime (a dev dependency) is not installed")
    kinds = {k for p in paths for k in ("_det_", "_rec_", "_cls_") if k in p.name}
    assert kinds == {"_det_", "_rec_", "_cls_"}, f"expected PP-OCR det, rec and cls models, found {[p.name for p in paths]}"
    return paths


@pytest.fixture
def feeds_for() -> Callable[..., dict[str, np.ndarray]]:
    """`feeds_for(model, path=None, seed=0)`: random inputs (see `random_feeds`)."""
    return random_feeds


@pytest.fixture
def run_ort() -> Callable[..., dict[str, np.ndarray]]:
    """`run_ort(model, feeds, extra_outputs=(), optimize=True)`: outputs by name (see `ort_run`)."""
    return ort_run


@pytest.fixture
def tiny_conv_model() -> Callable[..., onnx.ModelProto]:
    """`tiny_conv_model(cin=4, cout=8, kernel=3, group=1, bias=True, bn=False, transpose=False, ...)`:
    see `make_conv_model`."""
    return make_conv_model


@pytest.fixture(scope="session", autouse=True)
def _hermetic_cache(tmp_path_factory):
    """Latency and sensitivity caches of the test run live in a temporary folder, shared by every
    test and the subprocesses they start (so two runs of one command read the same timings)."""
    import os

    if "ONNXCOMP_CACHE_DIR" not in os.environ:
        os.environ["ONNXCOMP_CACHE_DIR"] = str(tmp_path_factory.mktemp("onnxcomp-cache"))
    yield
