"""Where trials run: a local process pool (default) or Ray tasks on a Ray cluster.

Both take a batch of (number, pipeline) and return one TrialResult per trial, in trial order. The
job (model bytes and data arrays) is shipped once: to each local worker when it starts (the pool's
initializer), or to Ray's object store once (`ray.put`), from which every task reads it. A worker
that dies mid-trial: the trial is retried once (a fresh pool locally, Ray's task retry on a cluster),
then recorded as failed with the reason; the search goes on. No pass imports this module.
"""

from __future__ import annotations

import contextlib
import multiprocessing
import os
from collections.abc import Callable, Sequence
from concurrent.futures import FIRST_COMPLETED, ProcessPoolExecutor, wait
from concurrent.futures.process import BrokenProcessPool

from onnxcomp.errors import BadInputError, first_line
from onnxcomp.search.trial import FAILED, Job, TrialResult, run_trial

_JOB: Job | None = None


def _init_worker(job: Job) -> None:
    import os
    import sys

    global _JOB
    _JOB = job
    # Libraries print progress (onnxruntime's calibrators do): the driver's stdout carries only the result.
    sys.stdout = open(os.devnull, "w")  # noqa: SIM115 - the worker's whole life


def _work(number: int, pipeline: str, held_samples: int | None, guarded: bool = False) -> TrialResult:
    assert _JOB is not None, "worker without a job"
    return run_trial(_JOB, number, pipeline, held_samples, guarded=guarded)


# Thread-count variables a worker starts with: onnxcomp's onnxruntime sessions, and the BLAS numpy
# and scipy load (read once, when the library loads, so they must be in the environment at spawn).
_THREAD_VARS = ("OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS")


@contextlib.contextmanager
def _spawn_env(threads: int):
    """The driver's environment, while workers are spawned, with every thread count set to `threads`
    (a spawned process copies the environment at its start; the driver's own is put back after)."""
    from onnxcomp.runtime import THREADS_ENV

    names = (THREADS_ENV, *_THREAD_VARS)
    saved = {k: os.environ.get(k) for k in names}
    os.environ.update({k: str(threads) for k in names})
    try:
        yield
    finally:
        for k, v in saved.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v


