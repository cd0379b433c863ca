"""Every example recipe in recipes/ runs: on a tiny model here (model and sample counts swapped),
on the real model it names in the real tier and the quickstart."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml

from conftest import run_json, write_recipe

RECIPES = sorted((Path(__file__).parent.parent / "recipes").glob("*.yaml"))


def shrink(recipe: dict, model_dir: Path) -> dict:
    recipe["model"] = {"source": str(model_dir)}
    if recipe["data"].get("calibration"):
        recipe["data"]["calibration"].update(samples=8, seq_len=64)
    for e in recipe["data"]["evaluation"]:
        e.update(windows=2, seq_len=64)
    for stage in recipe["compress"]:
        if stage["kind"] == "distill":
            stage.update(steps=3, batch_size=2, **({"seq_len": 64} if stage.get("seq_len") else {}),
                         **({"samples": 16} if stage.get("samples") else {}))
        if stage.get("scheme", {}).get("group_size") in (64, 128):
            stage["scheme"]["group_size"] = 32  # the tiny models' hidden size is 64
    ev = recipe.get("evaluate") or {}
    if ev.get("tasks"):
        ev["limit"] = 3
    if ev.get("latency"):
        ev["latency"].update(prompt_tokens=16, new_tokens=4, batch=2)
    recipe.pop("gates", None)  # thresholds set for the real model, meaningless on random weights
    return recipe


@pytest.mark.parametrize("path", RECIPES, ids=lambda p: p.stem)
def test_example_recipe_runs_on_a_tiny_model(path, tiny_models, tmp_path):
    recipe = shrink(yaml.safe_load(path.read_text()), tiny_models("llama"))
    out = run_json("run", str(write_recipe(tmp_path / path.name, recipe)), "--out", str(tmp_path / "run"), "--quiet")
    assert [s["kind"] for s in out["stages"]] == [s["kind"] for s in recipe["compress"]]
    assert out["metrics"]["compressed"]["perplexity"]
