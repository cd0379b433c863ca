"""Integration tier for the methods beyond GPTQ: every method on every claimed architecture, the
compositions, and what each must keep of the stages before it."""

from __future__ import annotations

import json

import pytest
import torch
from torch import nn

from conftest import ARCHS, gptq_recipe, run_cli, run_json, write_recipe

W4 = {"bits": 4, "group_size": 32, "symmetric": True}
W4_ASYM = {"bits": 4, "group_size": 32, "symmetric": False}
W8 = {"bits": 8, "group_size": None, "symmetric": True}

METHODS = {
    "sparsegpt": [{"kind": "sparsegpt", "sparsity": 0.5, "block_size": 16}],
    "sparsegpt24-gptq": [{"kind": "sparsegpt", "pattern": "2:4"}, {"kind": "gptq", "scheme": W4}],
    "awq-rtn": [{"kind": "awq", "scheme": W4_ASYM}, {"kind": "rtn", "scheme": W4_ASYM}],
    "awq-gptq": [{"kind": "awq", "scheme": W4}, {"kind": "gptq", "scheme": W4}],
    "smoothquant-gptq-w8a8": [{"kind": "smoothquant", "alpha": 0.5}, {"kind": "gptq", "scheme": W8, "activations": {"bits": 8}}],
    "smoothquant-gptq-w8a8-hadamard": [{"kind": "smoothquant", "alpha": 0.5},
                                       {"kind": "gptq", "scheme": W8, "activations": {"bits": 8, "rotation": "hadamard"}}],
    "sparsegpt-gptq-distill": [{"kind": "sparsegpt", "sparsity": 0.5, "block_size": 16}, {"kind": "gptq", "scheme": W4},
                               {"kind": "distill", "teacher": "original", "steps": 6, "batch_size": 2, "lr": 1e-3, "scale_lr": 1e-3,
                                "lr_schedule": "cosine", "warmup_steps": 1, "hidden_weight": 1.0, "hidden_layers": "all"}],
}


def method_recipe(model_dir, stages, arch, **kw) -> dict:
    r = gptq_recipe(model_dir, fmt="kiln" if arch == "gpt2" else "compressed-tensors", **kw)
    r["compress"] = stages
    r["evaluate"] = {"perplexity": True, "reference_rtn": False}
    return r


def _linear_weights(model, names):
    from kiln.arch import weight_matrix

    return {n: weight_matrix(model.get_submodule(n)).float() for n in names}


@pytest.mark.parametrize("arch", ARCHS)
@pytest.mark.parametrize("method", list(METHODS))
def test_method_end_to_end(arch, method, tiny_models, tmp_path):
    from kiln.artifact import load_model
    from kiln.compress.sparsegpt import nm_mask_ok

    stages = METHODS[method]
    r = write_recipe(tmp_path / "r.yaml", method_recipe(tiny_models(arch), stages, arch))
    out = run_json("run", str(r), "--out", str(tmp_path / "run"), "--quiet")
    m = out["metrics"]
    base, comp = m["baseline"]["perplexity"]["wiki"], m["compressed"]["perplexity"]["wiki"]
    assert 1.0 < comp < 2 * base, (base, comp)
    assert [s["kind"] for s in out["stages"]] == [s["kind"] for s in stages]

    model = load_model(tmp_path / "run" / "artifact")
    pruned_stage = next((s for s in out["stages"] if s["kind"] == "sparsegpt"), None)
    if pruned_stage is not None:
        W = _linear_weights(model, pruned_stage["modules"])
        zeros = sum(int((w == 0).sum()) for w in W.values()) / sum(w.numel() for w in W.values())
        assert zeros >= 0.5, zeros  # every later stage kept the zeros (quantization may add a few)
        if pruned_stage["config"]["pattern"] == "2:4":
            assert all(nm_mask_ok(w != 0, 2, 4) for w in W.values())
    manifest = json.loads((tmp_path / "run" / "artifact" / "manifest.json").read_text())
    if method.startswith("smoothquant"):
        q = manifest["quantized_modules"]
        assert all(v["activation_bits"] == 8 for v in q.values())
        if arch != "gpt2":
            cfg = json.loads((tmp_path / "run" / "artifact" / "config.json").read_text())["quantization_config"]
            assert cfg["format"] == "int-quantized"
            assert all(g["input_activations"]["strategy"] == "token" for g in cfg["config_groups"].values())
            if method.endswith("hadamard"):  # every W8A8 linear is named by a hadamard transform on its input
                rotated = [t for sch in cfg["transform_config"]["config_groups"].values() for a in sch["apply"]
                           for t in a["targets"] if sch["type"] == "hadamard" and a["location"] == "input"]
                assert sorted(rotated) == sorted(q)
        if method.endswith("hadamard"):
            assert all(v["rotation"] == "hadamard" for v in q.values())
            # the artifact loads back as the float function of x: W R's codes un-rotated
            from kiln.model import WeightStore, load_full

            ref = load_full(tiny_models(arch), WeightStore(tiny_models(arch)))
            ids = torch.randint(0, 512, (2, 24), generator=torch.Generator().manual_seed(0))
            with torch.no_grad():
                a, b = ref(ids).logits, model(ids).logits
            assert float((a - b).norm() / a.norm()) < 0.05
    if method.endswith("distill"):
        curve = manifest["stages"][-1]["result"]["loss_curve"]
        assert len(curve) == 6 and all(c >= 0 for c in curve)


