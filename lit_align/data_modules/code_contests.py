"""CodeContests (Li et al., 2022) in its Hugging Face layout: languages, problem records, loading, prompts.

The schema is the one of ``deepmind/code_contests``: one row per problem with ``name``, ``description``,
``solutions`` / ``incorrect_solutions`` as ``{"language": [int], "solution": [str]}`` and tests as
``{"input": [str], "output": [str]}`` in ``public_tests``, ``private_tests`` and ``generated_tests``.
The same schema in local parquet or jsonl files (the hub's own ``data/*.parquet`` shards, or an export)
loads the same way, so nothing here needs the network unless a hub id is asked for.
"""

from __future__ import annotations

import os
import re
from dataclasses import dataclass
from enum import IntEnum
from pathlib import Path
from typing import TYPE_CHECKING, Any, Iterable

if TYPE_CHECKING:  # imported where used: `import lit_align` stays light
    import datasets


__all__ = [
    "Language",
    "parse_language",
    "CodeContestsProblem",
    "load_code_contests",
    "problem_prompt",
    "REQUIRED_COLUMNS",
    "TEST_COLUMNS",
]


class Language(IntEnum):
    """Solution language codes of CodeContests (the dataset's ClassLabel order)."""

    UNKNOWN = 0
    PYTHON2 = 1
    CPP = 2
    PYTHON3 = 3
    JAVA = 4


# Names people write, after lower-casing and removing spaces, "_", "-" and ".". "python" alone is the
# dataset's own label for Python 2 (its ClassLabel names are UNKNOWN_LANGUAGE, PYTHON, CPP, PYTHON3, JAVA).
_LANGUAGE_ALIASES: dict[str, Language] = {
    "unknown": Language.UNKNOWN,
    "unknownlanguage": Language.UNKNOWN,
    "python": Language.PYTHON2,
    "python2": Language.PYTHON2,
    "py2": Language.PYTHON2,
    "cpp": Language.CPP,
    "c++": Language.CPP,
    "cxx": Language.CPP,
    "python3": Language.PYTHON3,
    "py3": Language.PYTHON3,
    "java": Language.JAVA,
}

_DISPLAY_NAMES: dict[Language, str] = {
    Language.PYTHON2: "Python 2",
    Language.CPP: "C++",
    Language.PYTHON3: "Python 3",
    Language.JAVA: "Java",
}


def _valid_language_names() -> str:
    names = ", ".join(f"{lang.name}={lang.value}" for lang in Language)
    return f"{names} (also accepted: {', '.join(sorted(_LANGUAGE_ALIASES))})"


def parse_language(value: str | int) -> Language:
    """Turn a language name or code into a :class:`Language`.

    Args:
        value: a code 0-4, a :class:`Language`, or a name such as ``"python3"``, ``"PYTHON3"``, ``"Python 3"``,
            ``"cpp"``, ``"c++"``, ``"java"``; ``"python"`` is Python 2, as in the dataset's own labels.

    Raises:
        ValueError: the value is neither a known code nor a known name; the message lists the valid ones.
    """
    if isinstance(value, Language):
        return value
    if isinstance(value, bool):  # bool is an int subclass; True is not a language
        raise ValueError(f"language {value!r} is not a language; valid: {_valid_language_names()}")
    if isinstance(value, int):
        try:
            return Language(value)
        except ValueError:
            raise ValueError(f"language code {value!r} is not one of {_valid_language_names()}") from None
    if isinstance(value, str):
        key = re.sub(r"[\s_\-.]", "", value.strip().lower())
        if key.isdigit():
            return parse_language(int(key))
        if key in _LANGUAGE_ALIASES:
            return _LANGUAGE_ALIASES[key]
        if key.upper() in Language.__members__:
            return Language[key.upper()]
        raise ValueError(f"language {value!r} is not one of {_valid_language_names()}")
    raise ValueError(f"language {value!r} has type {type(value).__name__}; expected a name (str) or a code (int)")


