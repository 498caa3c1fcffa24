"""Bad input is one line: models given to `slimfx run --model`, sampling arguments,
token budgets, configuration files and plans are refused with exit 2 and one line on
stderr (a slimfx error for Python callers), before anything large is loaded or allocated."""

from __future__ import annotations

import os
import shutil
from pathlib import Path

import pytest
import torch
import torch.fx

from slimfx.compiler.cli import main
from slimfx.compiler.config import ConfigError, load_config, validate_config


def write_tiny_checkpoint(folder: Path) -> Path:
    """A tiny random-weight Llama as an HF folder (safetensors) with a character-level
    tokenizer, so `slimfx run --model FOLDER` runs in seconds."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    from slimfx.runtime.models import tiny_model

    folder.mkdir(parents=True, exist_ok=True)
    model = tiny_model("llama_untied")
    model.config.bos_token_id, model.config.eos_token_id = 1, 2
    model.save_pretrained(folder)
    vocab = {"<unk>": 0, "<s>": 1, "</s>": 2, **{chr(c): c - 29 for c in range(32, 157) if c - 29 < 128}}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Split("", "isolated")
    tok.decoder = decoders.Fuse()
    PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="<unk>", bos_token="<s>", eos_token="</s>").save_pretrained(folder)
    return folder


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    return write_tiny_checkpoint(tmp_path_factory.mktemp("tiny") / "model")


def one_line_error(capsys, argv, *needles) -> str:
    """Runs the CLI; asserts exit 2 and exactly one stderr line holding every needle."""
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith("slimfx: "), err
    for needle in needles:
        assert needle in err, err
    return err


# ----------------------------------------------------------------------------- models


def _copy(checkpoint: Path, tmp_path: Path) -> Path:
    return Path(shutil.copytree(checkpoint, tmp_path / "copy"))


def _edit_tensor(folder: Path, edit) -> None:
    from safetensors.torch import load_file, save_file

    tensors = load_file(folder / "model.safetensors")
    edit(tensors)
    save_file(tensors, folder / "model.safetensors", metadata={"format": "pt"})


Q = "model.layers.0.self_attn.q_proj.weight"


def _broken_config(folder):
    (folder / "config.json").write_text("{ not json")


def _truncated_weights(folder):
    path = folder / "model.safetensors"
    path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])


def _wrong_shape(folder):
    _edit_tensor(folder, lambda t: t.update({Q: t[Q][:32].contiguous()}))


def _nan_weight(folder):
    _edit_tensor(folder, lambda t: t[Q].__setitem__((0, 0), float("nan")))


def _missing_weight(folder):
    _edit_tensor(folder, lambda t: t.pop(Q))


def _extra_layer(folder):  # weights of a layer the config lacks (a checkpoint edited to fewer layers)
    _edit_tensor(folder, lambda t: t.update({Q.replace("layers.0", "layers.7"): t[Q].clone()}))


BROKEN_CHECKPOINTS = {
    "broken-config-json": (_broken_config, "not a valid JSON"),
    "truncated-safetensors": (_truncated_weights, "cannot be loaded"),
    "wrong-shape": (_wrong_shape, f"{Q} [32, 64] vs [64, 64]"),
    "nan-weight": (_nan_weight, f"weight {Q} holds NaN"),
    "missing-weight": (_missing_weight, "the files lack"),
    "extra-layer": (_extra_layer, "no place for"),
}


@pytest.mark.parametrize("fault", sorted(BROKEN_CHECKPOINTS))
def test_broken_checkpoint_is_one_line(checkpoint, tmp_path, capsys, fault):
    folder = _copy(checkpoint, tmp_path)
    breaks, needle = BROKEN_CHECKPOINTS[fault]
    breaks(folder)
    one_line_error(capsys, ["run", "--model", str(folder), "--max-new-tokens", "2"], f"--model {folder}", needle)


def _gguf_head(n: int) -> bytes:
    from slimfx.runtime.models import default_model_source

    src = default_model_source()
    with open(src.folder / src.gguf_file, "rb") as f:
        return f.read(n)


BROKEN_GGUFS = {
    "empty": lambda: b"",
    "random": lambda: os.urandom(4096),
    "truncated": lambda: _gguf_head(2_000_000),
}


@pytest.mark.parametrize("fault", sorted(BROKEN_GGUFS))
def test_broken_gguf_is_one_line(tmp_path, capsys, fault):
    path = tmp_path / "model.gguf"
    path.write_bytes(BROKEN_GGUFS[fault]())
    one_line_error(capsys, ["run", "--model", str(path)], f"--model {path}: cannot be loaded")


def test_good_checkpoint_runs_and_reports_every_graph_once(checkpoint, capsys):
    assert main(["run", "--model", str(checkpoint), "--max-new-tokens", "3", "--prompt", "hi", "--no-stream"]) == 0
    out = capsys.readouterr().out
    compiled = int(out.split("graphs compiled")[1].split()[0])
    assert compiled == 2  # the prefill chunk and the decode step
    for graph in range(compiled):
        assert out.count(f"graph {graph}: ") == 1, out


def test_runtime_reports_name_the_codegen_that_lowers_the_graph():
    from slimfx.runtime.lowering import _fx_code

    gm = torch.fx.symbolic_trace(torch.nn.Identity())
    for codegen in ("eager", "inductor", "slimfx"):
        assert _fx_code(codegen)(gm, [], "eager")[1] == codegen


def test_a_note_repeated_per_layer_is_said_once():
    from slimfx.compiler.passmanager import PassResult

    result = PassResult("p", applied=False, notes=["no site has a cache"] * 30 + ["layer 3: kept"])
    assert result.summary() == "skipped: no site has a cache (x30); layer 3: kept"


# ----------------------------------------------------------------------------- run arguments


@pytest.mark.parametrize("flag, value, needle", [
    ("--temperature", "-1", "--temperature: got -1.0"),
    ("--temperature", "nan", "--temperature: got nan"),
    ("--temperature", "inf", "--temperature: got inf"),
    ("--top-p", "0", "--top-p: got 0.0"),
    ("--top-p", "nan", "--top-p: got nan"),
    ("--top-k", "-3", "--top-k: got -3"),
])
def test_sampling_arguments_are_checked_before_the_model_loads(capsys, flag, value, needle):
    # The model named does not exist: the sampling argument is refused first.
    one_line_error(capsys, ["run", "--model", "/no/such/model", flag, value], needle, "allowed:")


def test_huge_token_budget_is_refused_before_allocating(checkpoint, capsys, monkeypatch):
    from slimfx.runtime import models

    monkeypatch.setattr(models, "available_memory", lambda device: 1 << 20)  # 1 MiB free
    # 512 B of KV per token: 10,000 tokens need 4.9 MiB.
    one_line_error(capsys, ["run", "--model", str(checkpoint), "--max-new-tokens", "10000"],
                   "--max-new-tokens 10000: the KV cache for", "more than the 1.00 MiB free", "allowed: at most 2048 tokens")


def test_capacity_below_the_request_is_one_line(checkpoint, capsys):
    # "hello" is 5 tokens for the character-level tokenizer: 5 + 6 new - 1 = 10 slots written.
    one_line_error(capsys, ["run", "--model", str(checkpoint), "--prompt", "hello", "--max-new-tokens", "6", "--capacity", "4"],
                   "config error: --capacity 4: the request writes 10 KV slots per attention site",
                   "allowed: at least 10, or --sliding-window to keep only the 4 most recent tokens (lossy)")


def test_sliding_window_needs_a_capacity_and_is_checked_before_the_model_loads(capsys):
    one_line_error(capsys, ["run", "--model", "/no/such/model", "--sliding-window"], "--sliding-window without --capacity")


def test_sliding_window_opt_in_runs_and_the_table_says_so(checkpoint, capsys):
    def window_row(capacity):
        argv = ["run", "--model", str(checkpoint), "--prompt", "hello", "--max-new-tokens", "6", "--no-stream"]
        assert main(argv + ["--capacity", str(capacity), "--sliding-window"]) == 0
        return next(line for line in capsys.readouterr().out.splitlines() if "KV sliding window" in line)

    assert "4 most recent tokens per site (lossy)" in window_row(4)
    assert window_row(10).split("KV sliding window")[1].strip(" |") == "no"  # holds the whole request: nothing dropped


def test_generate_bounds_the_kv_cache_before_allocating(monkeypatch):
    from slimfx.runtime import models
    from slimfx.runtime.generate import GenerateError, generate

    monkeypatch.setattr(models, "available_memory", lambda device: 1 << 20)
    with pytest.raises(GenerateError, match=r"capacity 10240 \(prompt \+ max_new_tokens 10000\): the KV cache for 10240 tokens "
                                            r"x 2 needs 10.00 MiB, more than the 1.00 MiB free on cpu; allowed: at most 1024 tokens"):
        generate(models.tiny_model("llama_untied"), torch.ones(2, 3, dtype=torch.long), max_new_tokens=10_000)


def test_kv_bytes_per_token_counts_every_layer():
    from slimfx.runtime.models import kv_bytes_per_token, tiny_model

    assert kv_bytes_per_token(tiny_model("llama_gqa", layers=3)) == 2 * 3 * 2 * 16 * 4  # K and V, layers, kv heads, head dim, fp32


# ----------------------------------------------------------------------------- configuration files


def test_deeply_nested_toml_is_one_line(tmp_path, capsys):
    path = tmp_path / "deep.toml"
    path.write_text("a = " + "[" * 5000 + "]" * 5000 + "\n")
    one_line_error(capsys, ["config", str(path)], "nested too deep")


def test_deeply_nested_dict_is_one_line():
    value: list = []
    for _ in range(5000):
        value = [value]
    with pytest.raises(ConfigError, match="nested too deep to show"):
        validate_config({"compile": {"codegen": value}})


def test_unreadable_config_file(tmp_path, monkeypatch):
    path = tmp_path / "c.toml"
    path.write_text("[compile]\n")

    def refuse(self, *args, **kwargs):
        raise PermissionError(13, "Permission denied", str(self))

    monkeypatch.setattr(Path, "read_text", refuse)  # root reads a mode-000 file anyway
    with pytest.raises(ConfigError, match=r"cannot be read \(Permission denied\)"):
        load_config(path)


def test_config_folder_is_not_a_file(tmp_path):
    with pytest.raises(ConfigError, match="not a file"):
        load_config(tmp_path)


@pytest.mark.parametrize("selector", ["0-300000000", "5000", "1,2,4096"])
def test_huge_layer_ranges_are_refused_at_once(selector):
    import time

    start = time.perf_counter()
    with pytest.raises(ConfigError, match="out of range; allowed: layer indices 0-4095"):
        validate_config({"passes": {"kv_eviction": {"layers": {selector: {"budget": 64}}}}})
    assert time.perf_counter() - start < 1.0


def test_echoed_keys_are_escaped_and_cut(tmp_path, capsys):
    path = tmp_path / "c.toml"
    path.write_text('[passes.kv_eviction]\n"bud\\u001b[31mget\\nx" = 3\n"' + "k" * 100_000 + '" = 4\n')
    err = one_line_error(capsys, ["config", str(path)], "bud\\x1b[31mget\\nx: unknown key")
    assert "\x1b" not in err
    with pytest.raises(ConfigError) as info:
        validate_config({"artifacts": {"k" * 100_000: 3}})
    assert len(str(info.value)) < 500 and "kkk..." in str(info.value)


# ----------------------------------------------------------------------------- inspect --plan


def _plan_text(tmp_path) -> dict:
    return {"kind": "slimfx.bit_allocation", "version": 1, "formats": {"model.layers.0.mlp.up_proj.weight": "int8"},
            "linears": {"model.layers.0.mlp.up_proj.weight": {"format": "int8", "options": {"int8": {"bytes": 10, "cost": 0.1}}}},
            "totals": {"linear_bytes": 10, "linear_bytes_unquantized": 20, "kv_bytes": 0, "cost": 0.1, "exact": True,
                       "unit_bytes": 1},
            "budget": {"bytes": 10}}


PLAN_FAULTS = {
    "binary": (lambda p: os.urandom(300), "not valid JSON"),
    "no-formats": (lambda p: {k: v for k, v in p.items() if k != "formats"}, "'formats' must map"),
    "no-cost": (lambda p: {**p, "linears": {k: {"format": "int8", "options": {"int8": {"bytes": 10}}} for k in p["linears"]}},
                "lacks its format's bytes and cost"),
    "no-totals-field": (lambda p: {**p, "totals": {"cost": 1.0}}, "'totals' lacks one of"),
}


@pytest.mark.parametrize("fault", sorted(PLAN_FAULTS))
def test_inspect_bad_plan_is_one_line_before_any_model_loads(tmp_path, capsys, monkeypatch, fault):
    import json

    from slimfx.runtime import models

    def no_loading(*args, **kwargs):
        raise AssertionError("the model loaded before the plan was checked")

    monkeypatch.setattr(models, "load_model", no_loading)
    corrupt, needle = PLAN_FAULTS[fault]
    value = corrupt(_plan_text(tmp_path))
    path = tmp_path / "plan.json"
    path.write_bytes(value if isinstance(value, bytes) else json.dumps(value).encode())
    one_line_error(capsys, ["inspect", "--plan", str(path)], needle)


def test_inspect_prints_a_plan_with_formats_only(tmp_path, capsys):
    import json

    path = tmp_path / "plan.json"
    path.write_text(json.dumps({"kind": "slimfx.bit_allocation", "version": 1,
                                "formats": {"model.layers.0.mlp.up_proj.weight": "int8"}}))
    assert main(["inspect", "--tiny", "llama_untied", "--plan", str(path)]) == 0
    assert "model.layers.0.mlp.up_proj.weight" in capsys.readouterr().out


# ----------------------------------------------------------------------------- non-finite artifacts


@pytest.mark.parametrize("bad", [float("nan"), float("inf")], ids=["nan", "inf"])
def test_duo_heads_artifact_with_non_finite_scores_is_refused(tmp_path, bad):
    from slimfx.passes.kv_eviction import retrieval_heads

    scores = torch.rand(2, 2)
    path = retrieval_heads.save(scores, tmp_path / "duo.safetensors", {})
    assert torch.equal(retrieval_heads.load(path, "duo", 2, 2), scores)
    scores[1, 0] = bad
    retrieval_heads.save(scores, path, {})
    with pytest.raises(ConfigError, match="holds NaN or inf scores"):
        retrieval_heads.load(path, "duo", 2, 2)


@pytest.mark.parametrize("constant", ["NaN", "Infinity", "-Infinity"])
def test_json_plans_with_non_finite_numbers_are_refused(tmp_path, constant):
    from slimfx.passes.quantize.plan import read_plan

    path = tmp_path / "plan.json"
    path.write_text('{"kind": "slimfx.bit_allocation", "version": 1, "formats": {}, "linears": {}, "cost": %s}' % constant)
    with pytest.raises(ValueError, match=f"{constant.lstrip('-')} is not a JSON number"):
        read_plan(path)


# ----------------------------------------------------------------------------- calibrated plans, end to end


def test_calibrated_bit_plan_is_applied_by_run(checkpoint, tmp_path, capsys):
    """`slimfx calibrate bits` then `slimfx run` with that plan, both from the command
    line: every linear of the plan is quantized (none reported as skipped)."""
    import json

    text = tmp_path / "text.txt"
    text.write_text("The quick brown fox jumps over the lazy dog. " * 8)
    plan_path = tmp_path / "plan.json"
    assert main(["calibrate", "bits", "--model", str(checkpoint), "--out", str(plan_path), "--bits", "6",
                 "--candidates", "none,int8,int4_g32", "--text", str(text), "--tokens", "96"]) == 0
    plan = json.loads(plan_path.read_text())
    quantized = [f for f in plan["formats"].values() if f != "none"]
    assert len(plan["formats"]) == 14 and quantized
    config = tmp_path / "q.toml"
    config.write_text('[compile]\npipeline = "q"\n[pipelines]\nq = ["quantize"]\n[passes.quantize]\nplan = "bits"\n'
                      '[artifacts]\nbits = "plan.json"\n')
    capsys.readouterr()
    assert main(["run", "--model", str(checkpoint), "--config", str(config), "--max-new-tokens", "2", "--prompt", "hi",
                 "--no-stream"]) == 0
    out = capsys.readouterr().out
    assert out.count(f"config {config}, ") == 2  # each graph's report names the user's file
    rows = [line for line in out.splitlines() if line.startswith("quantize ")]
    assert len(rows) == 2  # prefill and decode graphs
    for row in rows:
        assert row.split()[1] == "yes" and f"{len(quantized)} nodes rewritten" in row and "(plan bits)" in row, row


def _gguf_with_blocks(path: Path, blocks: int) -> Path:
    import numpy as np
    from gguf import GGUFWriter

    writer = GGUFWriter(str(path), "llama")
    for b in range(blocks):
        writer.add_tensor(f"blk.{b}.attn_q.weight", np.zeros((4, 4), dtype=np.float32))
    writer.add_tensor("output_norm.weight", np.zeros(4, dtype=np.float32))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return path


def test_gguf_holding_more_blocks_than_its_metadata_is_refused(tmp_path):
    """transformers builds the model from block_count and drops later blocks' tensors."""
    from types import SimpleNamespace

    from slimfx.runtime.models import ModelLoadError, _check_gguf_blocks

    model = SimpleNamespace(config=SimpleNamespace(num_hidden_layers=2))
    _check_gguf_blocks("--model m", _gguf_with_blocks(tmp_path / "ok.gguf", 2), model)
    with pytest.raises(ModelLoadError, match="metadata says 2 blocks, its tensors hold blocks 0-2 \\(3\\)"):
        _check_gguf_blocks("--model m", _gguf_with_blocks(tmp_path / "edited.gguf", 3), model)


