"""Graph passes on OpenVINO models (same math, fewer memory passes at run time).

:func:`quantize_concat_inputs`, :func:`one_pass_variance` and :func:`quantize_before_concat` are applied
to every IR :mod:`export_openvino` writes: they move work that the CPU plugin would do on f32
tensors onto fewer or narrower passes, and change the output by float rounding at most. Each pass
leaves a graph it does not recognise unchanged and returns how many places it rewrote. ``openvino`` is
imported inside functions only.

Tried and left out: the float convolutions after the last quantizer (IMDN's upsampler, the slowest node)
in bf16 halve that node's time, but the CPU plugin also rounds the conv's output to bf16, which cost
0.010 dB (``default``) and 0.016 dB (``default-w2``) of Set5 PSNR, beyond the 0.01 dB an export may move.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any


def _opset() -> Any:
    import openvino as ov

    return ov.opset13


def _consumers(output: Any, live: set[str] | None = None) -> list[Any]:
    """The nodes reading ``output`` (only those in ``live``, by name, when given: a replaced node's old
    inputs keep it as a reader until the graph is cleaned up)."""
    nodes = [t.get_node() for t in output.get_target_inputs()]
    return nodes if live is None else [n for n in nodes if n.get_name() in live]


def _same(a: Any, b: Any) -> bool:
    return a.get_node().get_name() == b.get_node().get_name() and a.get_index() == b.get_index()


def _constant(value: Any) -> Any:
    """The numpy value of ``value`` when it is a Constant, else None."""
    node = value.get_node()
    return node.get_data() if node.get_type_name() == "Constant" else None


def _channel_widths(cat: Any) -> list[int] | None:
    """Channel widths of a 4-D ``Concat`` on axis 1 with static widths, else None."""
    if cat.get_type_name() != "Concat" or cat.get_attributes().get("axis") not in (1, -3):
        return None
    shapes = [v.get_partial_shape() for v in cat.input_values()]
    if any(s.rank.is_dynamic or s.rank.get_length() != 4 or not s[1].is_static for s in shapes):
        return None
    return [s[1].get_length() for s in shapes]


def _channel_slices(value: Any, widths: list[int]) -> list[Any]:
    """``value`` cut into ``widths`` along axis 1: constants sliced, a 1-channel (broadcast) value kept,
    any other tensor through ``Slice``."""
    import numpy as np

    opset, data, out, start = _opset(), _constant(value), [], 0
    shape = value.get_partial_shape()
    for width in widths:
        if data is not None:
            piece = data if data.ndim < 4 or data.shape[1] == 1 else data[:, start:start + width]
            out.append(opset.constant(np.ascontiguousarray(piece)).output(0))
        elif shape.rank.is_static and shape.rank.get_length() == 4 and shape[1].is_static and shape[1].get_length() == 1:
            out.append(value)
        else:
            out.append(opset.slice(value, np.array([start]), np.array([start + width]), np.array([1]),
                                   np.array([1])).output(0))
        start += width
    return out


def _channel_concats(ov_model: Any) -> Iterator[tuple[Any, list[int], set[str]]]:
    """(concat, its channel widths, the names of the live nodes) for each channel Concat of ``ov_model``."""
    ops = list(ov_model.get_ordered_ops())
    live = {op.get_name() for op in ops}
    for cat in ops:
        widths = _channel_widths(cat)
        if widths is not None:
            yield cat, widths, live


def _clamps_then_quantizer(node: Any, live: set[str]) -> tuple[list[Any], Any]:
    """(the Minimum/Maximum-by-constant ops, the FakeQuantize) that alone follow ``node``, each the only
    reader of the one before; ``([], None)`` when the chain ends elsewhere."""
    chain = []
    while True:
        users = _consumers(node.output(0), live)
        if len(users) != 1:
            return [], None
        node = users[0]
        if node.get_type_name() == "FakeQuantize":
            return chain, (node if all(_constant(node.input_value(i)) is not None for i in range(1, 5)) else None)
        if node.get_type_name() not in ("Minimum", "Maximum") or _constant(node.input_value(1)) is None:
            return [], None
        chain.append(node)


def quantize_concat_inputs(ov_model: Any) -> int:
    """``FakeQuantize(clamps(Concat(x1..xn)))`` -> ``Concat(FakeQuantize(clamps(x1))..)``; returns how many.

    Exact: FakeQuantize and the constant clamps (Minimum/Maximum, as 2-bit quantizers are written) are
    element-wise with per-tensor or per-channel constants, so each input gets its channels' slice of
    them. It lets the CPU plugin run the concatenation in u8 instead of writing and re-reading it in f32
    (IMDN's final 6-way concatenation, 384 channels; bit-identical output).
    """
    opset, done = _opset(), 0
    for cat, widths, live in _channel_concats(ov_model):
        chain, fq = _clamps_then_quantizer(cat, live)
        if fq is None:
            continue
        fq.output(0).replace(opset.concat(_quantized_parts(cat.input_values(), widths, chain, fq), 1).output(0))
        done += 1
    if done:
        ov_model.validate_nodes_and_infer_types()
    return done


def _quantized_parts(inputs: list[Any], widths: list[int], chain: list[Any], fq: Any,
                     scale: Any = None) -> list[Any]:
    """``FakeQuantize(clamps(x_k [* scale_k]))`` for each input ``x_k``, with each constant's channel slice."""
    opset = _opset()
    scales = _channel_slices(scale, widths) if scale is not None else None
    bounds = [(op.get_type_name(), _channel_slices(op.input_value(1), widths)) for op in chain]
    ranges = [_channel_slices(fq.input_value(i), widths) for i in range(1, 5)]
    parts = []
    for k, x in enumerate(inputs):
        y = x if scales is None else opset.multiply(x, scales[k]).output(0)
        for kind, bound in bounds:
            y = (opset.minimum if kind == "Minimum" else opset.maximum)(y, bound[k]).output(0)
        parts.append(opset.fake_quantize(y, *(r[k] for r in ranges), fq.get_attributes()["levels"]).output(0))
    return parts


def one_pass_variance(ov_model: Any) -> int:
    """``ReduceMean((x - ReduceMean(x, a))^2, a)`` -> ``ReduceL2(x, a)^2 / n - ReduceMean(x, a)^2``.

    IMDN's contrast channel attention computes a per-channel variance over H and W; as written it reads
    ``x`` three times and writes ``(x - mean)^2`` once, rewritten it reads ``x`` twice (both reductions)
    and writes nothing. The value differs by float32 rounding (a variance that rounds below zero is
    clamped by the model's own ``clamp_min`` before the square root). ``n`` is the product of the reduced
    dimensions, read from ``x``'s shape at run time (dynamic H/W).
    """
    import numpy as np

    opset, done = _opset(), 0
    for outer in list(ov_model.get_ordered_ops()):
        if outer.get_type_name() != "ReduceMean" or not outer.get_attributes().get("keep_dims"):
            continue
        square = outer.input_value(0).get_node()
        if square.get_type_name() != "Power" or not np.all(_constant(square.input_value(1)) == 2):
            continue
        sub = square.input_value(0).get_node()
        if sub.get_type_name() != "Subtract":
            continue
        x, mean = sub.input_value(0), sub.input_value(1)
        inner = mean.get_node()
        axes = _constant(outer.input_value(1))
        if inner.get_type_name() != "ReduceMean" or not _same(inner.input_value(0), x) or axes is None or \
                not np.array_equal(_constant(inner.input_value(1)), axes) or not inner.get_attributes()["keep_dims"]:
            continue
        rank = x.get_partial_shape().rank
        if rank.is_dynamic:
            continue
        axes = np.sort(np.asarray(axes, dtype=np.int64).ravel() % rank.get_length())
        l2 = opset.reduce_l2(x, opset.constant(axes), True)
        dims = opset.gather(opset.shape_of(x), opset.constant(axes), opset.constant(np.int64(0)))
        count = opset.convert(opset.reduce_prod(dims, opset.constant(np.int64(0)), True), x.get_element_type())
        var = opset.subtract(opset.divide(opset.multiply(l2, l2), count), opset.multiply(mean, mean))
        outer.output(0).replace(var.output(0))
        done += 1
    if done:
        ov_model.validate_nodes_and_infer_types()
    return done


def _reduces_other_axes(node: Any) -> bool:
    """A keep-dims ReduceMean/ReduceL2 over constant axes that exclude the channel axis 1."""
    import numpy as np

    if node.get_type_name() not in ("ReduceMean", "ReduceL2") or not node.get_attributes().get("keep_dims"):
        return False
    axes = _constant(node.input_value(1))
    return axes is not None and not np.any(np.asarray(axes) % 4 == 1)


def _shape_user_skips_channels(node: Any) -> bool:
    """A ShapeOf whose every use is a Gather of constant indices other than the channel axis 1."""
    import numpy as np

    if node.get_type_name() != "ShapeOf":
        return False
    for user in _consumers(node.output(0)):
        index = _constant(user.input_value(1)) if user.get_type_name() == "Gather" else None
        if index is None or _constant(user.input_value(2)) != 0 or np.any(np.asarray(index) % 4 == 1):
            return False
    return True


def quantize_before_concat(ov_model: Any) -> int:
    """Per-channel work on a channel concatenation, done per input so the concatenation moves past the
    next FakeQuantize and runs in u8; returns how many concatenations moved.

    Matches ``c = Concat(x1..xn)`` (axis 1) used only by channel-wise reductions over other axes (and
    the shape they divide by) and by one ``Multiply(c, s)`` with a per-channel ``s`` whose only user is a
    FakeQuantize (possibly behind constant clamps, as 2-bit quantizers are written) -- IMDN's
    distillation concat, its contrast channel attention and the fusion conv's input quantizer.
    Rewritten: each reduction as the concatenation of the reductions of ``x1..xn`` (tiny), and the
    FakeQuantize output as ``Concat(FakeQuantize(clamps(xk * s_k)))``. Exact: every op involved is per
    channel.
    """
    opset, done = _opset(), 0
    for cat, widths, live in _channel_concats(ov_model):
        users = _consumers(cat.output(0), live)
        muls = [u for u in users if u.get_type_name() == "Multiply"]
        rest = [u for u in users if u.get_type_name() != "Multiply"]
        if len(muls) != 1 or not all(_reduces_other_axes(u) or _shape_user_skips_channels(u) for u in rest):
            continue
        mul = muls[0]
        scale = mul.input_value(1) if _same(mul.input_value(0), cat.output(0)) else mul.input_value(0)
        shape = scale.get_partial_shape()
        if shape.rank.is_dynamic or shape.rank.get_length() != 4 or any(not shape[i].is_static for i in (1, 2, 3)) \
                or [shape[i].get_length() for i in (2, 3)] != [1, 1]:
            continue
        chain, fq = _clamps_then_quantizer(mul, live)
        if fq is None:
            continue
        inputs = cat.input_values()
        for user in rest:
            if user.get_type_name() == "ShapeOf":
                user.input(0).replace_source_output(inputs[0])
                continue
            make = opset.reduce_mean if user.get_type_name() == "ReduceMean" else opset.reduce_l2
            parts = [make(x, user.input_value(1), True).output(0) for x in inputs]
            user.output(0).replace(opset.concat(parts, 1).output(0))
        parts = _quantized_parts(inputs, widths, chain, fq, scale)
        fq.output(0).replace(opset.concat(parts, 1).output(0))
        done += 1
    if done:
        ov_model.validate_nodes_and_infer_types()
    return done
