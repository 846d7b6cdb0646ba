"""An accelerated peft model under ``torch.compile(fullgraph=True)`` and under DDP.

Compile: the LoRA / IA3 launchers are ``torch.library.custom_op``s with fake kernels, so
dynamo traces the whole model into one graph (no graph breaks) and AOTAutograd traces the
backward through them. Checked with backend="aot_eager" (the fake kernels' shapes AND
strides are checked against the real outputs there, then the real kernels run: under the
interpreter on CPU, compiled on CUDA). DDP: two processes (gloo, which takes CPU and CUDA
tensors; on CUDA both share the one test GPU) give the LoRA gradients of one process on the
full batch.
"""
from __future__ import annotations

import copy
import datetime
import os
import socket
import tempfile
import time

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

pytest.importorskip("peft")
pytest.importorskip("transformers")

import peftops  # noqa: E402
from peft import IA3Config, LoraConfig, get_peft_model  # noqa: E402
from transformers import LlamaConfig, LlamaForCausalLM  # noqa: E402

from parity import DEVICE, rel_err  # noqa: E402

TOL = 1e-4


def tiny_llama_peft(config, seed=0):
    torch.manual_seed(seed)
    cfg = LlamaConfig(hidden_size=64, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4,
                      num_key_value_heads=2, vocab_size=128, max_position_embeddings=64)
    model = get_peft_model(LlamaForCausalLM(cfg), config).eval()
    g = torch.Generator().manual_seed(seed + 1)
    with torch.no_grad():
        for n, p in model.named_parameters():
            if "lora_" in n:
                p.copy_(torch.randn(p.shape, generator=g) * 0.2)
            elif "ia3_l" in n:
                p.copy_(1 + torch.randn(p.shape, generator=g) * 0.3)
    return model.to(DEVICE)


def loss_and_grads(model, ids, owner=None):
    owner = model if owner is None else owner  # the module whose parameter names to report
    for p in owner.parameters():
        p.grad = None
    out = model(input_ids=ids, labels=ids)
    out.loss.backward()
    return out.logits.detach(), {n: p.grad.clone() for n, p in owner.named_parameters() if p.requires_grad}


@pytest.mark.parametrize("method", ["lora", "ia3"])
def test_compile_fullgraph_matches_eager(method):
    config = (LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"]) if method == "lora" else
              IA3Config(target_modules=["v_proj", "down_proj"], feedforward_modules=["down_proj"]))
    model = peftops.accelerate(tiny_llama_peft(config))
    assert len(model.peftops_summary.swapped) == 4
    ids = torch.randint(0, 128, (2, 7), generator=torch.Generator().manual_seed(0)).to(DEVICE)
    y_ref, g_ref = loss_and_grads(model, ids)
    torch._dynamo.reset()
    compiled = torch.compile(model, fullgraph=True, backend="aot_eager")  # fullgraph: a graph break raises
    peftops.reset_dispatch_counts()
    y, g = loss_and_grads(compiled, ids, owner=model)
    assert rel_err(y, y_ref) <= TOL
    assert g.keys() == g_ref.keys()
    for n in g:
        assert rel_err(g[n], g_ref[n]) <= TOL, n
    launches = {k: v for k, v in peftops.dispatch_counts().items() if k.startswith(f"launch.{method}")}
    assert launches, "the compiled graph must run the peftops kernels"
    torch._dynamo.reset()


# ----------------------------------------------------------------------------- DDP
LORA_CFG = dict(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"])


def _ids():
    return torch.randint(0, 128, (4, 6), generator=torch.Generator().manual_seed(5)).to(DEVICE)


def _ddp_worker(rank: int, world: int, port: int, out_path: str) -> None:
    torch.set_float32_matmul_precision("highest")
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world,
                            timeout=datetime.timedelta(seconds=120))
    try:
        model = peftops.accelerate(tiny_llama_peft(LoraConfig(**LORA_CFG)))
        ddp = torch.nn.parallel.DistributedDataParallel(model)
        ids = _ids().chunk(world)[rank]
        ddp(input_ids=ids, labels=ids).loss.backward()
        if rank == 0:
            grads = {n: p.grad for n, p in model.named_parameters() if p.requires_grad}
            torch.save({"grads": grads, "counts": peftops.dispatch_counts()}, out_path)
        dist.barrier()  # neither rank leaves (and tears the store down) before the other is done
    finally:
        dist.destroy_process_group()


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_ddp_two_processes_match_single_process_full_batch():
    model = peftops.accelerate(tiny_llama_peft(LoraConfig(**LORA_CFG)))
    ids = _ids()
    _, g_ref = loss_and_grads(copy.deepcopy(model).train(), ids)
    with tempfile.TemporaryDirectory() as tmp:
        out = os.path.join(tmp, "grads.pt")
        ctx = mp.spawn(_ddp_worker, args=(2, _free_port(), out), nprocs=2, join=False)
        deadline = time.monotonic() + 300
        while not ctx.join(timeout=2):  # a watchdog: a hung worker fails the test, never the suite
            if time.monotonic() > deadline:
                for p in ctx.processes:
                    p.kill()
                pytest.fail("DDP workers did not finish within 300 s")
        got = torch.load(out, map_location=DEVICE)
    counts = got["counts"]
    # 4 LoRA layers on Triton in rank 0, each with its rank-r GEMM step (either path's)
    assert counts.get("lora.triton", 0) >= 4, counts
    assert counts.get("launch.lora_gemm", 0) + counts.get("launch.lora_rank_add", 0) >= 4, counts
    assert got["grads"].keys() == g_ref.keys() and len(g_ref) == 8
    for n in g_ref:
        assert rel_err(got["grads"][n], g_ref[n]) <= TOL, n
