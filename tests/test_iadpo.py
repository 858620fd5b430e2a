"""IADPO rounds: student/oracle triplets, fresh exercises of the same template, resume at the next round, bad input."""

import json

import pytest

from lit_align.data_modules.task_suite import CodeTask, load_task_suite, read_jsonl
from lit_align.iadpo import (
    IADPOConfig,
    IADPOError,
    TaskSuiteOracle,
    fresh_template_tasks,
    load_config,
    main,
    parse_exercise,
    round_triplets,
    run_rounds,
)


def _task():
    return next(t for t in load_task_suite(split="train", seed=0) if t.task_id.startswith("suite/arithmetic/add_const/"))


def test_student_failures_are_rejected_and_passing_students_fall_back_to_incorrect_solutions():
    a, b = load_task_suite(split="train", seed=0)[:2]
    chosen = [a.canonical_solution, b.canonical_solution]
    answers = [["    return 0\n", a.canonical_solution, "    return 0\n"], [b.canonical_solution]]
    passed = [[False, True, False], [True]]
    rows, counts = round_triplets([a, b], chosen, answers, passed, max_pairs=2, seed=0)
    a_rows = [r for r in rows if r["source_id"] == a.task_id]
    b_rows = [r for r in rows if r["source_id"] == b.task_id]
    assert [(r["rejected"], r["origin"]) for r in a_rows] == [("    return 0\n", "student")]  # deduplicated
    assert len(b_rows) == 2 and all(r["origin"] == "fallback" for r in b_rows)
    assert {r["rejected"] for r in b_rows} <= {c for _, c in b.incorrect_solutions}
    assert all(r["chosen"] == b.canonical_solution for r in b_rows)
    assert counts["student_rejected"] == 1 and counts["fallback_rejected"] == 2
    assert counts["student_pass_rate"] == pytest.approx(2 / 4)


def test_fresh_exercises_share_the_template_and_use_unused_parameters():
    task = _task()
    used = {t.task_id for t in load_task_suite(seed=0)}
    new = fresh_template_tasks(task, 3, used, base_seed=0)
    assert len(new) == 3 and len({t.task_id for t in new}) == 3
    assert all(t.task_id.startswith("suite/arithmetic/add_const/") and t.task_id not in used for t in new)
    assert all(t.split == "train" and t.family == "arithmetic" and t.incorrect_solutions for t in new)
    oracle = TaskSuiteOracle()
    assert oracle.answers([task]) == [task.canonical_solution]
    # two hard tasks of one template never get the same new exercise
    twice = oracle.new_exercises([task, task], 2, used)
    assert len({t.task_id for t in twice}) == 4


def test_endpoint_oracle_answer_is_parsed_into_an_exercise_and_garbage_is_dropped():
    like = _task()
    text = 'Sure: {"prompt": "def f(x):\\n", "entry_point": "f", "canonical_solution": "    return x\\n", ' \
           '"test": "def check(candidate):\\n    assert candidate(1) == 1\\n"} done'
    ex = parse_exercise(text, like, "suite/arithmetic/add_const/oracle-0")
    assert isinstance(ex, CodeTask) and ex.entry_point == "f" and ex.family == "arithmetic"
    assert parse_exercise("no json here", like, "x") is None
    assert parse_exercise('{"prompt": "p"}', like, "x") is None


def test_bad_config_is_refused_with_the_key_named(tmp_path):
    with pytest.raises(IADPOError, match="rounds must be >= 1"):
        IADPOConfig(fit={"model": {}}, rounds=0)
    with pytest.raises(IADPOError, match="hard_fraction"):
        IADPOConfig(fit={"model": {}}, hard_fraction=2.0)
    for key, value in (("prompt_template", "# {prompt}"), ("chat_template", True)):  # pairs on prompts never sampled
        with pytest.raises(IADPOError, match=rf"fit.data.init_args.{key}: .* is not supported: the student samples"):
            IADPOConfig(fit={"model": {}, "data": {"init_args": {key: value}}})
    IADPOConfig(fit={"model": {}, "data": {"init_args": {"prompt_template": "{prompt}", "chat_template": False}}})
    bad = tmp_path / "bad.yaml"
    bad.write_text("rounds: 1\nfit: {model: {}}\nroundz: 3\n")
    with pytest.raises(IADPOError, match=r"unknown key\(s\) \['roundz'\]"):
        load_config(bad)
    assert main(["--config", str(tmp_path / "missing.yaml"), "--output", str(tmp_path / "out")]) == 2


