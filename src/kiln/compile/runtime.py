"""Running a compiled decoder with ONNX Runtime: the forward pass with an explicit KV cache, and a
decode loop (greedy or sampled) that evaluation and the benchmarks share."""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from kiln.errors import InputError


# Flash attention for the CUDA provider's attention ops. Left to choose, ONNX Runtime 1.31 on Hopper
# picks cuDNN's SDPA for GroupQueryAttention, which builds a new cuDNN plan for every new sequence
# length: a decode step of SmolLM2 took 39 ms on an H100 that way and 2.6 ms with flash attention
# (bench/cuda_check.py). "sdpa_kernel" is its attention-backend bit mask (1 = flash attention).
CUDA_OPTIONS = {"sdpa_kernel": "1"}

# ONNX Runtime's CPU provider rewrites DequantizeLinear → MatMul into MatMulNBits with int8 activations
# (accuracy level 4) unless told otherwise; a QDQ graph's numerics are checked with float activations
EXACT_QDQ = {"session.qdq_matmulnbits_accuracy_level": "0"}


def session(path: Path, provider: str = "CPUExecutionProvider", threads: int | None = None, config: dict | None = None):
    try:
        import onnxruntime as ort
    except ImportError:
        raise InputError("onnxruntime is not installed", hint="pip install onnxruntime (or onnxruntime-gpu for cuda)") from None
    if provider not in ort.get_available_providers():
        raise InputError(f"ONNX Runtime has no {provider} here (available: {', '.join(ort.get_available_providers())})",
                         hint="install onnxruntime-gpu for the cuda target")
    so = ort.SessionOptions()
    if threads:
        so.intra_op_num_threads = threads
    so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    # errors only: ONNX Runtime warns on every load that `logits_to_keep`, an input with a default,
    # is not a constant, which is the point of it
    so.log_severity_level = 3
    for k, v in (config or {}).items():
        so.add_session_config_entry(k, v)
    return ort.InferenceSession(str(path), so, providers=providers(provider))


def providers(provider: str) -> list[tuple[str, dict]]:
    """The `providers` argument of every session kiln opens: the provider with kiln's options."""
    return [(provider, dict(CUDA_OPTIONS) if provider == "CUDAExecutionProvider" else {})]


class OnnxDecoder:
    """A compiled decoder session with its cache layout read from the graph's inputs."""

    def __init__(self, path: Path, provider: str = "CPUExecutionProvider", threads: int | None = None,
                 config: dict | None = None, io_binding: bool | None = None):
        self.sess = session(path, provider, threads, config)
        # on a GPU the KV cache stays in device memory between steps (IO binding); only the ids, the
        # mask and the logits cross the bus. Default: on for every provider but the CPU's.
        self.io_binding = provider != "CPUExecutionProvider" if io_binding is None else io_binding
        self.cache_device = "cpu" if provider == "CPUExecutionProvider" else "cuda"
        ins = {i.name: i for i in self.sess.get_inputs()}
        self.layers = sum(1 for n in ins if n.startswith("past_key_values.") and n.endswith(".key"))
        k0 = ins["past_key_values.0.key"]
        self.kv_heads, self.head_dim = k0.shape[1], k0.shape[3]
        if not isinstance(self.kv_heads, int) or not isinstance(self.head_dim, int):  # symbolic: ask genai_config.json
            import json

            dec = json.loads((Path(path).parent / "genai_config.json").read_text())["model"]["decoder"]
            self.kv_heads, self.head_dim = dec["num_key_value_heads"], dec["head_size"]
        self.dtype = np.float16 if "float16" in k0.type else np.float32
        self.outputs = [o.name for o in self.sess.get_outputs()]
        # kiln's graphs compute logits for the last `logits_to_keep` positions (default 1); a graph
        # without that input (an older artifact, another builder's) computes them for every position
        self.keeps_last = "logits_to_keep" in ins or any(
            i.name == "logits_to_keep" for i in self.sess.get_overridable_initializers())

    def empty_cache(self, batch: int) -> list[np.ndarray]:
        z = np.zeros((batch, self.kv_heads, 0, self.head_dim), dtype=self.dtype)
        return [z] * (2 * self.layers)

    def forward(self, input_ids: np.ndarray, attention_mask: np.ndarray, cache: list, last_only: bool = False):
        """Logits (numpy) and the present cache: numpy arrays, or with IO binding OrtValues where the
        provider keeps them (pass them back as they are). Logits cover every position of input_ids,
        or with `last_only` the last at least (every position where the graph cannot choose)."""
        names = [f"past_key_values.{i // 2}.{'value' if i % 2 else 'key'}" for i in range(2 * self.layers)]
        keep = {"logits_to_keep": np.asarray(1 if last_only else 0, np.int64)} if self.keeps_last else {}
        if not self.io_binding:
            feed = {"input_ids": input_ids.astype(np.int64), "attention_mask": attention_mask.astype(np.int64), **keep}
            feed.update(zip(names, cache))
            out = self.sess.run(None, feed)
            return out[0], out[1:]
        import onnxruntime as ort

        io = self.sess.io_binding()
        io.bind_cpu_input("input_ids", np.ascontiguousarray(input_ids, dtype=np.int64))
        io.bind_cpu_input("attention_mask", np.ascontiguousarray(attention_mask, dtype=np.int64))
        for name, v in keep.items():  # an input with a default binds only as an OrtValue
            io.bind_ortvalue_input(name, ort.OrtValue.ortvalue_from_numpy(v))
        for name, c in zip(names, cache):
            if isinstance(c, np.ndarray):
                io.bind_cpu_input(name, c)
            else:
                io.bind_ortvalue_input(name, c)
        io.bind_output(self.outputs[0], "cpu")
        for name in self.outputs[1:]:
            io.bind_output(name, self.cache_device)
        self.sess.run_with_iobinding(io)
        out = io.get_outputs()
        return out[0].numpy(), list(out[1:])

    def logits(self, input_ids: np.ndarray) -> np.ndarray:
        """Logits of full windows (no cache), float32."""
        b = input_ids.shape[0]
        lg, _ = self.forward(input_ids, np.ones_like(input_ids), self.empty_cache(b))
        return lg.astype(np.float32)


