"""onnxcomp: compress convolutional networks at the ONNX level and prove the result in onnxruntime.

Python entry point: `onnxcomp.optimize(model_or_path, pipeline, data=None, seed=0)`.
"""

from __future__ import annotations

import os
from typing import TYPE_CHECKING, Any

import onnx

if TYPE_CHECKING:
    from onnxcomp.pipeline import Report

__version__ = "0.1.0"

__all__ = ["optimize", "__version__"]


def optimize(
    model_or_path: onnx.ModelProto | str | os.PathLike,
    pipeline: Any = "normalize",
    data: Any = None,
    seed: int = 0,
    *,
    input_shapes: dict[str, list[int]] | None = None,
    normalize: bool = True,
    guard: bool | None = None,
    **run_options: Any,
) -> tuple[onnx.ModelProto, Report]:
    """Run a pipeline (string, recipe name/path, list of passes or Pipeline) on a model.

    `data` is anything `onnxcomp.data.open_source` accepts (an .npz path, a folder, a dict of arrays,
    a DataSource) or None. Returns (ModelProto, Report). The input model is not modified.
    With data, the run is guarded like the CLI's (`guard=False` turns it off): every pass is checked
    against the input on held-out samples, under `tolerance` (run option), else the recipe's, else
    onnxcomp.tolerance.GUARD_DEFAULT; ValidationFailed if the final model fails. Other `run_options`
    go to `Pipeline.run` (tolerance, validate, validate_each, on_fail).
    """
    from onnxcomp.model import as_model
    from onnxcomp.passes.base import Context
    from onnxcomp.pipeline import Pipeline, guard_for
    from onnxcomp.tolerance import GUARD_DEFAULT

    model = as_model(model_or_path)
    pipe = Pipeline.parse(pipeline, normalize=normalize)
    source = None
    if data is not None:
        from onnxcomp.data import open_source

        source = open_source(data, model=model, input_shapes=input_shapes or {})
    ctx = Context(data=source, seed=seed, input_shapes=dict(input_shapes or {}))
    if (guard is None and source is not None or guard) and not run_options.get("validate_each"):
        if source is None:
            raise ValueError("guard=True needs data to check on")
        tolerance = run_options.pop("tolerance", None) or pipe.tolerance or GUARD_DEFAULT
        on_fail = run_options.pop("on_fail", "repair")
        the_guard, ctx = guard_for(model, ctx, tolerance, on_fail="stop" if on_fail == "stop" else "repair",
                                   max_latency_ratio=run_options.pop("max_latency_ratio", pipe.max_latency_ratio))
        return pipe.run(model, ctx, tolerance=tolerance, guard=the_guard, **run_options)
    return pipe.run(model, ctx, **run_options)
