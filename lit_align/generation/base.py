"""The generation interface: prompts + sampling parameters -> completions with token ids and log-probabilities.

Every backend (``hf``, ``vllm``, ``openai``) returns the same :class:`Completion` records, so the online
objectives (PPO, GRPO, RAFT) and the pass@k callback never depend on where the text came from.

Log-probabilities, whatever the backend, are the *policy's* log-probabilities of each sampled token at
temperature 1: ``log_softmax(raw_logits)[token]``, with no temperature scaling and no top-p truncation.
That is what a training forward pass over ``prompt + token_ids`` computes, so PPO's importance ratio
``exp(new_logprob - old_logprob)`` starts at exactly 1; it is *not* the probability under the
(temperature-scaled, truncated) distribution the token was drawn from when ``temperature != 1`` or
``top_p < 1``.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Literal

from torch import nn

DEFAULT_STOP = ["\ndef ", "\nclass ", "\nif __name__", "\nprint("]

BackendName = Literal["hf", "vllm", "openai"]


@dataclass
class SamplingParams:
    """How to sample: one set of parameters for every prompt of a :meth:`GenerationBackend.generate` call."""

    max_new_tokens: int = 256
    """Most tokens generated per completion (stop strings and end-of-sequence end it earlier)."""
    temperature: float = 1.0
    """Softmax temperature; 0 means greedy decoding (argmax)."""
    top_p: float = 1.0
    """Nucleus sampling: draw from the smallest set of tokens whose probability reaches top_p (1 disables it)."""
    n: int = 1
    """Completions per prompt."""
    stop: list[str] = field(default_factory=lambda: list(DEFAULT_STOP))
    """Stop strings: the completion ends before the first occurrence of any of them (the string is not kept)."""
    seed: int | None = None
    """Seed for sampling; the same seed, prompts and parameters give the same completions. None: draw from torch's RNG."""

    def __post_init__(self) -> None:
        if isinstance(self.stop, str):
            self.stop = [self.stop]
        self.stop = list(self.stop) if self.stop is not None else []
        if isinstance(self.max_new_tokens, bool) or not isinstance(self.max_new_tokens, int) or self.max_new_tokens < 1:
            raise ValueError(f"SamplingParams.max_new_tokens must be a positive integer, got {self.max_new_tokens!r}")
        if not isinstance(self.temperature, (int, float)) or not self.temperature >= 0:
            raise ValueError(f"SamplingParams.temperature must be >= 0 (0 means greedy), got {self.temperature!r}")
        if not isinstance(self.top_p, (int, float)) or not 0 < self.top_p <= 1:
            raise ValueError(f"SamplingParams.top_p must be in (0, 1], got {self.top_p!r}")
        if isinstance(self.n, bool) or not isinstance(self.n, int) or self.n < 1:
            raise ValueError(f"SamplingParams.n must be a positive integer, got {self.n!r}")
        for s in self.stop:
            if not isinstance(s, str) or not s:
                raise ValueError(f"SamplingParams.stop must hold non-empty strings, got {self.stop!r}")
        if self.seed is not None and (isinstance(self.seed, bool) or not isinstance(self.seed, int)):
            raise ValueError(f"SamplingParams.seed must be an integer or None, got {self.seed!r}")

    @property
    def greedy(self) -> bool:
        return self.temperature == 0


@dataclass
class Completion:
    """One sampled completion of one prompt."""

    text: str
    """The decoded completion, cut before the first stop string (the stop string is not included)."""
    token_ids: list[int]
    """The sampled token ids, up to the cut: the fewest tokens whose decoding covers ``text`` (eos excluded).

    When a stop string starts inside a token, that token is kept, so ``decode(token_ids)`` is ``text``
    followed by at most the part of the stop string that shares the token."""
    logprobs: list[float] | None
    """Per token of ``token_ids``: the policy's log-probability at temperature 1 (see the module docstring);
    None when the backend could not obtain them."""
    finish_reason: str
    """"stop" (a stop string or end-of-sequence ended it) or "length" (max_new_tokens reached)."""
    end_token_id: int | None = None
    """The end-of-sequence token that ended the completion (not in ``token_ids``): the tokenizer's EOS, or another the
    model declares (its generation config's, a chat template's end of turn). None when a stop string or the length
    ended it, or the backend cannot tell (a server)."""


