"""Iterative adversarial DPO (the adversarial report's IADPO): rounds of student answers, DPO, and harder exercises.

    python -m lit_align.iadpo --config configs/quickstart/iadpo.yaml --rounds 3 --output runs/iadpo

Each round:

1. the student (the policy being trained, with its one LoRA adapter) answers every exercise of the dataset; answers
   are run against the exercise's tests through :mod:`lit_align.execution` (never in this process), and the failing
   ones become the rejected side; the oracle's answer is the chosen side. Where the student passed every time, the
   exercise's known-incorrect solutions stand in as rejected;
2. DPO trains the adapter on those triplets (``Trainer.fit`` built from the ``fit`` section of the config, as
   ``lit_align fit`` would build it; put :class:`~lit_align.callbacks.margin_resampling.MarginResampling` there);
3. every training pair is scored with the trained policy; the ``hard_fraction`` of exercises with the lowest mean
   margin go to the oracle, which writes ``new_per_hard`` new exercises of the same kind for each; they join the
   dataset of the next round.

One adapter is kept across rounds (the reference stays the adapter-disabled base model) and merged into the base at
the end (``<output>/model``). Each round writes ``round_<r>/`` (its exercises, triplets, logs, ``adapter.ckpt``, the
next round's exercises and ``metrics.json``) and then ``state.json``, so a stopped run resumes at its first unfinished
round, from the adapter and dataset of the last finished one. Held-out pairs (the task suite's held-out split,
canonical solution over each incorrect one) are scored before and after every round: ``heldout_margin`` should grow.

The oracle is the task suite offline (``kind: task_suite``: the canonical solution answers; new exercises are fresh
parameters of the same template) or any OpenAI-compatible endpoint (``kind: openai``; see docs/iadpo.md for the
prompt it gets). Registered as ``lit_align iadpo`` through ``lit_align.iadpo:main``.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import math
import os
import random
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal, Protocol, Sequence

import torch

from lit_align.data_modules.task_suite import CodeTask, load_task_suite, read_jsonl, write_jsonl
from lit_align.hints import HintingArgumentParser
from lit_align.models import ModelLoadError, load_tokenizer

log = logging.getLogger(__name__)


class IADPOError(ValueError):
    """A bad IADPO configuration or output directory."""


# ------------------------------------------------------------------------------------------------------ configuration
@dataclass
class StudentConfig:
    """How the student answers the exercises."""

    samples: int = 2
    """Answers per exercise."""
    max_new_tokens: int = 96
    """Longest answer, in tokens."""
    temperature: float = 0.8
    """Sampling temperature (0: greedy, then samples > 1 repeat one answer)."""
    batch_size: int = 32
    """Sequences decoded together."""


@dataclass
class OracleConfig:
    """Who writes the chosen answers and the new exercises."""

    kind: Literal["task_suite", "openai"] = "task_suite"
    """task_suite: offline, the suite's canonical solutions and fresh parameters; openai: an OpenAI-compatible server."""
    base_url: str = "http://127.0.0.1:8000/v1"
    """openai: the server's base URL."""
    model: str | None = None
    """openai: the served model's name."""
    chat: bool = False
    """openai: ask the chat completions endpoint (an instruct model, as the report's Llama 3 70B, or a hosted API that
    serves chat only): each answer is asked for as a whole function (:data:`ANSWER_PROMPT`) and the code of the reply
    becomes the function's body (:func:`~lit_align.execution.replies.body_completion`)."""
    api_key_env: str | None = None
    """openai: the environment variable holding the server's API key (a hosted API); null sends none."""
    max_new_tokens: int = 1024
    """openai: most tokens per request."""
    max_seeds: int = 50
    """task_suite: how many other suite seeds to search for unused parameters of a template."""