# ----------------------------------------------------------------------------- generate() inputs


@pytest.mark.parametrize("ids, kwargs, message", [
    ([[1, 2, 500]], {}, "input_ids: token id 500 is outside the vocabulary; allowed: 0-127"),
    ([[1, -2, 5]], {}, "input_ids: token id -2 is outside the vocabulary; allowed: 0-127"),
    ([[1, 2, 5]], {"capacities": {99: 16}}, "capacities: site 99 does not exist; allowed: attention sites 0-1"),
    ([[1, 2, 5]], {"capacities": {"0": 16}}, "capacities: site '0' does not exist"),
])
def test_generate_refuses_what_the_model_cannot_take(ids, kwargs, message):
    from slimfx.runtime.generate import GenerateError, generate
    from slimfx.runtime.models import tiny_model

    with pytest.raises(GenerateError) as info:
        generate(tiny_model("llama_untied"), torch.tensor(ids), max_new_tokens=2, **kwargs)
    assert str(info.value).startswith(message)


# ----------------------------------------------------------------------------- calibrate arguments


@pytest.mark.parametrize("argv, needle", [
    (["bits", "--bits", "5", "--text", "/no/such/text"], "--text /no/such/text: cannot be read (No such file or directory)"),
    (["bits", "--bits", "-3"], "--bits -3.0: allowed: a number in (0, 32]"),
    (["bits", "--bits", "nan"], "--bits nan: allowed"),
    (["bits", "--bits", "5", "--kv-context", "-5"], "--kv-context -5: allowed: an integer >= 0"),
    (["skip", "--count", "1", "--text", "/no/such/text"], "--text /no/such/text: cannot be read"),
])
def test_calibrate_arguments_are_checked_before_the_model_loads(capsys, tmp_path, argv, needle):
    out = tmp_path / "plan.json"
    one_line_error(capsys, ["calibrate", *argv, "--model", "/no/such/model", "--out", str(out)], needle)


