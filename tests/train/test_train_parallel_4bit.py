"""train.parallel with a 4-bit base: FSDP refuses in one line before anything is wrapped; DDP
(a one-process gloo group here, no torchrun) trains it with the gradients of the plain model."""

from __future__ import annotations

import copy

import pytest
import torch
import torch.distributed as dist

from lorakit import LoraConfig, get_peft_model
from lorakit.train import parallel
from lorakit.train.world import World
from fourbit import quantized
from tinymodels import tiny_llama

IDS = torch.randint(0, 100, (2, 9), generator=torch.Generator().manual_seed(0))


def loss_fn(model, batch):
    out = model(input_ids=batch["input_ids"], labels=batch["input_ids"])
    return out.loss, batch["input_ids"].numel()


def four_bit_peft():
    torch.manual_seed(0)
    model = quantized(tiny_llama(), quant_type="nf4", double_quant=True)
    return get_peft_model(model, LoraConfig(r=4, target_modules="all-linear", init_lora_weights=False))


def test_fsdp_with_a_4bit_base_is_refused_in_one_line_before_any_wrapping():
    peft = four_bit_peft()
    before = {k: v.clone() for k, v in peft.state_dict().items()}
    message = (r"^distributed: fsdp: FSDP cannot shard lorakit's 4-bit base \(base_model\.model\.model\.layers\.0\."
               r"self_attn\.q_proj\.base_layer is a Linear4bit whose packed weights are buffers\); use distributed: ddp$")
    # no process group exists: the refusal comes before FSDP would need one
    assert not (dist.is_available() and dist.is_initialized())
    with pytest.raises(ValueError, match=message):
        parallel.wrap(peft, loss_fn, World(rank=0, size=2, strategy="fsdp"), torch.device("cpu"))
    after = peft.state_dict()
    assert all(torch.equal(after[k], v) for k, v in before.items())
    assert type(peft.base_model.model.model.layers[0]).__name__ == "LlamaDecoderLayer"  # not fully_shard'ed


def test_fsdp_of_a_dense_base_is_not_refused_by_the_check():
    parallel.check_fsdp_base(get_peft_model(tiny_llama(), LoraConfig(r=2, target_modules=["q_proj"])))


@pytest.mark.skipif(not dist.is_available(), reason="a PyTorch build without torch.distributed")
def test_ddp_trains_a_4bit_base_with_the_plain_gradients(tmp_path):
    plain = four_bit_peft().train()
    wrapped_model = copy.deepcopy(plain)
    loss, _ = parallel.wrap(plain, loss_fn, World(), torch.device("cpu"))({"input_ids": IDS})
    loss.backward()
    want = {n: p.grad.clone() for n, p in plain.named_parameters() if p.requires_grad}
    dist.init_process_group("gloo", init_method=f"file://{tmp_path / 'store'}", rank=0, world_size=1)
    try:
        ddp = parallel.wrap(wrapped_model, loss_fn, World(rank=0, size=1, strategy="ddp"), torch.device("cpu"))
        assert isinstance(ddp, torch.nn.parallel.DistributedDataParallel)
        with parallel.gradient_sync(ddp, enabled=True):
            loss, _ = ddp({"input_ids": IDS})
            loss.backward()
    finally:
        dist.destroy_process_group()
    got = {n: p.grad for n, p in parallel.inner_model(ddp).named_parameters() if p.requires_grad}
    assert got.keys() == want.keys() and len(got) == 28
    for name in got:
        assert got[name].abs().sum() > 0
        torch.testing.assert_close(got[name], want[name], rtol=1e-6, atol=1e-7)