@dataclass
class IADPOConfig:
    """An IADPO run: the rounds, the data, the student, the oracle and the per-round DPO fit."""

    fit: dict[str, Any]
    """A ``lit_align fit`` config (trainer, model, data, checkpoint ...); the data's sources are set each round."""
    rounds: int = 3
    """Rounds to run (a resumed run continues up to this many)."""
    suite_seed: int = 0
    """Task suite seed: the first round's exercises and the held-out pairs."""
    train_limit: int | None = None
    """Use only this many of the suite's training exercises in the first round (spread over families); null: all."""
    heldout_limit: int | None = None
    """Score only this many held-out exercises (spread over families); null: all."""
    max_pairs_per_exercise: int = 4
    """Most triplets per exercise and round."""
    hard_fraction: float = 0.25
    """Share of the round's exercises, lowest mean margin first, sent to the oracle for new ones."""
    new_per_hard: int = 1
    """New exercises the oracle writes for each hard one."""
    student: StudentConfig = field(default_factory=StudentConfig)
    """The student's sampling."""
    oracle: OracleConfig = field(default_factory=OracleConfig)
    """The oracle."""
    seed: int = 0
    """Seed of the rounds (round r runs with seed + r)."""

    def __post_init__(self) -> None:
        for name, cls in (("student", StudentConfig), ("oracle", OracleConfig)):
            value = getattr(self, name)
            if isinstance(value, dict):
                known = {f.name for f in dataclasses.fields(cls)}
                if unknown := sorted(set(value) - known):
                    raise IADPOError(f"iadpo config: unknown key(s) {[f'{name}.{k}' for k in unknown]}; {name} has "
                                     f"{sorted(known)}")
                setattr(self, name, cls(**value))
        if not isinstance(self.fit, dict) or "model" not in self.fit:
            raise IADPOError("iadpo config: `fit` must be a lit_align fit config with at least a `model` section")
        if self.rounds < 1:
            raise IADPOError(f"iadpo config: rounds must be >= 1, got {self.rounds}")
        if not 0.0 <= self.hard_fraction <= 1.0:
            raise IADPOError(f"iadpo config: hard_fraction must be in [0, 1], got {self.hard_fraction}")
        if self.new_per_hard < 0 or self.max_pairs_per_exercise < 1 or self.student.samples < 1:
            raise IADPOError("iadpo config: new_per_hard must be >= 0, max_pairs_per_exercise and student.samples >= 1")
        if self.oracle.kind not in ("task_suite", "openai"):
            raise IADPOError(f"iadpo config: oracle.kind must be task_suite or openai, got {self.oracle.kind!r}")
        if self.oracle.kind != "openai" and (self.oracle.chat or self.oracle.api_key_env):
            raise IADPOError("iadpo config: oracle.chat and oracle.api_key_env are for oracle.kind: openai, not "
                             f"{self.oracle.kind}")
        if self.oracle.api_key_env and not os.environ.get(self.oracle.api_key_env):
            raise IADPOError(f"iadpo config: oracle.api_key_env: the environment variable {self.oracle.api_key_env} "
                             "is not set")
        data = self.fit.get("data") if isinstance(self.fit.get("data"), dict) else {}
        data_args = data.get("init_args") if isinstance(data.get("init_args"), dict) else {}
        for key, plain in (("prompt_template", "{prompt}"), ("chat_template", False)):
            if data_args.get(key, plain) != plain:
                raise IADPOError(f"iadpo config: fit.data.init_args.{key}: {data_args[key]!r} is not supported: the "
                                 "student samples from the exercises' prompts as they are, and each round's pairs must "
                                 "be trained on the prompts their completions were sampled from; remove it")


def load_config(path: str | Path, overrides: dict[str, Any] | None = None) -> IADPOConfig:
    """Read an IADPO YAML file (top-level keys = :class:`IADPOConfig` fields); each of ``overrides`` replaces the value
    at its dotted key (``rounds``, ``student.samples``, ``fit.model.init_args.beta``), made where missing."""
    import yaml

    path = Path(path)
    if not path.is_file():
        raise IADPOError(f"iadpo config file {path} does not exist")
    raw = yaml.safe_load(path.read_text()) or {}
    for key, value in (overrides or {}).items():
        set_dotted(raw, key, value)
    known = {f.name for f in dataclasses.fields(IADPOConfig)}
    unknown = sorted(set(raw) - known)
    if unknown:
        raise IADPOError(f"iadpo config {path}: unknown key(s) {unknown}; known: {sorted(known)}")
    return IADPOConfig(**raw)


