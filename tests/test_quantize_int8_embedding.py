"""passes/quantize.py: quantize-int8 on embedding tables (Gather -> com.microsoft.GatherBlockQuantized)."""

from pathlib import Path

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

import onnxslim_kit
from builders import FLOAT, init, make_model, rng, run_model
from onnxslim_kit.errors import InputError
from passes.quantize import quantize_rows_blocked

MODELS = Path(__file__).resolve().parent.parent / "models"
INT64 = TensorProto.INT64
NO_GATHER = "op_types=Conv+MatMul+Gemm"  # the pass as it was before embedding tables were quantized


def _cosine(a, b):
    a, b = np.asarray(a, np.float64).ravel(), np.asarray(b, np.float64).ravel()
    return float(a @ b / np.linalg.norm(a) / np.linalg.norm(b))


def _embedding_model():
    """Two lookups in one 300x96 table (ids, ids2) -> Add -> MatMul "fc"; plus a Shape -> Gather index
    lookup ("seq_len", not an embedding) as a second output."""
    r = rng(3)
    inits = [init("table", r.standard_normal((300, 96)).astype(np.float32)),
             init("w", (r.standard_normal((96, 32)) * 0.1).astype(np.float32)),
             init("one", np.array(1, np.int64))]
    nodes = [helper.make_node("Gather", ["table", "ids"], ["e1"], name="embed"),
             helper.make_node("Gather", ["table", "ids2"], ["e2"], name="embed2", axis=-2),
             helper.make_node("Add", ["e1", "e2"], ["e"], name="add"),
             helper.make_node("MatMul", ["e", "w"], ["y"], name="fc"),
             helper.make_node("Shape", ["ids"], ["shape"], name="shape"),
             helper.make_node("Gather", ["shape", "one"], ["n"], name="seq_len", axis=0)]
    return make_model(nodes, [("ids", INT64, ["B", "S"]), ("ids2", INT64, ["B", "S"])],
                      [("y", FLOAT, ["B", "S", 32]), ("n", INT64, [])], inits)


def _feeds(seed=0, n=4):
    """Token ids over the whole table, negative ones (counted from the end, as Gather does) included."""
    r = rng(seed)
    return [{"ids": r.integers(-300, 300, (2, 7)).astype(np.int64),
             "ids2": r.integers(-300, 300, (2, 7)).astype(np.int64)} for _ in range(n)]


def _ops(proto):
    return {n.name: n for n in proto.graph.node}


def _q_inputs(proto):
    return sorted(n.input[0] for n in proto.graph.node if n.op_type == "QuantizeLinear")


def test_quantize_int8_embedding_gather_becomes_gatherblockquantized_table_once():
    src = _embedding_model()
    out, report = onnxslim_kit.optimize(src, passes=["cleanup", "quantize-int8"], calibration=_feeds())
    onnx.checker.check_model(out, full_check=True)
    rec = report.passes[1]
    nodes = _ops(out)
    for name in ("embed", "embed2"):
        node = nodes[name]
        assert (node.op_type, node.domain) == ("GatherBlockQuantized", "com.microsoft")
        attrs = {a.name: helper.get_attribute_value(a) for a in node.attribute}
        assert attrs == {"gather_axis": 0, "quantize_axis": 1, "block_size": 32, "bits": 8}  # 96: 32 divides
    assert nodes["embed"].input[0] == nodes["embed2"].input[0]  # the shared table is quantized once
    assert nodes["seq_len"].op_type == "Gather" and all(c != "seq_len" for c, _ in rec.skipped)
    assert rec.stats["gathers_quantized"] == 2 and rec.stats["embedding_tables_quantized"] == 1
    assert rec.stats["embedding_bytes_before"] == 300 * 96 * 4
    assert rec.stats["embedding_bytes_after"] == 300 * 96 + 300 * 3 * (4 + 1)
    inits = {t.name: t for t in out.graph.initializer}
    assert "table" not in inits and inits[nodes["embed"].input[0]].data_type == TensorProto.UINT8
    # The float-output lookups change no Q/DQ placement: the same activations as without them.
    plain, _ = onnxslim_kit.optimize(src, passes=["cleanup", "quantize-int8:" + NO_GATHER], calibration=_feeds())
    assert _q_inputs(out) == _q_inputs(plain) and _q_inputs(out)
    assert rec.stats["nodes_quantized"] == 1 and report.parity.ok
    for feed in _feeds(seed=1):  # held-out ids, negative ones included
        ref, got = run_model(src, feed), run_model(out, feed)
        assert _cosine(ref[0], got[0]) >= 0.99 and np.array_equal(ref[1], got[1])


