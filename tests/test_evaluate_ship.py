"""evaluate (tasks with lm-eval semantics, latency, gates) and ship (report, model card, verify,
compare) on tiny models; agreement with lm-evaluation-harness itself on one task."""

from __future__ import annotations

import json

import numpy as np
import pytest

from conftest import ARCHS, gptq_recipe, run_cli, run_json, write_recipe


def test_every_task_loads_and_builds_requests():
    from kiln.evaluate.tasks import TASKS, _rows, make_doc

    for task in TASKS:
        rows = _rows(task)
        assert len(rows) > 250, task
        doc = make_doc(task, rows[0])
        assert 0 <= doc.gold < len(doc.requests)
        assert all(c and k.startswith(" ") for c, k in doc.requests), (task, doc.requests[0])
    assert len(_rows("lambada")) == 5153 and len(_rows("arc_challenge")) == 299


def test_encode_pair_moves_trailing_spaces_like_lm_eval(tokenizer_dir):
    from transformers import AutoTokenizer

    from kiln.evaluate.tasks import encode_pair

    tok = AutoTokenizer.from_pretrained(tokenizer_dir)
    ctx, cont = encode_pair(tok, "The cat sat ", "on the mat")
    assert tok.decode(ctx) == "The cat sat" and tok.decode(cont) == " on the mat"


def test_loglikelihood_is_the_sum_of_continuation_log_probs():
    from kiln.evaluate.tasks import Scorer, loglikelihoods

    rng = np.random.default_rng(0)
    table = rng.normal(size=(10, 10))

    class Bigram(Scorer):  # logits depend on the current token only
        def full(self, ids):
            return table[ids]

    scorer = Bigram()

    (ll, greedy), = loglikelihoods(scorer, [([1, 2], [3, 4])], 100)
    logp = table - np.log(np.exp(table).sum(-1, keepdims=True))
    assert ll == pytest.approx(logp[2, 3] + logp[3, 4])
    assert greedy == (table[2].argmax() == 3 and table[3].argmax() == 4)
    # padding a second, longer request into the batch changes nothing for the first
    (ll2, _), _ = loglikelihoods(scorer, [([1, 2], [3, 4]), ([5, 6, 7, 8], [9])], 100)
    assert ll2 == pytest.approx(ll)


@pytest.mark.parametrize("arch", ARCHS)
def test_shared_context_scoring_matches_full_rows(arch, tiny_models, tmp_path):
    """A multiple-choice document runs its context once and the choices through its KV cache, in
    PyTorch and in the compiled graph; the log-likelihoods equal those of full rows. The 40-token
    context passes Gemma's 32-token sliding window."""
    from kiln.compile.decoder import BuildOptions, build_decoder
    from kiln.compile.graph import save
    from kiln.compile.runtime import OnnxDecoder
    from kiln.evaluate.tasks import OnnxScorer, Scorer, TorchScorer, loglikelihoods
    from kiln.model import WeightStore, load_full

    d = tiny_models(arch)
    store = WeightStore(d)
    save(build_decoder(d, store, BuildOptions())[0], tmp_path / "model.onnx")
    rng = np.random.default_rng(3)
    ctx = rng.integers(0, 512, 40).tolist()
    pairs = [(ctx, rng.integers(0, 512, n).tolist()) for n in (1, 5, 3, 6)]
    for scorer in (TorchScorer(load_full(d, store)), OnnxScorer(OnnxDecoder(tmp_path / "model.onnx"))):
        calls, cached = [], scorer.shared
        scorer.shared = lambda c, r: (calls.append(len(r)), cached(c, r))[1]
        shared = loglikelihoods(scorer, pairs, 100)
        assert calls == [3]  # the context ran once; the three longer choices read its cache
        rows = loglikelihoods(type("Full", (Scorer,), {"full": lambda self, ids: scorer.full(ids)})(), pairs, 100)
        np.testing.assert_allclose([s for s, _ in shared], [s for s, _ in rows], atol=1e-4)
        assert [g for _, g in shared] == [g for _, g in rows]


def test_seeded_selection_is_reproducible_and_limit_without_seed_takes_the_first():
    from kiln.evaluate.tasks import select

    assert select(100, 5, None) == [0, 1, 2, 3, 4]
    assert select(100, 5, 7) == select(100, 5, 7) != select(100, 5, 8)
    assert select(10, None, 1) == list(range(10))


