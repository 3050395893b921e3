"""The fast path's autograd functions give the plain implementation's values and gradients."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from lorakit import LoraConfig, get_peft_model
from lorakit.fast.kernels import linear_cross_entropy, lora_linear, lora_shared_input, lora_swiglu
from lorakit.lora.layers import Linear
from tinymodels import logits, tiny_gpt2, tiny_llama


@pytest.mark.parametrize("bias", [False, True])
@pytest.mark.parametrize("weight_grad", [False, True])
def test_lora_linear_matches_plain(bias, weight_grad):
    torch.manual_seed(0)
    x = torch.randn(2, 5, 8, dtype=torch.float64, requires_grad=True)
    W = torch.randn(6, 8, dtype=torch.float64, requires_grad=weight_grad)
    b = torch.randn(6, dtype=torch.float64, requires_grad=weight_grad) if bias else None
    A = torch.randn(3, 8, dtype=torch.float64, requires_grad=True)
    B = torch.randn(6, 3, dtype=torch.float64, requires_grad=True)
    fast = lora_linear(x, W, b, A, B, 0.7)
    plain = F.linear(x, W, b) + 0.7 * (x @ A.T) @ B.T
    torch.testing.assert_close(fast, plain)
    g = torch.randn_like(plain)
    inputs = [t for t in (x, W, b, A, B) if t is not None and t.requires_grad]
    torch.testing.assert_close(torch.autograd.grad(fast, inputs, g), torch.autograd.grad(plain, inputs, g))


def test_lora_linear_gradcheck():
    torch.manual_seed(0)
    args = [torch.randn(3, 4, dtype=torch.float64, requires_grad=True), torch.randn(5, 4, dtype=torch.float64),
            None, torch.randn(2, 4, dtype=torch.float64, requires_grad=True),
            torch.randn(5, 2, dtype=torch.float64, requires_grad=True), 1.5]
    assert torch.autograd.gradcheck(lora_linear, args)


@pytest.mark.parametrize("chunk", [3, 64])
@pytest.mark.parametrize("head_grad", [False, True])
def test_linear_cross_entropy_matches_plain(chunk, head_grad):
    torch.manual_seed(0)
    h = torch.randn(10, 8, dtype=torch.float64, requires_grad=True)
    W = torch.randn(13, 8, dtype=torch.float64, requires_grad=head_grad)
    y = torch.randint(0, 13, (10,))
    y[[1, 4]] = -100
    fast = linear_cross_entropy(h, W, y, chunk=chunk)
    plain = F.cross_entropy(h @ W.T, y, ignore_index=-100, reduction="sum")
    torch.testing.assert_close(fast, plain.float())
    inputs = [h, W] if head_grad else [h]
    for a, b in zip(torch.autograd.grad(fast * 0.3, inputs), torch.autograd.grad(plain * 0.3, inputs)):
        torch.testing.assert_close(a, b, rtol=1e-6, atol=1e-7)


def test_linear_cross_entropy_large_logits_and_an_all_ignored_chunk():
    # logits in the hundreds overflow a naive exp; a chunk with every label ignored adds nothing
    torch.manual_seed(0)
    h = (torch.randn(12, 8) * 30).requires_grad_(True)
    W = torch.randn(50, 8)
    y = torch.randint(0, 50, (12,))
    y[4:8] = -100
    fast = linear_cross_entropy(h, W, y, chunk=4)
    plain = F.cross_entropy(h @ W.T, y, ignore_index=-100, reduction="sum")
    assert torch.isfinite(fast)
    torch.testing.assert_close(fast, plain, rtol=1e-5, atol=1e-3)
    fast_grad, = torch.autograd.grad(fast, h)
    plain_grad, = torch.autograd.grad(plain, h)
    torch.testing.assert_close(fast_grad, plain_grad, rtol=1e-5, atol=1e-4)
    assert fast_grad[4:8].abs().sum() == 0


def test_linear_cross_entropy_runs_the_head_on_labelled_positions_only(monkeypatch):
    import lorakit.fast.kernels as kernels

    rows = []
    real = kernels._LinearCrossEntropy.apply
    monkeypatch.setattr(kernels._LinearCrossEntropy, "apply", lambda h, *rest: rows.append(len(h)) or real(h, *rest))
    torch.manual_seed(0)
    h = torch.randn(2, 6, 8, requires_grad=True)
    W = torch.randn(20, 8)
    y = torch.randint(0, 20, (2, 6))
    y[0, :4] = -100  # a prompt
    y[1, 5] = -100  # padding
    fast = linear_cross_entropy(h, W, y, chunk=4)
    plain = F.cross_entropy((h @ W.T).reshape(-1, 20), y.reshape(-1), ignore_index=-100, reduction="sum")
    torch.testing.assert_close(fast, plain)
    torch.testing.assert_close(torch.autograd.grad(fast, h)[0], torch.autograd.grad(plain, h)[0])
    assert rows == [7]
    nothing = linear_cross_entropy(h, W, torch.full_like(y, -100))
    assert nothing.item() == 0 and torch.autograd.grad(nothing, h)[0].abs().sum() == 0


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
    import lorakit.lora.layers

    calls = []
    monkeypatch.setattr(lorakit.lora.layers, "lora_linear", lambda *a: calls.append(1) or lora_linear(*a))
    model = get_peft_model(tiny_llama(), LoraConfig(r=4, target_modules=["q_proj"])).train()
    logits(model, torch.randint(0, 100, (1, 4))).sum().backward()
    assert len(calls) == 2  # one per layer


@pytest.mark.parametrize("make, targets", [(tiny_llama, ["q_proj", "down_proj"]), (tiny_gpt2, ["c_attn"])])
def test_causal_lm_loss_matches_transformers(make, targets):
    from lorakit.fast.loss import causal_lm_loss

    torch.manual_seed(0)
    model = get_peft_model(make(), LoraConfig(r=4, target_modules=targets, init_lora_weights=False)).eval()  # no GPT-2 dropout
    ids = torch.randint(0, 100, (3, 8), generator=torch.Generator().manual_seed(0))
    labels = ids.clone()
    labels[0, :3] = -100
    mask = torch.ones_like(ids)
    mask[2, 6:] = 0
    labels[2, 6:] = -100
    batch = {"input_ids": ids, "attention_mask": mask, "labels": labels}
    total, n = causal_lm_loss(model, batch)
    reference = model(**batch).loss  # transformers' mean over target tokens
    assert n == int((labels[:, 1:] != -100).sum())
    torch.testing.assert_close(total / n, reference, rtol=1e-5, atol=1e-6)
    params = [p for p in model.parameters() if p.requires_grad]
    fused = torch.autograd.grad(total / n, params)
    plain = torch.autograd.grad(model(**batch).loss, params)
    for a, b in zip(fused, plain):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-6)


@pytest.mark.parametrize("ranks", [(3, 3, 3), (2, 4, 3)])
def test_lora_swiglu_matches_plain(ranks):
    torch.manual_seed(0)
    d, inter = 8, 12
    x = torch.randn(2, 5, d, dtype=torch.float64, requires_grad=True)

    def weights(out, inp, r, s):
        return (torch.randn(out, inp, dtype=torch.float64), torch.randn(r, inp, dtype=torch.float64, requires_grad=True),
                torch.randn(out, r, dtype=torch.float64, requires_grad=True), s)

    gate, up, down = weights(inter, d, ranks[0], 0.5), weights(inter, d, ranks[1], 2.0), weights(d, inter, ranks[2], 1.5)

    def plain_linear(t, p):
        W, A, B, s = p
        return t @ W.T + s * (t @ A.T) @ B.T

    fast = lora_swiglu(x, gate, up, down)
    plain = plain_linear(F.silu(plain_linear(x, gate)) * plain_linear(x, up), down)
    torch.testing.assert_close(fast, plain)
    g = torch.randn_like(plain)
    inputs = [x] + [t for p in (gate, up, down) for t in p[1:3]]
    torch.testing.assert_close(torch.autograd.grad(fast, inputs, g), torch.autograd.grad(plain, inputs, g))


def test_lora_swiglu_beside_a_bf16_base_matches_three_lora_linears():
    """bf16 base, fp32 adapters (lorakit's layout): the same casts as `lora_linear`, so the same numbers."""
    torch.manual_seed(0)
    d, inter, r = 16, 24, 4
    x = torch.randn(2, 5, d, dtype=torch.bfloat16, requires_grad=True)

    def weights(out, inp, s):
        return (torch.randn(out, inp, dtype=torch.bfloat16) / inp**0.5, torch.randn(r, inp, requires_grad=True),
                torch.randn(out, r, requires_grad=True), s)

    gate, up, down = weights(inter, d, 0.5), weights(inter, d, 2.0), weights(d, inter, 1.5)
    fast = lora_swiglu(x, gate, up, down)
    plain = lora_linear(F.silu(lora_linear(x, gate[0], None, *gate[1:])) * lora_linear(x, up[0], None, *up[1:]),
                        down[0], None, *down[1:])
    assert fast.dtype == torch.bfloat16
    torch.testing.assert_close(fast, plain, rtol=2e-2, atol=2e-2)
    g = torch.randn_like(plain)
    inputs = [x] + [t for p in (gate, up, down) for t in p[1:3]]
    for a, b in zip(torch.autograd.grad(fast, inputs, g), torch.autograd.grad(plain, inputs, g)):
        assert a.dtype == b.dtype
        torch.testing.assert_close(a, b, rtol=3e-2, atol=3e-2 * float(b.abs().max()))


def test_lora_swiglu_gradcheck():
    torch.manual_seed(0)
    x = torch.randn(3, 4, dtype=torch.float64, requires_grad=True)

    def weights(out, inp):
        return (torch.randn(out, inp, dtype=torch.float64), torch.randn(2, inp, dtype=torch.float64, requires_grad=True),
                torch.randn(out, 2, dtype=torch.float64, requires_grad=True), 0.7)

    gate, up, down = weights(6, 4), weights(6, 4), weights(4, 6)
    assert torch.autograd.gradcheck(lambda x, *t: lora_swiglu(x, (gate[0], *t[0:2], 0.7), (up[0], *t[2:4], 0.7),
                                                              (down[0], *t[4:6], 0.7)),
                                    (x, *gate[1:3], *up[1:3], *down[1:3]))


@pytest.mark.parametrize("bias", [False, True])
def test_lora_shared_input_matches_separate_layers(bias):
    """q, k, v of different widths, ranks and scalings as one node: the values and gradients of the plain expressions."""
    torch.manual_seed(0)
    d = 8
    x = torch.randn(2, 5, d, dtype=torch.float64, requires_grad=True)

    def layer(out, r, s):
        return (torch.randn(out, d, dtype=torch.float64), torch.randn(out, dtype=torch.float64) if bias else None,
                torch.randn(r, d, dtype=torch.float64, requires_grad=True),
                torch.randn(out, r, dtype=torch.float64, requires_grad=True), s)

    layers = [layer(8, 3, 0.5), layer(4, 2, 2.0), layer(4, 5, 1.5)]
    fast = lora_shared_input(x, layers)
    plain = [F.linear(x, W, b) + s * (x @ A.T) @ B.T for W, b, A, B, s in layers]
    assert len(fast) == 3
    for a, b in zip(fast, plain):
        torch.testing.assert_close(a, b)
    gs = [torch.randn_like(p) for p in plain]
    inputs = [x] + [t for _, _, A, B, _ in layers for t in (A, B)]
    torch.testing.assert_close(torch.autograd.grad(fast, inputs, gs), torch.autograd.grad(plain, inputs, gs))
    # one output unused (autograd hands backward zeros for it), adapters of one layer frozen
    layers[1][2].requires_grad_(False)
    fast_k = lora_shared_input(x, layers)[0].sum()
    W, b, A, B, s = layers[0]
    plain_k = (F.linear(x, W, b) + s * (x @ A.T) @ B.T).sum()
    inputs = [x, layers[0][2], layers[0][3]]
    fast_grads = torch.autograd.grad(fast_k, inputs + [layers[2][3]])
    torch.testing.assert_close(fast_grads[:3], torch.autograd.grad(plain_k, inputs))
    assert not fast_grads[3].any()


def test_lora_shared_input_forward_is_lora_linear_to_the_bit():
    """Grouped or not, with gradients or without, a projection's output is the same float32 numbers."""
    torch.manual_seed(0)
    x = torch.randn(3, 7, 32, requires_grad=True)
    layers = [(torch.randn(out, 32), torch.randn(out), torch.randn(r, 32, requires_grad=True),
               torch.randn(out, r, requires_grad=True), s) for out, r, s in ((32, 8, 2.0), (16, 2, 0.5), (16, 5, 1.0))]
    grouped = lora_shared_input(x, layers)
    with torch.no_grad():
        apart = [lora_linear(x, *layer) for layer in layers]
    for a, b in zip(grouped, apart):
        assert torch.equal(a, b)


def test_lora_shared_input_gradcheck():
    torch.manual_seed(0)
    x = torch.randn(3, 4, dtype=torch.float64, requires_grad=True)
    Ws = [torch.randn(out, 4, dtype=torch.float64) for out in (5, 2)]
    params = [torch.randn(2, 4, dtype=torch.float64, requires_grad=True), torch.randn(5, 2, dtype=torch.float64, requires_grad=True),
              torch.randn(3, 4, dtype=torch.float64, requires_grad=True), torch.randn(2, 3, dtype=torch.float64, requires_grad=True)]
    assert torch.autograd.gradcheck(
        lambda x, a1, b1, a2, b2: lora_shared_input(x, [(Ws[0], None, a1, b1, 0.7), (Ws[1], None, a2, b2, 1.3)]),
        (x, *params))


def test_qkv_share_one_node_in_training_only(monkeypatch):
    import lorakit.fast.fusion as fusion

    calls = []
    monkeypatch.setattr(fusion, "lora_shared_input", lambda *a: calls.append(1) or lora_shared_input(*a))
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
    monkeypatch.setattr(fusion, "lora_shared_input", lambda x, parts, *a: calls.append(len(parts)) or lora_shared_input(x, parts, *a))
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
    monkeypatch.setattr(fusion, "lora_swiglu", lambda *a: calls.append(1) or lora_swiglu(*a))
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
    assert layer.fast_adapter() is None  # dropout is active in training: the general path
    assert not torch.equal(logits(model, ids), logits(model, ids))
    model.eval()
    assert layer.fast_adapter() == "default"
    eval_out = logits(model, ids)
    model.add_adapter("other", LoraConfig(r=2, target_modules=["q_proj"], init_lora_weights=False))
    model.set_adapter("other")
    assert layer.fast_adapter() == "other"
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
        remake, kept = real_source(norm, x)
        hits.append(remake is not None)
        return remake, kept

    def grads():
        torch.manual_seed(1)
        model = get_peft_model(tiny_llama(), LoraConfig(r=4, target_modules="all-linear", init_lora_weights=False)).train()
        logits(model, ids).pow(2).mean().backward()
        return {n: p.grad for n, p in model.named_parameters() if p.requires_grad}

    monkeypatch.setattr(recompute, "source", counting)
    remade = grads()
    assert sum(hits) >= 3  # 2 layers: the MLPs, and q/k/v (one call for the three) after the first layer
    monkeypatch.setattr(recompute, "source", lambda norm, x: (None, None))
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
    monkeypatch.setattr(fusion, "lora_shared_input", lambda *a: calls.append("qkv") or lora_shared_input(*a))
    monkeypatch.setattr(fusion, "lora_swiglu", lambda *a: calls.append("mlp") or lora_swiglu(*a))
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
