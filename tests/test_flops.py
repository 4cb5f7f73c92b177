"""Analytic FLOP counts: the per-block terms a config switches on."""
import ml_collections

from e2etts_jax import flops


def test_depthwise_conv_adds_a_multiply_add_per_tap_and_channel():
  net = ml_collections.ConfigDict(dict(d_model=32, num_heads=4, num_kv_heads=2, mlp_dim=64, num_layers=3))
  plain = flops.transformer_flops(net, batch=2, length=10)
  net.conv_kernel = 7
  conv = flops.transformer_flops(net, batch=2, length=10)
  assert conv - plain == 2 * 7 * 64 * 3 * 2 * 10   # 2 FLOPs x taps x channels x layers x batch x length
