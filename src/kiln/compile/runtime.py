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
                 config: dict | None = None, io_binding: bool | None = None, shared_cache: bool | None = None):
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
        outs = self.sess.get_outputs()
        self.outputs = [o.name for o in outs]
        out0 = outs[0]
        self.vocab = out0.shape[-1] if isinstance(out0.shape[-1], int) else None
        self.logits_dtype = np.float16 if "float16" in out0.type else np.float32
        # caches pair by name, not by position: kiln's graphs list key, value per layer, onnxruntime-
        # genai's builder all keys, then all values
        self.past_names = [f"past_key_values.{i // 2}.{'value' if i % 2 else 'key'}" for i in range(2 * self.layers)]
        self.present_names = [n.replace("past_key_values.", "present.") for n in self.past_names]
        missing = sorted(set(self.present_names) - set(self.outputs))
        if missing:
            raise InputError(f"{path}: the graph has no output {missing[0]} for its input "
                             f"{missing[0].replace('present.', 'past_key_values.')}",
                             hint="compile the model with kiln, or use a graph whose caches are named present.N.key / .value")
        # kiln's graphs compute logits for the last `logits_to_keep` positions (default 1); a graph
        # without that input (an older artifact, another builder's) computes them for every position
        self.keeps_last = "logits_to_keep" in ins or any(
            i.name == "logits_to_keep" for i in self.sess.get_overridable_initializers())
        # GroupQueryAttention writes the new step into the cache in place when its past and present are
        # one buffer: no copy of the whole cache per step. Default: on the CPU provider for graphs whose
        # attention is GroupQueryAttention alone (every kiln graph); not yet run on a GPU, so off there
        self.shared_cache = (provider == "CPUExecutionProvider" and _attention_ops(path) == {"GroupQueryAttention"}
                             if shared_cache is None else shared_cache)

    def empty_cache(self, batch: int) -> list[np.ndarray]:
        z = np.zeros((batch, self.kv_heads, 0, self.head_dim), dtype=self.dtype)
        return [z] * (2 * self.layers)

    def static_cache(self, batch: int, length: int) -> StaticCache:
        """A cache of `length` positions that every forward pass writes in place (see `shared_cache`)."""
        import onnxruntime as ort

        arrays = [np.zeros((batch, self.kv_heads, length, self.head_dim), self.dtype) for _ in self.past_names]
        values = [ort.OrtValue.ortvalue_from_numpy(a, self.cache_device, 0) for a in arrays]
        return StaticCache(batch, length, arrays if self.cache_device == "cpu" else [], values)

    def new_cache(self, batch: int, length: int) -> list | StaticCache:
        """The cache a generation of `length` positions in all starts from."""
        return self.static_cache(batch, length) if self.shared_cache else self.empty_cache(batch)

    def forward(self, input_ids: np.ndarray, attention_mask: np.ndarray, cache, last_only: bool = False):
        """Logits (numpy) and the present cache: numpy arrays, or with IO binding OrtValues where the
        provider keeps them (pass them back as they are), or the same StaticCache, now written to.
        Logits cover every position of input_ids, or with `last_only` the last at least (every
        position where the graph cannot choose)."""
        keep = {"logits_to_keep": np.asarray(1 if last_only else 0, np.int64)} if self.keeps_last else {}
        if isinstance(cache, StaticCache):
            return self._forward_in_place(input_ids, attention_mask, cache, keep), cache
        if not self.io_binding:
            feed = {"input_ids": input_ids.astype(np.int64), "attention_mask": attention_mask.astype(np.int64), **keep}
            feed.update(zip(self.past_names, cache))
            out = self.sess.run([self.outputs[0], *self.present_names], feed)
            return out[0], out[1:]
        import onnxruntime as ort

        io = self.sess.io_binding()
        io.bind_cpu_input("input_ids", np.ascontiguousarray(input_ids, dtype=np.int64))
        io.bind_cpu_input("attention_mask", np.ascontiguousarray(attention_mask, dtype=np.int64))
        for name, v in keep.items():  # an input with a default binds only as an OrtValue
            io.bind_ortvalue_input(name, ort.OrtValue.ortvalue_from_numpy(v))
        for name, c in zip(self.past_names, cache):
            if isinstance(c, np.ndarray):
                io.bind_cpu_input(name, c)
            else:
                io.bind_ortvalue_input(name, c)
        io.bind_output(self.outputs[0], "cpu")
        for name in self.present_names:
            io.bind_output(name, self.cache_device)
        self.sess.run_with_iobinding(io)
        out = io.get_outputs()
        return out[0].numpy(), list(out[1:])

    def _forward_in_place(self, input_ids, attention_mask, cache: StaticCache, keep: dict) -> np.ndarray:
        import onnxruntime as ort

        if attention_mask.shape[0] != cache.batch or attention_mask.shape[1] > cache.length:
            raise ValueError(f"a static cache of {cache.batch} x {cache.length} positions cannot take a mask of "
                             f"shape {attention_mask.shape}")
        io = cache.binding
        if io is None:  # the cache is bound once; a step rebinds only what changes (binding costs ~µs a name)
            io = cache.binding = self.sess.io_binding()
            io.bind_output(self.outputs[0], "cpu")  # first, so that it stays get_outputs()[0]
            for past, present, v in zip(self.past_names, self.present_names, cache.values):
                io.bind_ortvalue_input(past, v)
                io.bind_ortvalue_output(present, v)
        k = int(keep["logits_to_keep"]) if keep else None
        if k is not None and k != cache.keep:  # an input with a default binds only as an OrtValue
            io.bind_ortvalue_input("logits_to_keep", ort.OrtValue.ortvalue_from_numpy(keep["logits_to_keep"]))
        cache.keep = k
        io.bind_cpu_input("input_ids", np.ascontiguousarray(input_ids, dtype=np.int64))
        io.bind_cpu_input("attention_mask", np.ascontiguousarray(attention_mask, dtype=np.int64))
        # one row of logits (a decode step, or the last position of a prompt) goes into a buffer bound
        # once: reading it back is then one small copy, not a wrap of every output. Other shapes (the
        # graph declares one row) are left to ORT to allocate
        if (input_ids.shape[1] != 1 and k != 1) or self.vocab is None:
            cache.logits = None
            io.bind_output(self.outputs[0], "cpu")
            self.sess.run_with_iobinding(io)
            return io.get_outputs()[0].numpy()
        if cache.logits is None or cache.logits.shape[0] != input_ids.shape[0]:
            cache.logits = np.empty((input_ids.shape[0], 1, self.vocab), self.logits_dtype)
            io.bind_ortvalue_output(self.outputs[0], ort.OrtValue.ortvalue_from_numpy(cache.logits))
        self.sess.run_with_iobinding(io)
        return cache.logits.copy()

    def logits(self, input_ids: np.ndarray) -> np.ndarray:
        """Logits of full windows (no cache), float32."""
        b = input_ids.shape[0]
        lg, _ = self.forward(input_ids, np.ones_like(input_ids), self.empty_cache(b))
        return lg.astype(np.float32)


@dataclass
class StaticCache:
    """Past and present keys and values of every layer, `length` positions each, bound as one buffer
    per tensor; positions past the attention mask's length are not read."""

    batch: int
    length: int
    arrays: list  # the numpy buffers the CPU OrtValues view; kept alive with them
    values: list
    binding: object = None  # the IOBinding, with these values bound, of the decoder whose static_cache made it
    logits: np.ndarray | None = None  # the buffer the logits output is bound to
    keep: int | None = None  # the logits_to_keep bound


def _attention_ops(path: Path) -> set[str]:
    import onnx

    model = onnx.load(str(path), load_external_data=False)
    return {n.op_type for n in model.graph.node if n.op_type in ("GroupQueryAttention", "MultiHeadAttention", "Attention")}


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
    logits, cache = dec.forward(prompt, mask, dec.new_cache(batch, prompt.shape[1] + max_new_tokens), last_only=True)
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
