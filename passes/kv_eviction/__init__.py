"""KV-cache eviction: every attention site keeps at most `budget` tokens (lossy).

Runs after `kv_runtime` (which binds each site to a slot store). For every
`slimfx::attention` node the pass relays the site out: its main tier shrinks to the
layer's budget (real memory: the buffers are reallocated at that size) and the node's
layout becomes the `evict` variant, which writes each new token into the slot its
policy frees and lets the decode kernel accumulate the attention mass the policy ranks
by (eviction_op.py). Policies: policies.py. Per-layer budgets and policies come from
`[passes.kv_eviction.layers."a-b"]`.

- Prefill: by default the store is compressed once the whole prompt has been seen (the
  papers' setting: the runtime prefills the prompt in one chunk, `prefill_chunk`
  hook), for prompts up to WHOLE_PROMPT_LIMIT tokens; a longer prompt is compressed
  after each chunk of that size (ranking a prompt's tokens holds a [heads, chunk, chunk]
  float32 score matrix: at 16K tokens on the Llama-3.2-1B shape that asked for 34 GiB
  and ran out of memory on an 80 GB H100; at 4096 it is 2 GiB). `prefill_chunk` = N
  compresses after every N prompt tokens instead (bounded memory, but tokens are
  ranked before the end of the prompt is seen).
- The budget counts real tokens only: left padding has negative positions, which the
  keep rule treats as empty slots.
- `budget_fraction` > 0: the budget is that share of the prompt, resolved per prompt
  (`specialise`, called by the runtime through compiler/pipeline.py), so each
  prompt-length bucket compiles once.
- SCOPE (`decode_budget` > 0): the site holds `budget` prompt slots, selected at prefill
  and then frozen, plus `decode_budget` slots where generated tokens are evicted by the
  same policy among themselves, so a long answer never pushes the prompt out.
- DuoAttention (policy "duo"): the `retrieval_fraction` of all kv heads with the highest
  calibrated retrieval scores (artifact from `slimfx calibrate duo-heads`, read by
  retrieval_heads.py) keep the full store; the other heads keep sinks + recent window in
  a store of `budget` slots. Each group has buffers of its own size (duo_op.py), so the
  memory really drops.
- MiKV (`evicted` = int8/int4/int2): tokens the policy evicts move to a low-precision
  tier instead of being dropped (mikv_op.py).
- TokenSelect (policy "tokenselect"): nothing is evicted; the site keeps its full store
  and each decode step reads only `budget` tokens per kv head, chosen by the query
  (select_op.py). Lossy, and it saves no memory (nor, without a sparse kernel, time).
- D2O (policy "d2o"): H2O's keep rule, and each evicted token merged into the kept token
  whose key is most similar when the similarity reaches a moving threshold
  (eviction_op.merge_targets); per-site budgets by attention density from a
  `slimfx calibrate d2o-budgets` plan (`d2o_budgets`), splitting the same total
  (layer_budgets.py, which says how this differs from the paper).
- TidalDecode (policy "tidaldecode"): nothing is evicted; at each decode step the
  `select_layers` attend fully and choose `budget` tokens per query head, which every
  later layer up to the next selection layer reads (tidal_op.py). Layers before the first
  selection layer are exact. Lossy; it saves no memory (nor, without a sparse kernel, time).

With a budget at least the total length nothing is ever evicted and the output equals
the unmodified model's (tested for every policy).
"""

from __future__ import annotations

import copy
import math

import torch
import torch.fx

from slimfx.compiler.config import ConfigError, Option
from slimfx.compiler.passmanager import PassContext, PassResult
from slimfx.passes._graph import attention_sites, relayout_site
from slimfx.passes.kv_eviction.duo_op import duo_layout, duo_tiers
from slimfx.passes.kv_eviction.eviction_op import evict_layout, evict_tier
from slimfx.passes.kv_eviction import layer_budgets
from slimfx.passes.kv_eviction.mikv_op import FORMATS as MIKV_FORMATS
from slimfx.passes.kv_eviction.mikv_op import channel_groups, low_tier, mikv_layout
from slimfx.passes.kv_eviction.policies import POLICIES, make_policy, resolve_sinks
from slimfx.passes.kv_eviction import select_op, tidal_op

