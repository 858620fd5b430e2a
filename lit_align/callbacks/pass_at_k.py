"""PassAtK: measure functional correctness while training.

At the end of each validation epoch and/or every N optimizer steps, sample ``n_samples`` completions per
held-out problem through a generation backend (by default :class:`lit_align.generation.HFBackend` on the
live policy), run them against the problems' tests in the sandbox, and log ``pass@{k}`` for each
configured k (unbiased estimator), ``compile_rate`` and ``status/<name>`` (fraction of samples per status).
"""

from __future__ import annotations

from typing import Any, Callable, Sequence

import lightning.pytorch as L
import torch

from lit_align.execution.pool import ExecutionPool
from lit_align.execution.problems import FunctionJob, FunctionProblem
from lit_align.execution.sandbox import Limits
from lit_align.execution.status import ExecutionResult

__all__ = ["PassAtK", "BackendFactory"]

BackendFactory = Callable[[L.LightningModule], Any]
"""Builds a :class:`lit_align.generation.GenerationBackend` for the module being trained."""


def _default_backend(pl_module: L.LightningModule):
    from lit_align.generation.hf import HFBackend

    model = getattr(pl_module, "model", None)
    tokenizer = getattr(pl_module, "tokenizer", None)
    if model is None or tokenizer is None:
        raise AttributeError(
            f"PassAtK's default backend needs pl_module.model and pl_module.tokenizer; {type(pl_module).__name__} "
            "has none (pass backend_factory=...)"
        )
    return HFBackend(model, tokenizer)


def _shards_weights(strategy) -> bool:
    """FSDP, or DeepSpeed ZeRO-3: each process holds a shard of every weight, gathered collectively per forward."""
    from lightning.pytorch.strategies import DeepSpeedStrategy, FSDPStrategy

    return isinstance(strategy, FSDPStrategy) or (isinstance(strategy, DeepSpeedStrategy) and strategy.zero_stage_3)


def _load_problems(problems: str | Sequence[FunctionProblem], seed: int) -> list[FunctionProblem]:
    if not isinstance(problems, str):
        loaded = list(problems)
    elif problems in ("task_suite", "humaneval"):
        from lit_align.execution.benchmarks import load_benchmark

        loaded = list(load_benchmark(problems, seed=seed))
    else:
        from lit_align.execution.benchmarks import load_problems_file

        loaded = list(load_problems_file(problems))
    bad = [type(p).__name__ for p in loaded if not isinstance(p, FunctionProblem)]
    if bad:
        raise ValueError(f"PassAtK needs function problems (HumanEval protocol); got {bad[0]} from {problems!r}")
    if not loaded:
        raise ValueError(f"PassAtK: no problems in {problems!r}")
    return loaded


def sample_and_score(backend, problems: Sequence[FunctionProblem], params, k: Sequence[int],
                     pool: ExecutionPool | None = None, deadline_s: float | None = None, chat_tokenizer=None,
                     ) -> tuple[dict[str, float], list[list[ExecutionResult]]]:
    """Sample ``params.n`` completions per problem with ``backend``, run them, and compute the metrics.

    With ``chat_tokenizer`` (a chat model's) each prompt is asked as a user message through its chat template and the
    code in each reply is run (:mod:`lit_align.execution.replies`). Returns ``(metrics, results)``: ``pass@{k}``
    (unbiased estimator), ``compile_rate``, ``status/<name>`` fractions and ``solved`` (problems with at least one
    passing sample); ``results[i]`` are problem i's execution results.
    """
    from lit_align.data_modules.chat import render_chat_prompt
    from lit_align.execution.evaluate import evaluate_samples
    from lit_align.execution.replies import reply_completion

    prompts = [p.prompt for p in problems]
    if chat_tokenizer is not None:
        prompts = [render_chat_prompt(chat_tokenizer, (("user", prompt),)) for prompt in prompts]
    with torch.no_grad():
        completions = backend.generate(prompts, params)
    if len(completions) != len(problems):
        raise RuntimeError(f"the generation backend returned {len(completions)} lists for {len(problems)} prompts")
    jobs = [FunctionJob(problem, reply_completion(problem, sample.text) if chat_tokenizer is not None else sample.text)
            for problem, samples in zip(problems, completions) for sample in samples]
    results, summary = evaluate_samples(jobs, k, pool=pool, deadline_s=deadline_s)
    grouped = [results[i * params.n:(i + 1) * params.n] for i in range(len(problems))]
    metrics = {f"pass@{v}": summary[f"pass@{v}"] for v in k if f"pass@{v}" in summary}
    metrics["compile_rate"] = summary["compile_rate"]
    metrics["solved"] = float(sum(any(r.passed for r in group) for group in grouped))
    for name, count in summary["status_counts"].items():
        metrics[f"status/{name}"] = count / max(1, len(results))
    return metrics, grouped


