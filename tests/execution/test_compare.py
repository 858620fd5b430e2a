"""Output comparison as CodeContests' checker does it: whitespace tokens, case, 1e-5 for numbers."""

import pytest

from lit_align.execution.compare import outputs_match, tokens_match


@pytest.mark.parametrize(
    "got, want",
    [
        ("1 2 3\n", "1 2 3"),
        ("1  2\t3\r\n\n", "1\n2\n3\n"),  # runs of whitespace and line breaks do not matter
        ("YES\n", "yes\n"),  # case-insensitive, as the original lower-cases both sides
        ("0.3333333", "0.33333330001"),
        ("0.500004", "0.5"),  # |diff| < 1e-5
        ("1.0", "1"),  # a float and an int are compared as numbers
        ("123456789012345678901234567890", "123456789012345678901234567890"),
        ("", "\n \n"),
        (b"4 5\n", "4 5"),
    ],
)
def test_outputs_that_match(got, want):
    assert outputs_match(got, want)


@pytest.mark.parametrize(
    "got, want",
    [
        ("1 2", "1 2 3"),  # token count differs
        ("0.50002", "0.5"),  # |diff| = 2e-5 >= 1e-5
        ("123456789012345678901234567891", "123456789012345678901234567890"),  # big ints exactly
        ("2", "3"),
        ("abc", "abd"),
        ("1e5", "100001"),
        ("nan", "0"),  # nan is a string token here
        ("12", "1 2"),
    ],
)
def test_outputs_that_do_not_match(got, want):
    assert not outputs_match(got, want)


def test_token_rules():
    assert tokens_match("1e-6", "0")  # scientific notation parses as a number within tolerance
    assert not tokens_match("1_000", "1000")  # Python's underscores are not numbers in a judge's output
    assert not tokens_match("0x10", "16")
    assert tokens_match("-0.0", "0")
    assert tokens_match("5", "5.000001", tolerance=1e-5)
    assert not tokens_match("5", "5.1", tolerance=1e-5)