def test_quantize_int8_embedding_lookup_matches_blocked_dequantization_with_negative_ids():
    table = rng(5).standard_normal((200, 64)).astype(np.float32) + 0.5  # lopsided blocks
    table[7] = 0.0  # a padding row stays exactly zero
    proto = make_model([helper.make_node("Gather", ["table", "ids"], ["y"], name="embed")],
                       [("ids", INT64, ["B", "S"])], [("y", FLOAT, ["B", "S", 64])], [init("table", table)])
    feeds = [{"ids": np.array([[0, 7, 199, -1, -200, -193]], np.int64)}]
    out, report = onnxslim_kit.optimize(proto, passes=["quantize-int8"], calibration=feeds)
    onnx.checker.check_model(out, full_check=True)
    assert _ops(out)["embed"].op_type == "GatherBlockQuantized" and report.parity.ok
    q, scale, zero = quantize_rows_blocked(table, 64)
    deq = (q.astype(np.float32) - zero.astype(np.float32)) * scale  # one block per row here
    ids = feeds[0]["ids"]
    got = run_model(out, feeds[0])[0]
    np.testing.assert_allclose(got, deq[ids], rtol=0, atol=1e-6)  # negative ids count from the end
    step = (table.max(axis=1) - np.minimum(table.min(axis=1), 0)) / 255
    assert np.all(np.abs(got - table[ids]) <= step[ids][..., None] / 2 + 1e-6)
    assert np.all(got[0, 1] == 0.0)


def _tied_model():
    """Gather "embed" on a 200x64 table -> MatMul "fc" -> Gemm "head" reading the same table (transB=1)."""
    r = rng(7)
    inits = [init("table", (r.standard_normal((200, 64)) * 0.5).astype(np.float32)),
             init("w", (r.standard_normal((64, 64)) * 0.1).astype(np.float32)),
             init("b", np.zeros(200, np.float32))]
    nodes = [helper.make_node("Gather", ["table", "ids"], ["e"], name="embed"),
             helper.make_node("Reshape", ["e", "flat"], ["e2"], name="flatten"),
             helper.make_node("MatMul", ["e2", "w"], ["h"], name="fc"),
             helper.make_node("Gemm", ["h", "table", "b"], ["logits"], name="head", transB=1)]
    inits.append(init("flat", np.array([-1, 64], np.int64)))
    return make_model(nodes, [("ids", INT64, ["N"])], [("logits", FLOAT, ["N", 200])], inits)


def test_quantize_int8_embedding_tied_head_gets_own_copy_unless_head_stays_float():
    src = _tied_model()
    feeds = [{"ids": rng(i).integers(-200, 200, 16).astype(np.int64)} for i in range(4)]
    out, report = onnxslim_kit.optimize(src, passes=["cleanup", "quantize-int8"], calibration=feeds)
    onnx.checker.check_model(out, full_check=True)
    nodes = _ops(out)
    assert nodes["embed"].op_type == "GatherBlockQuantized" and report.passes[1].stats["gathers_quantized"] == 1
    head_w = next(n for n in out.graph.node if n.op_type == "DequantizeLinear" and n.output[0] == nodes["head"].input[1])
    assert head_w.input[0] != nodes["embed"].input[0]  # the head's own int8 weight, the lookup's own copy
    inits = {t.name for t in out.graph.initializer}
    assert "table" not in inits and report.parity.ok
    ref, got = run_model(src, feeds[0])[0], run_model(out, feeds[0])[0]
    assert _cosine(ref, got) >= 0.99
    # The head kept in float still reads the float table: an int8 copy beside it would only add bytes.
    out, report = onnxslim_kit.optimize(src, passes=["cleanup", "quantize-int8:exclude=head"], calibration=feeds)
    onnx.checker.check_model(out, full_check=True)
    assert _ops(out)["embed"].op_type == "Gather" and report.passes[1].stats["gathers_quantized"] == 0
    assert any(c == "embed" and "also read in float by head" in r for c, r in report.passes[1].skipped)
    assert _cosine(run_model(src, feeds[0])[0], run_model(out, feeds[0])[0]) >= 0.99