@dataclass
class Generation:
    tokens: np.ndarray  # (batch, new)
    prefill_s: float
    step_s: list[float] = field(default_factory=list)


def generate(dec: OnnxDecoder, prompt: np.ndarray, max_new_tokens: int, *, temperature: float = 0.0,
             top_k: int = 0, top_p: float = 1.0, seed: int = 0, eos: int | None = None) -> Generation:
    """Prefill the (batch, S) prompt, then one token per step reusing the KV cache. temperature 0 is
    greedy; otherwise softmax(logits / T) restricted to the top_k and the top_p nucleus, seeded."""
    rng = np.random.default_rng(seed)
    batch = prompt.shape[0]
    mask = np.ones_like(prompt)
    t0 = time.perf_counter()
    logits, cache = dec.forward(prompt, mask, dec.empty_cache(batch), last_only=True)
    gen = Generation(np.zeros((batch, 0), np.int64), time.perf_counter() - t0)
    done = np.zeros(batch, bool)
    for step in range(max_new_tokens):
        nxt = pick(logits[:, -1].astype(np.float32), temperature, top_k, top_p, rng)
        if eos is not None:
            nxt = np.where(done, eos, nxt)
            done |= nxt == eos
        gen.tokens = np.concatenate([gen.tokens, nxt[:, None]], axis=1)
        if step == max_new_tokens - 1 or done.all():
            break
        mask = np.concatenate([mask, np.ones((batch, 1), mask.dtype)], axis=1)
        t = time.perf_counter()
        logits, cache = dec.forward(nxt[:, None], mask, cache, last_only=True)
        gen.step_s.append(time.perf_counter() - t)
    return gen


def pick(logits: np.ndarray, temperature: float, top_k: int, top_p: float, rng) -> np.ndarray:
    """Next token per row from (batch, vocab) logits."""
    if temperature <= 0:
        return logits.argmax(-1)
    z = logits / temperature
    if top_k:
        kth = np.partition(z, -top_k, axis=-1)[:, -top_k][:, None]
        z = np.where(z < kth, -np.inf, z)
    p = np.exp(z - z.max(-1, keepdims=True))
    p /= p.sum(-1, keepdims=True)
    if top_p < 1.0:
        order = np.argsort(-p, axis=-1)
        sorted_p = np.take_along_axis(p, order, -1)
        keep = np.cumsum(sorted_p, -1) - sorted_p < top_p  # the smallest prefix reaching top_p
        mask = np.zeros_like(p, bool)
        np.put_along_axis(mask, order, keep, -1)
        p = np.where(mask, p, 0.0)
        p /= p.sum(-1, keepdims=True)
    return np.array([rng.choice(p.shape[-1], p=row) for row in p])
