"""PassAtK: samples through a generation backend, executes in the sandbox, logs pass@k / compile rate / statuses."""

from __future__ import annotations

import lightning.pytorch as L
import pytest

from lit_align.callbacks.pass_at_k import PassAtK
from lit_align.data_modules.sft import SFTDataModule
from lit_align.data_modules.sources import DataSource
from lit_align.data_modules.task_suite import load_task_suite
from lit_align.execution import FunctionProblem
from lit_align.generation.base import Completion, GenerationBackend, SamplingParams
from lit_align.modules.base import OptimizerConfig
from lit_align.modules.sft import SFT

TASKS = load_task_suite(split="heldout")[:3]
PROBLEMS = [FunctionProblem.from_dict(t.to_dict()) for t in TASKS]
BARE = {t.task_id: dict(t.incorrect_solutions)["bare_pass"] for t in TASKS}


class ScriptedBackend(GenerationBackend):
    """Returns known completions: problem 0 two canonical ones, problem 1 canonical + bare pass, problem 2
    bare pass + a syntax error."""

    def __init__(self):
        self.calls = []

    def generate(self, prompts, params: SamplingParams):
        self.calls.append((list(prompts), params))
        plan = [
            [TASKS[0].canonical_solution, TASKS[0].canonical_solution],
            [TASKS[1].canonical_solution, BARE[TASKS[1].task_id]],
            [BARE[TASKS[2].task_id], "    return (\n"],
        ]
        assert [p for p in prompts] == [t.prompt for t in TASKS]
        return [[Completion(text=t, token_ids=[], logprobs=None, finish_reason="stop") for t in texts[: params.n]]
                for texts in plan]


def _trainer(tmp_path, callback, max_steps=2, **kw):
    return L.Trainer(max_steps=max_steps, accelerator="cpu", logger=False, enable_progress_bar=False,
                     enable_model_summary=False, enable_checkpointing=False, default_root_dir=tmp_path,
                     callbacks=[callback], num_sanity_val_steps=0, **kw)


def _data(pairs_file, val_fraction=0.0):
    return SFTDataModule(train_sources=[DataSource(path=pairs_file)], val_fraction=val_fraction,
                         tokenizer="preset:tiny", batch_size=4, max_length=96)


def test_logged_metrics_match_the_executed_statuses(tmp_path, pairs_file):
    backend = ScriptedBackend()
    callback = PassAtK(problems=PROBLEMS, n_samples=2, k=[1, 2], every_n_train_steps=1, on_validation=False,
                       prefix="heldout/", backend_factory=lambda module: backend)
    trainer = _trainer(tmp_path, callback, max_steps=2, limit_val_batches=0)
    trainer.fit(SFT(optimizer=OptimizerConfig(lr=1e-3)), datamodule=_data(pairs_file))
    assert len(backend.calls) == 2  # steps 1 and 2
    assert backend.calls[0][1].n == 2
    metrics = trainer.callback_metrics
    # pass@1: problem 0 -> 1, problem 1 -> 1/2, problem 2 -> 0; pass@2: 1, 1, 0.
    assert float(metrics["heldout/pass@1"]) == pytest.approx(0.5)
    assert float(metrics["heldout/pass@2"]) == pytest.approx(2 / 3)
    assert float(metrics["heldout/compile_rate"]) == pytest.approx(5 / 6)
    assert float(metrics["heldout/status/passed"]) == pytest.approx(3 / 6)
    assert float(metrics["heldout/status/failed"]) == pytest.approx(2 / 6)
    assert float(metrics["heldout/status/syntax_error"]) == pytest.approx(1 / 6)
    assert float(metrics["heldout/status/timeout"]) == 0.0
    assert [[r.status.value for r in rs] for rs in callback.last_results] == [
        ["passed", "passed"], ["passed", "failed"], ["failed", "syntax_error"]]


