"""LoftQ starts (init_lora_weights="loftq"): the math against the SVD's optimum and against the
published loop run with bitsandbytes' quantizer (PEFT's own loftq_init needs CUDA), the 4-bit
base it rewrites, and the refusals that leave a model untouched."""

from __future__ import annotations

import json

import pytest
import torch
from torch import nn

from fourbit import four_bit_layers, quantized
from lorakit import LoftQConfig, LoraConfig, PeftModel, get_peft_model, load_model
from lorakit.bases import quant4
from lorakit.lora.loftq import loftq_factors
from tinymodels import save_tiny_model, tiny_llama

pytestmark = pytest.mark.filterwarnings("ignore:_check_is_size:FutureWarning")

TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


def nf4_roundtrip(t: torch.Tensor) -> torch.Tensor:
    packed, absmax = quant4.quantize_4bit(t, "nf4", 64)
    return quant4.dequantize_4bit(packed, absmax, t.shape, "nf4", 64)


def loftq(iters: int, r: int = 8, alpha: float = 16) -> LoraConfig:
    return LoraConfig(r=r, lora_alpha=alpha, target_modules=TARGETS, init_lora_weights="loftq",
                      loftq_config=LoftQConfig(loftq_iter=iters))


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    return save_tiny_model(tmp_path_factory.mktemp("tiny"))


def start_error(w: torch.Tensor, stored: torch.Tensor, a: torch.Tensor, b: torch.Tensor, scaling: float) -> float:
    return (w - nf4_roundtrip(stored) - scaling * b @ a).norm().item()


# -- the math -------------------------------------------------------------------------------
def test_one_iteration_is_the_best_rank_r_fix_of_the_plain_quantization():
    torch.manual_seed(0)
    w = torch.randn(48, 128)
    stored, a, b = loftq_factors(w, nf4_roundtrip, rank=6, iters=1, scaling=2.0)
    assert torch.equal(stored, w)  # the base is the plain quantization of W
    residual = w - nf4_roundtrip(w)
    singular = torch.linalg.svdvals(residual)
    # Eckart-Young: the error left is the energy of the singular values past the rank
    assert (residual - 2.0 * b @ a).norm().item() == pytest.approx(singular[6:].square().sum().sqrt().item(), rel=1e-4)
    assert torch.linalg.matrix_rank(b @ a).item() == 6
    assert torch.allclose(a.norm(dim=1), b.norm(dim=0), rtol=1e-4)  # the singular values split evenly


def test_more_iterations_start_nearer_the_weight():
    torch.manual_seed(1)
    w = torch.randn(64, 96) * torch.rand(1, 96) * 3  # columns of different scale, as trained weights have
    plain = (w - nf4_roundtrip(w)).norm().item()
    errors = [start_error(w, *loftq_factors(w, nf4_roundtrip, 8, t, 0.5), 0.5) for t in (1, 3, 6)]
    assert errors[0] < plain and errors[2] < errors[1] < errors[0]


def test_ranks_past_the_matrix_are_zero():
    w = torch.randn(4, 64)
    stored, a, b = loftq_factors(w, nf4_roundtrip, rank=8, iters=2, scaling=1.0)
    assert a.shape == (8, 64) and b.shape == (4, 8)
    assert not a[4:].any() and not b[:, 4:].any()
    assert torch.allclose(nf4_roundtrip(stored) + b @ a, w, atol=1e-5)  # rank 4 holds the whole residual


def test_the_loop_is_loftq_run_with_bitsandbytes_quantizer():
    bf = pytest.importorskip("bitsandbytes.functional")
    torch.manual_seed(2)
    w = torch.randn(32, 128)

    def bnb_roundtrip(t):
        packed, state = bf.quantize_4bit(t, quant_type="nf4", blocksize=64)
        return bf.dequantize_4bit(packed, state)

    target = w  # the published loop (arXiv:2310.08659, Algorithm 1) on bitsandbytes' NF4
    for _ in range(3):
        stored_ref = target
        u, s, vh = torch.linalg.svd(w - bnb_roundtrip(target), full_matrices=False)
        low = (u[:, :4] * s[:4]) @ vh[:4]
        target = w - low
    stored, a, b = loftq_factors(w, nf4_roundtrip, rank=4, iters=3, scaling=2.0)
    codes = bf.quantize_4bit(stored_ref, quant_type="nf4", blocksize=64)[0]
    assert torch.equal(quant4.quantize_4bit(stored, "nf4", 64)[0].view(-1), codes.view(-1))
    assert torch.allclose(stored, stored_ref, atol=1e-5)
    assert torch.allclose(2.0 * b @ a, low, atol=1e-5)


# -- on a model -----------------------------------------------------------------------------
def base_codes(model: nn.Module) -> dict[str, torch.Tensor]:
    return {n.replace(".base_layer", ""): m.weight.clone() for n, m in four_bit_layers(model).items()}


def test_a_4bit_base_read_from_its_checkpoint_starts_nearer_the_dense_model(checkpoint):
    x = torch.randint(0, 250, (2, 10))
    with torch.no_grad():
        reference = load_model(str(checkpoint))[0](x).logits
        plain, _ = load_model(str(checkpoint), quantization="nf4")
        gaps = {0: (plain(x).logits - reference).abs().mean()}
        for iters in (1, 4):
            model, _ = load_model(str(checkpoint), quantization="nf4")
            peft = get_peft_model(model, loftq(iters))
            gaps[iters] = (peft(x).logits - reference).abs().mean()
            rewritten = {n for n, c in base_codes(model).items() if not torch.equal(c, base_codes(plain)[n])}
            assert bool(rewritten) == (iters > 1)  # one iteration keeps the plain base; more rewrite it
            assert all(m.double_quant for m in four_bit_layers(model).values())  # the layer's own settings
    assert gaps[4] < gaps[1] < gaps[0]


