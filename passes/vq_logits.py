"""VQ logits: replace the LM head by a codebook head (VQ-Logits; FlashHead / SVD-softmax
for the exact mode). LOSSY in approx mode; exact mode keeps the greedy token.

Needs: the anatomy's LM head (a `linear(hidden, weight)` to vocab size, tied or not, no
bias) and a codebook artifact from `slimfx calibrate vq-head`, named in the config:

    [artifacts]
    vq_head = "head_k1024.safetensors"
    [passes.vq_logits]
    mode = "exact"        # or "approx"
    probes = 8

Modes (runtime/vq_head.py has the ops and their exact semantics):
- approx (the paper's form, training-free): logits over the K codes, scattered to the
  vocabulary through token_to_code (optionally times a per-token scale). Reads K*H
  instead of V*H head weights. Sampling works (tokens of one code share its logit
  when token_scale is off); quality is reported by `slimfx eval`.
- exact: score the codes, open the `probes` codes of highest upper bound, compute their
  members' exact logits, and keep the result only when the bound
  h.w_t <= h.mu_c + |h| r_c proves no unopened token can win; otherwise that row runs
  the full head in the same step (no token was emitted yet, so nothing to roll back).
  The argmax equals the full head's; non-argmax entries are -inf except the opened
  members, so sampling in exact mode is NOT exact. How often each route ran is counted
  on the device: `slimfx.runtime.vq_head.route_counts()`.
- exact with verify = "deferred" (greedy only): the codes of highest *score* are opened
  and the best member is emitted as an unverified candidate when the bound does not
  prove; the verification loop `slimfx.runtime.vq_verify.generate_verified` stashes the
  step's hidden state, runs the full head once per `verify_every` steps over the stash
  (one [k, H] x [H, V] matmul instead of k GEMVs), keeps the tokens up to the first wrong
  candidate, replaces it by the full head's token and rolls the KV store back
  (KVStore.rollback). Output: the full head's greedy tokens. Outside that loop (plain
  `generate`, HF generate, teacher forcing) the op is not armed and behaves like the
  bound mode, so it is never silently approximate. Routes: route_counts() (bound,
  fallback, accepted, corrected, discarded, rounds).

Option last_position_only: when the graph feeds S > 1 positions to the head (a model
called without logits_to_keep), only the last position goes through the new head and
its logits are broadcast (a view) to all S positions, keeping the [B, S, V] shape.
HF generate and slimfx generate read only the last position (and both already pass
logits_to_keep=1, so their graphs hold one position anyway). Off by default because
teacher-forced evaluation needs every position.

Invariants: the rewritten node keeps the head's output shape and dtype; the head
weight node is reused (tying is preserved, no copy); artifact tensors are graph
buffers (get_attr), shared between the graphs of one model.
"""

from __future__ import annotations

import hashlib

import operator
from pathlib import Path

import torch
import torch.fx

from slimfx.compiler.anatomy import shape_of, weight_source
from slimfx.compiler.config import ConfigError, Option
from slimfx.compiler.passmanager import PassContext, PassResult
from slimfx.passes._graph import bind_tensor, graph_input_value

NAME = "vq_logits"
DESCRIPTION = "LM head -> VQ codebook head: approx (code logits) or exact (probed clusters + bound, full-head fallback)"
LOSSY = True
OPTIONS: dict = {
    "mode": Option(str, "exact", "approx: code logits scattered to the vocab (lossy); exact: greedy token kept", choices=("approx", "exact"), per_layer=False),
    "codebook": Option(str, "vq_head", "key in [artifacts] of the `slimfx calibrate vq-head` file", per_layer=False),
    "probes": Option(int, 8, "exact: clusters opened per row (more = proves more often, reads more)", lo=1, hi=65536, per_layer=False),
    "token_scale": Option(bool, False, "approx: multiply code logits by each token's length along its code", per_layer=False),
    "last_position_only": Option(bool, False, "run the head on the last position only and broadcast its logits", per_layer=False),
    "verify": Option(str, "bound", "exact: bound (full head in the same step when the bound fails) or deferred "
                     "(candidates verified in batches by runtime/vq_verify.py, KV rollback)", choices=("bound", "deferred"), per_layer=False),
    "verify_every": Option(int, 8, "exact, verify = deferred: decode steps per batched verification", lo=1, hi=256, per_layer=False),
}

# (artifact path, mtime, weight data_ptr, dtype, device, mode, token_scale, verify, verify_every)
# -> prepared device tensors.
# Prefill and decode graphs of one model then share buffers and one route counter.
_PREPARED: dict = {}


def _real_weight(gm: torch.fx.GraphModule, node: torch.fx.Node, ctx: PassContext) -> torch.Tensor | None:
    """The concrete head weight behind `node` (a dynamo placeholder or a get_attr)."""
    src = weight_source(node)
    if src is None or src is not node:
        return None  # a view or cast of the weight: the op would need the same view
    value = graph_input_value(gm, src, ctx.example_inputs)
    if not isinstance(value, torch.Tensor) or type(value).__name__ == "FakeTensor":
        return None
    return value


