"""The memory formulas: activations tensor by tensor against autograd, and the byte rules per component."""

from __future__ import annotations

import pytest
import torch

from lorakit import LoraConfig, get_peft_model
from lorakit.estimate import activations as A
from lorakit.estimate import estimate
from lorakit.estimate import memory as M
from lorakit.estimate.loss import fused_loss_bytes
from lorakit.estimate.params import decoder_shape
from lorakit.fast.loss import causal_lm_loss

BATCH, SEQ = 2, 24


def _tiny_llama(dtype: torch.dtype):
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    config = LlamaConfig(hidden_size=64, intermediate_size=160, num_hidden_layers=3, num_attention_heads=4,
                         num_key_value_heads=2, vocab_size=1000, max_position_embeddings=64)
    return LlamaForCausalLM(config).to(dtype).train()


def _saved_tensors(node) -> list:
    """What one autograd node keeps: `_saved_*` attributes, or a custom Function's saved_tensors."""
    if hasattr(node, "saved_tensors"):
        return list(node.saved_tensors)
    found = []
    for attr in dir(node):
        if attr.startswith("_saved_"):
            value = getattr(node, attr)
            found.extend(value if isinstance(value, (tuple, list)) else [value])
    return found


def _saved_bytes(loss: torch.Tensor, params: set[int]) -> int:
    """Bytes of the distinct non-scalar tensors autograd keeps for backward (parameters excluded)."""
    seen: dict[int, int] = {}
    stack, visited = [loss.grad_fn], set()
    while stack:
        node = stack.pop()
        if node is None or node in visited:
            continue
        visited.add(node)
        stack.extend(next_node for next_node, _ in node.next_functions)
        for tensor in _saved_tensors(node):
            if isinstance(tensor, torch.Tensor) and tensor.dim() > 0:
                storage = tensor.untyped_storage()
                if storage.data_ptr() not in params:
                    seen[storage.data_ptr()] = storage.nbytes()
    return sum(seen.values())


CASES = [
    (torch.float32, None),
    (torch.float32, ["q_proj", "v_proj"]),
    (torch.float32, ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]),
    (torch.bfloat16, None),
    (torch.bfloat16, ["q_proj", "k_proj", "v_proj", "o_proj", "down_proj"]),
    (torch.bfloat16, ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]),
]


@pytest.mark.parametrize("dtype,targets", CASES,
                         ids=["fp32-full", "fp32-qv", "fp32-all", "bf16-full", "bf16-qkvo-down", "bf16-all"])
def test_activation_formula_equals_what_autograd_keeps(dtype, targets, monkeypatch):
    """lorakit's training forward (its loss, its LoRA layers): every byte autograd keeps is counted,
    for a device with native 16-bit products (a GPU: what the estimate sizes)."""
    monkeypatch.setattr("lorakit.bases.compute._cpu_has", lambda flags: True)
    model = _tiny_llama(dtype)
    shape = decoder_shape(model.config)
    adapted = None
    if targets is not None:
        model = get_peft_model(model, LoraConfig(r=4, lora_alpha=8, target_modules=targets))
        adapted = {name: 4 for name in targets}
    ids = torch.randint(0, 1000, (BATCH, SEQ), generator=torch.Generator().manual_seed(0))
    loss, _ = causal_lm_loss(model, {"input_ids": ids, "labels": ids})
    params = {p.untyped_storage().data_ptr() for p in model.parameters()}
    b = torch.finfo(dtype).bits // 8
    expected = A.activation_bytes(shape, BATCH, SEQ, b, adapted, checkpointing=False).kept
    scored = BATCH * (SEQ - 1)
    loss_kept = b * scored * shape.hidden  # the hidden-state gradient, made in forward
    if targets is None:
        loss_kept += 4 * shape.vocab * shape.hidden  # and the head's, in fp32
    assert _saved_bytes(loss, params) == expected + loss_kept


def test_chunked_loss_never_holds_whole_logits():
    shape = A.Shape(hidden=4096, intermediate=14336, layers=32, heads=32, kv_heads=8, head_dim=128, vocab=128256)
    eight = fused_loss_bytes(shape, batch=8, seq=4096, b=2, head_trains=False)
    assert eight < 8 * 4095 * shape.vocab * 4 / 4  # under a quarter of the whole fp32 logits
    sixteen = fused_loss_bytes(shape, batch=16, seq=4096, b=2, head_trains=False)
    # more rows add hidden states, their flattened copy and their gradient, not logits
    assert sixteen - eight == 2 * 8 * shape.hidden * (4096 + 4095 + 4095)


