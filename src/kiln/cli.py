"""The `kiln` command. Thin: parse, call the pipeline, print; heavy imports happen inside commands
so `kiln --help` stays instant.

Exit codes: 0 ok · 1 internal error · 2 usage · 3 invalid recipe · 4 missing input ·
5 compression failed · 6 evaluation failed · 7 artifact invalid · 8 compile failed · 9 gate failed
(artifact written, marked rejected) · 10 publish failed · 130 / 143 stopped by SIGINT / SIGTERM
(rerun to resume).
"""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Annotated, Callable

import typer

app = typer.Typer(add_completion=False, no_args_is_help=True, help=__doc__, pretty_exceptions_enable=False)

JsonOpt = Annotated[bool, typer.Option("--json", help="print one JSON object on stdout (progress stays on stderr)")]


class _Terminated(BaseException):
    """SIGTERM (what `timeout`, systemd and Kubernetes send) raised in the main thread, so that the
    run unwinds as it does on Ctrl-C: temporary folders removed, finished stages kept."""


def _raise_terminated(signum, frame):
    raise _Terminated()


def _fail(as_json: bool, label: str, code: int, message: str) -> typer.Exit:
    if as_json:
        print(json.dumps({"error": {"kind": label, "exit_code": code, "message": message}}))
    typer.echo(f"kiln: {label}: {message}", err=True)
    return typer.Exit(code)


def _guard(fn: Callable[[], dict | None], as_json: bool) -> None:
    import signal

    from kiln.errors import KilnError

    resume = "rerun the same command to resume"
    previous = signal.signal(signal.SIGTERM, _raise_terminated)
    try:
        result = fn()
    except KilnError as exc:
        raise _fail(as_json, exc.label, exc.exit_code, str(exc)) from None
    except KeyboardInterrupt:
        raise _fail(as_json, "interrupted", 130, f"stopped by Ctrl-C (SIGINT); {resume}") from None
    except _Terminated:
        raise _fail(as_json, "interrupted", 143, f"stopped by SIGTERM; {resume}") from None
    finally:
        signal.signal(signal.SIGTERM, previous)
    if result is not None and as_json:
        print(json.dumps(result, indent=2))


@app.command()
def run(
    recipe: Annotated[Path, typer.Argument(help="recipe YAML file")],
    out: Annotated[Path, typer.Option("--out", "-o", help="run folder: stage cache + artifact/")] = Path("runs/kiln"),
    as_json: JsonOpt = False,
    quiet: Annotated[bool, typer.Option("--quiet", "-q", help="no progress output")] = False,
) -> None:
    """Compress, evaluate and package the model a recipe describes. Rerunning resumes or reuses work."""

    def go() -> dict:
        from kiln.context import RunContext
        from kiln.pipeline import run as run_pipeline
        from kiln.recipe import load_recipe

        result = run_pipeline(load_recipe(recipe), out, RunContext(show_progress=not quiet))
        if not as_json:
            _print_summary(result)
        return result

    _guard(go, as_json)


@app.command()
def validate(
    recipe: Annotated[Path, typer.Argument(help="recipe YAML file")],
    schema_only: Annotated[bool, typer.Option("--schema-only", help="check the YAML only; do not open the model")] = False,
    as_json: JsonOpt = False,
) -> None:
    """Check a recipe: its schema and, unless --schema-only, the plan against the model (targets,
    group sizes the output format can store, sequence lengths)."""

    def go() -> dict:
        from kiln.recipe import load_recipe

        r = load_recipe(recipe)
        result: dict = {"recipe": str(recipe), "valid": True, "stages": [s.kind for s in r.compress]}
        if not schema_only:
            from kiln.pipeline import plan_recipe

            plan = plan_recipe(r)
            result["modules"] = {f"compress[{s.index}]": len(s.targets) for s in plan.stages}
        if not as_json:
            typer.echo(f"{recipe}: valid" + ("" if schema_only else f" ({sum(result['modules'].values())} layer updates planned)"))
        return result

    _guard(go, as_json)


