"""The side-by-side "main job": plain peft vs peft + ``peftops.accelerate`` on a Llama
built from a config (no download).

``run(device, dtype)``: on any device, the tiny Llama (hidden 64, 2 layers, LoRA r=4 on
every linear layer, B random) runs one forward + backward both ways and the max relative
error of the logits and of every LoRA gradient is reported. On a CUDA device it also
times a training step (forward + backward) of a 4-layer, hidden-2048 Llama at seq 1024
both ways and reports the median step time and peak memory. Returns a list of row dicts
and prints progress to stderr; claims no speed on a CPU.
"""
from __future__ import annotations

import torch

from .. import _dispatch
from ..benchmarks import e2e
from ..benchmarks.core import progress, rel_err


def run(device="cpu", dtype: torch.dtype | None = None) -> list[dict]:
    device = torch.device(device)
    dtype = dtype or torch.float32
    rows: list[dict] = []
    be = _dispatch.backend()
    kernels_on = be == "triton" or (be == "auto" and device.type == "cuda")
    progress(f"peftops demo on {device} ({dtype}, PEFTOPS_BACKEND={be}: "
             f"{'Triton kernels' if kernels_on else 'reference PyTorch path, no kernels'})")

    # ---- parity: tiny Llama, one forward + backward
    prev = torch.get_float32_matmul_precision()
    torch.set_float32_matmul_precision("highest")
    try:
        ids = e2e.batch("tiny", device)
        outs = {}
        for name, acc in (("peft", False), ("peft+peftops", True)):
            progress(f"  tiny Llama forward+backward: {name} ...")
            model = e2e.build_model("tiny", device, dtype, accelerated=acc)
            if acc:
                progress("  " + str(model.peftops_summary).replace("\n", "\n  "))
            _dispatch.reset_dispatch_counts()
            out = model(input_ids=ids, labels=ids)
            out.loss.backward()
            grads = {n: p.grad for n, p in model.named_parameters() if p.requires_grad}
            outs[name] = (out.logits.detach(), out.loss.item(), grads, _dispatch.dispatch_counts())
    finally:
        torch.set_float32_matmul_precision(prev)
    (y0, l0, g0, _), (y1, l1, g1, counts) = outs["peft"], outs["peft+peftops"]
    launches = sum(v for k, v in counts.items() if k.startswith("launch."))
    rows.append({"check": "logits", "model": "tiny", "dtype": str(dtype), "max_rel_err": rel_err(y1, y0)})
    rows.append({"check": "loss", "model": "tiny", "dtype": str(dtype), "peft": l0, "peftops": l1,
                 "max_rel_err": abs(l1 - l0) / abs(l0)})
    rows.append({"check": f"grads ({len(g0)} LoRA tensors)", "model": "tiny", "dtype": str(dtype),
                 "max_rel_err": max(rel_err(g1[n], g0[n]) for n in g0)})
    rows.append({"check": "kernel launches", "model": "tiny", "dtype": str(dtype), "launches": launches})
    for r in rows:
        progress(f"  {r['check']}: " + ", ".join(f"{k}={v:.3g}" if isinstance(v, float) else f"{k}={v}"
                                                for k, v in r.items() if k != "check"))

    # ---- timing: GPU only
    if device.type != "cuda":
        progress("  (no GPU: no timing; speed is measured on a GPU only)")
        return rows
    from ..benchmarks.core import time_fn

    tdtype = dtype if dtype != torch.float32 else torch.bfloat16
    ids = e2e.batch("medium", device)
    for name, acc in (("peft", False), ("peft+peftops", True)):
        progress(f"  medium Llama training step ({tdtype}): {name} ...")
        model = e2e.build_model("medium", device, tdtype, accelerated=acc)
        stats = time_fn(e2e.step_fn(model, ids), device)
        rows.append({"check": "train step", "model": "medium(h2048,L4,seq1024,r16)", "dtype": str(tdtype),
                     "provider": name, "median_ms": stats["median_ms"],
                     "peak_mib": stats["peak_mem_bytes"] / 2**20})
        progress(f"    {stats['median_ms']:.2f} ms, peak {stats['peak_mem_bytes'] / 2**20:.0f} MiB")
        del model
        torch.cuda.empty_cache()
    t = [r for r in rows if r["check"] == "train step"]
    if t[0]["median_ms"] and t[1]["median_ms"]:
        rows.append({"check": "speedup (peft / peftops)", "model": t[0]["model"], "dtype": str(tdtype),
                     "ratio": t[0]["median_ms"] / t[1]["median_ms"]})
        progress(f"  speedup peft/peftops: {rows[-1]['ratio']:.3f}x")
    return rows
