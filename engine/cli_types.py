"""argparse types the command lines share, so that a bad value is refused with the flag's
name before any work starts."""

from __future__ import annotations

import argparse


def count(minimum: int):
    """An argparse type: an integer of at least ``minimum``."""

    def parse(text: str) -> int:
        value = int(text)
        if value < minimum:
            raise argparse.ArgumentTypeError(f"must be at least {minimum}, got {value}")
        return value

    parse.__name__ = "integer"  # argparse's message names the type
    return parse
