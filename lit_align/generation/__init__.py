"""Generation backends behind one interface: prompts + sampling parameters -> completions with token ids
and their log-probabilities. ``hf`` (default: the live policy), ``vllm`` (in-process engine, optional
extra) and ``openai`` (any OpenAI-compatible completions server; ``python -m lit_align.generation.serve``
starts a small one)."""

from lit_align.generation.base import (
    DEFAULT_STOP,
    Completion,
    GenerationBackend,
    SamplingParams,
    build_backend,
    cut_at_stop,
)
from lit_align.generation.hf import HFBackend
from lit_align.generation.openai import OpenAIBackend, ServerRequestError, ServerUnreachableError
from lit_align.generation.vllm import VLLMBackend

__all__ = [
    "DEFAULT_STOP", "Completion", "GenerationBackend", "HFBackend", "OpenAIBackend", "SamplingParams",
    "ServerRequestError", "ServerUnreachableError", "VLLMBackend", "build_backend", "cut_at_stop",
]
