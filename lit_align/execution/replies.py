"""Chat replies as programs: the code a chat model's reply holds, for the HumanEval protocol and stdin/stdout tests.

A base model continues a function's prompt, so its completion is appended to the prompt as it is. A chat (instruct)
model answers in a message that usually wraps the code in a Markdown fence and prose, and usually writes the whole
function again. :func:`extract_code` takes the code out of the reply; :func:`reply_completion` turns it into what
the HumanEval protocol appends to the prompt: the code as a continuation when it does not define the problem's
function, or, when it does, a ``pass`` closing the prompt's (docstring-only) function followed by the reply's
definition, which replaces it. Either way the program is run against the problem's unchanged tests in the sandbox.

:func:`body_completion` turns a reply into what a base model would have written after the prompt (the function's
body), for training on a chat model's answers (the IADPO oracle's chosen completions).
"""

from __future__ import annotations

import ast
import re
import textwrap

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


_KEPT = (ast.Import, ast.ImportFrom, ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef, ast.Assign, ast.AnnAssign)
"""Top-level statements of a reply kept beside the function it defines: what the function may use. Example calls,
prints and ``if __name__ == "__main__":`` blocks are left out."""


def body_completion(prompt: str, entry_point: str, reply: str) -> str:
    """A chat reply as the continuation of a function prompt (signature and docstring): when the reply's code defines
    ``entry_point``, that definition's body without its docstring, indented as the prompt's function body, followed by
    the reply's imports, other definitions and constants (at the top level after the function: they exist by the time
    it is called); example calls and ``__main__`` blocks are dropped. A reply that does not define the function, or whose
    code does not parse, is taken as a continuation as it is."""
    code = extract_code(reply, "python3")
    if not defines_function(code, entry_point):
        return code
    try:
        tree = ast.parse(code)
    except SyntaxError:
        return code
    lines = code.splitlines(keepends=True)
    functions = [node for node in tree.body
                 if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)) and node.name == entry_point]
    function = functions[-1]  # the definition in effect
    body = function.body[1:] if ast.get_docstring(function, clean=False) is not None else function.body
    header = re.search(rf"^([ \t]*)(?:async[ \t]+)?def[ \t]+{re.escape(entry_point)}[ \t]*\(", prompt, re.MULTILINE)
    indent = (header.group(1) if header else "") + "    "
    if body and body[0].lineno == function.lineno:  # "def f(x): return x": the statements after the colon
        text = "".join(ast.get_source_segment(code, node) + "\n" for node in body)
    elif body:
        text = textwrap.dedent("".join(lines[body[0].lineno - 1:function.end_lineno]))
    else:
        text = "pass\n"
    completion, previous = textwrap.indent(text, indent), None
    for node in tree.body:
        if isinstance(node, _KEPT) and node not in functions:
            imports = isinstance(node, (ast.Import, ast.ImportFrom)) and isinstance(previous, (ast.Import, ast.ImportFrom))
            completion += ("" if imports else "\n\n") + textwrap.indent(_source(lines, node), indent[:-4])
            previous = node
    return completion


def _source(lines: list[str], node: ast.stmt) -> str:
    """A top-level statement's lines, decorators included."""
    start = min([node.lineno] + [d.lineno for d in getattr(node, "decorator_list", [])])
    return "".join(lines[start - 1:node.end_lineno]).rstrip("\n") + "\n"


__all__ = ["body_completion", "defines_function", "extract_code", "reply_completion"]
