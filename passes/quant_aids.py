"""Accuracy aids for int8 quantization (issue 3): cross-layer equalization, bias correction, SmoothQuant.

Each aid is a function that rewrites a model in place and returns stats; ``quantize-int8`` calls them
(options ``equalize``, ``bias_correction``, ``smoothquant``). Cross-layer equalization (both modes) is
float-exact and is also the standalone pass ``equalize`` (passes/equalize.py).

- **Cross-layer equalization** (Nagel et al. 2019, "Data-Free Quantization Through Weight Equalization
  and Bias Correction"): for Conv -> [Relu | LeakyRelu | PRelu] -> Conv (the second Conv dense, grouped
  or depthwise), output channel i of the first Conv is divided by s_i and the matching input channel of
  the second multiplied by s_i, with s_i = sqrt(r1_i * r2_i) / r2_i (r = per-channel weight range). Both
  ranges become sqrt(r1_i * r2_i), so per-tensor (and per-channel) int8 grids fit every channel. The
  activations between must be positively homogeneous (f(x / s) = f(x) / s for s > 0): Clip/Relu6 is not
  (its bounds are scalars and cannot be rescaled per channel), so such pairs are skipped with a reason.
  Chains (conv -> depthwise -> conv) are swept until the scales settle.
- **Activation-aware equalization** (``equalize=activations``): the same exact rescaling, but s is chosen
  for the tensor BETWEEN the Convs, which quantize-int8 quantizes with one per-tensor uint8 grid (the
  error per-channel weights cannot fix): s_i = rms_i^a / r_w2_i^(1 - a) (rms_i: the channel's RMS over the
  calibration data; SmoothQuant's form applied to convs), a chosen per pair from a grid by the expected
  int8 output noise (activation grid + weight grids, _quant_noise), and no rescaling unless that gains
  >= 1 dB. RMS rather than max: equalizing calibration MAXIMA puts every channel at the edge of the grid,
  and held-out data then clips in every channel (measured on mobilenetv2_digits: -13 dB SNR).
- **Bias correction** (same paper, empirical variant): weight rounding shifts each output's expectation
  by E[x] . (W_q - W); that shift, with E[x] streamed from the calibration data, is subtracted from the
  bias (a bias is added to a Conv/Gemm that has none; a MatMul needs a following constant bias Add).
  For a zero-padded Conv the correction assumes every kernel tap sees the input mean; border outputs
  see fewer taps, so there it is approximate.
- **SmoothQuant** (Xiao et al. 2023): for MatMul/Gemm with a constant weight, input channel j is divided
  by s_j = max|X_j|^alpha / max|W_j|^(1 - alpha) and weight row j multiplied by it, moving activation
  outliers into the weights. The division is folded into a preceding LayerNormalization's scale and bias
  when the normalized tensor feeds only the smoothed MatMuls; otherwise a Mul by 1/s is inserted (the
  quantizer's Q/DQ then sits after it). Consumers sharing one input share one s (max over their weights).

This module registers no pass (a helper of the quantization family); of passes/ it imports only the shared
helpers in reconstruct.py.
"""

from __future__ import annotations

import logging
from typing import Callable, Iterable

import numpy as np
import onnx_graphsurgeon as gs

from onnxslim_kit.ir import Model, tensor_from_array
from onnxslim_kit.pass_base import PassContext
from passes.reconstruct import stream_activations

logger = logging.getLogger(__name__)

# Positively homogeneous activations: f(x / s) = f(x) / s for every s > 0, so they commute with CLE.
_HOMOGENEOUS = ("Relu", "LeakyRelu", "PRelu")
_SCALE_LIMIT = 1e4  # per-channel scales are clamped to [1/limit, limit]: dead channels must not explode


# ----------------------------------------------------------------------------------------------
# shared checks
# ----------------------------------------------------------------------------------------------

def _label(node: gs.Node) -> str:
    return node.name or f"<{node.op}>"


def _sole_use(model: Model, tensor: gs.Tensor, node: gs.Node) -> bool:
    """``node`` is the only reader of ``tensor`` (weights shared with another node cannot be rescaled
    for this node alone)."""
    return all(user is node for user in model.consumers(tensor)) and not model.is_graph_output(tensor)


