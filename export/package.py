"""Load a package and generate with it: no dynamo tracing, no passes, no autotuning, and
no model class (the step graphs are torch.export programs; weights come from
safetensors).

    pkg = slimfx.load_package("out/pkg")            # verified first (export/manifest.py)
    out = pkg.generate(input_ids, max_new_tokens=64)  # as slimfx.runtime.generate

The generation loop is the runtime's (runtime/generate.run_generation); only the step
function differs: it calls the exported prefill-chunk or decode-step program with the
token ids, the positions, the weights, the pass constants and the KV store's buffers.
"""

from __future__ import annotations

import contextlib
import time
from pathlib import Path

import torch

from slimfx.export.manifest import PackageError, verify
from slimfx.runtime.generate import GenerateError, Generator, check_generate_args, prompt_lengths, run_generation
from slimfx.runtime.kv_store import KVStore, SiteCache, Tier


def _dtype(name: str) -> torch.dtype:
    dtype = getattr(torch, name, None)
    if not isinstance(dtype, torch.dtype):
        raise PackageError(f"package: unknown dtype {name!r} in the manifest")
    return dtype


def build_store(layout: dict, fixed: dict[str, torch.Tensor], device: torch.device) -> KVStore:
    """An empty KV store laid out as the manifest says (owners first, readers on their tiers)."""
    store = KVStore(layout["batch"], layout["capacity"], dtype=_dtype(layout["dtype"]), device=device)
    for site in sorted(layout["sites"], key=lambda s: s["owner"] is not None):
        index = site["index"]
        if site["owner"] is not None:
            owner = store.sites[site["owner"]]
            store.sites[index] = SiteCache(index, site["head_dim"], owner.tiers, layout=site["layout"], owner=owner.index)
            continue
        tiers = {}
        for name, tier in site["tiers"].items():
            buffers = {}
            for f, spec in tier["buffers"].items():
                key = f"store.{index}.{name}.{f}"
                buffers[f] = fixed[key].to(device) if f in tier["fixed"] else torch.zeros(spec["shape"], dtype=_dtype(spec["dtype"]), device=device)
            heads = tuple(tier["heads"]) if tier["heads"] is not None else None
            tiers[name] = Tier(buffers, heads=heads, exact_rollback=tier["exact_rollback"], fixed=tuple(tier["fixed"]))
        store.sites[index] = SiteCache(index, site["head_dim"], tiers, layout=site["layout"])
        store.capacities[index] = store.sites[index].capacity
    store.reset()
    return store


