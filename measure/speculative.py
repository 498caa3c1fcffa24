"""Acceptance of self-speculative decoding (layer_skip mode "speculative") on real weights.

For each draft (which blocks or MLPs the draft removes) and draft length K, greedy
generation of `new_tokens` tokens at batch 1 for each of fixed chat prompts
(measure/fidelity.DEFAULT_PROMPTS), with the draft length fixed at K (adaptive_draft off) so a
round's work is the same whatever is accepted. Reported per run:

- tokens_per_round: tokens emitted per verification (kept drafts + the full model's
  token), the factor a round's time is divided by;
- acceptance_rate: kept drafts / drafted tokens;
- identical: the tokens equal plain greedy generation of the unmodified model.

With a round time R_K and a plain decode step t measured on a GPU, the speedup is
tokens_per_round * t / R_K (benchmarks/bench_layer_skip.py).
"""

from __future__ import annotations

import time

import torch

from slimfx.measure.fidelity import DEFAULT_PROMPTS
from slimfx.runtime.generate import generate


def speculative_config(draft: dict, draft_length: int, adaptive: bool = False) -> dict:
    return {"pipelines": {"s": ["layer_skip"]}, "compile": {"pipeline": "s"},
            "passes": {"layer_skip": {**draft, "mode": "speculative", "draft_length": draft_length, "adaptive_draft": adaptive}}}


def acceptance(model, tokenizer, drafts: dict, lengths=(2, 4), new_tokens: int = 64, prompts=DEFAULT_PROMPTS,
               adaptive_length: int | None = 6, log=print) -> list[dict]:
    """One row per (draft, K) (module doc); drafts: {name: layer_skip options choosing the
    draft's blocks}. adaptive_length: also one run per draft with adaptive_draft on and
    that longest K."""
    from slimfx.runtime.models import chat_input_ids

    from slimfx.runtime.skip_variants import full_config

    prompt_ids = [chat_input_ids(tokenizer, p) for p in prompts]
    # The pipeline without layer_skip (no passes): the unmodified model, on the generator
    # the speculative runs prefill with (compiled once for both).
    whole = full_config(speculative_config(next(iter(drafts.values())), lengths[0]))
    references = [generate(model, ids, max_new_tokens=new_tokens, config=whole).tokens for ids in prompt_ids]
    rows = []
    for name, draft in drafts.items():
        runs = [(k, False) for k in lengths] + ([(adaptive_length, True)] if adaptive_length else [])
        for k, adaptive in runs:
            start = time.perf_counter()
            totals = {"drafted": 0, "accepted": 0, "rounds": 0}
            identical, used, cost = True, {}, None
            for ids, ref in zip(prompt_ids, references):
                tokens, stats = generate(model, ids, max_new_tokens=new_tokens, config=speculative_config(draft, k, adaptive))
                identical &= bool(torch.equal(tokens, ref))
                for key in totals:
                    totals[key] += stats[key]
                for a, b in stats["draft_lengths"].items():
                    used[str(a)] = used.get(str(a), 0) + b
                cost = stats["draft_cost"]
            row = {"draft": name, "options": draft, "draft_length": k, "adaptive": adaptive, "identical": identical,
                   "draft_cost": cost, "acceptance_rate": totals["accepted"] / max(1, totals["drafted"]),
                   "tokens_per_round": len(prompt_ids) * (new_tokens - 1) / max(1, totals["rounds"]), **totals,
                   "draft_lengths": used, "seconds": time.perf_counter() - start}
            rows.append(row)
            log(f"[acceptance] {name} K={k}{' adaptive' if adaptive else ''}: accepted {row['acceptance_rate']:.3f}, "
                f"{row['tokens_per_round']:.2f} tokens/round, draft cost {cost:.3f}, identical={identical}")
    return rows
