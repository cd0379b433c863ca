"""report.md, report.html and the model card README.md of an artifact, from its manifest alone (so
`kiln compare` and a rerun render the same thing). Plots: accuracy against size and against decode
latency, one point per variant (matplotlib, embedded in the HTML as PNG)."""

from __future__ import annotations

import base64
import html
import io
from pathlib import Path


def _fmt(v, digits: int = 3) -> str:
    if v is None:
        return "—"
    if isinstance(v, float):
        return f"{v:.{digits}f}"
    return str(v)


def _mib(n) -> str:
    return "—" if n is None else f"{n / 2**20:.1f}"


def variants(manifest: dict) -> list[tuple[str, dict]]:
    order = ["baseline", "compressed", "rtn"]
    m = manifest.get("metrics", {})
    names = [v for v in order if v in m] + sorted(v for v in m if v not in order)
    return [(v, m[v]) for v in names]


def mean_accuracy(metrics: dict) -> float | None:
    tasks = metrics.get("tasks") or {}
    accs = [r.get("acc_norm", r["acc"]) for r in tasks.values()]
    return sum(accs) / len(accs) if accs else None


def tables_md(manifest: dict) -> str:
    vs = variants(manifest)
    sets = sorted({k for _, m in vs for k in (m.get("perplexity") or {})})
    tasks = sorted({k for _, m in vs for k in (m.get("tasks") or {})})
    lines = []
    head = ["variant", *[f"ppl {s}" for s in sets], *tasks, "size MiB"]
    lines += ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for v, m in vs:
        row = [v, *[_fmt((m.get("perplexity") or {}).get(s)) for s in sets]]
        for t in tasks:
            r = (m.get("tasks") or {}).get(t)
            row.append("—" if r is None else (f"{r['acc']:.3f}" + (f" / {r['acc_norm']:.3f}" if "acc_norm" in r else "")
                                              + (f" (ppl {r['perplexity']:.2f})" if "perplexity" in r else "")))
        row.append(_mib(m.get("size_bytes")))
        lines.append("| " + " | ".join(row) + " |")
    if tasks:
        n = {t: next((m["tasks"][t]["n"] for _, m in vs if t in (m.get("tasks") or {})), None) for t in tasks}
        lines.append("")
        lines.append("Task cells: acc / acc_norm (lm-evaluation-harness semantics, zero-shot); documents per task: "
                     + ", ".join(f"{t} {n[t]}" for t in tasks) + ".")
    lat = [(v, m["latency"]) for v, m in vs if m.get("latency")]
    if lat:
        lines += ["", "| target | TTFT ms | ITL p50 / p95 / p99 ms | tok/s b1 | tok/s batch | peak RSS MiB | size MiB | $ / 1M tokens (batch) |",
                  "|---|---|---|---|---|---|---|---|"]
        for v, x in lat:
            lines.append(f"| {v} | {x['ttft_ms']:.1f} | {x['itl_ms_p50']:.2f} / {x['itl_ms_p95']:.2f} / {x['itl_ms_p99']:.2f} "
                         f"| {x['tokens_per_s_b1']:.1f} | {x['tokens_per_s_batch']:.1f} (b{x['batch']}) | {_mib(x['peak_rss_bytes'])} "
                         f"| {_mib(x['size_bytes'])} | {_fmt(x.get('usd_per_1m_tokens_batch'), 4)} |")
    gates = manifest.get("gates") or []
    if gates:
        lines += ["", "| gate | subject | value | limit | result |", "|---|---|---|---|---|"]
        lines += [f"| {g['gate']} | {g['subject']} | {_fmt(g['value'], 4)} | {g['limit']} | {'pass' if g['passed'] else 'FAIL'} |"
                  for g in gates]
    return "\n".join(lines)


