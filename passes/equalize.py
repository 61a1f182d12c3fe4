"""The exact ``equalize`` pass (cross-layer equalization, Nagel et al. 2019): a thin pass over the
algorithms in passes/quant_aids.py, which quantize-int8 also uses (``equalize=...``) and which register
no pass themselves."""

from __future__ import annotations

from typing import Literal

from onnxslim_kit.ir import Model
from onnxslim_kit.pass_base import EXACT, Pass, PassContext, PassResult
from onnxslim_kit.registry import register_pass
from passes.quant_aids import equalize, equalize_activations


@register_pass
class Equalize(Pass):
    """Cross-layer equalization (Nagel et al. 2019): rescale Conv -> Relu -> Conv pairs (dense, grouped,
    depthwise) per channel. Float-exact; run after cleanup (BatchNorm folded) and before quantize-int8.

    Options:
        mode: weights: equalize both Convs' per-channel weight ranges (data-free; chains swept until the
            scales settle; helps per-tensor weights); activations: equalize the per-channel ranges of the
            tensor between the Convs (read from the calibration data) against the second Conv's weight
            ranges, trade-off chosen per pair by the expected int8 noise (helps per-tensor activations)
        alpha: activations mode: fixed trade-off a in s_i = r_act_i^a / r_w2_i^(1 - a) instead of the
            per-pair choice (1 = activation ranges fully equal)
        per_channel: activations mode: the weights will be quantized per output channel (as quantize-int8
            does by default); false when they will be quantized per tensor
        iterations: weights mode: most sweeps over the pairs
        settle: weights mode: stop sweeping once every scale of a sweep has |log s| below this
    """

    name = "equalize"
    summary = "cross-layer equalization of Conv->Relu->Conv weight or activation ranges (exact; helps int8)"
    tolerance = EXACT

    def __init__(self, *, mode: Literal["weights", "activations"] = "weights", alpha: float | None = None,
                 per_channel: bool = True, iterations: int = 20, settle: float = 1e-4):
        if iterations < 1:
            raise ValueError("iterations must be >= 1")
        if alpha is not None and not 0.0 <= alpha <= 1.0:
            raise ValueError("alpha must be in [0, 1]")
        if alpha is not None and mode != "activations":
            raise ValueError("alpha applies to mode=activations only")
        self.mode, self.alpha, self.per_channel = mode, alpha, per_channel
        self.iterations = iterations
        self.settle = settle
        if mode == "activations":
            self.needs = frozenset({"calibration"})

    def run(self, model: Model, ctx: PassContext) -> PassResult:
        skipped: list[tuple[str, str]] = []
        if self.mode == "activations":
            stats = equalize_activations(model, ctx, skipped, per_channel=self.per_channel, alpha=self.alpha)
        else:
            stats = equalize(model, skipped, iterations=self.iterations, settle=self.settle)
        return PassResult(model, stats["pairs_equalized"] > 0, stats, skipped)