def set_dotted(raw: dict[str, Any], key: str, value: Any) -> None:
    """``raw[a][b][c] = value`` for ``key`` "a.b.c", making the missing mappings; an IADPOError naming the key where a
    part of the path holds something other than a mapping."""
    *parents, last = key.split(".")
    node = raw
    for i, part in enumerate(parents):
        child = node.setdefault(part, {})
        if child is None:
            child = node[part] = {}
        if not isinstance(child, dict):
            raise IADPOError(f"--set {key}: {'.'.join(parents[:i + 1])} holds {child!r}, not a mapping")
        node = child
    node[last] = value


def check_fit_config(fit: dict[str, Any]) -> None:
    """Parse the ``fit`` section as ``lit_align fit`` would, building nothing: an IADPOError with the parser's message
    (and its nearest-option hint) when it does not parse."""
    import tempfile

    import yaml

    from lit_align.quickstart import check_stage_args

    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "fit.yaml"
        path.write_text(yaml.safe_dump(fit))
        error = check_stage_args(["--config", str(path)])
    if error:
        raise IADPOError(f"iadpo config's fit: {error}")


# ------------------------------------------------------------------------------------------------------ oracles
class Oracle(Protocol):
    def answers(self, tasks: Sequence[CodeTask]) -> list[str | None]:
        """The chosen completion of each exercise; None where the oracle has no correct one (the exercise gets no pairs
        that round)."""

    def new_exercises(self, hard: Sequence[CodeTask], per_task: int, exclude: set[str]) -> list[CodeTask]:
        """New exercises of the same kind as each hard one, none with a task id in ``exclude``."""


def parse_task_id(task_id: str) -> tuple[str, str, str]:
    """(family, template, parameter) of a suite id ``suite/<family>/<template>/<parameter>``."""
    parts = task_id.split("/")
    if len(parts) != 4 or parts[0] != "suite":
        raise IADPOError(f"{task_id!r} is not a task-suite id (suite/<family>/<template>/<parameter>)")
    return parts[1], parts[2], parts[3]


def fresh_template_tasks(task: CodeTask, n: int, exclude: set[str], base_seed: int = 0,
                         max_seeds: int = 50) -> list[CodeTask]:
    """Up to ``n`` suite problems of ``task``'s template whose parameter is not used yet (task id not in ``exclude``).

    The suite's public API builds whole suites, so other seeds' suites are searched (seed ``base_seed + 1`` on; each
    seed picks other parameters of every template) and filtered to the template. The result is marked ``train``.
    """
    family, template, _ = parse_task_id(task.task_id)
    prefix = f"suite/{family}/{template}/"
    found: list[CodeTask] = []
    taken = set(exclude)
    for seed in range(base_seed + 1, base_seed + 1 + max_seeds):
        for candidate in load_task_suite(split=None, seed=seed):
            if candidate.task_id.startswith(prefix) and candidate.task_id not in taken:
                found.append(dataclasses.replace(candidate, split="train"))
                taken.add(candidate.task_id)
                if len(found) == n:
                    return found
    return found


class TaskSuiteOracle:
    """Offline oracle: canonical solutions answer; new exercises are unused parameters of the same template."""

    def __init__(self, base_seed: int = 0, max_seeds: int = 50) -> None:
        self.base_seed = base_seed
        self.max_seeds = max_seeds

    def answers(self, tasks: Sequence[CodeTask]) -> list[str]:
        return [t.canonical_solution for t in tasks]

    def new_exercises(self, hard: Sequence[CodeTask], per_task: int, exclude: set[str]) -> list[CodeTask]:
        out: list[CodeTask] = []
        taken = set(exclude)
        for task in hard:
            new = fresh_template_tasks(task, per_task, taken, self.base_seed, self.max_seeds)
            taken.update(t.task_id for t in new)
            out += new
        return out