def test_calibrate_output_that_cannot_be_written_is_refused_at_once(capsys, tmp_path):
    blocker = tmp_path / "file"
    blocker.write_text("a file where a folder is needed")
    one_line_error(capsys, ["calibrate", "bits", "--bits", "5", "--model", "/no/such/model", "--out", str(blocker / "plan.json")],
                   f"--out {blocker / 'plan.json'}: cannot be written")


def test_inspect_probe_length_is_bounded(capsys):
    one_line_error(capsys, ["inspect", "--tiny", "llama_gqa", "--tokens", "100000000"], "--tokens 100000000: allowed: an integer in [1, 4096]")


# ----------------------------------------------------------------------------- slimfx config checks what run needs


def _artifact_config(tmp_path: Path, pass_name: str, options: str, artifact: str, data) -> Path:
    """A configuration running `pass_name` with `options` (TOML lines) whose [artifacts]
    key `artifact` names a file holding `data` (bytes, a JSON value, or a writer of a path)."""
    import json

    suffix = ".json" if not callable(data) and not isinstance(data, bytes) else ".safetensors"
    path = tmp_path / f"artifact{suffix}"
    if callable(data):
        data(path)
    else:
        path.write_bytes(data if isinstance(data, bytes) else json.dumps(data).encode())
    config = tmp_path / "c.toml"
    config.write_text(f'[compile]\npipeline = "p"\n[pipelines]\np = ["{pass_name}"]\n[passes.{pass_name}]\n{options}\n'
                      f'[artifacts]\n{artifact} = "{path.name}"\n')
    return config