def test_a_dense_base_gets_its_weight_dequantized_as_peft_does():
    model = tiny_llama()
    w = model.model.layers[0].mlp.up_proj.weight.detach().clone()
    get_peft_model(model, loftq(2, r=4, alpha=8))
    layer = model.model.layers[0].mlp.up_proj
    stored, a, b = loftq_factors(w, nf4_roundtrip, 4, 2, 2.0)
    assert torch.equal(layer.base_layer.weight, nf4_roundtrip(stored))
    assert torch.equal(layer.lora_A["default"].weight, a) and torch.equal(layer.lora_B["default"].weight, b)
    start = layer.base_layer.weight + 2.0 * layer.lora_B["default"].weight @ layer.lora_A["default"].weight
    assert (start - w).norm() < (nf4_roundtrip(w) - w).norm()


def test_the_adapter_trains_from_its_start(checkpoint):
    model, _ = load_model(str(checkpoint), quantization="nf4")
    peft = get_peft_model(model, loftq(2))
    trainable = [n for n, p in peft.named_parameters() if p.requires_grad]
    assert trainable and all("lora_" in n for n in trainable)
    x = torch.randint(0, 250, (2, 10))
    peft(x, labels=x).loss.backward()
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in peft.parameters() if p.requires_grad)


def test_the_saved_adapter_loads_without_running_loftq_again(checkpoint, tmp_path):
    model, _ = load_model(str(checkpoint), quantization="nf4")
    peft = get_peft_model(model, loftq(1))
    peft.save_pretrained(tmp_path / "a")
    saved = json.loads((tmp_path / "a" / "adapter_config.json").read_text())
    assert saved["init_lora_weights"] is True and saved["loftq_config"] == {}
    x = torch.randint(0, 250, (1, 8))
    fresh, _ = load_model(str(checkpoint), quantization="nf4")  # one iteration: the plain 4-bit base
    with torch.no_grad():
        torch.testing.assert_close(PeftModel.from_pretrained(fresh, tmp_path / "a")(x).logits, peft(x).logits)
    peft_lib = pytest.importorskip("peft")
    assert peft_lib.LoraConfig.from_pretrained(tmp_path / "a").init_lora_weights is True

    # a file that still says "loftq" (as PEFT writes it) loads its weights, on a base LoftQ could not start from
    saved.update(init_lora_weights="loftq", loftq_config={"loftq_bits": 4, "loftq_iter": 1})
    (tmp_path / "a" / "adapter_config.json").write_text(json.dumps(saved))
    in_memory = quantized(load_model(str(checkpoint))[0], double_quant=True)
    with torch.no_grad():
        torch.testing.assert_close(PeftModel.from_pretrained(in_memory, tmp_path / "a")(x).logits, peft(x).logits)


# -- refusals -------------------------------------------------------------------------------
@pytest.mark.parametrize("bad, message", [
    ({"loftq_bits": 8}, r"^loftq_config\.loftq_bits: lorakit's LoftQ quantizes to 4 bits, got 8$"),
    ({"loftq_iter": 0}, r"^loftq_config\.loftq_iter: must be an integer >= 1, got 0$"),
    ({"loftq_iters": 2}, r"^loftq_config: unknown key 'loftq_iters' \(known: loftq_bits, loftq_iter\)$"),
    ("nf4", r"^loftq_config: must be a LoftQConfig or a dict, got str$"),
])
def test_bad_loftq_configs_name_the_key(bad, message):
    with pytest.raises(ValueError, match=message):
        LoraConfig(init_lora_weights="loftq", loftq_config=bad)


def test_a_loftq_config_without_loftq_is_ignored_with_a_warning_as_peft_does():
    with pytest.warns(UserWarning, match="^loftq_config is ignored unless init_lora_weights='loftq'$"):
        assert LoraConfig(loftq_config={"loftq_iter": 2}).loftq_config == {}
    assert LoraConfig(init_lora_weights="loftq").loftq_config == {"loftq_bits": 4, "loftq_iter": 1}


def state(model: nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.clone() for k, v in model.state_dict().items()}


@pytest.mark.parametrize("make, message", [
    (lambda ckpt: quantized(tiny_llama()),  # quantized in memory: the 16/32-bit weights are gone
     r"^init_lora_weights='loftq': model\.layers\.0\.self_attn\.q_proj holds no 16/32-bit weight to start from "
     r"\(quantized in memory or read from a 4-bit directory\); load the model with lorakit\.load_model"),
    (lambda ckpt: get_peft_model(load_model(str(ckpt), quantization="nf4")[0], loftq(1)).get_base_model(),
     r"^init_lora_weights='loftq': model\.layers\.0\.self_attn\.q_proj already carries an adapter; LoftQ rewrites"),
])
def test_bases_loftq_cannot_start_from_are_refused_untouched(checkpoint, make, message):
    model = make(checkpoint)
    before = state(model)
    with pytest.raises(ValueError, match=message) as err:
        get_peft_model(model, loftq(2)) if not hasattr(model, "_lorakit_owner") else \
            model._lorakit_owner.add_adapter("second", loftq(2))
    assert "\n" not in str(err.value)
    after = state(model)
    assert before.keys() == after.keys() and all(torch.equal(before[k], after[k]) for k in before)
