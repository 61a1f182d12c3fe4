"""ONNX's own backend test data through the default pipeline (tools/conformance.py): every case that
onnxruntime reproduces as given must still be reproduced after cleanup."""

import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tools"))
import conformance  # noqa: E402


@pytest.mark.slow
def test_conformance_cleanup_keeps_every_backend_case_passing():
    results = conformance.run_conformance(passes=("cleanup",))
    summary = conformance.summarize(results)
    assert summary["failed"] == 0, summary["failures"][:5]
    # a harness that silently skips everything must fail: ~1,690 cases run on onnxruntime 1.32
    assert summary["passed"] >= 1500, summary
    names = {r.name for r in results if r.status == "passed"}
    # legacy IR-3 models (pytorch-converted: initializers listed as inputs) and optional/sequence/string
    # cases are covered
    converted = {c.name for c in conformance._load_cases(("pytorch-converted",))}
    assert len(converted & names) >= 20
    # the light CNNs (AlexNet, ResNet-50, DenseNet-121, Inception, ...) of the 'real' kind all run and pass
    light = {c.name for c in conformance._load_cases(("real",)) if c.url and c.url.startswith(conformance.LIGHT_PREFIX)}
    assert len(light) >= 9 and light <= names, light - names
    assert {"test_identity_opt", "test_if_opt", "test_ai_onnx_ml_label_encoder_tensor_mapping"} <= names


def test_conformance_detects_a_broken_rewrite(monkeypatch):
    """The harness itself must be able to fail: every exported Abs/Relu silently becomes a Neg."""
    from onnxslim_kit import ir

    original = ir.Model.to_proto

    def broken(self, **kwargs):
        proto = original(self, **kwargs)
        for node in proto.graph.node:
            if node.op_type in ("Abs", "Relu"):
                node.op_type = "Neg"
        return proto

    cases = [c for c in conformance._load_cases(("node",)) if c.name in ("test_abs", "test_relu")]
    monkeypatch.setattr(ir.Model, "to_proto", broken)
    results = conformance.run_conformance(cases=cases)
    assert len(results) == 2 and all(r.status == "failed" and "values differ" in r.reason for r in results)


def test_conformance_ir_round_trip_keeps_a_seeded_sample_passing():
    """Stage A alone (no passes): load into the graph IR and write back, on a fixed seeded sample of node
    cases plus the legacy IR-3 pytorch-converted folders (initializers listed as graph inputs)."""
    node = list(conformance._load_cases(("node",)))
    import random

    cases = random.Random(7).sample(node, 300) + list(conformance._load_cases(("pytorch-converted",)))
    results = conformance.run_conformance(cases=cases, passes=())
    summary = conformance.summarize(results)
    assert summary["failed"] == 0, summary["failures"][:5]
    assert summary["passed"] >= 250, summary


@pytest.mark.slow
def test_conformance_equalize_keeps_a_seeded_sample_and_the_light_cnns_passing():
    """equalize is an exact pass too (the full run, `python tools/conformance.py --passes equalize`, gave
    1,698 passed / 0 failed): CI runs a seeded sample of node cases plus the light CNNs."""
    import random

    node = list(conformance._load_cases(("node",)))
    light = [c for c in conformance._load_cases(("real",)) if c.url and c.url.startswith(conformance.LIGHT_PREFIX)]
    results = conformance.run_conformance(cases=random.Random(11).sample(node, 200) + light, passes=("equalize",))
    summary = conformance.summarize(results)
    assert summary["failed"] == 0, summary["failures"][:5]
    assert summary["passed"] >= 160 + len(light) - 1, summary
