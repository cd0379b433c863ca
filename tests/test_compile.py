"""compile: ONNX graphs of every family match PyTorch, carry our codes bit for bit, run through the KV
cache and onnxruntime-genai; bad input fails before any weight is touched."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from conftest import ARCHS, gptq_recipe, run_cli, run_json, write_recipe

pytest.importorskip("onnxruntime")


def _export(model_dir, store, tmp_path, **opts):
    from kiln.compile.decoder import BuildOptions, build_decoder
    from kiln.compile.graph import save
    from kiln.compile.runtime import OnnxDecoder

    model, spec, kinds = build_decoder(model_dir, store, BuildOptions(**opts))
    save(model, tmp_path / "model.onnx")
    return OnnxDecoder(tmp_path / "model.onnx"), model, kinds


def _cached_logits(dec, ids: np.ndarray, split: int, cache=None) -> np.ndarray:
    """Prefill ids[:, :split], then one token at a time through the returned cache (from an empty
    one, or `cache`, e.g. a static cache written in place)."""
    b = ids.shape[0]
    lg, cache = dec.forward(ids[:, :split], np.ones((b, split)), dec.empty_cache(b) if cache is None else cache)
    outs = [lg]
    for t in range(split, ids.shape[1]):
        lg, cache = dec.forward(ids[:, t : t + 1], np.ones((b, t + 1)), cache)
        outs.append(lg)
    return np.concatenate(outs, axis=1)


@pytest.mark.parametrize("arch", ARCHS)
def test_float_export_matches_pytorch_prefill_and_cached_decode(arch, tiny_models, tmp_path):
    """70 tokens: past Gemma's 32-token sliding window, so the windowed layers are checked too."""
    from kiln.model import WeightStore, load_full

    d = tiny_models(arch)
    store = WeightStore(d)
    dec, _, kinds = _export(d, store, tmp_path)
    assert set(kinds.values()) == {"float"}
    ids = torch.randint(0, 512, (2, 70), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        ref = load_full(d, store)(ids).logits.numpy()
    assert np.abs(dec.logits(ids.numpy()) - ref).max() < 1e-4
    assert np.abs(_cached_logits(dec, ids.numpy(), 50) - ref).max() < 1e-4


@pytest.mark.parametrize("arch", ["qwen2", "gemma3_text", "gpt2"])  # untied head, tied head with softcap, tied
def test_logits_to_keep_defaults_to_the_last_position_and_zero_keeps_all(arch, tiny_models, tmp_path):
    """The graph's own default (what onnxruntime-genai gets) is the last position's logits; k keeps the
    last k; 0 every position, as scoring needs; the rows kept are the full run's rows."""
    from kiln.model import WeightStore

    d = tiny_models(arch)
    dec, model, _ = _export(d, WeightStore(d), tmp_path)
    assert [i.name for i in model.graph.input].count("logits_to_keep") == 1
    ids = np.random.default_rng(3).integers(0, 512, (2, 24))
    feed = {"input_ids": ids, "attention_mask": np.ones_like(ids)}
    feed.update({f"past_key_values.{i // 2}.{'value' if i % 2 else 'key'}": c for i, c in enumerate(dec.empty_cache(2))})
    full = dec.sess.run(["logits"], {**feed, "logits_to_keep": np.asarray(0, np.int64)})[0]
    assert full.shape == (2, 24, 512)
    default = dec.sess.run(["logits"], feed)[0]
    three = dec.sess.run(["logits"], {**feed, "logits_to_keep": np.asarray(3, np.int64)})[0]
    np.testing.assert_allclose(default, full[:, -1:], rtol=0, atol=1e-5)
    np.testing.assert_allclose(three, full[:, -3:], rtol=0, atol=1e-5)
    assert dec.forward(ids, np.ones_like(ids), dec.empty_cache(2), last_only=True)[0].shape == (2, 1, 512)
    assert dec.logits(ids).shape == (2, 24, 512)


def test_io_binding_keeps_the_cache_as_ort_values_and_changes_nothing(tiny_models, tmp_path):
    """The GPU path (KV cache bound as OrtValues, left where the provider put it), run here on the CPU
    provider: same logits as plain numpy feeds, prefill and cached decode."""
    from kiln.compile.runtime import OnnxDecoder, generate
    from kiln.model import WeightStore

    d = tiny_models("qwen2")
    plain, _, _ = _export(d, WeightStore(d), tmp_path)
    bound = OnnxDecoder(tmp_path / "model.onnx", io_binding=True)
    ids = np.random.default_rng(2).integers(0, 512, (2, 40))
    _, cache = bound.forward(ids[:, :8], np.ones((2, 8)), bound.empty_cache(2))
    assert cache and not isinstance(cache[0], np.ndarray)
    np.testing.assert_allclose(_cached_logits(bound, ids, 30), _cached_logits(plain, ids, 30), atol=1e-5)
    last = bound.forward(ids, np.ones_like(ids), bound.empty_cache(2), last_only=True)[0]
    np.testing.assert_allclose(last, plain.logits(ids)[:, -1:], atol=1e-5)
    assert (generate(bound, ids[:, :8], 6).tokens == generate(plain, ids[:, :8], 6).tokens).all()


@pytest.mark.parametrize("arch", ARCHS)
def test_a_cache_written_in_place_decodes_as_the_growing_one(arch, tiny_models, tmp_path):
    """GroupQueryAttention with past and present bound to one buffer (what generate does on the CPU)
    against a cache that grows by a copy each step: same logits through Gemma's sliding window, same
    greedy and sampled tokens at batch 2."""
    from kiln.compile.runtime import OnnxDecoder, StaticCache, generate
    from kiln.model import WeightStore

    d = tiny_models(arch)
    growing, _, _ = _export(d, WeightStore(d), tmp_path)
    in_place = OnnxDecoder(tmp_path / "model.onnx", shared_cache=True)
    assert in_place.shared_cache and not OnnxDecoder(tmp_path / "model.onnx", shared_cache=False).shared_cache
    assert OnnxDecoder(tmp_path / "model.onnx").shared_cache  # the CPU default for kiln's graphs
    ids = np.random.default_rng(4).integers(0, 512, (2, 70))
    one = in_place.static_cache(2, 1)
    assert isinstance(one, StaticCache) and in_place.forward(ids[:, :1], np.ones((2, 1)), one)[1] is one
    cache = in_place.static_cache(2, 70)
    np.testing.assert_allclose(_cached_logits(in_place, ids, 50, cache), _cached_logits(growing, ids, 50), atol=1e-5)
    growing.shared_cache = False
    for kw in ({}, {"temperature": 0.8, "top_k": 20, "seed": 3}):
        assert (generate(in_place, ids[:, :12], 20, **kw).tokens == generate(growing, ids[:, :12], 20, **kw).tokens).all()
    with pytest.raises(ValueError, match="static cache of 2 x 70"):
        in_place.forward(ids[:, :1], np.ones((2, 71)), cache)
    fresh = in_place.static_cache(1, 52)  # logits_to_keep 1, then 0 for a two-token step: rebound
    first = in_place.forward(ids[:1, :50], np.ones((1, 50)), fresh, last_only=True)[0]
    two = in_place.forward(ids[:1, 50:52], np.ones((1, 52)), fresh)[0]
    ref = growing.logits(ids[:1, :52])
    np.testing.assert_allclose(first, ref[:, 49:50], atol=1e-5)
    assert two.shape == (1, 2, 512)
    np.testing.assert_allclose(two, ref[:, 50:52], atol=1e-5)


def test_caches_pair_by_name_whatever_the_order_of_the_outputs(tiny_models, tmp_path):
    """onnxruntime-genai's builder lists every present key, then every value; the decoder must feed
    present.N.value back as past_key_values.N.value, not by position."""
    import onnx

    from kiln.compile.runtime import OnnxDecoder
    from kiln.errors import InputError
    from kiln.model import WeightStore

    d = tiny_models("llama")
    dec, model, _ = _export(d, WeightStore(d), tmp_path)
    outs = list(model.graph.output)
    reordered = [outs[0]] + sorted(outs[1:], key=lambda o: (o.name.endswith(".value"), int(o.name.split(".")[1])))
    assert [o.name for o in reordered] != [o.name for o in outs]
    del model.graph.output[:]
    model.graph.output.extend(reordered)
    onnx.save(model, str(tmp_path / "reordered.onnx"))  # beside model.onnx.data, which it names
    ids = np.random.default_rng(5).integers(0, 512, (1, 30))
    for shared in (False, True):
        other = OnnxDecoder(tmp_path / "reordered.onnx", shared_cache=shared)
        assert other.outputs[2].endswith(".key") and other.outputs[2] != "present.0.value"
        got = _cached_logits(other, ids, 20, other.static_cache(1, 30) if shared else None)
        np.testing.assert_allclose(got, _cached_logits(dec, ids, 20), atol=1e-5)
    old = model.graph.output[3].name  # a graph whose caches cannot be paired: named, not a traceback
    node = next(n for n in model.graph.node if old in n.output)
    node.output[list(node.output).index(old)] = model.graph.output[3].name = "present_3"
    onnx.save(model, str(tmp_path / "unnamed.onnx"))
    with pytest.raises(InputError, match="no output present.0.value for its input past_key_values.0.value"):
        OnnxDecoder(tmp_path / "unnamed.onnx")


@pytest.mark.parametrize("arch", ARCHS)
def test_onnxruntime_genai_generates_our_tokens_from_a_shared_cache(arch, tiny_models, tmp_path):
    """genai_config.json asks onnxruntime-genai for one in-place cache buffer (as its own builder
    does); every family's graph then generates, past Gemma's sliding window, the tokens kiln's loop does."""
    pytest.importorskip("onnxruntime_genai")
    from kiln.compile import build_target
    from kiln.compile.genai import genai_generate
    from kiln.compile.runtime import OnnxDecoder, generate
    from kiln.compile.targets import CpuTarget
    from kiln.model import WeightStore

    d = tiny_models(arch)
    build_target(CpuTarget(target="cpu"), d, WeightStore(d), tmp_path / "cpu")
    config = json.loads((tmp_path / "cpu" / "genai_config.json").read_text())
    assert config["search"]["past_present_share_buffer"]
    assert config["model"]["decoder"]["session_options"]["intra_op_num_threads"] == 0  # ORT's default: all cores
    prompt = np.random.default_rng(6).integers(0, 512, (1, 20))
    ours = generate(OnnxDecoder(tmp_path / "cpu" / "model.onnx"), prompt, 24).tokens[0].tolist()
    assert genai_generate(tmp_path / "cpu", prompt[0].tolist(), 24) == ours


def _quantized_store(model_dir, tmp_path, bits, group_size, symmetric, w8a8=False, bits_of=None):
    """Every linear but the head RTN-quantized; `bits_of` (module → bits) overrides the width."""
    from kiln.arch import is_linear, is_transposed, weight_matrix
    from kiln.compress.base import ActScheme
    from kiln.compress.quant import QuantScheme, rtn_quantize
    from kiln.compress.rotation import hadamard_block, rotate
    from kiln.model import WeightStore, build_skeleton, materialize, save_overlay

    model = build_skeleton(model_dir)
    store = WeightStore(model_dir)
    materialize(model, "", store)
    act = ActScheme(bits=8, rotation=w8a8 if isinstance(w8a8, str) else "none") if w8a8 else None
    bits_of = bits_of or {}
    def stored(W):  # a rotated W8A8 layer stores W R
        return rotate(W, hadamard_block(W.shape[1])) if act is not None and act.rotated else W

    q = {f"{n}.weight": (rtn_quantize(stored(weight_matrix(m)), QuantScheme(bits=bits_of.get(n, bits), group_size=group_size, symmetric=symmetric)),
                         is_transposed(m), act)
         for n, m in model.named_modules() if is_linear(m) and n not in ("lm_head",)}
    save_overlay(tmp_path / "q.safetensors", {}, q)
    return store.with_overlays([tmp_path / "q.safetensors"]), len(q)


@pytest.mark.parametrize("arch,bits,group_size,symmetric,w8a8", [
    ("llama", 4, 32, True, False), ("qwen2", 4, 32, False, False), ("mistral", 8, 16, False, False),
    ("gemma3_text", 4, None, True, False), ("gpt2", 4, 32, False, False), ("opt", 2, 32, False, False),
    ("llama", 8, None, True, True), ("opt", 8, None, True, True),
    ("llama", 8, None, True, "hadamard"), ("gemma3_text", 8, None, True, "hadamard"), ("gpt2", 8, None, True, "hadamard"),
])
def test_quantized_export_carries_our_grid(arch, bits, group_size, symmetric, w8a8, tiny_models, tmp_path):
    """Our codes, scales and zero points go into MatMulNBits (or int8 MatMulInteger for W8A8) as they
    are: the graph reproduces kiln's own dequantized (or W8A8) PyTorch model to float rounding."""
    from kiln.compile.graph import op_histogram
    from kiln.model import load_full

    d = tiny_models(arch)
    store, n_linear = _quantized_store(d, tmp_path, bits, group_size, symmetric, w8a8)
    dec, model, kinds = _export(d, store, tmp_path)
    ops = op_histogram(model)
    expected_kind = "int8" if w8a8 else "nbits"
    assert set(kinds.values()) == {expected_kind}
    if w8a8:
        assert ops["MatMulInteger"] == len(kinds)
    else:
        assert ops["com.microsoft.MatMulNBits"] == len(kinds)
    # no float copy of any quantized weight; a rotated product's inputs take two small MatMuls
    assert ops.get("MatMul", 0) == (2 * len(kinds) if w8a8 == "hadamard" else 0)
    ids = torch.randint(0, 512, (2, 40), generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        ref = load_full(d, store)(ids).logits.numpy()
    assert np.abs(dec.logits(ids.numpy()) - ref).max() < 1e-4
    assert np.abs(_cached_logits(dec, ids.numpy(), 30) - ref).max() < 1e-4


def test_linears_reading_one_input_run_as_one_product_only_where_their_grids_agree(tiny_models, tmp_path):
    """q/k/v and gate/up become one MatMulNBits each where their bits, blocks and zero points agree;
    a layer whose up_proj is 8-bit against a 4-bit gate keeps both. Either way the graph gives kiln's
    own model's logits."""
    from kiln.compile.graph import op_histogram
    from kiln.model import load_full

    d = tiny_models("llama")
    store, _ = _quantized_store(d, tmp_path, 4, 32, False, bits_of={"model.layers.0.mlp.up_proj": 8})
    dec, model, kinds = _export(d, store, tmp_path)
    assert {"model.layers.0.mlp.gate_proj", "model.layers.0.mlp.up_proj", "model.layers.1.mlp.gate_up_proj",
            "model.layers.0.self_attn.qkv_proj", "model.layers.1.self_attn.qkv_proj"} <= set(kinds)
    assert "model.layers.1.mlp.gate_proj" not in kinds and "model.layers.0.mlp.gate_up_proj" not in kinds
    assert op_histogram(model)["com.microsoft.MatMulNBits"] == len(kinds) == 9
    ids = torch.randint(0, 512, (2, 24), generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        ref = load_full(d, store)(ids).logits.numpy()
    assert np.abs(dec.logits(ids.numpy()) - ref).max() < 1e-4
    assert np.abs(_cached_logits(dec, ids.numpy(), 16) - ref).max() < 1e-4


@pytest.mark.parametrize("bits,group_size,symmetric,K", [(4, 32, True, 72), (4, 48, False, 96), (4, None, False, 72),
                                                          (8, 64, False, 100), (2, 16, True, 40), (4, 128, False, 576)])
def test_matmul_nbits_layout_decodes_to_our_weights(bits, group_size, symmetric, K):
    """Packing reference: the bytes, scales and zero points decode (by ORT's formula) to exactly
    kiln's dequantized weight, including ragged last groups and groups wider than one block."""
    from kiln.compile.weights import dequantize_nbits, to_matmul_nbits
    from kiln.compress.quant import QuantScheme, rtn_quantize

    W = torch.randn(24, K, generator=torch.Generator().manual_seed(3))
    q = rtn_quantize(W, QuantScheme(bits=bits, group_size=group_size, symmetric=symmetric))
    nb = to_matmul_nbits(q.codes.numpy(), q.scale.numpy(), q.zero.numpy(), bits, group_size, symmetric)
    assert nb.block_size >= 16 and nb.block_size & (nb.block_size - 1) == 0
    assert (nb.zero_points is None) == symmetric
    np.testing.assert_array_equal(dequantize_nbits(nb), q.dequantize().numpy())


def test_group_size_without_a_block_is_refused(tmp_path):
    from kiln.compile.weights import nbits_problem, to_matmul_nbits
    from kiln.errors import RecipeError

    assert nbits_problem("m", 40, 80) and "divisible by 16" in nbits_problem("m", 40, 80)
    assert nbits_problem("m", 48, 96) is None
    with pytest.raises(RecipeError, match="power of two"):
        to_matmul_nbits(np.zeros((2, 80), np.uint8), np.ones((2, 2), np.float32), np.full((2, 2), 8, np.uint8), 4, 40, True)


def test_sampling_is_seeded_and_greedy_is_argmax():
    from kiln.compile.runtime import pick

    rng = np.random.default_rng(0)
    logits = rng.normal(size=(3, 50)).astype(np.float32)
    assert (pick(logits, 0.0, 0, 1.0, None) == logits.argmax(-1)).all()
    a = pick(logits, 0.8, 10, 0.9, np.random.default_rng(5))
    b = pick(logits, 0.8, 10, 0.9, np.random.default_rng(5))
    assert (a == b).all()
    top10 = np.argsort(-logits, -1)[:, :10]
    assert all(a[i] in top10[i] for i in range(3))
    # top_p tiny keeps only the most likely token
    assert (pick(logits, 1.0, 0, 1e-6, np.random.default_rng(1)) == logits.argmax(-1)).all()


def _compile_recipe(model_dir, **compile_cfg):
    r = gptq_recipe(model_dir, group_size=32, samples=4, seq_len=32)
    r["evaluate"] = {"perplexity": True}
    r["compile"] = {"targets": [{"target": "cpu"}, {"target": "cuda"}, {"target": "tensorrt"}], **compile_cfg}
    return r


def test_run_compiles_checks_and_ships_onnx(tiny_models, tmp_path):
    d = tiny_models("llama")
    res = run_json("run", str(write_recipe(tmp_path / "r.yaml", _compile_recipe(d))), "--out", str(tmp_path / "run"), "-q")
    art = tmp_path / "run" / "artifact"
    m = json.loads((art / "manifest.json").read_text())
    cpu = m["compile"]["targets"]["cpu"]
    assert cpu["parity"]["passed"] and cpu["parity"]["top1_agreement"] >= 0.995
    assert abs(cpu["parity"]["perplexity_rel"]) <= 0.005
    assert cpu["op_histogram"]["com.microsoft.MatMulNBits"] == 2 * 4  # fused QKV, O, fused gate/up, down per layer
    assert cpu["op_histogram"]["com.microsoft.GroupQueryAttention"] == 2
    assert cpu["linears"] == {"nbits": 8}
    assert "op_histogram_optimized" in cpu
    assert cpu["onnxruntime_genai"]["tokens_match"]
    assert len(cpu["generation"]["tokens"]) == 8
    assert "onnx/cpu/model.onnx" in m["files"] and "onnx/cpu/genai_config.json" in m["files"]
    cuda = m["compile"]["targets"]["cuda"]
    assert cuda["dtype"] == "float16" and cuda["runtime_checks"].startswith("skipped")
    assert "onnxruntime-gpu" in cuda["runtime_checks"]
    # no GPU here: the float16 graph's numerics are still checked, on the CPU provider, and say so
    assert cuda["parity_provider"].startswith("CPUExecutionProvider (stand-in") and cuda["parity"]["passed"]
    trt = m["compile"]["targets"]["tensorrt"]
    assert not any(op.startswith("com.microsoft") for op in trt["op_histogram"])  # standard ONNX only
    assert trt["op_histogram"]["DequantizeLinear"] == 2 * 7 and trt["linears"] == {"qdq": 14}
    assert trt["parity"]["passed"] and trt["engine_build"].startswith("trtexec --onnx=model.onnx")
    assert (art / "onnx" / "tensorrt" / "build_engine.sh").is_file()
    assert isinstance(m["compile"]["cpu"]["avx2"], bool)
    cfg = json.loads((art / "onnx" / "cpu" / "genai_config.json").read_text())
    assert cfg["model"]["decoder"]["num_hidden_layers"] == 2 and cfg["model"]["type"] == "llama"
    code, out, _ = run_cli("inspect", str(art))
    assert code == 0 and "GroupQueryAttention" in out and "parity" in out


def test_parity_failure_is_an_error_and_writes_no_artifact(tiny_models, tmp_path):
    """A float32 graph of an unquantized model differs from PyTorch by ~1e-7; a limit of 1e-12 must fail."""
    d = tiny_models("qwen2")
    r = gptq_recipe(d)
    r.update(compress=[], evaluate=None, data={"evaluation": r["data"]["evaluation"]},
             compile={"targets": [{"target": "cpu"}], "parity": {"max_abs_logit": 1e-12, "windows": 1, "float64_floor": False}})
    code, _, err = run_cli("run", str(write_recipe(tmp_path / "r.yaml", r)), "--out", str(tmp_path / "run"), "-q")
    assert code == 8, err
    assert "max |Δ logit|" in err and "no artifact was written" in err
    assert not (tmp_path / "run" / "artifact").exists()


def test_float64_floor_accepts_float32_rounding_and_still_catches_a_wrong_graph(tiny_models):
    """Past max_abs_logit, a float32 graph is measured against float64 logits: one about as far from them
    as PyTorch's float32 passes, one that is off by 1e-3 everywhere (an export bug's size) does not."""
    import numpy as np
    import torch
    from transformers import AutoModelForCausalLM

    from kiln.compile import check_parity
    from kiln.compile.targets import ParityConfig
    from kiln.context import RunContext

    model = AutoModelForCausalLM.from_pretrained(tiny_models("llama"), dtype=torch.float32).eval()

    class Torch32:  # PyTorch's float32 result itself, standing in for a graph
        def __init__(self, offset=0.0):
            self.offset = offset

        def logits(self, x):
            with torch.no_grad():
                return model(input_ids=torch.from_numpy(x), use_cache=False).logits.numpy() + self.offset

    ids = torch.randint(0, model.config.vocab_size, (2, 16), generator=torch.Generator().manual_seed(0))
    decoders = {"same": Torch32(), "off": Torch32(1e-3)}
    strict = ParityConfig(max_abs_logit=1e-12)
    r = check_parity(model, decoders, ids, 1, {"same": strict, "off": strict}, {"same": True, "off": True},
                     RunContext(show_progress=False))
    same, off = r["same"], r["off"]
    assert same["max_abs_logit"] == 0.0 and same["passed"] and "float64" not in same  # never over the limit
    assert not off["passed"] and off["float64"]["windows"] == [0, 1]
    assert off["float64"]["graph_max_abs"] > 4 * off["float64"]["torch_float32_max_abs"]
    assert np.isclose(off["max_abs_logit"], 1e-3, rtol=1e-3) and "from float64" in off["failures"][0]
    r = check_parity(model, {"same": Torch32(1e-9)}, ids, 1, {"same": strict}, {"same": True}, RunContext(show_progress=False))
    f64 = r["same"]["float64"]
    assert r["same"]["passed"] == (f64["graph_max_abs"] <= 4 * f64["torch_float32_max_abs"]) and f64["torch_float32_max_abs"] > 0


@pytest.mark.parametrize("change,needle", [
    ({"compile": {"targets": [{"target": "tpu"}]}}, "compile.targets[0]"),
    ({"compile": {"targets": [{"target": "cpu", "accuracy_level": 7}]}}, "accuracy_level"),
    ({"compile": {"targets": [{"target": "cpu"}, {"target": "cpu"}]}}, "distinct `name`s"),
    ({"compile": {"targets": []}}, "compile.targets"),
])
def test_bad_compile_sections_are_recipe_errors(change, needle, tiny_models, tmp_path):
    r = gptq_recipe(tiny_models("llama"))
    r.update(change)
    code, _, err = run_cli("validate", str(write_recipe(tmp_path / "r.yaml", r)), "--schema-only")
    assert code == 3 and needle in err, err


def test_compile_without_evaluation_text_is_refused(tiny_models, tmp_path):
    r = gptq_recipe(tiny_models("llama"))
    r["data"].pop("evaluation")
    r.update(evaluate=None, compile={"targets": [{"target": "cpu"}]})
    code, _, err = run_cli("validate", str(write_recipe(tmp_path / "r.yaml", r)), "--schema-only")
    assert code == 3 and "data.evaluation" in err


def test_unexportable_grid_and_family_are_refused_at_plan_time(tiny_models, tmp_path):
    d = tiny_models("llama")
    r = gptq_recipe(d, fmt="kiln", group_size=40)
    r["compile"] = {"targets": [{"target": "cpu"}]}
    code, _, err = run_cli("validate", str(write_recipe(tmp_path / "r.yaml", r)))
    assert code == 3 and "model.layers.0.self_attn.q_proj" in err and "MatMulNBits" in err
    r = gptq_recipe(d, bits=3)
    r["compile"] = {"targets": [{"target": "cpu"}]}
    code, _, err = run_cli("validate", str(write_recipe(tmp_path / "r3.yaml", r)))
    assert code == 3 and "3-bit" in err


def test_unknown_family_names_the_model_type():
    from transformers import Phi3Config

    from kiln.compile.decoder import spec_from_config
    from kiln.errors import RecipeError

    with pytest.raises(RecipeError, match="(?s)'phi3'.*supported families: llama"):
        spec_from_config(Phi3Config(), True)


def test_lm_head_bits_quantizes_the_output_projection_and_halves_the_table(tiny_models, tmp_path):
    """With the head quantized at export the tied table is only gathered: stored float16 (exact for an
    artifact in float16), and the head is a MatMulNBits whose logits stay close to the float head's."""
    from onnx import TensorProto

    from kiln.compile.graph import op_histogram
    from kiln.model import WeightStore, load_full

    d = tiny_models("llama")
    store = WeightStore(d).rounded(torch.float16)
    dec, model, kinds = _export(d, store, tmp_path, lm_head_bits=8)
    assert kinds["lm_head"] == "nbits" and op_histogram(model).get("Gemm", 0) == 0
    types = {i.name: i.data_type for i in model.graph.initializer}
    assert types["model.embed_tokens.weight"] == TensorProto.FLOAT16
    ids = torch.randint(0, 512, (1, 40), generator=torch.Generator().manual_seed(4))
    with torch.no_grad():
        ref = load_full(d, store)(ids).logits.numpy()
    out = dec.logits(ids.numpy())
    assert np.abs(out - ref).max() < 0.02 * (ref.max() - ref.min())


@pytest.mark.parametrize("arch", ["llama", "gpt2"])
def test_a_head_quantized_in_compress_exports_its_codes(arch, tiny_models, tmp_path):
    """`targets: [lm_head]` in compress: every target's head is the stage's codes (MatMulNBits or
    QDQ), held to the exact parity bar against kiln's PyTorch model with the same head; export-time
    lm_head_bits on top of it is refused before any work."""
    d = tiny_models(arch)
    r = gptq_recipe(d, fmt="kiln", group_size=32, samples=4, seq_len=32)
    r["compress"].append({"kind": "gptq", "targets": ["lm_head"],  # symmetric: TensorRT takes no zero points
                          "scheme": {"bits": 4, "group_size": 32, "symmetric": True, "observer": "mse"}})
    r["evaluate"] = {"perplexity": True}
    r["compile"] = {"targets": [{"target": "cpu"}, {"target": "tensorrt"}]}
    run_json("run", str(write_recipe(tmp_path / "r.yaml", r)), "--out", str(tmp_path / "run"), "-q")
    m = json.loads((tmp_path / "run" / "artifact" / "manifest.json").read_text())
    cpu, trt = m["compile"]["targets"]["cpu"], m["compile"]["targets"]["tensorrt"]
    assert cpu["linear_kinds"]["lm_head"] == "nbits" and trt["linear_kinds"]["lm_head"] == "qdq"
    assert cpu["lm_head"] == "int4 codes from compress (group 32, symmetric)"
    assert cpu["logits"].startswith("last position unless") and trt["logits"] == "every position"
    assert cpu["op_histogram"].get("Gemm", 0) == 0
    assert cpu["parity"]["top1_agreement"] >= 0.995 and abs(cpu["parity"]["perplexity_rel"]) <= 0.005
    assert cpu["parity"]["max_abs_logit"] < 1e-4  # float activations: the same dequantized head as PyTorch
    from kiln.compile.runtime import OnnxDecoder  # the MatMulNBits head on the last position only

    dec = OnnxDecoder(tmp_path / "run" / "artifact" / "onnx" / "cpu" / "model.onnx")
    ids = np.random.default_rng(4).integers(0, 512, (2, 20))
    last = dec.forward(ids, np.ones_like(ids), dec.empty_cache(2), last_only=True)[0]
    np.testing.assert_allclose(last, dec.logits(ids)[:, -1:], rtol=0, atol=1e-5)
    r["compile"] = {"targets": [{"target": "cpu", "lm_head_bits": 8}]}
    code, _, err = run_cli("validate", str(write_recipe(tmp_path / "r2.yaml", r)))
    assert code == 3 and "lm_head_bits would quantize lm_head again" in err and "compress[1]" in err, err


@pytest.mark.parametrize("arch", ["llama", "gemma3_text"])
def test_float16_graph_runs_and_stays_close(arch, tiny_models, tmp_path):
    """The cuda target's float16 graph (activations, weights, KV cache in float16), run here on the
    CPU provider: a numerical check of the graph itself, not of CUDA's kernels."""
    from kiln.model import WeightStore, load_full

    d = tiny_models(arch)
    store = WeightStore(d)
    dec, _, _ = _export(d, store, tmp_path, dtype="float16")
    assert dec.dtype == np.float16
    ids = torch.randint(0, 512, (1, 40), generator=torch.Generator().manual_seed(5))
    with torch.no_grad():
        ref = load_full(d, store)(ids).logits.numpy()
    out = _cached_logits(dec, ids.numpy(), 30).astype(np.float32)
    assert np.abs(out - ref).max() < 1e-2 * (ref.max() - ref.min())


@pytest.mark.parametrize("arch,dtype,bits,group_size", [
    ("llama", "float32", None, None), ("gemma3_text", "float32", 4, 16), ("gpt2", "float32", 4, 32),
    ("opt", "float32", 8, None), ("qwen2", "float16", 4, 32), ("mistral", "float16", None, None),
])
def test_tensorrt_qdq_graph_matches_pytorch(arch, dtype, bits, group_size, tiny_models, tmp_path):
    """The TensorRT graph: standard ONNX only (explicit attention, masks, rotary; QDQ weights), run
    here with ONNX Runtime's CPU provider as a numerical check of the graph."""
    import onnx

    from kiln.compile.decoder import BuildOptions, build_decoder
    from kiln.compile.graph import op_histogram, save
    from kiln.compile.runtime import EXACT_QDQ, OnnxDecoder
    from kiln.model import WeightStore, load_full

    d = tiny_models(arch)
    store = WeightStore(d) if bits is None else _quantized_store(d, tmp_path, bits, group_size, True)[0]
    model, _, kinds = build_decoder(d, store, BuildOptions(dtype=dtype), qdq=True)
    assert {o.domain for o in model.opset_import} == {""}
    ops = op_histogram(model)
    assert not any(op.startswith("com.microsoft") for op in ops)
    if bits:
        assert set(kinds.values()) == {"qdq"} and ops["DequantizeLinear"] == len(kinds)
    save(model, tmp_path / "model.onnx")
    onnx.checker.check_model(str(tmp_path / "model.onnx"))
    saved = onnx.load(str(tmp_path / "model.onnx"), load_external_data=False)
    assert saved.ir_version <= 10  # opset 21's IR, which every ONNX Runtime since 1.17 reads
    inline = [t.name for t in saved.graph.initializer if not t.external_data and t.ByteSize() > 4096]
    assert not inline  # INT4 weights too go to the external-data file (the protobuf cannot pass 2 GB)
    dec = OnnxDecoder(tmp_path / "model.onnx", config=EXACT_QDQ)
    ids = torch.randint(0, 512, (2, 70), generator=torch.Generator().manual_seed(6))
    with torch.no_grad():
        ref = load_full(d, store)(ids).logits.numpy()
    tol = 1e-4 if dtype == "float32" else 1e-2 * (ref.max() - ref.min())
    assert np.abs(dec.logits(ids.numpy()).astype(np.float32) - ref).max() < tol
    assert np.abs(_cached_logits(dec, ids.numpy(), 50).astype(np.float32) - ref).max() < tol


@pytest.mark.parametrize("scheme,extra,needle", [
    ({"bits": 4, "group_size": 32, "symmetric": False}, {}, "symmetric weight grids only"),
    ({"bits": 8, "group_size": None, "symmetric": True}, {"activations": {"bits": 8}}, "no TensorRT QDQ form"),
    ({"bits": 8, "group_size": 32, "symmetric": True}, {}, "no TensorRT weight-only kernel"),
])
def test_tensorrt_refuses_grids_it_cannot_run_before_any_work(scheme, extra, needle, tiny_models, tmp_path):
    r = gptq_recipe(tiny_models("llama"))
    r["compress"] = [{"kind": "rtn", "scheme": scheme, **extra}]
    r["compile"] = {"targets": [{"target": "tensorrt"}]}
    code, _, err = run_cli("validate", str(write_recipe(tmp_path / "r.yaml", r)))
    assert code == 3 and needle in err and "model.layers.0.self_attn.q_proj" in err, err
