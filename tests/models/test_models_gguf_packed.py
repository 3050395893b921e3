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
from ggufmodels import HEADS, LINEARS, converter_permute, write_tiny_llama  # noqa: E402
from tinymodels import write_foreign_gguf  # noqa: E402
from lorakit.models.gguf_packed import load_packed_gguf, storage_bytes, unpermute_rows  # noqa: E402

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
    dense, _ = load_model(str(path), device="cpu", dtype="float32", packed=False)
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
    dense, _ = load_model("smollm2-135m", dtype="float32", device="cpu", packed=False)
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


def test_load_model_keeps_the_blocks_by_default_and_dense_on_request(tiny, tmp_cache):
    from lorakit.models import load_model

    path, _, _ = tiny
    assert isinstance(load_model(str(path))[0].model.layers[0].mlp.up_proj, GGUFLinear)
    assert not any(isinstance(m, GGUFLinear) for m in load_model(str(path), packed=False)[0].modules())
    quantized = load_model(str(path), quantization="nf4")[0]  # 4 bits quantize the dense conversion
    assert not any(isinstance(m, GGUFLinear) for m in quantized.modules())


def test_generate_and_serve_take_gguf_base(tiny, tmp_cache, capsys):
    from lorakit.cli import main

    path, _, _ = tiny
    answers = {}
    for choice in ("auto", "packed", "dense"):
        assert main(["generate", "--model", str(path), "--gguf-base", choice, "--prompt", "abcab",
                     "--max-new-tokens", "5", "--no-chat"]) == 0
        answers[choice] = capsys.readouterr().out
    assert answers["auto"] == answers["packed"] == answers["dense"] and answers["auto"].strip()
    assert main(["serve", "--model", str(path), "--gguf-base", "blocks"]) == 2
    assert "argument --gguf-base: invalid choice: 'blocks'" in capsys.readouterr().err
