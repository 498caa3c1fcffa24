"""Several graphs of one model over one KV store: the layer-skipping modes of the runtime.

`passes.layer_skip.mode = "speculative"` (runtime/speculative.py) and `"schedule"`
(runtime/skip_schedule.py) run the model with some blocks removed for some steps and
whole for others. Every such graph is the model compiled through the same pipeline with
layer_skip's mode set to "remove" (and, for a schedule level, `schedule_level`), bound
to the generator's store by id: a graph without block j never touches site j, and the
blocks it runs read and write the same buffers as the full model's graphs.

The runtime reads the pass's options from the configuration only (it never imports the
pass): the pass owns choosing the blocks, this module owns the graphs.
"""

from __future__ import annotations

import copy
import itertools
import types
import weakref

import torch

from slimfx.compiler.anatomy import REMOVED_META

SKIP_PASS = "layer_skip"
_IDS = itertools.count()


def skip_mode(config) -> tuple[str, dict] | None:
    """(mode, layer_skip options) when `config` runs layer_skip in a runtime mode
    ("speculative" or "schedule"), else None."""
    if config is None:
        return None
    from slimfx.compiler.config import load_config

    cfg = load_config(config)
    if SKIP_PASS not in cfg.pipeline:
        return None
    opts = dict(cfg.pass_config(SKIP_PASS).options)
    return (opts["mode"], opts) if opts["mode"] in ("speculative", "schedule") else None


def full_config(config) -> dict:
    """`config` without layer_skip in its pipeline: the whole model, every other pass kept."""
    from slimfx.compiler.config import load_config

    raw = load_config(config).to_dict()
    name = raw["compile"]["pipeline"]
    raw["pipelines"][name] = [p for p in raw["pipelines"][name] if p != SKIP_PASS]
    raw["passes"].pop(SKIP_PASS, None)  # configs differing only in what they skip share one generator
    return raw


def removing_config(config, level: int = -1) -> dict:
    """`config` with layer_skip removing its chosen blocks (all, or schedule level `level`'s)."""
    from slimfx.compiler.config import load_config

    raw = copy.deepcopy(load_config(config).to_dict())
    options = raw["passes"][SKIP_PASS]
    for loop_only in ("draft_length", "adaptive_draft", "schedule_tokens"):  # the loop's, not the graph's: one graph for all
        options.pop(loop_only, None)
    options.update(mode="remove", schedule_level=level)
    return raw


def _step(model, input_ids, position_ids):
    return model(input_ids=input_ids, position_ids=position_ids, use_cache=False, logits_to_keep=1).logits[:, -1]


def _all_logits(model, input_ids, position_ids):
    return model(input_ids=input_ids, position_ids=position_ids, use_cache=False).logits


def _fresh(fn):
    """A copy of `fn` with its own code object, so its compiled graphs get their own dynamo
    cache entries (and recompile limit) instead of sharing the generator's."""
    code = fn.__code__.replace(co_name=f"_slimfx_skip_{fn.__name__.strip('_')}_{next(_IDS)}")
    return types.FunctionType(code, fn.__globals__)


class Variants:
    """The extra compiled functions of one Generator (cached with it): each is a
    fn(model, ids [B, T], positions [B, T]) -> logits bound to the generator's store."""

    def __init__(self, gen):
        self.gen = gen
        self.fns: dict = {}
        self.removed: dict = {}  # key -> weight paths its graph no longer reads

    def get(self, key, config: dict, all_logits: bool = False):
        """The function compiled for `config`, under (key, config); all_logits: logits of every
        token ([B, T, V]) instead of the last one ([B, V])."""
        key = (key, repr(config))
        fn = self.fns.get(key)
        if fn is None:
            from slimfx.runtime.generate import _runtime_config
            from slimfx.runtime.lowering import runtime_backend

            def seen(gm, example_inputs):
                self.removed[key] = list(gm.meta.get(REMOVED_META, {}).get("weights", ()))

            backend = runtime_backend(_runtime_config(config, self.gen.store.id), self.gen.codegen, seen)
            fn = torch.compile(_fresh(_all_logits if all_logits else _step), backend=backend, dynamic=False, fullgraph=True)
            self.fns[key] = fn
        return fn

    def kept_fraction(self, key, config: dict) -> float:
        """Share of the weight bytes a step reads that graph `key` still reads (the memory-
        bound cost model of passes/layer_skip: every 2-D weight of the blocks and the LM head
        read once per step; the input embedding only when the head shares it). 1 until the
        graph has been compiled."""
        model = self.gen.model
        head = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
        emb = model.get_input_embeddings() if hasattr(model, "get_input_embeddings") else None
        tied = head is not None and emb is not None and head.weight is emb.weight
        sizes = {n: p.numel() * p.element_size() for n, p in model.named_parameters()
                 if p.dim() == 2 and (tied or emb is None or p is not emb.weight)}
        gone = sum(sizes.get(w, 0) for w in self.removed.get((key, repr(config)), ()))
        return 1 - gone / max(1, sum(sizes.values()))


_VARIANTS: "weakref.WeakKeyDictionary" = weakref.WeakKeyDictionary()


def variants_of(gen) -> Variants:
    found = _VARIANTS.get(gen)
    if found is None:
        found = _VARIANTS[gen] = Variants(gen)
    return found
