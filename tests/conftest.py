import os

# Triton decides at @triton.jit time whether a kernel is interpreted, so the flag must
# be set before any test module imports a kernel module. Without a GPU every kernel
# test runs under the interpreter; with one, kernels run compiled.
if os.environ.get("TRITON_INTERPRET") is None:
    import torch.cuda

    if not torch.cuda.is_available():
        os.environ["TRITON_INTERPRET"] = "1"

import pytest
import torch
from hypothesis import settings

# CI runs the same examples every time (a red run is reproducible from its log);
# `SLIMFX_HYPOTHESIS=explore` draws fresh ones to hunt for new counterexamples.
settings.register_profile("ci", derandomize=True, print_blob=True)
settings.register_profile("explore", derandomize=False, print_blob=True)
settings.load_profile("explore" if os.environ.get("SLIMFX_HYPOTHESIS") == "explore" else "ci")

# Tests never reach a model hub.
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
# Under pytest-xdist the cores are split between the workers: dynamo's tracing (most of
# the suite's time) is single-threaded, so two one-thread workers beat one two-thread run.
_workers = int(os.environ.get("PYTEST_XDIST_WORKER_COUNT", "1"))
torch.set_num_threads(max(1, min(2, os.cpu_count() or 1) // _workers))


# The slowest files first, so that neither xdist worker is left alone with a long one at
# the end (seconds per file in one run on the 2-core machine, 2026-12-06: export 346,
# layer-skip decoding 325, families 235, HF generate 170, runtime generate 150, VQ pass
# 147, KV sharing 108, VQ verification 79, backend 76, codegen graph 38). xdist hands the
# files out in this order (pyproject: --no-loadscope-reorder; its default order is by
# number of tests, which put the longest file last and ran it alone for ~6 minutes).
_SLOW_FILES_FIRST = ("test_export.py", "test_layer_skip_decode.py", "test_families.py", "test_hf_generate.py",
                     "test_runtime_generate.py", "test_vq_pass.py", "test_kv_share.py", "test_vq_verify.py",
                     "test_backend.py", "test_codegen_graph.py")


def pytest_collection_modifyitems(config, items):
    rank = {name: i for i, name in enumerate(_SLOW_FILES_FIRST)}
    items.sort(key=lambda item: rank.get(item.path.name, len(rank)))  # stable: each file's tests stay together, in order


@pytest.fixture(scope="session")
def default_model():
    """The embedded SmolLM2-135M-Instruct, fp32 on CPU (loaded once per session)."""
    from slimfx.runtime.models import load_model

    model, tokenizer = load_model()
    return model, tokenizer


# A test that would recompile a frame past dynamo's limit fails instead of silently
# running eager (and passing without testing the compiled path).
torch._dynamo.config.fail_on_recompile_limit_hit = True


@pytest.fixture(autouse=True, scope="module")
def _fresh_dynamo_per_file():
    """Each test file starts from a clean dynamo, so it runs alike alone and in the suite.
    Within a file, tests reuse each other's compiled frames (a module-scoped model's
    generator compiles once, not once per test)."""
    torch._dynamo.reset()


@pytest.fixture
def fresh_dynamo():
    """A clean dynamo before and after the test, for tests that count compilations or
    recompiles, or whose graphs must not follow earlier compiles of the same code (dynamo
    makes a size dynamic once a frame has seen two)."""
    torch._dynamo.reset()
    yield
    torch._dynamo.reset()


def _kernel_cache(monkeypatch, tmp_path_factory, interpret: str):
    cache = tmp_path_factory.mktemp("slimfx_cache")
    monkeypatch.setenv("TRITON_INTERPRET", interpret)
    monkeypatch.setenv("SLIMFX_CACHE_DIR", str(cache))
    return cache


@pytest.fixture
def interpreter(monkeypatch, tmp_path_factory):
    """Generated kernels run under the Triton interpreter, cached in a fresh folder (returned).
    Only where no GPU is: Triton binds a kernel to the interpreter when its module is first
    imported, so switching it on for one test of a GPU process breaks the kernels other
    tests already imported compiled (those are tested compiled there, marked cuda)."""
    if torch.cuda.is_available():
        pytest.skip("Triton interpreter tests run on machines without a GPU")
    return _kernel_cache(monkeypatch, tmp_path_factory, "1")


@pytest.fixture
def no_interpreter(monkeypatch, tmp_path_factory):
    """No interpreter: on CPU each fusion group runs its own ATen nodes (bit-identical to
    eager) and nothing is compiled; returns the fresh kernel cache folder."""
    return _kernel_cache(monkeypatch, tmp_path_factory, "0")


class CodegenBackend:
    """A torch.compile backend running slimfx codegen alone (no passes); `results` holds the
    CodegenResult of every graph it compiled."""

    def __init__(self):
        self.results = []

    def __call__(self, gm, example_inputs):
        from slimfx.codegen import compile_graph

        fn = compile_graph(gm, example_inputs)
        self.results.append(fn.slimfx_codegen)
        return fn


@pytest.fixture
def codegen_backend():
    return CodegenBackend()


@pytest.fixture(scope="module")
def sharp_model():
    """A tiny GQA Llama with weights scaled x3: attention is peaked, so which tokens a KV
    pass keeps, or small changes to K/V, change greedy tokens (eviction, KV quant, MiKV)."""
    from slimfx.runtime.models import tiny_model

    model = tiny_model("llama_gqa", layers=2, seed=3)
    with torch.no_grad():
        for p in model.parameters():
            p.mul_(3)
    return model


@pytest.fixture(scope="module")
def prompt():
    """Two 40-token prompts for sharp_model."""
    return torch.randint(0, 128, (2, 40), generator=torch.Generator().manual_seed(1))
