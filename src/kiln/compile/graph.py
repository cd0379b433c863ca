"""A small ONNX graph builder: named values, initializers from numpy, nodes in the order they run.

The decoder graphs are written op by op (the way onnxruntime-genai's builder does) rather than traced
from PyTorch: the fused contrib ops and our packed int4 weights have no PyTorch counterpart to trace.
"""

from __future__ import annotations

import collections
import os
from pathlib import Path

import numpy as np

MS = "com.microsoft"
OPSET = 23  # RMSNormalization


class Graph:
    def __init__(self, name: str):
        self.name = name
        self.nodes: list = []
        self.initializers: list = []
        self.inputs: list = []
        self.outputs: list = []
        self._names: collections.Counter = collections.Counter()
        self._consts: dict = {}

    def fresh(self, base: str) -> str:
        self._names[base] += 1
        n = self._names[base]
        return base if n == 1 else f"{base}_{n - 1}"

    def input(self, name: str, elem_type: int, shape: list, default: np.ndarray | None = None) -> str:
        """A graph input; with `default`, an initializer of the same name that a caller may override."""
        from onnx import helper, numpy_helper

        self.inputs.append(helper.make_tensor_value_info(name, elem_type, shape))
        if default is not None:
            self.initializers.append(numpy_helper.from_array(np.asarray(default), name))
        return name

    def output(self, value: str, name: str, elem_type: int, shape: list) -> str:
        from onnx import helper

        if value != name:
            self.op("Identity", [value], name=name, outputs=[name])
        self.outputs.append(helper.make_tensor_value_info(name, elem_type, shape))
        return name

    def init(self, name: str, array: np.ndarray) -> str:
        from onnx import numpy_helper

        name = self.fresh(name)
        array = np.asarray(array)
        self.initializers.append(numpy_helper.from_array(array if array.flags.c_contiguous else array.copy(), name))
        return name

    def const(self, value, dtype=np.int64) -> str:
        """A small shared constant (shapes, axes, scalars)."""
        arr = np.asarray(value, dtype=dtype)
        key = (arr.dtype.str, arr.shape, arr.tobytes())
        if key not in self._consts:
            self._consts[key] = self.init("const", arr)
        return self._consts[key]

    def op(self, op_type: str, inputs: list[str], *, name: str | None = None, outputs: int | list[str] = 1,
           domain: str = "", unused: tuple[int, ...] = (), **attrs) -> str | list[str]:
        """Add a node; `unused` optional outputs are left unnamed (""), so the kernel neither computes
        nor allocates them."""
        from onnx import helper

        node_name = self.fresh(name or op_type)
        outs = outputs if isinstance(outputs, list) else [
            "" if i in unused else f"{node_name}/out{i}" if outputs > 1 else f"{node_name}/out" for i in range(outputs)]
        self.nodes.append(helper.make_node(op_type, inputs, outs, name=node_name, domain=domain or None,
                                           **{k: v for k, v in attrs.items() if v is not None}))
        return outs[0] if len(outs) == 1 else outs

    def model(self):
        from onnx import helper

        graph = helper.make_graph(self.nodes, self.name, self.inputs, self.outputs, self.initializers)
        return helper.make_model(graph, opset_imports=[helper.make_opsetid("", OPSET), helper.make_opsetid(MS, 1)],
                                 producer_name="kiln")


def save(model, path: Path, data_name: str | None = None) -> list[Path]:
    """model.onnx plus one external-data file for every initializer over 1 KiB; returns the files."""
    import onnx
    from onnx import helper

    # the oldest IR that carries these opsets, not the newest this onnx writes: ONNX Runtime refuses
    # a model whose IR is newer than it knows (onnxruntime-gpu 1.31 reads up to IR 13)
    model.ir_version = helper.find_min_ir_version_for(list(model.opset_import), ignore_unknown=True)
    path = Path(path)
    data_name = data_name or path.name + ".data"
    if (path.parent / data_name).exists():
        os.unlink(path.parent / data_name)
    onnx.save_model(model, str(path), save_as_external_data=True, all_tensors_to_one_file=True,
                    location=data_name, size_threshold=1024, convert_attribute=False)
    return [path, path.parent / data_name]


def op_histogram(model_or_path) -> dict[str, int]:
    """How many nodes of each op type (domain-qualified for contrib ops), most frequent first."""
    import onnx

    model = onnx.load(str(model_or_path), load_external_data=False) if isinstance(model_or_path, (str, Path)) else model_or_path
    counts = collections.Counter(f"{n.domain}.{n.op_type}" if n.domain not in ("", "ai.onnx") else n.op_type
                                 for n in model.graph.node)
    return dict(counts.most_common())