NAME = "kv_eviction"
DESCRIPTION = ("keeps a fixed token budget per attention site, chosen by a policy (StreamingLLM, H2O, A2SF, TOVA, Keyformer, SnapKV, "
               "DuoAttention, D2O; SCOPE budgets), or reads only that many at decode (TokenSelect, TidalDecode)")
LOSSY = True
RUNS_AFTER = ("kv_runtime",)  # works on the slimfx::attention nodes kv_runtime creates
OPTIONS = {
    "policy": Option(str, "h2o", "which tokens to keep (tokenselect: which to read at decode)",
                     choices=(*POLICIES, *select_op.SELECTORS, tidal_op.NAME)),
    "budget": Option(int, 256, "tokens kept per site (sinks and recent window included); tokenselect: tokens each kv head "
                     "reads per decode step; tidaldecode: tokens each query head reads, the current one included",
                     lo=2, hi=1 << 24),
    "n_sink": Option(int, -1, "first tokens always kept (attention sinks); -1: the policy's paper default (policies.PAPER_DEFAULTS; "
                     "tokenselect: 128/2688 of the budget)",
                     lo=-1, hi=1 << 16),
    "window": Option(int, -1, "most recent tokens always kept; -1: the policy's paper default (H2O/A2SF half the budget, SnapKV "
                     "its observation window, Keyformer 30%, TOVA none, TokenSelect 512/2688 of the budget)", lo=-1, hi=1 << 20),
    "mass": Option(str, "sum", "h2o: rank by the attention mass summed over the queries (sum: the paper's) or by its mean "
                   "per query that has seen the token (mean: kvpress's ObservedAttentionPress)", choices=("sum", "mean")),
    "alpha": Option(float, 0.95, "A2SF forgetting factor", lo=0.0, hi=1.0),
    "vote": Option(str, "layer", "tokenselect: the heads whose soft votes pick one token set (layer: all of the layer's, the "
                   "paper's; kv_head: each kv head's query group)", choices=select_op.VOTES),
    "tau": Option(float, 1.0, "Keyformer Gumbel temperature", lo=1e-3, hi=100.0),
    "obs_window": Option(int, 32, "SnapKV observation window (last prompt queries)", lo=1, hi=1 << 16),
    "budget_fraction": Option(float, 0.0, "budget as a share of the prompt (0: use `budget`); resolved per prompt by the runtime, "
                              "rounded up to a multiple of 16 and never below n_sink + window + 1", lo=0.0, hi=1.0),
    "decode_budget": Option(int, 0, "SCOPE: slots for generated tokens, kept apart from the prompt's `budget` (0: one shared budget)",
                            lo=0, hi=1 << 24),
    "retrieval_fraction": Option(float, 0.5, "duo: share of all kv heads kept whole (top calibrated retrieval scores)",
                                 lo=0.0, hi=1.0, per_layer=False),
    "duo_heads": Option(str, "duo_heads", "duo: key in [artifacts] of the `slimfx calibrate duo-heads` file", per_layer=False),
    "prefill_chunk": Option(int, 0, "0: compress once the whole prompt is seen (the papers' setting; the runtime prefills "
                            "the prompt in one chunk, so the full prompt's keys and values exist for a moment; prompts "
                            "over 4096 tokens: after each 4096-token chunk); N (a power "
                            "of two >= 16): bounded-memory chunked prefill, the store compressed after every N prompt tokens",
                            lo=0, hi=1 << 24, per_layer=False),
    "select_layers": Option(list, [], "tidaldecode: the token selection layers, increasing ([]: the paper's, layer 2 and "
                            "13/32 of the depth)", item=int, lo=0, hi=1 << 16, per_layer=False),
    "merge_ema": Option(float, 0.5, "d2o: weight of the previous merge threshold in its moving average (the authors' code's "
                        "0.5)", lo=0.0, hi=1.0),
    "d2o_budgets": Option(str, "d2o_budgets", "d2o: key in [artifacts] of the `slimfx calibrate d2o-budgets` plan (per-site "
                          "budgets by attention density); 'none': uniform budgets", per_layer=False),
    "evicted": Option(str, "drop", "an evicted token is dropped, or kept at low precision (MiKV)", choices=("drop", "int8", "int4", "int2")),
}


