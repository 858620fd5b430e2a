"""A few fake CodeContests problems in the Hugging Face schema, written to parquet and jsonl by the tests."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pyarrow as pa
import pyarrow.parquet as pq

PY2, CPP, PY3, JAVA = 1, 2, 3, 4

SUM_OK = "a, b = map(int, input().split())\nprint(a + b)\n"
SUM_OK_2 = "import sys\na, b = map(int, sys.stdin.read().split())\nprint(a + b)\n"
SUM_BAD_NEAR = "a, b = map(int, input().split())\nprint(a - b)\n"  # one character from SUM_OK
SUM_BAD_FAR = "print(0)\n"
SUM_CPP_OK = "#include <cstdio>\nint main(){int a,b;scanf(\"%d%d\",&a,&b);printf(\"%d\\n\",a+b);}\n"
SUM_CPP_BAD = "#include <cstdio>\nint main(){int a,b;scanf(\"%d%d\",&a,&b);printf(\"%d\\n\",a*b);}\n"


def _solutions(pairs: list[tuple[int, str]]) -> dict[str, list]:
    return {"language": [lang for lang, _ in pairs], "solution": [text for _, text in pairs]}


def _tests(pairs: list[tuple[str, str]]) -> dict[str, list[str]]:
    return {"input": [i for i, _ in pairs], "output": [o for _, o in pairs]}


def fake_records() -> list[dict[str, Any]]:
    """Four problems: a mixed-language one, one without incorrect solutions, one with a chosen == rejected
    solution, and one with many solutions (for caps and ratios)."""
    many_ok = [(PY3, f"n = int(input())\nprint(n * {k})\n") for k in range(2, 12)]
    many_bad = [(PY3, f"n = int(input())\nprint(n + {k})\n") for k in range(2, 12)]
    return [
        {
            "name": "1_A. Sum",
            "description": "Given two integers a and b, print a + b.",
            "public_tests": _tests([("1 2\n", "3\n")]),
            "private_tests": _tests([("5 7\n", "12\n"), ("-1 1\n", "0\n")]),
            "generated_tests": _tests([("0 0\n", "0\n")]),
            "source": 2,
            "difficulty": 7,
            "solutions": _solutions(
                [(PY3, SUM_OK), (CPP, SUM_CPP_OK), (PY3, SUM_OK_2), (PY2, "print sum(map(int, raw_input().split()))\n")]
            ),
            "incorrect_solutions": _solutions([(PY3, SUM_BAD_FAR), (CPP, SUM_CPP_BAD), (PY3, SUM_BAD_NEAR)]),
            "time_limit": {"seconds": 2, "nanos": 500000000},
            "memory_limit_bytes": 256000000,
        },
        {
            "name": "2_B. Echo",
            "description": "Print the input line unchanged.",
            "public_tests": _tests([("abc\n", "abc\n")]),
            "private_tests": _tests([]),
            "generated_tests": _tests([]),
            "source": 2,
            "difficulty": 7,
            "solutions": _solutions([(PY3, "print(input())\n")]),
            "incorrect_solutions": _solutions([(JAVA, "class Main { public static void main(String[] a) {} }\n")]),
            "time_limit": {"seconds": 1, "nanos": 0},
            "memory_limit_bytes": 0,
        },
        {
            "name": "3_C. Max",
            "description": "Print the larger of two integers.",
            "public_tests": _tests([("3 9\n", "9\n")]),
            "private_tests": _tests([]),
            "generated_tests": _tests([]),
            "source": 1,
            "difficulty": 1,
            "solutions": _solutions([(PY3, "print(max(map(int, input().split())))\n")]),
            "incorrect_solutions": _solutions(
                [(PY3, "print(max(map(int, input().split())))\n  "), (PY3, "print(min(map(int, input().split())))\n")]
            ),
            "time_limit": None,
            "memory_limit_bytes": 0,
        },
        {
            "name": "4_D. Scale",
            "description": "Read n and print a multiple of it.",
            "public_tests": _tests([("2\n", "4\n")]),
            "private_tests": _tests([]),
            "generated_tests": _tests([]),
            "source": 2,
            "difficulty": 8,
            "solutions": _solutions(many_ok),
            "incorrect_solutions": _solutions(many_bad),
            "time_limit": {"seconds": 3, "nanos": 0},
            "memory_limit_bytes": 64000000,
        },
    ]


_SCHEMA = pa.schema(
    [
        ("name", pa.string()),
        ("description", pa.string()),
        ("public_tests", pa.struct([("input", pa.list_(pa.string())), ("output", pa.list_(pa.string()))])),
        ("private_tests", pa.struct([("input", pa.list_(pa.string())), ("output", pa.list_(pa.string()))])),
        ("generated_tests", pa.struct([("input", pa.list_(pa.string())), ("output", pa.list_(pa.string()))])),
        ("source", pa.int64()),
        ("difficulty", pa.int64()),
        ("solutions", pa.struct([("language", pa.list_(pa.int64())), ("solution", pa.list_(pa.string()))])),
        ("incorrect_solutions", pa.struct([("language", pa.list_(pa.int64())), ("solution", pa.list_(pa.string()))])),
        ("time_limit", pa.struct([("seconds", pa.int64()), ("nanos", pa.int64())])),
        ("memory_limit_bytes", pa.int64()),
    ]
)


def write_parquet(path: Path, records: list[dict[str, Any]] | None = None, drop: tuple[str, ...] = ()) -> Path:
    """Write records (the fake ones by default) as one parquet file with the hub's column types; drop some columns."""
    records = fake_records() if records is None else records
    schema = pa.schema([f for f in _SCHEMA if f.name not in drop])
    table = pa.Table.from_pylist([{k: v for k, v in r.items() if k not in drop} for r in records], schema=schema)
    path.parent.mkdir(parents=True, exist_ok=True)
    pq.write_table(table, path)
    return path


def write_jsonl(path: Path, records: list[dict[str, Any]] | None = None) -> Path:
    """Write records (the fake ones by default) as jsonl, one problem per line."""
    records = fake_records() if records is None else records
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(json.dumps(r) + "\n" for r in records))
    return path