def _duo_scores(*shape):
    from slimfx.passes.kv_eviction import retrieval_heads

    return lambda path: retrieval_heads.save(torch.rand(*shape), path, {})


def _codebook(weight):
    from slimfx.calibrate.vq_head import build_artifact
    from slimfx.runtime.vq_head import save_artifact

    return lambda path: save_artifact(build_artifact(weight, 8, seed=0), path)


def _skip_plan(fingerprint: str) -> dict:
    return {"kind": "slimfx.layer_skip_plan", "version": 1, "target": "block", "method": "sleb", "skip": [1],
            "model": {"blocks": 2, "hidden": 64, "vocab": 128, "fingerprint": fingerprint}, "scores": {}, "calibration": {}}


DUO = 'policy = "duo"\nbudget = 16'
UNREADABLE_ARTIFACTS = {
    "bit-plan": ("quantize", 'plan = "bits"', "bits", {"kind": "other"}, "not a slimfx.bit_allocation v1 file"),
    "codebook": ("vq_logits", "", "vq_head", b"not safetensors", "not a readable safetensors file"),
    "duo-heads": ("kv_eviction", DUO, "duo_heads", _duo_scores(4), "scores are 4; allowed: [layers, kv heads]"),
    "skip-plan": ("layer_skip", 'plan = "skip"', "skip", [1, 2], "not a slimfx.layer_skip_plan v1 file"),
    "share-plan": ("kv_share", 'plan = "share"', "share", {"kind": "slimfx.kv_share_plan"}, "not a slimfx.kv_share_plan v1 file"),
}


