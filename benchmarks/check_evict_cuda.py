"""CUDA check of slimfx::attention_evict and slimfx::attention_duo: the CUDA path (Triton
decode/prefill kernels + the policy's slot choice) against the same op on CPU (reference
kernels), on a prompt larger than the budget followed by decode steps: every policy, SCOPE
(a separate decode budget, `prefill_slots`), and DuoAttention's two head groups."""

import sys

import torch

import slimfx.passes.kv_eviction.duo_op  # noqa: F401  (registers slimfx::attention_duo)
from slimfx.passes.kv_eviction.eviction_op import attention_evict_ref
from slimfx.passes.kv_eviction.policies import POLICIES


def slot_store(device, B, Hkv, cap, D):
    """Empty k, v, slot_pos (-1 = empty), scores buffers of one site."""
    return [torch.zeros(B, Hkv, cap, D, device=device), torch.zeros(B, Hkv, cap, D, device=device),
            torch.full((B, Hkv, cap), -1, dtype=torch.int32, device=device), torch.zeros(B, Hkv, cap, device=device)]


def run(device, policy, q, k, v, cap, prompt, prefill_slots=0):
    B, Hkv, D = k.shape[0], k.shape[1], k.shape[3]
    cache = slot_store(device, B, Hkv, cap, D)
    q, k, v = q.to(device), k.to(device), v.to(device)
    param = 16.0 if policy == "snapkv" else 0.9
    outs = [attention_evict_ref(q[:, :, :prompt], k[:, :, :prompt], v[:, :, :prompt], torch.arange(prompt, device=device).expand(B, prompt),
                                *cache, policy=policy, n_sink=4, window=16, param=param, prefill_slots=prefill_slots)]
    for t in range(prompt, q.shape[2]):
        outs.append(attention_evict_ref(q[:, :, t:t + 1], k[:, :, t:t + 1], v[:, :, t:t + 1], torch.full((B, 1), t, device=device),
                                        *cache, policy=policy, n_sink=4, window=16, param=param, prefill_slots=prefill_slots))
    return torch.cat(outs, 2).cpu(), cache[2].cpu()


def run_duo(device, q, k, v, cap, prompt):
    """Kv head 0 keeps the full store (retrieval), kv head 1 sinks + recent (streaming)."""
    B, D, total = k.shape[0], k.shape[3], k.shape[2]
    full, stream = slot_store(device, B, 1, total, D), slot_store(device, B, 1, cap, D)
    heads = [torch.tensor([0], device=device), torch.tensor([1], device=device)]
    q, k, v = q.to(device), k.to(device), v.to(device)
    spans = [(0, prompt)] + [(t, t + 1) for t in range(prompt, total)]
    outs = [torch.ops.slimfx.attention_duo(q[:, :, a:b], k[:, :, a:b], v[:, :, a:b],
                                           torch.arange(a, b, device=device).expand(B, b - a), *heads,
                                           *full, *stream, D ** -0.5, 4, 16) for a, b in spans]
    return torch.cat(outs, 2).cpu(), stream[2].cpu()


def compare(name, gpu, cpu) -> bool:
    (out_gpu, pos_gpu), (out_cpu, pos_cpu) = gpu, cpu
    err = ((out_gpu - out_cpu).norm() / out_cpu.norm()).item()
    B, H = pos_cpu.shape[:2]
    same_set = all(set(pos_gpu[b, h].tolist()) == set(pos_cpu[b, h].tolist()) for b in range(B) for h in range(H))
    print(f"{name:16s} rel err {err:.2e}  kept sets equal: {same_set}")
    return (err > 2e-3) or not same_set  # fp32 dots run as tf32 on the GPU


def main() -> int:
    torch.manual_seed(0)
    B, Hq, Hkv, D, prompt, steps, cap = 2, 8, 2, 64, 300, 40, 96
    q = torch.randn(B, Hq, prompt + steps, D)
    k = torch.randn(B, Hkv, prompt + steps, D)
    v = torch.randn(B, Hkv, prompt + steps, D)
    bad = 0
    for policy in POLICIES:
        bad += compare(policy, run("cuda", policy, q, k, v, cap, prompt), run("cpu", policy, q, k, v, cap, prompt))
    for policy in ("h2o", "snapkv"):  # SCOPE: 64 slots for the prompt's selection, 32 for decoding
        bad += compare(f"scope/{policy}", run("cuda", policy, q, k, v, cap, prompt, prefill_slots=64),
                       run("cpu", policy, q, k, v, cap, prompt, prefill_slots=64))
    bad += compare("duo", run_duo("cuda", q, k, v, cap, prompt), run_duo("cpu", q, k, v, cap, prompt))
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main())
