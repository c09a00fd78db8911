"""A small builder for ONNX function bodies (used by the ``portable`` pass).

The portable bodies are straight-line graphs of standard ops; writing them with
``onnx.helper`` directly means inventing a name for every intermediate value. This
builder names values itself, turns Python numbers into typed ``Constant`` nodes and
reads function attributes through ``ref_attr_name`` constants, so each body reads
like the formula it implements.
"""

from __future__ import annotations

from typing import Any

import numpy as np
from onnx import FunctionProto, TensorProto, helper, numpy_helper

ONNX_OPSET = 21


class FunctionBuilder:
    """Collects the nodes of one function body."""

    def __init__(self, prefix: str = "t") -> None:
        self.nodes: list[Any] = []
        self._prefix = prefix
        self._count = 0

    def _name(self, hint: str) -> str:
        self._count += 1
        return f"{self._prefix}{self._count}_{hint}"

    def op(self, op_type: str, *inputs: str, outputs: int = 1, node_name: str | None = None, **attrs: Any) -> Any:
        """Append a node; returns its output name (or a list when ``outputs > 1``). ``node_name``
        names the node where a runtime's error message would otherwise say ``Name:''``."""
        names = [self._name(op_type.lower()) for _ in range(outputs)]
        self.nodes.append(helper.make_node(op_type, list(inputs), names, name=node_name, **attrs))
        return names[0] if outputs == 1 else names

    def const(self, value: Any, dtype: Any = np.int64) -> str:
        """A constant tensor (a scalar becomes shape ``[]``; lists keep their shape)."""
        array = np.asarray(value, dtype=dtype)
        out = self._name("const")
        self.nodes.append(helper.make_node("Constant", [], [out], value=numpy_helper.from_array(array, out)))
        return out

    def attr(self, name: str, kind: str) -> str:
        """The value of function attribute ``name`` (``kind`` = value_int / value_float / ...)."""
        out = self._name(name)
        node = helper.make_node("Constant", [], [out], **{kind: 0 if kind == "value_int" else 0.0})
        node.attribute[0].ref_attr_name = name
        self.nodes.append(node)
        return out

    def reshape(self, tensor: str, shape: str) -> str:
        """Reshape to a computed shape; ``allowzero`` because a computed 0 means an empty axis, not "copy"."""
        return self.op("Reshape", tensor, shape, allowzero=1)

    def dim(self, tensor: str, start: int, end: int | None = None) -> str:
        """``Shape(tensor)[start:end]`` as an int64 1-D tensor."""
        kwargs = {"start": start} if end is None else {"start": start, "end": end}
        return self.op("Shape", tensor, **kwargs)

    def rename(self, value: str, name: str) -> None:
        """Bind ``value`` to the formal output ``name``."""
        self.nodes.append(helper.make_node("Identity", [value], [name]))

    def function(self, domain: str, name: str, inputs: list[str], outputs: list[str],
                 attributes: dict[str, Any] | None = None, overload: str = "") -> FunctionProto:
        """The function; ``attributes`` maps each attribute name to its default (None: required)."""
        attributes = attributes or {}
        fn = helper.make_function(domain, name, inputs, outputs, self.nodes, [helper.make_opsetid("", ONNX_OPSET)],
                                  attributes=[a for a, d in attributes.items() if d is None])
        for attr_name, default in attributes.items():
            if default is not None:
                fn.attribute_proto.append(helper.make_attribute(attr_name, default))
        if overload:
            fn.overload = overload
        return fn


FLOAT = TensorProto.FLOAT
DOUBLE = TensorProto.DOUBLE
INT64 = TensorProto.INT64
UINT64 = TensorProto.UINT64
UINT8 = TensorProto.UINT8
FLOAT16 = TensorProto.FLOAT16
BOOL = TensorProto.BOOL
