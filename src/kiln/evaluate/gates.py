"""Release gates: pure checks of the metrics against the recipe's limits."""

from __future__ import annotations


def check_gates(gates, metrics: dict) -> list[dict]:
    """One row per check: what was compared, the value, the limit, passed. `metrics` holds
    `baseline`, `compressed` and one `onnx:<target>` entry per compiled target that ran here."""
    rows: list[dict] = []
    if gates is None:
        return rows
    if gates.max_perplexity_ratio is not None:
        for name, ratio in (metrics.get("compressed", {}).get("perplexity_ratio") or {}).items():
            rows.append({"gate": "max_perplexity_ratio", "subject": f"compressed/{name}", "value": ratio,
                         "limit": gates.max_perplexity_ratio, "passed": ratio <= gates.max_perplexity_ratio})
    if gates.max_task_drop is not None:
        base = metrics.get("baseline", {}).get("tasks", {})
        for variant, m in metrics.items():
            if variant == "baseline" or variant not in ("compressed",) and not variant.startswith("onnx:"):
                continue
            for task, r in (m.get("tasks") or {}).items():
                if task in base:
                    drop = base[task]["acc"] - r["acc"]
                    rows.append({"gate": "max_task_drop", "subject": f"{variant}/{task}", "value": drop,
                                 "limit": gates.max_task_drop, "passed": drop <= gates.max_task_drop})
    for target, floor in gates.min_decode_tokens_per_s.items():
        lat = metrics.get(f"onnx:{target}", {}).get("latency")
        value = lat["tokens_per_s_b1"] if lat else None
        rows.append({"gate": "min_decode_tokens_per_s", "subject": f"onnx:{target}", "value": value, "limit": floor,
                     "passed": value is not None and value >= floor,
                     **({} if lat else {"note": "target did not run here: no latency measured"})})
    return rows
