"""Prompt/completion data for supervised fine-tuning."""

from __future__ import annotations

import logging
import random

from lit_align.data_modules.base import TokenizedDataModule
from lit_align.data_modules.chat import Conversation, conversation_segments, reply_turns
from lit_align.data_modules.collate import encode_completion, encode_example, pack_examples, pad_batch, pad_packed_batch
from lit_align.data_modules.sources import DataError, DataSource, load_prompt_completions, mix
from lit_align.losses import IGNORE_INDEX

log = logging.getLogger(__name__)


class SFTDataModule(TokenizedDataModule):
    """Prompt/completion pairs from one or more sources, mixed in given ratios, tokenized with the prompt masked.

    Args:
        train_sources: where training pairs come from; several are mixed by their ``weight``.
        val_sources: where validation pairs come from; empty takes ``val_fraction`` of the training pairs.
        val_fraction: share of the training pairs held out for validation when no val_sources are given.
        prompt_template: Python format string applied to each text prompt; must contain "{prompt}".
        chat_template: render each prompt with the tokenizer's chat template (as one user message, then the
            assistant's generation prompt); prompts given as chat messages (a source's ``messages_column``, or a
            prompt column of message lists) always are.
        packing: concatenate several short examples into one sequence of up to max_length tokens (no attention across them).
    """

    batch_kind = "sft"

    def __init__(self, train_sources: list[DataSource] | None = None, val_sources: list[DataSource] | None = None,
                 val_fraction: float = 0.05, prompt_template: str = "{prompt}", packing: bool = False,
                 chat_template: bool = False, tokenizer: str | None = None, max_length: int = 1024, batch_size: int = 8,
                 eval_batch_size: int | None = None, group_by_length: bool = True, num_workers: int = 0,
                 seed: int | None = None) -> None:
        super().__init__(tokenizer=tokenizer, max_length=max_length, batch_size=batch_size,
                         eval_batch_size=eval_batch_size, group_by_length=group_by_length,
                         num_workers=num_workers, seed=seed, prompt_template=prompt_template,
                         chat_template=chat_template)
        if not 0.0 <= val_fraction < 1.0:
            raise DataError(f"val_fraction must be in [0, 1), got {val_fraction}")
        self.train_sources = train_sources if train_sources is not None else [DataSource(split="train")]
        self.val_sources = val_sources if val_sources is not None else (
            [DataSource(split="heldout")] if train_sources is None else [])
        if not self.train_sources:
            raise DataError("train_sources is empty: give at least one data source")
        self.val_fraction = val_fraction
        self.packing = packing
        self._told_per_reply = False

    def _pairs(self, sources: list[DataSource]) -> list[dict[str, str]]:
        parts = [load_prompt_completions(s) for s in sources]
        for s, p in zip(sources, parts):
            if not p:
                raise DataError(f"data source {s.path!r} (split {s.split!r}) has no rows")
        return mix(parts, [s.weight for s in sources], seed=self.seed)

    def _encode(self, pairs: list[dict]) -> list[dict[str, list[int]]]:
        tok = self.resolve_tokenizer()
        prompts = {prompt: self.format_prompt(prompt) for prompt in dict.fromkeys(p["prompt"] for p in pairs
                                                                                  if "conversation" not in p)}
        encoded, cut = [], []
        for p in pairs:
            if "conversation" in p:
                examples, left_out = self._encode_conversation(p["conversation"])
                encoded += examples
                cut += [left_out] if left_out else []
            else:
                encoded.append(encode_example(tok, prompts[p["prompt"]], p["completion"],
                                              end=self.completion_end(p["prompt"])))
        if cut:
            log.warning("lit_align: %d replies past max_length=%d tokens left out of %d conversations (their earlier "
                        "replies are kept)", sum(cut), self.max_length, len(cut))
        return encoded

    def _encode_conversation(self, conversation: Conversation) -> tuple[list[dict[str, list[int]]], int]:
        """A conversation whose every reply is a target (``assistant_turns: all``): one sequence with each reply
        labelled (:func:`~lit_align.data_modules.chat.conversation_segments`), ending after the last reply that fits
        in ``max_length``, and the number of replies left out that way; one example per reply where the chat
        template does not allow one sequence."""
        tok = self.resolve_tokenizer()
        segments = conversation_segments(tok, conversation)
        end = self.completion_end(conversation)
        if segments is None:
            if not self._told_per_reply:
                self._told_per_reply = True
                log.info("lit_align: the chat template of %r cannot write a conversation's replies into one sequence "
                         "(it ends a reply with no special token, or rewrites earlier turns), so each reply is its "
                         "own example with the conversation up to it as the prompt", tok.name_or_path)
            return [encode_example(tok, self.format_prompt(context), reply, end=end)
                    for context, reply in reply_turns(conversation)], 0
        input_ids, labels, ends = [], [], []
        for k, (text, is_reply) in enumerate(segments):
            if is_reply:
                ids = encode_completion(tok, text, end)
                labels += ids
            else:  # context: the first segment starts the sequence as a prompt does (the tokenizer's BOS)
                ids = tok(text, add_special_tokens=k == 0)["input_ids"]
                labels += [IGNORE_INDEX] * len(ids)
            input_ids += ids
            if is_reply:
                ends.append(len(input_ids))
        fitting = [n for n in ends if n <= self.max_length]
        keep = fitting[-1] if fitting else ends[0]  # nothing fits: the first reply, which length filtering drops
        left_out = len(ends) - len(fitting) if fitting else 0
        return [{"input_ids": input_ids[:keep], "labels": labels[:keep]}], left_out

    def setup(self, stage: str | None = None) -> None:
        if self.train_items or self.val_items:
            return
        train_pairs = self._pairs(self.train_sources)
        if self.val_sources:
            val_pairs = self._pairs(self.val_sources)
        else:
            random.Random(self.seed).shuffle(train_pairs)
            n_val = int(round(len(train_pairs) * self.val_fraction))
            val_pairs, train_pairs = train_pairs[:n_val], train_pairs[n_val:]
        train = self.filter_by_length(self._encode(train_pairs), "train")
        val = self.filter_by_length(self._encode(val_pairs), "validation") if val_pairs else []
        if self.packing:
            train = pack_examples(train, self.max_length)
            val = pack_examples(val, self.max_length) if val else []
        self.train_items, self.val_items = train, val
        log.info("lit_align: %d training and %d validation %s", len(train), len(val), "packed sequences" if self.packing else "examples")

    def length(self, item: dict[str, list[int]]) -> int:
        return len(item["input_ids"])

    def target_tokens(self, item: dict[str, list[int]]) -> int:
        """Completion tokens SFT's loss averages over (labels after the first position, as the shifted loss sees them)."""
        labels = item["labels"]
        return len(labels) - 1 - labels.count(IGNORE_INDEX) + (labels[0] == IGNORE_INDEX) if labels else 0

    def collate(self, items: list[dict[str, list[int]]]):
        pad = self.tokenizer.pad_token_id
        return pad_packed_batch(items, pad) if self.packing else pad_batch(items, pad)