EXERCISE_PROMPT = """You write Python exercises for a student model. Here is an exercise it finds hard:

{prompt}{canonical}
Its tests:
{test}
Write ONE new, harder exercise of the same kind (same topic, different details). Answer with a JSON object only, with
the keys "prompt" (a function signature and docstring, ending with a newline), "entry_point" (the function's name),
"canonical_solution" (the function body continuing the prompt, indented by 4 spaces) and "test" (Python code defining
`def check(candidate):` with assert statements that call candidate only)."""


ANSWER_PROMPT = """Complete this Python function. Reply with the whole function, its imports and any helper it needs \
in one ```python code block.

```python
{prompt}```"""
"""What a chat oracle (``oracle.chat``) is asked for each exercise's answer."""


class EndpointOracle:
    """Oracle behind any generation backend (an OpenAI-compatible server, a larger local model).

    Answers are the backend's greedy completions of each prompt or, with ``chat``, the code of its greedy replies to
    :data:`ANSWER_PROMPT` as the function's body (:func:`~lit_align.execution.replies.body_completion`). Each answer
    runs against its exercise's tests in the execution sandbox; one that fails is no chosen answer (the exercise
    gets no pairs that round, counted in ``failed_answers`` and logged). New exercises are asked for with
    :data:`EXERCISE_PROMPT` and parsed from JSON; an exercise whose own solution fails its tests or that does not
    parse is dropped, with a logged count. Its incorrect solutions are empty.
    """

    def __init__(self, backend, max_new_tokens: int = 1024, pool=None, chat: bool = False) -> None:
        self.backend = backend
        self.max_new_tokens = max_new_tokens
        self.pool = pool
        self.chat = chat
        self.dropped = 0
        self.failed_answers = 0

    def answers(self, tasks: Sequence[CodeTask]) -> list[str | None]:
        from lit_align.execution.replies import body_completion
        from lit_align.generation import SamplingParams

        if not tasks:
            return []
        if self.chat:  # replies hold whole functions: no function-completion stop strings
            params = SamplingParams(max_new_tokens=self.max_new_tokens, temperature=0.0, stop=[])
            out = self.backend.generate([ANSWER_PROMPT.format(prompt=t.prompt) for t in tasks], params)
            texts = [body_completion(t.prompt, t.entry_point, c[0].text) for t, c in zip(tasks, out)]
        else:
            params = SamplingParams(max_new_tokens=self.max_new_tokens, temperature=0.0)
            texts = [c[0].text for c in self.backend.generate([t.prompt for t in tasks], params)]
        passed = run_completions(tasks, texts, self.pool)
        failed = passed.count(False)
        self.failed_answers += failed
        if failed:
            log.warning("lit_align: IADPO oracle: %d of %d answers failed their exercise's tests; those exercises get "
                        "no pairs this round", failed, len(tasks))
        return [text if ok else None for text, ok in zip(texts, passed)]

    def new_exercises(self, hard: Sequence[CodeTask], per_task: int, exclude: set[str]) -> list[CodeTask]:
        from lit_align.generation import SamplingParams

        if not hard or per_task == 0:
            return []
        prompts = [EXERCISE_PROMPT.format(prompt=t.prompt, canonical=t.canonical_solution, test=t.test) for t in hard]
        out = self.backend.generate(prompts, SamplingParams(max_new_tokens=self.max_new_tokens, temperature=0.8,
                                                            n=per_task, stop=[]))
        candidates = []
        for task, completions in zip(hard, out):
            for k, c in enumerate(completions):
                parsed = parse_exercise(c.text, task, f"{task.task_id}/oracle{len(exclude) + len(candidates)}-{k}")
                if parsed is None or parsed.task_id in exclude:
                    self.dropped += 1
                else:
                    candidates.append(parsed)
        passed = run_completions(candidates, [t.canonical_solution for t in candidates], self.pool)
        kept = [t for t, ok in zip(candidates, passed) if ok]
        self.dropped += len(candidates) - len(kept)
        if self.dropped:
            log.warning("lit_align: IADPO oracle: dropped %d new exercise(s) that did not parse or failed their tests",
                        self.dropped)
        return kept


