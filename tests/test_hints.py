"""Mistyped options of the argparse commands (sample, evaluate, plan-memory, merge-lora, iadpo) get the nearest real
option suggested, also when argparse first reports a required option as missing."""

import pytest

from lit_align.cli import main
from lit_align.hints import HintingArgumentParser


@pytest.mark.parametrize("argv, error, hint", [
    # every required option given: argparse names the unknown one, the hint the option meant
    (["sample", "--benchmark", "humaneval", "--tempreature", "0.2", "--output", "s.jsonl"],
     "lit_align sample: error: unrecognized arguments: --tempreature 0.2", "did you mean --temperature?"),
    (["sample", "--benchmrk", "humaneval", "--output", "s.jsonl"],
     "lit_align sample: error: one of the arguments --benchmark --problems is required",
     "--benchmrk is not an option: did you mean --benchmark?"),
    (["evaluate", "--benchmark", "humaneval", "--sampels", "s.jsonl"],
     "lit_align evaluate: error: the following arguments are required: --samples",
     "--sampels is not an option: did you mean --samples?"),
    # the mistyped option was the required one: argparse says only that it is missing
    (["merge-lora", "--ckpt_pth", "last.ckpt", "--output_dir", "out"],
     "lit_align merge-lora: error: the following arguments are required: --ckpt_path",
     "--ckpt_pth is not an option: did you mean --ckpt_path?"),
    (["iadpo", "--confg", "c.yaml", "--output", "out"],
     "lit_align iadpo: error: the following arguments are required: --config",
     "--confg is not an option: did you mean --config?"),
    (["plan-memory", "--confg", "c.yaml", "--model.init_args.lora.r", "8"],
     "lit_align plan-memory: error: --config FILE.yaml is required (the same file `lit_align fit` takes)",
     "--confg is not an option: did you mean --config?"),
])
def test_mistyped_option_of_an_argparse_command_gets_a_hint(tmp_path, monkeypatch, capsys, argv, error, hint):
    monkeypatch.chdir(tmp_path)
    with pytest.raises(SystemExit) as exit_:
        main(argv)
    assert exit_.value.code == 2
    lines = capsys.readouterr().err.strip().splitlines()
    assert lines[-2:] == [error, f"  hint: {hint}"]  # one hint: plan-memory's dotted fit override is not flagged
    assert not any(tmp_path.iterdir())


def _parser(**kwargs) -> HintingArgumentParser:
    parser = HintingArgumentParser(prog="demo", **kwargs)
    parser.add_argument("--output", required=True)
    parser.add_argument("--max-new-tokens", type=int)
    return parser


def test_unknown_options_are_those_argparse_would_not_accept():
    given = ["--max-new", "3", "--ouput=x", "--zzz", "--output", "y", "--", "--not-an-option"]
    parser = _parser()
    parser.parse_known_args(given)
    # options are named in full: a prefix is unknown too; nothing after "--" is an option
    assert parser.unknown_options() == ["max-new", "ouput", "zzz"]
    parser = _parser(allow_abbrev=True)  # a parser that takes argparse's abbreviations: a prefix is not a typo
    parser.parse_known_args(given)
    assert parser.unknown_options() == ["ouput", "zzz"]


def test_a_prefix_of_an_option_is_refused_with_the_full_name(capsys):
    """``--out x`` is not taken for ``--output x``: scripts written with prefixes would change meaning once an
    option sharing the prefix is added."""
    with pytest.raises(SystemExit):
        _parser().parse_args(["--output", "x", "--max-new", "2"])
    assert capsys.readouterr().err.strip().splitlines()[-2:] == [
        "demo: error: unrecognized arguments: --max-new 2", "  hint: did you mean --max-new-tokens?"]


def test_no_hint_without_a_near_option(capsys):
    with pytest.raises(SystemExit):
        _parser().parse_args(["--zzz", "1"])
    assert capsys.readouterr().err.strip().splitlines()[-1] == "demo: error: the following arguments are required: --output"
    with pytest.raises(SystemExit):
        _parser().parse_args(["--ouput", "x", "--max-new-tokesn", "2"])
    assert capsys.readouterr().err.strip().splitlines()[-3:] == [
        "demo: error: the following arguments are required: --output",
        "  hint: --ouput is not an option: did you mean --output?",
        "  hint: --max-new-tokesn is not an option: did you mean --max-new-tokens?"]
