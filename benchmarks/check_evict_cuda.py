"""CUDA check of slimfx::attention_evict: the CUDA path (Triton decode/prefill kernels +
the policy's slot choice) against the same op on CPU (reference kernels), for every
policy, on a prompt larger than the budget followed by decode steps."""

import sys

import torch

from slimfx.runtime.eviction import POLICIES
from slimfx.runtime.eviction_op import attention_evict_ref


def run(device, policy, q, k, v, cap, prompt):
    B, Hkv, D = k.shape[0], k.shape[1], k.shape[3]
    cache = [torch.zeros(B, Hkv, cap, D, device=device), torch.zeros(B, Hkv, cap, D, device=device),
             torch.full((B, Hkv, cap), -1, dtype=torch.int32, device=device), torch.zeros(B, Hkv, cap, device=device)]
    q, k, v = q.to(device), k.to(device), v.to(device)
    param = 16.0 if policy == "snapkv" else 0.9
    outs = [attention_evict_ref(q[:, :, :prompt], k[:, :, :prompt], v[:, :, :prompt], torch.arange(prompt, device=device).expand(B, prompt),
                                *cache, policy=policy, n_sink=4, window=16, param=param)]
    for t in range(prompt, q.shape[2]):
        outs.append(attention_evict_ref(q[:, :, t:t + 1], k[:, :, t:t + 1], v[:, :, t:t + 1], torch.full((B, 1), t, device=device),
                                        *cache, policy=policy, n_sink=4, window=16, param=param))
    return torch.cat(outs, 2).cpu(), cache[2].cpu()


def main() -> int:
    torch.manual_seed(0)
    B, Hq, Hkv, D, prompt, steps, cap = 2, 8, 2, 64, 300, 40, 96
    q = torch.randn(B, Hq, prompt + steps, D)
    k = torch.randn(B, Hkv, prompt + steps, D)
    v = torch.randn(B, Hkv, prompt + steps, D)
    bad = 0
    for policy in POLICIES:
        out_gpu, pos_gpu = run("cuda", policy, q, k, v, cap, prompt)
        out_cpu, pos_cpu = run("cpu", policy, q, k, v, cap, prompt)
        err = ((out_gpu - out_cpu).norm() / out_cpu.norm()).item()
        same_set = all(set(pos_gpu[b, h].tolist()) == set(pos_cpu[b, h].tolist()) for b in range(B) for h in range(Hkv))
        print(f"{policy:10s} rel err {err:.2e}  kept sets equal: {same_set}")
        bad += (err > 1e-3) or not same_set
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main())