def parse_exercise(text: str, like: CodeTask, task_id: str) -> CodeTask | None:
    """A :class:`CodeTask` from the oracle's JSON answer (the first ``{...}`` block), or None when it is malformed."""
    start, end = text.find("{"), text.rfind("}")
    if start < 0 or end <= start:
        return None
    try:
        d = json.loads(text[start:end + 1])
        return CodeTask(task_id=task_id, family=like.family, split="train", prompt=d["prompt"],
                        entry_point=d["entry_point"], canonical_solution=d["canonical_solution"], test=d["test"],
                        incorrect_solutions=())
    except (ValueError, KeyError, TypeError):
        return None


def build_oracle(config: IADPOConfig) -> Oracle:
    if config.oracle.kind == "task_suite":
        return TaskSuiteOracle(config.suite_seed, config.oracle.max_seeds)
    from lit_align.generation import build_backend

    oracle = config.oracle
    key = os.environ.get(oracle.api_key_env) if oracle.api_key_env else None
    backend = build_backend("openai", base_url=oracle.base_url, model=oracle.model, api_key=key, chat=oracle.chat)
    return EndpointOracle(backend, oracle.max_new_tokens, chat=oracle.chat)


# ------------------------------------------------------------------------------------------------------ execution
def run_completions(tasks: Sequence[CodeTask], completions: Sequence[str], pool=None) -> list[bool]:
    """Whether each completion passes its task's tests, run in the execution sandbox (never in this process)."""
    from lit_align.execution import ExecutionPool, FunctionJob, FunctionProblem, Status

    if not tasks:
        return []
    pool = pool or ExecutionPool()
    jobs = [FunctionJob(FunctionProblem(task_id=t.task_id, prompt=t.prompt, test=t.test, entry_point=t.entry_point), c)
            for t, c in zip(tasks, completions)]
    return [r.status == Status.PASSED for r in pool.run(jobs)]


# ------------------------------------------------------------------------------------------------------ triplets
def round_triplets(tasks: Sequence[CodeTask], chosen: Sequence[str | None], student_answers: Sequence[Sequence[str]],
                   student_passed: Sequence[Sequence[bool]], max_pairs: int, seed: int) -> tuple[list[dict], dict]:
    """Triplet rows (prompt, chosen, rejected, source_id, origin) of one round, and counts.

    Rejected = the student's distinct failing answers; an exercise the student always passed (or whose failing answers
    equal the chosen one) falls back to its known-incorrect solutions. At most ``max_pairs`` rows per exercise. An
    exercise without a chosen answer (None: the oracle's failed its tests) has no rows (``no_oracle_answer``).
    """
    rows: list[dict] = []
    counts = {"exercises": len(tasks), "student_rejected": 0, "fallback_rejected": 0, "no_pairs": 0,
              "no_oracle_answer": 0, "student_pass_rate": 0.0}
    passes = total = 0
    for i, task in enumerate(tasks):
        rng = random.Random(f"{seed}/{task.task_id}")
        passes += sum(student_passed[i])
        total += len(student_passed[i])
        if chosen[i] is None:
            counts["no_oracle_answer"] += 1
            continue
        failing = list(dict.fromkeys(a for a, ok in zip(student_answers[i], student_passed[i])
                                     if not ok and a.strip() and a.rstrip() != chosen[i].rstrip()))
        origin = "student"
        if not failing:
            failing = [c for _, c in task.incorrect_solutions if c.rstrip() != chosen[i].rstrip()]
            rng.shuffle(failing)
            origin = "fallback"
        if not failing:
            counts["no_pairs"] += 1
            continue
        for rejected in failing[:max_pairs]:
            rows.append({"prompt": task.prompt, "chosen": chosen[i], "rejected": rejected, "source_id": task.task_id,
                         "origin": origin})
            counts[f"{origin}_rejected"] += 1
    counts["student_pass_rate"] = passes / max(total, 1)
    return rows, counts


def heldout_rows(tasks: Sequence[CodeTask]) -> list[dict]:
    """Fixed held-out pairs: each task's canonical solution over each of its incorrect solutions."""
    return [{"prompt": t.prompt, "chosen": t.canonical_solution, "rejected": c, "source_id": t.task_id}
            for t in tasks for _, c in t.incorrect_solutions]


