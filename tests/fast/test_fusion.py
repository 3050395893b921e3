"""The fast path inside models: the fused kernel, q/k/v grouping, the fused MLP and the norm remake
give the general path's numbers, are used where they apply, and detach cleanly."""

from __future__ import annotations

import pytest
import torch

from lorakit import LoraConfig, get_peft_model
from lorakit.fast.kernels import lora_linear, lora_shared_input, lora_swiglu
from lorakit.lora.linear import Linear
from tinymodels import logits, tiny_gpt2, tiny_llama


@pytest.mark.parametrize("make, targets, dtype", [(tiny_llama, "all-linear", torch.float32),
                                                  (tiny_llama, "all-linear", torch.bfloat16),
                                                  (tiny_gpt2, ["c_attn", "c_proj", "c_fc"], torch.float32)],
                         ids=["llama", "llama-bf16", "gpt2"])
def test_model_gradients_equal_with_and_without_fast_path(make, targets, dtype, monkeypatch):
    ids = torch.randint(0, 100, (2, 9), generator=torch.Generator().manual_seed(0))

    def grads():
        torch.manual_seed(1)
        model = get_peft_model(make().to(dtype), LoraConfig(r=4, target_modules=targets, init_lora_weights=False)).train()
        logits(model, ids).float().pow(2).mean().backward()
        return {n: p.grad for n, p in model.named_parameters() if p.requires_grad}

    fast = grads()
    monkeypatch.setattr(Linear, "_fast_path_ok", lambda self, name: False)
    plain = grads()
    assert fast.keys() == plain.keys() and fast
    for name in fast:
        if dtype == torch.float32:
            torch.testing.assert_close(fast[name], plain[name], rtol=1e-4, atol=1e-6)
        else:  # bf16 rounding differs in where the casts fall; compare relative to each gradient's scale
            scale = float(plain[name].abs().max())
            torch.testing.assert_close(fast[name], plain[name], rtol=5e-2, atol=5e-2 * scale)


def test_fast_path_is_used_by_default(monkeypatch):
    import lorakit.lora.linear

    calls = []
    monkeypatch.setattr(lorakit.lora.linear, "lora_linear", lambda *a, **kw: calls.append(1) or lora_linear(*a, **kw))
    model = get_peft_model(tiny_llama(), LoraConfig(r=4, target_modules=["q_proj"])).train()
    logits(model, torch.randint(0, 100, (1, 4))).sum().backward()
    assert len(calls) == 2  # one per layer


def test_qkv_share_one_node_in_training_only(monkeypatch):
    import lorakit.fast.fusion as fusion

    calls = []
    monkeypatch.setattr(fusion, "lora_shared_input", lambda *a, **kw: calls.append(1) or lora_shared_input(*a, **kw))
    torch.manual_seed(0)
    model = get_peft_model(tiny_llama(), LoraConfig(r=4, target_modules="all-linear", init_lora_weights=False)).train()
    ids = torch.randint(0, 100, (1, 4))
    logits(model, ids).sum().backward()
    assert len(calls) == 2  # one per layer
    with torch.no_grad():
        expected = logits(model, ids)
    with torch.inference_mode():  # inference tensors carry no version counter
        torch.testing.assert_close(logits(model, ids), expected, rtol=0, atol=0)
    assert len(calls) == 2
    # k_proj called on another tensor than q_proj was: computed on its own, not q's leftovers
    attn = model.base_model.model.model.layers[0].self_attn
    x, y = torch.randn(1, 3, 32, requires_grad=True), torch.randn(1, 3, 32)
    attn.q_proj(x)
    assert len(calls) == 3
    with torch.no_grad():
        fusion.detach(model.base_model.model)
        expected = attn.k_proj(y)
        fusion.attach(model.base_model.model)
    torch.testing.assert_close(attn.k_proj(y), expected)
    # in-place change of the input between q and k: k computed anew
    x2 = x.detach().clone().requires_grad_(True)
    h = x2 * 1
    attn.q_proj(h)
    with torch.no_grad():
        h.add_(1.0)
    with torch.no_grad():
        fusion.detach(model.base_model.model)
        expected = attn.v_proj(h)
        fusion.attach(model.base_model.model)
    torch.testing.assert_close(attn.v_proj(h), expected)