@pytest.mark.parametrize("case", sorted(UNREADABLE_ARTIFACTS))
def test_config_loads_and_validates_every_artifact_before_any_model(tmp_path, capsys, monkeypatch, case):
    from slimfx.runtime import models

    def no_loading(*args, **kwargs):
        raise AssertionError("a model loaded though no --model was given")

    monkeypatch.setattr(models, "load_model", no_loading)
    pass_name, options, key, data, needle = UNREADABLE_ARTIFACTS[case]
    config = _artifact_config(tmp_path, pass_name, options, key, data)
    one_line_error(capsys, ["config", str(config)], "config error", needle)
    one_line_error(capsys, ["run", "--config", str(config)], "config error", needle)  # run refuses it before loading too


UNFIT_ARTIFACTS = {  # for the tiny checkpoint: 2 blocks, hidden 64, vocab 128, 2 kv heads
    "bit-plan-linear": ("quantize", 'plan = "bits"', "bits",
                        {"kind": "slimfx.bit_allocation", "version": 1, "formats": {"model.layers.9.mlp.up_proj.weight": "int8"}},
                        "1 of 1 plan entries name no linear of this model (first: 'model.layers.9.mlp.up_proj.weight')"),
    "codebook-vocab": ("vq_logits", "", "vq_head", _codebook(torch.randn(100, 64)),
                       "token_to_code covers 100 tokens; expected 128"),
    "duo-heads-shape": ("kv_eviction", DUO, "duo_heads", _duo_scores(5, 2), "scores 5 x 2 heads; this model has 2 layers x 2 kv heads"),
    "skip-plan-model": ("layer_skip", 'plan = "skip"', "skip", _skip_plan("000000000000"), "the plan was made for another model"),
    "override-layer": ("kv_eviction", 'budget = 16\n[passes.kv_eviction.layers."99"]\nbudget = 8', "unused", {},
                       "passes.kv_eviction.layers.'99': layer 99 does not exist; allowed: layers 0-1"),
}


