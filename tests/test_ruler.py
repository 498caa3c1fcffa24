"""The RULER-style suite (measure/ruler.py): prompts fit their length, hide their answers
as each task says, are seeded; scoring is string_match_all; `slimfx eval --ruler` puts
per-task accuracy in the JSON, the markdown and the plot (tiny model, character tokenizer)."""

import argparse
import collections
import json
import re

import pytest

from slimfx.measure import eval_cmd, ruler
from tests.test_measure_metrics import CharTokenizer


@pytest.fixture(scope="module")
def cases():
    return ruler.build_cases(CharTokenizer(), lengths=(1500,), samples=2, seed=5)


def test_every_task_fits_its_length_and_is_seeded(cases):
    assert [c.task for c in cases] == [t for t in ruler.TASKS for _ in range(2)]
    again = ruler.build_cases(CharTokenizer(), lengths=(1500,), samples=2, seed=5)
    other = ruler.build_cases(CharTokenizer(), lengths=(1500,), samples=2, seed=6)
    assert [c.answers for c in cases] == [c.answers for c in again]
    assert [c.answers for c in cases] != [c.answers for c in other]
    for c in cases:
        assert 1200 < c.n_tokens <= 1500, (c.task, c.n_tokens)


def test_answers_are_hidden_as_the_task_says(cases):
    tok = CharTokenizer()
    for c in cases:
        text = tok.decode(c.input_ids[0])
        body, question = text.rsplit("Question" if c.task in ("vt", "cwe", "fwe") else "What ", 1)
        if c.task.startswith("niah"):
            assert len(c.answers) == {"niah_multivalue": 4, "niah_multiquery": 2}.get(c.task, 1)
            for a in c.answers:
                assert f"is: {a}." in body
        elif c.task == "vt":
            value = re.search(r"assigned the value (\d+)", question).group(1)
            assert f"VAR {c.answers[0]} = {value}." in body
            for prev, name in zip(c.answers, c.answers[1:]):  # each link after its source
                assert body.index(f"VAR {name} = VAR {prev}.") > body.index(f"VAR {prev} =")
        else:
            words = collections.Counter(re.findall(r"[a-z]+", body.split("\n", 1)[1]))
            top = [w for w, _ in words.most_common(len(c.answers))]
            assert sorted(top) == sorted(c.answers), (c.task, words.most_common(6))


def test_score_is_the_share_of_answers_found():
    assert ruler.score("It is 1234567 and 7654321.", ("1234567", "7654321")) == 1.0
    assert ruler.score("Only APPLE here", ("apple", "pear")) == 0.5
    assert ruler.score("nothing", ("x1",)) == 0.0
    summary = ruler.summarize([{"task": "vt", "score": 1.0}, {"task": "vt", "score": 0.5}, {"task": "cwe", "score": 0.0}])
    assert summary == {"average": 0.375, "by_task": {"vt": 0.75, "cwe": 0.0}, "n": 3}


def test_eval_with_the_ruler_suite(tmp_path, monkeypatch, capsys):
    from slimfx.runtime import models
    from slimfx.runtime.models import ModelSource, tiny_model

    monkeypatch.setattr(models, "load_model", lambda *a, **k: (tiny_model("llama_gqa"), CharTokenizer()))
    monkeypatch.setattr(models, "resolve_model_source", lambda spec: ModelSource(tmp_path, None))
    monkeypatch.setattr("slimfx.measure.errors.model_source", lambda spec: None)
    monkeypatch.setattr(ruler, "NEW_TOKENS", {t: 2 for t in ruler.TASKS})
    parser = argparse.ArgumentParser()
    eval_cmd.add_arguments(parser)
    stem = tmp_path / "eval"
    args = parser.parse_args(["--sweep", "compile.pipeline=off", "--no-passkey", "--no-fidelity", "--ruler",
                              "--ruler-lengths", "500", "--ruler-samples", "1", "--ruler-tasks", "niah_single,vt",
                              "--output", str(stem), "--no-progress"])
    assert eval_cmd.main(args) == 0
    data = json.loads(stem.with_suffix(".json").read_text())
    for entry in (data["base"], data["configurations"][0]):
        assert set(entry["ruler"]["summary"]["by_task"]) == {"niah_single", "vt"}
        assert [r["task"] for r in entry["ruler"]["cases"]] == ["niah_single", "vt"]
    assert data["settings"]["ruler"]["lengths"] == [500]
    assert "RULER-style suite" in stem.with_suffix(".md").read_text()
    assert stem.with_suffix(".png").stat().st_size > 1000


def test_unknown_task_is_a_one_line_error(capsys):
    from slimfx.compiler.cli import main as cli

    assert cli(["eval", "--ruler", "--ruler-tasks", "niah_single,nope"]) == 2
    err = capsys.readouterr().err.strip()
    assert "\n" not in err and "unknown task 'nope'" in err and "niah_multikey" in err
