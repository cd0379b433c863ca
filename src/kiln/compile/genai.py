"""genai_config.json: what onnxruntime-genai needs to load the compiled graph and generate with it.
Our graph uses its input/output names; every kiln graph's attention is GroupQueryAttention, so the
cache is one buffer of max_length positions that each step writes in place (past_present_share_buffer),
as onnxruntime-genai's own builder configures its graphs."""

from __future__ import annotations

import json
from pathlib import Path

from kiln.compile.runtime import CUDA_OPTIONS

# onnxruntime-genai model types; every decoder-only type runs the same graph contract
GENAI_TYPES = {"llama": "llama", "mistral": "mistral", "qwen2": "qwen2", "qwen3": "qwen3", "gemma3_text": "gemma3_text",
               "gpt2": "llama", "opt": "llama"}


def _first(v):
    return v[0] if isinstance(v, list) else v


def genai_config(spec, config, generation: dict, filename: str, context_length: int, provider: str | None) -> dict:
    eos = generation.get("eos_token_id", getattr(config, "eos_token_id", None))
    bos = generation.get("bos_token_id", getattr(config, "bos_token_id", None))
    pad = generation.get("pad_token_id", getattr(config, "pad_token_id", None))
    pad = _first(pad if pad is not None else eos)
    provider_options = [{provider: dict(CUDA_OPTIONS) if provider == "cuda" else {}}] if provider else []
    session = {"log_id": "kiln", "provider_options": provider_options}
    if not provider:
        # onnxruntime-genai 0.18 left without a count ran one intra-op thread on a 2-core machine
        # (SmolLM2 decoded at 10.2 against 6.1 ms a step); 0 is ONNX Runtime's own default, one per
        # physical core, what kiln's sessions get
        session["intra_op_num_threads"] = 0
    return {
        "model": {
            "bos_token_id": bos,
            "context_length": context_length,
            "decoder": {
                "session_options": session,
                "filename": filename,
                "head_size": spec.head_dim,
                "hidden_size": spec.hidden,
                "inputs": {"input_ids": "input_ids", "attention_mask": "attention_mask",
                           "past_key_names": "past_key_values.%d.key", "past_value_names": "past_key_values.%d.value"},
                "outputs": {"logits": "logits", "present_key_names": "present.%d.key",
                            "present_value_names": "present.%d.value"},
                "num_attention_heads": spec.heads,
                "num_hidden_layers": spec.layers,
                "num_key_value_heads": spec.kv_heads,
            },
            "eos_token_id": eos,
            "pad_token_id": pad,
            "type": GENAI_TYPES[spec.family],
            "vocab_size": spec.vocab,
        },
        "search": {
            "diversity_penalty": 0.0,
            "do_sample": bool(generation.get("do_sample", False)),
            "early_stopping": True,
            "length_penalty": 1.0,
            "max_length": context_length,
            "min_length": 0,
            "no_repeat_ngram_size": 0,
            "num_beams": 1,
            "num_return_sequences": 1,
            "past_present_share_buffer": True,
            "repetition_penalty": 1.0,
            "temperature": float(generation.get("temperature", 1.0) or 1.0),
            "top_k": int(generation.get("top_k", 50) or 50),
            "top_p": float(generation.get("top_p", 1.0) or 1.0),
        },
    }


def write_genai_config(out: Path, spec, model_dir: Path, filename: str, context_length: int, provider: str | None) -> Path:
    from kiln.model import load_config

    config = load_config(model_dir)
    gen_file = Path(model_dir) / "generation_config.json"
    generation = json.loads(gen_file.read_text()) if gen_file.is_file() else {}
    cfg = genai_config(spec, config, generation, filename, context_length, provider)
    path = Path(out) / "genai_config.json"
    path.write_text(json.dumps(cfg, indent=2))
    return path


def genai_generate(folder: Path, prompt_ids: list[int], max_new_tokens: int) -> list[int]:
    """Greedy tokens from onnxruntime-genai loading `folder` (graph, genai_config.json, tokenizer)."""
    import onnxruntime_genai as og

    model = og.Model(str(folder))
    params = og.GeneratorParams(model)
    params.set_search_options(do_sample=False, max_length=len(prompt_ids) + max_new_tokens)
    gen = og.Generator(model, params)
    gen.append_tokens([prompt_ids])
    out = []
    while not gen.is_done() and len(out) < max_new_tokens:
        gen.generate_next_token()
        out.append(int(gen.get_next_tokens()[0]))
    return out