def test_q_and_v_alone_are_grouped_too(monkeypatch):
    """PEFT's default Llama targets (q_proj, v_proj): k_proj stays a plain layer between them."""
    import lorakit.fast.fusion as fusion

    calls = []
    monkeypatch.setattr(fusion, "lora_shared_input", lambda x, ops, **kw: calls.append(len(ops)) or lora_shared_input(x, ops, **kw))
    ids = torch.randint(0, 100, (2, 5), generator=torch.Generator().manual_seed(0))

    def grads(group):
        torch.manual_seed(1)
        model = get_peft_model(tiny_llama(), LoraConfig(r=4, target_modules=["q_proj", "v_proj"], init_lora_weights=False)).train()
        for layer in model.modules():
            if not group and isinstance(layer, Linear):
                layer.__dict__.pop("forward", None)  # the grouping's stand-in
        logits(model, ids).pow(2).mean().backward()
        return {n: p.grad for n, p in model.named_parameters() if p.requires_grad}

    grouped = grads(True)
    assert calls == [2, 2]  # one node of two layers per decoder layer
    apart = grads(False)
    assert calls == [2, 2]
    for name in grouped:
        torch.testing.assert_close(grouped[name], apart[name], rtol=1e-5, atol=1e-7, msg=name)


def test_fused_mlp_is_used_in_training_and_inference_but_not_without_adapters(monkeypatch):
    import lorakit.fast.fusion as fusion

    calls = []
    monkeypatch.setattr(fusion, "lora_swiglu", lambda *a, **kw: calls.append(1) or lora_swiglu(*a, **kw))
    model = get_peft_model(tiny_llama(), LoraConfig(r=4, target_modules="all-linear", init_lora_weights=False)).train()
    ids = torch.randint(0, 100, (1, 4))
    logits(model, ids).sum().backward()
    assert len(calls) == 2  # one per layer
    model.eval()
    with torch.no_grad():
        fused = logits(model, ids)
    assert len(calls) == 4
    with model.disable_adapter():
        logits(model, ids)
    assert len(calls) == 4
    with torch.no_grad():  # inference through the fused MLP gives exactly the unfused numbers
        fusion.detach(model.base_model.model)
        assert torch.equal(logits(model, ids), fused)
    base = model.unload()
    assert all("forward" not in m.__dict__ for m in base.modules())


def test_fast_path_choice_follows_mode_and_adapter_changes():
    """The per-layer cache of the fast-path choice is keyed by the adapters asked for and train/eval,
    and dropped when adapters are added or deleted."""
    torch.manual_seed(0)
    model = get_peft_model(tiny_llama(), LoraConfig(r=4, lora_dropout=0.5, target_modules=["q_proj"],
                                                    init_lora_weights=False))
    ids = torch.randint(0, 100, (1, 6))
    layer = model.base_model.model.model.layers[0].self_attn.q_proj
    model.train()
    assert fast_adapter(layer) is None  # dropout is active in training: the general path
    assert not torch.equal(logits(model, ids), logits(model, ids))
    model.eval()
    assert fast_adapter(layer) == "default"
    eval_out = logits(model, ids)
    model.add_adapter("other", LoraConfig(r=2, target_modules=["q_proj"], init_lora_weights=False))
    model.set_adapter("other")
    assert fast_adapter(layer) == "other"
    other_out = logits(model, ids)
    assert not torch.allclose(other_out, eval_out)
    model.set_adapter("default")
    torch.testing.assert_close(logits(model, ids), eval_out)
    model.delete_adapter("other")
    model.add_adapter("other", LoraConfig(r=2, target_modules=["q_proj"], init_lora_weights=False))
    model.set_adapter("other")
    assert not torch.allclose(logits(model, ids), other_out)  # the new "other", not a cached old one


def test_fast_path_uses_parameters_replaced_after_the_plan_was_cached():
    """The cached plan holds the modules, not their tensors: parameters assigned anew (load_state_dict
    with assign=True, a user's swap) are the ones the next call runs, in inference and in training."""
    torch.manual_seed(0)
    model = get_peft_model(tiny_llama(), LoraConfig(r=4, target_modules="all-linear", init_lora_weights=False)).eval()
    ids = torch.randint(0, 100, (1, 6))
    with torch.no_grad():
        before = logits(model, ids)
    state = {k: torch.randn_like(v) for k, v in model.state_dict().items() if "lora_" in k}
    model.load_state_dict(state, strict=False, assign=True)
    with torch.no_grad():
        after = logits(model, ids)
    reference = get_peft_model(tiny_llama(), LoraConfig(r=4, target_modules="all-linear")).eval()
    reference.load_state_dict(state, strict=False)
    with torch.no_grad():
        assert not torch.allclose(after, before)
        torch.testing.assert_close(after, logits(reference, ids))
    layer = model.base_model.model.model.layers[0].mlp.down_proj
    layer.base_layer.weight = torch.nn.Parameter(torch.zeros_like(layer.base_layer.weight), requires_grad=False)
    reference.base_model.model.model.layers[0].mlp.down_proj.base_layer.weight.data.zero_()
    model.train(), reference.train()
    torch.testing.assert_close(logits(model, ids), logits(reference, ids))