class GenerationBackend(ABC):
    """Turns prompts into completions; the online objectives only talk to this interface."""

    @abstractmethod
    def generate(self, prompts: list[str], params: SamplingParams) -> list[list[Completion]]:
        """``params.n`` completions for each prompt, as one list per prompt in the order of ``prompts``."""

    def sync_weights(self, model: nn.Module) -> None:
        """Make later generations use ``model``'s current weights; call it after each optimizer update.

        A no-op for backends that generate with the live policy (``hf``) or with a server whose weights
        they do not own (``openai``)."""

    def close(self) -> None:
        """Release engines, threads or connections held by the backend."""


def check_prompts(prompts: Sequence[str]) -> list[str]:
    """Validate the ``prompts`` argument of :meth:`GenerationBackend.generate`."""
    if isinstance(prompts, str):
        raise TypeError("prompts must be a list of strings, got a single str; wrap it: generate([prompt], params)")
    prompts = list(prompts)
    for i, p in enumerate(prompts):
        if not isinstance(p, str):
            raise TypeError(f"prompts[{i}] must be a str, got {type(p).__name__}")
    return prompts


def find_stop(text: str, stop: Sequence[str]) -> int | None:
    """Index of the earliest occurrence of any stop string in ``text``, or None."""
    hits = [i for i in (text.find(s) for s in stop) if i >= 0]
    return min(hits) if hits else None


def covering_prefix(token_ids: Sequence[int], decode: Callable[[list[int]], str], text: str) -> int:
    """The fewest leading tokens whose decoding starts with ``text``; all of them when even the full decoding does not."""
    ids = list(token_ids)
    if not decode(ids).startswith(text):
        return len(ids)
    kept = len(ids)
    # Walk back from the end: generation stops as soon as a stop string appears, so this takes a few steps.
    while kept > 0 and decode(ids[: kept - 1]).startswith(text):
        kept -= 1
    return kept


def cut_at_stop(token_ids: Sequence[int], decode: Callable[[list[int]], str], stop: Sequence[str]) -> tuple[str, int, bool]:
    """Cut a completion before its first stop string, consistently in text and tokens.

    Returns ``(text, kept, stopped)``: ``text`` is the decoded completion up to (excluding) the first stop
    string, ``kept`` the fewest leading tokens whose decoding starts with ``text``, ``stopped`` whether a
    stop string was found. Without a stop string the text is the whole decoding and every token is kept.
    """
    ids = list(token_ids)
    full = decode(ids)
    cut = find_stop(full, stop)
    if cut is None:
        return full, len(ids), False
    return full[:cut], covering_prefix(ids, decode, full[:cut]), True


def backend_class(name: BackendName) -> type[GenerationBackend]:
    """The class of the backend called ``name`` ("hf", "vllm" or "openai"); importing it needs no optional package."""
    if name == "hf":
        from lit_align.generation.hf import HFBackend

        return HFBackend
    if name == "vllm":
        from lit_align.generation.vllm import VLLMBackend

        return VLLMBackend
    if name == "openai":
        from lit_align.generation.openai import OpenAIBackend

        return OpenAIBackend
    raise ValueError(f"unknown generation backend {name!r}; choose one of 'hf', 'vllm', 'openai'")


def check_backend_kwargs(name: BackendName, kwargs: dict, option: str, supplied: tuple[str, ...] = ()) -> None:
    """Refuse keyword arguments that the backend called ``name`` does not take, naming ``option`` (where the user set
    them), before anything is built; ``supplied`` are the arguments the caller passes itself (not the user's)."""
    import inspect

    params = inspect.signature(backend_class(name).__init__).parameters
    if any(p.kind is inspect.Parameter.VAR_KEYWORD for p in params.values()):
        return
    takes = [p for p in params if p != "self" and p not in supplied]
    unknown = sorted(set(kwargs) - set(takes))
    if unknown:
        raise ValueError(f"{option} has {', '.join(map(repr, unknown))}, which the {name} backend does not take; "
                         f"it takes: {', '.join(takes)}")


def missing_requirement(name: BackendName) -> str | None:
    """What the backend called ``name`` needs that is not installed, as an install hint, or None (only vllm needs
    anything beyond lit_align's own dependencies). Found without importing it."""
    import importlib.util

    if name == "vllm" and importlib.util.find_spec("vllm") is None:
        from lit_align.generation.vllm import INSTALL_HINT

        return INSTALL_HINT
    return None


def build_backend(name: BackendName, **kwargs) -> GenerationBackend:
    """The backend called ``name`` ("hf", "vllm" or "openai"), built from that backend's keyword arguments."""
    return backend_class(name)(**kwargs)