def test_quantize_int8_embedding_include_exclude_and_op_types_select_gathers():
    src = _embedding_model()
    feeds = _feeds()

    def run(spec):
        out, report = onnxslim_kit.optimize(src, passes=["cleanup", spec], calibration=feeds)
        onnx.checker.check_model(out, full_check=True)
        assert report.parity.ok
        return _ops(out), report.passes[1]

    nodes, rec = run("quantize-int8:include=embed+embed2")  # the search's one-layer form, lookups only
    assert nodes["embed"].op_type == nodes["embed2"].op_type == "GatherBlockQuantized"
    assert ("fc", "not in include") in rec.skipped and nodes["fc"].input[1] == "w"  # fc stays float
    assert not any(n.op_type == "QuantizeLinear" for n in nodes.values()) and rec.modified
    nodes, rec = run("quantize-int8:include=fc")
    assert nodes["embed"].op_type == "Gather" and ("embed", "not in include") in rec.skipped
    nodes, rec = run("quantize-int8:exclude=embed2")
    # the other lookup keeps the float table: neither is quantized, each says why
    assert ("embed2", "excluded by option") in rec.skipped and nodes["embed"].op_type == "Gather"
    assert any(c == "embed" and "also read in float by embed2" in r for c, r in rec.skipped)
    nodes, rec = run("quantize-int8:exclude_op_types=Gather")
    assert ("embed", "op type Gather excluded by option") in rec.skipped and nodes["embed"].op_type == "Gather"
    nodes, rec = run("quantize-int8:" + NO_GATHER)
    assert nodes["embed"].op_type == "Gather" and all(c not in ("embed", "embed2") for c, _ in rec.skipped)


def test_quantize_int8_embedding_small_odd_and_axis1_tables_stay_float_with_reasons():
    r = rng(9)
    inits = [init("small", r.standard_normal((10, 16)).astype(np.float32)),
             init("odd", r.standard_normal((100, 40)).astype(np.float32)),
             init("cols", r.standard_normal((64, 32)).astype(np.float32))]
    nodes = [helper.make_node("Gather", ["small", "ids"], ["a"], name="g_small"),
             helper.make_node("Gather", ["odd", "ids"], ["b"], name="g_odd"),
             helper.make_node("Gather", ["cols", "ids"], ["c"], name="g_cols", axis=1)]
    proto = make_model(nodes, [("ids", INT64, ["N"])], [("a", FLOAT, ["N", 16]), ("b", FLOAT, ["N", 40]),
                                                         ("c", FLOAT, [64, "N"])], inits)
    feeds = [{"ids": np.array([0, 3, -1], np.int64)}]
    out, report = onnxslim_kit.optimize(proto, passes=["quantize-int8"], calibration=feeds)
    onnx.checker.check_model(out, full_check=True)
    rec = report.passes[0]
    assert not rec.modified and [n.op_type for n in out.graph.node] == ["Gather"] * 3
    reasons = dict(rec.skipped)
    assert reasons["g_small"] == "table has 160 elements < 1024: kept in float"
    assert "hidden size 40 is not a multiple of 16" in reasons["g_odd"]
    assert "axis 1" in reasons["g_cols"]
    for a, b in zip(run_model(proto, feeds[0]), run_model(out, feeds[0])):
        np.testing.assert_array_equal(a, b)


def test_quantize_int8_refuses_model_holding_gatherblockquantized():
    out, _ = onnxslim_kit.optimize(_embedding_model(), passes=["cleanup", "quantize-int8:include=embed+embed2"],
                                   calibration=_feeds())
    assert "GatherBlockQuantized" in [n.op_type for n in out.graph.node]
    with pytest.raises(InputError, match="already quantized .*GatherBlockQuantized x2"):
        onnxslim_kit.optimize(out, passes=["quantize-int8"], calibration=_feeds())
    # inspect (MACs, params, bytes) reads the contrib node without failing
    stats = onnxslim_kit.metrics.model_stats(out)
    assert stats.params > 0 and "embed" not in stats.unresolved