class StepProgram:
    """One exported step graph with its inputs bound: call(ids, positions) -> logits [B, V]."""

    def __init__(self, module, inputs: list[dict], weights: dict, constants: dict, store: KVStore):
        self.module = module
        self.args: list = []
        self.slots = {}
        for i, role in enumerate(inputs):
            kind = role["kind"]
            if kind in ("input_ids", "position_ids"):
                self.slots[kind] = i
                self.args.append(None)
            elif kind == "weight":
                self.args.append(weights[role["name"]])
            elif kind == "constant":
                self.args.append(constants[f"pass.{role['name']}"])
            elif kind == "store":
                self.args.append(store.sites[role["site"]].tiers[role["tier"]].buffers[role["field"]])
            elif kind == "step_positions":
                self.args.append(store.step_positions(role["tokens"]))
            else:
                raise PackageError(f"package: unknown input kind {kind!r} in the manifest")

    def __call__(self, ids: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
        args = list(self.args)
        args[self.slots["input_ids"]] = ids
        args[self.slots["position_ids"]] = positions
        out = self.module(*args)
        return out[0] if isinstance(out, (tuple, list)) else out


class PackageGenerator(Generator):
    """The runtime's Generator with the package's step programs in place of a compiled model."""

    def __init__(self, store: KVStore, programs: dict[int, StepProgram], chunk: int):
        self.model, self.store, self.codegen, self.chunk = None, store, "package", chunk
        self.programs = programs
        self.step_fn = lambda _model, ids, positions: self.programs[ids.shape[1]](ids, positions)
        dev = store.device
        self.cur_tok = torch.zeros(store.batch, 1, dtype=torch.int64, device=dev)
        self.finished = torch.zeros(store.batch, dtype=torch.bool, device=dev)
        self.step_idx = torch.zeros(1, dtype=torch.int64, device=dev)
        self.out = None
        self.min_new_tokens = 0

    def padded_length(self, length: int, chunk: int) -> int:
        return -(-length // self.chunk) * self.chunk  # the package has one prefill graph, of `chunk` tokens


class Package:
    """A loaded package (module doc). manifest: the verified manifest; tokenizer: the HF
    tokenizer saved with it (None when the package has none)."""

    def __init__(self, folder, device: str | torch.device | None = None):
        from safetensors.torch import load_file

        self.folder = Path(folder)
        self.load_times: dict[str, float] = {}  # seconds per loading stage, for `slimfx inspect` and benchmarks
        with self._timed("verify"):
            built_for = _built_device(self.folder)
            self.device = torch.device(device or built_for)
            self.manifest = verify(self.folder, self.device)
        with self._timed("op_modules"):
            _import_op_modules(self.manifest)
        with self._timed("weights"):
            weights = load_file(str(self.folder / "weights.safetensors"), device=str(self.device))
            constants = load_file(str(self.folder / "constants.safetensors"), device=str(self.device))
        with self._timed("store"):
            self.store = build_store(self.manifest["store"], constants, self.device)
        programs = {}
        with self._timed("programs"):
            for entry in self.manifest["programs"]:
                programs[entry["tokens"]] = StepProgram(_load_program(self.folder, entry), entry["inputs"], weights, constants, self.store)
        self.chunk = self.manifest["shapes"]["chunk"]
        self.generator = PackageGenerator(self.store, programs, self.chunk)
        self._tokenizer = None

    @contextlib.contextmanager
    def _timed(self, stage: str):
        t0 = time.perf_counter()
        yield
        device = getattr(self, "device", None)  # set by the first stage
        if device is not None and device.type == "cuda":
            torch.cuda.synchronize(device)
        self.load_times[stage] = time.perf_counter() - t0

    @property
    def tokenizer(self):
        path = self.folder / "tokenizer"
        if self._tokenizer is None and path.is_dir():
            from transformers import AutoTokenizer

            self._tokenizer = AutoTokenizer.from_pretrained(str(path))
        return self._tokenizer

    def generate(self, input_ids: torch.Tensor, *, max_new_tokens: int = 128, min_new_tokens: int = 0,
                 attention_mask: torch.Tensor | None = None, temperature: float = 0.0, top_k: int = 0, top_p: float = 1.0,
                 eos_token_id=None, pad_token_id: int = 0, callback=None, stream_interval: int = 16, seed: int | None = None,
                 cuda_graph: bool | None = None):
        """As slimfx.runtime.generate, within the package's batch and capacity."""
        check_generate_args(max_new_tokens, min_new_tokens, self.chunk, stream_interval, temperature, top_k, top_p)
        lengths = prompt_lengths(input_ids, attention_mask)
        shapes = self.manifest["shapes"]
        if input_ids.shape[0] != shapes["batch"]:
            raise GenerateError(f"input_ids: batch {input_ids.shape[0]}; this package was exported for batch {shapes['batch']} "
                                "(slimfx export --max-batch)")
        need = self.generator.padded_length(input_ids.shape[1], self.chunk) + max_new_tokens
        if need > shapes["capacity"]:
            raise GenerateError(f"max_new_tokens: prompt (padded to {need - max_new_tokens}) + {max_new_tokens} new tokens need "
                                f"{need} KV slots; this package holds {shapes['capacity']} (slimfx export --capacity)")
        if seed is not None:
            torch.manual_seed(seed)
        return run_generation(self.generator, input_ids.to(self.device), lengths, max_new_tokens=max_new_tokens,
                              min_new_tokens=min_new_tokens, sampling=(float(temperature), int(top_k), float(top_p)),
                              eos_token_id=eos_token_id, pad_token_id=pad_token_id, prefill_chunk=self.chunk,
                              callback=callback, stream_interval=stream_interval, cuda_graph=cuda_graph)

    def describe(self) -> str:
        """The manifest as text: what was built, for what, from which passes, and the bytes."""
        m = self.manifest
        return describe_manifest(m)


def _load_program(folder: Path, entry: dict):
    """The callable for one step program: AOTInductor's compiled model where the package has
    one, else torch.export's interpreter over the exported graph."""
    if entry.get("runner") == "aoti":
        from torch._inductor import aoti_load_package

        return aoti_load_package(str(folder / entry["aoti_file"]))
    return torch.export.load(str(folder / entry["file"])).module()


def _import_op_modules(manifest: dict) -> None:
    """Import the modules that register the ops and attention variants the graphs call;
    only slimfx's own (a manifest never makes the loader import anything else)."""
    import importlib

    for name in manifest.get("modules", []):
        if not (isinstance(name, str) and name.startswith("slimfx.")):
            raise PackageError(f"package: manifest names module {name!r}; allowed: slimfx modules only")
        try:
            importlib.import_module(name)
        except ImportError as exc:
            raise PackageError(f"package: this slimfx has no module {name} the package's graphs need ({exc})") from None


def _built_device(folder: Path) -> str:
    from slimfx.export.manifest import read_manifest

    return read_manifest(folder)["environment"]["device"]


def _runner_text(program: dict) -> str:
    if program.get("runner") == "aoti":
        return "AOTInductor"
    failed = program.get("aoti_failed")
    return f"torch.export interpreter; AOTInductor failed: {failed}" if failed else "torch.export interpreter"


def describe_manifest(m: dict) -> str:
    env, shapes = m["environment"], m["shapes"]
    total = sum(f["bytes"] for f in m["files"].values())
    lines = [
        f"slimfx package v{m['version']} of {m['model']['name']} ({m['model']['architecture']}, {m['model']['dtype']}), created {m['created']}",
        f"built with slimfx {env['slimfx']}, torch {env['torch']}, triton {env['triton']} for {env['device']}"
        + (f" (capability {env['capability'][0]}.{env['capability'][1]})" if env["capability"] else ""),
        f"shapes: batch {shapes['batch']}, KV capacity {shapes['capacity']}, prefill chunk {shapes['chunk']}",
        f"passes: {', '.join(m['passes']) or 'none'}",
        "step programs: " + ", ".join(f"{p['tokens']} tokens ({_runner_text(p)})" for p in m["programs"]),
        f"KV sites: {len(m['store']['sites'])}, layouts: {', '.join(sorted({s['layout'] for s in m['store']['sites']}))}",
        f"files ({total / 2**20:.1f} MiB):",
    ]
    lines += [f"  {rel:<32} {f['bytes'] / 2**20:9.2f} MiB  sha256 {f['sha256'][0][:16]}" for rel, f in m["files"].items()]
    return "\n".join(lines)


def load_package(folder, device: str | torch.device | None = None) -> Package:
    """A package written by `slimfx export`, verified (export/manifest.py) and ready to generate."""
    return Package(folder, device)
