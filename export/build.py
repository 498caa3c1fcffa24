"""Build a package: run the configured passes once, export the step graphs, write the files.

How: a runtime Generator (runtime/generate.py) for the package's batch and capacity runs
one prompt of exactly `chunk` tokens and two decode steps, which compiles the two graphs
a generation needs: the prefill chunk (`chunk` tokens per sequence) and the decode step
(one). Each rewritten graph (passes applied, attention bound to the KV store) is copied,
its store buffers and pass constants become explicit inputs (codegen/store_inputs.py),
inputs it no longer reads are dropped (the k/v weights of KV-sharing readers, the float
weights a quantized linear replaced), and it is exported with `torch.export` (one `.pt2`
per graph, holding the graph only). Weights go to one safetensors file, read by both
graphs; pass constants (packed quantized weights, codebooks, fixed head indices) to
another; the KV store is described in the manifest and allocated empty at load.

With `compile="aoti"` (CPU only), each exported program is then compiled by AOTInductor
into a `.aoti.pt2` beside it: inductor's fused kernels for everything but slimfx's
attention op, which stays a call into the op's registered implementation (a custom op
over a list of buffers it mutates in place, called through the dispatcher). A program
AOTInductor cannot compile keeps running through torch.export's interpreter
(ExportedProgram.module(), op by op), and the manifest and the progress line say why.
Either way the loader does no dynamo tracing, no passes and no autotuning.
Not on CUDA: on an H100 (torch 2.11) AOTInductor compiled both programs of the
Llama-3.2-1B shape, but loading the package crashed the process (segfault inside
torch's `_load_aoti`, also for a two-layer model), so CUDA packages use the interpreter
and `compile="aoti"` is refused there. The default (`auto`) is the interpreter: on CPU
AOTInductor's C++ build of even a two-layer model took 94 s on a 2-core machine.
"""

from __future__ import annotations

import datetime as _dt
import json
import shutil
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch
import torch.fx

from slimfx.compiler.anatomy import BOUND_META, PATH_META
from slimfx.compiler.errors import UsageError
from slimfx.export.manifest import FORMAT, FORMAT_VERSION, environment, file_digests, write_manifest


@dataclass
class _Collected:
    """The graphs the generator compiled, exported, with the role of each input."""

    programs: list[dict] = field(default_factory=list)
    modules: set[str] = field(default_factory=set)  # slimfx modules that register the ops and variants the graphs call
    weights: dict[str, torch.Tensor] = field(default_factory=dict)
    constants: dict[str, torch.Tensor] = field(default_factory=dict)
    exported: dict[int, tuple] = field(default_factory=dict)  # tokens -> (ExportedProgram, example args), for AOTInductor


def _store_roles(store) -> dict[int, dict]:
    """id(tensor) -> role, for every tensor the store owns (buffers and step positions)."""
    roles = {}
    for index, cache in store.sites.items():
        for tier_name, tier in cache.tiers.items():
            for name, tensor in tier.buffers.items():
                roles.setdefault(id(tensor), {"kind": "store", "site": index if cache.owner is None else cache.owner,
                                              "tier": tier_name, "field": name})
    for tokens, tensor in store._step_positions.items():
        roles[id(tensor)] = {"kind": "step_positions", "tokens": tokens}
    return roles


def _plain_copy(gm: torch.fx.GraphModule) -> torch.fx.GraphModule:
    """A plain GraphModule with gm's graph (dynamo keeps reading its own afterwards)."""
    graph = torch.fx.Graph()
    graph.output(graph.graph_copy(gm.graph, {}))
    return torch.fx.GraphModule(gm, graph)


def _input_role(node: torch.fx.Node, value, store_roles: dict, collected: _Collected) -> dict:
    if node.meta.get(BOUND_META):
        role = store_roles.get(id(value))
        if role is not None:
            return role
        name = str(node.target).removesuffix("_arg")
        collected.constants[name] = value
        return {"kind": "constant", "name": name}
    path = node.meta.get(PATH_META)  # recorded for the model's parameters and buffers only
    if path is not None:
        collected.weights.setdefault(path, value)
        return {"kind": "weight", "name": path}
    for kind in ("input_ids", "position_ids"):
        if kind in node.name:
            return {"kind": kind}
    raise UsageError(f"export: graph input {node.name} is neither a weight, the token ids, the positions nor a store "
                     "buffer; allowed: models whose forward takes input_ids and position_ids")


