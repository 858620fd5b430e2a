"""``lit_align sample``: the samples file `lit_align evaluate` reads, drawn through a generation backend; resumable,
never overwriting, refusing bad options before a model is loaded. (Through an OpenAI-compatible server:
tests/generation/test_openai_backend.py.)"""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from lit_align.execution.benchmarks import load_benchmark, load_problems_file
from lit_align.generation.base import DEFAULT_STOP, SamplingParams
from lit_align.generation.hf import HFBackend
from lit_align.models import load_causal_lm, load_tokenizer
from lit_align.sample import main, problem_prompt


def _read(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines()]


def _sample(out: Path, *extra: str) -> int:
    return main(["--model", "preset:tiny", "--benchmark", "task_suite", "--num-problems", "6", "--max-new-tokens", "12",
                 "--output", str(out), *extra])


def test_greedy_samples_are_the_hf_backends_and_evaluate_scores_them(tmp_path, capsys):
    out = tmp_path / "samples.jsonl"
    assert _sample(out, "--temperature", "0", "--problems-per-call", "4") == 0
    records = _read(out)
    problems = load_benchmark("task_suite")[:6]
    assert [r["task_id"] for r in records] == [p.task_id for p in problems] and {r["sample"] for r in records} == {0}
    backend = HFBackend(load_causal_lm("preset:tiny").eval(), load_tokenizer("preset:tiny"))
    expected = backend.generate([p.prompt for p in problems], SamplingParams(max_new_tokens=12, temperature=0.0))
    assert [r["completion"] for r in records] == [c[0].text for c in expected]
    assert not (tmp_path / "samples.jsonl.partial").exists()
    assert "6/6 problems, 6 samples drawn" in capsys.readouterr().err

    from lit_align.execution.evaluate import main as evaluate

    assert evaluate(["--benchmark", "task_suite", "--samples", str(out), "--k", "1", "--no-progress"]) == 0
    summary = json.loads(capsys.readouterr().out)
    assert summary["num_samples"] == 6 and summary["num_problems"] == 6  # an untrained model: nothing passes
    assert summary["pass@1"] == 0.0


def test_an_interrupted_run_resumes_to_the_uninterrupted_runs_samples(tmp_path):
    whole = tmp_path / "whole.jsonl"
    assert _sample(whole, "--n", "2", "--problems-per-call", "2", "--sampling-seed", "7") == 0
    records = _read(whole)
    assert len(records) == 12 and len({r["completion"] for r in records}) > 6  # sampled, not greedy
    out = tmp_path / "resumed.jsonl"
    partial = tmp_path / "resumed.jsonl.partial"  # two finished calls (4 problems) and a call cut short
    partial.write_text("".join(json.dumps(r) + "\n" for r in records[:9]))
    assert _sample(out, "--n", "2", "--problems-per-call", "2", "--sampling-seed", "7") == 2  # needs --resume
    assert _sample(out, "--n", "2", "--problems-per-call", "2", "--sampling-seed", "7", "--resume") == 0
    assert _read(out) == records and not partial.exists()


def test_a_failing_backend_leaves_what_it_drew_for_resume(tmp_path, monkeypatch, capsys):
    import lit_align.sample as sample

    real = sample._build_backend

    class Failing:  # the real backend, failing on its second call (a server that went away)
        def __init__(self, args):
            self.inner, self.calls = real(args), 0

        def generate(self, prompts, params):
            self.calls += 1
            if self.calls == 2:
                raise ConnectionError("server at http://127.0.0.1:9/v1 went away")
            return self.inner.generate(prompts, params)

        def close(self):
            self.inner.close()

    monkeypatch.setattr(sample, "_build_backend", Failing)
    out = tmp_path / "s.jsonl"
    assert _sample(out, "--problems-per-call", "2") == 1
    err = capsys.readouterr().err
    assert "ConnectionError: server at http://127.0.0.1:9/v1 went away" in err and "--resume" in err
    assert not out.exists() and len(_read(tmp_path / "s.jsonl.partial")) == 2  # the first call's problems


