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
