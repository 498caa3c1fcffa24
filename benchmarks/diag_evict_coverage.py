"""Diagnostic (not a benchmark): for one passkey prompt, the share of each query head's
answer-time attention (unmodified model, eager attention) that falls on the tokens an
eviction policy kept. Usage: python benchmarks/diag_evict_coverage.py BUDGET POLICY"""
import torch, sys
from slimfx.measure.passkey import build_cases
from slimfx.measure.runner import Runner
from slimfx.runtime.models import load_model
model, tok = load_model()
case = build_cases(tok, lengths=[1024], depths=[0.5])[0]
ids = case.input_ids; T = ids.shape[1]
ans = tok(" The pass key is " + case.key + ".", add_special_tokens=False, return_tensors="pt").input_ids
full = torch.cat([ids, ans], 1)
model.config._attn_implementation = "eager"
with torch.no_grad():
    o = model(full, output_attentions=True)
atts = o.attentions  # per layer [1, Hq, L, L]
model.config._attn_implementation = "sdpa"
budget = int(sys.argv[1]); policy = sys.argv[2]
cfg = {"compile": {"pipeline": "evict"}, "pipelines": {"evict": ["fold_noop_casts", "kv_eviction"]}, "passes": {"kv_eviction": {"policy": policy, "budget": budget, "n_sink": 4, "window": 32}}}
st = Runner(model, cfg).stepper(1100); st.feed(ids)
store = st.gen.store; print(sorted(store.sites)[:5])
Hq = atts[0].shape[1]; Hkv = store.sites[min(store.sites)].slot_pos.shape[1]; g = Hq // Hkv
rows = slice(T, full.shape[1])  # answer query positions
print("layer: coverage of answer-step attention over prompt by kept set, per kv head (min over q heads)")
for i in range(len(atts)):
    a = atts[i][0, :, rows, :T]  # [Hq, A, T]
    kept = torch.zeros(Hkv, T, dtype=torch.bool)
    sp = store.sites[sorted(store.sites)[i]].slot_pos[0]
    for h in range(Hkv):
        p = sp[h][sp[h] >= 0].long(); p = p[p < T]; kept[h, p] = True
    cov = []
    for hq in range(Hq):
        m = a[hq] / a[hq].sum(-1, keepdim=True)
        cov.append(float((m * kept[hq // g]).sum(-1).min()))
    print(i, " ".join(f"{c:.2f}" for c in cov))