@app.command()
def inspect(
    artifact: Annotated[Path, typer.Argument(help="artifact folder (…/artifact)")],
    as_json: JsonOpt = False,
    no_verify: Annotated[bool, typer.Option("--no-verify", help="skip the sha256 check of every file")] = False,
) -> None:
    """Print an artifact's manifest: source, data, stages, metrics, files (digests verified)."""

    def go() -> dict:
        from kiln.artifact.manifest import UNPROTECTED, protected, read_manifest, verify

        m = read_manifest(artifact) if no_verify else verify(artifact)
        if not as_json:
            _print_manifest(m, verified=not no_verify)
            if not protected(m):
                typer.echo(UNPROTECTED)
        return m

    _guard(go, as_json)


@app.command("verify")
def verify_cmd(
    artifact: Annotated[Path, typer.Argument(help="artifact folder")],
    as_json: JsonOpt = False,
) -> None:
    """Check the manifest against its own sha256 and every file of an artifact against the sha256 in
    the manifest (and that no file is missing or extra). Exit 7 on any difference."""

    def go() -> dict:
        from kiln.artifact.manifest import UNPROTECTED, protected, verify

        m = verify(artifact)
        result = {"artifact": str(artifact), "verified": True, "files": len(m["files"]), "status": m.get("status"),
                  "manifest_protected": protected(m)}
        if not as_json:
            typer.echo(f"{artifact}: {result['files']} files verified (status {result['status']})"
                       + ("" if protected(m) else f"\n{UNPROTECTED}"))
        return result

    _guard(go, as_json)


@app.command()
def publish(
    artifact: Annotated[Path, typer.Argument(help="artifact folder")],
    to: Annotated[str, typer.Option("--to", help="mlflow://HOST:PORT/MODEL_NAME or oci://HOST:PORT/REPOSITORY:TAG")],
    as_json: JsonOpt = False,
) -> None:
    """Publish a verified, accepted artifact. Idempotent: the same artifact again creates nothing.
    Credentials from the environment only (MLFLOW_TRACKING_USERNAME/PASSWORD, KILN_OCI_USERNAME/PASSWORD)."""

    def go() -> dict:
        from kiln.publish import publish as do_publish

        result = do_publish(artifact, to)
        if not as_json:
            what = "published" if result["created"] else "unchanged (already published)"
            typer.echo(f"{artifact} → {result['destination']}: {what}"
                       + (f", version {result['version']}" if "version" in result else ""))
        return result

    _guard(go, as_json)


@app.command()
def compare(
    artifacts: Annotated[list[Path], typer.Argument(help="artifact folders")],
    as_json: JsonOpt = False,
) -> None:
    """Tabulate several artifacts (digests verified): perplexity, task accuracy, size and decode speed per variant."""

    def go() -> dict:
        from kiln.artifact.manifest import verify
        from kiln.artifact.report import compare_table

        ms = [(str(a), verify(a)) for a in artifacts]
        table = compare_table(ms)
        if not as_json:
            typer.echo(table)
        return {"artifacts": [{"path": p, "status": m.get("status"), "metrics": m.get("metrics")} for p, m in ms],
                "table": table}

    _guard(go, as_json)


def _fmt_bytes(n: int) -> str:
    for unit in ("B", "KiB", "MiB", "GiB"):
        if n < 1024 or unit == "GiB":
            return f"{n:.1f} {unit}" if unit != "B" else f"{n} B"
        n /= 1024
    return str(n)


def _metrics_table(metrics: dict):
    from rich.table import Table

    sets = sorted({k for m in metrics.values() for k in m.get("perplexity", {})})
    t = Table(title="perplexity (lower is better)")
    t.add_column("variant")
    for s in sets:
        t.add_column(s, justify="right")
    t.add_column("size", justify="right")
    for variant, m in metrics.items():
        ppl = m.get("perplexity", {})
        t.add_row(variant, *[f"{ppl[s]:.3f}" if s in ppl else "-" for s in sets],
                  _fmt_bytes(m["size_bytes"]) if "size_bytes" in m else "-")
    return t