def test_awq_smoothing_keeps_the_float_model(tiny_models, tmp_path):
    """AWQ's folded scales alone (no clipping, no quantization) leave the model's function intact."""
    from kiln.model import WeightStore, load_full

    model_dir = tiny_models("llama")
    r = method_recipe(model_dir, [{"kind": "awq", "scheme": W4, "clip": False}, {"kind": "rtn", "scheme": {**W4, "bits": 8}}],
                      "llama")
    r["compress"][0]["scheme"] = r["compress"][1]["scheme"]
    run_json("run", str(write_recipe(tmp_path / "r.yaml", r)), "--out", str(tmp_path / "run"), "--quiet")
    awq_files = sorted((tmp_path / "run" / "stages").glob("00-awq-*/layer-*.safetensors"))
    assert awq_files
    ref = load_full(model_dir, WeightStore(model_dir))
    smoothed = load_full(model_dir, WeightStore(model_dir, awq_files))
    changed = [k for k, v in smoothed.state_dict().items() if not torch.equal(v, ref.state_dict()[k])]
    assert any("layernorm" in k for k in changed) and any("proj" in k for k in changed)
    ids = torch.randint(0, 512, (2, 32), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        a, b = ref(ids).logits, smoothed(ids).logits
    assert float((a - b).norm() / b.norm()) < 1e-4


@pytest.mark.parametrize("arch,linear_fed,groups,alpha", [
    ("llama", "mlp.down_proj", "norm", 0.5), ("llama", "mlp.down_proj", "all", 0.5),
    ("opt", "fc2", "norm", 0.5), ("opt", "fc2", "all", 0.5),
    ("llama", "mlp.down_proj", "all", "auto"), ("gemma3_text", "mlp.down_proj", "all", "auto")])
def test_smoothquant_keeps_the_float_model(tiny_models, tmp_path, arch, linear_fed, groups, alpha):
    """SmoothQuant's folds leave the float function intact; groups='all' also smooths the inputs of
    linear-fed groups (down_proj through up_proj, OPT's fc2 through fc1), 'norm' leaves those linears alone.
    alpha 'auto' records each group's α and its W8A8 output error, below the unsmoothed one's."""
    from kiln.model import WeightStore, load_full

    model_dir = tiny_models(arch)
    r = method_recipe(model_dir, [{"kind": "smoothquant", "alpha": alpha, "groups": groups},
                                  {"kind": "rtn", "scheme": W8, "activations": {"bits": 8}}], arch)
    out = run_json("run", str(write_recipe(tmp_path / "r.yaml", r)), "--out", str(tmp_path / "run"), "--quiet")
    stats = out["stages"][0]["module_stats"]
    assert all(("alpha" in v) == (alpha == "auto") for v in stats.values()), stats
    if alpha == "auto":
        assert all((v["alpha"] is None or 0.0 <= v["alpha"] <= 1.0) and v["w8a8_error"] <= v["w8a8_error_unsmoothed"]
                   for v in stats.values())
    files = sorted((tmp_path / "run" / "stages").glob("00-smoothquant-*/layer-*.safetensors"))
    ref = load_full(model_dir, WeightStore(model_dir))
    smoothed = load_full(model_dir, WeightStore(model_dir, files))
    changed = {k for k, v in smoothed.state_dict().items() if not torch.equal(v, ref.state_dict()[k])}
    assert any(k.endswith(f"{linear_fed}.weight") for k in changed) == (groups == "all"), sorted(changed)
    ids = torch.randint(0, 512, (2, 32), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        a, b = ref(ids).logits, smoothed(ids).logits
    assert float((a - b).norm() / b.norm()) < 1e-4


def test_distillation_loss_goes_down_and_masks_stay(tiny_models, tmp_path):
    """In float32 and in bfloat16 mixed precision (`compute_dtype: bfloat16`, whose loss curve is
    not float32's: autocast is on)."""
    from kiln.artifact import load_model

    stages = [{"kind": "sparsegpt", "sparsity": 0.5, "block_size": 16},
              {"kind": "distill", "teacher": "original", "steps": 30, "batch_size": 4, "lr": 3e-3}]
    r = method_recipe(tiny_models("llama"), stages, "llama", samples=16)
    r["evaluate"]["after_each_stage"] = True
    curves = {}
    for compute in ("float32", "bfloat16"):
        r["data"]["calibration"]["compute_dtype"] = compute
        run = tmp_path / compute
        out = run_json("run", str(write_recipe(tmp_path / f"{compute}.yaml", r)), "--out", str(run), "--quiet")
        curve = curves[compute] = out["stages"][1]["result"]["loss_curve"]
        assert sum(curve[-5:]) < sum(curve[:5]), (compute, curve)
        pruned = out["metrics"]["after_stage_0"]["perplexity"]["wiki"]
        assert out["metrics"]["compressed"]["perplexity"]["wiki"] < pruned
        model = load_model(run / "artifact")
        W = _linear_weights(model, out["stages"][0]["modules"])
        assert sum(int((w == 0).sum()) for w in W.values()) >= 0.5 * sum(w.numel() for w in W.values())
    assert curves["float32"] != curves["bfloat16"]


def test_mixed_precision_overrides_resolve_to_module_names(tiny_models, tmp_path):
    stages = [{"kind": "gptq", "scheme": W4, "ignore": ["*.layers.0.*"]},
              {"kind": "rtn", "scheme": {"bits": 8, "group_size": 32, "symmetric": True}, "targets": ["*.layers.0.*"]}]
    r = method_recipe(tiny_models("qwen2"), stages, "qwen2")
    out = run_json("run", str(write_recipe(tmp_path / "r.yaml", r)), "--out", str(tmp_path / "run"), "--quiet")
    q = json.loads((tmp_path / "run" / "artifact" / "manifest.json").read_text())["quantized_modules"]
    assert q["model.layers.0.mlp.down_proj"]["bits"] == 8 and q["model.layers.1.mlp.down_proj"]["bits"] == 4
    assert all(m.startswith("model.layers.0.") for m in out["stages"][1]["modules"])
    # read back with each module's own grid (transformers' compressed-tensors loader applies the first
    # config group's scheme to every module, which misreads one of the two grids)
    from kiln.artifact import load_model
    from kiln.model import WeightStore, load_full

    d = tiny_models("qwen2")
    ours = load_full(d, WeightStore(d, sorted((tmp_path / "run" / "stages").glob("*/layer-*.safetensors"))))
    loaded = load_model(tmp_path / "run" / "artifact")
    for n in ("model.layers.0.mlp.down_proj.weight", "model.layers.1.mlp.down_proj.weight"):
        assert torch.allclose(loaded.get_parameter(n), ours.get_parameter(n), atol=1e-6), n


@pytest.mark.parametrize("arch", ["llama", "gpt2", "opt"])
def test_the_output_projection_is_quantized_only_when_named(arch, tiny_models, tmp_path):
    """`*` never reaches the head; `targets: [lm_head]` quantizes it (here on its own grid, after the
    layers). The tied embedding keeps its float weights, the artifact's config unties the two, and
    the loaded artifact computes with exactly kiln's dequantized head."""
    from safetensors import safe_open
    from transformers import AutoModelForCausalLM

    from kiln.artifact import load_model
    from kiln.compress.quant import dequantize

    d = tiny_models(arch)
    head_scheme = {"bits": 4, "group_size": 32, "symmetric": False, "observer": "mse"}
    stages = [{"kind": "gptq", "scheme": W4}, {"kind": "gptq", "scheme": head_scheme, "targets": ["lm_head"]}]
    r = method_recipe(d, stages, arch)
    r["output"]["dtype"] = "float32"
    out = run_json("run", str(write_recipe(tmp_path / "r.yaml", r)), "--out", str(tmp_path / "run"), "--quiet")
    assert "lm_head" not in out["stages"][0]["modules"] and out["stages"][1]["modules"] == ["lm_head"]
    art = tmp_path / "run" / "artifact"
    manifest = json.loads((art / "manifest.json").read_text())
    assert manifest["quantized_modules"]["lm_head"]["bits"] == 4 and not manifest["quantized_modules"]["lm_head"]["symmetric"]
    assert json.loads((art / "config.json").read_text())["tie_word_embeddings"] is False
    (head_file,) = (tmp_path / "run" / "stages").glob("01-gptq-*/head.safetensors")
    with safe_open(head_file, "pt") as h:
        ours = dequantize(h.get_tensor("lm_head.weight.qcodes"), h.get_tensor("lm_head.weight.qscale"),
                          h.get_tensor("lm_head.weight.qzero"), 32)
    source = AutoModelForCausalLM.from_pretrained(d, dtype=torch.float32)
    loaded = load_model(art)
    emb = loaded.get_input_embeddings().weight
    assert loaded.lm_head.weight is not emb
    assert torch.equal(emb, source.get_input_embeddings().weight)  # the embedding is not touched
    assert torch.allclose(loaded.lm_head.weight, ours, atol=1e-6)
    assert not torch.allclose(ours, emb, atol=1e-3)  # really quantized


def test_distill_trains_the_scales_of_a_quantized_head_it_names(tiny_models, tmp_path):
    from safetensors import safe_open

    stages = [{"kind": "gptq", "scheme": W4, "targets": ["*", "lm_head"]},
              {"kind": "distill", "teacher": "original", "steps": 4, "batch_size": 2, "lr": 1e-3, "scale_lr": 1e-3,
               "targets": ["*", "lm_head"]}]
    r = method_recipe(tiny_models("llama"), stages, "llama", samples=4, seq_len=32)
    out = run_json("run", str(write_recipe(tmp_path / "r.yaml", r)), "--out", str(tmp_path / "run"), "--quiet")
    assert "lm_head" in out["stages"][1]["modules"]
    (before,) = (tmp_path / "run" / "stages").glob("00-gptq-*/head.safetensors")
    (after,) = (tmp_path / "run" / "stages").glob("01-distill-*/distill.safetensors")
    with safe_open(before, "pt") as a, safe_open(after, "pt") as b:
        assert torch.equal(a.get_tensor("lm_head.weight.qcodes"), b.get_tensor("lm_head.weight.qcodes"))
        assert not torch.equal(a.get_tensor("lm_head.weight.qscale"), b.get_tensor("lm_head.weight.qscale"))


def test_a_checkpoint_that_kept_only_the_head_name_keeps_its_embedding(tiny_models, tmp_path):
    """Tied checkpoints store one name, and some writers keep the head's: quantizing the head must then
    also write the float table under the embedding's name, or the embedding would read the codes."""
    import shutil

    from safetensors.torch import load_file, save_file

    from kiln.compress.rtn import RTNConfig
    from kiln.compress.engine import run_layerwise
    from kiln.context import RunContext
    from kiln.model import WeightStore, load_full

    src = tiny_models("llama")
    d = tmp_path / "head-named"
    shutil.copytree(src, d)
    state = load_file(d / "model.safetensors")
    table = state.pop("model.embed_tokens.weight")
    save_file({**state, "lm_head.weight": table}, d / "model.safetensors", metadata={"format": "pt"})
    stage = RTNConfig(scheme={"bits": 4, "group_size": 32, "symmetric": True}, targets=["lm_head"])
    res = run_layerwise(d, WeightStore(d), stage, ["lm_head"], None, tmp_path, RunContext(show_progress=False))
    model = load_full(d, WeightStore(d, res.files))
    assert torch.equal(model.get_input_embeddings().weight, table)
    assert not torch.equal(model.lm_head.weight, table) and (model.lm_head.weight - table).abs().max() < 0.1


def test_head_hessian_comes_from_the_compressed_layers(tiny_models, tmp_path):
    """The head's H is that of the final norm's outputs once every layer before it is compressed: the
    same H as the model loaded from the layers' results gives, not the float model's."""
    from kiln.compress.base import StageConfig, WeightResult
    from kiln.compress.engine import run_layerwise
    from kiln.compress.hessian import HessianAccumulator
    from kiln.compress.quant import QuantScheme, rtn_quantize
    from kiln.context import RunContext
    from kiln.model import WeightStore, load_full

    class Recorder(StageConfig):
        kind: str = "recorder"
        needs_calibration = True

        def process_weight(self, W, H, name, keep=None):
            SEEN[name] = H.clone()
            q = rtn_quantize(W, QuantScheme(bits=3, group_size=16))
            return WeightResult(q.dequantize(), q, {})

    SEEN: dict = {}
    d = tiny_models("llama")
    layers = [f"model.layers.{i}.{m}" for i in range(2) for m in
              ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.o_proj", "mlp.gate_proj",
               "mlp.up_proj", "mlp.down_proj")]
    calib = torch.randint(0, 512, (4, 40), generator=torch.Generator().manual_seed(3))
    res = run_layerwise(d, WeightStore(d), Recorder(), layers + ["lm_head"], calib, tmp_path, RunContext(show_progress=False),
                        batch_size=2)
    layer_files = [f for f in res.files if f.name.startswith("layer-")]

    def head_h(store):
        model = load_full(d, store)
        acc = HessianAccumulator(64)
        handle = model.lm_head.register_forward_pre_hook(lambda m, a: acc.add(a[0].detach()))
        with torch.no_grad():
            for b in range(0, 4, 2):
                model(input_ids=calib[b : b + 2])
        handle.remove()
        return acc.result()

    compressed = head_h(WeightStore(d, layer_files))
    assert torch.allclose(SEEN["lm_head"], compressed, rtol=1e-4, atol=1e-6)
    assert not torch.allclose(SEEN["lm_head"], head_h(WeightStore(d)), rtol=1e-3)


# --- bad input: each a validation error before any weight is read --------------------------------


def _fails(tmp_path, recipe, code, *needles):
    p = write_recipe(tmp_path / "r.yaml", recipe)
    rc, stdout, stderr = run_cli("run", str(p), "--out", str(tmp_path / "run"), "--quiet", "--json")
    assert rc == code, stderr
    assert "Traceback" not in stderr
    for n in needles:
        assert n in stderr, stderr
    assert not (tmp_path / "run" / "artifact").exists()
    assert not (tmp_path / "run" / "stages").exists()  # nothing ran


@pytest.mark.parametrize("alpha", [-0.1, 1.5])
def test_smoothquant_alpha_out_of_range(tiny_models, tmp_path, alpha):
    r = method_recipe(tiny_models("llama"), [{"kind": "smoothquant", "alpha": alpha}, {"kind": "rtn", "scheme": W8}], "llama")
    _fails(tmp_path, r, 3, "compress[0].alpha", "[0, 1]")


def test_two_four_on_a_dimension_not_divisible_by_four(tiny_models, tmp_path):
    from transformers import AutoModelForCausalLM, LlamaConfig

    from conftest import tiny_config

    cfg = tiny_config("llama")
    cfg.intermediate_size = 126  # down_proj's input: 126 = 4·31 + 2
    model_dir = tmp_path / "odd"
    AutoModelForCausalLM.from_config(cfg).save_pretrained(model_dir)
    for f in tiny_models("llama").iterdir():
        if f.name.startswith(("tokenizer", "special")):
            (model_dir / f.name).write_bytes(f.read_bytes())
    assert isinstance(cfg, LlamaConfig)
    r = method_recipe(model_dir, [{"kind": "sparsegpt", "pattern": "2:4"}], "llama")
    _fails(tmp_path, r, 3, "model.layers.0.mlp.down_proj", "divisible by 4", "126")


def test_distillation_without_a_teacher(tiny_models, tmp_path):
    r = method_recipe(tiny_models("llama"), [{"kind": "gptq", "scheme": W4}, {"kind": "distill"}], "llama")
    _fails(tmp_path, r, 3, "compress[1]", "teacher")


def test_distillation_warmup_longer_than_the_run(tiny_models, tmp_path):
    r = method_recipe(tiny_models("llama"), [{"kind": "sparsegpt"}, {"kind": "distill", "teacher": "original",
                                                                       "steps": 10, "warmup_steps": 10}], "llama")
    _fails(tmp_path, r, 3, "compress[1]", "warmup_steps (10) must be fewer than steps (10)")


def test_lr_schedule_warms_up_linearly_then_decays_on_a_half_cosine():
    from kiln.compress.distill import lr_factor

    const = [lr_factor(s, 20, 4, "constant") for s in range(20)]
    assert const[:4] == pytest.approx([0.2, 0.4, 0.6, 0.8]) and const[4:] == [1.0] * 16
    cos = [lr_factor(s, 20, 4, "cosine") for s in range(20)]
    assert cos[:5] == pytest.approx([0.2, 0.4, 0.6, 0.8, 1.0])
    assert cos[12] == pytest.approx(0.5)                   # halfway through the 16 decay steps
    assert all(a > b > 0 for a, b in zip(cos[4:], cos[5:]))
    assert lr_factor(0, 20, 0, "cosine") == 1.0


def _full_logits_kl(student_logits: torch.Tensor, teacher_logits: torch.Tensor, T: float) -> torch.Tensor:
    """The reference: mean over tokens of T²·KL(p ‖ q) from whole logit tensors."""
    import torch.nn.functional as F

    log_p = F.log_softmax(teacher_logits.float() / T, -1)
    log_q = F.log_softmax(student_logits.float() / T, -1)
    return (log_p.exp() * (log_p - log_q)).sum(-1).mean() * T * T


@pytest.mark.parametrize("cap", [None, 5.0])
@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_chunked_kl_gives_the_full_logits_loss_and_gradients(cap, dtype):
    """The head applied a chunk of tokens at a time (11 chunks of 7 rows for 2 × 37 tokens, the last
    short) with the gradients formed in the same pass: the loss and the gradients of the student's
    hidden states, head weight and bias are those of autograd through the full logits. In bfloat16
    both sides run the head's GEMMs in bfloat16 (autocast for the full one)."""
    from kiln.compress.distill import chunked_kl

    g = torch.Generator().manual_seed(0)
    s_head, t_head = nn.Linear(16, 300), nn.Linear(16, 300)
    with torch.no_grad():
        t_head.weight.copy_(s_head.weight + 0.1 * torch.randn(300, 16, generator=g))
    s_h = torch.randn(2, 37, 16, generator=g, requires_grad=True)
    t_h = torch.randn(2, 37, 16, generator=g)
    capped = (lambda z: z) if cap is None else (lambda z: torch.tanh(z / cap) * cap)
    params = [s_h, s_head.weight, s_head.bias]

    with torch.autocast("cpu", dtype=torch.bfloat16, enabled=dtype == "bfloat16"):
        z_t, z_s = capped(t_head(t_h)).float(), capped(s_head(s_h)).float()
    want = _full_logits_kl(z_s, z_t, 2.0)
    want_grads = torch.autograd.grad(want, params)
    got = chunked_kl(s_head, t_head, s_h, t_h, 2.0, cap, chunk=7, dtype=getattr(torch, dtype), teacher_cap=cap)
    got_grads = torch.autograd.grad(got, params)

    tol = {"float32": dict(rtol=1e-4, atol=1e-6), "bfloat16": dict(rtol=2e-2, atol=2e-3)}[dtype]
    assert float(want.detach()) > 0.01
    torch.testing.assert_close(got, want, **tol)
    for a, b in zip(got_grads, want_grads):
        torch.testing.assert_close(a, b, **tol)


@pytest.mark.parametrize("arch,cap", [("gpt2", None), ("gemma3_text", 3.0)])
def test_with_the_heads_off_the_models_give_hidden_states_and_the_loss_is_the_logits_loss(arch, cap, tiny_models):
    """GPT-2's head is tied to its embedding; a soft-capped head (Gemma 2's final_logit_softcapping,
    set here on a Gemma 3, at another value for the teacher) is capped by the loss instead of the
    model. After the block both models give capped logits again."""
    from transformers import AutoModelForCausalLM

    from kiln.compress.distill import _HeadsOff, chunked_kl

    student, teacher = (AutoModelForCausalLM.from_pretrained(tiny_models(arch)).eval() for _ in range(2))
    caps = [cap, None if cap is None else 2 * cap]  # a teacher of another config may cap at another value
    for m, c in zip((student, teacher), caps):
        m.config.final_logit_softcapping = c
    with torch.no_grad():
        w = teacher.get_output_embeddings().weight
        w.add_(0.5 * w.std() * torch.randn(w.shape, generator=torch.Generator().manual_seed(1)))
    ids = torch.randint(0, 500, (2, 24), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        want = _full_logits_kl(student(ids).logits, teacher(ids).logits, 1.0)
        with _HeadsOff(student, teacher) as heads:
            h_s, h_t = student(ids).logits, teacher(ids).logits
            assert h_s.shape[-1] == student.config.hidden_size and heads.caps == caps
            got = chunked_kl(*heads.heads, h_s, h_t, 1.0, heads.caps[0], chunk=10, teacher_cap=heads.caps[1])
        assert student(ids).logits.shape[-1] == student.config.vocab_size
        assert [m.config.final_logit_softcapping for m in (student, teacher)] == caps
    assert float(want) > 1e-4
    torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-7)


def test_hidden_loss_over_all_blocks_weighs_each_depth_by_its_own_scale():
    """'all' normalises each block's squared error by the teacher's: the same relative error costs
    the same at a block whose activations are 100× larger; hidden_states[0] (embeddings) is skipped."""
    from kiln.compress.distill import _hidden_mse

    g = torch.Generator().manual_seed(0)
    t = [torch.randn(2, 8, 16, generator=g) * s for s in (1.0, 1.0, 100.0)]
    noise = [torch.randn(2, 8, 16, generator=g) for _ in t]
    small = [t[0] + 5 * noise[0], t[1] + 0.1 * noise[1], t[2]]
    large = [t[0] + 5 * noise[0], t[1], t[2] + 10.0 * noise[2]]
    assert float(_hidden_mse(t, t, "all")) == 0.0
    for shifted in (small, large):                        # 10% relative error at one of two blocks
        assert float(_hidden_mse(shifted, t, "all")) == pytest.approx(0.01 / 2, rel=0.3)
    assert float(_hidden_mse(small, t, "last")) == 0.0
    assert float(_hidden_mse(large, t, "last")) == pytest.approx(100.0, rel=0.3)


@pytest.mark.parametrize("stages,needles", [
    ([{"kind": "gptq", "scheme": W4}, {"kind": "sparsegpt"}], ["compress[1] (sparsegpt)", "off the grid"]),
    ([{"kind": "rtn", "scheme": W4}, {"kind": "awq", "scheme": W4}, {"kind": "rtn", "scheme": W4}], ["compress[1] (awq)"]),
    ([{"kind": "sparsegpt"}, {"kind": "sparsegpt", "pattern": "2:4"}], ["already pruned"]),
    ([{"kind": "awq", "scheme": W4}], ["only rescales", "add an rtn or gptq stage"]),
    ([{"kind": "awq", "scheme": W4_ASYM}, {"kind": "gptq", "scheme": W4}], ["searched its scales for"]),
    ([{"kind": "smoothquant"}, {"kind": "gptq", "scheme": W4, "activations": {"bits": 8}}], ["int8 activations need"]),
    ([{"kind": "sparsegpt"}, {"kind": "gptq", "scheme": W8, "activations": {"bits": 8, "rotation": "hadamard"}}],
     ["compress[1] (gptq)", "none of the zeros compress[0] (sparsegpt) pruned"]),
    ([{"kind": "gptq", "scheme": W8, "activations": {"bits": 8, "rotation": "hadamard"}},
      {"kind": "distill", "teacher": "original", "steps": 2}], ["compress[1] (distill) cannot train", "stored it rotated"]),
])
def test_conflicting_combinations(tiny_models, tmp_path, stages, needles):
    _fails(tmp_path, method_recipe(tiny_models("llama"), stages, "llama"), 3, *needles)


@pytest.mark.parametrize("stages,needles", [
    ([{"kind": "awq", "scheme": W4, "targets": ["lm_head"]}, {"kind": "rtn", "scheme": W4, "targets": ["lm_head"]}],
     ["compress[0] (awq) cannot target lm_head"]),
    ([{"kind": "gptq", "scheme": W8, "activations": {"bits": 8}, "targets": ["lm_head"]}],
     ["int8 activations are not supported for the output projection lm_head"]),
    ([{"kind": "gptq", "scheme": W4, "targets": ["lm_*"]}], ["pattern 'lm_*' matches no linear layer", "matched only by its exact name 'lm_head'"]),
])
def test_what_a_stage_cannot_do_to_the_head(tiny_models, tmp_path, stages, needles):
    _fails(tmp_path, method_recipe(tiny_models("llama"), stages, "llama"), 3, *needles)


@pytest.mark.parametrize("arch", ["llama", "gemma3_text", "opt", "gpt2"])
def test_true_sequential_hessians_come_from_quantized_inputs(arch, tiny_models):
    """With `sequential: true`, each step's H must be that of its inputs once the steps before it are
    quantized, i.e. exactly the inputs it sees in the fully quantized layer; the passes stop before
    the step's linears run, so this also checks nothing past the stop point was needed."""
    from transformers import AutoModelForCausalLM

    from kiln.arch import decoder_layout, is_linear
    from kiln.compress.base import StageConfig, WeightResult
    from kiln.compress.engine import StageOutput, _weights_stage, capture_layer_inputs
    from kiln.compress.quant import QuantScheme, rtn_quantize

    class Recorder:
        sequential, act_scheme, seen = True, None, {}
        process_weights = StageConfig.process_weights

        def process_weight(self, W, H, name, keep=None):
            self.seen[name] = H.clone()
            q = rtn_quantize(W, QuantScheme(bits=3, group_size=16))
            return WeightResult(q.dequantize(), None, {})

    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_pretrained(tiny_models(arch), dtype=torch.float32).eval()
    layout = decoder_layout(model)
    layers = model.get_submodule(layout.layers_path)
    names = [f"{layout.layer_name(0)}.{n}" for n, m in layers[0].named_modules() if is_linear(m)]
    calib = torch.randint(0, 512, (4, 48))
    inputs = capture_layer_inputs(model, layers, calib, batch_size=2)
    mods = {n: model.get_submodule(n) for n in names}
    float_h = _hessians(layers[0], mods, inputs)

    stage = Recorder()
    _weights_stage(model, layers[0], 0, names, stage, inputs, frozenset(), {}, StageOutput())
    assert set(stage.seen) == set(names)
    quant_h = _hessians(layers[0], mods, inputs)
    for n in names:
        assert torch.allclose(stage.seen[n], quant_h[n], rtol=1e-4, atol=1e-6), n
    # the later steps really saw quantized inputs: their float-model H differs
    last = [n for n in names if any(k in n for k in ("down_proj", "fc2", "c_proj"))]
    assert last and not torch.allclose(float_h[last[-1]], quant_h[last[-1]], rtol=1e-3)


def _tiny_layers(arch: str):
    """A seeded tiny model of `arch`, its layout, its decoder layers, layer 0's name and linears, and
    what enters each layer for 4 × 48 random tokens in batches of 2."""
    from transformers import AutoModelForCausalLM

    from conftest import tiny_config
    from kiln.arch import decoder_layout, is_linear
    from kiln.compress.engine import capture_layer_inputs

    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(tiny_config(arch)).eval()
    layout = decoder_layout(model)
    layers = model.get_submodule(layout.layers_path)
    prefix = layout.layer_name(0)
    names = [f"{prefix}.{n}" for n, m in layers[0].named_modules() if is_linear(m)]
    inputs = capture_layer_inputs(model, layers, torch.randint(0, 512, (4, 48)), batch_size=2)
    return model, layout, layers, prefix, names, inputs


@pytest.mark.parametrize("arch", ARCHS)
@pytest.mark.parametrize("w8a8", [False, True], ids=["w4a16", "w8a8"])
def test_replayed_passes_give_what_full_passes_give(arch, w8a8):
    """The sequential passes replay a finished attention/MLP from its last linear's saved inputs
    instead of running it again; the rewritten weights and the propagated activations must be the
    very numbers that full passes give (W8A8 linears running as int8 in both)."""
    import copy

    from kiln.compress.engine import LayerInputs, SlabPool, StageOutput, _find_fold, _probe, _weights_stage
    from kiln.compress.gptq import GPTQConfig

    model, layout, layers, prefix, names, inputs = _tiny_layers(arch)
    steps, tails = _probe(layers[0], prefix, {n: model.get_submodule(n) for n in names}, inputs, 0)
    rel = lambda n: n[len(prefix) + 1 :]  # noqa: E731
    assert [[rel(n).rsplit(".", 1)[-1] for n in step] for step in steps] == {
        "gpt2": [["c_attn"], ["c_proj"], ["c_fc"], ["c_proj"]],
        "opt": [["q_proj", "k_proj", "v_proj"], ["out_proj"], ["fc1"], ["fc2"]],
    }.get(arch, [["q_proj", "k_proj", "v_proj"], ["o_proj"], ["gate_proj", "up_proj"], ["down_proj"]])
    assert {rel(n): t.path for n, t in tails.items()} == {
        "gpt2": {"attn.c_proj": "attn", "mlp.c_proj": "mlp"},
        "opt": {"self_attn.out_proj": "self_attn"},  # fc2 is the layer's own child, not inside an MLP
    }.get(arch, {"self_attn.o_proj": "self_attn", "mlp.down_proj": "mlp"})

    # pre-norm layers fold attention's output into the activations (the check is exact); OPT's MLP
    # has no submodule of its own to silence, so it keeps attention's saved inputs
    fold = _find_fold(layers[0], model, tails, inputs, 0)
    assert (fold and tuple(rel(n) for n in fold)) == {
        "gpt2": ("attn.c_proj", "mlp.c_proj"), "opt": None,
    }.get(arch, ("self_attn.o_proj", "mlp.down_proj"))

    stage = GPTQConfig(scheme={"bits": 8 if w8a8 else 4, "group_size": None if w8a8 else 16},
                       activations={"bits": 8} if w8a8 else None)
    results, pools = [], []
    # full passes; replays (two layers, the second reusing the first's slabs); replays that recompute
    # the MLP's inputs in the last pass instead of keeping them
    for replay, low in ((False, False), (True, False), (True, True)):
        m, pool = copy.deepcopy(model), SlabPool()  # retained, to see what each way keeps
        run = LayerInputs([h.clone() for h in inputs.hidden], inputs.extras)
        q: dict = {}
        for i in (0, 1):
            _weights_stage(m, m.get_submodule(layout.layers_path)[i], i, [n.replace(prefix, layout.layer_name(i), 1) for n in names],
                           stage, run, frozenset(), q, StageOutput(), propagate=True, replay=replay, slabs=pool,
                           low_memory=low)
        results.append((run.hidden, {k: v for k, v in m.state_dict().items() if k.startswith(layout.layers_path)}, q))
        pools.append(pool)
    h_full, w_full, q_full = results[0]
    assert not torch.equal(h_full[0], inputs.hidden[0])  # they were propagated
    assert len(q_full) == 2 * len(names)
    for h_replay, w_replay, q_replay in results[1:]:
        assert all(torch.equal(a, b) for a, b in zip(h_full, h_replay))
        assert w_full.keys() == w_replay.keys() and all(torch.equal(w_full[k], w_replay[k]) for k in w_full)
        assert q_full.keys() == q_replay.keys()
        assert all(torch.equal(q_full[k][0].codes, q_replay[k][0].codes) for k in q_full)
    # what the pool holds after two layers: one buffer per slab alive at once, not one per layer; a
    # folded attention's buffer is taken back before the MLP's inputs are saved, so one serves both
    saved_mib = lambda pool: sum(b.numel() for b in pool.free) * 4 / 2**20  # noqa: E731
    assert len(pools[0].free) == 0 and len(pools[1].free) == (1 if fold else len(tails))
    if fold:  # keeping only attention's inputs needs a buffer of the activations' size
        hidden_mib = sum(h.numel() for h in inputs.hidden) * 4 / 2**20
        assert len(pools[2].free) == 1 and saved_mib(pools[2]) == hidden_mib < saved_mib(pools[1])


@pytest.mark.parametrize("arch", ARCHS)
def test_the_norm_feeding_a_replayed_submodule_is_not_computed(arch):
    """While attention or the MLP is replayed or silenced, the norm whose output only it reads hands
    its input on uncomputed: in a layer whose steps are already probed, the norm before attention
    runs in attention's own two passes (q/k/v, o) and no other, and the layer's outputs are those of
    the run that computes it every time."""
    import copy

    from kiln.compress.engine import LayerInputs, StageOutput, _find_feeders, _probe, _weights_stage
    from kiln.compress.gptq import GPTQConfig

    model, layout, layers, prefix, names, inputs = _tiny_layers(arch)
    _, tails = _probe(layers[0], prefix, {n: model.get_submodule(n) for n in names}, inputs, 0)
    tails = _find_feeders(layers[0], model, tails, inputs, 0)
    feeders = {t.path: t.feeder for t in tails.values()}
    assert feeders == {
        "gpt2": {"attn": "ln_1", "mlp": "ln_2"}, "opt": {"self_attn": "self_attn_layer_norm"},
        "gemma3_text": {"self_attn": "input_layernorm", "mlp": "pre_feedforward_layernorm"},
    }.get(arch, {"self_attn": "input_layernorm", "mlp": "post_attention_layernorm"})

    stage = GPTQConfig(scheme={"bits": 4, "group_size": 16})
    norm = layers[1].get_submodule(feeders[next(iter(feeders))])
    computed = []
    norm.register_forward_hook(lambda mod, args, out: computed.append(out is not args[0]))
    outs = []
    for replay in (True, False):  # the copy carries the hook
        m = copy.deepcopy(model) if replay else model
        run, probes = LayerInputs([h.clone() for h in inputs.hidden], inputs.extras), {}
        for i in (0, 1):
            computed.clear()  # layer 1's passes only: its steps come from layer 0's probe
            _weights_stage(m, m.get_submodule(layout.layers_path)[i], i, [n.replace(prefix, layout.layer_name(i), 1) for n in names],
                           stage, run, frozenset(), {}, StageOutput(), propagate=True, replay=replay, probes=probes)
        outs.append((run.hidden, sum(computed), len(computed)))
    (h_replay, n_replay, _), (h_full, n_full, calls_full) = outs
    assert all(torch.equal(a, b) for a, b in zip(h_replay, h_full))
    assert n_replay == 2 * len(inputs.hidden) < n_full == calls_full


def test_a_norm_whose_output_is_also_read_elsewhere_keeps_running():
    """A parallel block adds the norm's output itself as well as attention's: the candidate feeder
    fails the exact check and stays computed while attention is replayed."""
    from kiln.compress.engine import LayerInputs, _find_feeders, _probe

    class Attention(nn.Module):
        def __init__(self):
            super().__init__()
            self.q_proj, self.o_proj = nn.Linear(8, 8), nn.Linear(8, 8)

        def forward(self, x):
            return self.o_proj(torch.tanh(self.q_proj(x)))

    class Block(nn.Module):
        def __init__(self, shared: bool):
            super().__init__()
            self.norm, self.attn, self.shared = nn.LayerNorm(8), Attention(), shared

        def forward(self, h):
            x = self.norm(h)
            return h + self.attn(x) + (x if self.shared else 0)

    torch.manual_seed(0)
    inputs = LayerInputs([torch.randn(2, 5, 8)], [[((), {})]])
    for shared, expected in ((False, "norm"), (True, None)):
        block = Block(shared)
        mods = {f"b.attn.{n}": getattr(block.attn, n) for n in ("q_proj", "o_proj")}
        _, tails = _probe(block, "b", mods, inputs, 0)
        assert tails["b.attn.o_proj"].path == "attn" and tails["b.attn.o_proj"].feeder == "norm"  # the candidate
        assert _find_feeders(block, block, tails, inputs, 0)["b.attn.o_proj"].feeder == expected


def test_slab_pool_lends_the_smallest_buffer_that_holds_a_request():
    from kiln.compress.engine import SlabPool

    pool = SlabPool()
    small, views = pool.take([(2, 3), (1, 3)])
    large, _ = pool.take([(4, 5)])
    assert [tuple(v.shape) for v in views] == [(2, 3), (1, 3)] and small.numel() == 9 and large.numel() == 20
    views[1].fill_(7.0)
    assert small[6:].eq(7.0).all() and small[:6].ne(7.0).all()  # views of one buffer, in order
    pool.give_back(small)
    pool.give_back(large)
    again, _ = pool.take([(3, 4)])  # 12 elements: the larger buffer, the smaller stays free
    assert again is large and len(pool.free) == 1 and pool.free[0] is small
    bigger, _ = pool.take([(10, 10)])  # nothing holds it: the free ones are dropped
    assert bigger.numel() == 100 and pool.free == []
    lean = SlabPool(retain=False)
    buf, _ = lean.take([(2, 2)])
    lean.give_back(buf)
    assert lean.free == []


def _hessians(layer, mods, inputs):
    """H of each module's inputs over one plain run of the layer (layer 0's calibration batches)."""
    from kiln.arch import in_out_features
    from kiln.compress.hessian import HessianAccumulator

    accs = {n: HessianAccumulator(in_out_features(m)[0]) for n, m in mods.items()}
    handles = [m.register_forward_pre_hook(lambda mod, a, n=n: accs[n].add(a[0].detach())) for n, m in mods.items()]
    with torch.no_grad():
        for h, (args, kwargs) in zip(inputs.hidden, inputs.extras[0]):
            layer(h, *args, **kwargs)
    for h in handles:
        h.remove()
    return {n: a.result() for n, a in accs.items()}


def test_all_finite_sees_every_nan_and_inf_and_no_overflowing_sum():
    from kiln.compress.engine import _all_finite

    x = torch.randn(4, 8)
    assert _all_finite(x)
    big = torch.full((4, 8), 3e38)  # finite, but their sum overflows to inf
    assert _all_finite(big)
    for bad in (float("nan"), float("inf"), float("-inf")):
        y = x.clone()
        y[2, 3] = bad
        assert not _all_finite(y)
