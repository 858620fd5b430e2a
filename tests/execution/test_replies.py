"""Chat replies as programs: the code taken out of a reply, run under the HumanEval protocol and stdin/stdout tests,
and `lit_align evaluate --extract-code`."""

from __future__ import annotations

import json

import pytest

from lit_align.execution import ExecutionPool, IOTest, Status, StdioJob, StdioProblem
from lit_align.execution.evaluate import main as evaluate
from lit_align.execution.problems import FunctionJob, FunctionProblem
from lit_align.execution.replies import body_completion, defines_function, extract_code, reply_completion

from .conftest import DOUBLE

WHOLE = ("Here is the function:\n\n```python\ndef double(x):\n    return 2 * x\n```\n\nIt multiplies x by two.")
BODY = "```\n    return x * 2\n```"
WRONG = "Sure!\n```py\ndef double(x):\n    return x + 2\n```"
UNFENCED = "def double(x):\n    return x << 1\n"
CUT = "```python\ndef double(x):\n    return 2 * x\n"  # the token limit ended the reply inside its fence


@pytest.mark.parametrize("reply, language, code", [
    (WHOLE, "python3", "def double(x):\n    return 2 * x\n"),
    (BODY, "python3", "    return x * 2\n"),
    (CUT, "python3", "def double(x):\n    return 2 * x\n"),
    (UNFENCED, "python3", UNFENCED),
    ("```text\nnot code\n```\n```python\nprint(1)\n```", "python3", "print(1)\n"),  # the python block, not the first
    ("```cpp\nint main(){}\n```\n```python\nprint(1)\n```", "cpp", "int main(){}\n"),
    ("```text\nonly\n```", "python3", "only\n"),  # no python or untagged block: the first
    ("~~~python\nx = 1\n~~~", "python3", "x = 1\n"),
    ("````python\nx = '```'\n````", "python3", "x = '```'\n"),  # a longer fence holds a shorter one
])
def test_extract_code(reply, language, code):
    assert extract_code(reply, language) == code


def test_defines_function():
    assert defines_function("import math\n\ndef double(x):\n    pass\n", "double")
    assert defines_function("async def double (x):\n    pass\n", "double")
    assert not defines_function("def doubled(x):\n    pass\n", "double")
    assert not defines_function("class A:\n    def double(self):\n        pass\n", "double")  # a method


def test_replies_run_against_the_problems_tests():
    """A reply that writes the whole function replaces the prompt's; a body-only reply continues it; the tests decide."""
    completions = [reply_completion(DOUBLE, reply) for reply in (WHOLE, BODY, WRONG, UNFENCED, CUT)]
    assert completions[0] == "\n    pass\n\ndef double(x):\n    return 2 * x\n"
    assert completions[1] == "    return x * 2\n"
    results = ExecutionPool().run([FunctionJob(DOUBLE, c) for c in completions])
    assert [r.status for r in results] == [Status.PASSED, Status.PASSED, Status.FAILED, Status.PASSED, Status.PASSED]
    # appended as it is, a fenced reply is not a program
    [raw] = ExecutionPool().run([FunctionJob(DOUBLE, WHOLE)])
    assert raw.status == Status.SYNTAX_ERROR


HELPED = '''Sure:
```python
import operator
from functools import reduce

FACTOR = 2

@staticmethod
def unused():
    pass

def double(x):
    """Double it.

    Uses a helper."""
    # the product
    return times(x, FACTOR)

def times(a, b):
    return reduce(operator.mul, [a, b])

print(double(3))
if __name__ == "__main__":
    assert double(1) == 2
```'''


