"""Architecture knowledge: the family table resolves on every tiny model, and a family missing from
the table is inferred from the module graph or refused with a message naming what was not found."""

from __future__ import annotations

import pytest
import torch

from conftest import ARCHS


def _model(tiny_models, arch):
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(tiny_models(arch)).eval()


def _trace(model, layout, i):
    ids = torch.randint(0, 512, (1, 16))
    return lambda: model(input_ids=ids)


@pytest.mark.parametrize("arch", ARCHS)
def test_family_table_resolves(arch, tiny_models):
    from kiln.arch import decoder_layout, smoothing_groups
    from kiln.compress.smoothing import fold_kind

    model = _model(tiny_models, arch)
    layout = decoder_layout(model)
    groups = smoothing_groups(model, layout, 0)
    assert groups and all(fold_kind(model.get_submodule(g.prev)) for g in groups)
    fed = {lin for g in groups for lin in g.linears}
    assert any("norm" in g.prev or ".ln_" in g.prev for g in groups)
    assert all(model.get_submodule(n) is not None for n in fed)


def test_unknown_family_is_inferred_from_the_graph(tiny_models):
    from kiln.arch import decoder_layout, smoothing_groups

    model = _model(tiny_models, "llama")
    model.config.model_type = "mystery"  # not in the table: inferred by tracing which norm feeds which linear
    layout = decoder_layout(model)
    groups = {g.prev.rsplit(".", 1)[-1]: {n.rsplit(".", 1)[-1] for n in g.linears}
              for g in smoothing_groups(model, layout, 1, trace=_trace(model, layout, 1))}
    assert groups == {"input_layernorm": {"q_proj", "k_proj", "v_proj"}, "post_attention_layernorm": {"gate_proj", "up_proj"}}


def test_unknown_family_without_norms_is_refused(tiny_models):
    from kiln.arch import decoder_layout, smoothing_groups
    from kiln.errors import RecipeError

    model = _model(tiny_models, "llama")
    model.config.model_type = "mystery"
    for layer in model.model.layers:  # norms the graph cannot recognise as such
        layer.input_layernorm = torch.nn.Identity()
        layer.post_attention_layernorm = torch.nn.Identity()
    layout = decoder_layout(model)
    with pytest.raises(RecipeError, match=r"'mystery'.*could not infer which norm feeds which linear in model.layers.0.*q_proj"):
        smoothing_groups(model, layout, 0, trace=_trace(model, layout, 0))