def test_validation_end_with_the_tiny_models_own_samples(tmp_path, pairs_file):
    callback = PassAtK(problems="task_suite", num_problems=2, n_samples=2, k=[1, 2], on_validation=True,
                       max_new_tokens=12, temperature=1.0, seed=0)
    trainer = _trainer(tmp_path, callback, max_steps=1, limit_val_batches=1, val_check_interval=1)
    module = SFT(optimizer=OptimizerConfig(lr=1e-3))
    trainer.fit(module, datamodule=_data(pairs_file, val_fraction=0.25))
    metrics = {k: float(v) for k, v in trainer.callback_metrics.items()}
    statuses = [r.status.value for rs in callback.last_results for r in rs]
    assert len(statuses) == 4
    for name in ("passed", "failed", "runtime_error", "syntax_error", "timeout", "memory_limit"):
        assert metrics[f"status/{name}"] == pytest.approx(statuses.count(name) / 4)
    per_problem = [sum(r.passed for r in rs) / 2 for rs in callback.last_results]
    assert metrics["pass@1"] == pytest.approx(sum(per_problem) / 2)
    assert metrics["compile_rate"] == pytest.approx(1 - statuses.count("syntax_error") / 4)
    assert module.training  # the callback put the module back in training mode


def test_bad_configuration_is_rejected_early():
    with pytest.raises(ValueError, match="k values must be between 1 and n_samples=4"):
        PassAtK(n_samples=4, k=[1, 5])
    with pytest.raises(ValueError, match="every_n_train_steps must be >= 1"):
        PassAtK(every_n_train_steps=0)
    with pytest.raises(FileNotFoundError, match="problems file not found"):
        _ = PassAtK(problems="/nonexistent/problems.jsonl").problems


def test_default_backend_is_refused_under_a_strategy_that_shards_weights():
    """Rank 0 alone samples: under FSDP or ZeRO-3 its forward passes would wait for the other processes' gathers."""
    from types import SimpleNamespace

    from fsdp_cpu import CPUFSDPStrategy
    from lightning.pytorch.strategies import DDPStrategy

    callback = PassAtK(problems=PROBLEMS, n_samples=2, k=[1])
    with pytest.raises(ValueError, match=r"PassAtK samples on rank 0.*CPUFSDPStrategy.*shards its weights"):
        callback.setup(SimpleNamespace(world_size=2, strategy=CPUFSDPStrategy()), None, "fit")
    callback.setup(SimpleNamespace(world_size=2, strategy=DDPStrategy()), None, "fit")  # whole weights per process
    callback.setup(SimpleNamespace(world_size=1, strategy=CPUFSDPStrategy()), None, "fit")  # one process: no peers
    served = PassAtK(problems=PROBLEMS, n_samples=2, k=[1], backend_factory=lambda module: None)
    served.setup(SimpleNamespace(world_size=2, strategy=CPUFSDPStrategy()), None, "fit")  # a server samples instead


def test_a_chat_model_is_asked_through_its_template_and_the_code_in_its_replies_runs(tmp_path):
    from data_helpers import make_chat_model

    from lit_align.data_modules.chat import render_chat_prompt
    from lit_align.data_modules.sources import DataError

    class ChatBackend(GenerationBackend):
        def __init__(self):
            self.prompts = []

        def generate(self, prompts, params):
            self.prompts = list(prompts)
            replies = [[f"```python\n{t.prompt}{t.canonical_solution}```", f"```python\n{t.prompt}    pass\n```"]
                       for t in TASKS]  # per problem: the function written again, and with a bare body
            return [[Completion(text=r, token_ids=[], logprobs=None, finish_reason="stop") for r in rs] for rs in replies]

    module = SFT(model_name_or_path=make_chat_model(tmp_path / "chat-model"))
    module.configure_model()
    backend = ChatBackend()
    callback = PassAtK(problems=PROBLEMS, n_samples=2, k=[1, 2], chat_template=True,
                       backend_factory=lambda module: backend)
    metrics = callback.evaluate(module)
    assert backend.prompts == [render_chat_prompt(module.tokenizer, (("user", t.prompt),)) for t in TASKS]
    assert metrics["pass@1"] == pytest.approx(0.5) and metrics["pass@2"] == pytest.approx(1.0)  # whole functions run
    assert [[r.status.value for r in rs] for rs in callback.last_results] == [["passed", "failed"]] * 3
    plain = SFT()  # the tiny preset's tokenizer has no chat template: refused at setup, before any training
    with pytest.raises(DataError, match="has no chat template"):
        PassAtK(problems=PROBLEMS, chat_template=True).setup(L.Trainer(accelerator="cpu", logger=False), plain, "fit")
