"""CodeContests loading: languages, records, parquet/jsonl files, prompts and errors."""

from __future__ import annotations

import datasets
import pytest
from code_contests_fixture import (
    SUM_BAD_FAR,
    SUM_BAD_NEAR,
    SUM_CPP_OK,
    SUM_OK,
    SUM_OK_2,
    fake_records,
    write_jsonl,
    write_parquet,
)

from lit_align.data_modules.code_contests import (
    CodeContestsProblem,
    Language,
    load_code_contests,
    parse_language,
    problem_prompt,
)


@pytest.mark.parametrize(
    ("value", "expected"),
    [
        ("python3", Language.PYTHON3),
        ("PYTHON3", Language.PYTHON3),
        ("Python 3", Language.PYTHON3),
        ("py3", Language.PYTHON3),
        (3, Language.PYTHON3),
        ("3", Language.PYTHON3),
        ("cpp", Language.CPP),
        ("c++", Language.CPP),
        ("C++", Language.CPP),
        ("java", Language.JAVA),
        ("python2", Language.PYTHON2),
        ("python", Language.PYTHON2),  # the dataset's own label for Python 2
        ("UNKNOWN_LANGUAGE", Language.UNKNOWN),
        (0, Language.UNKNOWN),
        (Language.JAVA, Language.JAVA),
    ],
)
def test_parse_language_accepts_names_and_codes(value, expected):
    assert parse_language(value) is expected


@pytest.mark.parametrize("value", ["rust", 7, -1, "", True, 3.0])
def test_parse_language_rejects_unknown_values_naming_them_and_the_valid_names(value):
    with pytest.raises(ValueError) as info:
        parse_language(value)
    message = str(info.value)
    assert repr(value) in message
    if not isinstance(value, float):
        assert "PYTHON3=3" in message and "CPP=2" in message and "JAVA=4" in message


def test_from_record_reads_solutions_tests_and_limits():
    problem = CodeContestsProblem.from_record(fake_records()[0])
    assert problem.name == "1_A. Sum"
    assert problem.solutions[:2] == [(Language.PYTHON3, SUM_OK), (Language.CPP, SUM_CPP_OK)]
    assert problem.solutions_in(Language.PYTHON3) == [SUM_OK, SUM_OK_2]
    assert problem.incorrect_solutions_in(Language.PYTHON3) == [SUM_BAD_FAR, SUM_BAD_NEAR]
    assert problem.incorrect_solutions_in(Language.JAVA) == []
    assert problem.public_tests == [("1 2\n", "3\n")]
    assert problem.private_tests == [("5 7\n", "12\n"), ("-1 1\n", "0\n")]
    assert problem.generated_tests == [("0 0\n", "0\n")]
    assert problem.time_limit_seconds == 2.5
    assert problem.memory_limit_bytes == 256_000_000


def test_from_record_accepts_language_names_and_missing_tests():
    record = {
        "name": "x",
        "description": "d",
        "solutions": {"language": ["PYTHON3"], "solution": ["print(1)"]},
        "incorrect_solutions": {"language": [], "solution": []},
    }
    problem = CodeContestsProblem.from_record(record)
    assert problem.solutions == [(Language.PYTHON3, "print(1)")]
    assert problem.public_tests == problem.private_tests == problem.generated_tests == []
    assert problem.time_limit_seconds is None and problem.memory_limit_bytes is None


def test_from_record_errors_name_the_field_at_fault():
    record = fake_records()[0]
    del record["incorrect_solutions"]
    with pytest.raises(ValueError, match=r"missing field\(s\) \['incorrect_solutions'\]"):
        CodeContestsProblem.from_record(record)

    record = fake_records()[0]
    record["solutions"]["language"][1] = 9
    with pytest.raises(ValueError, match=r"problem '1_A. Sum': solutions.language\[1\]: language code 9 is not one of"):
        CodeContestsProblem.from_record(record)

    record = fake_records()[0]
    record["incorrect_solutions"]["solution"].pop()
    with pytest.raises(ValueError, match="'incorrect_solutions' has 3 languages but 2 solutions"):
        CodeContestsProblem.from_record(record)

    record = fake_records()[0]
    record["public_tests"] = ["1 2"]
    with pytest.raises(ValueError, match="'public_tests' must be a mapping with keys 'input' and 'output'"):
        CodeContestsProblem.from_record(record)


