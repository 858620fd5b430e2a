"""Tokenization of prompt/completion examples, padding, and packing into shared sequences.

An encoded example is a dict with ``input_ids`` and ``labels`` (lists of ints, equal length) where ``labels`` holds
``IGNORE_INDEX`` on prompt tokens, so only the completion (and its end-of-sequence token) is learned and scored.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from lit_align.losses import IGNORE_INDEX


def encode_prompt(tokenizer, prompt: str) -> list[int]:
    """Prompt token ids, with the tokenizer's own special prefix (BOS) if it adds one."""
    return tokenizer(prompt, add_special_tokens=True)["input_ids"]


def encode_completion(tokenizer, completion: str, end: Sequence[int] | None = None) -> list[int]:
    """Completion token ids followed by ``end``, so the model learns to stop: by default the end-of-sequence token (a
    chat reply's end is its template's, :func:`~lit_align.data_modules.chat.turn_end_ids`)."""
    ids = tokenizer(completion, add_special_tokens=False)["input_ids"]
    return ids + list([tokenizer.eos_token_id] if end is None else end)


def encode_example(tokenizer, prompt: str, completion: str, prompt_ids: list[int] | None = None,
                   end: Sequence[int] | None = None) -> dict[str, list[int]]:
    """input_ids = prompt + completion + end (default: eos); labels mask the prompt. ``prompt_ids`` reuses an already
    tokenized prompt."""
    p = prompt_ids if prompt_ids is not None else encode_prompt(tokenizer, prompt)
    c = encode_completion(tokenizer, completion, end)
    return {"input_ids": p + c, "labels": [IGNORE_INDEX] * len(p) + c}


def pad_batch(examples: Sequence[dict[str, list[int]]], pad_token_id: int, pad_to_multiple_of: int | None = None) -> dict[str, torch.Tensor]:
    """Right-pad a list of encoded examples into ``input_ids``, ``attention_mask`` and ``labels`` tensors."""
    longest = max(len(e["input_ids"]) for e in examples)
    if pad_to_multiple_of:
        longest = -(-longest // pad_to_multiple_of) * pad_to_multiple_of
    n = len(examples)
    input_ids = torch.full((n, longest), pad_token_id, dtype=torch.long)
    labels = torch.full((n, longest), IGNORE_INDEX, dtype=torch.long)
    attention_mask = torch.zeros((n, longest), dtype=torch.long)
    for i, e in enumerate(examples):
        k = len(e["input_ids"])
        input_ids[i, :k] = torch.tensor(e["input_ids"])
        labels[i, :k] = torch.tensor(e["labels"])
        attention_mask[i, :k] = 1
    return {"input_ids": input_ids, "attention_mask": attention_mask, "labels": labels}


def pack_examples(examples: Sequence[dict[str, list[int]]], max_length: int) -> list[dict[str, list[int]]]:
    """Greedily concatenate examples (in order) into sequences of at most ``max_length`` tokens.

    Each packed sequence carries ``position_ids`` that restart at 0 for every example; the model is then run without
    an attention mask, which lets transformers build a block-diagonal causal mask from the position ids, so packed
    examples never attend to each other. An example longer than ``max_length`` is an error (filter first).
    """
    packed: list[dict[str, list[int]]] = []
    current: dict[str, list[int]] = {"input_ids": [], "labels": [], "position_ids": []}
    for e in examples:
        k = len(e["input_ids"])
        if k > max_length:
            raise ValueError(f"example of {k} tokens does not fit max_length={max_length}; filter by length before packing")
        if current["input_ids"] and len(current["input_ids"]) + k > max_length:
            packed.append(current)
            current = {"input_ids": [], "labels": [], "position_ids": []}
        current["input_ids"] += e["input_ids"]
        current["labels"] += e["labels"]
        current["position_ids"] += list(range(k))
    if current["input_ids"]:
        packed.append(current)
    return packed


def pad_packed_batch(examples: Sequence[dict[str, list[int]]], pad_token_id: int) -> dict[str, torch.Tensor]:
    """Pad packed sequences; padding gets its own position ids (0, 1, ...) so it forms a separate, ignored block."""
    batch = pad_batch(examples, pad_token_id)
    longest = batch["input_ids"].size(1)
    position_ids = torch.zeros_like(batch["input_ids"])
    for i, e in enumerate(examples):
        k = len(e["position_ids"])
        position_ids[i, :k] = torch.tensor(e["position_ids"])
        position_ids[i, k:] = torch.arange(longest - k)
    batch["position_ids"] = position_ids
    del batch["attention_mask"]
    return batch