REQUIRED_COLUMNS: tuple[str, ...] = ("name", "description", "solutions", "incorrect_solutions")
"""Columns a CodeContests file must have; the test columns below are optional (empty when absent)."""

TEST_COLUMNS: tuple[str, ...] = ("public_tests", "private_tests", "generated_tests")


def _solutions(record: dict[str, Any], field: str, where: str) -> list[tuple[Language, str]]:
    value = record.get(field)
    if value is None:
        return []
    if not isinstance(value, dict) or "language" not in value or "solution" not in value:
        raise ValueError(
            f"{where}: field {field!r} must be a mapping with keys 'language' and 'solution', got {_describe(value)}"
        )
    languages = list(value["language"] or [])
    texts = list(value["solution"] or [])
    if len(languages) != len(texts):
        raise ValueError(
            f"{where}: field {field!r} has {len(languages)} languages but {len(texts)} solutions; they must pair up"
        )
    out: list[tuple[Language, str]] = []
    for i, (language, text) in enumerate(zip(languages, texts)):
        try:
            parsed = parse_language(language)
        except ValueError as err:
            raise ValueError(f"{where}: {field}.language[{i}]: {err}") from None
        if not isinstance(text, str):
            raise ValueError(f"{where}: {field}.solution[{i}] must be a string, got {_describe(text)}")
        out.append((parsed, text))
    return out


def _tests(record: dict[str, Any], field: str, where: str) -> list[tuple[str, str]]:
    value = record.get(field)
    if value is None:
        return []
    if not isinstance(value, dict) or "input" not in value or "output" not in value:
        raise ValueError(
            f"{where}: field {field!r} must be a mapping with keys 'input' and 'output', got {_describe(value)}"
        )
    inputs = list(value["input"] or [])
    outputs = list(value["output"] or [])
    if len(inputs) != len(outputs):
        raise ValueError(f"{where}: field {field!r} has {len(inputs)} inputs but {len(outputs)} outputs")
    return [(str(i), str(o)) for i, o in zip(inputs, outputs)]


def _describe(value: Any) -> str:
    text = repr(value)
    return f"{type(value).__name__} {text[:60] + '...' if len(text) > 60 else text}"


@dataclass
class CodeContestsProblem:
    """One CodeContests problem: statement, correct and incorrect solutions with their languages, and tests."""

    name: str
    description: str
    solutions: list[tuple[Language, str]]
    incorrect_solutions: list[tuple[Language, str]]
    public_tests: list[tuple[str, str]]
    private_tests: list[tuple[str, str]]
    generated_tests: list[tuple[str, str]]
    time_limit_seconds: float | None = None
    """Per-test time limit from the record's ``time_limit`` ({seconds, nanos}); None when the record has none."""
    memory_limit_bytes: int | None = None
    """Memory limit from the record; None when absent or 0."""

    @classmethod
    def from_record(cls, record: dict[str, Any]) -> "CodeContestsProblem":
        """Build a problem from one row of the Hugging Face schema.

        Args:
            record: a mapping with at least ``name``, ``description``, ``solutions`` and ``incorrect_solutions``;
                test fields and ``time_limit`` / ``memory_limit_bytes`` are read when present.

        Raises:
            ValueError: a required field is missing, a field has the wrong shape, or a language code is unknown.
        """
        if not isinstance(record, dict):
            raise ValueError(f"a CodeContests record must be a dict, got {_describe(record)}")
        missing = [c for c in REQUIRED_COLUMNS if c not in record]
        if missing:
            raise ValueError(f"CodeContests record is missing field(s) {missing}; it has {sorted(record)}")
        name = record["name"]
        where = f"problem {name!r}"
        if not isinstance(name, str) or not name:
            raise ValueError(f"CodeContests record field 'name' must be a non-empty string, got {_describe(name)}")
        if not isinstance(record["description"], str):
            raise ValueError(f"{where}: field 'description' must be a string, got {_describe(record['description'])}")
        time_limit = record.get("time_limit")
        seconds: float | None = None
        if isinstance(time_limit, dict):
            seconds = float(time_limit.get("seconds") or 0) + float(time_limit.get("nanos") or 0) / 1e9
            seconds = seconds or None
        memory = record.get("memory_limit_bytes")
        return cls(
            name=name,
            description=record["description"],
            solutions=_solutions(record, "solutions", where),
            incorrect_solutions=_solutions(record, "incorrect_solutions", where),
            public_tests=_tests(record, "public_tests", where),
            private_tests=_tests(record, "private_tests", where),
            generated_tests=_tests(record, "generated_tests", where),
            time_limit_seconds=seconds,
            memory_limit_bytes=int(memory) if memory else None,
        )

    def solutions_in(self, language: Language) -> list[str]:
        """Correct solutions written in ``language``, in dataset order."""
        return [text for lang, text in self.solutions if lang == language]

    def incorrect_solutions_in(self, language: Language) -> list[str]:
        """Incorrect solutions written in ``language``, in dataset order."""
        return [text for lang, text in self.incorrect_solutions if lang == language]


