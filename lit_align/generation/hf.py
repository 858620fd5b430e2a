"""The default backend: batched, KV-cached decoding with the live policy (a Hugging Face causal LM or a peft model).

It samples with its own decoding loop rather than ``model.generate`` so that the returned token ids are
exactly the tokens drawn, their log-probabilities come from the same forward passes, and stop strings cut
text and tokens in one place (:func:`lit_align.generation.base.cut_at_stop`).
"""

from __future__ import annotations

import importlib
import inspect
from collections.abc import Callable, Iterator
from contextlib import contextmanager

import torch
from torch import nn

from lit_align.generation.base import (
    Completion,
    GenerationBackend,
    SamplingParams,
    check_prompts,
    cut_at_stop,
    find_stop,
)
from lit_align.generation.kv_cache import reserved_cache, row_selectable_cache
from lit_align.generation.sampling import sample_next_tokens, token_logprobs
from lit_align.models import cache_keyword, gathers_weights_per_forward, returned_cache


def _as_id_list(value) -> list[int]:
    if value is None:
        return []
    if isinstance(value, int):
        return [value]
    return [int(v) for v in value]


def rust_decoder(tokenizer) -> Callable[..., str] | None:
    """The tokenizers library's ``decode`` of a fast tokenizer whose ``decode`` is exactly that call (the Hugging Face
    fast tokenizer classes', not overridden by a model's tokenizer class), else None. Decoding at every generation
    step goes through it: transformers' wrapper converts the id list element by element first, which here costs
    three times the decoding itself."""
    backend = getattr(tokenizer, "backend_tokenizer", None)
    if backend is None:
        return None
    from transformers.tokenization_utils_base import PreTrainedTokenizerBase

    cls = type(tokenizer)
    for module, name in (("transformers.tokenization_utils_tokenizers", "TokenizersBackend"),  # transformers 5
                         ("transformers.tokenization_utils_fast", "PreTrainedTokenizerFast")):  # transformers 4
        try:
            base = getattr(importlib.import_module(module), name)
        except (ImportError, AttributeError):
            continue
        if isinstance(tokenizer, base) and cls._decode is base._decode and cls.decode is PreTrainedTokenizerBase.decode:
            return backend.decode
    return None


def model_eos_ids(model: nn.Module, tokenizer) -> list[int]:
    """End-of-sequence ids declared by the tokenizer, the model config and its generation config, and the token its
    chat template ends an assistant message with (a chat model's reply ends there even where the configs omit it)."""
    from lit_align.data_modules.chat import turn_end_token_id

    ids = _as_id_list(getattr(tokenizer, "eos_token_id", None)) + _as_id_list(turn_end_token_id(tokenizer))
    for config in (getattr(model, "generation_config", None), getattr(model, "config", None)):
        ids += _as_id_list(getattr(config, "eos_token_id", None))
    return sorted(set(ids))


def input_device(model: nn.Module) -> torch.device:
    """Where input ids must live: the device of the input embeddings (works with device maps and peft)."""
    try:
        return model.get_input_embeddings().weight.device
    except (AttributeError, NotImplementedError):
        return next(model.parameters()).device


def distinct_rows(encoded: list[list[int]]) -> tuple[list[list[int]], list[int] | None]:
    """The distinct token sequences of ``encoded`` in order of first appearance, and each row's index among them
    (None when no row repeats another)."""
    index: dict[tuple[int, ...], int] = {}
    rows = [index.setdefault(tuple(ids), len(index)) for ids in encoded]
    if len(index) == len(encoded):
        return encoded, None
    return [list(ids) for ids in index], rows


@contextmanager
def inference_mode(model: nn.Module) -> Iterator[None]:
    """Eval mode and no autograd for the duration; every submodule's previous train/eval flag is restored after.

    ``torch.no_grad`` rather than ``torch.inference_mode``: lazily built buffers (rotary caches) must stay
    usable by the training step that follows. Blocks compiled for training (``torch_compile``) run eager here: a
    decoding step's shapes and KV cache differ from the training forward's, and would each cost a recompilation.
    """
    modes = [(m, m.training) for m in model.modules()]
    model.eval()
    try:
        with torch.no_grad(), torch.compiler.set_stance("force_eager"):
            yield
    finally:
        for module, training in modes:
            module.training = training


