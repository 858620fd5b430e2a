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
import io
import re
import tokenize

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
    ``entry_point``, that definition's body without its docstring (comments before its first statement and after
    its last included),
    indented as the prompt's function body, followed by the reply's imports, other definitions and constants at the
    top level (after the function, so they exist by the time it is called, and global for a method prompt too);
    example calls and ``__main__`` blocks are dropped. Only indentation changes: the lines of a multi-line string keep
    their text. A reply that does not define the function, or whose code does not parse, is taken as a continuation as
    it is."""
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
        completion = "".join(indent + ast.get_source_segment(code, node) + "\n" for node in body)
    elif body:
        first = body[0].lineno
        while first > function.lineno + 1 and lines[first - 2].strip().startswith("#"):
            first -= 1  # the comments right above the first statement belong to the body
        completion = _reindent(lines, first, _last_body_line(lines, function), body[0].col_offset, indent,
                               _string_lines(code))
    else:
        completion = indent + "pass\n"
    previous = None
    for node in tree.body:
        if isinstance(node, _KEPT) and node not in functions:
            imports = isinstance(node, (ast.Import, ast.ImportFrom)) and isinstance(previous, (ast.Import, ast.ImportFrom))
            completion += ("" if imports else "\n\n") + _source(lines, node)
            previous = node
    return completion


def _last_body_line(lines: list[str], function: ast.FunctionDef | ast.AsyncFunctionDef) -> int:
    """The last line (from 1) of ``function``'s body with the comments after its last statement: those indented
    deeper than its ``def`` (blank lines between them included), which the syntax tree leaves out."""
    last = function.end_lineno
    for number in range(last + 1, len(lines) + 1):
        line = lines[number - 1]
        if not line.strip():
            continue
        if not line.lstrip().startswith("#") or len(line) - len(line.lstrip(" \t")) <= function.col_offset:
            break
        last = number
    return last


def _string_lines(code: str) -> set[int]:
    """Numbers (from 1) of the lines that continue a string begun on an earlier line: their text, leading
    whitespace included, is the string's."""
    rows, opened = set(), []
    starts = {getattr(tokenize, name) for name in ("FSTRING_START", "TSTRING_START") if hasattr(tokenize, name)}
    ends = {getattr(tokenize, name) for name in ("FSTRING_END", "TSTRING_END") if hasattr(tokenize, name)}
    try:
        for token in tokenize.generate_tokens(io.StringIO(code).readline):
            if token.type in starts:  # Python 3.12+: an f-string is several tokens
                opened.append(token.start[0])
            elif token.type in ends and opened:
                rows.update(range(opened.pop() + 1, token.end[0] + 1))
            elif token.type == tokenize.STRING:
                rows.update(range(token.start[0] + 1, token.end[0] + 1))
    except (tokenize.TokenError, SyntaxError):
        pass
    return rows


def _reindent(lines: list[str], first: int, last: int, width: int, indent: str, verbatim: set[int]) -> str:
    """Lines ``first`` to ``last`` (from 1) with up to ``width`` characters of leading whitespace replaced by
    ``indent``; lines in ``verbatim`` (a string's continuation) as they are, blank lines empty."""
    text = []
    for number in range(first, last + 1):
        line = lines[number - 1]
        if number in verbatim:
            text.append(line)
        elif not line.strip():
            text.append("\n")
        else:
            stripped = line.lstrip(" \t")
            cut = min(width, len(line) - len(stripped))
            text.append(indent + line[cut:])
    return "".join(text).rstrip("\n") + "\n"


def _source(lines: list[str], node: ast.stmt) -> str:
    """A top-level statement's lines, decorators included."""
    start = min([node.lineno] + [d.lineno for d in getattr(node, "decorator_list", [])])
    return "".join(lines[start - 1:node.end_lineno]).rstrip("\n") + "\n"


__all__ = ["body_completion", "defines_function", "extract_code", "reply_completion"]