def _constant_float(model: Model, tensor: gs.Tensor) -> np.ndarray | None:
    value = model.constant_value(tensor)
    if value is None or value.dtype != np.float32:
        return None
    return value


def _replace_constant(model: Model, node: gs.Node, index: int, value: np.ndarray, suffix: str) -> None:
    """Point ``node.inputs[index]`` at a new constant (weights are never modified in place); a Constant
    node left without readers is removed."""
    old = node.inputs[index] if index < len(node.inputs) else None
    base = old.name if old is not None and old.name else f"{_label(node)}_bias"
    new = tensor_from_array(model.unique_name(f"{base}_{suffix}"), np.asarray(value, np.float32))
    if old is None:
        while len(node.inputs) < index:
            node.inputs.append(gs.Variable.empty())
        node.inputs.append(new)
    else:
        node.inputs[index] = new
        producer = model.producer(old) if isinstance(old, gs.Variable) else None
        if producer is not None and producer.op == "Constant" and not model.consumers(old) \
                and not model.is_graph_output(old):
            model.remove_nodes([producer])
    model.invalidate()


def _conv_problem(model: Model, node: gs.Node) -> str | None:
    """Why this Conv's weight/bias cannot be rescaled, or None."""
    if len(node.inputs) < 2:
        return "Conv without a weight input"
    w = _constant_float(model, node.inputs[1])
    if w is None:
        return "weight is not a constant float32 tensor"
    if w.ndim < 3:
        return f"weight is {w.ndim}-D"
    if not _sole_use(model, node.inputs[1], node):
        return "weight is shared with another node"
    if len(node.inputs) > 2 and node.inputs[2].name:
        if _constant_float(model, node.inputs[2]) is None:
            return "bias is not a constant float32 tensor"
        if not _sole_use(model, node.inputs[2], node):
            return "bias is shared with another node"
    return None


# ----------------------------------------------------------------------------------------------
# cross-layer equalization
# ----------------------------------------------------------------------------------------------