def spread(tasks: Sequence[CodeTask], limit: int | None) -> list[CodeTask]:
    """At most ``limit`` tasks taken round-robin over families (all of them when limit is None)."""
    if limit is None or limit >= len(tasks):
        return list(tasks)
    by_family: dict[str, list[CodeTask]] = {}
    for t in tasks:
        by_family.setdefault(t.family, []).append(t)
    out: list[CodeTask] = []
    d = 0
    while len(out) < limit:
        out += [q[d] for q in by_family.values() if d < len(q)][: limit - len(out)]
        d += 1
    return out


def _write_rows(rows: list[dict], path: Path) -> Path:
    with path.open("w", encoding="utf-8") as f:
        for row in rows:
            f.write(json.dumps(row) + "\n")
    return path


# ------------------------------------------------------------------------------------------------------ rounds
@torch.no_grad()
def pair_margins(module, datamodule, items) -> torch.Tensor:
    """Reward margins of encoded pairs with the module's current policy, (N,), in the order of ``items``."""
    size = datamodule.eval_batch_size
    out = [module.example_margins(datamodule.collate(items[s:s + size])).double().cpu()
           for s in range(0, len(items), size)]
    return torch.cat(out) if out else torch.zeros(0, dtype=torch.float64)


def _fit_args(config: IADPOConfig, round_dir: Path, triplets: Path, heldout: Path, seed: int) -> dict:
    fit = json.loads(json.dumps(config.fit))  # a deep copy of plain data
    fit["seed_everything"] = seed
    data = fit.setdefault("data", {"class_path": "lit_align.data_modules.preference.PreferenceDataModule"})
    init = data.setdefault("init_args", {})
    init["train_sources"] = [{"path": str(triplets), "kind": "triplets", "id_column": "source_id"}]
    init["val_sources"] = [{"path": str(heldout), "kind": "triplets", "id_column": "source_id"}]
    init["max_pairs_per_problem"] = None
    trainer = fit.setdefault("trainer", {})
    trainer["logger"] = {"class_path": "lightning.pytorch.loggers.TensorBoardLogger",
                         "init_args": {"save_dir": str(round_dir), "name": "logs", "version": 0,
                                       "default_hp_metric": False}}
    trainer["callbacks"] = [cb for cb in trainer.get("callbacks") or []
                            if "LoRAMerge" not in str(cb.get("class_path", cb) if isinstance(cb, dict) else cb)]
    checkpoint = fit.setdefault("checkpoint", {})
    checkpoint["dirpath"] = str(round_dir / "checkpoints")
    return fit


def _load_adapter(module, ckpt: Path) -> None:
    """Put the trainable weights of a round's checkpoint (the adapter) into a built module."""
    state = torch.load(ckpt, map_location="cpu", weights_only=True)["state_dict"]
    missing = sorted(n for n, p in module.named_parameters() if p.requires_grad and n not in state)
    if missing:
        raise IADPOError(f"{ckpt} lacks {len(missing)} trainable weights of this module (first: {missing[0]}); "
                         "was the run started with another LoRA configuration?")
    module.load_state_dict(state, strict=False)


def read_state(output: Path) -> dict[str, Any]:
    path = output / "state.json"
    return json.loads(path.read_text()) if path.is_file() else {"completed_rounds": 0}


def _write_json(obj: Any, path: Path) -> None:
    tmp = path.with_suffix(path.suffix + ".tmp")
    tmp.write_text(json.dumps(obj, indent=2))
    tmp.replace(path)  # atomic: a run killed mid-write leaves the previous state