def _check_same_head(art, weight: torch.Tensor, key: str, path) -> None:
    """The artifact must come from this head: its codebook is the mean of each cluster's rows."""
    w = weight.detach().float()
    codes = art.token_to_code.to(w.device).long()
    means = torch.zeros(art.k, art.hidden, device=w.device).index_add_(0, codes, w)
    means /= art.sizes.to(w.device).clamp_min(1)[:, None].float()
    err = ((means.cpu() - art.codebook).norm() / art.codebook.norm().clamp_min(1e-12)).item()
    if err > 1e-2:
        raise ConfigError(f"artifacts.{key} ({path}): codebook does not match this model's LM head "
                          f"(relative error {err:.3g}); expected an artifact calibrated on this model")


def _prepare(art, weight: torch.Tensor, opts: dict, key: str, path: Path) -> dict:
    from slimfx.runtime import vq_head as rt

    cache_key = (str(path), path.stat().st_mtime_ns, weight.data_ptr(), weight.dtype, str(weight.device),
                 opts["mode"], opts["token_scale"], _verify(opts), opts["verify_every"], opts["probes"])
    if cache_key in _PREPARED:
        return _PREPARED[cache_key]
    _check_same_head(art, weight, key, path)
    dev, dt = weight.device, weight.dtype
    # The codebook is read every step: keep it in the head's dtype (kernels accumulate in f32).
    prep = {"codebook": art.codebook.to(dev, dt).contiguous()}
    if opts["mode"] == "approx":
        prep["token_to_code"] = art.token_to_code.to(dev)
        prep["scale"] = art.scale.to(dev) if opts["token_scale"] else None
    else:
        prep["members"] = art.members.to(dev)
        with torch.no_grad():
            prep["slack"] = rt.exact_slack(weight.detach(), prep["codebook"], prep["members"])
        prep["counter_name"] = f"{path.name}@{len(_PREPARED)}"
        if _verify(opts) == "deferred":
            prep["deferred"] = rt.new_deferred_head(prep["counter_name"], str(path), weight.detach(),
                                                    opts["verify_every"], opts["probes"])
            prep["counters"] = prep["deferred"].counters
        else:
            prep["counters"] = rt.new_counters(prep["counter_name"], dev)
    _PREPARED[cache_key] = prep
    return prep


def _verify(opts: dict) -> str:
    """The verification route of the exact head ("bound" or "deferred"); approx has none."""
    return opts["verify"] if opts["mode"] == "exact" else "none"


def _rows(node: torch.fx.Node) -> int | None:
    """Rows the head op sees (the product of the hidden's leading dims), None when symbolic."""
    shape = shape_of(node)
    if shape is None or not all(isinstance(d, int) for d in shape):
        return None
    rows = 1
    for d in shape[:-1]:
        rows *= d
    return rows


def _skip_reason(node, info) -> str | None:
    if node is None or node.op != "call_function":
        return f"LM head node {info.node} is not a call in this graph"
    bias = node.args[2] if len(node.args) > 2 else node.kwargs.get("bias")
    if bias is not None:
        return "the LM head has a bias (not supported by the codebook head)"
    return None


def _head_input(gm, node: torch.fx.Node, last_only: bool) -> tuple[torch.fx.Node, tuple | None]:
    """The hidden states fed to the new head; with last_position_only and S > 1, a slice of
    the last position plus the [B, S, V] shape to broadcast back to."""
    hidden = node.args[0]
    shape = shape_of(hidden)
    out_shape = shape_of(node)
    if not last_only or shape is None or len(shape) != 3 or not isinstance(shape[1], int) or shape[1] <= 1:
        return hidden, None
    with gm.graph.inserting_before(node):
        last = gm.graph.call_function(operator.getitem, (hidden, (slice(None), slice(-1, None), slice(None))))
    return last, out_shape


def check_artifacts(cfg, config, model=None, anatomy=None) -> None:
    """The codebook loads and validates; given the model, it was calibrated on its LM head."""
    from slimfx.runtime.vq_head import load_artifact

    key = cfg.options["codebook"]
    path = config.artifact_path(key)
    head = anatomy.lm_head if anatomy is not None else None
    if head is None:
        load_artifact(path, key)
        return
    art = load_artifact(path, key, vocab=head.out_features, hidden=head.in_features)
    _check_same_head(art, model.get_parameter(head.weight), key, path)