def _export_graph(gm, example_inputs, store, collected: _Collected, folder: Path) -> None:
    from slimfx.codegen.store_inputs import lift_store_buffers

    plain = _plain_copy(gm)
    bound = lift_store_buffers(plain)
    values = list(example_inputs) + bound
    store_roles = _store_roles(store)
    inputs, args = [], []
    for node, value in zip([n for n in plain.graph.nodes if n.op == "placeholder"], values):
        if not node.users:
            plain.graph.erase_node(node)  # a weight no node reads any longer
            continue
        if not isinstance(value, torch.Tensor):
            raise UsageError(f"export: graph input {node.name} is a {type(value).__name__}; allowed: tensors only (static shapes)")
        inputs.append(_input_role(node, value, store_roles, collected))
        args.append(value)
    plain.recompile()
    tokens = next(int(v.shape[1]) for v, r in zip(args, inputs) if r["kind"] == "input_ids")
    program = torch.export.export(plain, tuple(args), strict=False)
    program.example_inputs = None  # the .pt2 holds the graph only; weights are saved once, apart
    for node in program.graph.nodes:
        node.meta.pop("stack_trace", None)  # source lines of the build machine: size, no use
    collected.modules |= _op_modules(program.graph)
    path = folder / f"step_{tokens}.pt2"
    torch.export.save(program, path)
    # A graph compiled again for the same step size (a dynamo recompile) replaces the earlier one.
    collected.programs[:] = [p for p in collected.programs if p["tokens"] != tokens]
    collected.programs.append({"file": f"programs/{path.name}", "tokens": tokens, "inputs": inputs, "runner": "export"})
    collected.exported[tokens] = (program, tuple(args))


def _aoti_compile(entry: dict, program, args: tuple, folder: Path, progress) -> None:
    """Compile one exported program with AOTInductor next to its .pt2; on failure the entry
    keeps the interpreter, with the reason recorded."""
    name = f"step_{entry['tokens']}.aoti.pt2"
    t0 = time.perf_counter()
    try:
        program.example_inputs = (args, {})
        torch._inductor.aoti_compile_and_package(program, package_path=str(folder / name))
    except Exception as exc:  # noqa: BLE001 - any compiler failure leaves the working interpreter path
        reason = " ".join(f"{type(exc).__name__}: {exc}".split())[:300]
        entry["aoti_failed"] = reason
        progress(f"      step_{entry['tokens']}: AOTInductor failed, kept torch.export's interpreter ({reason})")
        return
    finally:
        program.example_inputs = None
    entry.update(runner="aoti", aoti_file=f"programs/{name}")
    progress(f"      step_{entry['tokens']}: AOTInductor in {time.perf_counter() - t0:.1f} s")


def _op_modules(graph: torch.fx.Graph) -> set[str]:
    """The slimfx modules defining the custom ops `graph` calls (a loader imports them
    before deserialising, so the ops resolve)."""
    from torch._library.custom_ops import OPDEFS

    found = set()
    for node in graph.nodes:
        name = getattr(node.target, "name", lambda: "")() if node.op == "call_function" else ""
        opdef = OPDEFS.get(name.split(".")[0]) if name.startswith("slimfx::") else None
        if opdef is not None:
            found.add(opdef._init_fn.__module__)
    return found


def _variant_modules(store) -> set[str]:
    """The modules registering the attention variants of the store's layouts."""
    from slimfx.runtime.attention_op import variant_of

    found = set()
    for cache in store.sites.values():
        variant = variant_of(cache.layout)
        while variant is not None:
            found.add(type(variant).__module__)
            variant = getattr(variant, "inner", None)
    return found


def _store_layout(store) -> dict:
    sites = []
    for index, cache in sorted(store.sites.items()):
        tiers = {}
        for name, tier in cache.tiers.items():
            tiers[name] = {"heads": list(tier.heads) if tier.heads is not None else None, "exact_rollback": tier.exact_rollback,
                           "fixed": list(tier.fixed),
                           "buffers": {f: {"shape": list(t.shape), "dtype": str(t.dtype).removeprefix("torch.")} for f, t in tier.buffers.items()}}
        sites.append({"index": index, "head_dim": cache.head_dim, "layout": cache.layout, "owner": cache.owner,
                      "tiers": None if cache.owner is not None else tiers})
    return {"batch": store.batch, "capacity": store.capacity, "dtype": str(store.dtype).removeprefix("torch."), "sites": sites}


def _fixed_buffers(store) -> dict[str, torch.Tensor]:
    return {f"store.{index}.{name}.{f}": tier.buffers[f] for index, cache in store.sites.items() if cache.owner is None
            for name, tier in cache.tiers.items() for f in tier.fixed}


def _model_info(model, name: str) -> dict:
    cfg = getattr(model, "config", None)
    eos = getattr(getattr(model, "generation_config", None), "eos_token_id", None) or getattr(cfg, "eos_token_id", None)
    return {"name": name, "dtype": str(next(model.parameters()).dtype).removeprefix("torch."),
            "vocab_size": getattr(cfg, "vocab_size", None), "eos_token_id": eos,
            "pad_token_id": getattr(cfg, "pad_token_id", None), "architecture": type(model).__name__}


COMPILE_CHOICES = ("auto", "aoti", "none")