def run_rounds(config: IADPOConfig, output: str | Path, merge: bool = True, oracle: Oracle | None = None,
               pool=None) -> list[dict[str, Any]]:
    """Run (or resume) the rounds under ``output``; returns every finished round's metrics, oldest first."""
    from lit_align.callbacks.lora_merge import check_output_dir, export_merged_model
    from lit_align.cli import LitAlignCLI
    from lit_align.generation import SamplingParams, build_backend

    init = (config.fit.get("model") or {}).get("init_args") or {}
    if init.get("model_name_or_path"):  # a missing student model is refused before anything is written
        load_tokenizer(init.get("tokenizer_name_or_path") or init["model_name_or_path"])
    output = Path(output)
    output.mkdir(parents=True, exist_ok=True)
    state = read_state(output)
    start = state["completed_rounds"]
    if merge and start < config.rounds:
        check_output_dir(output / "model")  # refuse before training, not after it
    oracle = oracle or build_oracle(config)
    heldout_tasks = spread(load_task_suite(split="heldout", seed=config.suite_seed), config.heldout_limit)
    heldout = _write_rows(heldout_rows(heldout_tasks), output / "heldout.jsonl")
    if start == 0:
        tasks = spread(load_task_suite(split="train", seed=config.suite_seed), config.train_limit)
    else:
        tasks = read_jsonl(output / f"round_{start - 1}" / "next_tasks.jsonl")
        log.info("lit_align: IADPO resumes at round %d with %d exercises", start, len(tasks))
    history = [json.loads((output / f"round_{r}" / "metrics.json").read_text()) for r in range(start)]
    module = None
    for r in range(start, config.rounds):
        round_dir = output / f"round_{r}"
        if round_dir.exists():  # a round that was interrupted: start it over
            import shutil

            shutil.rmtree(round_dir)
        round_dir.mkdir()
        write_jsonl(tasks, round_dir / "tasks.jsonl")
        triplets_path = round_dir / "triplets.jsonl"
        cli = LitAlignCLI(args=_fit_args(config, round_dir, triplets_path, heldout, config.seed + r), run=False)
        module, datamodule, trainer = cli.model, cli.datamodule, cli.trainer
        module.configure_model()
        if r > 0:
            _load_adapter(module, output / f"round_{r - 1}" / "adapter.ckpt")

        # 1. student answers (rejected) and oracle answers (chosen)
        scfg = config.student
        backend = build_backend("hf", model=module.model, tokenizer=module.tokenizer, batch_size=scfg.batch_size)
        generated = backend.generate([t.prompt for t in tasks], SamplingParams(
            max_new_tokens=scfg.max_new_tokens, temperature=scfg.temperature, n=scfg.samples, seed=config.seed + r))
        answers = [[c.text for c in per_task] for per_task in generated]
        flat_tasks = [t for t, a in zip(tasks, answers) for _ in a]
        flat_passed = run_completions(flat_tasks, [x for a in answers for x in a], pool)
        passed, k = [], 0
        for a in answers:
            passed.append(flat_passed[k:k + len(a)])
            k += len(a)
        rows, counts = round_triplets(tasks, oracle.answers(tasks), answers, passed, config.max_pairs_per_exercise,
                                      config.seed + r)
        if not rows:
            raise IADPOError(f"round {r}: no triplets (no failing student answers and no incorrect solutions, or no oracle "
                              "answer that passes its tests)")
        _write_rows(rows, triplets_path)

        # 2. DPO on the round's triplets, the adapter continuing from the last round
        datamodule.tokenizer = module.tokenizer
        datamodule.setup("fit")
        before = pair_margins(module, datamodule, datamodule.val_items)
        trainer.fit(module, datamodule=datamodule)
        trainer.save_checkpoint(round_dir / "adapter.ckpt", weights_only=True)

        # 3. margins; the hardest exercises go to the oracle
        after = pair_margins(module, datamodule, datamodule.val_items)
        train_margins = pair_margins(module, datamodule, datamodule.train_items)
        per_task: dict[str, list[float]] = {}
        for item, m in zip(datamodule.train_items, train_margins.tolist()):
            per_task.setdefault(item.source_id, []).append(m)
        ranked = sorted(per_task, key=lambda tid: sum(per_task[tid]) / len(per_task[tid]))
        n_hard = int(math.ceil(config.hard_fraction * len(ranked))) if config.hard_fraction > 0 else 0
        by_id = {t.task_id: t for t in tasks}
        hard = [by_id[tid] for tid in ranked[:n_hard]]
        exclude = {t.task_id for t in tasks} | {t.task_id for t in heldout_tasks}
        new = oracle.new_exercises(hard, config.new_per_hard, exclude)  # also after the last round: a resume adds rounds
        next_tasks = list(tasks) + new
        write_jsonl(next_tasks, round_dir / "next_tasks.jsonl")
        metrics = {"round": r, "exercises": len(tasks), "pairs": len(datamodule.train_items), **counts,
                   "steps": trainer.global_step, "heldout_pairs": len(after),
                   "heldout_margin_before": float(before.mean()), "heldout_margin": float(after.mean()),
                   "heldout_accuracy": float((after > 0).double().mean()),
                   "train_margin": float(train_margins.mean()), "hard": [t.task_id for t in hard],
                   "new_exercises": [t.task_id for t in new]}
        _write_json(metrics, round_dir / "metrics.json")
        _write_json({"completed_rounds": r + 1}, output / "state.json")  # last: the round is done
        history.append(metrics)
        log.info("lit_align: IADPO round %d: held-out margin %.4f -> %.4f, %d new exercises", r,
                 metrics["heldout_margin_before"], metrics["heldout_margin"], len(new))
        tasks = next_tasks

    if merge and not (output / "model").exists():
        if module is None:  # everything was done before; rebuild the last round's policy to merge it
            cli = LitAlignCLI(args=_fit_args(config, output / f"round_{config.rounds - 1}", output / "unused.jsonl",
                                             heldout, config.seed), run=False)
            module = cli.model
            module.configure_model()
            _load_adapter(module, output / f"round_{config.rounds - 1}" / "adapter.ckpt")
        export_merged_model(module.model, module.tokenizer, output / "model",
                            base_model=module.hparams.model_name_or_path, dtype=module.hparams.dtype)
    return history


