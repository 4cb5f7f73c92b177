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


def app_flags_parser(flag_values: flags.FlagValues, doc: str):
  """A `flags_parser` for absl's app.run: our flags first, then what remains goes to absl's global flags (logging
  verbosity etc.), which reject a typo by naming the closest flag; a flag error exits 1 with that message."""
  def parse(argv: list[str]) -> list[str]:
    try:
      return flags.FLAGS(parse_own(flag_values, doc, argv))
    except flags.Error as e:
      sys.stderr.write(f"FATAL flags parsing error: {e}\nPass --help to see the flags.\n")
      sys.exit(1)
  return parse


INFERENCE_HELP = ("Inference settings to synthesise with instead of the trained config's, key=value[,...]: "
                  "llm.temperature, llm.top_k, llm.top_p, llm.ras_window, llm.ras_tau, llm.min_ratio, "
                  "llm.max_ratio, fm.ode_steps, fm.guidance, fm.temperature, fm.start_t (in [0, 1): start the "
                  "solve there from the noised prior mel), fm.decoder (flow or prior), model.use_ema (false: the "
                  "raw weights instead of the run's weight average) (synthesis.INFERENCE_KEYS).")


def define_inference_flag(flag_values: flags.FlagValues) -> None:
  """--inference: the one spelling of synthesis.INFERENCE_KEYS overrides on every CLI that synthesises."""
  flags.DEFINE_list("inference", [], INFERENCE_HELP, flag_values=flag_values)
