from typing import Literal

import numpy as np
import onnx_graphsurgeon as gs
import pytest

from builders import conv_bn_relu
from onnxslim_kit.errors import InputError, PassError
from onnxslim_kit.ir import Model
from onnxslim_kit.pass_base import EXACT, Pass, PassContext, PassResult, Tolerance
from onnxslim_kit.pipeline import Pipeline, build_pass, parse_spec
from onnxslim_kit.registry import _REGISTRY, convert_value, get_pass, pass_options, register_pass


@register_pass
class _ScaleFirstWeight(Pass):
    """Test pass: multiplies the first Conv weight (a new array: never in place).

    Options:
        factor: multiply the weight by this
        mode: how to pick the node
        names: node names to touch
    """

    name = "test-scale-weight"
    summary = "test only"

    def __init__(self, *, factor: float = 1.0, mode: Literal["first", "none"] = "first",
                 names: list[str] | None = None, repeat: int = 1, verbose: bool = False):
        self.factor, self.mode, self.names, self.repeat, self.verbose = factor, mode, names, repeat, verbose

    def run(self, model, ctx):
        if self.mode == "none" or self.factor == 1.0:
            return PassResult(model, False, skipped=[("conv", "factor is 1: nothing to do")])
        conv = next(n for n in model.nodes if n.op == "Conv")
        w = conv.inputs[1]
        conv.inputs[1] = gs.Constant(model.unique_name(w.name + "_scaled"), np.asarray(w.values) * self.factor)
        return PassResult(model, True, {"scaled": 1})


@register_pass
class _NeedsRealData(Pass):
    name = "test-needs-real-data"
    needs = frozenset({"real-calibration"})

    def run(self, model, ctx):
        return PassResult(model, False)


@register_pass
class _Crashes(Pass):
    name = "test-crashes"

    def run(self, model, ctx):
        raise ZeroDivisionError("boom")


class _Lossy(Pass):
    name = "test-lossy"
    tolerance = Tolerance(min_cosine=0.99, min_snr_db=20)

    def run(self, model, ctx):
        return PassResult(model, False)


def test_pipeline_parse_spec_splits_name_and_options():
    assert parse_spec("svd:energy=0.95,whiten=false") == ("svd", {"energy": "0.95", "whiten": "false"})
    assert parse_spec("cleanup") == ("cleanup", {})
    assert parse_spec("q:exclude-ops=Conv+Gemm") == ("q", {"exclude_ops": "Conv+Gemm"})


@pytest.mark.parametrize("spec, message", [
    ("", "empty pass spec"),
    ("cleanup:novalue", "not key=value"),
    ("cleanup:a=1,a=2", "given twice"),
    ("no-such-pass", "unknown pass 'no-such-pass'"),
    ("test-scale-weight:nope=1", "has no option 'nope'"),
    ("test-scale-weight:factor=abc", "expected a number"),
    ("test-scale-weight:mode=last", "expected one of first, none"),
    ("test-scale-weight:repeat=1.5", "expected an integer"),
    ("test-scale-weight:verbose=maybe", "expected true or false"),
])
def test_pipeline_spec_errors_are_input_errors(spec, message):
    with pytest.raises(InputError, match=message):
        build_pass(*parse_spec(spec))


def test_registry_converts_options_from_annotations():
    p = build_pass(*parse_spec("test-scale-weight:factor=2,mode=none,names=a+b,repeat=3,verbose=yes"))
    assert (p.factor, p.mode, p.names, p.repeat, p.verbose) == (2.0, "none", ["a", "b"], 3, True)
    assert convert_value("none", int | None) is None
    opts = {o.name: o for o in pass_options(_ScaleFirstWeight)}
    assert opts["factor"].type_name == "float" and opts["factor"].default == 1.0
    assert opts["mode"].type_name == "first|none"
    assert opts["names"].type_name == "list[str]?"
    assert opts["factor"].help == "multiply the weight by this"


def test_registry_is_idempotent_and_refuses_name_clash():
    assert register_pass(_ScaleFirstWeight) is _ScaleFirstWeight
    assert get_pass("test-scale-weight") is _ScaleFirstWeight

    class Other(Pass):
        name = "test-scale-weight"

        def run(self, model, ctx):
            return PassResult(model, False)

    with pytest.raises(ValueError, match="already registered"):
        register_pass(Other)
    assert _REGISTRY["test-scale-weight"] is _ScaleFirstWeight


def test_registry_requires_keyword_only_options():
    class Positional(Pass):
        name = "test-positional"

        def __init__(self, factor: float = 1.0):
            self.factor = factor

        def run(self, model, ctx):
            return PassResult(model, False)

    with pytest.raises(TypeError, match="keyword-only"):
        pass_options(Positional)


