"""The System's parameter init."""
import re

import flax.linen as nn
import jax
import numpy as np

from e2etts_jax.system import DataInfo, System

INFO = DataInfo(text_vocab_size=64, num_ctc_classes=29, num_speakers=4, num_aux=2)


def test_init_loops_over_layers_and_gives_the_unrolled_parameters(tiny_config):
  """Init compiles with a one-layer loop (cheaper) but must draw exactly the parameters of the configured,
  fully unrolled stacks."""
  tiny_config.model.scan_unroll = 0
  system = System(tiny_config, INFO)
  rng = jax.random.key(3)
  looped = jax.jit(lambda r: nn.unbox(system.init(r)))(rng)
  unrolled = jax.jit(lambda r: nn.unbox(system.init_as_configured(r)))(rng)
  assert jax.tree.structure(looped) == jax.tree.structure(unrolled)
  jax.tree.map(np.testing.assert_array_equal, looped, unrolled)

  # Every layer loop's unroll (the printed jaxpr includes the nested ones).
  scan_unrolls = lambda fn: set(re.findall(r"unroll=(\d+)", str(jax.make_jaxpr(fn)(rng))))
  assert scan_unrolls(system.init) == {"1"}
  assert scan_unrolls(system.init_as_configured) == {"2"}   # tiny stacks 2 layers: unroll 2 there
