"""Tiny GGUF models for tests, written the way llama.cpp's converter writes a Llama: tensors renamed
by gguf's table, attn_q/attn_k rows permuted for rotary, then quantized."""

from __future__ import annotations

from pathlib import Path

import torch

LINEARS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
HEADS, KV_HEADS = 4, 2


def converter_permute(w, n_head: int):
    """llama.cpp's convert_hf_to_gguf permutation of q/k rows, in its own (forward) form."""
    return w.reshape(n_head, 2, w.shape[0] // n_head // 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def write_tiny_llama(path: Path, qtype, tied: bool, seed: int = 0, family: str = "llama"):
    """Write a random 2-layer Llama (or Qwen2: q/k/v biases, rows not permuted) to `path`; return
    the reference model built from what the file holds, de-quantized, with rows in the model's order."""
    import gguf
    from gguf import GGMLQuantizationType as Q
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


SPM_CORPUS = [
    "the quick brown fox jumps over the lazy dog", "table for two on saturday at eight",
    "hello world, hello there", "a reservation for three people tonight", "the dog and the fox",
    "name: Ada Li, guests: 4, day: Friday", "over and over the lazy days go by",
]


def spm_tokenizer(prepend_space: bool = True, vocab_size: int = 360):
    """A SentencePiece-style tokenizer as transformers writes Llama 2's (prepend_space) or Gemma's:
    BPE over text whose spaces are "▁", byte fallback to <0xNN> pieces, <unk> <s> </s>, BOS added.
    Trained here on a few sentences, its pieces never spanning two words (as SentencePiece's)."""
    from tokenizers import Tokenizer, decoders, models, normalizers, pre_tokenizers, processors, trainers
    from transformers import PreTrainedTokenizerFast

    space = "\u2581"
    specials = ["<unk>", "<s>", "</s>"]
    trainer_tok = Tokenizer(models.BPE(unk_token="<unk>"))
    trainer_tok.normalizer = normalizers.Replace(" ", space)
    trainer_tok.pre_tokenizer = pre_tokenizers.Metaspace(replacement=space, prepend_scheme="first", split=True)
    trainer_tok.train_from_iterator(SPM_CORPUS, trainers.BpeTrainer(
        vocab_size=vocab_size - 256, special_tokens=specials, show_progress=False))
    import json

    trained = json.loads(trainer_tok.to_str())["model"]
    pieces = [p for p, _ in sorted(trained["vocab"].items(), key=lambda kv: kv[1]) if p not in specials]
    vocab = {p: i for i, p in enumerate(specials + [f"<0x{b:02X}>" for b in range(256)] + pieces)}
    merges = [tuple(m.split(" ")) if isinstance(m, str) else tuple(m) for m in trained["merges"]]
    core = Tokenizer(models.BPE(vocab=vocab, merges=merges, unk_token="<unk>", byte_fallback=True, fuse_unk=True))
    steps = [normalizers.Prepend(space)] if prepend_space else []
    core.normalizer = normalizers.Sequence([*steps, normalizers.Replace(" ", space)])
    core.decoder = decoders.Sequence([decoders.Replace(space, " "), decoders.ByteFallback(), decoders.Fuse(),
                                      *([decoders.Strip(" ", 1, 0)] if prepend_space else [])])
    core.post_processor = processors.TemplateProcessing(single="<s> $A", pair="<s> $A <s> $B",
                                                        special_tokens=[("<s>", 1)])
    core.add_special_tokens(specials)
    return PreTrainedTokenizerFast(tokenizer_object=core, unk_token="<unk>", bos_token="<s>", eos_token="</s>",
                                   pad_token="</s>")
