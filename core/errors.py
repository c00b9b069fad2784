"""The one kind of user error: a line naming the field and the fix; and argparse that says so in one line."""

from __future__ import annotations

import argparse
import sys


class RecipeError(ValueError):
    """A user error in a recipe or its inputs: one line naming the field and the fix."""


class OneLineArgumentParser(argparse.ArgumentParser):
    """argparse, except that a usage error is one `scalesft: error:` line (no usage dump); --help is unchanged.
    Subparsers inherit the class."""

    def error(self, message: str):
        print(f"scalesft: error: {self.prog}: {message} (see {self.prog} --help)", file=sys.stderr, flush=True)
        sys.exit(2)