def test_a_reply_as_the_body_that_continues_the_prompt():
    """body_completion: what a base model would have written after the prompt (a chosen completion to train on)."""
    body = body_completion(DOUBLE.prompt, "double", HELPED)
    assert body == ("    # the product\n    return times(x, FACTOR)\n\n\nimport operator\nfrom functools import reduce\n"
                    "\n\nFACTOR = 2\n\n\n@staticmethod\ndef unused():\n    pass\n"
                    "\n\ndef times(a, b):\n    return reduce(operator.mul, [a, b])\n")
    docstring_only = '```python\ndef double(x):\n    """Only a docstring."""\n```'
    cases = [body, body_completion(DOUBLE.prompt, "double", "```python\ndef double(x): return x + x\n```"),
             body_completion(DOUBLE.prompt, "double", BODY), body_completion(DOUBLE.prompt, "double", WRONG),
             body_completion(DOUBLE.prompt, "double", docstring_only)]
    assert cases[1:3] == ["    return x + x\n", "    return x * 2\n"]  # a one-line definition; a body as it is
    assert cases[4] == "    pass\n"
    results = ExecutionPool().run([FunctionJob(DOUBLE, c) for c in cases])
    assert [r.status for r in results] == [Status.PASSED] * 3 + [Status.FAILED] * 2
    # a method of a class indented in the prompt keeps its indentation
    method = body_completion('class A:\n    def double(self, x):\n        """Twice."""\n', "double",
                             "```python\ndef double(self, x):\n    return 2 * x\n```")
    assert method == "        return 2 * x\n"
    broken = "```python\ndef double(x):\n    return (\n```"
    assert body_completion(DOUBLE.prompt, "double", broken) == "def double(x):\n    return (\n"  # as it is


MULTILINE = '''```python
import textwrap

def lines(x):
  # two spaces deep in the reply
  text = """a
    b"""
  other = f"""{x}
  c"""
  if x:
      return textwrap.dedent(text + other)
  return ("a"
   "b")
```'''


def test_a_reply_body_keeps_its_strings_and_comments_when_reindented():
    """Only indentation changes: a multi-line string's lines keep their leading spaces, and the comments before the
    first statement stay with the body."""
    prompt = 'class Text:\n    def lines(self, x):\n        """The lines."""\n'
    body = body_completion(prompt, "lines", MULTILINE.replace("def lines(x)", "def lines(self, x)"))
    assert body == ('        # two spaces deep in the reply\n        text = """a\n    b"""\n'
                    '        other = f"""{x}\n  c"""\n        if x:\n            return textwrap.dedent(text + other)\n'
                    '        return ("a"\n         "b")\n\n\nimport textwrap\n')
    # the reply's import is global (at the top level, after the class), so the method can use it
    problem = FunctionProblem(task_id="test/lines", prompt=prompt, entry_point="Text", test=(
        "def check(candidate):\n"
        "    assert candidate().lines(1) == 'a\\n    b1\\n  c'\n"
        "    assert candidate().lines(0) == 'ab'\n"))
    [result] = ExecutionPool().run([FunctionJob(problem, body)])
    assert result.status == Status.PASSED, result


def test_a_reply_body_keeps_the_comments_after_its_last_statement():
    """Comments indented inside the function after its last statement belong to the body (the syntax tree ends at
    the statement); a comment at the top level after it does not."""
    reply = ("```python\ndef double(x):\n    y = x + x\n    return y\n    # y is even\n\n      # so is x + y\n"
             "# a note about the module\nprint(double(2))\n```")
    assert body_completion(DOUBLE.prompt, "double", reply) == "    y = x + x\n    return y\n    # y is even\n\n      # so is x + y\n"


def test_a_stdio_reply_is_the_program_in_its_fence():
    problem = StdioProblem(task_id="sum", public_tests=(IOTest("1 2\n", "3\n"),))
    reply = "Read both numbers:\n```python\na, b = map(int, input().split())\nprint(a + b)\n```\nDone."
    [result] = ExecutionPool().run([StdioJob(problem, reply_completion(problem, reply, "python3"), "python3")])
    assert result.status == Status.PASSED


def test_evaluate_extract_code(tmp_path, capsys):
    problems = tmp_path / "p.jsonl"
    problems.write_text(json.dumps({"task_id": DOUBLE.task_id, "prompt": DOUBLE.prompt, "test": DOUBLE.test,
                                    "entry_point": DOUBLE.entry_point}) + "\n")
    samples = tmp_path / "s.jsonl"
    samples.write_text("".join(json.dumps({"task_id": DOUBLE.task_id, "completion": r}) + "\n"
                               for r in (WHOLE, BODY, WRONG)))
    assert evaluate(["--problems", str(problems), "--samples", str(samples), "--k", "1", "--extract-code"]) == 0
    summary = json.loads(capsys.readouterr().out)
    assert summary["pass@1"] == pytest.approx(2 / 3) and summary["status_counts"]["failed"] == 1
    assert evaluate(["--problems", str(problems), "--samples", str(samples), "--k", "1", "--overwrite"]) == 0
    summary = json.loads(capsys.readouterr().out)  # the same replies appended as they are: nothing runs
    assert summary["pass@1"] == 0.0 and summary["status_counts"]["syntax_error"] == 3