def test_stdio_problems_ask_for_a_program_in_the_language_and_have_no_stop(tmp_path):
    problems_file = tmp_path / "cc.jsonl"
    problems_file.write_text(json.dumps({"name": "sum", "description": "Print the sum of two integers.",
                                         "public_tests": {"input": ["1 2\n"], "output": ["3\n"]}}) + "\n")
    problem = load_problems_file(problems_file)[0]
    assert problem_prompt(problem, "cpp", "### {prompt}") == (
        "### Print the sum of two integers.\n\nWrite a C++ program that reads from standard input and writes to "
        "standard output.\n")
    function = load_benchmark("task_suite")[0]
    assert problem_prompt(function) == function.prompt
    out = tmp_path / "s.jsonl"
    assert main(["--model", "preset:tiny", "--problems", str(problems_file), "--language", "cpp", "--n", "2",
                 "--max-new-tokens", "40", "--output", str(out)]) == 0
    records = _read(out)
    assert [(r["task_id"], r["language"], r["sample"]) for r in records] == [("sum", "cpp", 0), ("sum", "cpp", 1)]
    from lit_align.sample import _params, build_parser

    args = build_parser().parse_args(["--benchmark", "humaneval", "--output", "x"])
    assert _params(args, problem, 0).stop == [] and _params(args, function, 0).stop == DEFAULT_STOP
    args = build_parser().parse_args(["--benchmark", "humaneval", "--output", "x", "--stop"])
    assert _params(args, function, 0).stop == []
    args = build_parser().parse_args(["--benchmark", "humaneval", "--output", "x", "--chat-template"])
    assert _params(args, function, 0).stop == []  # a chat reply is a whole message, ended by the model's EOS


@pytest.mark.parametrize("extra, message", [
    (["--n", "0"], "--n must be >= 1"),
    (["--temperature", "-1"], "temperature must be >= 0"),
    (["--prompt-template", "no placeholder"], '--prompt-template must contain "{prompt}"'),
    (["--model", "runs/x/last.ckpt"], "is a Lightning checkpoint; export it first with `lit_align merge-lora"),
    (["--backend", "openai", "--api-key-env", "LIT_ALIGN_TEST_UNSET_KEY"], "LIT_ALIGN_TEST_UNSET_KEY: that environment"),
    (["--resume"], "there is no"),
    (["--tokenizer", "preset:tiny"], "--tokenizer names the chat template of --chat-template"),
    (["--chat-template"], "has no chat template, so chat prompts cannot be rendered"),  # preset:tiny has none
])
def test_bad_options_are_refused_by_name_before_anything_is_written(tmp_path, capsys, extra, message):
    out = tmp_path / "s.jsonl"
    assert _sample(out, *extra) == 2
    assert message in capsys.readouterr().err
    assert list(tmp_path.iterdir()) == []


def test_the_vllm_backend_without_vllm_says_how_to_install_it(tmp_path, capsys):
    import importlib.util

    if importlib.util.find_spec("vllm") is not None:
        pytest.skip("vllm is installed here")
    assert _sample(tmp_path / "s.jsonl", "--backend", "vllm") == 2
    assert "vllm" in capsys.readouterr().err and list(tmp_path.iterdir()) == []


def test_an_existing_samples_file_is_kept_unless_overwrite_says_so(tmp_path, capsys):
    out = tmp_path / "s.jsonl"
    out.write_text("mine\n")
    assert _sample(out) == 2
    assert "pass --overwrite" in capsys.readouterr().err and out.read_text() == "mine\n"
    assert _sample(out, "--overwrite", "--num-problems", "2") == 0
    assert [r["sample"] for r in _read(out)] == [0, 0]


def test_a_chat_model_is_asked_through_its_template_and_its_replies_code_is_kept(tmp_path):
    """--chat-template: each prompt as a user message through the model's chat template, no stop strings; each record
    holds the reply and the code taken from it, which is what the HumanEval protocol appends to the prompt."""
    from data_helpers import make_chat_model

    from lit_align.data_modules.chat import render_chat_prompt
    from lit_align.execution.replies import reply_completion

    model_dir = make_chat_model(tmp_path / "chat-model")
    out = tmp_path / "s.jsonl"
    assert main(["--model", str(model_dir), "--benchmark", "task_suite", "--num-problems", "3", "--max-new-tokens",
                 "12", "--temperature", "0", "--chat-template", "--output", str(out)]) == 0
    records = _read(out)
    problems = load_benchmark("task_suite")[:3]
    tokenizer = load_tokenizer(str(model_dir))
    prompts = [render_chat_prompt(tokenizer, (("user", p.prompt),)) for p in problems]
    assert prompts[0] == f"<user>{problems[0].prompt}<assistant>"
    backend = HFBackend(load_causal_lm(str(model_dir)).eval(), tokenizer)
    replies = backend.generate(prompts, SamplingParams(max_new_tokens=12, temperature=0.0, stop=[]))
    assert [r["reply"] for r in records] == [c[0].text for c in replies]
    assert [r["completion"] for r in records] == [reply_completion(p, r["reply"]) for p, r in zip(problems, records)]
