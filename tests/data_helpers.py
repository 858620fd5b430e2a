"""Small data files for tests (importable from any test file: `from data_helpers import ...`)."""

import json


def write_jsonl(path, rows):
    with open(path, "w") as f:
        for row in rows:
            f.write(json.dumps(row) + "\n")
    return path


def add_const_rows(n: int, prompt_key: str = "prompt", completion_key: str = "completion"):
    """Short add-a-constant problems: prompt/completion rows a tiny model can learn."""
    return [{prompt_key: f'def add_{k}(x):\n    """Return x plus {k}."""\n', completion_key: f"    return x + {k}\n"}
            for k in range(n)]


CHAT_TEMPLATE = "{% for m in messages %}<{{ m['role'] }}>{{ m['content'] }}{% endfor %}<assistant>"

TURN_TEMPLATE = ("{{ bos_token }}{% for m in messages %}<start_of_turn>{{ 'model' if m['role'] == 'assistant' else "
                 "m['role'] }}\n{{ m['content'] }}<end_of_turn>\n{% endfor %}"
                 "{% if add_generation_prompt %}<start_of_turn>model\n{% endif %}")
"""A Gemma-style template: turns are marked by special tokens, and an assistant turn ends with <end_of_turn>, not EOS."""


def make_chat_model(path):
    """The tiny preset as a chat model at ``path``: the same weights, its tokenizer given CHAT_TEMPLATE."""
    import shutil

    import transformers

    from lit_align.models import materialize_preset

    shutil.copytree(materialize_preset("preset:tiny"), path)
    tokenizer = transformers.AutoTokenizer.from_pretrained(path)
    tokenizer.chat_template = CHAT_TEMPLATE
    tokenizer.save_pretrained(path)
    return str(path)


def make_turn_chat_model(path):
    """The tiny preset as a chat model whose template ends turns with its own special token (TURN_TEMPLATE, as
    Gemma's): <start_of_turn> and <end_of_turn> added to the tokenizer (ids 260 and 261), the embeddings grown."""
    import transformers

    from lit_align.models import load_causal_lm, materialize_preset

    tokenizer = transformers.AutoTokenizer.from_pretrained(materialize_preset("preset:tiny"))
    tokenizer.add_special_tokens({"additional_special_tokens": ["<start_of_turn>", "<end_of_turn>"]})
    tokenizer.chat_template = TURN_TEMPLATE
    model = load_causal_lm("preset:tiny")
    model.resize_token_embeddings(len(tokenizer), mean_resizing=False)
    model.save_pretrained(path)
    tokenizer.save_pretrained(path)
    return str(path)