def test_set_replaces_a_dotted_key_and_a_bad_one_is_refused_before_anything_is_written(tmp_path, capsys):
    """``--set KEY VALUE`` as the command line's override: the value read as YAML at a dotted key of the config
    (nested mappings made where missing); an unknown key of the student, an option the fit section's classes do not
    have, or a value of the wrong type is refused naming it, and the output directory is not made."""
    from lit_align.iadpo import set_dotted

    config = tmp_path / "iadpo.yaml"
    config.write_text("rounds: 1\nstudent: {samples: 2}\nfit:\n  model:\n    class_path: lit_align.modules.dpo.DPO\n"
                      "    init_args: {model_name_or_path: preset:tiny, beta: 0.5}\n")
    loaded = load_config(config, {"student.samples": 4, "fit.model.init_args.beta": 0.1, "fit.trainer.max_steps": 2,
                                  "oracle.max_seeds": 7})
    assert loaded.student.samples == 4 and loaded.oracle.max_seeds == 7
    assert loaded.fit["model"]["init_args"] == {"model_name_or_path": "preset:tiny", "beta": 0.1}
    assert loaded.fit["trainer"] == {"max_steps": 2}
    with pytest.raises(IADPOError, match=r"--set rounds.x: rounds holds 3, not a mapping"):
        set_dotted({"rounds": 3}, "rounds.x", 1)
    out = tmp_path / "out"
    for args, message in [
        (["student.samplez", "3"], "unknown key(s) ['student.samplez']; student has ['batch_size', 'max_new_tokens', "
                                   "'samples', 'temperature']"),
        (["fit.model.init_args.betaa", "0.1"], "iadpo config's fit: model.init_args.betaa: DPO has no such option "
                                               "('lit_align fit --model.help DPO' lists them)\n  hint: did you mean "
                                               "--model.init_args.beta?"),
        (["fit.model.init_args.beta", "abc"], "iadpo config's fit: model.init_args.beta: Expected a <class 'float'>. "
                                              "Got value: abc"),
    ]:
        assert main(["--config", str(config), "--output", str(out), "--set", *args]) == 2
        assert message in capsys.readouterr().err
        assert not out.exists()


def test_missing_student_model_is_refused_before_anything_is_written(tmp_path, capsys):
    config = tmp_path / "iadpo.yaml"
    config.write_text("rounds: 1\nfit:\n  model:\n    class_path: lit_align.modules.dpo.DPO\n    init_args:\n"
                      f"      model_name_or_path: {tmp_path / 'no-such-model'}\n")
    assert main(["--config", str(config), "--output", str(tmp_path / "out")]) == 2
    err = capsys.readouterr().err
    assert "no-such-model" in err and "configs/quickstart/sft.yaml" in err
    assert not (tmp_path / "out").exists()


def _config(rounds):
    fit = {
        "trainer": {"accelerator": "cpu", "devices": 1, "max_steps": 3, "enable_progress_bar": False,
                    "enable_model_summary": False, "limit_val_batches": 0, "num_sanity_val_steps": 0,
                    "callbacks": [{"class_path": "lit_align.callbacks.margin_resampling.MarginResampling",
                                   "init_args": {"temperature": 0.5}}]},
        "model": {"class_path": "lit_align.modules.dpo.DPO",
                  "init_args": {"model_name_or_path": "preset:tiny", "beta": 0.5,
                                "lora": {"r": 4, "alpha": 8, "dropout": 0.0},
                                "optimizer": {"lr": 1e-2, "warmup_steps": 0}}},
        "data": {"class_path": "lit_align.data_modules.preference.PreferenceDataModule",
                 "init_args": {"batch_size": 4, "eval_batch_size": 16, "max_length": 512}},
    }
    return IADPOConfig(fit=fit, rounds=rounds, train_limit=5, heldout_limit=3, max_pairs_per_exercise=2,
                       hard_fraction=0.4, new_per_hard=1, student={"samples": 1, "max_new_tokens": 8, "batch_size": 8})


