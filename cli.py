"""Command-line checks shared by train.py, eval.py, visualize.py and export.py.

A rule is a (test, description) pair; a value that breaks its rule is reported in one line that
names the flag, the value and what is allowed, with exit code 2 (`Parser`), before anything is read
or written. sit.Config carries one rule per field; the scripts keep a table of theirs.
"""
import argparse
import math
import sys


def shown(v):
    """A value as a message shows it: a float as :g writes it (1e-06, 0.5), anything else in full."""
    return f"{v:g}" if isinstance(v, float) else f"{v}"


def allowed(lo, hi=math.inf, open_lo=False, open_hi=False, kind="a number"):
    """(test, description) of a finite number from lo to hi, each end closed unless open_*."""
    def ok(v):
        return math.isfinite(v) and (lo < v if open_lo else lo <= v) and (v < hi if open_hi else v <= hi)
    if hi == math.inf:
        return ok, f"{kind} {'>' if open_lo else '>='} {shown(lo)}"
    return ok, f"{kind} in {'(' if open_lo else '['}{shown(lo)}, {shown(hi)}{')' if open_hi else ']'}"


INT = "an integer"
ANY = (lambda v: True, "anything")


def one_of(*choices):
    return (lambda v: v in choices), f"one of {', '.join(choices)}"


def bad_value(flag, value, rule):
    """'FLAG VALUE: must be ...' when `value` breaks `rule` (a (test, description) pair), else None."""
    ok, text = rule
    if value is None or ok(value):
        return None
    return f"{flag} {shown(value)}: must be {text}"


FOLDER = (lambda v: v != "", "a folder (not empty)")


class Parser(argparse.ArgumentParser):
    """argparse for the scripts: an error is one line `prog: error: ...` and exit code 2 (no usage block)."""

    def error(self, message):
        print(f"{self.prog}: error: {message}", file=sys.stderr)
        sys.exit(2)


def check_flags(parser, args, flags):
    """parser.error(bad_value(...)) for the first flag of `flags` ({"--flag": rule}) whose parsed value
    breaks its rule: one line naming the flag, its value and what is allowed."""
    for flag, rule in flags.items():
        problem = bad_value(flag, getattr(args, flag[2:].replace("-", "_")), rule)
        if problem:
            parser.error(problem)