def test_scores_agree_with_lm_evaluation_harness(tiny_models, tmp_path):
    """ARC-Easy on the first 12 documents through lm-eval's own HFLM and task machinery (a local task
    YAML over the same Arrow file) and through kiln: same accuracies, log-likelihoods within float noise."""
    lm_eval = pytest.importorskip("lm_eval")
    from lm_eval.models.huggingface import HFLM
    from lm_eval.tasks import TaskManager
    from transformers import AutoTokenizer

    from kiln.evaluate.tasks import TASK_FILES, _package_root, evaluate_task, TorchScorer
    from kiln.model import WeightStore, load_full

    d = tiny_models("llama")
    model, tok = load_full(d, WeightStore(d)), AutoTokenizer.from_pretrained(d)
    arrow = sorted((_package_root() / "hf_datasets" / TASK_FILES["arc_easy"]).glob("*.arrow"))[0]
    (tmp_path / "arc_local.yaml").write_text(
        "task: arc_local\ndataset_path: arrow\ndataset_kwargs:\n  data_files:\n    validation: " + str(arrow) + "\n"
        "output_type: multiple_choice\nvalidation_split: validation\n"
        'doc_to_text: "Question: {{question}}\\nAnswer:"\n'
        'doc_to_target: "{{choices.label.index(answerKey)}}"\ndoc_to_choice: "{{choices.text}}"\n'
        "metric_list:\n  - metric: acc\n  - metric: acc_norm\n")
    res = lm_eval.simple_evaluate(model=HFLM(pretrained=model, tokenizer=tok, batch_size=1), tasks=["arc_local"],
                                  task_manager=TaskManager(include_path=str(tmp_path)), limit=12, log_samples=True)
    theirs = res["results"]["arc_local"]
    ours = evaluate_task("arc_easy", TorchScorer(model), tok, indices=list(range(12)))
    assert ours["acc"] == pytest.approx(theirs["acc,none"]) and ours["acc_norm"] == pytest.approx(theirs["acc_norm,none"])
    for s in res["samples"]["arc_local"]:
        np.testing.assert_allclose(ours["loglikelihoods"][s["doc_id"]], [r[0] for r in s["filtered_resps"]], atol=1e-3)


def _ship_recipe(model_dir, **gates):
    r = gptq_recipe(model_dir, group_size=32, samples=4, seq_len=32)
    r["evaluate"] = {"perplexity": True, "tasks": ["arc_easy", "winogrande", "lambada"], "limit": 4,
                     "latency": {"prompt_tokens": 16, "new_tokens": 4, "batch": 2, "usd_per_hour": 0.5}}
    r["compile"] = {"targets": [{"target": "cpu"}], "parity": {"windows": 1}}
    if gates:
        r["gates"] = gates
    return r


def test_run_evaluates_tasks_latency_and_writes_reports(tiny_models, tmp_path):
    d = tiny_models("llama")
    out = run_json("run", str(write_recipe(tmp_path / "r.yaml", _ship_recipe(d, max_task_drop=1.0))),
                   "--out", str(tmp_path / "run"), "-q")
    m = out["metrics"]
    for variant in ("baseline", "compressed", "onnx:cpu"):
        assert set(m[variant]["tasks"]) == {"arc_easy", "winogrande", "lambada"}, variant
        assert m[variant]["tasks"]["arc_easy"]["n"] == 4 and "acc_norm" in m[variant]["tasks"]["arc_easy"]
        assert "perplexity" in m[variant]["tasks"]["lambada"]
    # the ONNX graph carries the same int4 weights: the same task answers as the PyTorch model
    assert m["onnx:cpu"]["tasks"]["arc_easy"]["acc"] == m["compressed"]["tasks"]["arc_easy"]["acc"]
    lat = m["onnx:cpu"]["latency"]
    assert lat["ttft_ms"] > 0 and lat["itl_ms_p50"] <= lat["itl_ms_p99"] and lat["tokens_per_s_b2"] > 0
    assert lat["usd_per_1m_tokens_batch"] == pytest.approx(0.5 / (lat["tokens_per_s_batch"] * 3600) * 1e6)
    art = tmp_path / "run" / "artifact"
    manifest = json.loads((art / "manifest.json").read_text())
    assert manifest["status"] == "accepted" and manifest["gates"] and all(g["passed"] for g in manifest["gates"])
    for f in ("report.md", "report.html", "README.md"):
        assert f in manifest["files"]
    md = (art / "report.md").read_text()
    assert "arc_easy" in md and "TTFT" in md and "max_task_drop" in md
    assert "<img" in (art / "report.html").read_text()  # accuracy-vs-size / -latency plots inline
    code, text, _ = run_cli("verify", str(art))
    assert code == 0 and "verified" in text
    code, text, _ = run_cli("compare", str(art), str(art))
    assert code == 0 and text.count("onnx:cpu") == 2


