"""Mixed-adapter batches: ``model(ids, adapter_names=[...])`` runs each row through its own adapter, as peft does."""

import pytest
import torch
from test_lora import TINY, ids, randomize_adapters, tiny_gpt
from torch import nn

from gptlora.lora import BASE, apply_lora, lora_disabled, merge_lora, set_adapter, unmerge_lora


def two_adapter_classifier():
    """A tiny GPT classifier with adapters "a" (q/v, and its own trained head) and "b" (every layer, head frozen)."""
    model = tiny_gpt()
    torch.manual_seed(1)
    model.out_head = nn.Linear(TINY.emb_dim, 2)
    apply_lora(model, rank=2, alpha=4, target_modules=["W_query", "W_value"], modules_to_save=["out_head"],
               adapter_name="a", verbose=False)
    apply_lora(model, rank=3, alpha=3, adapter_name="b", verbose=False)  # out_head is a saved module, no target
    randomize_adapters(model, seed=2)
    with torch.no_grad():
        model.out_head.copies["a"].weight.add_(0.5)
    return model.eval()


def test_each_row_gets_what_it_gets_alone_with_its_adapter():
    model = two_adapter_classifier()
    x = ids(batch=5, tokens=6)
    names = ["b", BASE, "a", "b", "a"]
    with torch.no_grad():
        mixed = model(x, adapter_names=names)
        for row, name in enumerate(names):
            if name == BASE:
                with lora_disabled(model):
                    alone = model(x[row:row + 1])
            else:
                set_adapter(model, name)
                alone = model(x[row:row + 1])
            torch.testing.assert_close(mixed[row:row + 1], alone, atol=1e-6, rtol=0)
        assert not torch.allclose(mixed[0], mixed[2])  # the adapters really differ
    set_adapter(model, "a")
    torch.testing.assert_close(model(x), model(x, adapter_names=["a"] * 5), atol=1e-6, rtol=0)  # names cleared after
    assert all(getattr(m, "row_adapters", None) is None for m in model.modules())


@pytest.mark.parametrize("names, message", [
    (["a"], "has 1 names for a batch of 2 rows"),
    (["a", "c"], r"adapter_names \['c'\] are not adapters of this model; it has \['a', 'b'\]"),
    ("ab", "one adapter name per row"),
])
def test_bad_adapter_names_are_explained_before_anything_runs(names, message):
    model = two_adapter_classifier()
    with pytest.raises(ValueError, match=message):
        model(ids(batch=2), adapter_names=names)
    assert all(getattr(m, "row_adapters", None) is None for m in model.modules())  # nothing left behind


def test_the_base_rows_name_cannot_name_an_adapter(tmp_path):
    from gptlora.formats.lora_io import load_adapter, save_adapter

    model = two_adapter_classifier()
    with pytest.raises(ValueError, match="'__base__' cannot name an adapter"):
        apply_lora(model, rank=2, alpha=2, adapter_name=BASE, verbose=False)
    save_adapter(model, tmp_path / "a", adapter_name="a", verbose=False)
    fresh = two_adapter_classifier()
    with pytest.raises(ValueError, match="'__base__' cannot name an adapter"):
        load_adapter(fresh, tmp_path / "a", adapter_name=BASE)
    assert all(BASE not in getattr(m, "lora", {}) for m in fresh.modules())


def test_mixed_batches_are_refused_while_training_or_merged():
    model = two_adapter_classifier()
    with pytest.raises(ValueError, match="inference only; call model.eval"):
        model.train()(ids(), adapter_names=["a", "b"])
    merge_lora(model.eval())
    with pytest.raises(RuntimeError, match="cannot mix adapters in one batch while an adapter is merged"):
        model(ids(), adapter_names=["a", "b"])
    unmerge_lora(model)
    model(ids(), adapter_names=["a", "b"])