def test_pipeline_recipe_roundtrip(tmp_path):
    pipe = Pipeline.from_specs(["test-scale-weight:factor=2,names=a+b"])
    recipe = tmp_path / "r.toml"
    recipe.write_text(pipe.to_toml())
    again = Pipeline.from_recipe(recipe)
    assert again.passes[0].options() == pipe.passes[0].options()


@pytest.mark.parametrize("text, message", [
    ("[[pass]]\nfactor = 2\n", "has no 'name'"),
    ("x = 1\n", "at least one"),
    ("[[pass]\n", "invalid TOML"),
    ('[[pass]]\nname = "test-scale-weight"\nfactor = "big"\n', "expected a number"),
])
def test_pipeline_recipe_errors(tmp_path, text, message):
    recipe = tmp_path / "r.toml"
    recipe.write_text(text)
    with pytest.raises(InputError, match=message):
        Pipeline.from_recipe(recipe)


def test_pipeline_missing_recipe_file(tmp_path):
    with pytest.raises(InputError, match="recipe file not found"):
        Pipeline.from_recipe(tmp_path / "nope.toml")


def test_pipeline_checks_needs_before_running_any_pass():
    pipe = Pipeline([build_pass("test-scale-weight", {"factor": "2"}), build_pass("test-needs-real-data", {})])
    model = Model.from_proto(conv_bn_relu())
    before = model.fingerprint()
    with pytest.raises(InputError, match="needs real calibration data"):
        pipe.run(model, PassContext(calibration=[{"x": np.zeros((1, 3, 8, 8), np.float32)}],
                                    calibration_is_random=True))
    assert model.fingerprint() == before  # the first pass never ran


def test_pipeline_records_stats_skips_and_sweeps_dead_weights():
    pipe = Pipeline.from_specs(["test-scale-weight:factor=2", "test-scale-weight:mode=none"])
    model, records = pipe.run(Model.from_proto(conv_bn_relu()), PassContext())
    first, second = records
    assert first.modified and first.stats["scaled"] == 1
    assert "conv.w" not in model.tensors()
    exported = {t.name for t in model.to_proto().graph.initializer}
    assert "conv.w" not in exported and len(exported) == 8  # the replaced weight is not written
    assert not second.modified and second.skipped == [("conv", "factor is 1: nothing to do")]
    assert first.to_dict()["options"]["factor"] == 2.0


def test_pipeline_wraps_pass_crash_with_pass_name():
    pipe = Pipeline.from_specs(["test-crashes"])
    with pytest.raises(PassError, match="^test-crashes: ZeroDivisionError: boom"):
        pipe.run(Model.from_proto(conv_bn_relu()), PassContext())


class _FakeReport:
    def __init__(self, ok):
        self.ok = ok

    def to_dict(self):
        return {"ok": self.ok}


def test_pipeline_per_pass_rolls_back_only_the_pass_that_breaks_parity():
    calls = []

    def checker(model, tol):
        w = next(n for n in model.nodes if n.op == "Conv").inputs[1]
        ok = np.allclose(np.asarray(w.values), conv_bn_relu_weight() * 2)  # accept only factor 2
        calls.append(tol)
        return _FakeReport(ok)

    pipe = Pipeline.from_specs(["test-scale-weight:factor=2", "test-scale-weight:factor=3"])
    model, records = pipe.run(Model.from_proto(conv_bn_relu()), PassContext(), checker=checker, per_pass=True)
    assert [r.rolled_back for r in records] == [False, True]
    assert calls == [EXACT, EXACT]
    w = next(n for n in model.nodes if n.op == "Conv").inputs[1]
    np.testing.assert_allclose(np.asarray(w.values), conv_bn_relu_weight() * 2)


def conv_bn_relu_weight():
    from onnx import numpy_helper

    return numpy_helper.to_array(conv_bn_relu().graph.initializer[0])


def test_tolerance_combine_and_override():
    assert Tolerance.combine([EXACT, EXACT]) == EXACT
    combined = Tolerance.combine([EXACT, _Lossy.tolerance, Tolerance(min_cosine=0.999)])
    assert combined == Tolerance(min_cosine=0.99, min_snr_db=20)
    assert EXACT.override(atol=1e-3).atol == 1e-3
    assert _Lossy.tolerance.override(cosine=0.9).min_cosine == 0.9
    with pytest.raises(ValueError, match="unknown tolerance key"):
        EXACT.override(foo=1)
    assert Pipeline([_Lossy()]).tolerance.lossy
