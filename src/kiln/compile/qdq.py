"""The TensorRT target: the same decoder written in standard ONNX ops only (no com.microsoft
contrib ops), quantized weights as DequantizeLinear → MatMul (QDQ), which TensorRT's ONNX parser
turns into its weight-only INT4/INT8 kernels.

Differences from the ONNX Runtime graph: attention is explicit (rotary from the same tables, the KV
cache concatenated, grouped heads broadcast in a 5-D product, causal/padding/sliding-window masks
built from the attention mask), norms are decomposed, and weights are (in, out) int4/int8 tensors
with blocked (or per-channel) scales. TensorRT takes symmetric grids only (zero point 0).
"""

from __future__ import annotations

import math

import numpy as np

from kiln.compile.decoder import DecoderBuilder, LinearW, _np
from kiln.errors import RecipeError

TRT_OPSET = 21  # blocked DequantizeLinear with INT4


def int4_tensor(name: str, values: np.ndarray):
    """An INT4 initializer as packed raw bytes (two values a byte, the first in the low nibble), so
    it is saved as external data like every other weight (a value list would stay in the protobuf,
    which cannot pass 2 GB)."""
    from onnx import TensorProto, helper

    from kiln.compile.weights import _pack_bits

    nib = (values.reshape(-1).astype(np.int8) & 0x0F).astype(np.uint8)  # two's complement nibbles
    if nib.size % 2:
        nib = np.append(nib, np.uint8(0))
    return helper.make_tensor(name, TensorProto.INT4, list(values.shape), _pack_bits(nib, 4).tobytes(), raw=True)


def qdq_problem(module: str, bits: int, group_size: int | None, symmetric: bool, activation_bits) -> str | None:
    if activation_bits:
        return (f"{module}: W8A8 with dynamic per-token activation scales has no TensorRT QDQ form "
                "(TensorRT needs constant activation scales); compile it for the cpu target")
    if not symmetric:
        return f"{module}: TensorRT takes symmetric weight grids only (zero point 0); quantize with symmetric: true"
    if bits == 4 or (bits == 8 and group_size is None):
        return None
    return (f"{module}: {bits}-bit weights with group_size {group_size} have no TensorRT weight-only kernel "
            "(INT4 blocked or per-channel, INT8 per-channel)")