class LocalPool:
    """`workers` processes (spawned: onnxruntime's threads do not survive a fork), each given the job
    once. Each worker runs with its share of the cores (`threads`, default cores // workers) for
    onnxruntime and BLAS, as Ray does for its one-CPU tasks: two workers that each used every core
    ran 8 trials in 86 s where one worker took 93 s (benchmarks/search.py)."""

    name = "local"

    def __init__(self, job: Job, workers: int, threads: int | None = None):
        self.job, self.workers = job, max(1, int(workers))
        self.threads = max(1, int(threads)) if threads else max(1, (os.cpu_count() or 1) // self.workers)
        self._pool: ProcessPoolExecutor | None = None

    def _fresh_pool(self) -> ProcessPoolExecutor:
        if self._pool is not None:
            self._pool.shutdown(wait=False, cancel_futures=True)
        self._pool = ProcessPoolExecutor(self.workers, mp_context=multiprocessing.get_context("spawn"),
                                         initializer=_init_worker, initargs=(self.job,))
        return self._pool

    def run(self, trials: Sequence[tuple[int, str]], held_samples: int | None,
            on_result: Callable[[TrialResult], None] | None = None, guarded: bool = False) -> list[TrialResult]:
        """Every trial's result, in trial order (`guarded`: run under the guard, see
        onnxcomp.search.trial.run_trial); `on_result` is called as each one finishes. When a
        worker dies, every trial still in the broken pool is a suspect: each is run again alone in a
        fresh pool, and only one that kills its worker alone is recorded as failed (the others, which
        merely ran beside it, get their real result)."""
        results: dict[int, TrialResult] = {}

        def finish(n: int, r: TrialResult) -> None:
            results[n] = r
            if on_result is not None:
                on_result(r)

        pool = self._pool or self._fresh_pool()
        with _spawn_env(self.threads):  # workers are spawned as tasks are submitted
            futures = {pool.submit(_work, n, p, held_samples, guarded): (n, p) for n, p in trials}
        suspects: list[tuple[int, str]] = []
        pending = set(futures)
        while pending:
            finished, pending = wait(pending, return_when=FIRST_COMPLETED)
            for fut in finished:
                n, p = futures[fut]
                try:
                    finish(n, fut.result())
                except BrokenProcessPool:
                    suspects.append((n, p))
        for n, p in sorted(suspects):
            try:
                with _spawn_env(self.threads):
                    future = self._fresh_pool().submit(_work, n, p, held_samples, guarded)
                finish(n, future.result())
            except BrokenProcessPool:
                finish(n, TrialResult(n, p, FAILED, reason="its worker died running it (twice: beside others, then alone)"))
                self._fresh_pool()
        return [results[n] for n, _ in sorted(trials)]

    def close(self) -> None:
        if self._pool is not None:
            self._pool.shutdown(wait=True, cancel_futures=True)
            self._pool = None


def _ray_trial(job: Job, number: int, pipeline: str, held_samples: int | None, guarded: bool = False) -> TrialResult:
    return run_trial(job, number, pipeline, held_samples, guarded=guarded)


class RayExecutor:
    """Ray tasks on the cluster at `address` ("auto": the running cluster; "local": start one on this
    machine with `workers` CPUs). The job goes to the object store once; each task reads it there."""

    name = "ray"

    def __init__(self, job: Job, address: str, workers: int):
        self.workers = max(1, int(workers))
        try:
            import ray
        except ImportError:
            raise BadInputError("--ray needs Ray: pip install 'onnxcomp[ray]'") from None
        self.ray = ray
        self._started = False
        if not ray.is_initialized():
            kwargs = {"include_dashboard": False, "log_to_driver": False, "configure_logging": False}
            _check_reachable(address)
            try:
                if address == "local":
                    ray.init(num_cpus=max(1, int(workers)), **kwargs)
                else:
                    ray.init(address=address, **kwargs)
            except Exception as exc:  # ConnectionError, ValueError, RuntimeError: an address that does not answer
                raise BadInputError(f"--ray {address}: cannot reach a Ray cluster ({first_line(exc, 160)})") from None
            self._started = True
        self.job_ref = ray.put(job)
        self.task = ray.remote(max_retries=1, num_cpus=1)(_ray_trial)

    def run(self, trials: Sequence[tuple[int, str]], held_samples: int | None,
            on_result: Callable[[TrialResult], None] | None = None, guarded: bool = False) -> list[TrialResult]:
        """Every trial's result, in trial order; `on_result` is called as each one finishes."""
        ray = self.ray
        refs = {self.task.remote(self.job_ref, n, p, held_samples, guarded): (n, p) for n, p in trials}
        results: dict[int, TrialResult] = {}
        pending = list(refs)
        while pending:
            ready, pending = ray.wait(pending, num_returns=1)
            for ref in ready:
                n, p = refs[ref]
                try:
                    results[n] = ray.get(ref)
                except Exception as exc:  # WorkerCrashedError after the retry, RayTaskError, ...
                    results[n] = TrialResult(n, p, FAILED, reason=f"ray: {type(exc).__name__}: {first_line(exc, 160)}")
                if on_result is not None:
                    on_result(results[n])
        return [results[n] for n, _ in sorted(trials)]

    def close(self) -> None:
        if self._started:
            self.ray.shutdown()


def _check_reachable(address: str) -> None:
    """BadInputError unless a TCP connection to a host:port address opens within 3 s (ray.init itself
    keeps retrying an address that does not answer for minutes). 'auto', 'local' and ray:// URLs
    are left to Ray."""
    import socket

    if address in ("auto", "local") or "://" in address:
        return
    host, sep, port = address.rpartition(":")
    if not sep or not port.isdigit():
        raise BadInputError(f"--ray {address}: expected auto, local or HOST:PORT")
    try:
        with socket.create_connection((host or "127.0.0.1", int(port)), timeout=3.0):
            pass
    except OSError as exc:
        raise BadInputError(f"--ray {address}: cannot reach a Ray cluster ({exc.strerror or first_line(exc)})") from None


def make_executor(job: Job, workers: int, ray_address: str | None):
    if ray_address:
        return RayExecutor(job, ray_address, workers)
    return LocalPool(job, workers)