def test_problem_prompt_names_the_language():
    problem = CodeContestsProblem.from_record(fake_records()[0])
    assert problem_prompt(problem, Language.PYTHON3) == (
        "Given two integers a and b, print a + b.\n\n"
        "Write a Python 3 program that reads from standard input and writes to standard output.\n"
    )
    assert "Write a C++ program" in problem_prompt(problem, "cpp")
    with pytest.raises(ValueError, match="UNKNOWN"):
        problem_prompt(problem, Language.UNKNOWN)


def test_parquet_and_jsonl_load_the_same_problems(tmp_path):
    from_parquet = load_code_contests(str(write_parquet(tmp_path / "cc.parquet")))
    from_jsonl = load_code_contests(str(write_jsonl(tmp_path / "cc.jsonl")))
    expected = [CodeContestsProblem.from_record(r) for r in fake_records()]
    assert from_parquet == expected
    assert from_jsonl == expected
    assert [p.name for p in from_parquet] == ["1_A. Sum", "2_B. Echo", "3_C. Max", "4_D. Scale"]


def test_directory_in_hub_layout_selects_the_split_and_limit(tmp_path):
    records = fake_records()
    write_parquet(tmp_path / "data" / "train-00000-of-00002.parquet", records[:2])
    write_parquet(tmp_path / "data" / "train-00001-of-00002.parquet", records[2:])
    write_parquet(tmp_path / "data" / "test-00000-of-00001.parquet", records[1:2])
    assert [p.name for p in load_code_contests(str(tmp_path))] == ["1_A. Sum", "2_B. Echo", "3_C. Max", "4_D. Scale"]
    assert [p.name for p in load_code_contests(str(tmp_path), split="test")] == ["2_B. Echo"]
    assert [p.name for p in load_code_contests(str(tmp_path), limit=3)] == ["1_A. Sum", "2_B. Echo", "3_C. Max"]
    assert [p.name for p in load_code_contests(str(tmp_path), data_files="data/test-00000-of-00001.parquet")] == [
        "2_B. Echo"
    ]
    with pytest.raises(ValueError, match=r"no files for split 'valid'.*\['test', 'train'\]"):
        load_code_contests(str(tmp_path), split="valid")


def test_missing_column_names_the_column_the_file_and_its_columns(tmp_path):
    path = write_parquet(tmp_path / "cc.parquet", drop=("incorrect_solutions",))
    with pytest.raises(ValueError) as info:
        load_code_contests(str(path))
    message = str(info.value)
    assert "'incorrect_solutions' is missing" in message
    assert str(path) in message
    assert "'solutions'" in message and "'description'" in message


def test_missing_file_is_a_clear_error(tmp_path):
    missing = tmp_path / "nope.parquet"
    with pytest.raises(FileNotFoundError, match=f"{missing}.*does not exist"):
        load_code_contests(str(missing))
    with pytest.raises(FileNotFoundError, match="not found.*absent.parquet"):
        load_code_contests(str(write_jsonl(tmp_path / "cc.jsonl").parent), data_files="absent.parquet")


def test_unreachable_hub_says_to_use_a_local_file(monkeypatch):
    def offline(*args, **kwargs):
        raise OSError("couldn't reach huggingface.co")

    monkeypatch.setattr(datasets, "load_dataset", offline)
    with pytest.raises(ConnectionError, match="deepmind/code_contests.*couldn't reach.*local parquet/jsonl"):
        load_code_contests("deepmind/code_contests", limit=2)


def test_hub_id_in_offline_mode_is_a_clear_error():
    # tests/conftest.py switches the hub off, as on a machine without network
    with pytest.raises(ConnectionError, match="lit-align-tests/no-such-dataset.*local parquet/jsonl file or directory"):
        load_code_contests("lit-align-tests/no-such-dataset")


def test_hub_branch_passes_the_split_and_shard_and_streams_when_limited(monkeypatch):
    calls = []
    table = datasets.Dataset.from_list(fake_records())

    def fake_hub(source, split, data_files=None, streaming=False):
        calls.append((source, split, data_files, streaming))
        return table.to_iterable_dataset() if streaming else table

    monkeypatch.setattr(datasets, "load_dataset", fake_hub)
    loaded = load_code_contests("deepmind/code_contests", split="test", data_files="data/test-*.parquet")
    assert [p.name for p in loaded] == ["1_A. Sum", "2_B. Echo", "3_C. Max", "4_D. Scale"]
    limited = load_code_contests("deepmind/code_contests", limit=2)
    assert limited == loaded[:2]
    assert calls == [
        ("deepmind/code_contests", "test", {"test": "data/test-*.parquet"}, False),
        ("deepmind/code_contests", "train", None, True),
    ]