def run(gm: torch.fx.GraphModule, cfg, ctx: PassContext) -> PassResult:
    import slimfx.runtime.vq_head  # noqa: F401  registers torch.ops.slimfx.vq_head_*
    from slimfx.runtime.vq_head import load_artifact

    opts = cfg.options
    anatomy = ctx.anatomy if ctx.anatomy is not None else ctx.refresh_anatomy(gm)
    info = anatomy.lm_head
    if info is None:
        return PassResult.skipped(NAME, "no LM head in this graph")
    node = next((n for n in gm.graph.nodes if n.name == info.node), None)
    why = _skip_reason(node, info)
    if why:
        return PassResult.skipped(NAME, why)
    weight_node = node.args[1]
    weight = _real_weight(gm, weight_node, ctx)
    if weight is None:
        return PassResult.skipped(NAME, f"the LM head weight {info.weight} is not a concrete tensor in this graph")
    key = opts["codebook"]
    path = ctx.config.artifact_path(key)
    art = load_artifact(path, key, vocab=info.out_features, hidden=info.in_features)
    prep = _prepare(art, weight, opts, key, path)

    if _verify(opts) == "deferred" and _rows(node.args[0]) is None:
        return PassResult.skipped(NAME, "verify = 'deferred' needs static shapes (the hidden-state stash has a fixed size)")
    hidden, bcast = _head_input(gm, node, opts["last_position_only"])
    # Named after the codebook's path, the same in every process (hashlib, not the
    # per-process salted hash()).
    tag = f"_slimfx_vq_{hashlib.sha256(str(path).encode()).hexdigest()[:8]}"
    if opts["mode"] == "approx":
        scale = bind_tensor(gm, f"{tag}_scale", prep["scale"], node) if prep["scale"] is not None else None
        args = (hidden, bind_tensor(gm, f"{tag}_codebook", prep["codebook"], node),
                bind_tensor(gm, f"{tag}_t2c", prep["token_to_code"], node), scale)
        target = torch.ops.slimfx.vq_head_approx.default
    elif _verify(opts) == "deferred":
        rows = _rows(node.args[0]) // (bcast[1] if bcast else 1)  # last_position_only keeps one position
        last_h, last_p = prep["deferred"].last_buffers(rows)
        args = (hidden, weight_node, bind_tensor(gm, f"{tag}_codebook", prep["codebook"], node),
                bind_tensor(gm, f"{tag}_slack", prep["slack"], node), bind_tensor(gm, f"{tag}_members", prep["members"], node),
                bind_tensor(gm, f"{tag}_counters", prep["counters"], node), bind_tensor(gm, f"{tag}_armed", prep["deferred"].armed, node),
                bind_tensor(gm, f"{tag}_last_hidden{last_h.shape[0]}", last_h, node),
                bind_tensor(gm, f"{tag}_last_proved{last_p.shape[0]}", last_p, node), int(opts["probes"]))
        target = torch.ops.slimfx.vq_head_deferred.default
    else:
        args = (hidden, weight_node, bind_tensor(gm, f"{tag}_codebook", prep["codebook"], node),
                bind_tensor(gm, f"{tag}_slack", prep["slack"], node), bind_tensor(gm, f"{tag}_members", prep["members"], node),
                bind_tensor(gm, f"{tag}_counters", prep["counters"], node), int(opts["probes"]))
        target = torch.ops.slimfx.vq_head_exact.default
    with gm.graph.inserting_before(node):
        new = gm.graph.call_function(target, args)
        final = gm.graph.call_method("expand", (new, *bcast)) if bcast else new
    final.meta = dict(node.meta)
    node.replace_all_uses_with(final)
    gm.graph.erase_node(node)
    gm.graph.eliminate_dead_code()
    gm.recompile()
    return _result(art, info, opts, prep, anatomy.tied_head, weight, bcast is not None)


def _result(art, info, opts, prep, tied, weight, sliced: bool) -> PassResult:
    es = weight.element_size()
    full = info.out_features * info.in_features * es
    code_bytes = art.k * art.hidden * es
    details = {"mode": opts["mode"], "k": art.k, "vocab": art.vocab, "tied": bool(tied), "last_position_only": sliced,
               "head_bytes_per_row": full}
    notes = [f"{opts['mode']} head, K={art.k}" + (", tied" if tied else ", untied")]
    if opts["mode"] == "approx":
        read = code_bytes + art.vocab * 4 * (2 if prep["scale"] is not None else 1)
        details["bytes_read_per_row"] = read
        return PassResult(NAME, applied=True, sites_matched=1, nodes_rewritten=1, bytes_saved=max(0, full - read),
                          notes=notes + ["lossy: code logits"], details=details)
    m = art.members.shape[1]
    probe_bytes = min(opts["probes"], art.k) * m * art.hidden * es
    details.update(probes=opts["probes"], verify=opts["verify"], bytes_read_proved=code_bytes + probe_bytes,
                   bytes_read_fallback=code_bytes + probe_bytes + full, route_counter=prep["counter_name"])
    if opts["verify"] == "deferred":
        details["verify_every"] = opts["verify_every"]
        notes.append(f"deferred verification every {opts['verify_every']} steps inside slimfx.runtime.vq_verify.generate_verified "
                     "(elsewhere: the bound route with full-head fallback)")
    notes.append(f"route counts: slimfx.runtime.vq_head.route_counts({prep['counter_name']!r})")
    # bytes_saved stays 0: the saving depends on how often the bound proves at run time.
    return PassResult(NAME, applied=True, sites_matched=1, nodes_rewritten=1, notes=notes, details=details)