def test_quantize_int8_embedding_analyze_lists_lookups_as_layers():
    report = onnxslim_kit.analyze(_embedding_model(), _feeds(), workers=1,
                                  techniques=["quantize-int8", "quantize-weights:bits=4", "prune-channels:ratio=0.5",
                                              "svd:energy=0.9"])
    assert report.layers == ["embed", "embed2", "fc"]  # the Shape -> Gather index lookup is no layer
    by = {(e.technique, e.layer): e for e in report.evaluations}
    # one lookup alone leaves the other reading the float table: skipped, with the pass's reason
    assert by[("quantize-int8", "embed")].status == "skipped"
    assert "also read in float by embed2" in by[("quantize-int8", "embed")].reason
    for technique in ("quantize-weights:bits=4", "prune-channels:ratio=0.5", "svd:energy=0.9"):
        assert by[(technique, "embed")].status == "skipped", by[(technique, "embed")]
    assert report.layer_weights["embed"] == 300 * 96


def _lookup_model():
    r = rng(4)
    nodes = [helper.make_node("Gather", ["table", "ids"], ["e"], name="embed"),
             helper.make_node("MatMul", ["e", "w"], ["y"], name="fc")]
    return make_model(nodes, [("ids", INT64, ["B", "S"])], [("y", FLOAT, ["B", "S", 32])],
                      [init("table", r.standard_normal((300, 64)).astype(np.float32)),
                       init("w", (r.standard_normal((64, 32)) * 0.1).astype(np.float32))])


def test_quantize_int8_embedding_analyze_puts_int8_on_a_lookup_alone():
    feeds = [{"ids": rng(i).integers(0, 300, (2, 5)).astype(np.int64)} for i in range(4)]
    report = onnxslim_kit.analyze(_lookup_model(), feeds, workers=1, techniques=["quantize-int8"])
    ev = next(e for e in report.evaluations if e.layer == "embed")
    assert ev.op == "Gather" and ev.status == "ok" and ev.cosine >= 0.99
    assert ev.bytes_saved > 300 * 64 * 2  # ~3 of every 4 bytes of the table


@pytest.mark.slow
def test_quantize_int8_embedding_bert_tiny_word_table_quantized():
    calib = MODELS / "bert_tiny.calib.npz"
    before, _ = onnxslim_kit.optimize(MODELS / "bert_tiny.onnx", passes=["cleanup", "quantize-int8:" + NO_GATHER],
                                      calibration=calib)
    proto, report = onnxslim_kit.optimize(MODELS / "bert_tiny.onnx", passes=["cleanup", "quantize-int8"],
                                          calibration=calib)
    onnx.checker.check_model(proto, full_check=True)
    nodes = _ops(proto)
    assert nodes["/word/Gather"].op_type == nodes["/pos/Gather"].op_type == "GatherBlockQuantized"
    rec = report.passes[1]
    assert ("/token_type/Gather", "table has 256 elements < 1024: kept in float") in rec.skipped
    assert rec.stats["embedding_tables_quantized"] == 2
    assert proto.ByteSize() < before.ByteSize() - 380_000  # the 1000x128 word table: 512 KB -> ~130 KB
    assert all(o.cosine >= 0.99 for o in report.parity.outputs)  # the pass's min_cosine
    assert "word.weight" not in {t.name for t in proto.graph.initializer}
    assert numpy_helper.to_array(next(t for t in proto.graph.initializer if t.name == nodes["/word/Gather"].input[0])
                                 ).dtype == np.uint8


def test_quantize_int8_embedding_float16_table_stays_with_reason():
    """analyze lists a float16 table's lookup as an embedding layer; the pass keeps it and says why."""
    r = rng(4)
    inits = [init("half", r.standard_normal((64, 32)).astype(np.float16))]
    nodes = [helper.make_node("Gather", ["half", "ids"], ["h"], name="emb"),
             helper.make_node("Cast", ["h"], ["y"], name="to_float", to=TensorProto.FLOAT)]
    proto = make_model(nodes, [("ids", INT64, ["N"])], [("y", FLOAT, ["N", 32])], inits)
    feeds = [{"ids": np.array([0, 5, -1], np.int64)}]
    out, report = onnxslim_kit.optimize(proto, passes=["quantize-int8:include=emb"], calibration=feeds)
    onnx.checker.check_model(out, full_check=True)
    assert dict(report.passes[0].skipped)["emb"] == "embedding table is float16, not float32: kept as it is"
    assert [n.op_type for n in out.graph.node] == ["Gather", "Cast"]
    np.testing.assert_array_equal(run_model(proto, feeds[0])[0], run_model(out, feeds[0])[0])
