"""Issue #5, library part: each batch row runs its own adapter in one forward."""

from __future__ import annotations

import pytest
import torch

from lorakit import LoraConfig, PeftModel, get_peft_model
from tinymodels import logits, tiny_llama


@pytest.fixture(scope="module")
def model():
    """Three adapters of different ranks, alphas and targets (one with a lora_bias)."""
    torch.manual_seed(0)
    peft_model = get_peft_model(
        tiny_llama(), LoraConfig(r=4, lora_alpha=8, target_modules="all-linear", init_lora_weights=False), "a"
    )
    peft_model.add_adapter("b", LoraConfig(r=2, lora_alpha=16, target_modules=["q_proj", "v_proj"], init_lora_weights=False))
    peft_model.add_adapter("c", LoraConfig(r=8, lora_alpha=4, target_modules=["down_proj", "embed_tokens"],
                                           init_lora_weights=False, use_rslora=True))
    return peft_model.eval()


def _alone(model, name, ids, **kwargs):
    if name == "__base__":
        with model.disable_adapter():
            return logits(model, ids)
    model.set_adapter(name)
    try:
        return logits(model, ids)
    finally:
        model.set_adapter("a")


ROWS = ["b", "__base__", "a", "c", "b", "a"]


def test_each_row_equals_its_adapter_alone(model):
    ids = torch.randint(0, 100, (len(ROWS), 7), generator=torch.Generator().manual_seed(2))
    mixed = model(ids, adapter_names=ROWS).logits
    for i, name in enumerate(ROWS):
        torch.testing.assert_close(mixed[i], _alone(model, name, ids[i : i + 1])[0], rtol=1e-5, atol=1e-5)


def _generate_alone(model, name, ids, **kwargs):
    if name == "__base__":
        with model.disable_adapter():
            return model.generate(ids, **kwargs)
    model.set_adapter(name)
    try:
        return model.generate(ids, **kwargs)
    finally:
        model.set_adapter("a")


@pytest.mark.parametrize(
    "kwargs",
    [dict(do_sample=False), dict(do_sample=False, num_beams=3), dict(do_sample=False, num_beams=3, num_return_sequences=2)],
    ids=["greedy", "beam", "beam-2-returned"],
)
def test_generate_rows_equal_alone(model, kwargs):
    """Rows come back in the caller's order (generate groups them by adapter inside)."""
    ids = torch.randint(0, 100, (4, 5), generator=torch.Generator().manual_seed(3))
    rows = ["c", "a", "__base__", "b"]
    out = model.generate(ids, adapter_names=rows, max_new_tokens=6, **kwargs)
    k = kwargs.get("num_return_sequences", 1)
    assert out.shape[0] == len(rows) * k
    for i, name in enumerate(rows):
        alone = _generate_alone(model, name, ids[i : i + 1], max_new_tokens=6, **kwargs)
        assert torch.equal(out[i * k : (i + 1) * k], alone), name


def test_weights_changed_between_calls_are_seen():
    """Layers keep stacked adapters between calls; an in-place change to an adapter must show."""
    torch.manual_seed(0)
    m = get_peft_model(tiny_llama(), LoraConfig(r=4, target_modules="all-linear", init_lora_weights=False), "a")
    m.add_adapter("b", LoraConfig(r=4, target_modules="all-linear", init_lora_weights=False))
    m.eval()
    ids = torch.randint(0, 100, (2, 5), generator=torch.Generator().manual_seed(7))
    rows = ("a", "b")
    before = m(ids, adapter_names=rows).logits
    with torch.no_grad():
        m.base_model.model.model.layers[0].mlp.down_proj.lora_B["b"].weight.mul_(3)
    after = m(ids, adapter_names=rows).logits
    torch.testing.assert_close(after[0], before[0])
    assert not torch.allclose(after[1], before[1])
    torch.testing.assert_close(after[1], _alone(m, "b", ids[1:2])[0], rtol=1e-5, atol=1e-5)


