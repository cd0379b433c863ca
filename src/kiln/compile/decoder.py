"""One ONNX graph per decoder: prefill and decode are the same graph (GroupQueryAttention takes the
past keys/values and appends the new ones), with onnxruntime-genai's input and output names so its
runtime loads the graph as is.

Per layer: RMSNormalization / SkipSimplifiedLayerNormalization or [Skip]LayerNormalization (the residual add fused into
the next norm), one QKV product (MatMulNBits with our codes when the three share a grid, a float
MatMul otherwise, an int8 MatMulInteger with per-token activation quantization for W8A8),
GroupQueryAttention with rotary embedding from cos/sin tables computed by the model's own rotary
module (so every RoPE scaling transformers knows is covered), the MLP, and the next fused norm.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import numpy as np

from kiln.compile.graph import MS, Graph
from kiln.compile.weights import NBitsWeight, concat_nbits, to_matmul_nbits
from kiln.compress.rotation import factors, rotation_block, sylvester
from kiln.errors import RecipeError

FAMILIES = ("llama", "mistral", "qwen2", "qwen3", "gemma3_text", "gpt2", "opt")


@dataclass(frozen=True)
class Spec:
    """What the graph needs to know about a family, derived from its config."""

    family: str
    hidden: int
    heads: int
    kv_heads: int
    head_dim: int
    layers: int
    vocab: int
    eps: float
    max_positions: int
    embed: str
    layer_prefix: str  # "model.layers.{i}"
    final_norm: str
    lm_head: str | None  # None: tied to the input embedding
    norm: str = "rms"  # rms | layer
    norm_offset: float = 0.0  # Gemma multiplies by (1 + w)
    embed_scale: float | None = None
    rotary: bool = True
    positions: str | None = None  # learned position table (GPT-2, OPT)
    position_offset: int = 0
    act: str = "silu"  # silu | gelu_tanh | relu
    gated: bool = True
    qk_norm: bool = False
    sandwich: bool = False  # Gemma: norms after attention and MLP as well as before
    attn_scale: float | None = None
    windows: tuple = ()  # per layer: sliding window in tokens, or None
    layer_types: tuple = ()  # per layer: key of its rotary table
    final_softcap: float | None = None
    names: dict = field(default_factory=dict)


_LLAMA_NAMES = {"in_norm": "input_layernorm", "q": "self_attn.q_proj", "k": "self_attn.k_proj",
                "v": "self_attn.v_proj", "o": "self_attn.o_proj", "post_norm": "post_attention_layernorm",
                "gate": "mlp.gate_proj", "up": "mlp.up_proj", "down": "mlp.down_proj",
                "q_norm": "self_attn.q_norm", "k_norm": "self_attn.k_norm"}


def spec_from_config(config, has_lm_head: bool) -> Spec:
    mt = config.model_type
    L = config.num_hidden_layers if hasattr(config, "num_hidden_layers") else config.n_layer
    if mt in ("llama", "mistral", "qwen2", "qwen3", "gemma3_text"):
        heads = config.num_attention_heads
        head_dim = getattr(config, "head_dim", None) or config.hidden_size // heads
        types = tuple(getattr(config, "layer_types", None) or ["full_attention"] * L)
        sw = getattr(config, "sliding_window", None)
        if mt == "mistral":
            windows = tuple(sw for _ in range(L))
        else:
            windows = tuple(sw if t == "sliding_attention" else None for t in types)
        common = dict(family=mt, hidden=config.hidden_size, heads=heads, kv_heads=config.num_key_value_heads,
                      head_dim=head_dim, layers=L, vocab=config.vocab_size, eps=config.rms_norm_eps,
                      max_positions=config.max_position_embeddings, embed="model.embed_tokens.weight",
                      layer_prefix="model.layers.{i}", final_norm="model.norm",
                      lm_head="lm_head" if has_lm_head else None, windows=windows, layer_types=types,
                      names=dict(_LLAMA_NAMES))
        if mt == "gemma3_text":
            if getattr(config, "attn_logit_softcapping", None):
                raise RecipeError("compile: Gemma attention logit soft-capping has no GroupQueryAttention form in kiln",
                                  hint="compile a Gemma 3 model (no attention soft-capping)")
            act = config.hidden_activation
            if act not in ("gelu_pytorch_tanh", "gelu_tanh"):
                raise RecipeError(f"compile: {mt} activation {act!r} is not supported (supported: gelu_pytorch_tanh)")
            return Spec(**common, norm_offset=1.0, embed_scale=config.hidden_size**0.5, act="gelu_tanh", qk_norm=True,
                        sandwich=True, attn_scale=config.query_pre_attn_scalar**-0.5,
                        final_softcap=getattr(config, "final_logit_softcapping", None))
        act = config.hidden_act
        if act != "silu":
            raise RecipeError(f"compile: {mt} activation {act!r} is not supported (supported: silu)")
        return Spec(**common, qk_norm=(mt == "qwen3"))
    if mt == "gpt2":
        if config.activation_function not in ("gelu_new", "gelu_pytorch_tanh"):
            raise RecipeError(f"compile: gpt2 activation {config.activation_function!r} is not supported")
        if getattr(config, "scale_attn_by_inverse_layer_idx", False) or getattr(config, "reorder_and_upcast_attn", False):
            raise RecipeError("compile: gpt2 with scale_attn_by_inverse_layer_idx or reorder_and_upcast_attn is not supported")
        return Spec(family=mt, hidden=config.n_embd, heads=config.n_head, kv_heads=config.n_head,
                    head_dim=config.n_embd // config.n_head, layers=L, vocab=config.vocab_size,
                    eps=config.layer_norm_epsilon, max_positions=config.n_positions, embed="transformer.wte.weight",
                    layer_prefix="transformer.h.{i}", final_norm="transformer.ln_f",
                    lm_head="lm_head" if has_lm_head else None, norm="layer",
                    rotary=False, positions="transformer.wpe.weight", act="gelu_tanh", gated=False,
                    windows=(None,) * L, layer_types=("full_attention",) * L,
                    names={"in_norm": "ln_1", "qkv": "attn.c_attn", "o": "attn.c_proj", "post_norm": "ln_2",
                           "up": "mlp.c_fc", "down": "mlp.c_proj"})
    if mt == "opt":
        if not config.do_layer_norm_before or config.word_embed_proj_dim != config.hidden_size:
            raise RecipeError("compile: OPT with post-layer-norm or a projected embedding (opt-350m) is not supported",
                              hint="compile an OPT model with do_layer_norm_before: true and word_embed_proj_dim == hidden_size")
        if config.activation_function != "relu":
            raise RecipeError(f"compile: opt activation {config.activation_function!r} is not supported (supported: relu)")
        return Spec(family=mt, hidden=config.hidden_size, heads=config.num_attention_heads,
                    kv_heads=config.num_attention_heads, head_dim=config.hidden_size // config.num_attention_heads,
                    layers=L, vocab=config.vocab_size, eps=1e-5, max_positions=config.max_position_embeddings,
                    embed="model.decoder.embed_tokens.weight", layer_prefix="model.decoder.layers.{i}",
                    final_norm="model.decoder.final_layer_norm", lm_head="lm_head" if has_lm_head else None,
                    norm="layer", rotary=False, positions="model.decoder.embed_positions.weight", position_offset=2,
                    act="relu", gated=False, windows=(None,) * L, layer_types=("full_attention",) * L,
                    names={"in_norm": "self_attn_layer_norm", "q": "self_attn.q_proj", "k": "self_attn.k_proj",
                           "v": "self_attn.v_proj", "o": "self_attn.out_proj", "post_norm": "final_layer_norm",
                           "up": "fc1", "down": "fc2"})
    raise RecipeError(f"compile: model type {mt!r} has no ONNX decoder layout in kiln",
                      hint=f"supported families: {', '.join(FAMILIES)}")


# --- weights -------------------------------------------------------------------------------------


@dataclass
class LinearW:
    kind: str  # float | nbits | int8
    N: int
    K: int
    weight: object  # float: (N, K) ndarray; nbits: NBitsWeight; int8: (int8 (N, K), scale (N,))
    bias: np.ndarray | None
    rotation: int | None = None  # int8 only: Hadamard block; the codes are W R's, x R is quantized


def _np(t) -> np.ndarray:
    return t.detach().float().cpu().numpy()


def load_linear(store, module: str, transposed: bool, max_block: int = 256) -> LinearW:
    w_name = module + ".weight"
    bias = _np(store.get(module + ".bias")) if module + ".bias" in store else None
    info = store.quant_info(w_name)
    if info is None:
        W = _np(store.get(w_name))
        W = W.T if transposed else W
        return LinearW("float", W.shape[0], W.shape[1], W, bias)
    q = store.quantized(w_name)
    scale = q.scale.float()  # store.quantized already rounds scales to the artifact's dtype
    codes, zero = q.codes.numpy(), q.zero.numpy()
    N, K = codes.shape
    if info.get("activation_bits"):
        w_int8 = (codes.astype(np.int16) - 128).astype(np.int8)
        return LinearW("int8", N, K, (w_int8, _np(scale).reshape(-1)), bias, rotation_block(info.get("rotation"), K))
    nb = to_matmul_nbits(codes, _np(scale), zero, q.bits, q.group_size, q.symmetric, module=module, max_block=max_block)
    return LinearW("nbits", N, K, nb, bias)


def concat_linears(parts: list[LinearW]) -> LinearW | None:
    """Linears reading one input (Q, K, V; gate, up) as one product when they share a
    representation; None when they do not."""
    kinds = {p.kind for p in parts}
    if len(kinds) != 1 or len({p.K for p in parts}) != 1 or not kinds <= {"float", "int8", "nbits"}:
        return None
    if len({p.rotation for p in parts}) != 1:
        return None
    kind = kinds.pop()
    has_bias = [p.bias is not None for p in parts]
    if any(has_bias) and not all(has_bias):
        bias = np.concatenate([p.bias if p.bias is not None else np.zeros(p.N, np.float32) for p in parts])
    else:
        bias = np.concatenate([p.bias for p in parts]) if all(has_bias) else None
    N = sum(p.N for p in parts)
    if kind == "float":
        return LinearW(kind, N, parts[0].K, np.concatenate([p.weight for p in parts]), bias)
    if kind == "int8":
        return LinearW(kind, N, parts[0].K, (np.concatenate([p.weight[0] for p in parts]),
                                             np.concatenate([p.weight[1] for p in parts])), bias, parts[0].rotation)
    try:
        return LinearW(kind, N, parts[0].K, concat_nbits([p.weight for p in parts]), bias)
    except ValueError:
        return None


# --- the graph -----------------------------------------------------------------------------------


@dataclass
class BuildOptions:
    dtype: str = "float32"  # float32 | float16: activations, float weights, KV cache
    accuracy_level: int = 0  # MatMulNBits: 0 = activations in the io dtype; 4 = int8 activations (CPU)
    max_length: int | None = None  # rows of the rotary tables; default the model's positions
    lm_head_bits: int | None = None  # RTN-quantize the output projection (groups of 32) at export; None: as stored
    max_block: int = 256  # MatMulNBits blocks at most this wide (a kiln group becomes several blocks)


class DecoderBuilder:
    # an input choosing how many of the last positions get logits (see build); the TensorRT graph
    # keeps every position (its engine profiles fix the inputs)
    logits_to_keep_input = True

    def __init__(self, spec: Spec, store, opts: BuildOptions, rotary_tables: dict | None, transposed: bool = False,
                 aliases: dict | None = None):
        from onnx import TensorProto

        self.aliases = aliases or {}
        self.s, self.store, self.opts = spec, store, opts
        self.g = Graph(f"kiln-{spec.family}")
        self.np_dtype = np.float16 if opts.dtype == "float16" else np.float32
        self.elem = TensorProto.FLOAT16 if opts.dtype == "float16" else TensorProto.FLOAT
        self.rotary_tables = rotary_tables or {}
        self.transposed = transposed
        self.export_kinds: dict[str, str] = {}

    # small helpers
    def w(self, name: str, arr: np.ndarray) -> str:
        return self.g.init(name, np.asarray(arr, dtype=self.np_dtype))

    def tensor(self, name: str) -> np.ndarray:
        """A float tensor by name, or by the other name of the same tied tensor (checkpoints keep one)."""
        key = next((k for k in [name, *self.aliases.get(name, [])] if k in self.store), name)
        return _np(self.store.get(key))

    def linear(self, x: str, lw: LinearW, name: str, accuracy_level: int | None = None) -> str:
        g = self.g
        if lw.kind == "float":
            y = g.op("MatMul", [x, self.w(name + ".weight_T", lw.weight.T)], name=name + "/MatMul")
        elif lw.kind == "nbits":
            nb: NBitsWeight = lw.weight
            ins = [x, g.init(name + ".qweight", nb.B), g.init(name + ".scales", nb.scales.astype(self.np_dtype))]
            if nb.zero_points is not None:
                ins.append(g.init(name + ".qzeros", nb.zero_points))
            y = g.op("MatMulNBits", ins, name=name + "/MatMulNBits", domain=MS, K=nb.K, N=nb.N, bits=nb.bits,
                     block_size=nb.block_size,
                     accuracy_level=self.opts.accuracy_level if accuracy_level is None else accuracy_level)
        else:
            y = self._int8_linear(x, lw, name)
        if lw.bias is not None:
            y = g.op("Add", [y, self.w(name + ".bias", lw.bias)], name=name + "/BiasAdd")
        self.export_kinds[name] = lw.kind
        return y

    def _int8_linear(self, x: str, lw: LinearW, name: str) -> str:
        """Per-token dynamic symmetric int8 (max|x|/127, round half to even, clamp ±127), an exact int8
        GEMM, then both scales: the same arithmetic as kiln.compress.w8a8.W8A8Linear."""
        from onnx import TensorProto

        g = self.g
        w_int8, w_scale = lw.weight
        xf = g.op("Cast", [x], to=TensorProto.FLOAT) if self.opts.dtype == "float16" else x
        if lw.rotation:
            xf = self._hadamard(xf, lw.K, lw.rotation, name)
        amax = g.op("ReduceMax", [g.op("Abs", [xf]), g.const([-1])], keepdims=1, name=name + "/amax")
        sx = g.op("Div", [amax, g.const(127.0, np.float32)])
        sx = g.op("Where", [g.op("Greater", [sx, g.const(0.0, np.float32)]), sx, g.const(1.0, np.float32)])
        xq = g.op("Round", [g.op("Div", [xf, sx])])
        xq = g.op("Clip", [xq, g.const(-127.0, np.float32), g.const(127.0, np.float32)])
        xq = g.op("Cast", [xq], to=TensorProto.INT8)
        acc = g.op("MatMulInteger", [xq, g.init(name + ".weight_int8_T", np.ascontiguousarray(w_int8.T))],
                   name=name + "/MatMulInteger")
        y = g.op("Mul", [g.op("Cast", [acc], to=TensorProto.FLOAT), sx])
        y = g.op("Mul", [y, g.init(name + ".weight_scale", w_scale.astype(np.float32))], name=name + "/Scale")
        return g.op("Cast", [y], to=self.elem) if self.opts.dtype == "float16" else y

    def _hadamard(self, x: str, K: int, block: int, name: str) -> str:
        """x R with R = I ⊗ H_block, as kiln.compress.rotation.rotate computes it: each block viewed as
        an a × b matrix X becomes H_a X H_b (two small MatMuls, float32)."""
        g = self.g
        a, b = factors(block)
        X = g.op("Reshape", [x, g.const([0, 0, K // block, a, b])], name=name + "/RotationBlocks")
        X = g.op("MatMul", [X, g.const(sylvester(b).numpy(), np.float32)], name=name + "/RotationRight")
        X = g.op("MatMul", [g.const(sylvester(a).numpy(), np.float32), X], name=name + "/RotationLeft")
        return g.op("Reshape", [X, g.const([0, 0, K])], name=name + "/Rotated")

    def load(self, module: str, transposed: bool | None = None) -> LinearW:
        return load_linear(self.store, module, self.transposed if transposed is None else transposed, self.opts.max_block)

    def norm_weights(self, module: str) -> tuple[str, str | None]:
        gamma = self.tensor(module + ".weight") + self.s.norm_offset
        beta = self.tensor(module + ".bias") if self.s.norm == "layer" else None
        return self.w(module + ".weight", gamma), (self.w(module + ".bias", beta) if beta is not None else None)

    def norm(self, x: str, module: str) -> str:
        gamma, beta = self.norm_weights(module)
        if self.s.norm == "rms":
            return self.g.op("RMSNormalization", [x, gamma], name=module + "/RMSNorm", axis=-1, epsilon=self.s.eps,
                             stash_type=1)
        return self.g.op("LayerNormalization", [x, gamma, beta], name=module + "/LayerNorm", axis=-1, epsilon=self.s.eps)

    def skip_norm(self, x: str, residual: str, module: str) -> tuple[str, str]:
        """norm(x + residual) and x + residual, in one kernel. Its mean and inverse-standard-deviation
        outputs stay unnamed: asked for, they took the 60 kernels of a SmolLM2 decode step from 1.0 to
        1.6 ms (ORT's profiler, batch 1 after a 512-token prompt)."""
        gamma, beta = self.norm_weights(module)
        if self.s.norm == "rms":
            outs = self.g.op("SkipSimplifiedLayerNormalization", [x, residual, gamma], domain=MS, outputs=4, unused=(1, 2),
                             name=module + "/SkipSimplifiedLayerNorm", epsilon=self.s.eps)
        else:
            outs = self.g.op("SkipLayerNormalization", [x, residual, gamma, beta], domain=MS, outputs=4, unused=(1, 2),
                             name=module + "/SkipLayerNorm", epsilon=self.s.eps)
        return outs[0], outs[3]

    def act(self, x: str, name: str) -> str:
        g = self.g
        if self.s.act == "silu":
            return g.op("Mul", [x, g.op("Sigmoid", [x], name=name + "/Sigmoid")], name=name + "/SiLU")
        if self.s.act == "gelu_tanh":
            return g.op("FastGelu", [x], domain=MS, name=name + "/FastGelu")
        return g.op("Relu", [x], name=name + "/Relu")

    # the model
    def build(self):
        from onnx import TensorProto

        s, g = self.s, self.g
        ids = g.input("input_ids", TensorProto.INT64, ["batch_size", "sequence_length"])
        mask = g.input("attention_mask", TensorProto.INT64, ["batch_size", "total_sequence_length"])
        past = []
        for i in range(s.layers):
            shape = ["batch_size", s.kv_heads, "past_sequence_length", s.head_dim]
            past.append((g.input(f"past_key_values.{i}.key", self.elem, shape),
                         g.input(f"past_key_values.{i}.value", self.elem, shape)))

        seqlens = g.op("Cast", [g.op("Sub", [g.op("ReduceSum", [mask, g.const([1])], keepdims=0), g.const(1)])],
                       to=TensorProto.INT32, name="seqlens_k")
        total64 = g.op("Gather", [g.op("Shape", [mask]), g.const(1)], axis=0, name="total_length")
        total = g.op("Cast", [total64], to=TensorProto.INT32, name="total_sequence_length")

        table = self.tensor(s.embed)
        half = table.astype(np.float16)
        shared = s.lm_head is None and not self.opts.lm_head_bits  # the output projection reads this table
        if not shared and self.np_dtype == np.float32 and np.array_equal(half.astype(np.float32), table):
            # the artifact's weights are float16: the table is stored as such (half the bytes, same
            # values) and each gathered row is widened
            embed = g.init(s.embed, half)
            x = g.op("Cast", [g.op("Gather", [embed, ids], axis=0, name="embed_tokens")], to=self.elem, name="embed_widen")
        else:
            embed = self.w(s.embed, table)
            x = g.op("Gather", [embed, ids], axis=0, name="embed_tokens")
        if s.embed_scale is not None:
            x = g.op("Mul", [x, g.const(s.embed_scale, self.np_dtype)], name="embed_scale")
        if s.positions is not None:
            seq = g.op("Gather", [g.op("Shape", [ids]), g.const(1)], axis=0)
            end = g.op("Add", [total64, g.const(s.position_offset)])
            start = g.op("Sub", [end, seq])
            rows = g.op("Slice", [self.w(s.positions, self.tensor(s.positions)), g.op("Unsqueeze", [start, g.const([0])]),
                                  g.op("Unsqueeze", [end, g.const([0])]), g.const([0])], name="positions")
            x = g.op("Add", [x, rows], name="embed_positions")

        caches = {}
        for t, (cos, sin) in self.rotary_tables.items():
            caches[t] = (self.w(f"cos_cache.{t}", cos), self.w(f"sin_cache.{t}", sin))

        residual, pending = x, None  # pending: the sublayer output not yet added to the residual
        presents = []
        for i in range(s.layers):
            p = s.layer_prefix.format(i=i)
            n = {k: f"{p}.{v}" for k, v in s.names.items()}
            if pending is None:
                h = self.norm(residual, n["in_norm"])
            else:
                h, residual = self.skip_norm(pending, residual, n["in_norm"])
            attn, pk, pv = self.attention(h, n, i, past[i], seqlens, total, caches)
            presents.append((pk, pv))
            if s.sandwich:
                attn = self.norm(attn, n["post_norm"])
                h, residual = self.skip_norm(attn, residual, f"{p}.pre_feedforward_layernorm")
            else:
                h, residual = self.skip_norm(attn, residual, n["post_norm"])
            m = self.mlp(h, n)
            pending = self.norm(m, f"{p}.post_feedforward_layernorm") if s.sandwich else m
        h, _ = self.skip_norm(pending, residual, s.final_norm)
        if self.logits_to_keep_input:
            h = self.keep_last(h)

        # the output projection reads the embedding as stored (V, H) when tied: no transposed copy
        head_quantized = s.lm_head is not None and self.store.quant_info(s.lm_head + ".weight") is not None
        head = table if s.lm_head is None or head_quantized else self.tensor(s.lm_head + ".weight")
        head_bias = self.tensor(s.lm_head + ".bias") if s.lm_head is not None and s.lm_head + ".bias" in self.store else None
        if head_quantized:  # compress quantized it: its codes, like every other linear (a Linear, never a Conv1D)
            logits = self.linear(h, self.load(s.lm_head, transposed=False), "lm_head")
            flat = None
        elif self.opts.lm_head_bits:
            # ORT's CPU kernel for 8-bit blocks is fast only with int8 activations (accuracy level 4)
            level = 4 if self.opts.lm_head_bits == 8 else None
            logits = self.linear(h, quantized_head(head, self.opts.lm_head_bits, head_bias), "lm_head", level)
            flat = None
        else:
            head_w = embed if shared else self.w("lm_head.weight", head)
            flat = g.op("Reshape", [h, g.const([-1, s.hidden])])
            logits = g.op("Gemm", [flat, head_w], transB=1, name="lm_head")
            if head_bias is not None:
                logits = g.op("Add", [logits, self.w("lm_head.bias", head_bias)])
        if s.final_softcap:
            c = g.const(s.final_softcap, self.np_dtype)
            logits = g.op("Mul", [g.op("Tanh", [g.op("Div", [logits, c])]), c], name="final_softcap")
        if flat is not None:
            shape = g.op("Concat", [g.op("Shape", [h], end=2), g.const([s.vocab])], axis=0)
            logits = g.op("Reshape", [logits, shape])
        # a static 1 is how onnxruntime-genai knows to size the prompt's logits for the last position
        rows = 1 if self.logits_to_keep_input else "sequence_length"
        g.output(logits, "logits", self.elem, ["batch_size", rows, s.vocab])
        for i, (pk, pv) in enumerate(presents):
            shape = ["batch_size", s.kv_heads, "total_sequence_length", s.head_dim]
            g.output(pk, f"present.{i}.key", self.elem, shape)
            g.output(pv, f"present.{i}.value", self.elem, shape)
        return g.model()

    def keep_last(self, h: str) -> str:
        """h[:, -k:] for the int64 input `logits_to_keep` k, 0 meaning every position (transformers'
        `logits_to_keep`). Generating from a prompt needs the logits of its last position only: the
        output projection is a fifth of SmolLM2's prefill FLOPs when run on all S positions. The
        input defaults to 1 (an initializer of the same name), so onnxruntime-genai, which never
        feeds it, prefills that way (its builder's `prune_lm_head`, without losing scoring); kiln's
        scoring feeds 0."""
        from onnx import TensorProto

        g = self.g
        keep = g.input("logits_to_keep", TensorProto.INT64, [], default=np.asarray(1, np.int64))
        start = g.op("Neg", [g.op("Unsqueeze", [keep, g.const([0])])])
        return g.op("Slice", [h, start, g.const([np.iinfo(np.int64).max]), g.const([1])], name="logits_to_keep")

    def attention(self, h, n, i, past, seqlens, total, caches):
        s, g = self.s, self.g
        q_dim, kv_dim = s.heads * s.head_dim, s.kv_heads * s.head_dim
        if "qkv" in n:  # GPT-2's fused c_attn
            qkv = self.linear(h, self.load(n["qkv"]), n["qkv"])
            q, k, v = qkv, "", ""
        else:
            parts = [self.load(n[x]) for x in ("q", "k", "v")]
            fused = concat_linears(parts)
            if fused is not None:
                qkv = self.linear(h, fused, n["q"].rsplit(".", 1)[0] + ".qkv_proj")
                q, k, v = qkv, "", ""
            else:
                q, k, v = (self.linear(h, lw, n[x]) for lw, x in zip(parts, ("q", "k", "v")))
        if s.qk_norm:
            if not k:
                q, k, v = g.op("Split", [q, g.const([q_dim, kv_dim, kv_dim])], axis=-1, outputs=3, name=f"layer{i}/split_qkv")
            q = self._head_norm(q, n["q_norm"], s.heads)
            k = self._head_norm(k, n["k_norm"], s.kv_heads)
        window = s.windows[i]
        cos, sin = caches.get(s.layer_types[i], ("", "")) if s.rotary else ("", "")
        outs = g.op("GroupQueryAttention", [q, k, v, past[0], past[1], seqlens, total, cos, sin], domain=MS, outputs=3,
                    name=f"layer{i}/GroupQueryAttention", num_heads=s.heads, kv_num_heads=s.kv_heads,
                    do_rotary=int(s.rotary), rotary_interleaved=0, scale=s.attn_scale,
                    local_window_size=window if window else -1)
        attn = self.linear(outs[0], self.load(n["o"]), n["o"])
        return attn, outs[1], outs[2]

    def gate_up(self, h: str, n: dict) -> tuple[str, str]:
        """Gate and up projections as one product split in two, where they share a representation:
        one MatMulNBits call instead of two in every decode step (the step is a few hundred calls, and
        each costs a dispatch to the thread pool)."""
        parts = [self.load(n["gate"]), self.load(n["up"])]
        fused = concat_linears(parts)
        if fused is None:
            return self.linear(h, parts[0], n["gate"]), self.linear(h, parts[1], n["up"])
        name = n["gate"].rsplit(".", 1)[0] + ".gate_up_proj"
        y = self.linear(h, fused, name)
        gate, up = self.g.op("Split", [y, self.g.const([parts[0].N, parts[1].N])], axis=-1, outputs=2, name=name + "/Split")
        return gate, up

    def _head_norm(self, x: str, module: str, heads: int) -> str:
        g, s = self.g, self.s
        x4 = g.op("Reshape", [x, g.const([0, 0, heads, s.head_dim])])
        y = self.norm(x4, module)
        return g.op("Reshape", [y, g.const([0, 0, heads * s.head_dim])])

    def mlp(self, h, n):
        if self.s.gated:
            gate, up = self.gate_up(h, n)
            return self.linear(self.g.op("Mul", [self.act(gate, n["gate"]), up]), self.load(n["down"]), n["down"])
        up = self.act(self.linear(h, self.load(n["up"]), n["up"]), n["up"])
        return self.linear(up, self.load(n["down"]), n["down"])


def quantized_head(W: np.ndarray, bits: int, bias) -> LinearW:
    """The output projection quantized round-to-nearest (symmetric, groups of 32) at export: decode
    reads the whole (vocab, hidden) matrix every step, so its bytes set the decode speed."""
    import torch

    from kiln.compress.quant import QuantScheme, rtn_quantize

    q = rtn_quantize(torch.from_numpy(W), QuantScheme(bits=bits, group_size=32, symmetric=True))
    nb = to_matmul_nbits(q.codes.numpy(), q.scale.numpy(), q.zero.numpy(), bits, 32, True, module="lm_head")
    return LinearW("nbits", nb.N, nb.K, nb, bias)


def rotary_tables(skeleton, spec: Spec, length: int) -> dict[str, tuple[np.ndarray, np.ndarray]]:
    """cos/sin (length, head_dim/2) per layer type, from the model's own rotary module (inv_freq and
    attention scaling as transformers computes them for this config)."""
    import torch

    if not spec.rotary:
        return {}
    rot = skeleton.model.rotary_emb
    pos = torch.arange(length)[None]
    x = torch.zeros(1, dtype=torch.float32)
    out = {}
    for t in sorted(set(spec.layer_types)):
        with torch.no_grad():
            try:
                cos, sin = rot(x, pos, t)
            except TypeError:
                cos, sin = rot(x, pos)
        half = cos.shape[-1] // 2
        if not torch.allclose(cos[0, :, :half], cos[0, :, half:]):
            raise RecipeError(f"compile: {spec.family} rotary embedding is not the rotate-half layout GroupQueryAttention uses")
        out[t] = (cos[0, :, :half].float().numpy(), sin[0, :, :half].float().numpy())
    return out


def build_decoder(model_dir, store, opts: BuildOptions, trust_remote_code: bool = False, qdq: bool = False):
    """The ONNX ModelProto of the model in `store` (our quantized weights where the store has codes)
    and what each linear became."""
    from kiln.arch import is_transposed
    from kiln.model import build_skeleton, stored_apart, tied_aliases

    skeleton = build_skeleton(model_dir, trust_remote_code)
    aliases = tied_aliases(skeleton)
    config = skeleton.config
    has_head = not getattr(config, "tie_word_embeddings", False) or stored_apart(store, aliases)
    spec = spec_from_config(config, has_head)
    transposed = any(is_transposed(m) for m in skeleton.modules())
    length = min(opts.max_length or spec.max_positions, spec.max_positions)
    tables = rotary_tables(skeleton, spec, length)
    del skeleton
    if qdq:
        from kiln.compile.qdq import TRT_OPSET, QDQDecoderBuilder

        b = QDQDecoderBuilder(spec, store, opts, tables, transposed, aliases)
        model = b.build()
        model.opset_import[0].version = TRT_OPSET
        del model.opset_import[1:]  # no contrib domain
        return model, spec, b.export_kinds
    b = DecoderBuilder(spec, store, opts, tables, transposed, aliases)
    return b.build(), spec, b.export_kinds