def _in_channel_view(w2: np.ndarray, group: int) -> np.ndarray:
    """Second Conv's weight [Cout, Cin/g, ...] as [Cin, Cout/g * prod(kernel)]: row i = every weight that
    reads input channel i (its group's outputs)."""
    cout, cin_g = w2.shape[:2]
    k = int(np.prod(w2.shape[2:]))
    v = w2.reshape(group, cout // group, cin_g, k)          # [g, out_g, cin_g, k]
    return v.transpose(0, 2, 1, 3).reshape(group * cin_g, (cout // group) * k)


def _scale_in_channels(w2: np.ndarray, group: int, s: np.ndarray) -> np.ndarray:
    cout, cin_g = w2.shape[:2]
    v = w2.reshape(group, cout // group, cin_g, -1) * s.reshape(group, 1, cin_g, 1)
    return v.reshape(w2.shape).astype(np.float32)


def find_cle_pairs(model: Model, skipped: list[tuple[str, str]]) -> list[tuple[gs.Node, gs.Node]]:
    """(first Conv, second Conv) pairs that can be equalized; every Conv that cannot start a pair is
    recorded in ``skipped`` with its reason."""
    outer = model.outer_scope_names()
    pairs = []
    for node in model.nodes:
        if node.op != "Conv" or (node.domain or "") not in ("", "ai.onnx"):
            continue
        reason = _conv_problem(model, node)
        t = node.outputs[0]
        act = user = None
        while reason is None:  # walk Conv -> [one homogeneous activation] -> next node
            if model.is_graph_output(t) or t.name in outer:
                reason = "output is a graph output or read by a subgraph"
                break
            users = model.consumers(t)
            if len(users) != 1:
                reason = f"output has {len(users)} consumers (needs exactly one)"
                break
            user = users[0]
            if user.op not in _HOMOGENEOUS or user.inputs[0] is not t:
                break
            if act is not None:
                reason = f"two activations in a row ({act.op}, {user.op}) between Convs"
                break
            act, t = user, user.outputs[0]
        if reason is None:
            if user.op == "Clip":
                reason = ("Clip (Relu6) between the Convs is not scale-equivariant: its bounds are scalars "
                          "and cannot be rescaled per channel")
            elif user.op == "BatchNormalization":
                reason = "BatchNormalization between the Convs (run cleanup first: it folds BN into the Conv)"
            elif user.op != "Conv":
                reason = f"output feeds {user.op}, not a Conv"
            elif user.inputs[0] is not t:
                reason = "output is the second Conv's weight, not its data input"
            else:
                reason = _conv_problem(model, user)
                if reason is None:
                    w1 = model.constant_value(node.inputs[1])
                    w2 = model.constant_value(user.inputs[1])
                    group = int(user.attrs.get("group", 1))
                    if w2.shape[1] * group != w1.shape[0] or w2.shape[0] % group:
                        reason = (f"channel mismatch: first Conv has {w1.shape[0]} outputs, second reads "
                                  f"{w2.shape[1]} x group {group}")
                    else:
                        pairs.append((node, user))
                        continue
                reason = f"next Conv {_label(user)}: {reason}"
        skipped.append((_label(node), f"not equalized: {reason}"))
    return pairs


def equalize(model: Model, skipped: list[tuple[str, str]], *, iterations: int = 20,
             settle: float = 1e-4, pairs: list[tuple[gs.Node, gs.Node]] | None = None) -> dict[str, float]:
    """Cross-layer equalization of every eligible Conv pair's weight ranges, in place. Float-exact.
    ``pairs``: :func:`find_cle_pairs`' result when the caller has it (then nothing is recorded again)."""
    pairs = find_cle_pairs(model, skipped) if pairs is None else pairs
    if not pairs:
        return {"pairs_equalized": 0}
    weights, biases, nodes = _pair_weights(model, pairs)
    spread_before = _range_spread(weights.values())
    sweeps = 0
    for sweeps in range(1, iterations + 1):
        change = 0.0
        for first, second in pairs:
            w1, w2 = weights[id(first)], weights[id(second)]
            group = int(second.attrs.get("group", 1))
            r1 = np.abs(w1.reshape(w1.shape[0], -1)).max(axis=1)
            r2 = np.abs(_in_channel_view(w2, group)).max(axis=1)
            s = np.ones_like(r1)
            ok = (r1 > 0) & (r2 > 0)
            s[ok] = np.sqrt(r1[ok] * r2[ok]) / r2[ok]
            s = np.clip(s, 1.0 / _SCALE_LIMIT, _SCALE_LIMIT)
            _apply_scales(weights, biases, first, second, s)
            change = max(change, float(np.max(np.abs(np.log(s)))))
        if change < settle:
            break
    _store_pair_weights(model, weights, biases, nodes)
    return {"pairs_equalized": len(pairs), "equalize_sweeps": sweeps,
            "weight_range_spread_before": round(spread_before, 3),
            "weight_range_spread_after": round(_range_spread(weights.values()), 3)}


def _pair_weights(model: Model, pairs):
    """float64 copies of every paired Conv's weight and bias, keyed by id(node)."""
    weights: dict[int, np.ndarray] = {}
    biases: dict[int, np.ndarray] = {}
    nodes: dict[int, gs.Node] = {}
    for first, second in pairs:
        for node in (first, second):
            if id(node) not in weights:
                nodes[id(node)] = node
                weights[id(node)] = np.asarray(model.constant_value(node.inputs[1]), np.float64)
                if len(node.inputs) > 2 and node.inputs[2].name:
                    biases[id(node)] = np.asarray(model.constant_value(node.inputs[2]), np.float64)
    return weights, biases, nodes


def _apply_scales(weights, biases, first: gs.Node, second: gs.Node, s: np.ndarray) -> None:
    """Output channel i of ``first`` divided by s_i, input channel i of ``second`` multiplied by it."""
    w1 = weights[id(first)]
    weights[id(first)] = w1 / s.reshape((-1,) + (1,) * (w1.ndim - 1))
    if id(first) in biases:
        biases[id(first)] = biases[id(first)] / s
    group = int(second.attrs.get("group", 1))
    weights[id(second)] = _scale_in_channels(weights[id(second)], group, s).astype(np.float64)


def _store_pair_weights(model: Model, weights, biases, nodes) -> None:
    for key, node in nodes.items():
        _replace_constant(model, node, 1, weights[key], "equalized")
        if key in biases:
            _replace_constant(model, node, 2, biases[key], "equalized")


# Trade-offs tried per pair by activation-aware equalization: s_i = r_act_i^a / r_w2_i^(1 - a).
_ALPHAS = (0.0, 0.25, 0.5, 0.625, 0.75, 0.875, 1.0)
# A pair is rescaled only when the expected noise drops below this fraction of the unscaled one (1 dB):
# small predicted gains are within the error of the noise model and of calibration ranges on new data.
_MIN_GAIN = 0.8


def _mid_tensor(model: Model, first: gs.Node) -> gs.Tensor:
    """The tensor between a CLE pair that the quantizer quantizes: the activation's output, else the first
    Conv's output (find_cle_pairs guarantees one reader and at most one homogeneous activation)."""
    t = first.outputs[0]
    user = model.consumers(t)[0]
    return user.outputs[0] if user.op in _HOMOGENEOUS else t


def _channel_stats(model: Model, ctx: PassContext, names: list[str]) -> dict[str, dict[str, np.ndarray]]:
    """Per channel (axis 1) min, max and mean square of each named tensor over the calibration data."""
    stats: dict[str, dict[str, np.ndarray]] = {}
    for values in stream_activations_for(model, names, ctx):
        for name, v in values.items():
            v = np.asarray(v, np.float64)
            if v.ndim < 2:
                continue
            flat = np.moveaxis(v, 1, 0).reshape(v.shape[1], -1)
            st = stats.setdefault(name, {"lo": np.full(v.shape[1], np.inf), "hi": np.full(v.shape[1], -np.inf),
                                         "sq": np.zeros(v.shape[1]), "n": np.zeros(1)})
            if st["lo"].shape[0] != v.shape[1]:
                continue
            st["lo"] = np.minimum(st["lo"], flat.min(axis=1))
            st["hi"] = np.maximum(st["hi"], flat.max(axis=1))
            st["sq"] += (flat ** 2).sum(axis=1)
            st["n"] += flat.shape[1]
    for st in stats.values():
        st["m2"] = st["sq"] / max(float(st["n"][0]), 1.0)
    return stats


def _quant_noise(s: np.ndarray, mid: dict[str, np.ndarray], w1: np.ndarray, w2: np.ndarray, group: int,
                 in_power: float, per_channel: bool) -> float:
    """Expected output noise power of the second Conv when the pair is scaled by ``s`` and quantized as
    quantize-int8 does: per-tensor uint8 activations between the Convs, int8 symmetric weights (per output
    channel or per tensor). Sum of three uniform-rounding terms, each step^2 / 12 propagated through the
    (scaled) second Conv:
      activations: one step for every channel, Delta_a = (max_i hi_i/s_i - min_i lo_i/s_i) / 255;
      second Conv's weights: Delta_o = max_i |W2[o, i]| s_i / 127, against E[(x_i / s_i)^2];
      first Conv's weights (per tensor only; per channel they absorb s exactly): Delta = max_o r1_o / s_o / 127.
    Invariant to a common factor on s."""
    lo, hi = mid["lo"] / s, mid["hi"] / s
    step_a = (max(float(hi.max()), 0.0) - min(float(lo.min()), 0.0)) / 255.0
    cols = _in_channel_view(w2, group) * s[:, None]                  # [Cin, Cout/g * k]
    col_power = (cols ** 2).sum(axis=1)                               # what reaches the output per channel
    noise = step_a ** 2 / 12.0 * float(col_power.sum())
    cout, cin_g = w2.shape[:2]
    k = int(np.prod(w2.shape[2:]))
    w2s = _scale_in_channels(w2, group, s).reshape(cout, -1)
    step_w = np.abs(w2s).max(axis=1) / 127.0
    if not per_channel:
        step_w = np.full(cout, float(step_w.max()))
    x_power = (mid["m2"] / s ** 2).reshape(group, cin_g).sum(axis=1) * k          # per group
    noise += float((step_w.reshape(group, cout // group) ** 2 / 12.0 * x_power[:, None]).sum())
    if not per_channel:
        step_1 = float((np.abs(w1.reshape(w1.shape[0], -1)).max(axis=1) / s).max()) / 127.0
        taps = int(np.prod(w1.shape[1:]))
        noise += step_1 ** 2 / 12.0 * in_power * taps * float(col_power.sum())
    return noise


def equalize_activations(model: Model, ctx: PassContext, skipped: list[tuple[str, str]], *,
                         per_channel: bool = True, alpha: float | None = None,
                         pairs: list[tuple[gs.Node, gs.Node]] | None = None, note: str = "") -> dict[str, float]:
    """Activation-aware cross-layer equalization, in place (float-exact up to rounding).

    For each Conv -> [Relu | LeakyRelu | PRelu] -> Conv pair (find_cle_pairs), the per-channel RMS r_act
    of the tensor between them (the one a per-tensor activation grid quantizes) is read from the
    calibration data, and channel i is rescaled by s_i = r_act_i^a / r_w2_i^(1 - a) (r_w2_i: range of the
    second Conv's weights reading channel i; SmoothQuant's form applied to convs). a = 1 equalizes the
    activation channels outright; a < 1 leaves part of the spread there to keep the second Conv's weight
    grid fine. ``alpha`` None: per pair, the a with the least expected output noise under
    quantize-int8's grids (_quant_noise), or no rescaling unless that gains >= 1 dB; per-channel weights
    absorb the scales of the first Conv and of a depthwise second Conv exactly, so there the activation
    channels are usually equalized fully. Skipped pairs are recorded with the reason, after ``note``.
    ``pairs``: :func:`find_cle_pairs`' result when the caller has it (then nothing is recorded again)."""
    pairs = find_cle_pairs(model, skipped) if pairs is None else pairs
    if not pairs:
        return {"pairs_equalized": 0}
    if alpha is not None and not 0.0 <= alpha <= 1.0:
        raise ValueError("alpha must be in [0, 1]")
    mids = {id(first): _mid_tensor(model, first).name for first, _ in pairs}
    ins = {id(first): first.inputs[0].name for first, _ in pairs}
    # The first Conv's input power only enters the per-tensor weight noise (_quant_noise): not streamed
    # (often an image-sized tensor) when weights are per channel.
    stats = _channel_stats(model, ctx, sorted(set(mids.values()) | (set() if per_channel else set(ins.values()))))
    weights, biases, nodes = _pair_weights(model, pairs)
    done, alphas, spread_before, spread_after, ratios = 0, [], [], [], []
    changed: set[int] = set()
    for first, second in pairs:
        mid = stats.get(mids[id(first)])
        w1, w2 = weights[id(first)], weights[id(second)]
        group = int(second.attrs.get("group", 1))
        if mid is None or mid["lo"].shape[0] != w1.shape[0] or not np.isfinite(mid["hi"]).all():
            skipped.append((_label(first), note + "not equalized: no calibration values for the tensor between the Convs"))
            continue
        r_act = np.sqrt(mid["m2"])          # RMS, not max: see equalize_activations' docstring
        r_max = np.maximum(np.abs(mid["lo"]), np.abs(mid["hi"]))
        r_w2 = np.abs(_in_channel_view(w2, group)).max(axis=1)
        live = (r_max > 0) & (r_w2 > 0)
        if not live.any():
            skipped.append((_label(first), note + "not equalized: every channel between the Convs is zero"))
            continue
        inp = stats.get(ins[id(first)])
        in_power = float(inp["m2"].mean()) if inp is not None else 0.0
        candidates = [(None, np.ones_like(r_act))]
        for a in (_ALPHAS if alpha is None else (alpha,)):
            s = np.ones_like(r_act)
            s[live] = np.power(r_act[live], a) / np.power(r_w2[live], 1.0 - a)
            s[~live] = np.exp(np.log(s[live]).mean())               # dead channels: neutral scale
            s = s / np.exp(np.log(s).mean())                         # keep magnitudes where they were
            candidates.append((a, np.clip(s, 1.0 / _SCALE_LIMIT, _SCALE_LIMIT)))
        noise = [_quant_noise(s, mid, w1, w2, group, in_power, per_channel) for _, s in candidates]
        best = int(np.argmin(noise)) if alpha is None else 1
        if alpha is None and noise[best] > _MIN_GAIN * noise[0]:
            best = 0
        a, s = candidates[best]
        spread_before.append(float(r_max.max() / np.median(r_max[live])))
        if a is None:
            spread_after.append(spread_before[-1])
            skipped.append((_label(first), note + "not equalized: no rescaling lowers the expected quantization noise "
                                           "by 1 dB or more"))
            continue
        ra = r_max / s
        ratios.append(noise[best] / noise[0])
        spread_after.append(float(ra.max() / np.median(ra[live])))
        _apply_scales(weights, biases, first, second, s)
        changed.update((id(first), id(second)))
        alphas.append(a)
        done += 1
    if not done:
        return {"pairs_equalized": 0}
    _store_pair_weights(model, weights, biases, {k: n for k, n in nodes.items() if k in changed})
    return {"pairs_equalized": done, "equalize_alpha_mean": round(float(np.mean(alphas)), 3),
            "activation_range_spread_before": round(float(np.mean(spread_before)), 3),
            "activation_range_spread_after": round(float(np.mean(spread_after)), 3),
            "equalize_expected_noise_ratio": round(float(np.mean(ratios)), 3)}


def _range_spread(weights: Iterable[np.ndarray]) -> float:
    """Mean over weights of max / mean per-output-channel range: how much a per-tensor grid wastes."""
    spreads = []
    for w in weights:
        r = np.abs(w.reshape(w.shape[0], -1)).max(axis=1)
        if r.mean() > 0:
            spreads.append(float(r.max() / r.mean()))
    return float(np.mean(spreads)) if spreads else 1.0


# ----------------------------------------------------------------------------------------------
# bias correction
# ----------------------------------------------------------------------------------------------

def weight_axis(node: gs.Node) -> int:
    """Output-channel axis of a compute node's weight (the axis quantize-int8 quantizes per channel)."""
    if node.op == "Conv":
        return 0
    if node.op == "Gemm":
        return 0 if node.attrs.get("transB", 0) else 1
    return 1


def _bias_slot(model: Model, node: gs.Node, n_out: int):
    """(node holding the bias, input index, current bias [n_out] or None), or the reason there is none."""
    if node.op in ("Conv", "Gemm"):
        if len(node.inputs) > 2 and node.inputs[2].name:
            b = _constant_float(model, node.inputs[2])
            if b is None:
                return "bias is not a constant float32 tensor"
            if b.size != n_out or b.shape[-1:] != (n_out,) or b.ndim > 2 or (b.ndim == 2 and node.op == "Conv"):
                return f"bias of shape {list(b.shape)} is not one value per output channel"
            return node, 2, b.reshape(-1)
        return node, 2, None
    out = node.outputs[0]
    users = model.consumers(out)
    if len(users) != 1 or users[0].op != "Add" or model.is_graph_output(out):
        return "MatMul is not followed by a single constant bias Add to absorb the correction"
    add = users[0]
    other = 1 if add.inputs[0] is out else 0
    b = _constant_float(model, add.inputs[other])
    if b is None or b.size != n_out or b.shape[-1:] != (n_out,):
        return "MatMul is not followed by a single constant bias Add to absorb the correction"
    return add, other, b.reshape(-1)


def correct_biases(model: Model, ctx: PassContext, node_names: list[str],
                   fake_quant: Callable[[np.ndarray, int], np.ndarray],
                   skipped: list[tuple[str, str]]) -> tuple[dict[str, float], dict[str, tuple]]:
    """Subtract the expected output shift E[x] . (W_q - W) from each named node's bias, in place.

    ``fake_quant(weight, axis)`` returns the weight as the quantizer will store it (quantized then
    dequantized). Returns stats and, per corrected node, how to undo it: (holder node, index, old
    input tensor or None), for nodes the quantizer later keeps in float."""
    wanted = set(node_names)
    nodes = [n for n in model.nodes if n.name in wanted and n.op in ("Conv", "MatMul", "Gemm")]
    plans = []
    for node in nodes:
        w = _constant_float(model, node.inputs[1])
        if w is None:
            skipped.append((_label(node), "bias correction: weight is not a constant float32 tensor"))
            continue
        axis = weight_axis(node)
        n_out = w.shape[axis]
        slot = _bias_slot(model, node, n_out)
        if isinstance(slot, str):
            skipped.append((_label(node), f"bias correction: {slot}"))
            continue
        dw = fake_quant(w, axis).astype(np.float64) - w.astype(np.float64)
        width = w.shape[1] * int(node.attrs.get("group", 1)) if node.op == "Conv" else w.shape[1 - axis]
        plans.append((node, dw, slot, width))
    if not plans:
        return {"biases_corrected": 0}, {}
    inputs = sorted({node.inputs[0].name for node, _, _, _ in plans})
    sums: dict[str, np.ndarray] = {}
    counts: dict[str, int] = {}
    channel_axis = {node.inputs[0].name: (1 if node.op == "Conv" else -1) for node, _, _, _ in plans}
    for values in stream_activations_for(model, inputs, ctx):
        for name, v in values.items():
            v = np.moveaxis(np.asarray(v, np.float64), channel_axis[name], -1)
            flat = v.reshape(-1, v.shape[-1])
            sums[name] = sums.get(name, 0.0) + flat.sum(axis=0)
            counts[name] = counts.get(name, 0) + flat.shape[0]
    undo: dict[str, tuple] = {}
    shifts = []
    for node, dw, (holder, index, bias), width in plans:
        name = node.inputs[0].name
        if not counts.get(name):
            skipped.append((_label(node), "bias correction: no calibration values for the input"))
            continue
        mean = sums[name] / counts[name]
        if mean.size != width:
            skipped.append((_label(node), f"bias correction: input has {mean.size} channels, weight reads {width}"))
            continue
        if node.op == "Conv":
            group = int(node.attrs.get("group", 1))
            cout, cin_g = dw.shape[:2]
            dsum = dw.reshape(cout, cin_g, -1).sum(axis=2)                  # [Cout, Cin/g]
            per_group = mean.reshape(group, cin_g)                           # [g, Cin/g]
            shift = np.einsum("gok,gk->go", dsum.reshape(group, cout // group, cin_g), per_group).reshape(-1)
        elif node.op == "Gemm" and node.attrs.get("transB", 0):
            shift = dw @ mean                                                # W [N, K]
        else:
            shift = mean @ dw                                                # W [K, N]
        old = holder.inputs[index] if index < len(holder.inputs) and holder.inputs[index].name else None
        base = np.zeros(shift.shape, np.float64) if bias is None else bias.astype(np.float64)
        new = (base - shift).astype(np.float32)
        if holder.op == "Add":
            new = new.reshape(model.constant_value(old).shape)
        _replace_constant(model, holder, index, new, "bias_corrected")
        undo[node.name] = (holder, index, old)
        shifts.append(float(np.max(np.abs(shift))))
    return {"biases_corrected": len(undo),
            "bias_correction_max_shift": round(max(shifts), 6) if shifts else 0.0}, undo


def undo_bias_correction(model: Model, undo: dict[str, tuple], names: Iterable[str]) -> None:
    """Give the named nodes their original bias back (the quantizer kept them in float)."""
    for name in names:
        if name not in undo:
            continue
        holder, index, old = undo[name]
        if old is None:
            holder.inputs[index] = gs.Variable.empty()
            while holder.inputs and not holder.inputs[-1].name:
                holder.inputs.pop()
        else:
            holder.inputs[index] = old
    model.invalidate()


def stream_activations_for(model: Model, names: list[str], ctx: PassContext):
    return stream_activations(model, names, ctx, "accuracy aids: reading activations")


# ----------------------------------------------------------------------------------------------
# SmoothQuant
# ----------------------------------------------------------------------------------------------

def _smooth_weight(model: Model, node: gs.Node):
    """(weight [K, N] view, row axis of the stored weight) for a MatMul/Gemm, or the reason to skip."""
    if len(node.inputs) < 2:
        return "no weight input"
    w = _constant_float(model, node.inputs[1])
    if w is None:
        return "weight is not a constant float32 tensor"
    if w.ndim != 2:
        return f"weight is {w.ndim}-D, not 2-D"
    if node.op == "Gemm" and (node.attrs.get("transA", 0) or float(node.attrs.get("alpha", 1.0)) != 1.0):
        return "Gemm with transA or alpha != 1"
    if not _sole_use(model, node.inputs[1], node):
        return "weight is shared with another node"
    if node.op == "Gemm" and node.attrs.get("transB", 0):
        return w.T, 1
    return w, 0


def _layernorm_fold(model: Model, x: gs.Tensor, users: list[gs.Node], k: int):
    """(LayerNormalization node, scale, bias or None) when X/s can be folded into it, else None."""
    ln = model.producer(x)
    if ln is None or ln.op != "LayerNormalization" or (ln.domain or "") not in ("", "ai.onnx"):
        return None
    if ln.outputs[0] is not x or model.is_graph_output(x) or len(model.consumers(x)) != len(users):
        return None
    if int(ln.attrs.get("axis", -1)) != -1:
        return None
    scale = _constant_float(model, ln.inputs[1])
    if scale is None or scale.shape != (k,) or not _sole_use(model, ln.inputs[1], ln):
        return None
    bias = None
    if len(ln.inputs) > 2 and ln.inputs[2].name:
        bias = _constant_float(model, ln.inputs[2])
        if bias is None or bias.shape != (k,) or not _sole_use(model, ln.inputs[2], ln):
            return None
    return ln, scale, bias


def smooth_quant(model: Model, ctx: PassContext, alpha: float, node_names: list[str],
                 skipped: list[tuple[str, str]]) -> dict[str, float]:
    """SmoothQuant for the named MatMul/Gemm nodes, in place (float-exact up to rounding)."""
    if not 0.0 <= alpha <= 1.0:
        raise ValueError("smoothquant alpha must be in [0, 1]")
    wanted = set(node_names)
    outer = model.outer_scope_names()
    groups: dict[str, list[tuple[gs.Node, np.ndarray, int]]] = {}
    for node in model.nodes:
        if node.name not in wanted or node.op not in ("MatMul", "Gemm"):
            continue
        plan = _smooth_weight(model, node)
        x = node.inputs[0]
        if isinstance(plan, str):
            skipped.append((_label(node), f"smoothquant: {plan}"))
            continue
        if x.name in outer or model.constant_value(x) is not None:
            skipped.append((_label(node), "smoothquant: input is constant or read by a subgraph"))
            continue
        groups.setdefault(x.name, []).append((node, plan[0], plan[1]))
    for name in list(groups):
        ks = {w.shape[0] for _, w, _ in groups[name]}
        if len(ks) != 1:
            for node, _, _ in groups.pop(name):
                skipped.append((_label(node), "smoothquant: consumers of the input disagree on its width"))
    if not groups:
        return {"matmuls_smoothed": 0}
    amax = {name: None for name in groups}
    for values in stream_activations_for(model, sorted(groups), ctx):
        for name, v in values.items():
            v = np.abs(np.asarray(v, np.float32))
            m = v.reshape(-1, v.shape[-1]).max(axis=0)
            amax[name] = m if amax[name] is None else np.maximum(amax[name], m)
    tensors = model.tensors()
    stats = {"matmuls_smoothed": 0, "smooth_folded_into_layernorm": 0, "smooth_mul_inserted": 0}
    for name, members in groups.items():
        x = tensors[name]
        k = members[0][1].shape[0]
        ax = amax[name]
        if ax is None or ax.shape != (k,):
            for node, _, _ in members:
                skipped.append((_label(node), "smoothquant: input's last axis does not match the weight rows"))
            continue
        aw = np.max([np.abs(w).max(axis=1) for _, w, _ in members], axis=0)
        s = np.ones(k, np.float64)
        ok = (ax > 0) & (aw > 0)
        s[ok] = np.power(ax[ok].astype(np.float64), alpha) / np.power(aw[ok].astype(np.float64), 1.0 - alpha)
        s = np.clip(s, 1.0 / _SCALE_LIMIT, _SCALE_LIMIT)
        users = [node for node, _, _ in members]
        fold = _layernorm_fold(model, x, users, k)
        if fold is not None:
            ln, scale, bias = fold
            _replace_constant(model, ln, 1, scale / s, "smoothed")
            if bias is not None:
                _replace_constant(model, ln, 2, bias / s, "smoothed")
            stats["smooth_folded_into_layernorm"] += 1
        else:
            inv = tensor_from_array(model.unique_name(name + "_smooth_inv_scale"), (1.0 / s).astype(np.float32))
            xs = gs.Variable(model.unique_name(name + "_smoothed"), dtype=np.float32, shape=x.shape)
            model.graph.nodes.append(gs.Node("Mul", model.unique_name(name + "_smooth"), inputs=[x, inv],
                                             outputs=[xs]))
            for node in users:
                node.inputs[0] = xs
            stats["smooth_mul_inserted"] += 1
        for node, w, row_axis in members:
            stored = model.constant_value(node.inputs[1])
            shape = (-1, 1) if row_axis == 0 else (1, -1)
            _replace_constant(model, node, 1, stored * s.reshape(shape).astype(np.float32), "smoothed")
            stats["matmuls_smoothed"] += 1
    model.invalidate()
    model.toposort()
    return stats
