"""BitFit: only bias terms stay trainable."""
import pytest
import torch
import torch.nn as nn

import peftops
from peftops.nn.bitfit import is_bias
from parity import DEVICE


def tiny_bert():
    from transformers import BertConfig, BertModel

    cfg = BertConfig(vocab_size=50, hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                     intermediate_size=37, max_position_embeddings=16, type_vocab_size=2)
    torch.manual_seed(0)
    return BertModel(cfg).to(DEVICE)  # built from the config: no download


def test_bert_only_biases_trainable():
    model = tiny_bert()
    n = peftops.bitfit(model)
    named = dict(model.named_parameters())
    trainable = {k for k, p in named.items() if p.requires_grad}
    # every kind of bias the paper trains is there, in every layer
    for layer in range(2):
        pre = f"encoder.layer.{layer}."
        for part in ("attention.self.query", "attention.self.key", "attention.self.value",
                     "attention.output.dense", "attention.output.LayerNorm",
                     "intermediate.dense", "output.dense", "output.LayerNorm"):
            assert pre + part + ".bias" in trainable, part
            assert pre + part + ".weight" not in trainable, part
    assert "embeddings.LayerNorm.bias" in trainable
    assert all(k.endswith(".bias") for k in trainable)
    assert not any(named[k].requires_grad for k in named if not k.endswith(".bias"))
    assert n == sum(p.numel() for k, p in named.items() if k.endswith(".bias"))
    # hidden 32: 2 layers x (4 x 32 attention + 2 x 32 LayerNorm + 37 FFN-in + 32 FFN-out)
    #   + embeddings LayerNorm 32 + pooler 32
    assert n == 2 * (4 * 32 + 2 * 32 + 37 + 32) + 32 + 32
    assert n < 0.1 * sum(p.numel() for p in model.parameters())


def test_bert_training_step_moves_only_biases():
    model = tiny_bert()
    peftops.bitfit(model)
    before = {k: p.detach().clone() for k, p in model.named_parameters()}
    opt = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.1)
    ids = torch.randint(0, 50, (2, 7), device=DEVICE)
    out = model(input_ids=ids)
    (out.last_hidden_state.pow(2).mean() + out.pooler_output.sum()).backward()
    opt.step()
    for k, p in model.named_parameters():
        if k.endswith(".bias"):
            assert p.grad is not None, k
        else:
            assert p.grad is None and torch.equal(p, before[k]), k
    assert any(not torch.equal(p, before[k]) for k, p in model.named_parameters() if k.endswith(".bias"))


def test_sequential():
    model = nn.Sequential(nn.Linear(8, 16), nn.LayerNorm(16), nn.ReLU(), nn.Linear(16, 4, bias=False),
                          nn.Conv1d(4, 3, 1)).to(DEVICE)
    n = peftops.bitfit(model)
    assert n == 16 + 16 + 3
    assert {k for k, p in model.named_parameters() if p.requires_grad} == {"0.bias", "1.bias", "4.bias"}
    # idempotent; frozen biases are turned back on
    model[0].bias.requires_grad_(False)
    assert peftops.bitfit(model) == n and model[0].bias.requires_grad


def test_multihead_attention_and_tied_bias():
    mha = nn.MultiheadAttention(12, 3, device=DEVICE)  # in_proj_bias [36], out_proj.bias [12]
    lin = nn.Linear(12, 12, device=DEVICE)
    model = nn.ModuleDict({"mha": mha, "a": lin, "b": lin})  # tied: counted once
    n = peftops.bitfit(model)
    assert mha.in_proj_bias.requires_grad and not mha.in_proj_weight.requires_grad
    assert n == 36 + 12 + 12
    assert is_bias("x.in_proj_bias") and not is_bias("x.bias_k") and not is_bias("biased.weight")


def test_no_biases_and_bad_input():
    model = nn.Sequential(nn.Linear(4, 4, bias=False, device=DEVICE))
    assert peftops.bitfit(model) == 0
    assert not any(p.requires_grad for p in model.parameters())
    with pytest.raises(TypeError, match="model must be a torch.nn.Module"):
        peftops.bitfit({"bias": torch.zeros(3, device=DEVICE)})
