"""load_packed_gguf: a GGUF loaded with its decoder linears kept as GGUF blocks.

The tiny files are written here the way llama.cpp's converter writes a Llama: tensors renamed by
gguf's table, attn_q/attn_k rows permuted for rotary, then quantized. The reference is the same
model with every quantized weight de-quantized (gguf-py) in the model's own row order.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

gguf = pytest.importorskip("gguf")
pytest.importorskip("accelerate")

from gguf import GGMLQuantizationType as Q  # noqa: E402

from lorakit.bases.gguf_linear import GGUFLinear  # noqa: E402
from tinymodels import write_foreign_gguf  # noqa: E402
from lorakit.models.gguf_packed import load_packed_gguf, storage_bytes, unpermute_rows  # noqa: E402

LINEARS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
HEADS, KV_HEADS = 4, 2


def converter_permute(w, n_head: int):
    """llama.cpp's convert_hf_to_gguf permutation of q/k rows, in its own (forward) form."""
    return w.reshape(n_head, 2, w.shape[0] // n_head // 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def write_tiny_llama(path: Path, qtype: Q, tied: bool, seed: int = 0, family: str = "llama"):
    """Write a random 2-layer Llama (or Qwen2: q/k/v biases, rows not permuted) to `path`; return
    the reference model built from what the file holds, de-quantized, with rows in the model's order."""
    from transformers import LlamaConfig, LlamaForCausalLM, Qwen2Config, Qwen2ForCausalLM

    torch.manual_seed(seed)
    config_cls, model_cls = (Qwen2Config, Qwen2ForCausalLM) if family == "qwen2" else (LlamaConfig, LlamaForCausalLM)
    config = config_cls(vocab_size=64, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                        num_attention_heads=HEADS, num_key_value_heads=KV_HEADS, max_position_embeddings=64,
                        rms_norm_eps=1e-5, rope_theta=10000.0, tie_word_embeddings=tied)
    model = model_cls(config).eval()
    with torch.no_grad():  # biases that are not zero: their rows' order shows
        for name, param in model.named_parameters():
            if name.endswith(".bias"):
                param.copy_(torch.randn_like(param) * 0.1)
    table = gguf.get_tensor_name_map(gguf.MODEL_ARCH[family.upper()], config.num_hidden_layers)

    w = gguf.GGUFWriter(str(path), family)
    w.add_block_count(2)
    w.add_context_length(64)
    w.add_embedding_length(64)
    w.add_feed_forward_length(128)
    w.add_head_count(HEADS)
    w.add_head_count_kv(KV_HEADS)
    w.add_layer_norm_rms_eps(1e-5)
    w.add_rope_freq_base(10000.0)
    w.add_rope_dimension_count(16)
    w.add_vocab_size(64)
    w.add_tokenizer_model("gpt2")
    tokens = ["<s>", "</s>", "ab"] + [chr(ord("a") + i) for i in range(26)] + [f"<t{i}>" for i in range(35)]
    w.add_token_list(tokens)
    w.add_token_types([3, 3] + [1] * 62)
    w.add_token_merges(["a b"])
    w.add_bos_token_id(0)
    w.add_eos_token_id(1)

    reference = {}
    for name, param in model.state_dict().items():
        if tied and name == "lm_head.weight":
            continue
        gguf_name = table.get_name(name, try_suffixes=(".weight", ".bias"))
        value = param.numpy()
        if value.ndim == 1:  # norms stay F32
            w.add_tensor(gguf_name, value)
            reference[name] = param.clone()
            continue
        kind = qtype if gguf_name.startswith("blk.") else Q.Q8_0  # embeddings and head in Q8_0
        quantized = gguf.quants.quantize(value, kind)
        reference[name] = torch.from_numpy(gguf.quants.dequantize(quantized, kind).copy())
        if family == "llama" and (".attn_q." in gguf_name or ".attn_k." in gguf_name):
            # rows are whole blocks: permuting then quantizing is quantizing then permuting
            quantized = converter_permute(quantized, HEADS if ".attn_q." in gguf_name else KV_HEADS)
        w.add_tensor(gguf_name, quantized, raw_dtype=kind)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()

    model.load_state_dict(reference, strict=not tied)
    if tied:
        model.tie_weights()
    return model


@pytest.fixture(params=[(Q.Q8_0, False, "llama"), (Q.Q4_0, True, "llama"), (Q.Q4_1, True, "qwen2")],
                ids=["q8_0-untied", "q4_0-tied", "qwen2-q4_1-tied"])
def tiny(request, tmp_path: Path):
    qtype, tied, family = request.param
    path = tmp_path / f"tiny-{family}-{qtype.name}.gguf"
    return path, write_tiny_llama(path, qtype, tied, family=family), qtype


def test_unpermute_rows_inverts_the_converter():
    rows = torch.arange(8 * 3).reshape(8, 3)
    permuted = torch.from_numpy(converter_permute(rows.numpy(), 2))
    assert not torch.equal(permuted, rows)
    assert torch.equal(unpermute_rows(permuted, 2), rows)
    # head 0 of 2: 4 rows = (2, half=2); file row (d, s) holds model row (s, d)
    assert permuted[:4, 0].tolist() == [0, 6, 3, 9]


def test_packed_logits_equal_the_dequantized_dense_model(tiny):
    path, reference, qtype = tiny
    model, tokenizer = load_packed_gguf(path)
    for name, module in model.named_modules():
        if name.rsplit(".", 1)[-1] in LINEARS:
            assert isinstance(module, GGUFLinear), name
            assert module.qtype == qtype
    assert not any(isinstance(m, GGUFLinear) for m in (model.lm_head, model.model.embed_tokens))
    assert (model.lm_head.weight is model.model.embed_tokens.weight) == reference.config.tie_word_embeddings
    assert tokenizer.pad_token_id is not None

    ids = torch.tensor([[0, 3, 7, 11, 2, 40, 5, 1]])
    with torch.no_grad():
        got, want = model(ids).logits, reference(ids).logits
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)


