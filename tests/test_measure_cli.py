"""`slimfx eval` / `slimfx bench`: bad input is a one-line error (before any model
loads); bench runs end to end on CPU and writes JSON, markdown, PNG (the eval end-to-end
test is in test_measure_metrics.py, beside the tokenizer it uses)."""

from __future__ import annotations

import json

import pytest
import torch

from slimfx.compiler.cli import main as cli
from slimfx.measure.sweep import build_points, parse_axis

KV_CONFIG = "{kv_config}"  # replaced by the path of the file the kv_config fixture writes
KV_TOML = """
[compile]
pipeline = "kv"
[pipelines]
kv = ["kv_runtime", "kv_eviction"]
[passes.kv_eviction]
policy = "h2o"
budget = 256
n_sink = 4
window = 32
"""


@pytest.fixture
def kv_config(tmp_path):
    path = tmp_path / "kv.toml"
    path.write_text(KV_TOML)
    return str(path)


def _one_line_error(capsys, argv, match):
    assert cli(argv) == 2
    err = capsys.readouterr().err.strip()
    assert "\n" not in err and "Traceback" not in err
    assert match in err, err
    return err


@pytest.mark.parametrize("argv, match", [
    (["eval", "--sweep", "kv.budgte=128,256"], "did you mean 'budget'"),
    (["eval", "--sweep", "kv.budget=128,256"], "not in the active pipeline"),
    (["eval", "--config", KV_CONFIG, "--sweep", "kv.budget=8,256"], "allowed: >= 37"),
    (["eval", "--config", KV_CONFIG, "--sweep", "kv.budget=1,256"], "passes.kv_eviction.budget: got 1"),
    (["eval", "--sweep", "passes.kv_runtime.stor=a,b"], "did you mean 'store'"),
    (["eval", "--sweep", "passes.kv_runtime.store=a,b"], "not in the active pipeline"),
    (["eval", "--sweep", "budget"], "expected KEY=V1,V2"),
    (["eval", "--text", "/no/such/file.txt"], "--text /no/such/file.txt: no such file"),
    (["eval", "--lengths", "0,1024"], "--lengths"),
    (["eval", "--depths", "0.5,1.5"], "depths must lie in [0, 1]"),
    (["eval", "--pipeline", "nope"], "compile.pipeline"),
    (["eval", "--config", "/no/such.toml"], "not found"),
    (["eval", "--model", "/no/such/model"], "no such file or folder"),
    (["bench", "--device", "cpu", "--shape", "gpt-5"], "--shape gpt-5: unknown"),
    (["bench", "--device", "cpu", "--backends", "eager,tvm"], "--backends"),
    (["bench", "--device", "cpu", "--batch", "1,x"], "--batch"),
])
def test_bad_arguments_are_one_line_errors(capsys, kv_config, argv, match):
    _one_line_error(capsys, [a.replace(KV_CONFIG, kv_config) for a in argv], match)


def test_a_swept_artifact_that_does_not_load_is_refused_before_the_model(tmp_path, capsys, monkeypatch):
    import slimfx.measure.eval_run

    def no_run(*_):
        raise AssertionError("the eval ran (and loaded a model) before refusing the artifact")

    monkeypatch.setattr(slimfx.measure.eval_run, "run_eval", no_run)
    good, bad = tmp_path / "good.json", tmp_path / "bad.json"
    bad.write_text("{ not json")
    good.write_text("{}")
    config = tmp_path / "skip.toml"
    config.write_text('[compile]\npipeline = "s"\n[pipelines]\ns = ["layer_skip"]\n[passes.layer_skip]\nplan = "good"\n'
                      f'[artifacts]\ngood = "{good}"\nbad = "{bad}"\n')
    _one_line_error(capsys, ["eval", "--config", str(config), "--sweep", "skip.plan=bad"], str(bad))


@pytest.mark.skipif(torch.cuda.is_available(), reason="this machine has a GPU")
def test_bench_without_gpu_says_so(capsys):
    _one_line_error(capsys, ["bench"], "no CUDA GPU found")


def test_sweep_aliases_and_cartesian_product():
    assert parse_axis("kv.budget=128,256").path == "passes.kv_eviction.budget"
    assert parse_axis("passes.x.y=1,0.5,true,h2o").values == [1, 0.5, True, "h2o"]
    points = build_points({}, ["compile.pipeline=off,default", "compile.check_graph=true,false"])
    assert [p.values for p in points] == [
        {"compile.pipeline": "off", "compile.check_graph": True}, {"compile.pipeline": "off", "compile.check_graph": False},
        {"compile.pipeline": "default", "compile.check_graph": True}, {"compile.pipeline": "default", "compile.check_graph": False}]
    assert points[1].raw["compile"]["check_graph"] is False


def test_bench_cpu_end_to_end(tmp_path, capsys):
    stem = tmp_path / "bench"
    rc = cli(["bench", "--device", "cpu", "--shape", "tiny", "--backends", "eager", "--context", "16",
              "--steps", "2", "--warmup", "3", "--batch", "1,2", "--output", str(stem)])
    assert rc == 0
    data = json.loads(stem.with_suffix(".json").read_text())
    runs = data["models"][0]["results"][0]["runs"]
    assert [r["batch"] for r in runs] == [1, 2]
    assert all(r["decode_ms_per_token"] > 0 and r["tokens_per_s"] > 0 and r["kv_bytes"] > 0 for r in runs)
    assert data["copy_bandwidth_gbps"] > 0 and data["stamp"]["device"].startswith("CPU")
    assert stem.with_suffix(".png").stat().st_size > 1000
    assert "| eager | 2 |" in stem.with_suffix(".md").read_text()