def problem_prompt(problem: CodeContestsProblem, language: Language | str | int) -> str:
    """The prompt the policy sees: the statement, then one line asking for a stdin/stdout program in ``language``.

    Args:
        problem: the problem whose description becomes the prompt.
        language: the language the program must be written in (anything :func:`parse_language` accepts).

    Raises:
        ValueError: the language is UNKNOWN (there is no language to ask for) or not a language at all.
    """
    language = parse_language(language)
    if language == Language.UNKNOWN:
        raise ValueError("cannot ask for a program in language UNKNOWN; pick one of PYTHON2, CPP, PYTHON3, JAVA")
    return (
        f"{problem.description.strip()}\n\n"
        f"Write a {_DISPLAY_NAMES[language]} program that reads from standard input and writes to standard output.\n"
    )


# --- loading -----------------------------------------------------------------------------------------------

_BUILDERS: dict[str, str] = {".parquet": "parquet", ".jsonl": "json", ".json": "json"}
_SPLIT_ALIASES: dict[str, tuple[str, ...]] = {
    "train": ("train",),
    "valid": ("valid", "validation", "val"),
    "validation": ("valid", "validation", "val"),
    "val": ("valid", "validation", "val"),
    "test": ("test",),
}


def _looks_like_path(source: str) -> bool:
    """Whether ``source`` means a local path rather than a hub id (a missing file is then an error, not a download)."""
    return (
        source.startswith((os.sep, ".", "~"))
        or Path(source).suffix.lower() in _BUILDERS
        or source.count("/") > 1
        or (os.altsep is not None and os.altsep in source)
    )


def _split_of(path: Path) -> str | None:
    """The split a file name announces (``train-00000-of-00039.parquet`` -> ``train``), or None."""
    match = re.match(r"(train|valid|validation|val|test)(?:[-_.]|$)", path.name.lower())
    return match.group(1) if match else None


def _local_files(root: Path, split: str) -> list[Path]:
    """Data files for ``split`` under a local file or directory, sorted (so shards keep their order)."""
    if root.is_file():
        return [root]
    files = sorted(p for p in root.rglob("*") if p.is_file() and p.suffix.lower() in _BUILDERS)
    if not files:
        raise FileNotFoundError(f"no .parquet, .jsonl or .json files under directory {str(root)!r}")
    by_split = [p for p in files if _split_of(p) is not None]
    if not by_split:  # a directory without split names is one split, whatever it is called
        return files
    wanted = _SPLIT_ALIASES.get(split.lower(), (split.lower(),))
    chosen = [p for p in by_split if _split_of(p) in wanted]
    if not chosen:
        present = sorted({_split_of(p) for p in by_split})
        raise ValueError(f"no files for split {split!r} under {str(root)!r}; the file names show splits {present}")
    return chosen