@pytest.mark.slow
def test_a_run_stopped_after_round_one_resumes_at_round_two_with_its_dataset(tmp_path):
    out = tmp_path / "iadpo"
    first = run_rounds(_config(rounds=1), out, merge=False)
    assert [m["round"] for m in first] == [0]
    assert json.loads((out / "state.json").read_text()) == {"completed_rounds": 1}
    dataset = read_jsonl(out / "round_0" / "next_tasks.jsonl")
    assert len(dataset) == 5 + 2  # 40% of 5 exercises were hard, one new exercise each
    assert first[0]["heldout_margin_before"] == 0.0  # zero-initialised adapter: policy == reference
    round0_tasks = (out / "round_0" / "tasks.jsonl").read_bytes()

    second = run_rounds(_config(rounds=2), out, merge=True)
    assert [m["round"] for m in second] == [0, 1]
    assert (out / "round_0" / "tasks.jsonl").read_bytes() == round0_tasks  # round 0 was not run again
    assert [t.task_id for t in read_jsonl(out / "round_1" / "tasks.jsonl")] == [t.task_id for t in dataset]
    # round 1 started from round 0's adapter: its held-out margin before training is round 0's after
    assert second[1]["heldout_margin_before"] == pytest.approx(second[0]["heldout_margin"], abs=1e-4)
    assert second[1]["heldout_margin_before"] != 0.0
    assert (out / "model" / "config.json").is_file()
    # nothing left to do: a third call runs no round and refuses nothing (the model is there)
    assert [m["round"] for m in run_rounds(_config(rounds=2), out, merge=True)] == [0, 1]


class ScriptedBackend:
    """A generation backend that answers each prompt with the reply its function gives, recording the requests."""

    def __init__(self, reply):
        self.reply, self.requests = reply, []

    def generate(self, prompts, params):
        from lit_align.generation import Completion

        self.requests.append((list(prompts), params))
        return [[Completion(text=self.reply(p), token_ids=[], logprobs=None, finish_reason="stop")] for p in prompts]


def test_an_oracles_answers_are_checked_and_a_chat_oracles_replies_become_function_bodies():
    from lit_align.iadpo import ANSWER_PROMPT, EndpointOracle

    a, b = load_task_suite(split="train", seed=0)[:2]
    right = {a.prompt: a.canonical_solution, b.prompt: "    return None\n"}  # b's answer fails its tests

    def whole_function(prompt):  # a chat model's reply: prose, and the whole function in a fence
        task = a if a.prompt in prompt else b
        return f"Here it is:\n```python\nimport math\n\n{task.prompt}{right[task.prompt]}\nprint('example')\n```\n"

    chat = EndpointOracle(ScriptedBackend(whole_function), chat=True)
    answers = chat.answers([a, b])
    (prompts, params), = chat.backend.requests
    assert prompts == [ANSWER_PROMPT.format(prompt=t.prompt) for t in (a, b)] and params.stop == []
    # the function's body after its docstring, the import after it, the example call dropped; b's answer failed
    assert answers == [a.canonical_solution + "\n\nimport math\n", None] and chat.failed_answers == 1
    plain = EndpointOracle(ScriptedBackend(lambda p: right[p]))
    assert plain.answers([a, b]) == [a.canonical_solution, None] and plain.failed_answers == 1
    assert plain.backend.requests[0][0] == [a.prompt, b.prompt] and plain.backend.requests[0][1].stop  # continuations
    rows, counts = round_triplets([a, b], [a.canonical_solution, None], [["    return 0\n"], ["    return 0\n"]],
                                  [[False], [False]], max_pairs=2, seed=0)
    assert [r["source_id"] for r in rows] == [a.task_id] and counts["no_oracle_answer"] == 1


def test_a_chat_oracle_with_an_api_key_is_built_from_config(monkeypatch):
    from lit_align.iadpo import build_oracle

    monkeypatch.setenv("ORACLE_KEY", "sk-test")
    oracle = build_oracle(IADPOConfig(fit={"model": {}}, oracle={"kind": "openai", "base_url": "https://api.example/v1",
                                                                  "model": "big", "chat": True,
                                                                  "api_key_env": "ORACLE_KEY"}))
    assert (oracle.chat, oracle.backend.chat, oracle.backend.api_key) == (True, True, "sk-test")
    monkeypatch.delenv("ORACLE_KEY")
    with pytest.raises(IADPOError, match="oracle.api_key_env: the environment variable ORACLE_KEY is not set"):
        IADPOConfig(fit={"model": {}}, oracle={"kind": "openai", "api_key_env": "ORACLE_KEY"})
    with pytest.raises(IADPOError, match="oracle.chat and oracle.api_key_env are for oracle.kind: openai"):
        IADPOConfig(fit={"model": {}}, oracle={"chat": True})
