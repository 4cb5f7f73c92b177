"""Parsing for CLIs that keep their flags in a private FlagValues (so they can be called as functions too)."""
from __future__ import annotations

import sys
from typing import Sequence

from absl import flags

HELP_ARGS = ("-h", "--help", "-help", "--helpshort", "--helpfull")


def parse_own(flag_values: flags.FlagValues, doc: str, argv: Sequence[str]) -> list[str]:
  """Parses `flag_values` from argv ([program, ...]); returns what is left ([program, ...]).

  A help flag prints `doc` and the flags' help and exits 0; re-parsing resets earlier values first.
  """
  argv = list(argv)
  if any(a in HELP_ARGS for a in argv[1:]):
    print(doc)
    print(flag_values.get_help())
    sys.exit(0)
  flag_values.unparse_flags()
  return flag_values(argv, known_only=True)