@pytest.mark.parametrize("case", sorted(UNFIT_ARTIFACTS))
def test_config_with_a_model_refuses_artifacts_that_do_not_fit_it(checkpoint, tmp_path, capsys, case):
    pass_name, options, key, data, needle = UNFIT_ARTIFACTS[case]
    config = _artifact_config(tmp_path, pass_name, options, key, data)
    assert main(["config", str(config)]) == 0  # readable: without a model, nothing says it does not fit
    assert "not checked against a model" in capsys.readouterr().out
    one_line_error(capsys, ["config", str(config), "--model", str(checkpoint)], "config error", needle)


def test_config_with_a_model_accepts_artifacts_made_for_it(checkpoint, tmp_path, capsys):
    from safetensors.torch import load_file

    from slimfx.passes._identity import weight_fingerprint

    weights = load_file(checkpoint / "model.safetensors")
    fitting = [
        ("quantize", 'plan = "bits"', "bits",
         {"kind": "slimfx.bit_allocation", "version": 1, "formats": {"model.layers.1.mlp.up_proj.weight": "int8"}}),
        ("vq_logits", "", "vq_head", _codebook(weights["lm_head.weight"])),
        ("kv_eviction", DUO, "duo_heads", _duo_scores(2, 2)),
        ("layer_skip", 'plan = "skip"', "skip", _skip_plan(weight_fingerprint(weights["model.embed_tokens.weight"]))),
    ]
    for pass_name, options, key, data in fitting:
        config = _artifact_config(tmp_path, pass_name, options, key, data)
        assert main(["config", str(config), "--model", str(checkpoint)]) == 0, (pass_name, capsys.readouterr().err)
        assert f"artifacts fit {checkpoint}" in capsys.readouterr().out
