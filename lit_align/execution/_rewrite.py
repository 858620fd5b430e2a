"""Rewriting a problem's test code so that every assert records its own outcome (standard library only).

The parent compiles the rewritten test code once per problem and ships the code object (marshal) to
the sandbox; the sandbox harness falls back to this module only when its interpreter differs.

``assert test, msg`` becomes::

    try:
        __lit_value__ = test
    except BaseException as __lit_error__:
        __lit_rec__.raised(<index>, __lit_error__)
    else:
        __lit_rec__.check(<index>, __lit_value__)

so a failing assert is reported and the tests carry on (the first failure still decides the status).
Asserts inside ``try`` blocks keep their meaning, since a test may catch them; they are not counted.
"""

from __future__ import annotations

import ast
import types

__all__ = ["rewrite_asserts", "RECORDER_NAME"]

RECORDER_NAME = "__lit_rec__"


class _AssertRewriter(ast.NodeTransformer):
    def __init__(self) -> None:
        self.count = 0

    def _keep(self, node: ast.AST) -> ast.AST:
        return node

    visit_Try = _keep
    visit_TryStar = _keep

    def visit_Assert(self, node: ast.Assert) -> ast.AST:
        index = self.count
        self.count += 1

        def record(method: str, name: str) -> ast.Expr:
            return ast.Expr(
                ast.Call(
                    func=ast.Attribute(value=ast.Name(id=RECORDER_NAME, ctx=ast.Load()), attr=method, ctx=ast.Load()),
                    args=[ast.Constant(index), ast.Name(id=name, ctx=ast.Load())],
                    keywords=[],
                )
            )

        new = ast.Try(
            body=[ast.Assign(targets=[ast.Name(id="__lit_value__", ctx=ast.Store())], value=node.test)],
            handlers=[
                ast.ExceptHandler(
                    type=ast.Name(id="BaseException", ctx=ast.Load()),
                    name="__lit_error__",
                    body=[record("raised", "__lit_error__")],
                )
            ],
            orelse=[record("check", "__lit_value__")],
            finalbody=[],
        )
        return ast.copy_location(new, node)


def rewrite_asserts(test_source: str, filename: str = "<tests>") -> tuple[types.CodeType, int]:
    """Compile test code with its asserts recording their outcome; return the code and the assert count.

    Args:
        test_source: the problem's test code (trusted).
        filename: the filename the code reports in tracebacks (the harness uses ``<workdir>/tests.py``).

    Raises:
        SyntaxError: the test code does not parse.
    """
    tree = ast.parse(test_source, filename=filename)
    rewriter = _AssertRewriter()
    tree = rewriter.visit(tree)
    ast.fix_missing_locations(tree)
    return compile(tree, filename, "exec", dont_inherit=True), rewriter.count
