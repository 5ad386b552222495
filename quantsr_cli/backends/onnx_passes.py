"""Graph passes on exported ONNX models (same math, fewer memory passes at run time).

:func:`split_conv_outputs` rewrites ``Conv -> (LeakyRelu|Relu) -> Split(axis=1)`` -- IMDN's
distillation step -- into one ``Conv -> activation`` per split part, each with its slice of the
output channels (weights, per-channel scales, bias). The runtime then writes each part straight to
where it is used: no split copy, and OpenVINO can fuse the next layer's ``FakeQuantize`` into the
convolution that feeds it (its output is then u8 instead of f32).
"""

from __future__ import annotations

from collections import defaultdict
from typing import Any

_ACTIVATIONS = ("LeakyRelu", "Relu")


def _attr(node: Any, name: str, default: int) -> int:
    return next((a.i for a in node.attribute if a.name == name), default)


def split_conv_outputs(proto: Any) -> int:
    """Apply the rewrite in place; returns how many splits were removed."""
    from onnx import helper, numpy_helper

    graph = proto.graph
    inits = {t.name: t for t in graph.initializer}
    producer = {o: n for n in graph.node for o in n.output}
    users: dict[str, list[Any]] = defaultdict(list)
    for node in graph.node:
        for name in node.input:
            users[name].append(node)
    outputs = {o.name for o in graph.output}
    replace: dict[int, list[Any]] = {}
    drop: set[int] = set()
    new_inits = []
    for split in [n for n in graph.node if n.op_type == "Split"]:
        if _attr(split, "axis", 0) != 1 or len(split.input) < 2 or split.input[1] not in inits:
            continue
        sizes = [int(s) for s in numpy_helper.to_array(inits[split.input[1]]).ravel()]
        act = producer.get(split.input[0])
        conv = act
        if act is not None and act.op_type in _ACTIVATIONS:
            conv = producer.get(act.input[0])
        else:
            act = None
        if conv is None or conv.op_type != "Conv" or len(users[conv.output[0]]) != 1:
            continue
        if (act is not None and len(users[act.output[0]]) != 1) or {conv.output[0], split.input[0]} & outputs:
            continue
        dq = producer.get(conv.input[1])
        if dq is not None and dq.op_type == "DequantizeLinear" and len(dq.input) == 2 and \
                dq.input[0] in inits and dq.input[1] in inits and len(users[conv.input[1]]) == 1:
            values, scale = numpy_helper.to_array(inits[dq.input[0]]), numpy_helper.to_array(inits[dq.input[1]])
        elif conv.input[1] in inits:
            dq, values, scale = None, numpy_helper.to_array(inits[conv.input[1]]), None
        else:
            continue
        has_bias = len(conv.input) > 2 and conv.input[2]
        if has_bias and conv.input[2] not in inits or sum(sizes) != values.shape[0]:
            continue
        bias = numpy_helper.to_array(inits[conv.input[2]]) if has_bias else None
        nodes, start = [], 0
        for j, (size, out) in enumerate(zip(sizes, split.output)):
            part, start = slice(start, start + size), start + size
            stem = f"{conv.name or conv.output[0]}__part{j}"
            new_inits.append(numpy_helper.from_array(values[part].copy(), f"{stem}.w"))
            weight = f"{stem}.w"
            if dq is not None:
                per_channel = scale.ndim == 1 and scale.size > 1
                new_inits.append(numpy_helper.from_array(scale[part].copy() if per_channel else scale, f"{stem}.s"))
                nodes.append(helper.make_node("DequantizeLinear", [weight, f"{stem}.s"], [f"{stem}.wd"],
                                              name=f"{stem}.dq", **_attrs(dq)))
                weight = f"{stem}.wd"
            inputs = [conv.input[0], weight]
            if bias is not None:
                new_inits.append(numpy_helper.from_array(bias[part].copy(), f"{stem}.b"))
                inputs.append(f"{stem}.b")
            conv_out = out if act is None else f"{stem}.y"
            nodes.append(helper.make_node("Conv", inputs, [conv_out], name=f"{stem}.conv", **_attrs(conv)))
            if act is not None:
                nodes.append(helper.make_node(act.op_type, [conv_out], [out], name=f"{stem}.act", **_attrs(act)))
        index = {id(n): i for i, n in enumerate(graph.node)}
        replace[index[id(split)]] = nodes
        drop.update(index[id(n)] for n in (conv, act, dq) if n is not None)
    if not replace:
        return 0
    kept = []
    for i, node in enumerate(graph.node):
        if i in replace:
            kept.extend(replace[i])
        elif i not in drop:
            kept.append(node)
    del graph.node[:]
    graph.node.extend(kept)
    graph.initializer.extend(new_inits)
    used = {name for node in graph.node for name in node.input}
    live = [t for t in graph.initializer if t.name in used]
    del graph.initializer[:]
    graph.initializer.extend(live)
    names = {o for n in graph.node for o in n.output}
    infos = [v for v in graph.value_info if v.name in names]
    del graph.value_info[:]
    graph.value_info.extend(infos)
    return len(replace)


def _attrs(node: Any) -> dict[str, Any]:
    from onnx import helper

    return {a.name: helper.get_attribute_value(a) for a in node.attribute}