class PassAtK(L.Callback):
    """Sample, execute and log pass@k on held-out problems during training.

    Args:
        problems: ``"task_suite"`` (its held-out split), ``"humaneval"``, a HumanEval-format problems file, or a
            list of :class:`FunctionProblem`.
        num_problems: evaluate on the first N problems only (null: all).
        n_samples: completions sampled per problem (the n of the pass@k estimator).
        k: the k values to log (each at most ``n_samples``).
        every_n_train_steps: also evaluate every N optimizer steps (null: only at validation end).
        on_validation: evaluate at the end of every validation epoch (not during the sanity check).
        max_new_tokens: most tokens per completion.
        temperature: sampling temperature (0: greedy).
        top_p: nucleus sampling threshold.
        seed: sampling seed (the same seed and weights give the same completions).
        timeout_s: wall-clock seconds per program run, not counting time it waits for a CPU (``Limits.timeout_s``).
        batch_deadline_s: wall-clock seconds for executing one evaluation's samples.
        max_workers: parallel runs (null: two per CPU).
        prefix: prepended to every logged name (e.g. ``"val/"``).
        backend_factory: builds the generation backend from the module (null: HFBackend on ``model``/``tokenizer``).
        chat_template: the model is a chat model: ask each problem as a user message through the module's tokenizer's
            chat template and run the code in each reply (:mod:`lit_align.execution.replies`).
    """

    def __init__(
        self,
        problems: str | Sequence[FunctionProblem] = "task_suite",
        num_problems: int | None = 16,
        n_samples: int = 10,
        k: Sequence[int] = (1, 5, 10),
        every_n_train_steps: int | None = None,
        on_validation: bool = True,
        max_new_tokens: int = 128,
        temperature: float = 0.8,
        top_p: float = 0.95,
        seed: int = 0,
        timeout_s: float = 3.0,
        batch_deadline_s: float | None = 300.0,
        max_workers: int | None = None,
        prefix: str = "",
        backend_factory: BackendFactory | None = None,
        chat_template: bool = False,
    ) -> None:
        super().__init__()
        if n_samples < 1:
            raise ValueError(f"PassAtK n_samples must be >= 1, got {n_samples}")
        k = [int(v) for v in k]
        if not k or any(v < 1 or v > n_samples for v in k):
            raise ValueError(f"PassAtK k values must be between 1 and n_samples={n_samples}, got {k}")
        if every_n_train_steps is not None and every_n_train_steps < 1:
            raise ValueError(f"PassAtK every_n_train_steps must be >= 1 or null, got {every_n_train_steps}")
        if num_problems is not None and num_problems < 1:
            raise ValueError(f"PassAtK num_problems must be >= 1 or null, got {num_problems}")
        self.problems_source = problems
        self.num_problems = num_problems
        self.n_samples = n_samples
        self.k = k
        self.every_n_train_steps = every_n_train_steps
        self.on_validation = on_validation
        self.max_new_tokens = max_new_tokens
        self.temperature = temperature
        self.top_p = top_p
        self.seed = seed
        self.prefix = prefix
        self.backend_factory = backend_factory or _default_backend
        self.chat_template = chat_template
        self.batch_deadline_s = batch_deadline_s
        self.pool = ExecutionPool(limits=Limits(timeout_s=timeout_s), max_workers=max_workers)
        self._problems: list[FunctionProblem] | None = None
        self._last_step: int | None = None
        self.last_metrics: dict[str, float] = {}
        """Metrics of the most recent evaluation."""
        self.last_results: list[list[ExecutionResult]] = []
        """Per problem, its samples' results in the most recent evaluation."""

    @property
    def problems(self) -> list[FunctionProblem]:
        """The held-out problems (loaded on first use)."""
        if self._problems is None:
            loaded = _load_problems(self.problems_source, self.seed)
            self._problems = loaded[: self.num_problems] if self.num_problems else loaded
        return self._problems

    def setup(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str) -> None:
        _ = self.problems  # fail at setup, not after an hour of training, when the problems cannot be read
        if self.chat_template:  # nor when the tokenizer has no chat template
            from lit_align.data_modules.chat import require_chat_template

            require_chat_template(self._chat_tokenizer(pl_module))
        if self.backend_factory is _default_backend and trainer.world_size > 1 and _shards_weights(trainer.strategy):
            raise ValueError(
                f"PassAtK samples on rank 0 with the live policy, but trainer.strategy "
                f"({type(trainer.strategy).__name__}) shards its weights: every forward pass gathers them from all "
                "processes, so rank 0 alone would wait forever. Evaluate through a server (backend_factory building "
                "an OpenAI-compatible or vLLM backend), train with ddp or deepspeed_stage_2, or evaluate the model LoRAMerge "
                "exports after training")

    # ------------------------------------------------------------------ hooks
    def on_train_batch_end(self, trainer: L.Trainer, pl_module: L.LightningModule, outputs: Any, batch: Any,
                           batch_idx: int) -> None:
        step = trainer.global_step
        if not self.every_n_train_steps or step == 0 or step % self.every_n_train_steps or step == self._last_step:
            return
        self._last_step = step
        self._evaluate_and_log(trainer, pl_module, on_step=True)

    def on_validation_epoch_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if not self.on_validation or trainer.sanity_checking:
            return
        self._evaluate_and_log(trainer, pl_module, on_step=False)

    # ------------------------------------------------------------------ work
    def evaluate(self, pl_module: L.LightningModule) -> dict[str, float]:
        """Sample, execute and compute the metrics (without logging them)."""
        from lit_align.generation.base import SamplingParams

        params = SamplingParams(max_new_tokens=self.max_new_tokens, temperature=self.temperature, top_p=self.top_p,
                                n=self.n_samples, seed=self.seed)
        was_training = pl_module.training
        pl_module.eval()
        try:
            metrics, self.last_results = sample_and_score(
                self.backend_factory(pl_module), self.problems, params, self.k, pool=self.pool,
                deadline_s=self.batch_deadline_s, chat_tokenizer=self._chat_tokenizer(pl_module))
        finally:
            pl_module.train(was_training)
        return metrics

    def _chat_tokenizer(self, pl_module: L.LightningModule):
        """The module's tokenizer when the model is a chat model (``chat_template``), else None."""
        if not self.chat_template:
            return None
        tokenizer = getattr(pl_module, "tokenizer", None)
        if tokenizer is None and getattr(pl_module, "tokenizer_source", None):  # at setup, before configure_model
            from lit_align.models import load_tokenizer

            tokenizer = load_tokenizer(pl_module.tokenizer_source)
        if tokenizer is None:
            raise AttributeError(f"PassAtK chat_template needs pl_module.tokenizer; {type(pl_module).__name__} has "
                                 "none")
        return tokenizer

    def _evaluate_and_log(self, trainer: L.Trainer, pl_module: L.LightningModule, on_step: bool) -> None:
        if not trainer.is_global_zero:  # only rank 0 samples and executes
            return
        metrics = self.evaluate(pl_module)
        self.last_metrics = {self.prefix + name: float(value) for name, value in metrics.items()}
        for name, value in self.last_metrics.items():
            pl_module.log(name, value, rank_zero_only=True, on_step=on_step, on_epoch=not on_step)
