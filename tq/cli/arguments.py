"""Argument types of the ``tq`` command: each parses one option's text or raises
``argparse.ArgumentTypeError`` naming the problem."""

from __future__ import annotations

import argparse

from tq.tasks.records import output_path_problem


def output_path(text: str) -> str:
    """An argparse type: a file path that can be written now (checked before any work starts)."""
    problem = output_path_problem(text)
    if problem is not None:
        raise argparse.ArgumentTypeError(problem)
    return text


def layer_list(text: str) -> list[int]:
    """``"0,1,4"`` -> [0, 1, 4]: layer indices, comma-separated."""
    try:
        layers = [int(item) for item in text.split(",") if item.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(
            f"expected layer indices separated by commas, got {text!r}"
        ) from None
    if any(layer < 0 for layer in layers):
        raise argparse.ArgumentTypeError(f"layer indices must be >= 0, got {text!r}")
    return layers


def positive_int(text: str) -> int:
    """An argparse type: an integer >= 1."""
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected an integer, got {text!r}") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be at least 1, got {value}")
    return value


def fraction_list(text: str) -> list[float]:
    try:
        return [float(item) for item in text.split(",")]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated numbers, got {text!r}") from None


def index_list(text: str) -> list[int]:
    try:
        return [int(item) for item in text.split(",")]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated integers, got {text!r}") from None
