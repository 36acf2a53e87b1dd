"""Causality of the whole model and of ``chunk_dla`` at paper-like shapes (GPU by default).

A change of the token at position p must leave every output before p unchanged. Prints, per
case, the largest change of the outputs before p relative to the typical change after p (0 for
a causal model up to float noise; ~1 means the future leaks).

    python scripts/causality_check.py [--device cuda] [--seq-len 16384]
"""

from __future__ import annotations

import argparse
import json

import torch

import dla


def leak_ratio(before: torch.Tensor, after: torch.Tensor, p: int) -> float:
    """max |Δ| over positions < p divided by mean |Δ| over positions ≥ p (dim 1 is time)."""
    d = (after.double() - before.double()).abs()
    return (d[:, :p].max() / d[:, p:].mean().clamp_min(1e-30)).item()


def doc_boundaries(T: int, seed: int = 0) -> torch.Tensor:
    """cu_seqlens of documents of 1/8 to 1 of the row, as the throughput benchmark packs them."""
    gen = torch.Generator().manual_seed(seed)
    lengths, total = [], 0
    while total < T:
        n = min(int(torch.randint(T // 8, T + 1, (1,), generator=gen)), T - total)
        lengths.append(n)
        total += n
    return torch.tensor([0] + lengths).cumsum(0).to(torch.int32)


def model_case(mixer, policy, capacity, T, device, varlen, bf16):
    heads = {} if mixer == "mamba2" else {"num_heads": 8}  # Mamba-2 derives its heads from the width
    config = dla.DLAConfig(mixer=mixer, vocab_size=512, hidden_size=512, num_hidden_layers=2, head_dim=64,
                           state_size=128, policy=policy, capacity=capacity or None, max_position_embeddings=T,
                           chunk_size=64, **heads)
    torch.manual_seed(0)
    model = dla.DLAForCausalLM(config).to(device).train()  # the training path, as the loss sees it
    ids = torch.randint(0, 512, (1, T), device=device)
    cu = doc_boundaries(T).to(device) if varlen else None
    p = (cu[-2].item() if varlen else T // 2) + 7  # inside the last document
    changed = ids.clone()
    changed[0, p] = (changed[0, p] + 1) % 512
    kw = dict(cu_seqlens=cu, use_cache=False)
    with torch.no_grad(), torch.autocast(device.type, dtype=torch.bfloat16, enabled=bf16):
        a = model(input_ids=ids, **kw).logits.float()
        a2 = model(input_ids=ids, **kw).logits.float()
        b = model(input_ids=changed, **kw).logits.float()
    return dict(leak=leak_ratio(a, b, p), noise=(a2 - a).abs().max().item(), p=p)


def op_case(capacity, T, H, device, varlen, dtype=torch.float32):
    torch.manual_seed(0)
    K, V = 128, 64
    q, k = torch.randn(2, 1, T, H, K, device=device, dtype=dtype).unbind(0)
    v = torch.randn(1, T, H, V, device=device, dtype=dtype)
    g = torch.nn.functional.logsigmoid(torch.randn(1, T, H, device=device)) * 0.1
    cu = doc_boundaries(T).to(device) if varlen else None
    sched = dla.plan_schedule("dynamic", batch=1, heads=H, length=T, capacity=capacity,
                              scores=dla.novelty_scores(k, cu_seqlens=cu),
                              threshold=0.5, cu_seqlens=cu)
    lam = torch.rand(1, T, H, sched.n_labels, device=device)
    p = (cu[-2].item() if varlen else T // 2) + 7
    out = {}
    kw = dict(cu_seqlens=cu)
    o = dla.chunk_dla(q, k, v, g, lam, sched, scale=K ** -0.5, **kw)[0]
    v2 = v.clone()
    v2[0, p] += 1.0
    o2 = dla.chunk_dla(q, k, v2, g, lam, sched, scale=K ** -0.5, **kw)[0]
    out["leak"] = leak_ratio(o, o2, p)
    if device.type == "cuda" and H <= 8 and dtype == torch.float32:
        ref = dla.chunk_dla(q.double(), k.double(), v.double(), g.double(), lam.double(), sched, scale=K ** -0.5,
                            backend="torch", **kw)[0]
        out["rel_err_vs_torch_fp64"] = ((o.double() - ref).norm() / ref.norm()).item()
    return out


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--device", default="cuda")
    ap.add_argument("--seq-len", type=int, default=16384)
    ap.add_argument("--out")
    args = ap.parse_args()
    device, T = torch.device(args.device), args.seq_len
    rows = []

    def show(name, r):
        rows.append(dict(case=name, **r))
        print(f"{name:50s} " + "  ".join(f"{k}={v:.3g}" if isinstance(v, float) else f"{k}={v}"
                                         for k, v in r.items()), flush=True)

    for C in (30, 16):
        for varlen in (False, True):
            show(f"op dynamic C={C} H=8 varlen={varlen}", op_case(C, T, 8, device, varlen))
    show("op dynamic C=30 H=48 varlen=True", op_case(30, T, 48, device, True))
    show("op dynamic C=30 H=48 varlen=True bf16", op_case(30, T, 48, device, True, torch.bfloat16))
    for mixer, policy, C in (("mamba2", "dynamic", 30), ("mamba2", "single", 1), ("mamba2", "fenwick", 0),
                             ("mamba2", "dynamic", 16), ("gated_deltanet", "dynamic", 16), ("attention", "single", 1),
                             ("gated_deltanet", "single", 1)):
        for varlen in (False, True):
            show(f"model {mixer} {policy} C={C} varlen={varlen}" + (" bf16" if device.type == "cuda" else ""),
                 model_case(mixer, policy, C, T, device, varlen, device.type == "cuda"))
    if args.out:
        with open(args.out, "w") as f:
            json.dump(rows, f, indent=1)


if __name__ == "__main__":
    main()
