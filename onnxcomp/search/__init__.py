"""Accuracy-budgeted search over pipelines: a space (`space`), a strategy (Optuna, `strategy`), trials
(`trial`), executors (a local process pool or Ray, `executors`) and the loop (`driver`). Search is a
client of the pipeline: a trial is a pipeline string, run and judged as `onnxcomp optimize` would."""