def test_generate_with_a_dict_result_keeps_rows_in_place(model):
    """With return_dict_in_generate the rows are not regrouped (scores etc. stay in the caller's order)."""
    ids = torch.randint(0, 100, (3, 5), generator=torch.Generator().manual_seed(6))
    rows = ["c", "a", "b"]
    out = model.generate(ids, adapter_names=rows, max_new_tokens=4, do_sample=False, return_dict_in_generate=True,
                         output_scores=True)
    plain = model.generate(ids, adapter_names=rows, max_new_tokens=4, do_sample=False)
    assert torch.equal(out.sequences, plain)
    for i, name in enumerate(rows):
        alone = _generate_alone(model, name, ids[i : i + 1], max_new_tokens=4, do_sample=False)
        assert torch.equal(out.sequences[i : i + 1], alone), name


@pytest.mark.parametrize("rows", [["a", "a", "b", "b"], ["a", "b", "a", "b"], ["a", "a", "a", "c"]],
                         ids=["grouped", "interleaved", "uneven"])
def test_row_layouts(model, rows):
    """Evenly grouped rows skip the gathers; interleaved and uneven ones are gathered and padded."""
    ids = torch.randint(0, 100, (len(rows), 5), generator=torch.Generator().manual_seed(5))
    mixed = model(ids, adapter_names=rows).logits
    for i, name in enumerate(rows):
        torch.testing.assert_close(mixed[i], _alone(model, name, ids[i : i + 1])[0], rtol=1e-5, atol=1e-5)


def test_left_padded_batch(model):
    ids = torch.randint(1, 100, (2, 6), generator=torch.Generator().manual_seed(4))
    mask = torch.ones_like(ids)
    mask[0, :2] = 0
    out = model.generate(ids, attention_mask=mask, adapter_names=["b", "a"], max_new_tokens=4, do_sample=False)
    alone = _generate_alone(model, "b", ids[:1, 2:], max_new_tokens=4, do_sample=False)
    assert torch.equal(out[0, 2:], alone[0])


def test_errors(model, tmp_path):
    ids = torch.randint(0, 100, (2, 4))
    with pytest.raises(ValueError, match="unknown adapter 'zz'"):
        model(ids, adapter_names=["a", "zz"])
    with pytest.raises(ValueError, match="3 entries but the batch has 2 rows"):
        model(ids, adapter_names=["a", "b", "c"])
    model.train()
    try:
        with pytest.raises(ValueError, match="eval"):
            model(ids, adapter_names=["a", "b"])
    finally:
        model.eval()
    model.merge_adapter(["a"])
    try:
        with pytest.raises(ValueError, match="merged"):
            model(ids, adapter_names=["a", "b"])
    finally:
        model.unmerge_adapter()


def test_handles_accept_adapter_names_across_the_shared_base(tmp_path, model):
    model.save_pretrained(tmp_path, selected_adapters=["a", "b"])
    base = tiny_llama()
    first = PeftModel.from_pretrained(base, tmp_path, adapter_name="a")
    first.load_adapter(tmp_path / "b", adapter_name="b")
    ids = torch.randint(0, 100, (2, 5), generator=torch.Generator().manual_seed(5))
    torch.testing.assert_close(first(ids, adapter_names=["b", "a"]).logits, model(ids, adapter_names=["b", "a"]).logits)


def test_second_all_linear_adapter_on_wrapped_layers():
    model = get_peft_model(tiny_llama(), LoraConfig(r=2, target_modules="all-linear"))
    model.add_adapter("second", LoraConfig(r=2, target_modules="all-linear"))
    wrapped = [m for m in model.modules() if hasattr(m, "lora_A")]
    assert len(wrapped) == 14 and all("second" in m.lora_A for m in wrapped)


def test_mixed_batch_under_inference_mode_with_weights_loaded_there(tmp_path, model):
    model.save_pretrained(tmp_path, selected_adapters=["a"])
    with torch.inference_mode():
        handle = PeftModel.from_pretrained(tiny_llama(), tmp_path, adapter_name="a")
        ids = torch.randint(0, 100, (2, 5), generator=torch.Generator().manual_seed(6))
        out = handle(ids, adapter_names=["a", "__base__"]).logits
    torch.testing.assert_close(out[0], _alone(model, "a", ids[:1])[0], rtol=1e-5, atol=1e-5)
