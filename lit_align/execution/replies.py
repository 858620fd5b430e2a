"""Chat replies as programs: the code a chat model's reply holds, for the HumanEval protocol and stdin/stdout tests.

A base model continues a function's prompt, so its completion is appended to the prompt as it is. A chat (instruct)
model answers in a message that usually wraps the code in a Markdown fence and prose, and usually writes the whole
function again. :func:`extract_code` takes the code out of the reply; :func:`reply_completion` turns it into what
the HumanEval protocol appends to the prompt: the code as a continuation when it does not define the problem's
function, or, when it does, a ``pass`` closing the prompt's (docstring-only) function followed by the reply's
definition, which replaces it. Either way the program is run against the problem's unchanged tests in the sandbox.
"""

from __future__ import annotations

import re

from lit_align.execution.problems import FunctionProblem, StdioProblem

_FENCE = re.compile(r"^[ \t]*(```+|~~~+)[ \t]*([\w+#.-]*)[^\n]*\n", re.MULTILINE)
_TAGS = {"python3": {"python", "python3", "py", "py3"}, "cpp": {"cpp", "c++", "cc", "cxx"}}


def _blocks(reply: str) -> list[tuple[str, str]]:
    """``(tag, code)`` of each fenced block in order; a fence left open (a reply cut at its token limit) runs to the
    end of the reply."""
    blocks, position = [], 0
    while (opening := _FENCE.search(reply, position)) is not None:
        fence, tag = opening.group(1), opening.group(2).lower()
        closing = re.compile(rf"^[ \t]*{re.escape(fence[0]) * len(fence)}[ \t]*$", re.MULTILINE)
        end = closing.search(reply, opening.end())
        code = reply[opening.end():end.start() if end else len(reply)]
        blocks.append((tag, code))
        position = end.end() if end else len(reply)
    return blocks


def extract_code(reply: str, language: str = "python3") -> str:
    """The code of a chat reply: its first fenced block tagged with ``language`` (``python3``: python, py; ``cpp``:
    cpp, c++), else its first untagged block, else its first block, else the reply as it is (no fence)."""
    blocks = _blocks(reply)
    if not blocks:
        return reply
    tags = _TAGS.get(language, {language})
    for wanted in (lambda tag: tag in tags, lambda tag: tag == ""):
        for tag, code in blocks:
            if wanted(tag):
                return code
    return blocks[0][1]


def defines_function(code: str, name: str) -> bool:
    """Whether ``code`` defines ``name`` at its top level (``def name(`` or ``async def name(`` at column 0)."""
    return re.search(rf"^(?:async[ \t]+)?def[ \t]+{re.escape(name)}[ \t]*\(", code, re.MULTILINE) is not None


def reply_completion(problem: FunctionProblem | StdioProblem, reply: str, language: str = "python3") -> str:
    """What a chat reply contributes to the program: for a stdin/stdout problem the extracted program; for a function
    problem the text appended to its prompt (a continuation, or ``pass`` closing the prompt's function and then the
    reply's definition of it)."""
    if not isinstance(problem, FunctionProblem):
        return extract_code(reply, language)
    code = extract_code(reply, "python3")
    if not defines_function(code, problem.entry_point):
        return code
    header = re.search(rf"^([ \t]*)(?:async[ \t]+)?def[ \t]+{re.escape(problem.entry_point)}[ \t]*\(", problem.prompt,
                       re.MULTILINE)
    if header is None:  # the prompt does not open the function: the reply's definition follows it as it is
        return "\n" + code
    return f"\n{header.group(1)}    pass\n\n{code}"


__all__ = ["defines_function", "extract_code", "reply_completion"]