class HFBackend(GenerationBackend):
    """Generate with the policy being trained, LoRA adapters active, in its current weights."""

    def __init__(
        self,
        model: nn.Module,
        tokenizer,
        batch_size: int = 16,
        eos_token_ids: list[int] | None = None,
        add_special_tokens: bool = True,
        synchronize: bool | None = None,
        reserve_cache: bool = False,
        share_prompt: bool = True,
        drop_ended_rows: bool = True,
    ) -> None:
        """
        Args:
            model: a Hugging Face causal LM or a peft model wrapping one.
            tokenizer: its tokenizer; it is never modified (padding is done here, on the left).
            batch_size: sequences decoded together (a prompt with n completions counts n times).
            eos_token_ids: token ids that end a completion; default: :func:`model_eos_ids`.
            add_special_tokens: let the tokenizer add its special tokens (BOS) to each prompt, as training does.
            synchronize: every process of the distributed run makes the same number of forward passes: each decodes
                as many batches as the busiest one (a one-token filler batch where it has none left) and keeps stepping
                until every process's completions have ended. Needed when each forward pass gathers the weights from
                all processes (DeepSpeed ZeRO-3, FSDP), where a process that stopped early would leave the others
                waiting forever. Null (default): on exactly when the model's weights are ZeRO-3 partitioned or in FSDP
                units and more than one process runs.
            reserve_cache: decode into a KV cache whose buffers are reserved once per batch for the prompt and
                every token the batch can generate (:mod:`lit_align.generation.kv_cache`), where the model allows it,
                instead of transformers' default cache, which copies itself at every step. The same tokens either way.
                Off by default: on CPU, attention over the reserved buffers' strided views is slower, and the copies
                saved pay for that only in long completions (BENCHMARKS.md); on a GPU it has not been measured yet.
            share_prompt: prefill each distinct prompt of a batch once and copy its keys and values to each of its
                rows (a prompt sampled ``n`` times runs once, not ``n`` times); the same tokens and log-probabilities
                as a prefill per row. Only where every layer of the model's cache is one whose rows can be selected
                (full or sliding-window attention); otherwise, and off, every row is prefilled.
            drop_ended_rows: once half of a decoding batch's rows have ended (end-of-sequence, a stop string, the
                budget), drop them from the batch and its KV cache, so that the rows still running stop paying for
                them; the same tokens as decoding every row to the end (each step still draws one random number per
                row of the original batch). Same condition on the cache as ``share_prompt``.
        """
        if batch_size < 1:
            raise ValueError(f"HFBackend batch_size must be a positive integer, got {batch_size!r}")
        self.model = model
        self.tokenizer = tokenizer
        self.batch_size = batch_size
        self.eos_token_ids = set(eos_token_ids if eos_token_ids is not None else model_eos_ids(model, tokenizer))
        self.add_special_tokens = add_special_tokens
        self.synchronize = synchronize
        self.reserve_cache = reserve_cache
        self.share_prompt = share_prompt
        self.drop_ended_rows = drop_ended_rows
        self._synced = False  # this generate() call's decision (see _synchronized)
        pad = tokenizer.pad_token_id
        self.pad_token_id = pad if pad is not None else (min(self.eos_token_ids) if self.eos_token_ids else 0)
        base = model.get_base_model() if hasattr(model, "get_base_model") else model
        self._logits_to_keep = "logits_to_keep" in inspect.signature(base.forward).parameters
        self._cache_keyword = cache_keyword(model)
        self._rust_decode = rust_decoder(tokenizer)

    def decode(self, token_ids: list[int]) -> str:
        """Completion text of ``token_ids``: special tokens dropped, no whitespace clean-up (code must stay intact)."""
        if self._rust_decode is not None:
            return self._rust_decode(token_ids, skip_special_tokens=True)
        return self.tokenizer.decode(token_ids, skip_special_tokens=True, clean_up_tokenization_spaces=False)

    def encode_prompt(self, prompt: str) -> list[int]:
        """The prompt's token ids exactly as the backend feeds them (useful to re-score prompt + completion)."""
        return list(self.tokenizer(prompt, add_special_tokens=self.add_special_tokens)["input_ids"])

    def generate(self, prompts: list[str], params: SamplingParams) -> list[list[Completion]]:
        prompts = check_prompts(prompts)
        rows = [p for p in prompts for _ in range(params.n)]
        encoded = [self.encode_prompt(p) for p in rows]
        for i, ids in enumerate(encoded):
            if not ids:
                raise ValueError(f"prompts[{i // params.n}] is empty after tokenization; give at least one token")
        device = input_device(self.model)
        generator = None
        if not params.greedy:
            seed = params.seed if params.seed is not None else int(torch.randint(0, 2**62, (1,)).item())
            generator = torch.Generator(device=device).manual_seed(seed)
        batches = [encoded[start:start + self.batch_size] for start in range(0, len(encoded), self.batch_size)]
        self._synced = self._synchronized()
        if self._synced:  # as many batches as the busiest process: the missing ones are one-token fillers
            busiest = int(self._all_processes(torch.tensor(float(len(batches)), device=device), "max"))
            filler = [[self.pad_token_id]]
            batches += [filler] * (busiest - len(batches))
        flat: list[Completion] = []
        with inference_mode(self.model):
            for i, batch in enumerate(batches):
                flat += self._generate_batch(batch, params, generator, device, filler=i * self.batch_size >= len(encoded))
        return [flat[i * params.n:(i + 1) * params.n] for i in range(len(prompts))]

    def _synchronized(self) -> bool:
        """Whether this call must keep in step with the other processes (see ``synchronize``)."""
        import torch.distributed as dist

        if not (dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1):
            return False
        if self.synchronize is not None:
            return self.synchronize
        return gathers_weights_per_forward(self.model)

    @staticmethod
    def _all_processes(value: torch.Tensor, op: str) -> torch.Tensor:
        """``value`` reduced over every process (op "max" or "min")."""
        import torch.distributed as dist

        value = value.clone()
        dist.all_reduce(value, op=dist.ReduceOp.MAX if op == "max" else dist.ReduceOp.MIN)
        return value

    def _all_done(self, reasons: list[str | None], device) -> bool:
        """Whether decoding can stop: this batch's rows have all ended (synchronized: every process's have)."""
        done = all(r is not None for r in reasons)
        if not self._synced:
            return done
        return bool(self._all_processes(torch.tensor(float(done), device=device), "min"))

    def _forward(self, **kwargs):
        return self.model(use_cache=True, return_dict=True, **kwargs)

    def _prefill(self, encoded: list[list[int]], params: SamplingParams, device, shared: bool):
        """One forward pass over the left-padded prompts ``encoded``: ``(cache, last logits (B, V), mask, positions,
        whether the cache's rows can be selected)`` (:func:`row_selectable_cache`). ``shared``: the rows will be
        copied, so None is returned without a forward pass when the model's cache cannot do that."""
        batch, width = len(encoded), max(len(ids) for ids in encoded)
        input_ids = torch.full((batch, width), self.pad_token_id, dtype=torch.long)
        mask = torch.zeros((batch, width), dtype=torch.long)
        for b, ids in enumerate(encoded):  # left padding: every prompt ends at the last column
            input_ids[b, width - len(ids):] = torch.tensor(ids, dtype=torch.long)
            mask[b, width - len(ids):] = 1
        input_ids, mask = input_ids.to(device), mask.to(device)
        positions = (mask.cumsum(-1) - 1).clamp(min=0)
        extra = {"logits_to_keep": 1} if self._logits_to_keep else {}
        # every position this loop can feed
        cache = reserved_cache(self.model, width + params.max_new_tokens) if self.reserve_cache else None
        if cache is None:
            cache = row_selectable_cache(self.model)
        if shared and cache is None:
            return None
        if cache is not None:
            extra[self._cache_keyword] = cache
        out = self._forward(input_ids=input_ids, attention_mask=mask, position_ids=positions, **extra)
        return returned_cache(out), out.logits[:, -1, :], mask, positions, cache is not None

    def _generate_batch(self, encoded: list[list[int]], params: SamplingParams, generator, device,
                        filler: bool = False) -> list[Completion]:
        """Completions of ``encoded`` (one per row). A ``filler`` batch only keeps the forward passes in step with the
        other processes: it samples nothing and its result is discarded."""
        batch = len(encoded)
        distinct, rows = distinct_rows(encoded) if self.share_prompt else (encoded, None)
        prefilled = self._prefill(distinct, params, device, shared=True) if rows is not None else None
        if prefilled is not None:  # each row continues from a copy of its prompt's keys and values
            past, logits, mask, positions, selectable = prefilled
            rows = torch.tensor(rows, device=device)
            past.batch_select_indices(rows)
            logits, mask, positions = logits[rows], mask[rows], positions[rows]
        else:  # nothing repeats, or a cache whose rows cannot be copied (linear attention): every row's prompt
            past, logits, mask, positions, selectable = self._prefill(encoded, params, device, shared=False)
        next_position = positions[:, -1:] + 1

        tokens_out: list[list[int]] = [[] for _ in range(batch)]
        logprobs_out: list[list[float]] = [[] for _ in range(batch)]
        reasons: list[str | None] = ["length" if filler else None] * batch
        ended_by: list[int | None] = [None] * batch  # the end-of-sequence token each row drew, if it drew one
        live = list(range(batch))  # the batch row of each row still decoded (drop_ended_rows drops the others)
        for _ in range(params.max_new_tokens):
            if all(r is not None for r in reasons):
                # synchronized and waiting for the other processes: draw nothing, so that this process's random stream
                # (and its next batches' samples) are what they would be without synchronization
                tokens = torch.full((len(live),), self.pad_token_id, device=device)
                logprobs = torch.zeros(len(live))
            else:
                draws = None
                if len(live) < batch and params.temperature != 0:  # the whole batch's draws, as without dropping rows
                    draws = torch.rand(batch, 1, device=device, generator=generator)[torch.tensor(live, device=device)]
                tokens = sample_next_tokens(logits, params.temperature, params.top_p, generator, draws=draws)
                logprobs = token_logprobs(logits, tokens)
            for b, tok, lp in zip(live, tokens.tolist(), logprobs.tolist()):
                if reasons[b] is not None:
                    continue
                if tok in self.eos_token_ids:
                    reasons[b], ended_by[b] = "stop", tok
                    continue
                tokens_out[b].append(tok)
                logprobs_out[b].append(lp)
                if params.stop and find_stop(self.decode(tokens_out[b]), params.stop) is not None:
                    reasons[b] = "stop"
                elif len(tokens_out[b]) >= params.max_new_tokens:
                    reasons[b] = "length"
            if self._all_done(reasons, device):
                break
            done = torch.tensor([reasons[b] is not None for b in live], device=device)
            running = (~done).nonzero().squeeze(-1)
            if self.drop_ended_rows and selectable and 0 < running.numel() <= len(live) // 2:
                past.batch_select_indices(running)
                mask, next_position, tokens, done = mask[running], next_position[running], tokens[running], done[running]
                live = [live[i] for i in running.tolist()]
            feed = tokens.masked_fill(done, self.pad_token_id).unsqueeze(-1)
            mask = torch.cat([mask, torch.ones((len(live), 1), dtype=mask.dtype, device=device)], dim=-1)
            out = self._forward(input_ids=feed, attention_mask=mask, position_ids=next_position,
                                **{self._cache_keyword: past})
            past, logits = returned_cache(out), out.logits[:, -1, :]
            del out
            next_position = next_position + 1

        completions = []
        for ids, lps, reason, end in zip(tokens_out, logprobs_out, reasons, ended_by):
            text, kept, _ = cut_at_stop(ids, self.decode, params.stop)
            completions.append(Completion(text=text, token_ids=ids[:kept], logprobs=lps[:kept],
                                          finish_reason=reason or "length", end_token_id=end))
        return completions
