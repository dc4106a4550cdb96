"""Pythonic (Llama 3.2 / 4, ToolACE): the output is a Python list of calls, `[get_weather(city="Paris"), f(x=1)]`,
whose arguments are Python literals."""

from __future__ import annotations

import ast

from . import register
from .base import FunctionCall, WholeOutputToolParser, arguments_json

PYTHON_TAG = "<|python_start|>"


@register
class PythonicToolParser(WholeOutputToolParser):
    name = "pythonic"
    openers = ("[", PYTHON_TAG)

    def parse_calls(self, text: str, final: bool) -> list[FunctionCall] | None:
        source = text.strip().removeprefix(PYTHON_TAG).removesuffix("<|python_end|>").strip()
        try:
            tree = ast.parse(source, mode="eval")
        except SyntaxError:
            return None if final else []  # streaming: the list is not closed yet
        if not isinstance(tree.body, ast.List):
            return None
        calls = []
        for node in tree.body.elts:
            if not isinstance(node, ast.Call) or not isinstance(node.func, ast.Name | ast.Attribute) or node.args:
                return None
            try:
                arguments = {keyword.arg: ast.literal_eval(keyword.value) for keyword in node.keywords}
            except ValueError:
                return None
            calls.append(FunctionCall(ast.unparse(node.func), arguments_json(arguments)))
        return calls