class QDQDecoderBuilder(DecoderBuilder):
    """DecoderBuilder with standard-ONNX norms, activations, linears and attention."""

    logits_to_keep_input = False

    def __init__(self, *a, **kw):
        super().__init__(*a, **kw)
        self._masks: dict = {}
        self._positions = None

    # weights: codes as signed int4/int8 (code − 2^(b−1)), (in, out), blocked along `in`
    def load(self, module: str, transposed: bool | None = None) -> LinearW:
        w_name = module + ".weight"
        info = self.store.quant_info(w_name)
        if info is None:
            return super().load(module, transposed)
        q = self.store.quantized(w_name)
        problem = qdq_problem(module, q.bits, q.group_size, q.symmetric, info.get("activation_bits"))
        if problem:
            raise RecipeError(f"compile (tensorrt): {problem}")
        scale = q.scale.float()  # already rounded to the artifact's dtype by store.quantized
        signed = q.codes.numpy().astype(np.int16) - 2 ** (q.bits - 1)
        bias = _np(self.store.get(module + ".bias")) if module + ".bias" in self.store else None
        return LinearW("qdq", signed.shape[0], signed.shape[1], (signed.astype(np.int8), _np(scale), q.bits, q.group_size), bias)

    def linear(self, x: str, lw: LinearW, name: str, accuracy_level: int | None = None) -> str:
        if lw.kind != "qdq":
            return super().linear(x, lw, name, accuracy_level)
        from onnx import numpy_helper

        g = self.g
        codes, scale, bits, group = lw.weight  # (N, K) int8 values in the signed range, (N, G)
        wt = np.ascontiguousarray(codes.T)  # (K, N)
        wname = g.fresh(name + ".qweight")
        g.initializers.append(int4_tensor(wname, wt) if bits == 4 else numpy_helper.from_array(wt.astype(np.int8), wname))
        if group is None:  # per output channel
            s = g.init(name + ".scale", scale.reshape(-1).astype(self.np_dtype))
            w = g.op("DequantizeLinear", [wname, s], name=name + "/DequantizeLinear", axis=1)
        else:
            s = g.init(name + ".scale", np.ascontiguousarray(scale.T).astype(self.np_dtype))  # (G, N)
            w = g.op("DequantizeLinear", [wname, s], name=name + "/DequantizeLinear", axis=0, block_size=group)
        y = g.op("MatMul", [x, w], name=name + "/MatMul")
        if lw.bias is not None:
            y = g.op("Add", [y, self.w(name + ".bias", lw.bias)], name=name + "/BiasAdd")
        self.export_kinds[name] = "qdq"
        return y

    # norms and activations in plain ops
    def norm(self, x: str, module: str) -> str:
        g, s = self.g, self.s
        gamma, beta = self.norm_weights(module)
        if s.norm == "layer":
            return g.op("LayerNormalization", [x, gamma, beta], name=module + "/LayerNorm", axis=-1, epsilon=s.eps)
        from onnx import TensorProto

        xf = g.op("Cast", [x], to=TensorProto.FLOAT) if self.opts.dtype == "float16" else x
        ms = g.op("ReduceMean", [g.op("Mul", [xf, xf]), g.const([-1])], keepdims=1)
        inv = g.op("Reciprocal", [g.op("Sqrt", [g.op("Add", [ms, g.const(s.eps, np.float32)])])])
        y = g.op("Mul", [xf, inv])
        y = g.op("Cast", [y], to=self.elem) if self.opts.dtype == "float16" else y
        return g.op("Mul", [y, gamma], name=module + "/RMSNorm")

    def skip_norm(self, x: str, residual: str, module: str) -> tuple[str, str]:
        total = self.g.op("Add", [x, residual], name=module + "/ResidualAdd")
        return self.norm(total, module), total

    def act(self, x: str, name: str) -> str:
        if self.s.act != "gelu_tanh":
            return super().act(x, name)
        g = self.g
        c = lambda v: g.const(v, self.np_dtype)  # noqa: E731
        inner = g.op("Mul", [c(math.sqrt(2 / math.pi)), g.op("Add", [x, g.op("Mul", [c(0.044715), g.op("Mul", [x, g.op("Mul", [x, x])])])])])
        return g.op("Mul", [g.op("Mul", [c(0.5), x]), g.op("Add", [c(1.0), g.op("Tanh", [inner])])], name=name + "/GeluTanh")

    # attention
    def _lengths(self):
        if self._positions is None:
            g = self.g
            past = g.op("Gather", [g.op("Shape", ["past_key_values.0.key"]), g.const(2)], axis=0, name="past_length")
            seq = g.op("Gather", [g.op("Shape", ["input_ids"]), g.const(1)], axis=0, name="sequence_length")
            total = g.op("Add", [past, seq], name="total_length")
            qpos = g.op("Range", [past, total, g.const(1)], name="query_positions")
            kpos = g.op("Range", [g.const(0), total, g.const(1)], name="key_positions")
            self._positions = (qpos, kpos)
        return self._positions

    def _mask(self, window: int | None) -> str:
        """Additive mask (B, 1, 1, S, T): 0 where key j is visible to query i, the dtype's minimum elsewhere."""
        if window in self._masks:
            return self._masks[window]
        from onnx import TensorProto

        g = self.g
        qpos, kpos = self._lengths()
        q2 = g.op("Unsqueeze", [qpos, g.const([1])])
        k2 = g.op("Unsqueeze", [kpos, g.const([0])])
        allowed = g.op("LessOrEqual", [k2, q2], name="causal")
        if window:
            allowed = g.op("And", [allowed, g.op("Greater", [k2, g.op("Sub", [q2, g.const(window)])])], name=f"window{window}")
        pad = g.op("Cast", [g.op("Unsqueeze", ["attention_mask", g.const([1, 2, 3])])], to=TensorProto.BOOL)
        allowed = g.op("And", [allowed, pad])  # (B, 1, 1, S, T)
        neg = float(np.finfo(self.np_dtype).min)
        m = g.op("Where", [allowed, g.const(0.0, self.np_dtype), g.const(neg, self.np_dtype)], name=f"mask{window or ''}")
        self._masks[window] = m
        return m

    def _rotary(self, x: str, cos: str, sin: str) -> str:
        g = self.g
        x1, x2 = g.op("Split", [x], axis=-1, num_outputs=2, outputs=2)
        rotated = g.op("Concat", [g.op("Neg", [x2]), x1], axis=-1)
        return g.op("Add", [g.op("Mul", [x, cos]), g.op("Mul", [rotated, sin])])

    def _heads(self, x: str, heads: int) -> str:
        """(B, S, heads·hd) → (B, heads, S, hd)"""
        g = self.g
        return g.op("Transpose", [g.op("Reshape", [x, g.const([0, 0, heads, self.s.head_dim])])], perm=[0, 2, 1, 3])

    def attention(self, h, n, i, past, seqlens, total, caches):
        s, g = self.s, self.g
        q_dim, kv_dim = s.heads * s.head_dim, s.kv_heads * s.head_dim
        if "qkv" in n:
            qkv = self.linear(h, self.load(n["qkv"]), n["qkv"])
            q, k, v = g.op("Split", [qkv, g.const([q_dim, kv_dim, kv_dim])], axis=-1, outputs=3)
        else:
            q, k, v = (self.linear(h, self.load(n[x]), n[x]) for x in ("q", "k", "v"))
        if s.qk_norm:
            q = self._head_norm(q, n["q_norm"], s.heads)
            k = self._head_norm(k, n["k_norm"], s.kv_heads)
        q, k, v = self._heads(q, s.heads), self._heads(k, s.kv_heads), self._heads(v, s.kv_heads)
        if s.rotary:
            cos_t, sin_t = caches[s.layer_types[i]]
            qpos, _ = self._lengths()
            cos = g.op("Concat", [g.op("Gather", [cos_t, qpos], axis=0)] * 2, axis=-1)  # (S, hd)
            sin = g.op("Concat", [g.op("Gather", [sin_t, qpos], axis=0)] * 2, axis=-1)
            q, k = self._rotary(q, cos, sin), self._rotary(k, cos, sin)
        present_k = g.op("Concat", [past[0], k], axis=2, name=f"layer{i}/present_key")
        present_v = g.op("Concat", [past[1], v], axis=2, name=f"layer{i}/present_value")
        rep = s.heads // s.kv_heads
        scale = s.attn_scale if s.attn_scale is not None else s.head_dim**-0.5
        q5 = g.op("Reshape", [q, g.const([0, s.kv_heads, rep, -1, s.head_dim])])  # query head = kv head · rep + r
        q5 = g.op("Mul", [q5, g.const(scale, self.np_dtype)])
        k5 = g.op("Unsqueeze", [present_k, g.const([2])])
        v5 = g.op("Unsqueeze", [present_v, g.const([2])])
        scores = g.op("MatMul", [q5, g.op("Transpose", [k5], perm=[0, 1, 2, 4, 3])], name=f"layer{i}/QK")
        scores = g.op("Add", [scores, self._mask(s.windows[i])])
        probs = g.op("Softmax", [scores], axis=-1, name=f"layer{i}/Softmax")
        ctx = g.op("MatMul", [probs, v5], name=f"layer{i}/PV")  # (B, kvH, rep, S, hd)
        ctx = g.op("Reshape", [ctx, g.const([0, s.heads, -1, s.head_dim])])
        ctx = g.op("Reshape", [g.op("Transpose", [ctx], perm=[0, 2, 1, 3]), g.const([0, 0, q_dim])])
        attn = self.linear(ctx, self.load(n["o"]), n["o"])
        return attn, present_k, present_v


def trtexec_command(spec, opts_dtype: str, max_length: int) -> str:
    """The engine build for this graph: dynamic batch/sequence/past ranges for TensorRT's optimizer."""
    names = ["input_ids", "attention_mask"] + [f"past_key_values.{i}.{kv}" for i in range(spec.layers) for kv in ("key", "value")]

    def shapes(b, s, p):
        out = [f"input_ids:{b}x{s}", f"attention_mask:{b}x{s + p}"]
        out += [f"{n}:{b}x{spec.kv_heads}x{p}x{spec.head_dim}" for n in names[2:]]
        return ",".join(out)

    opt = min(512, max_length // 2)
    return (f"trtexec --onnx=model.onnx --saveEngine=model.plan --stronglyTyped "
            f"--minShapes={shapes(1, 1, 0)} --optShapes={shapes(1, 1, opt)} "
            f"--maxShapes={shapes(8, max_length // 2, max_length // 2)}")
