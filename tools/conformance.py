"""Conformance on ONNX's own backend test data: the optimized model must still reproduce the expected
outputs that ship with the onnx package.

    python tools/conformance.py [--passes cleanup] [--limit N] [--sample N --seed S] [--json out.json]

Cases: the ~1,900 single-op node tests built in memory by onnx.backend.test.loader, plus the model
folders under onnx/backend/test/data (pytorch-converted, pytorch-operator, simple, and the
light CNNs of the 'real' kind: AlexNet, ResNet-50, DenseNet-121, ...). For every case
that onnxruntime runs as given and reproduces the expected outputs for, the pipeline is applied and the
result must reproduce them too, within the case's own rtol/atol. Prints passed / skipped (by reason) /
failed; failed must be 0.
"""

from __future__ import annotations

import argparse
import collections
import glob
import json
import os
import random
import sys
import time
import warnings
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import onnx
from onnx import numpy_helper

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from onnxslim_kit.ir import Model  # noqa: E402
from onnxslim_kit.pass_base import PassContext  # noqa: E402
from onnxslim_kit.pipeline import Pipeline  # noqa: E402
from onnxslim_kit.runtime import make_session  # noqa: E402

MODEL_KINDS = ("pytorch-converted", "pytorch-operator", "simple", "real")
LIGHT_PREFIX = "onnx/backend/test/data/light/"


@dataclass
class CaseResult:
    name: str
    status: str          # passed | skipped | failed
    reason: str = ""


def _load_cases(kinds=("node",) + MODEL_KINDS):
    from onnx.backend.test import loader

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        for kind in kinds:
            if kind == "node":
                yield from loader.load_node_model_tests()
            else:
                yield from loader.load_model_tests(kind=kind)


def _read_pb(path: str):
    tensor = onnx.TensorProto()
    with open(path, "rb") as fh:
        tensor.ParseFromString(fh.read())
    return numpy_helper.to_array(tensor)


def _case_model_and_data(case):
    """(ModelProto, [(inputs, outputs)]) for in-memory node cases and on-disk model folders."""
    if case.model is not None:
        return case.model, [(list(i), list(o)) for i, o in case.data_sets]
    if case.model_dir is None:
        if case.url and case.url.startswith(LIGHT_PREFIX):
            return _light_model_and_data(case)
        return None, []
    model = onnx.load(os.path.join(case.model_dir, "model.onnx"))
    sets = []
    for folder in sorted(glob.glob(os.path.join(case.model_dir, "test_data_set_*"))):
        ins = [_read_pb(p) for p in sorted(glob.glob(os.path.join(folder, "input_*.pb")),
                                           key=lambda p: int(Path(p).stem.split("_")[1]))]
        outs = [_read_pb(p) for p in sorted(glob.glob(os.path.join(folder, "output_*.pb")),
                                            key=lambda p: int(Path(p).stem.split("_")[1]))]
        sets.append((ins, outs))
    return model, sets


def _light_model_and_data(case):
    """The 'real' kind's light models (real CNN topologies with stored weights shrunk): onnx's runner feeds
    them deterministic dummy inputs and compares with <model>_output_<i>.pb; do exactly the same."""
    from onnx.backend.test.runner import Runner

    path = os.path.join(os.path.dirname(onnx.__file__), "backend", "test", "data", "light",
                        os.path.basename(case.url))
    model = onnx.load(path)
    init = {t.name for t in model.graph.initializer}
    ins = [Runner.generate_dummy_data(x, seed=0, name=case.model_name, random=False)
           for x in model.graph.input if x.name not in init]
    prefix = os.path.splitext(path)[0]
    outs = [_read_pb(p) for p in sorted(glob.glob(prefix + "_output_*.pb"),
                                        key=lambda p: int(Path(p).stem.rsplit("_", 1)[1]))]
    return model, [(ins, outs)]


def _value(x):
    """Test data comes as arrays, numpy scalars, TensorProtos or lists of them (sequences)."""
    if isinstance(x, onnx.TensorProto):
        return numpy_helper.to_array(x)
    if isinstance(x, list):
        return [_value(v) for v in x]
    if isinstance(x, np.generic):
        return np.asarray(x)
    return x


def _feeds(model: onnx.ModelProto, inputs) -> dict:
    init = {t.name for t in model.graph.initializer}
    names = [i.name for i in model.graph.input if i.name not in init]
    if len(names) != len(inputs):  # legacy models: test data also covers initializer inputs
        names = [i.name for i in model.graph.input][: len(inputs)]
    return dict(zip(names, (_value(x) for x in inputs)))


def _matches(actual, expected, rtol, atol) -> str:
    """'' when equal within tolerance, else a one-line reason."""
    if isinstance(expected, list):
        if not isinstance(actual, list) or len(actual) != len(expected):
            return "sequence length differs"
        for a, e in zip(actual, expected):
            reason = _matches(a, e, rtol, atol)
            if reason:
                return reason
        return ""
    expected = np.asarray(expected)
    actual = np.asarray(actual)
    if actual.shape != expected.shape:
        return f"shape {actual.shape} != {expected.shape}"
    if expected.dtype.kind in "OSU":
        return "" if np.array_equal(actual.astype(str), expected.astype(str)) else "string values differ"
    if actual.dtype != expected.dtype and not (actual.dtype.kind == expected.dtype.kind == "f"):
        return f"dtype {actual.dtype} != {expected.dtype}"
    try:
        np.testing.assert_allclose(actual.astype(np.float64) if actual.dtype.kind == "f" else actual,
                                   expected.astype(np.float64) if expected.dtype.kind == "f" else expected,
                                   rtol=rtol, atol=atol, equal_nan=True)
    except (AssertionError, TypeError, ValueError) as exc:
        return "values differ: " + " ".join(str(exc).split())[:120]
    return ""


