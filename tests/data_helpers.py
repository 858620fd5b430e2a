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