FRACTION_ROUNDING = 16  # prompts of nearby lengths get one budget, so one compiled graph


def _sinks(opts: dict, budget: int) -> tuple[int, int]:
    if opts["policy"] == tidal_op.NAME:
        return 0, 0  # the current token is read besides the chosen ones
    if opts["policy"] in select_op.SELECTORS:
        return select_op.resolve_sinks(opts["policy"], budget, opts["n_sink"], opts["window"])
    return resolve_sinks(opts["policy"], budget, opts["n_sink"], opts["window"], _policy_param(opts))


def _fraction_budget(opts: dict, prompt_tokens: int) -> int:
    wanted = math.ceil(opts["budget_fraction"] * prompt_tokens / FRACTION_ROUNDING) * FRACTION_ROUNDING
    n_sink, window = _sinks(opts, wanted)
    return max(wanted, n_sink + window + 1)


def resolved(opts: dict) -> dict:
    """`opts` with n_sink and window -1 replaced by the policy's paper defaults at its budget."""
    n_sink, window = _sinks(opts, opts["budget"])
    return {**opts, "n_sink": n_sink, "window": window}


def specialise(options: dict, prompt_tokens: int) -> dict | None:
    """This pass's options (its table of Config.to_dict(), per-layer tables included) with
    every `budget_fraction` turned into an absolute `budget` for a prompt of
    `prompt_tokens` tokens, or None when there is no fraction to resolve. The runtime
    calls it through compiler/pipeline.py's `specialise` once it knows the prompt."""
    top = copy.deepcopy(options)
    changed = False
    for opts in (top, *top.get("layers", {}).values()):
        if opts.get("budget_fraction", 0.0) > 0:
            opts["budget"] = _fraction_budget({**top, **opts}, prompt_tokens)
            opts["budget_fraction"] = 0.0
            changed = True
    return top if changed else None


WHOLE_PROMPT_LIMIT = 4096


def prefill_chunk(options: dict, prompt_tokens: int, chunk: int) -> int:
    """The runtime's prefill chunk (compiler/pipeline.py's hook): `prefill_chunk` when set,
    else one chunk covering the prompt (a power of two, as the runtime's buckets are), at
    most WHOLE_PROMPT_LIMIT tokens (module doc)."""
    n = options.get("prefill_chunk", 0)
    if n:
        if n < 16 or n & (n - 1):
            raise ConfigError(f"passes.kv_eviction.prefill_chunk: got {n}; allowed: 0 (compress after the whole prompt) "
                              "or a power of two >= 16")
        return n
    return max(chunk, min(WHOLE_PROMPT_LIMIT, 1 << (max(prompt_tokens, 16) - 1).bit_length()))


def _policy_param(opts: dict) -> float:
    """The policy's one parameter (eviction_op.py's layout field); only its own option is read."""
    if opts["policy"] == "h2o":
        return 1.0 if opts["mass"] == "mean" else 0.0
    key = {"a2sf": "alpha", "keyformer": "tau", "snapkv": "obs_window", "d2o": "merge_ema"}.get(opts["policy"])
    return float(opts[key]) if key else 0.0


