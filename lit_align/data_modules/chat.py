"""Conversational data: prompts given as chat messages, rendered with the tokenizer's chat template.

A data file may hold a prompt as a list of messages (``[{"role": "user", "content": ...}, ...]``, the conversational
format of TRL and the hub's chat datasets) and a completion as the assistant's message (``[{"role": "assistant",
"content": ...}]``) instead of text. Loaders turn such a prompt into a :data:`Conversation` (a hashable tuple of
``(role, content)`` pairs) and such a completion into the assistant's text; the data module renders the conversation
with the tokenizer's chat template when it tokenizes (:func:`render_chat_prompt`), ending in the template's
generation prompt, so the completion that follows is the assistant's reply, ended the way the template ends an
assistant message (:func:`turn_end_ids`).
"""

from __future__ import annotations

import logging
from typing import Any, Union

from lit_align.data_modules.sources import DataError

log = logging.getLogger(__name__)

Conversation = tuple[tuple[str, str], ...]
"""A chat prompt: ``(role, content)`` pairs in order (a tuple, so prompts stay hashable for deduplication)."""

Prompt = Union[str, Conversation]


def is_messages(value: Any) -> bool:
    """Whether ``value`` is given as chat messages (a list of dicts) rather than text."""
    return isinstance(value, (list, tuple)) and bool(value) and all(isinstance(m, dict) for m in value)


def as_conversation(value: Any, where: str) -> Conversation:
    """Chat messages as a :data:`Conversation`; a DataError naming ``where`` (file, row and column) for anything else."""
    if not is_messages(value):
        raise DataError(f"{where}: expected text or a list of chat messages ({{'role': ..., 'content': ...}}), got "
                        f"{type(value).__name__} {_preview(value)}")
    pairs = []
    for i, message in enumerate(value):
        role, content = message.get("role"), message.get("content")
        if not isinstance(role, str) or not isinstance(content, str):
            raise DataError(f"{where}: message {i} needs a text 'role' and a text 'content', got {_preview(message)}")
        pairs.append((role, content))
    return tuple(pairs)


def prompt_value(value: Any, where: str) -> Prompt:
    """A prompt cell: chat messages as a :data:`Conversation`, anything else as text."""
    return as_conversation(value, where) if is_messages(value) else str(value)


def completion_value(value: Any, where: str) -> str:
    """A completion cell: the text of one assistant message (``[{"role": "assistant", ...}]``), anything else as
    text."""
    if not is_messages(value):
        return str(value)
    messages = as_conversation(value, where)
    if len(messages) != 1 or messages[0][0] != "assistant":
        roles = [role for role, _ in messages]
        raise DataError(f"{where}: a completion given as chat messages must be one assistant message, got roles {roles}")
    return messages[0][1]


def split_conversation(value: Any, where: str) -> tuple[Conversation, str]:
    """A whole conversation (a ``messages`` column): the messages before the last as the prompt, and the last, which
    must be the assistant's, as the completion. Only that last reply is trained on; earlier replies are context."""
    messages = as_conversation(value, where)
    if len(messages) < 2 or messages[-1][0] != "assistant":
        roles = [role for role, _ in messages]
        raise DataError(f"{where}: a conversation needs at least one message before a final assistant message, got "
                        f"roles {roles}")
    return messages[:-1], messages[-1][1]


def assistant_turns(value: Any, where: str) -> Conversation:
    """A whole conversation whose every assistant reply is a target (``assistant_turns: all``), checked: it must have an
    assistant message after at least one other message (a reply that opens the conversation has no prompt and is
    context only); else a DataError naming ``where``."""
    messages = as_conversation(value, where)
    if not reply_turns(messages):
        roles = [role for role, _ in messages]
        raise DataError(f"{where}: a conversation needs an assistant message after at least one other message, got "
                        f"roles {roles}")
    return messages


def reply_turns(conversation: Conversation) -> list[tuple[Conversation, str]]:
    """Every assistant reply of a conversation that follows another message, as ``(the messages before it, its
    text)``."""
    return [(conversation[:i], content) for i, (role, content) in enumerate(conversation) if role == "assistant" and i > 0]


def conversation_segments(tokenizer, conversation: Conversation) -> list[tuple[str, bool]] | None:
    """A conversation as one sequence in which every reply of :func:`reply_turns` is a target: ``(text, is_reply)``
    segments in order, the context segments being what the chat template writes before each reply (the first one as
    :func:`render_chat_prompt` gives it, ending in the generation prompt) and the replies their texts, each to be
    followed by :func:`turn_end_ids`. So the tokens before each reply are the tokens that reply has as its own example.

    None when that cannot be: the template writes no special token after a reply (the EOS token that ends a reply in
    training is not in its rendering of the history), or its rendering of the conversation up to a later reply does
    not begin with its rendering up to an earlier reply, that reply and its turn end (templates that rewrite earlier
    turns, e.g. dropping their reasoning)."""
    end = turn_end(tokenizer)
    if end is None:
        return None
    segments: list[tuple[str, bool]] = []
    rendered = ""
    for context, reply in reply_turns(conversation):
        prompt = render_chat_prompt(tokenizer, context)
        if not prompt.startswith(rendered):
            return None
        segments += [(prompt[len(rendered):], False), (reply, True)]
        rendered = prompt + reply + end
    return segments