def test_packed_logits_equal_the_dense_conversions(tiny, tmp_cache):
    """The other way lorakit reads the file: transformers' de-quantized conversion (load_model)."""
    from lorakit.models import load_model

    path, _, _ = tiny
    packed, _ = load_model(str(path), packed=True, device="cpu", dtype="float32")
    dense, _ = load_model(str(path), device="cpu", dtype="float32")
    assert not any(isinstance(m, GGUFLinear) for m in dense.modules())
    ids = torch.tensor([[0, 3, 7, 11, 2, 40, 5, 1]])
    with torch.no_grad():
        got, want = packed(ids).logits, dense(ids).logits
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)


def test_packed_layers_hold_the_file_bytes_unpermuted(tiny):
    path, reference, qtype = tiny
    model, _ = load_packed_gguf(path)
    attn = model.model.layers[1].self_attn
    for module, ref in ((attn.q_proj, reference.model.layers[1].self_attn.q_proj),
                        (attn.k_proj, reference.model.layers[1].self_attn.k_proj)):
        want = gguf.quants.quantize(ref.weight.detach().numpy(), qtype)  # exact: the values are on the grid
        assert module.blocks.dtype == torch.uint8
        assert torch.equal(module.blocks, torch.from_numpy(want))


def test_packed_model_trains_only_adapters(tiny):
    from lorakit import LoraConfig, get_peft_model

    path, _, _ = tiny
    model, _ = load_packed_gguf(path)
    peft = get_peft_model(model, LoraConfig(r=4, lora_alpha=8, target_modules=list(LINEARS)))
    before = {n: p.detach().clone() for n, p in peft.named_parameters()}
    blocks = {n: b.clone() for n, b in peft.named_buffers() if n.endswith("blocks")}
    trainable = [p for p in peft.parameters() if p.requires_grad]
    assert trainable and all("lora_" in n for n, p in peft.named_parameters() if p.requires_grad)

    opt = torch.optim.AdamW(trainable, lr=1e-2)
    ids = torch.tensor([[0, 3, 7, 11, 2, 40, 5, 1]])
    loss = peft(input_ids=ids, labels=ids).loss
    assert torch.isfinite(loss)
    loss.backward()
    opt.step()

    moved = {n for n, p in peft.named_parameters() if not torch.equal(p, before[n])}
    assert moved and all("lora_" in n for n in moved)
    assert any("lora_B" in n for n in moved)
    assert all(torch.equal(b, blocks[n]) for n, b in peft.named_buffers() if n in blocks)