# ------------------------------------------------------------------------------------------------------ command
def main(argv: list[str] | None = None) -> int:
    """``lit_align iadpo --config FILE --rounds N --output DIR``: run or resume IADPO; prints each round's metrics."""
    parser = HintingArgumentParser(prog="lit_align iadpo", description=__doc__.split("\n\n")[0])
    parser.add_argument("--config", required=True, help="IADPO YAML file (see configs/quickstart/iadpo.yaml)")
    parser.add_argument("--rounds", type=int, default=None, help="rounds to run (overrides the config's `rounds`)")
    parser.add_argument("--output", required=True, help="run directory; an existing one is resumed at its next round")
    parser.add_argument("--no-merge", action="store_true", help="do not merge the adapter into <output>/model at the end")
    parser.add_argument("--set", nargs=2, action="append", default=[], metavar=("KEY", "VALUE"),
                        help="replace the config's value at a dotted key, the value read as YAML: --set student.samples 4, "
                             "--set fit.model.init_args.beta 0.1, --set fit.trainer.max_steps 60 (repeatable; checked "
                             "before anything is written)")
    args = parser.parse_args(argv)
    torch.set_num_threads(max(1, min(torch.get_num_threads(), 4)))
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    import yaml

    overrides = {key: yaml.safe_load(value) for key, value in args.set}
    if args.rounds is not None:
        overrides["rounds"] = args.rounds
    try:
        config = load_config(args.config, overrides)
        check_fit_config(config.fit)  # a mistyped option under fit is named now, before anything is written
        history = run_rounds(config, args.output, merge=not args.no_merge)
    except (IADPOError, ModelLoadError) as err:
        hint = " (the quickstart's student is the SFT quickstart's model: run `lit_align fit --config " \
               "configs/quickstart/sft.yaml` or `make quickstart` first)" if isinstance(err, ModelLoadError) else ""
        print(f"lit_align iadpo: error: {err}{hint}", file=sys.stderr)
        return 2
    for m in history:
        print(json.dumps({k: m[k] for k in ("round", "exercises", "pairs", "student_pass_rate", "heldout_margin_before",
                                             "heldout_margin", "heldout_accuracy")}))
    return 0


if __name__ == "__main__":
    sys.exit(main())


__all__ = ["EndpointOracle", "IADPOConfig", "OracleConfig", "StudentConfig", "TaskSuiteOracle", "fresh_template_tasks",
           "load_config", "main", "parse_exercise", "round_triplets", "run_rounds"]