def _run(model: onnx.ModelProto, data_sets, rtol, atol) -> str:
    sess = make_session(model, optimize=False)
    for inputs, expected in data_sets:
        got = sess.run(None, _feeds(model, inputs))
        if len(got) != len(expected):
            return f"{len(got)} outputs != {len(expected)} expected"
        for a, e in zip(got, expected):
            reason = _matches(a, _value(e), rtol, atol)
            if reason:
                return reason
    return ""


def _category(reason: str) -> str:
    text = reason.split(":", 1)[0] if ":" in reason else reason
    for key, label in (("NOT_IMPLEMENTED", "onnxruntime has no kernel for it (NOT_IMPLEMENTED)"),
                       ("ai.onnx.preview", "preview/training op not in onnxruntime"),
                       ("unable to handle object", "input type onnxruntime's Python API cannot feed"),
                       ("can't be converted to MLDataType", "input type onnxruntime's Python API cannot feed"),
                       ("does not reproduce", "onnxruntime's outputs differ from the expected ones"),
                       ("INVALID_GRAPH", "onnxruntime rejects the graph (INVALID_GRAPH)"),
                       ("INVALID_ARGUMENT", "onnxruntime rejects the inputs (INVALID_ARGUMENT)"),
                       ("FAIL", "onnxruntime fails to load or run it")):
        if key in reason:
            return label
    return text[:60]


def run_case(case, passes) -> CaseResult:
    name = case.name
    try:
        model, data_sets = _case_model_and_data(case)
    except Exception as exc:  # noqa: BLE001
        return CaseResult(name, "skipped", f"test data unreadable: {type(exc).__name__}")
    if model is None or not data_sets:
        return CaseResult(name, "skipped", "no model or test data shipped")
    rtol, atol = case.rtol, case.atol
    try:
        reason = _run(model, data_sets, rtol, atol)
    except Exception as exc:  # noqa: BLE001 - onnxruntime's refusal is a skip, not our failure
        return CaseResult(name, "skipped", "onnxruntime cannot run it as given: " + " ".join(str(exc).split())[:160])
    if reason:
        return CaseResult(name, "skipped", "onnxruntime does not reproduce the expected outputs: " + reason)
    try:
        if passes:
            optimized, _ = Pipeline.from_specs(list(passes)).run(Model.from_proto(model), PassContext())
        else:  # stage A: the IR round-trip alone (load into the graph IR and write back)
            optimized = Model.from_proto(model)
        proto = optimized.to_proto()
    except Exception as exc:  # noqa: BLE001 - any exception from our code is a failure
        return CaseResult(name, "failed", f"optimizer raised {type(exc).__name__}: {exc}"[:300])
    try:
        reason = _run(proto, data_sets, rtol, atol)
    except Exception as exc:  # noqa: BLE001
        return CaseResult(name, "failed", f"optimized model does not run: {' '.join(str(exc).split())[:200]}")
    if reason:
        return CaseResult(name, "failed", reason)
    return CaseResult(name, "passed")


def run_conformance(cases=None, passes=("cleanup",), limit: int | None = None, sample: int | None = None,
                    seed: int = 0, progress: bool = False) -> list[CaseResult]:
    cases = list(cases if cases is not None else _load_cases())
    if sample is not None and sample < len(cases):
        cases = random.Random(seed).sample(cases, sample)
    if limit is not None:
        cases = cases[:limit]
    results = []
    for i, case in enumerate(cases, 1):
        results.append(run_case(case, passes))
        if progress and i % 200 == 0:
            print(f"  {i}/{len(cases)}", file=sys.stderr, flush=True)
    return results


def summarize(results: list[CaseResult]) -> dict:
    counts = collections.Counter(r.status for r in results)
    skipped = collections.Counter(_category(r.reason) for r in results if r.status == "skipped")
    return {"passed": counts["passed"], "skipped": counts["skipped"], "failed": counts["failed"],
            "skipped_by_reason": dict(skipped.most_common()),
            "failures": [asdict(r) for r in results if r.status == "failed"]}


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--passes", nargs="*", default=["cleanup"],
                        help="pass specs (default: cleanup); '--passes' with none: IR round-trip only")
    parser.add_argument("--limit", type=int, default=None)
    parser.add_argument("--sample", type=int, default=None, help="random sample of this many cases")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--json", default=None, help="write the summary here")
    args = parser.parse_args(argv)
    start = time.perf_counter()
    results = run_conformance(passes=args.passes, limit=args.limit, sample=args.sample, seed=args.seed,
                              progress=True)
    summary = summarize(results)
    summary["seconds"] = round(time.perf_counter() - start, 1)
    print(f"passed {summary['passed']}, skipped {summary['skipped']}, failed {summary['failed']} "
          f"({len(results)} cases, {summary['seconds']} s, passes: {' '.join(args.passes) or 'IR round-trip only'})")
    for reason, n in summary["skipped_by_reason"].items():
        print(f"  skipped {n:4d}: {reason}")
    for f in summary["failures"]:
        print(f"  FAILED {f['name']}: {f['reason']}")
    if args.json:
        Path(args.json).write_text(json.dumps(summary, indent=2) + "\n")
    return 0 if summary["failed"] == 0 else 1


if __name__ == "__main__":
    sys.exit(main())