def test_load_model_packed_routes_gguf_files(tiny):
    from lorakit.models import load_model

    path, _, _ = tiny
    model, _ = load_model(str(path), packed=True, device="cpu", dtype="float32")
    assert isinstance(model.model.layers[0].mlp.down_proj, GGUFLinear)
    assert not model.training


def test_load_model_packed_refuses_what_is_not_gguf(tiny_model_dir: Path):
    from lorakit.models import load_model

    with pytest.raises(ValueError, match="packed=True loads a .gguf file"):
        load_model(str(tiny_model_dir), packed=True)


def test_unknown_architecture_is_refused(tmp_path: Path):
    path = write_foreign_gguf(tmp_path / "other.gguf")
    with pytest.raises(ValueError, match="architectures llama, qwen2, not 'mamba'"):
        load_packed_gguf(path)


@pytest.mark.slow
def test_embedded_model_packed_equals_the_dense_conversion():
    from lorakit.models import builtin_gguf_path, load_model

    path = builtin_gguf_path("smollm2-135m")
    packed, tokenizer = load_packed_gguf(path)
    dense, _ = load_model("smollm2-135m", dtype="float32", device="cpu")
    ids = tokenizer("The capital of France is", return_tensors="pt").input_ids
    with torch.no_grad():
        got, want = packed(ids).logits, dense(ids).logits
    torch.testing.assert_close(got, want, rtol=0, atol=1e-4)

    linears = [m for m in packed.modules() if isinstance(m, GGUFLinear)]
    assert len(linears) == 7 * packed.config.num_hidden_layers
    file_bytes = {t.name: int(t.n_bytes) for t in gguf.GGUFReader(path).tensors}
    assert sum(m.blocks.numel() for m in linears) == sum(file_bytes[m.name] for m in linears)
    # the dense parameters left: embeddings (tied head) and norms, in fp32
    dense_rest = sum(p.numel() * 4 for n, p in packed.named_parameters())
    packed_total = storage_bytes(packed)
    assert packed_total <= sum(m.blocks.numel() for m in linears) + dense_rest + sum(
        b.numel() * b.element_size() for n, b in packed.named_buffers() if not n.endswith("blocks"))
    assert packed_total < storage_bytes(dense) / 2.5


def test_generation_and_mixed_adapter_batches_on_a_packed_base_equal_the_dense_reference(tiny):
    """Inference over the blocks: greedy generation and a batch whose rows use different adapters
    (and none) give the tokens and logits of the same adapters on the de-quantized dense model."""
    from lorakit import LoraConfig, get_peft_model

    path, reference, _ = tiny
    packed, _ = load_packed_gguf(path)
    config = LoraConfig(r=4, lora_alpha=8, target_modules=list(LINEARS), init_lora_weights=False)
    models = []
    for base in (packed, reference):  # the same seeds: the same adapters on both bases
        torch.manual_seed(1)
        model = get_peft_model(base, config, adapter_name="a")
        torch.manual_seed(2)
        model.add_adapter("b", config)
        models.append(model.eval())
    row = [0, 3, 7, 11, 2, 40]
    ids = torch.tensor([row, row, row])
    routes = ["a", "__base__", "b"]
    with torch.no_grad():
        got, want = (m(ids, adapter_names=routes).logits for m in models)
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
        assert min((got[0] - got[1]).abs().max(), (got[2] - got[1]).abs().max()) > 1e-3  # each route its own
        new = [m.generate(input_ids=ids, max_new_tokens=6, do_sample=False, adapter_names=routes) for m in models]
    assert torch.equal(new[0], new[1]) and new[0].shape == (3, 12)