def test_norm_outputs_are_remade_in_backward_with_identical_gradients(monkeypatch):
    """q/k/v and the fused MLP keep the norm's input and remake its output: the same gradients, bit for bit."""
    import lorakit.fast.recompute as recompute

    ids = torch.randint(0, 100, (2, 9), generator=torch.Generator().manual_seed(0))
    hits = []
    real_source = recompute.source

    def counting(norm, x):
        kept = real_source(norm, x)
        hits.append(kept is not None)
        return kept

    def grads():
        torch.manual_seed(1)
        model = get_peft_model(tiny_llama(), LoraConfig(r=4, target_modules="all-linear", init_lora_weights=False)).train()
        logits(model, ids).pow(2).mean().backward()
        return {n: p.grad for n, p in model.named_parameters() if p.requires_grad}

    monkeypatch.setattr(recompute, "source", counting)
    remade = grads()
    assert sum(hits) >= 3  # 2 layers: the MLPs, and q/k/v (one call for the three) after the first layer
    monkeypatch.setattr(recompute, "source", lambda norm, x: None)
    kept = grads()
    assert remade.keys() == kept.keys()
    for name in remade:
        assert torch.equal(remade[name], kept[name]), name


@pytest.mark.parametrize("reentrant", [False, True])
def test_fast_paths_under_gradient_checkpointing_give_the_same_gradients(reentrant, monkeypatch):
    """Checkpointed layers run the fused q/k/v, the fused MLP and the norm remake twice (forward,
    then again in backward): the gradients equal those of the uncheckpointed model."""
    import lorakit.fast.fusion as fusion

    calls = []
    monkeypatch.setattr(fusion, "lora_shared_input", lambda *a, **kw: calls.append("qkv") or lora_shared_input(*a, **kw))
    monkeypatch.setattr(fusion, "lora_swiglu", lambda *a, **kw: calls.append("mlp") or lora_swiglu(*a, **kw))
    ids = torch.randint(0, 100, (2, 9), generator=torch.Generator().manual_seed(0))

    def grads(checkpointing):
        torch.manual_seed(1)
        base = tiny_llama().train()
        if checkpointing:
            base.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": reentrant})
            base.enable_input_require_grads()
        model = get_peft_model(base, LoraConfig(r=4, target_modules="all-linear", init_lora_weights=False)).train()
        logits(model, ids).pow(2).mean().backward()
        return {n: p.grad for n, p in model.named_parameters() if p.requires_grad}

    plain = grads(False)
    assert sorted(calls) == ["mlp"] * 2 + ["qkv"] * 2  # two layers
    checkpointed = grads(True)
    # each layer twice more; reentrant checkpointing runs the first forward without gradients,
    # where q/k/v take their plain inference path
    assert sorted(calls) == ["mlp"] * 6 + ["qkv"] * (4 if reentrant else 6)
    assert plain.keys() == checkpointed.keys() and len(plain) == 28
    for name in plain:
        torch.testing.assert_close(checkpointed[name], plain[name], rtol=1e-5, atol=1e-7, msg=name)


def fast_adapter(layer: Linear) -> str | None:
    plan = layer.call_plan()
    return None if plan is None else plan.name


def test_fuse_false_keeps_every_layer_on_its_own_with_the_same_gradients():
    import lorakit.fast.fusion as fusion

    ids = torch.randint(0, 100, (2, 7), generator=torch.Generator().manual_seed(0))

    def grads(fuse):
        torch.manual_seed(1)
        model = get_peft_model(tiny_llama(), LoraConfig(r=4, target_modules="all-linear", init_lora_weights=False),
                               fuse=fuse).train()
        assert fusion.attached(model.base_model.model) == fuse
        logits(model, ids).pow(2).mean().backward()
        return model, {n: p.grad for n, p in model.named_parameters() if p.requires_grad}

    fused_model, fused = grads(True)
    _, plain = grads(False)
    for name in plain:
        torch.testing.assert_close(fused[name], plain[name], rtol=1e-5, atol=1e-7, msg=name)
    fusion.detach(fused_model.base_model.model)
    assert not fusion.attached(fused_model.base_model.model)
    assert all("forward" not in m.__dict__ for m in fused_model.modules())


def test_grouped_qkv_outputs_follow_the_route_of_each_call():
    """q computed under one adapter, k called under another on the same tensor: k runs its own."""
    import lorakit.fast.fusion as fusion
    from lorakit.lora.routing import use_adapters

    torch.manual_seed(0)
    model = get_peft_model(tiny_llama(), LoraConfig(r=4, target_modules=["q_proj", "k_proj"], init_lora_weights=False))
    model.add_adapter("other", LoraConfig(r=4, target_modules=["q_proj", "k_proj"], init_lora_weights=False))
    model.train()
    attn = model.base_model.model.model.layers[0].self_attn
    x = torch.randn(1, 3, 32, requires_grad=True)
    with use_adapters(["default"]):
        attn.q_proj(x)
    with use_adapters(["other"]):
        got = attn.k_proj(x)
    fusion.detach(model.base_model.model)
    with use_adapters(["other"]):
        expected = attn.k_proj(x)
    torch.testing.assert_close(got, expected, rtol=0, atol=0)
