"""Would ONNX Runtime's CPU `QMoE` (one expert, fused SwiGLU) make a decode step faster than the MLP
kiln exports? A probe for issue 4's decode speed, not a kiln feature.

    python bench/mlp_fusion_probe.py [--layers 30] [--hidden 576] [--inter 1536] [--rounds 6]

Builds two graphs of LAYERS SmolLM2-sized MLPs, each after an RMSNormalization, with the same seeded random 4-bit weights (blocks of 32,
zero points, accuracy_level 4, 2 intra-op threads):

  kiln   MatMulNBits(gate|up) → Split → Sigmoid, Mul (SiLU) → Mul(up) → MatMulNBits(down), as kiln's
         `cpu-fast` graph has it
  qmoe   one com.microsoft.QMoE per layer with a single expert (router probabilities all 1): gate/up
         interleaved row by row (the only SwiGLU layout its CPU kernel takes), SwiGLU and down inside

checks that both give the float reference's outputs (dequantized weights, numpy), then times batch 1
and batch 8 single-token steps and a 512-token prefill, alternating the two graphs each round, and
prints the medians and kiln/qmoe time ratios (above 1: QMoE is faster).
"""

from __future__ import annotations

import argparse
import time

import numpy as np


def quantize(rng, N: int, K: int, bs: int):
    """Random 4-bit codes with zero points, packed by kiln's own exporter (kiln.compile.weights):
    (B (N, K/bs, bs/2), scales (N, K/bs), packed zero points (N, K/bs/2), the float weight)."""
    from kiln.compile.weights import to_matmul_nbits

    codes = rng.integers(0, 16, (N, K)).astype(np.uint8)
    zp = rng.integers(6, 10, (N, K // bs)).astype(np.uint8)
    scales = (rng.random((N, K // bs)) * 0.01 + 0.005).astype(np.float32)
    nb = to_matmul_nbits(codes, scales, zp, 4, bs, symmetric=False, module="probe")
    W = (codes.astype(np.float32) - np.repeat(zp, bs, 1)) * np.repeat(scales, bs, 1)
    return nb.B, nb.scales.reshape(N, -1), nb.zero_points.reshape(N, -1), W


def interleave(a: np.ndarray, inter: int) -> np.ndarray:
    """Rows [g0, u0, g1, u1, …] from [gate rows | up rows]."""
    return np.stack([a[:inter], a[inter:]], 1).reshape(a.shape)


def build(kind: str, layers, H: int, I: int, bs: int):
    import onnxruntime as ort
    from onnx import TensorProto, helper as h, numpy_helper as nh

    nodes, inits = [], [nh.from_array(np.array([1], np.int64), "one") if kind == "qmoe" else nh.from_array(np.array([I, I], np.int64), "split")]
    if kind == "qmoe":
        nodes += [h.make_node("Shape", ["x"], ["xs"], end=2), h.make_node("ReduceProd", ["xs"], ["tokens"], keepdims=1),
                  h.make_node("Concat", ["tokens", "one"], ["rshape"], axis=0),
                  h.make_node("ConstantOfShape", ["rshape"], ["router"], value=nh.from_array(np.array([1.0], np.float32)))]
    x = "x"
    inits.append(nh.from_array(np.ones(H, np.float32), "norm"))
    for i, ((p1, s1, z1, _), (p2, s2, z2, _)) in enumerate(layers):
        nodes.append(h.make_node("RMSNormalization", [x, "norm"], [f"n{i}"], axis=-1, epsilon=1e-6))
        x = f"n{i}"
        if kind == "qmoe":
            arrays = {"p1": interleave(p1, I).reshape(1, 2 * I, -1), "s1": interleave(s1, I)[None], "z1": interleave(z1, I)[None],
                      "p2": p2.reshape(1, H, -1), "s2": s2[None], "z2": z2[None]}
        else:
            arrays = {"p1": p1, "s1": s1, "z1": z1, "p2": p2, "s2": s2, "z2": z2}
        inits += [nh.from_array(a, f"{k}_{i}") for k, a in arrays.items()]
        y = f"y{i}"
        if kind == "qmoe":
            nodes.append(h.make_node("QMoE", [x, "router", f"p1_{i}", f"s1_{i}", "", f"p2_{i}", f"s2_{i}", "", "", "", "", f"z1_{i}", f"z2_{i}"],
                                     [y], domain="com.microsoft", k=1, activation_type="swiglu", swiglu_fusion=1, block_size=bs,
                                     expert_weight_bits=4, accuracy_level=4, activation_alpha=1.0, activation_beta=0.0))
        else:
            nodes += [h.make_node("MatMulNBits", [x, f"p1_{i}", f"s1_{i}", f"z1_{i}"], [f"gu{i}"], domain="com.microsoft",
                                  K=H, N=2 * I, bits=4, block_size=bs, accuracy_level=4),
                      h.make_node("Split", [f"gu{i}", "split"], [f"g{i}", f"u{i}"], axis=-1),
                      h.make_node("Sigmoid", [f"g{i}"], [f"sg{i}"]), h.make_node("Mul", [f"g{i}", f"sg{i}"], [f"a{i}"]),
                      h.make_node("Mul", [f"a{i}", f"u{i}"], [f"m{i}"]),
                      h.make_node("MatMulNBits", [f"m{i}", f"p2_{i}", f"s2_{i}", f"z2_{i}"], [y], domain="com.microsoft",
                                  K=I, N=H, bits=4, block_size=bs, accuracy_level=4)]
        x = y
    graph = h.make_graph(nodes, kind, [h.make_tensor_value_info("x", TensorProto.FLOAT, ["b", "s", H])],
                         [h.make_tensor_value_info(x, TensorProto.FLOAT, None)], inits)
    model = h.make_model(graph, opset_imports=[h.make_opsetid("", 23), h.make_opsetid("com.microsoft", 1)])
    so = ort.SessionOptions()
    so.intra_op_num_threads = 2
    return ort.InferenceSession(model.SerializeToString(), so, providers=["CPUExecutionProvider"])


def reference(x: np.ndarray, layers, I: int) -> np.ndarray:
    for (_, _, _, W1), (_, _, _, W2) in layers:
        x = x / np.sqrt((x * x).mean(-1, keepdims=True) + 1e-6)
        gu = x @ W1.T
        g, u = gu[..., :I], gu[..., I:]
        x = (g / (1 + np.exp(-g)) * u) @ W2.T
    return x


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--layers", type=int, default=30)
    ap.add_argument("--hidden", type=int, default=576)
    ap.add_argument("--inter", type=int, default=1536)
    ap.add_argument("--rounds", type=int, default=6)
    args = ap.parse_args()
    H, I, bs = args.hidden, args.inter, 32
    rng = np.random.default_rng(0)
    layers = [(quantize(rng, 2 * I, H, bs), quantize(rng, H, I, bs)) for _ in range(args.layers)]
    x = rng.standard_normal((2, 3, H)).astype(np.float32)
    ref = reference(x.astype(np.float64), layers[:1], I)
    for name in ("kiln", "qmoe"):  # one layer: int8 activations' rounding compounds chaotically through random ones
        err = np.abs(build(name, layers[:1], H, I, bs).run(None, {"x": x})[0] - ref).max() / np.abs(ref).max()
        print(f"{name}: one layer's max error vs the float reference {err:.2e} of max |y| (int8 activations)")
    kiln, qmoe = build("kiln", layers, H, I, bs), build("qmoe", layers, H, I, bs)
    print(f"{args.layers} MLPs, hidden {H}, intermediate {I}; medians of {args.rounds} alternating rounds, ms per run")
    for shape in ((1, 1), (8, 1), (1, 512)):
        x = rng.standard_normal(shape + (H,)).astype(np.float32)
        n = 200 if shape[1] == 1 else 5
        times = {"kiln": [], "qmoe": []}
        for r in range(args.rounds):
            for name in (("kiln", "qmoe") if r % 2 == 0 else ("qmoe", "kiln")):
                s = kiln if name == "kiln" else qmoe
                s.run(None, {"x": x})
                t0 = time.perf_counter()
                for _ in range(n):
                    s.run(None, {"x": x})
                times[name].append((time.perf_counter() - t0) / n * 1e3)
        k, q = np.median(times["kiln"]), np.median(times["qmoe"])
        ratio = np.median(np.array(times["kiln"]) / np.array(times["qmoe"]))
        print(f"batch {shape[0]} × {shape[1]} tokens: kiln {k:.3f}  qmoe {q:.3f}  kiln/qmoe {ratio:.2f}")


if __name__ == "__main__":
    main()
