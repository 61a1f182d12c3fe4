"""onnxslim_kit/executors.py: analyze's evaluations inline, in a local process pool and on Ray.

The Ray tests need ``pip install -e ".[ray]"`` and skip without it; they start a local Ray instance
with ``ray.init(num_cpus=2)`` as a user would.
"""

import concurrent.futures
import importlib
import multiprocessing
import sys

import pytest
from click.testing import CliRunner

import onnxslim_kit
from builders import mlp_blocks
from onnxslim_kit import executors, runtime
from onnxslim_kit.cli import main
from onnxslim_kit.errors import InputError

# quantize-int8 builds calibration sessions with threads=None; prune-channels refits with numpy (BLAS).
TECHNIQUES = ["quantize-int8", "prune-channels:ratio=0.5"]
SHAPES = ["x:4,16,64"]


def _model():
    return mlp_blocks(layers=2, hidden=64)


def _json(report) -> dict:
    """The report's JSON minus timing fields and how it was run."""
    return report.to_dict(run_details=False)


def _analyze(**kwargs):
    return onnxslim_kit.analyze(_model(), techniques=TECHNIQUES, input_shapes=SHAPES, **kwargs)


class _Stop(Exception):
    pass


def _stop_after(n):
    """A progress wrapper that stops the analysis when the n-th evaluation arrives (it is cached by then)."""
    def wrap(iterable, label):
        for i, item in enumerate(iterable, 1):
            if i == n:
                raise _Stop
            yield item
    return wrap


@pytest.fixture(scope="module")
def inline():
    return _analyze(workers=1)


def test_analyze_exec_pool_gives_inline_results_to_the_last_digit(inline):
    pooled = _analyze(workers=2)
    assert pooled.computed == inline.computed == 8 and pooled.executor == "local" and pooled.workers == 2
    statuses = {(e.technique, e.layer): e.status for e in inline.evaluations}
    assert statuses[("quantize-int8", "up0")] == "ok" and statuses[("prune-channels:ratio=0.5", "up1")] == "ok"
    assert _json(pooled) == _json(inline)  # floats compared exactly


def test_analyze_exec_cache_resumes_after_interrupt_under_pool(inline, tmp_path):
    cache = tmp_path / "cache.jsonl"
    with pytest.raises(_Stop):
        _analyze(workers=2, cache=cache, progress=_stop_after(3))
    assert len(cache.read_text().splitlines()) == 1 + 3  # header + the first three that finished
    resumed = _analyze(workers=2, cache=cache)
    assert resumed.reused == 3 and resumed.computed == 5
    assert sum(e.cached for e in resumed.evaluations) == 3
    assert _json(resumed) == _json(inline)


def test_analyze_exec_inline_sessions_and_blas_are_single_threaded(monkeypatch):
    made, blas, inside = [], [], []
    original_options, original_evaluate = runtime.session_options, executors._evaluate

    def spy_options(**kwargs):
        from threadpoolctl import threadpool_info

        opts = original_options(**kwargs)
        if inside:  # a session made by an evaluation (not analyze's own reference run)
            made.append((kwargs.get("threads"), opts.intra_op_num_threads, opts.inter_op_num_threads))
            blas.extend(i["num_threads"] for i in threadpool_info() if i["user_api"] == "blas")
        return opts

    def spy_evaluate(state, task):
        inside.append(task)
        try:
            return original_evaluate(state, task)
        finally:
            inside.pop()

    monkeypatch.setattr(runtime, "session_options", spy_options)
    monkeypatch.setattr(executors, "_evaluate", spy_evaluate)
    _analyze(workers=1)
    # Sessions made without a thread count (the calibration sessions of the passes) were made too.
    assert any(asked is None for asked, _, _ in made)
    assert {(intra, inter) for _, intra, inter in made} == {(1, 1)}
    assert blas and set(blas) == {1}
    assert runtime.get_default_threads() is None  # restored after the run
    assert runtime.session_options().intra_op_num_threads == 0  # onnxruntime's default again


def _probe_worker() -> tuple[int, int, list[int]]:
    """In a pool worker: the thread settings of a session made without a thread count, and BLAS's."""
    from threadpoolctl import threadpool_info

    from builders import relu_chain

    opts = runtime.make_session(relu_chain(1)).get_session_options()
    return (opts.intra_op_num_threads, opts.inter_op_num_threads,
            [i["num_threads"] for i in threadpool_info() if i["user_api"] == "blas"])


def test_analyze_exec_pool_workers_make_single_threaded_sessions():
    # The pool executor's own worker start-up, in spawned processes like run_pool's.
    with concurrent.futures.ProcessPoolExecutor(max_workers=1, mp_context=multiprocessing.get_context("spawn"),
                                                initializer=executors._init_worker, initargs=(None,)) as pool:
        intra, inter, blas = pool.submit(_probe_worker).result(timeout=120)
    assert (intra, inter) == (1, 1)
    assert blas and set(blas) == {1}


@pytest.mark.parametrize("spec, message", [
    ("dask", "expected local, ray or ray://HOST:PORT"),
    ("ray://nohost", "expected ray://HOST:PORT"),
])
def test_analyze_exec_bad_executor_exits_2_with_one_line(tmp_path, spec, message):
    import onnx

    model = tmp_path / "m.onnx"
    onnx.save(_model(), model)
    res = CliRunner().invoke(main, ["analyze", str(model), "--executor", spec, "-j", "1"])
    assert res.exit_code == 2
    assert res.output.count("\n") == 1 and res.output.startswith("error: ") and message in res.output