def _plots(manifest: dict) -> list[tuple[str, bytes]]:
    """(title, PNG) for accuracy vs size and accuracy vs decode latency, when there is something to plot."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    pts = [(v, mean_accuracy(m), m.get("size_bytes"), (m.get("latency") or {}).get("itl_ms_p50")) for v, m in variants(manifest)]
    out = []
    for title, idx, xlabel in (("accuracy vs size", 2, "size (MiB)"), ("accuracy vs decode latency", 3, "ITL p50 (ms)")):
        usable = [(p[0], p[1], p[idx] / 2**20 if idx == 2 else p[idx]) for p in pts if p[1] is not None and p[idx]]
        if not usable:
            continue
        fig, ax = plt.subplots(figsize=(5, 3.5), dpi=100)
        for name, acc, x in usable:
            ax.scatter([x], [acc])
            ax.annotate(name, (x, acc), textcoords="offset points", xytext=(4, 4), fontsize=8)
        ax.set_xlabel(xlabel)
        ax.set_ylabel("mean task accuracy")
        ax.set_title(title)
        fig.tight_layout()
        buf = io.BytesIO()
        fig.savefig(buf, format="png")
        plt.close(fig)
        out.append((title, buf.getvalue()))
    return out


def _header(manifest: dict) -> list[str]:
    src = manifest.get("source", {})
    data = manifest.get("data") or {}
    cal = data.get("calibration")
    lines = [f"- status: **{manifest.get('status')}**", f"- source: `{src.get('origin')}` (sha256 {str(src.get('sha256'))[:16]}…)",
             f"- recipe: `{manifest.get('recipe_name')}` (sha256 {str(manifest.get('recipe_digest'))[:16]}…), format "
             f"{manifest.get('format')}, {manifest.get('dtype')}"]
    if cal:
        lines.append(f"- calibration: `{cal['source']}`, {cal['samples']} × {cal['seq_len']} tokens, seed {cal['seed']}")
    for name, e in (data.get("evaluation") or {}).items():
        lines.append(f"- perplexity text {name}: `{e['source']}`, {e['windows']} × {e['seq_len']} tokens")
    for s in manifest.get("stages", []):
        lines.append(f"- compress[{s['index']}] {s['kind']}: {len(s['modules'])} modules")
    for name, t in ((manifest.get("compile") or {}).get("targets") or {}).items():
        lines.append(f"- onnx/{name}: {t['target']} {t['dtype']}, runtime checks {t['runtime_checks']}")
    return lines


def report_md(manifest: dict, recipe_yaml: str) -> str:
    return "\n".join([f"# kiln report: {manifest.get('recipe_name')}", "", *_header(manifest), "", tables_md(manifest), "",
                      "## Recipe", "", "```yaml", recipe_yaml.rstrip(), "```", ""])


def report_html(manifest: dict, recipe_yaml: str) -> str:
    """Self-contained HTML: the same tables (as preformatted Markdown), the plots inline."""
    plots = "".join(f'<figure><img alt="{html.escape(t)}" src="data:image/png;base64,{base64.b64encode(png).decode()}">'
                    f"<figcaption>{html.escape(t)}</figcaption></figure>" for t, png in _plots(manifest))
    header = "".join(f"<li>{html.escape(line[2:])}</li>" for line in _header(manifest))
    return (f"<!doctype html><html><head><meta charset='utf-8'><title>kiln report: {html.escape(str(manifest.get('recipe_name')))}"
            "</title><style>body{font-family:sans-serif;max-width:70em;margin:2em auto}pre{background:#f6f6f6;padding:1em;"
            "overflow-x:auto}figure{display:inline-block;margin:1em}</style></head><body>"
            f"<h1>kiln report: {html.escape(str(manifest.get('recipe_name')))}</h1><ul>{header}</ul>"
            f"<pre>{html.escape(tables_md(manifest))}</pre>{plots}<h2>Recipe</h2><pre>{html.escape(recipe_yaml)}</pre>"
            "</body></html>")


def model_card(manifest: dict) -> str:
    serving = [f"- {k}: `{v['file']}` ({v['check']})" for k, v in (manifest.get("serving") or {}).items()]
    compile_ = (manifest.get("compile") or {}).get("targets") or {}
    if any(t["target"] == "cpu" for t in compile_.values()):
        name = next(n for n, t in compile_.items() if t["target"] == "cpu")
        serving.append(f"- onnxruntime-genai: `og.Model(\"onnx/{name}\")` (genai_config.json in that folder)")
    if manifest.get("format") == "compressed-tensors":
        serving.append("- vLLM: `vllm serve .` (compressed-tensors checkpoint in this folder)")
    return "\n".join([f"# {manifest.get('recipe_name')}", "", "Compressed with kiln. Every file's sha256 is in manifest.json "
                      "(`kiln verify .`).", "", *_header(manifest), "", "## Results", "", tables_md(manifest), "",
                      "## Serving", "", *(serving or ["- see manifest.json"]), ""])


def write_reports(root: Path, manifest: dict) -> None:
    recipe = (root / "recipe.yaml").read_text() if (root / "recipe.yaml").exists() else ""
    (root / "report.md").write_text(report_md(manifest, recipe))
    (root / "report.html").write_text(report_html(manifest, recipe))
    (root / "README.md").write_text(model_card(manifest))


def compare_table(manifests: list[tuple[str, dict]]) -> str:
    """`kiln compare`: one row per artifact × variant."""
    tasks = sorted({t for _, m in manifests for _, v in variants(m) for t in (v.get("tasks") or {})})
    sets = sorted({s for _, m in manifests for _, v in variants(m) for s in (v.get("perplexity") or {})})
    head = ["artifact", "status", "variant", *[f"ppl {s}" for s in sets], *tasks, "size MiB", "tok/s b1"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for path, m in manifests:
        for v, x in variants(m):
            row = [path, str(m.get("status")), v, *[_fmt((x.get("perplexity") or {}).get(s)) for s in sets],
                   *[_fmt((x.get("tasks") or {}).get(t, {}).get("acc")) for t in tasks], _mib(x.get("size_bytes")),
                   _fmt((x.get("latency") or {}).get("tokens_per_s_b1"), 1)]
            lines.append("| " + " | ".join(row) + " |")
    return "\n".join(lines)