def test_checkpointing_keeps_layer_inputs_and_recomputes_one_layer():
    shape = A.Shape(hidden=4096, intermediate=14336, layers=32, heads=32, kv_heads=8, head_dim=128, vocab=128256)
    plain = A.activation_bytes(shape, 1, 2048, 2, None, checkpointing=False)
    ckpt = A.activation_bytes(shape, 1, 2048, 2, None, checkpointing=True)
    inputs = 32 * 2048 * 4096 * 2
    outside = A.outside_layers_bytes(shape, 1, 2048, 2, full=True)
    assert ckpt.kept == inputs + outside
    assert ckpt.recompute == A.full_layer_bytes(shape, 2048, 2)
    assert plain.recompute == 0 and plain.kept > 10 * ckpt.most


@pytest.mark.parametrize("optimizer,param_bytes,master,per_param", [
    ("adamw", 4, True, 8),  # fp32: two fp32 moments, no separate master copy
    ("adamw", 4, False, 8),
    ("adamw", 2, False, 4),  # the seed: 16-bit states, "double the weights"
    ("adamw", 2, True, 12),  # mixed precision: fp32 master + two fp32 moments (ZeRO's K=12)
    ("adamw8bit", 2, False, 2),
    ("adamw8bit", 2, True, 6),
    ("sgd", 2, False, 0),
    ("sgd", 2, True, 4),
])
def test_optimizer_bytes_per_parameter(optimizer, param_bytes, master, per_param):
    assert M.optimizer_bytes(1000, optimizer, param_bytes, master) == 1000 * per_param


def test_nf4_costs_what_the_qlora_paper_says():
    assert M.NF4_BITS == pytest.approx(4.127, abs=5e-4)  # "0.127 bits per parameter" of constants
    n = 4096 * 4096  # a large layer: the per-layer offset and map are noise
    assert 8 * M.linear4bit_bytes(n) / n == pytest.approx(M.NF4_BITS, abs=1e-3)
    assert 8 * M.linear4bit_bytes(n, double_quant=False) / n == pytest.approx(4.5)


@pytest.mark.parametrize("double_quant", [True, False])
@pytest.mark.parametrize("shape", [(16, 32), (48, 33), (1000, 300)])  # blocks that do and do not fill up
def test_4bit_bytes_are_what_linear4bit_holds(shape, double_quant):
    from lorakit.bases.linear4bit import Linear4bit

    layer = Linear4bit(shape[1], shape[0], bias=False, double_quant=double_quant)
    held = sum(b.nbytes for b in layer.buffers())
    assert M.linear4bit_bytes(shape[0] * shape[1], double_quant) == held


@pytest.mark.parametrize("double_quant", [True, False])
def test_qlora_weights_are_the_quantized_models_bytes(double_quant):
    """The weights row of a QLoRA estimate: a real model quantized by lorakit, tensor by tensor."""
    from tinymodels import tiny_llama

    from lorakit import LoraConfig, get_peft_model
    from lorakit.bases.quant_config import QuantConfig
    from lorakit.models.quantize import quantize_model

    model = tiny_llama()
    config = {**model.config.to_dict(), "model_type": "llama"}
    rotary = sum(b.nbytes for b in model.buffers())  # inv_freq: not a weight
    quantize_model(model, QuantConfig(double_quant=double_quant))
    peft = get_peft_model(model, LoraConfig(r=4, target_modules=["q_proj", "v_proj"]))
    held = sum(t.nbytes for t in {id(t): t for t in [*peft.parameters(), *peft.buffers()]}.values()) - rotary
    e = estimate(config, "qlora", rank=4, targets="q_proj,v_proj", dtype="fp32", double_quant=double_quant)
    assert e.memory.weights == held