def _check_options(index: int, opts: dict) -> None:
    def at_layer(exc: ConfigError) -> ConfigError:  # "budget: got ..." -> the full key path and the layer
        return ConfigError(f"passes.kv_eviction.{exc}".replace(":", f" (layer {index}):", 1))

    if opts["budget_fraction"] > 0:
        raise at_layer(ConfigError(f"budget_fraction: got {opts['budget_fraction']} but the prompt length is unknown here; allowed: "
                                   "a fraction through slimfx.runtime.generate / slimfx run / slimfx eval (they resolve it per prompt), "
                                   "else 0 and an absolute budget"))
    if opts["mass"] != "sum" and opts["policy"] != "h2o":
        raise at_layer(ConfigError(f"mass: got {opts['mass']!r} with policy {opts['policy']!r}; allowed: 'sum' (the mean per "
                                   "query is H2O's variant: policy 'h2o')"))
    if opts["policy"] == tidal_op.NAME:
        for key, off in (("n_sink", -1), ("window", -1), ("decode_budget", 0), ("evicted", "drop")):
            if opts[key] != off:
                raise at_layer(ConfigError(f"{key}: got {opts[key]!r} with policy 'tidaldecode'; allowed: {off!r} (it keeps every "
                                           "token and reads its selection layer's choice plus the current token)"))
        return
    try:
        opts = resolved(opts)
        if opts["policy"] in select_op.SELECTORS:
            select_op.check_options(opts["budget"], opts["n_sink"], opts["window"])
        else:
            make_policy(opts["policy"], opts["budget"], n_sink=opts["n_sink"], window=opts["window"])
    except ConfigError as exc:
        raise at_layer(exc) from None
    if opts["policy"] in select_op.SELECTORS:
        for key, off in (("decode_budget", 0), ("evicted", "drop")):
            if opts[key] != off:
                raise at_layer(ConfigError(f"{key}: got {opts[key]!r} with policy {opts['policy']!r}; allowed: {off!r} "
                                           "(tokenselect keeps every token and evicts nothing)"))
    if opts["decode_budget"] and opts["decode_budget"] <= opts["window"]:
        raise at_layer(ConfigError(f"decode_budget: got {opts['decode_budget']}; allowed: 0 (off) or > window ({opts['window']}), "
                                   "so generated tokens outside the recent window can be evicted"))
    if opts["decode_budget"] and opts["policy"] == "duo":
        raise at_layer(ConfigError(f"decode_budget: got {opts['decode_budget']} with policy 'duo'; allowed: 0 "
                                   "(DuoAttention's streaming heads already slide over generated tokens)"))
    if opts["policy"] == "duo" and opts["evicted"] != "drop":
        raise at_layer(ConfigError(f"evicted: got {opts['evicted']!r} with policy 'duo'; allowed: 'drop' (duo's streaming heads "
                                   "keep sinks + recent tokens by design; MiKV's low tier goes with a score-based policy)"))
    if opts["policy"] == "d2o" and (opts["decode_budget"] or opts["evicted"] != "drop"):
        key, off = ("decode_budget", 0) if opts["decode_budget"] else ("evicted", "drop")
        raise at_layer(ConfigError(f"{key}: got {opts[key]!r} with policy 'd2o'; allowed: {off!r} (D2O merges what it evicts "
                                   "into the kept tokens)"))
    if opts["decode_budget"] and opts["evicted"] != "drop":
        raise at_layer(ConfigError(f"evicted: got {opts['evicted']!r} with decode_budget {opts['decode_budget']}; allowed: 'drop' "
                                   "(MiKV and SCOPE budgets do not combine)"))