def _load_local(files: list[Path], where: str) -> datasets.Dataset:
    import datasets

    builders = {_BUILDERS.get(p.suffix.lower()) for p in files}
    if None in builders:
        bad = [str(p) for p in files if p.suffix.lower() not in _BUILDERS]
        raise ValueError(f"unsupported CodeContests file type {bad}; expected .parquet, .jsonl or .json")
    if len(builders) > 1:
        raise ValueError(f"{where} mixes parquet and json files; keep one format per split")
    return datasets.load_dataset(builders.pop(), data_files=[str(p) for p in files], split="train")


def _check_columns(columns: Iterable[str], where: str) -> None:
    columns = list(columns)
    for column in REQUIRED_COLUMNS:
        if column not in columns:
            raise ValueError(f"{where}: required CodeContests column {column!r} is missing; it has columns {columns}")


def load_code_contests(
    source: str = "deepmind/code_contests",
    split: str = "train",
    data_files: str | list[str] | None = None,
    limit: int | None = None,
) -> list[CodeContestsProblem]:
    """Load CodeContests problems from the hub or from local parquet/jsonl files with the same schema.

    Args:
        source: a hub dataset id (read with ``datasets.load_dataset``), or a local ``.parquet`` / ``.jsonl`` /
            ``.json`` file, or a local directory of such files (file names like ``train-00000-of-00039.parquet``
            select the split; a directory without split names is taken whole).
        split: ``train``, ``valid`` (alias ``validation``) or ``test``.
        data_files: files to read instead of the whole split: paths relative to a local ``source`` directory,
            or the hub's file patterns (``"data/train-00000-*.parquet"``) to fetch a single shard.
        limit: keep only the first ``limit`` problems (with a hub id, rows are streamed so no more is downloaded).

    Raises:
        FileNotFoundError: a local path (or a file in ``data_files``) does not exist.
        ValueError: a required column is missing (the message names the file and its columns) or a record is malformed.
        ConnectionError: ``source`` is not local and the hub cannot be reached or does not have it.
    """
    import datasets

    if limit is not None and limit < 0:
        raise ValueError(f"limit must be >= 0 or None, got {limit}")
    local = Path(source).expanduser()
    if local.exists():
        if data_files is not None:
            base = local if local.is_dir() else local.parent
            paths = [base / f for f in ([data_files] if isinstance(data_files, str) else data_files)]
            missing = [str(p) for p in paths if not p.exists()]
            if missing:
                raise FileNotFoundError(f"CodeContests data file(s) not found: {missing}")
            files = paths
        else:
            files = _local_files(local, split)
        where = str(files[0]) if len(files) == 1 else f"{str(local)!r} ({len(files)} files)"
        table = _load_local(files, where)
        _check_columns(table.column_names, where)
        if limit is not None:
            table = table.select(range(min(limit, len(table))))
        rows: Iterable[dict[str, Any]] = table
    elif _looks_like_path(source):
        raise FileNotFoundError(f"CodeContests source {source!r} looks like a local path but does not exist")
    else:
        from lit_align.models import datasets_cache_only_without_hub, hub_retries_hint

        where = f"hub dataset {source!r} split {split!r}"
        # With data_files the hub builds its splits from them, named "train" unless told otherwise.
        hub_files = {split: data_files} if data_files is not None else None
        try:
            with datasets_cache_only_without_hub():
                if limit is not None:
                    stream = datasets.load_dataset(source, split=split, data_files=hub_files, streaming=True)
                    rows = list(stream.take(limit))
                    columns = list(rows[0]) if rows else list(REQUIRED_COLUMNS)
                else:
                    table = datasets.load_dataset(source, split=split, data_files=hub_files)
                    rows, columns = table, table.column_names
        except Exception as err:  # the hub raises many kinds (HTTP, offline mode, not found); say what to do instead
            raise ConnectionError(
                f"could not load {where} from the Hugging Face Hub ({type(err).__name__}: {err}{hub_retries_hint()}); "
                "when the hub is unreachable pass a local parquet/jsonl file or directory with the same schema"
            ) from err
        _check_columns(columns, where)
    return [CodeContestsProblem.from_record(dict(row)) for row in rows]