def split_pair(chosen: Any, rejected: Any, where: str) -> tuple[Conversation, str, str]:
    """A preference pair given as two whole conversations (the "implicit prompt" format: no prompt column): the
    messages both share before their final assistant replies as the prompt, and the two replies."""
    prompt, chosen_reply = split_conversation(chosen, f"{where} (chosen)")
    rejected_prompt, rejected_reply = split_conversation(rejected, f"{where} (rejected)")
    if rejected_prompt != prompt:
        raise DataError(f"{where}: the chosen and rejected conversations differ before their final assistant messages; "
                        "without a prompt column they must share every earlier message")
    return prompt, chosen_reply, rejected_reply


def render_chat_prompt(tokenizer, conversation: Conversation) -> str:
    """The conversation through ``tokenizer``'s chat template, ending in the assistant's generation prompt, as text
    whose tokenization (:func:`~lit_align.data_modules.collate.encode_prompt`, special tokens added) gives the
    template's tokens: a leading BOS the template writes is dropped where the tokenizer adds one itself."""
    require_chat_template(tokenizer)
    text = tokenizer.apply_chat_template([{"role": role, "content": content} for role, content in conversation],
                                         tokenize=False, add_generation_prompt=True)
    bos = tokenizer.bos_token
    if bos and text.startswith(bos) and _adds_bos(tokenizer):
        text = text[len(bos):]
    return text


def require_chat_template(tokenizer) -> None:
    """Refuse a tokenizer without a chat template (a DataError naming it), before anything is rendered or trained."""
    if not getattr(tokenizer, "chat_template", None):
        name = getattr(tokenizer, "name_or_path", "") or type(tokenizer).__name__
        raise DataError(f"the tokenizer {name!r} has no chat template, so chat prompts cannot be rendered: use a "
                        "chat (instruct) model's tokenizer, or text prompts without chat_template")


_REPLY = "LitAlignReplyMarker"
"""An assistant message's content, found again in the rendered conversation to see what the template writes after it."""


def turn_end(tokenizer) -> str | None:
    """The text the chat template writes after an assistant message's content, up to and including the first special
    token in it (``"<|im_end|>"`` for Qwen, ``"<end_of_turn>"`` for Gemma, ``"\\n<|EOT|>"`` for DeepSeek-Coder
    instruct): what a reply must end with so that a trained model ends its turns as the template does. None when the
    template writes no special token there (or cannot render a user message followed by an assistant message)."""
    require_chat_template(tokenizer)
    messages = [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": _REPLY}]
    try:
        text = tokenizer.apply_chat_template(messages, tokenize=False)
    except Exception as err:  # a template's own raise_exception (e.g. a required system message): no turn end known
        log.warning("lit_align: the chat template of %r could not render a user and an assistant message (%s); "
                    "replies end with the EOS token", getattr(tokenizer, "name_or_path", ""), err)
        return None
    at = text.rfind(_REPLY)
    if at < 0:
        return None
    after = text[at + len(_REPLY):]
    found = [(after.find(token), token) for token in special_tokens(tokenizer) if token in after]
    if not found:
        return None
    start, token = min(found, key=lambda pair: (pair[0], -len(pair[1])))
    return after[:start + len(token)]


def turn_end_ids(tokenizer) -> list[int]:
    """The token ids that end a chat reply in training data: :func:`turn_end`'s, else the EOS token (none without
    one). Equal to ``[eos_token_id]`` for templates that end assistant messages with the EOS token (Qwen2.5,
    Llama-3.1 instruct)."""
    end = turn_end(tokenizer)
    if end is not None:
        return list(tokenizer(end, add_special_tokens=False)["input_ids"])
    return [] if tokenizer.eos_token_id is None else [tokenizer.eos_token_id]


def turn_end_token_id(tokenizer) -> int | None:
    """The special token that ends an assistant message in the tokenizer's chat template (the last of
    :func:`turn_end`), which generation must stop at; None without a chat template or such a token."""
    if not getattr(tokenizer, "chat_template", None):
        return None
    end = turn_end(tokenizer)
    return tokenizer.convert_tokens_to_ids(_last_special(tokenizer, end)) if end is not None else None


def special_tokens(tokenizer) -> list[str]:
    """The tokenizer's special tokens: BOS/EOS/PAD/..., its additional special tokens and added tokens marked special
    (where chat templates' markers such as ``<|im_end|>`` or ``<end_of_turn>`` are)."""
    tokens = set(getattr(tokenizer, "all_special_tokens", None) or [])
    tokens |= {t.content for t in (getattr(tokenizer, "added_tokens_decoder", None) or {}).values() if t.special}
    return sorted(t for t in tokens if t)


def _last_special(tokenizer, text: str) -> str:
    return max((t for t in special_tokens(tokenizer) if text.endswith(t)), key=len)


def _adds_bos(tokenizer) -> bool:
    """Whether encoding with special tokens puts the BOS token first (Llama-style tokenizers do, GPT-2/Qwen do not)."""
    ids = tokenizer("a", add_special_tokens=True)["input_ids"]
    return bool(ids) and ids[0] == tokenizer.bos_token_id


def _preview(value: Any, limit: int = 80) -> str:
    text = repr(value)
    return text if len(text) <= limit else text[:limit] + "..."


__all__ = ["Conversation", "Prompt", "as_conversation", "assistant_turns", "completion_value", "conversation_segments",
           "is_messages", "prompt_value", "reply_turns", "render_chat_prompt", "require_chat_template", "special_tokens",
           "split_conversation", "split_pair",
           "turn_end", "turn_end_ids", "turn_end_token_id"]