def _check_tidal(pc) -> None:
    """tidaldecode is all layers' policy or none's (its selection layers choose for the layers
    after them), with increasing selection layers."""
    layers = pc.options["select_layers"]
    if sorted(set(layers)) != layers:
        raise ConfigError(f"passes.kv_eviction.select_layers: got {layers}; allowed: distinct layer numbers in increasing order")
    top = pc.options["policy"] == tidal_op.NAME
    for layer in sorted(pc.overridden_layers()):
        policy = pc.for_layer(layer)["policy"]
        if (policy == tidal_op.NAME) != top:
            raise ConfigError(f"passes.kv_eviction.policy (layer {layer}): got {policy!r} with {pc.options['policy']!r} for the "
                              "model; allowed: 'tidaldecode' for every layer or for none")


def check_config(pc) -> None:
    """The checks run() makes, before any compile (measure/sweep.py); a `budget_fraction`
    is checked as it resolves for a long prompt, since the prompt is not known yet."""
    _check_tidal(pc)
    for layer in ["all", *sorted(pc.overridden_layers())]:
        opts = pc.options if layer == "all" else pc.for_layer(layer)
        if opts["budget_fraction"] <= 0:
            _check_options(layer, opts)
            continue
        budget = _fraction_budget(opts, LONG_PROMPT)
        try:
            _check_options(layer, {**opts, "budget": budget, "budget_fraction": 0.0})
        except ConfigError as exc:  # say where a budget and window the user never wrote come from
            raise ConfigError(f"{exc} (budget_fraction {opts['budget_fraction']} checked at a {LONG_PROMPT}-token prompt: "
                              f"budget {budget}; a window of -1 grows with it)") from None


LONG_PROMPT = 1 << 16  # a fractional budget must be valid for prompts up to this long


def _evict_tiers(capacity: int, policy: str = "h2o"):
    def make(cache):
        return {"main": evict_tier(policy, cache.k.shape[0], cache.n_kv_heads, capacity, cache.head_dim,
                                   dtype=cache.k.dtype, device=cache.k.device)}
    return make


def _rewrite_evict(gm, store, index: int, opts: dict) -> int:
    """One tier of `budget` (+ `decode_budget`) slots for every head."""
    prefill_slots = opts["budget"] if opts["decode_budget"] else 0
    layout = evict_layout(opts["policy"], opts["n_sink"], opts["window"], _policy_param(opts), prefill_slots)
    return relayout_site(gm, store, index, layout, _evict_tiers(opts["budget"] + opts["decode_budget"], opts["policy"]))


def _rewrite_duo(gm, store, index: int, opts: dict, retrieval: list[int]) -> int:
    """Retrieval heads keep the full capacity, streaming heads a `budget`-slot tier."""
    def make(cache):
        streaming = [h for h in range(cache.total_kv_heads) if h not in retrieval]
        return duo_tiers(cache.k.shape[0], retrieval, streaming, cache.capacity, opts["budget"], cache.head_dim,
                         dtype=cache.k.dtype, device=cache.k.device)

    return relayout_site(gm, store, index, duo_layout(opts["n_sink"], opts["window"]), make)


# ----------------------------------------------------------------------------- MiKV sites


