"""One table and one plot from the eviction evals on the RULER-style suite
(results/eval_kv_eviction_ruler1k_*.json): per policy and share of the prompt, the suite
average, passkey and prompts scored, beside the unmodified model on the same prompts.

    python benchmarks/summarize_kv_eviction_eval.py results/eval_kv_eviction_ruler1k_f*.json \
        results/eval_kv_tidaldecode.json results/eval_kv_d2o.json --output results/eval_kv_eviction_ruler1k
    python benchmarks/summarize_kv_eviction_eval.py results/eval_kv_eviction_ruler2k4k_f025_*.json \
        --output results/eval_kv_eviction_ruler2k4k

Writes STEM.md and STEM.png; every figure is read from the eval JSONs."""

from __future__ import annotations

import json
from pathlib import Path

from slimfx.measure.eval_report import summary_main


def _scores(part: dict) -> dict:
    ruler, passkey = part["ruler"]["summary"], part["passkey"]["summary"]
    return {"suite": ruler["average"], "suite_n": ruler["n"], "passkey": passkey["accuracy"], "passkey_n": passkey["n"]}


def _setting(data: dict) -> str:
    """Prompt lengths and device of one eval, for the title: e.g. '2K/4K prompts, NVIDIA H100 80GB HBM3'."""
    lengths = "/".join(f"{n // 1024}K" if n % 1024 == 0 else str(n) for n in data["settings"]["ruler"]["lengths"])
    device = data["stamp"]["device"]
    return f"{lengths} prompts, {'CPU' if device.lower().startswith(('cpu', 'amd', 'intel')) else device}"


def title(items: list[dict]) -> str:
    return "KV eviction on the RULER-style suite, default model, " + "; ".join(sorted({r["setting"] for r in items}))


def rows(paths: list[str]) -> list[dict]:
    out = []
    for path in paths:
        data = json.loads(Path(path).read_text())
        base = _scores(data["base"])
        for c in data["configurations"]:
            opts = c["config"]["passes"]["kv_eviction"]  # the configuration as run, swept values applied
            if opts.get("d2o_budgets") == "none" and opts["policy"] == "d2o":
                continue  # an ablation row, not the policy as configured
            policy = opts["policy"] + (" (mean)" if opts.get("mass") == "mean" else "")  # H2O's kvpress ranking
            out.append({"policy": policy, "fraction": opts["budget_fraction"],
                        "source": Path(path).name, **_scores(c), "setting": _setting(data),
                        "unmodified_suite": base["suite"], "unmodified_passkey": base["passkey"]})
    return sorted(out, key=lambda r: (r["policy"], r["fraction"], -r["suite_n"]))


def table(items: list[dict]) -> str:
    lines = ["| policy | share of prompt | suite average | unmodified, same prompts | passkey | unmodified | prompts (suite + passkey) | run |",
             "| --- | --- | --- | --- | --- | --- | --- | --- |"]
    for r in items:
        lines.append(f"| {r['policy']} | {r['fraction']:.1%} | {r['suite']:.2f} | {r['unmodified_suite']:.2f} | "
                     f"{r['passkey']:.2f} | {r['unmodified_passkey']:.2f} | {r['suite_n']} + {r['passkey_n']} | {r['source']} |")
    return "\n".join(lines)


def plot(items: list[dict], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4.5))
    for policy in sorted({r["policy"] for r in items}):
        by_share = {}
        for r in items:  # the run with the most prompts at each share
            if r["policy"] == policy and (r["fraction"] not in by_share or r["suite_n"] > by_share[r["fraction"]]["suite_n"]):
                by_share[r["fraction"]] = r
        pts = sorted((f, r["suite"]) for f, r in by_share.items())
        ax.plot([p[0] for p in pts], [p[1] for p in pts], marker="o", label=policy)
    base = {}
    for r in items:  # the unmodified model on the prompts of the largest run at each share
        if r["fraction"] not in base or r["suite_n"] > base[r["fraction"]][1]:
            base[r["fraction"]] = (r["unmodified_suite"], r["suite_n"])
    ax.scatter(list(base), [v[0] for v in base.values()], color="black", marker="x", s=60, zorder=5,
               label="unmodified, same prompts")
    ax.set_xscale("log", base=2)
    ax.set_xticks([0.125, 0.25, 0.5], ["12.5%", "25%", "50%"])
    ax.set_xlabel("KV budget (share of the prompt)")
    ax.set_ylabel("RULER-style suite average")
    ax.set_title(title(items).replace("default model", "SmolLM2-135M"), fontsize=9)
    ax.legend(fontsize=7, ncol=2)
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def main() -> None:
    summary_main(__doc__, title, rows, table, plot)


if __name__ == "__main__":
    main()