def _print_summary(result: dict) -> None:
    from rich.console import Console

    c = Console()
    c.print(_metrics_table(result["metrics"]))
    for s in result["stages"]:
        c.print(f"compress[{s['index']}] {s['kind']}: {len(s['modules'])} layers, {s['wall_s']:.1f} s, "
                f"peak RSS {_fmt_bytes(s['peak_rss_bytes'])}{' (cached)' if s.get('cached') else ''}")
    c.print(f"artifact: {result['artifact']}")


def _print_manifest(m: dict, verified: bool) -> None:
    from rich.console import Console

    c = Console()
    c.print(f"[bold]{m.get('recipe_name')}[/bold]  status={m.get('status')}  format={m.get('format')}  "
            f"dtype={m.get('dtype')}  kiln {m.get('kiln_version')}  schema {m.get('schema_version')}")
    src = m.get("source", {})
    c.print(f"source: {src.get('origin')} ({src.get('kind')}) sha256 {str(src.get('sha256'))[:16]}…")
    cal = (m.get("data") or {}).get("calibration")
    if cal:
        c.print(f"calibration: {cal['source']} — {cal['samples']}×{cal['seq_len']} tokens, seed {cal['seed']}, "
                f"{cal['documents_used']} documents")
    for name, e in ((m.get("data") or {}).get("evaluation") or {}).items():
        c.print(f"evaluation {name}: {e['source']} — {e['windows']}×{e['seq_len']} tokens ({e['disjoint_from_calibration']})")
    for s in m.get("stages", []):
        acts = s["config"].get("activations")
        acts = f" activations {acts}" if acts else ""
        c.print(f"compress[{s['index']}] {s['kind']} {s['config'].get('scheme', '')}{acts}: {len(s['modules'])} modules, "
                f"{s['wall_s']:.1f} s, peak RSS {_fmt_bytes(s['peak_rss_bytes'])}")
    if m.get("metrics"):
        c.print(_metrics_table(m["metrics"]))
    if m.get("compile"):
        _print_compile(c, m["compile"])
    c.print(f"{len(m.get('files', {}))} files, {_fmt_bytes(m.get('size_bytes', 0))}"
            + (" — all sha256 digests verified" if verified else " — digests not checked"))


def _print_compile(c, section: dict) -> None:
    from rich.table import Table

    cpu = section.get("cpu") or {}
    isa = [k for k in ("avx2", "avx512f", "avx512_vnni", "avx_vnni", "amx_int8") if cpu.get(k)]
    c.print(f"compiled on: {cpu.get('model')} ({cpu.get('cores')} cores; {', '.join(isa) or 'no AVX2'})")
    for name, t in section.get("targets", {}).items():
        c.print(f"[bold]onnx/{name}[/bold]: {t['target']} {t['dtype']} ({t['provider']}), linears {t['linears']}, "
                f"runtime checks {t['runtime_checks']}")
        after = t.get("op_histogram_optimized") or {}
        h = Table(title=f"onnx/{name} ops: as exported → as ONNX Runtime runs it")
        h.add_column("op")
        h.add_column("exported", justify="right")
        h.add_column("optimized", justify="right")
        for op in sorted(set(t["op_histogram"]) | set(after), key=lambda o: -max(t["op_histogram"].get(o, 0), after.get(o, 0))):
            h.add_row(op, str(t["op_histogram"].get(op, 0)), str(after.get(op, "-")) if after else "-")
        c.print(h)
        p = t.get("parity")
        if p:
            c.print(f"parity vs PyTorch ({p['windows']} windows, {p['positions']} positions): top-1 {p['top1_agreement']:.4f}, "
                    f"ppl {p['perplexity_onnx']:.4f} vs {p['perplexity_torch']:.4f} ({100 * p['perplexity_rel']:+.3f}%), "
                    f"max |Δ logit| {p['max_abs_logit']:.2e} — {'passed' if p['passed'] else 'FAILED'}")


def main() -> None:  # pragma: no cover
    app()


if __name__ == "__main__":  # pragma: no cover
    sys.exit(app())
