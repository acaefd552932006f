"""Arithmetic with a calculator tool, for the tiny model and CI.

The model may write `<calc>EXPRESSION</calc>`: the turn ends there and the environment appends the value and
a newline. Any other turn is the final answer, scored by exact match with the problem's answer. The episode's
info counts `tool_calls`, and `used_tool` (0 or 1) gives the tool-use rate.
"""

from __future__ import annotations

import ast
import operator
import re

from asympo.data.tasks import Problem
from asympo.envs.base import Step

CALL = re.compile(r"<calc>(.*?)</calc>", re.DOTALL)
OPERATORS = {
    ast.Add: operator.add,
    ast.Sub: operator.sub,
    ast.Mult: operator.mul,
    ast.FloorDiv: operator.floordiv,
}
MAX_EXPRESSION = 64  # characters; longer is an error, as is any number past MAX_VALUE
MAX_VALUE = 10**12


def calculate(expression: str) -> str:
    """The value of an integer expression of + - * // and parentheses, or `error`: no names, calls or
    powers, so nothing the model writes can run code or take long."""
    if len(expression) > MAX_EXPRESSION:
        return "error"
    try:
        value = _value(ast.parse(expression.strip(), mode="eval").body)
    except (SyntaxError, ValueError, ZeroDivisionError):
        return "error"
    return str(value)


def _value(node: ast.AST) -> int:
    if isinstance(node, ast.Constant) and type(node.value) is int:
        value = node.value
    elif isinstance(node, ast.UnaryOp) and isinstance(node.op, ast.USub | ast.UAdd):
        value = _value(node.operand) * (-1 if isinstance(node.op, ast.USub) else 1)
    elif isinstance(node, ast.BinOp) and type(node.op) in OPERATORS:
        value = OPERATORS[type(node.op)](_value(node.left), _value(node.right))
    else:
        raise ValueError("not an integer expression")
    if abs(value) > MAX_VALUE:
        raise ValueError("too large")
    return value


class Calculator:
    stop = ("</calc>",)

    def __init__(self, max_calls: int = 2):
        self.max_calls = max_calls
        """Tool calls answered per episode; a call past them is taken as the final answer (and is wrong)."""

    def reset(self, problem: Problem, seed: int) -> str:
        self.answer, self.calls = problem.answer.strip(), 0
        return problem.prompt

    def step(self, text: str) -> Step:
        call = CALL.search(text)
        if call is not None and self.calls < self.max_calls:
            self.calls += 1
            return Step(observation=calculate(call.group(1)) + "\n", info={"tool_calls": 1})
        correct = float(text.strip() == self.answer)
        return Step(reward=correct, done=True, info={"used_tool": float(self.calls > 0)})