def test_analyze_exec_ray_missing_exits_2_with_one_line(tmp_path, monkeypatch):
    import onnx

    monkeypatch.setitem(sys.modules, "ray", None)  # import ray raises ImportError
    model = tmp_path / "m.onnx"
    onnx.save(_model(), model)
    cache = tmp_path / "c.jsonl"
    res = CliRunner().invoke(main, ["analyze", str(model), "--executor", "ray", "--cache", str(cache)])
    assert res.exit_code == 2
    assert res.output == "error: executor 'ray' needs the ray package: pip install onnxslim-kit[ray]\n"
    assert not cache.exists()  # refused before any work
    with pytest.raises(InputError, match=r"pip install onnxslim-kit\[ray\]"):
        _analyze(executor="ray://127.0.0.1:10001")


@pytest.fixture(scope="module")
def local_ray():
    ray = pytest.importorskip("ray")
    started = not ray.is_initialized()
    if started:
        ray.init(address="local", num_cpus=2, include_dashboard=False)  # not a stale cluster of a ray start
    yield ray
    if started:
        ray.shutdown()


def test_analyze_exec_ray_gives_local_pool_results(inline, local_ray):
    on_ray = _analyze(executor="ray")
    assert on_ray.executor == "ray" and on_ray.computed == 8
    assert _json(on_ray) == _json(_analyze(workers=2)) == _json(inline)
    assert local_ray.is_initialized()  # analyze leaves a Ray instance it did not start running


def test_analyze_exec_cache_resumes_after_interrupt_under_ray(inline, local_ray, tmp_path):
    cache = tmp_path / "cache.jsonl"
    with pytest.raises(_Stop):
        _analyze(executor="ray", cache=cache, progress=_stop_after(2))
    assert len(cache.read_text().splitlines()) == 1 + 2
    resumed = _analyze(executor="ray", cache=cache)
    assert resumed.reused == 2 and resumed.computed == 6
    assert _json(resumed) == _json(inline)


def test_analyze_exec_pool_without_main_guard_fails_fast_instead_of_hanging(tmp_path):
    import os
    import subprocess

    import onnx

    onnx.save(_model(), tmp_path / "m.onnx")
    script = tmp_path / "no_guard.py"
    script.write_text("import onnxslim_kit\n"
                      f"onnxslim_kit.analyze('m.onnx', techniques={TECHNIQUES!r}, input_shapes={SHAPES!r}, "
                      "workers=2)\n")
    root = os.path.dirname(os.path.dirname(onnxslim_kit.__file__))
    scratch = tmp_path / "tmp"
    scratch.mkdir()
    env = {**os.environ, "PYTHONPATH": root, "TMPDIR": str(scratch)}
    res = subprocess.run([sys.executable, str(script)], cwd=tmp_path, env=env, capture_output=True, text=True,
                         timeout=120)  # before the fix: blocked forever in ProcessPoolExecutor.submit
    assert res.returncode != 0
    assert "InputError: analyze: a worker process died or failed to start" in res.stderr
    assert "if __name__ == '__main__':" in res.stderr
    assert not list(scratch.glob("onnxslim-analyze-*"))  # the state file is removed


def _count_pools(monkeypatch) -> list:
    pools, original = [], executors.run_pool

    def spy(state, tasks, workers):
        pools.append((len(tasks), workers))
        return original(state, tasks, workers)

    monkeypatch.setattr(executors, "run_pool", spy)
    return pools


def test_analyze_exec_default_workers_stay_inline_for_short_work(inline, monkeypatch):
    pools = _count_pools(monkeypatch)
    report = _analyze()  # no worker count: 8 evaluations of well under a second in all
    assert pools == [] and report.workers == importlib.import_module("onnxslim_kit.analyze").default_workers()
    assert _json(report) == _json(inline)


def test_analyze_exec_auto_moves_long_work_to_the_pool(inline, monkeypatch):
    pools = _count_pools(monkeypatch)

    def run_probe_only(state, tasks, **kwargs):  # the real run_auto, with every estimate "long"
        assert kwargs["auto"] and len(tasks) == 8
        return executors.run_auto(state, tasks, 2, probe_seconds=0.0, pool_min_seconds=0.0)

    monkeypatch.setattr(executors, "run", run_probe_only)
    report = _analyze()
    assert pools == [(7, 2)]  # the first evaluation inline, the other 7 in 2 workers
    assert _json(report) == _json(inline)


def test_search_plan_is_the_same_with_the_local_pool_and_ray(local_ray):
    """Issue 7: local pool and Ray executor give identical plans for the same seed (the search built on
    the same per-layer analysis, run by each executor)."""
    common = dict(target="size=0.6x", techniques=["quantize-weights:bits=4,min_elements=256",
                                                  "prune-channels:ratio=0.5"],
                  input_shapes=SHAPES, seed=3, max_verifications=4)
    pooled = onnxslim_kit.search(_model(), workers=2, executor="local", **common)
    on_ray = onnxslim_kit.search(_model(), executor="ray", **common)
    plan = [(e.layer, e.technique) for e in pooled.plan]
    assert plan and plan == [(e.layer, e.technique) for e in on_ray.plan]
    assert pooled.met == on_ray.met
    assert pooled.model.SerializeToString() == on_ray.model.SerializeToString()