def test_failed_gate_exits_9_and_marks_the_artifact_rejected(tiny_models, tmp_path):
    d = tiny_models("llama")
    r = _ship_recipe(d, max_perplexity_ratio=0.5, min_decode_tokens_per_s={"cpu": 1e9})
    code, _, err = run_cli("run", str(write_recipe(tmp_path / "r.yaml", r)), "--out", str(tmp_path / "run"), "-q")
    assert code == 9, err
    assert "max_perplexity_ratio" in err and "min_decode_tokens_per_s" in err and "rejected" in err
    manifest = json.loads((tmp_path / "run" / "artifact" / "manifest.json").read_text())
    assert manifest["status"] == "rejected"
    failed = {g["gate"] for g in manifest["gates"] if not g["passed"]}
    assert failed == {"max_perplexity_ratio", "min_decode_tokens_per_s"}
    # rerunning reuses the artifact and still refuses it
    code, _, _ = run_cli("run", str(write_recipe(tmp_path / "r.yaml", r)), "--out", str(tmp_path / "run"), "-q")
    assert code == 9


def test_verify_names_a_tampered_file(tiny_models, tmp_path):
    d = tiny_models("llama")
    r = gptq_recipe(d)
    r["evaluate"] = None
    run_json("run", str(write_recipe(tmp_path / "r.yaml", r)), "--out", str(tmp_path / "run"), "-q")
    art = tmp_path / "run" / "artifact"
    with open(art / "config.json", "a") as f:
        f.write(" ")
    code, _, err = run_cli("verify", str(art))
    assert code == 7 and "sha256 mismatch: config.json" in err


@pytest.mark.parametrize("change,needle", [
    ({"evaluate": {"tasks": ["mmlu"]}}, "evaluate.tasks[0]"),
    ({"evaluate": {"tasks": ["piqa", "piqa"]}}, "tasks listed twice"),
    ({"gates": {"max_task_drop": 0.01}}, "gates.max_task_drop needs evaluate.tasks"),
    ({"gates": {"min_decode_tokens_per_s": {"gpu": 10}}}, "not compile targets"),
])
def test_bad_evaluate_and_gate_sections(change, needle, tiny_models, tmp_path):
    r = gptq_recipe(tiny_models("llama"))
    r.update(change)
    code, _, err = run_cli("validate", str(write_recipe(tmp_path / "r.yaml", r)), "--schema-only")
    assert code == 3 and needle in err, err


def test_latency_longer_than_the_model_is_refused_at_plan_time(tiny_models, tmp_path):
    r = gptq_recipe(tiny_models("llama"))  # 512 positions
    r["evaluate"]["latency"] = {"prompt_tokens": 500, "new_tokens": 64}
    code, _, err = run_cli("validate", str(write_recipe(tmp_path / "r.yaml", r)))
    assert code == 3 and "evaluate.latency.prompt_tokens + new_tokens: 564 tokens exceeds the model's 512" in err, err


def test_serving_configs_are_written_and_checked(tiny_models, tmp_path):
    """Triton's config.pbtxt parses with Triton's own schema and names the graph's inputs; the KServe
    manifest and the vLLM command point at the checkpoint."""
    import yaml

    pytest.importorskip("tritonclient.grpc")
    from kiln.artifact.serving import parse_triton

    d = tiny_models("llama")
    r = gptq_recipe(d, group_size=32, samples=4, seq_len=32)
    r["evaluate"] = None
    r["compile"] = {"targets": [{"target": "cpu"}], "parity": {"windows": 1}}
    run_json("run", str(write_recipe(tmp_path / "r.yaml", r)), "--out", str(tmp_path / "run"), "-q")
    art = tmp_path / "run" / "artifact"
    m = json.loads((art / "manifest.json").read_text())
    assert m["serving"]["triton"]["check"].startswith("parsed with Triton")
    cfg = parse_triton((art / "serving" / "triton" / "config.pbtxt").read_text())
    assert cfg.backend == "onnxruntime"
    names = {i.name for i in cfg.input}
    assert {"input_ids", "attention_mask", "past_key_values.0.key", "past_key_values.1.value"} <= names
    assert {o.name for o in cfg.output} >= {"logits", "present.1.value"}
    ks = yaml.safe_load((art / "serving" / "kserve.yaml").read_text())
    assert ks["kind"] == "InferenceService" and "--backend=vllm" in ks["spec"]["predictor"]["model"]["args"]
    assert "--quantization compressed-tensors" in (art / "serving" / "vllm.sh").read_text()
    assert "serving/triton/config.pbtxt" in m["files"] and "triton" in (art / "README.md").read_text()
    with pytest.raises(Exception):
        parse_triton("name: 'x'\nbackend: 'onnxruntime'\nnot_a_field: 3\n")