def export_package(model, out, *, config=None, tokenizer=None, batch: int = 1, capacity: int = 2048, chunk: int = 64,
                   model_name: str = "model", progress=print, overwrite: bool = False, compile: str = "auto") -> Path:
    """Write a package for `model` with `config` (dict, TOML path or None) to the folder `out`.
    batch: sequences per call; capacity: KV slots per site (prompt + new tokens at most);
    chunk: prefill tokens per step (a power of two >= 16); compile: "aoti" (AOTInductor),
    "none" (torch.export's interpreter) or "auto" (none; see the module doc). Returns the folder."""
    from safetensors.torch import save_file

    from slimfx.compiler.config import load_config
    from slimfx.runtime.generate import Generator, run_generation

    out = Path(out)
    _check_args(out, batch, capacity, chunk, overwrite, compile)
    if compile == "aoti" and next(model.parameters()).device.type == "cuda":
        raise UsageError("--compile aoti: AOTInductor packages of these graphs crashed torch's package loader on CUDA "
                         "(segfault in _load_aoti on an H100, torch 2.11); allowed on CUDA: --compile none or auto")
    loaded = load_config(config)
    staging = out.with_name(out.name + ".partial")
    shutil.rmtree(staging, ignore_errors=True)
    (staging / "programs").mkdir(parents=True)
    collected = _Collected()
    holder = {}
    progress(f"[1/5] passes and export of the prefill ({chunk} tokens) and decode graphs")
    gen = Generator(model, batch, capacity, config=loaded, codegen="eager",
                    on_graph=lambda gm, ex: _export_graph(gm, ex, holder["store"], collected, staging / "programs"))
    holder["store"] = gen.store
    ids = torch.ones(batch, chunk, dtype=torch.int64, device=gen.store.device)
    run_generation(gen, ids, torch.full((batch,), chunk), max_new_tokens=3, min_new_tokens=0, sampling=(0.0, 0, 1.0),
                   eos_token_id=None, pad_token_id=0, prefill_chunk=chunk, callback=None, stream_interval=16, cuda_graph=False)
    if sorted(p["tokens"] for p in collected.programs) != [1, chunk]:
        raise UsageError(f"export: compiled graphs for {sorted(p['tokens'] for p in collected.programs)} tokens per step; "
                         f"expected one prefill graph ({chunk}) and one decode graph (1)")
    device = gen.store.device
    if compile == "aoti":
        progress("[2/5] AOTInductor")
        for entry in collected.programs:
            _aoti_compile(entry, *collected.exported[entry["tokens"]], staging / "programs", progress)
    else:
        progress("[2/5] AOTInductor: off (--compile none or auto): the programs run through torch.export's interpreter")
    collected.exported.clear()
    progress(f"[3/5] weights ({len(collected.weights)} tensors) and pass constants ({len(collected.constants)})")
    save_file({k: v.detach().contiguous() for k, v in collected.weights.items()}, str(staging / "weights.safetensors"))
    constants = {**{f"pass.{k}": v for k, v in collected.constants.items()}, **_fixed_buffers(gen.store)}
    save_file({k: v.detach().contiguous() for k, v in constants.items()}, str(staging / "constants.safetensors"))
    progress("[4/5] tokenizer")
    if tokenizer is not None:
        tokenizer.save_pretrained(str(staging / "tokenizer"))
    progress("[5/5] manifest")
    manifest = {
        "format": FORMAT, "version": FORMAT_VERSION,
        "created": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
        "environment": environment(device),
        "model": _model_info(model, model_name),
        "shapes": {"batch": batch, "capacity": capacity, "chunk": chunk},
        "config": json.loads(json.dumps(loaded.to_dict(), default=str)),
        "passes": loaded.pipelines[loaded.compile["pipeline"]],
        "programs": sorted(collected.programs, key=lambda p: -p["tokens"]),
        "modules": sorted(collected.modules | _variant_modules(gen.store)),
        "store": _store_layout(gen.store),
        "files": file_digests(staging),
    }
    write_manifest(staging, manifest)
    if out.exists():
        shutil.rmtree(out)
    staging.rename(out)
    return out


def _check_args(out: Path, batch: int, capacity: int, chunk: int, overwrite: bool, compile: str) -> None:
    if compile not in COMPILE_CHOICES:
        raise UsageError(f"--compile {compile!r}: allowed: {', '.join(COMPILE_CHOICES)}")
    if out.exists() and not overwrite:
        raise UsageError(f"--out {out}: exists; allowed: a new folder (or --force to replace it)")
    if not isinstance(batch, int) or batch < 1:
        raise UsageError(f"--max-batch {batch!r}: allowed: an integer >= 1")
    if not isinstance(chunk, int) or chunk < 16 or chunk & (chunk - 1):
        raise UsageError(f"--chunk {chunk!r}: allowed: a power of two >= 16")
    if not isinstance(capacity, int) or capacity < chunk + 2:
        raise UsageError(f"--capacity {capacity!r}: allowed: an integer >= chunk + 2 ({chunk + 2})")
