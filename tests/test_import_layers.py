"""Imports run one way (DESIGN.md "Layout"; the layers are in passes/README.md).

Every module of the package is parsed, and every `import slimfx.X` / `from slimfx.X import
...` counts, those inside functions too: a lazy import still makes the importer depend
on what it imports. The tests fail when a module imports a layer above its own, or when
modules import each other in a cycle. Loading modules by name at run time (importlib: the
pass registry, the CLI's command table) is how a lower layer reaches the plug-ins above
it, and is not an import here.
"""

from __future__ import annotations

import ast
import pathlib

import networkx as nx

ROOT = pathlib.Path(__file__).resolve().parents[1]  # the repository root is the package `slimfx`
NOT_PACKAGE = {"tests", "benchmarks", "examples", "results", "build", "dist"}

UTILS, CORE, CODEGEN, RUNTIME, PASSES, TOOLS, ENTRY = range(7)
LAYER_NAMES = ("errors and utilities", "compiler core", "codegen", "runtime", "passes", "calibrate / measure / export", "entry points")

# The layer of each part of the package; the longest matching name decides. A module may
# import its own layer and those below it.
LAYERS = {
    "slimfx.compiler.errors": UTILS,
    "slimfx.compiler.tables": UTILS,
    "slimfx.compiler.artifacts": UTILS,
    "slimfx.compiler": CORE,  # config, anatomy, the pass API (passmanager, report, registry, pipeline)
    "slimfx.codegen": CODEGEN,
    "slimfx.runtime": RUNTIME,
    "slimfx.passes": PASSES,
    "slimfx.calibrate": TOOLS,
    "slimfx.measure": TOOLS,
    "slimfx.export": TOOLS,
    "slimfx.compiler.backend": ENTRY,
    "slimfx.compiler.generate_hook": ENTRY,  # HF generate on slimfx-compiled models -> the runtime
    "slimfx.compiler.hf_generate": ENTRY,
    "slimfx.compiler.cli": ENTRY,
    "slimfx.compiler.cmd_*": ENTRY,  # the CLI's subcommands
    "slimfx.__main__": ENTRY,
}
LAYERS_EXACT = {"slimfx": ENTRY}  # the package itself: lazy re-exports of the entry points

# The one remaining cycle: matmul_gen renders matmul kernels with triton_gen's helpers,
# and triton_gen hands matmul groups to matmul_gen (lazily).
ALLOWED_CYCLES = [{"slimfx.codegen.matmul_gen", "slimfx.codegen.triton_gen"}]


def package_modules() -> dict[str, pathlib.Path]:
    mods = {}
    for path in ROOT.rglob("*.py"):
        rel = path.relative_to(ROOT)
        if rel.parts[0] in NOT_PACKAGE or rel.parts[0].startswith("."):
            continue
        name = ".".join(("slimfx",) + rel.with_suffix("").parts)
        mods[name.removesuffix(".__init__")] = path
    return mods


def _resolve(target: str, mods) -> str | None:
    while target and target not in mods:
        target = target.rpartition(".")[0]
    return target or None


def import_edges(mods: dict[str, pathlib.Path]) -> set[tuple[str, str]]:
    """(importer, imported) for every import of one package module by another."""
    edges = set()
    for name, path in mods.items():
        package = name if path.name == "__init__.py" else name.rpartition(".")[0]
        for node in ast.walk(ast.parse(path.read_text(), str(path))):
            if isinstance(node, ast.Import):
                targets = [a.name for a in node.names]
            elif isinstance(node, ast.ImportFrom):
                base = node.module or ""
                if node.level:  # relative: from the importer's package upwards
                    parts = package.split(".")
                    base = ".".join(parts[: len(parts) - node.level + 1] + ([base] if base else []))
                targets = [base] + [f"{base}.{a.name}" for a in node.names]
            else:
                continue
            for target in targets:
                if not target.startswith("slimfx"):
                    continue
                resolved = _resolve(target, mods)
                if resolved and resolved != name:
                    edges.add((name, resolved))
    return edges


def layer_of(module: str) -> int | None:
    if module in LAYERS_EXACT:
        return LAYERS_EXACT[module]
    best = None
    for prefix, layer in LAYERS.items():
        if prefix.endswith("*"):
            hit = module.startswith(prefix[:-1])
        else:
            hit = module == prefix or module.startswith(prefix + ".")
        if hit and (best is None or len(prefix) > len(best[0])):
            best = (prefix, layer)
    return None if best is None else best[1]


def upward_imports(edges) -> list[str]:
    """One line per import of a higher layer."""
    bad = []
    for src, dst in sorted(edges):
        a, b = layer_of(src), layer_of(dst)
        if a is not None and b is not None and b > a:
            bad.append(f"{src} ({LAYER_NAMES[a]}) imports {dst} ({LAYER_NAMES[b]})")
    return bad


def test_every_module_has_a_layer():
    unplaced = sorted(m for m in package_modules() if layer_of(m) is None)
    assert not unplaced, f"modules without a layer (add their folder to LAYERS): {unplaced}"


def test_no_module_imports_a_higher_layer():
    bad = upward_imports(import_edges(package_modules()))
    assert not bad, "imports against the layering:\n" + "\n".join(bad)


def import_cycles(edges) -> list[list[str]]:
    """Sets of modules that import each other, other than ALLOWED_CYCLES."""
    graph = nx.DiGraph(list(edges))
    return [sorted(c) for c in nx.strongly_connected_components(graph) if len(c) > 1 and set(c) not in ALLOWED_CYCLES]


def test_no_import_cycles():
    cycles = import_cycles(import_edges(package_modules()))
    assert not cycles, f"import cycles: {cycles}"


def test_the_checks_see_lazy_upward_imports_and_cycles(tmp_path):
    """The checks have teeth: the runtime importing a pass inside a function is caught, and
    so is a pass importing back."""
    loop, rewrite = tmp_path / "loop.py", tmp_path / "rewrite.py"
    loop.write_text("def step():\n    from slimfx.passes.kv_eviction import specialise\n")
    rewrite.write_text("from slimfx.runtime.loop import step\n")
    edges = import_edges({"slimfx.runtime.loop": loop, "slimfx.passes.kv_eviction": rewrite})
    assert upward_imports(edges) == ["slimfx.runtime.loop (runtime) imports slimfx.passes.kv_eviction (passes)"]
    assert import_cycles(edges) == [["slimfx.passes.kv_eviction", "slimfx.runtime.loop"]]


def test_every_package_folder_is_installed():
    """pyproject.toml lists every folder of the package (a regular install copies only those)."""
    import tomllib

    listed = set(tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["setuptools"]["packages"])
    folders = {"slimfx." + ".".join(p.parent.relative_to(ROOT).parts) if p.parent != ROOT else "slimfx"
               for p in ROOT.rglob("__init__.py") if p.relative_to(ROOT).parts[0] not in NOT_PACKAGE
               and not p.relative_to(ROOT).parts[0].startswith(".")}
    assert folders <= listed, f"not in pyproject.toml's packages: {sorted(folders - listed)}"