def test_qlora_transient_is_one_layer_in_the_product_dtype(monkeypatch):
    """The largest 4-bit weight de-quantized: in bf16 on a GPU; on a CPU without bf16 instructions
    de-quantized to bf16 and then cast to fp32 for the product."""
    from lorakit.bases import compute
    from lorakit.estimate.presets import load_config_dict

    # a small vocabulary: the last layer's backward, not the loss, is the peak, so the transient shows
    config = {**load_config_dict("llama-3.2-1b")[1], "vocab_size": 512}
    args = dict(targets="all-linear", batch_size=1, seq_len=512)
    lora = estimate(config, "lora", **args)
    gpu = estimate(config, "qlora", **args)
    largest = 2048 * 8192
    assert gpu.memory.activations == lora.memory.activations  # the same fused paths run on a 4-bit base
    assert gpu.memory.total - gpu.memory.weights == lora.memory.total - lora.memory.weights + 2 * largest
    monkeypatch.setattr(compute, "_cpu_has", lambda flags: False)
    cpu = estimate(config, "qlora", **args, device="cpu")
    assert cpu.memory.total - gpu.memory.total == 4 * largest and "fp32 product" in cpu.assumptions
    fp32 = estimate(config, "qlora", **args, compute_dtype="fp32")
    assert fp32.memory.total == cpu.memory.total
    with pytest.raises(ValueError, match="^--compute-dtype"):
        estimate("llama-3.2-1b", "qlora", compute_dtype="int8")
    with pytest.raises(ValueError, match="^--device"):
        estimate("llama-3.2-1b", "qlora", device="tpu")


def test_full_fine_tuning_peak_is_the_optimizer_step_and_lora_peak_is_backward():
    full = estimate("llama-3.1-8b", "full", seq_len=512)
    m = full.memory
    assert m.total == m.weights + m.optimizer_states + m.gradients  # gradients outweigh activations + loss
    lora = estimate("llama-3.2-1b", "lora", seq_len=512)
    m = lora.memory
    assert m.total == m.weights + m.optimizer_states + m.activations + m.logits_loss


def test_memory_grows_with_tokens_and_rank():
    small = estimate("llama-3.2-1b", "lora", seq_len=2048)
    long = estimate("llama-3.2-1b", "lora", seq_len=4096)
    assert long.memory.activations == 2 * small.memory.activations
    # the chunked loss grows by the hidden states and their gradient only (bf16, hidden 2048)
    assert long.memory.logits_loss - small.memory.logits_loss == 2 * 2048 * (2048 + 2048)
    wide = estimate("llama-3.2-1b", "lora", seq_len=2048, rank=64)
    assert wide.params.trainable == 4 * small.params.trainable
    assert wide.adapter_file_bytes > 3.9 * small.adapter_file_bytes


def test_peak_is_the_larger_end_of_backward():
    acts = A.Activations(kept=3, recompute=1)
    # start of backward: kept + max(loss, head gradient + recomputed layer) = 3 + 4
    assert M.peak_bytes(10, 5, 20, acts, loss=4, head_gradient=2) == 10 + 20 + 7
    # ... + the last layer's backward under way, where it outgrows the loss: 3 + (2 + 1 + 2)
    working = A.Activations(kept=3, recompute=1, working=2)
    assert M.peak_bytes(10, 5, 20, working, loss=4, head_gradient=2) == 10 + 20 + 8
    # end of backward: gradients + a tied embedding's second gradient = 5 + 3
    assert M.peak_bytes(10, 5, 20, acts, loss=4, head_gradient=2, late_gradient=3) == 10 + 20 + 8


def test_tied_embeddings_add_their_second_gradient_at_the_end():
    """smollm2 ties its head to the embedding: backward makes the (vocab x hidden) gradient twice."""
    e = estimate("smollm2-135m", "full", dtype="fp32", batch_size=1, seq_len=64, gradient_checkpointing=True)
    head = 49152 * 576 * 4
    assert e.memory.total == e.memory.weights + e.memory.optimizer_states + e.memory.gradients + head


def test_fused_mlp_counts_for_lorakit_lora_and_qlora():
    """LoRA on gate, up and down: two (tokens, intermediate) tensors fewer per layer, minus the stacked
    [A_gate; A_up] kept once per layer; on lorakit's own 4-bit base too."""
    shape = A.Shape(hidden=4096, intermediate=14336, layers=32, heads=32, kv_heads=8, head_dim=128, vocab=128256)
    adapted = {n: 16 for n in ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")}
    fused = A.activation_bytes(shape, 1, 2048, 2, adapted, checkpointing=False)
    plain = A.activation_bytes(shape, 1, 2048, 2, adapted, checkpointing=False, fused_blocks=False)
    assert plain.kept - fused.kept == 32 * (2048 * 2 * 2 * shape.intermediate - 4 * 32 * shape.hidden)
    lora = estimate("llama-3.1-8b", "lora", targets="all-linear", batch_size=1, seq_len=2048)
    qlora = estimate("llama-3.1-8b", "qlora", targets="all-linear", batch_size=1, seq_len=2048)
    assert qlora.memory.activations == lora.memory.activations