def _mikv_format(cache, index: int, opts: dict):
    """The site's low-tier format (a KVFormat), or ConfigError naming the key and what is allowed."""
    from slimfx.runtime.kv_quant import get_format

    key = f"passes.kv_eviction.evicted (layer {index})"
    evicted = opts["evicted"]
    if evicted not in MIKV_FORMATS:
        raise ConfigError(f"{key}: got {evicted!r}; allowed for a low-precision tier: one of {', '.join(MIKV_FORMATS)} ('drop' evicts)")
    if cache.layout not in ("plain",) and not cache.layout.startswith("mikv/"):
        raise ConfigError(f"{key}: got {evicted!r} for a site whose store is already laid out as {cache.layout!r}; allowed: 'drop'")
    fmt = get_format(evicted)
    why = fmt.unsupported_reason(cache.head_dim // channel_groups(fmt, cache.head_dim))
    if why:
        raise ConfigError(f"{key}: got {evicted!r}; {why}; allowed: a format whose packing divides head_dim, e.g. 'int8'")
    return fmt


def rewrite_mikv(gm, store, index: int, opts: dict) -> int:
    """A main tier of `budget` slots and a low tier of the site's capacity. Returns bytes
    saved (both tiers counted)."""
    fmt = _mikv_format(store.sites[index], index, opts)  # before anything changes

    def make(cache):
        main = _evict_tiers(opts["budget"])(cache)["main"]
        return {"main": main, "low": low_tier(cache.k.shape[0], cache.n_kv_heads, cache.capacity, cache.head_dim, fmt.name, cache.k.device)}

    layout = mikv_layout(opts["policy"], opts["n_sink"], opts["window"], _policy_param(opts), fmt.name)
    return relayout_site(gm, store, index, layout, make)


def check_artifacts(cfg, config, model=None, anatomy=None) -> None:
    """With policy 'duo' at any layer, the retrieval-head scores load and validate; given the
    model's anatomy, they score its attention sites' kv heads. Likewise d2o's budget plan."""
    from slimfx.passes.kv_eviction.retrieval_heads import load

    layer_budgets.check_artifacts(cfg, config, model, anatomy)
    layers = ["all", *sorted(cfg.overridden_layers())]
    if not any((cfg.options if layer == "all" else cfg.for_layer(layer))["policy"] == "duo" for layer in layers):
        return
    sites = anatomy.attention_sites if anatomy is not None else []
    shape = (len(sites), sites[0].n_kv_heads) if sites else ()
    load(config.artifact_path(cfg.options["duo_heads"]), cfg.options["duo_heads"], *shape)


def _duo_retrieval_heads(ctx: PassContext, cfg, store) -> dict[int, list[int]]:
    """Site index -> its retrieval kv heads, from the calibration artifact."""
    from slimfx.passes.kv_eviction.retrieval_heads import load, select_retrieval

    key = cfg.options["duo_heads"]
    sites = sorted(store.sites)
    n_heads = store.sites[sites[0]].total_kv_heads
    scores = load(ctx.config.artifact_path(key), key, len(sites), n_heads)
    mask = select_retrieval(scores, cfg.options["retrieval_fraction"])
    return {site: mask[row].nonzero().flatten().tolist() for row, site in enumerate(sites)}


OWN_KINDS = ("evict", "duo", "mikv", "select", "tidal")  # the layouts this pass gives sites


def _rewrite_site(gm, store, index: int, opts: dict, duo_heads) -> tuple[int, str | None]:
    """Rewrite one site by its options; returns (bytes saved, a note or None)."""
    opts = resolved(opts)
    cache = store.sites[index]
    if cache.owner is not None:
        return 0, f"site {index} reads site {cache.owner}'s cache: evicted there"
    kind = cache.layout.split("/")[0]
    if kind not in ("plain", *OWN_KINDS):
        return 0, f"site {index}: laid out as {cache.layout!r} by another pass, left as it is"
    if cache.layout.startswith("plain/"):
        return 0, f"site {index}: a sliding-window layer; its ring of {cache.capacity} slots already bounds it (budgets apply to global layers)"
    if opts["policy"] in select_op.SELECTORS:
        if opts["budget"] >= cache.capacity and kind == "plain":
            return 0, f"site {index}: budget {opts['budget']} >= store capacity {cache.capacity}, every slot is read"
        layout = select_op.select_layout(opts["n_sink"], opts["window"], opts["budget"], opts["vote"])
        # The plain ring's own buffers, read differently: nothing is reallocated or saved.
        return relayout_site(gm, store, index, layout, lambda cache: dict(cache.tiers)), None
    if opts["budget"] + opts["decode_budget"] > cache.capacity and kind == "plain":
        return 0, f"site {index}: budget {opts['budget'] + opts['decode_budget']} > store capacity {cache.capacity}, nothing to evict"
    if opts["evicted"] != "drop":
        return rewrite_mikv(gm, store, index, opts), None
    if opts["policy"] == "duo":
        retrieval = duo_heads(index)
        if len(retrieval) == cache.total_kv_heads:
            return 0, f"site {index}: every kv head is a retrieval head, full store kept"
        if retrieval:
            return _rewrite_duo(gm, store, index, opts, retrieval), None
    return _rewrite_evict(gm, store, index, opts), None


def _details(store, cfg, retrieval: dict) -> dict:
    # A tokenselect or tidaldecode site keeps its whole store: no budget caps its footprint.
    selecting = {i for i, c in store.sites.items() if c.layout.startswith(("select/", "tidal/"))}
    # A site left plain (a budget beyond its store, or before tidaldecode's first selection layer) keeps everything.
    evicting = [i for i, c in sorted(store.sites.items()) if i not in selecting and c.layout != "plain"]
    details = {"budgets": {i: cfg.for_layer(i)["budget"] for i in evicting}}
    if selecting:
        details["read_budgets"] = {i: cfg.for_layer(i)["budget"] for i in sorted(selecting)}
    low = {i: c.tiers["low"] for i, c in store.sites.items() if "low" in c.tiers}
    if low:
        # MiKV: demoted tokens stay in a quantized tier; the footprint counts them at its bytes per token.
        details["low_tier_bytes_per_token"] = {i: t.nbytes() / (store.batch * t.capacity) for i, t in low.items()}
    if retrieval:
        details["retrieval_heads"] = {i: h for i, h in retrieval.items() if h}
        # Retrieval heads keep every token: the footprint counts them at full length.
        details["full_fraction"] = {i: len(h) / store.sites[i].total_kv_heads for i, h in retrieval.items() if h}
    return details


def run(gm: torch.fx.GraphModule, cfg, ctx: PassContext) -> PassResult:
    from slimfx.runtime.kv_store import get_store

    store = get_store(ctx.config.pass_config("kv_runtime").options["store"])
    sites = [(i, n) for i, n in attention_sites(gm) if store is not None and i in store.sites]
    if not attention_sites(gm):
        return PassResult.skipped(NAME, "no slimfx::attention sites (run kv_runtime first, through slimfx.runtime.generate)")
    if store is None:
        return PassResult.skipped(NAME, "the KV store of kv_runtime is gone")
    _check_tidal(cfg)
    for index, _ in sites:  # validate everything before touching anything
        _check_options(index, cfg.for_layer(index))
    cfg = layer_budgets.with_site_budgets(gm, cfg, ctx, [i for i, _ in sites])  # d2o: the calibrated per-site split
    if cfg.options["policy"] == tidal_op.NAME:
        saved, rewritten, notes = tidal_op.rewrite_sites(gm, store, dict(sites), cfg.options["select_layers"],
                                                         lambda i: cfg.for_layer(i)["budget"], "passes.kv_eviction.select_layers")
        return _result(gm, store, cfg, {}, len(sites), saved, rewritten, notes)
    retrieval = {}
    if any(cfg.for_layer(index)["policy"] == "duo" for index, _ in sites):
        retrieval = _duo_retrieval_heads(ctx, cfg, store)
    saved, rewritten, notes = 0, 0, []
    for index, _ in sites:
        bytes_saved, note = _rewrite_site(gm, store, index, cfg.for_layer(index), lambda i: retrieval.get(i, []))
        if note:
            notes.append(note)
        else:
            saved += bytes_saved
            rewritten += 1
    return _result(gm, store, cfg, retrieval, len(sites), saved, rewritten, notes)


def _result(gm, store, cfg, retrieval: dict, matched: int, saved: int, rewritten: int, notes: list[str]) -> PassResult:
    if not rewritten:
        return PassResult(NAME, applied=False, sites_matched=matched, notes=notes)
    gm.recompile()
    return PassResult(NAME, applied=True, sites_matched=matched, nodes_rewritten=rewritten, bytes_saved=saved,
                      notes=notes, details=_details(store, cfg, retrieval))
