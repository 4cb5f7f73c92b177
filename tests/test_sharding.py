"""The rule table maps module annotations to mesh shardings; the mesh follows the config."""
import flax.linen as nn
import jax
import jax.numpy as jnp
from jax.sharding import PartitionSpec as P

from e2etts_jax import sharding
from e2etts_jax.models import layers as L


def test_mesh_shape_from_config(tiny_config):
  tiny_config.mesh.update(data=-1, fsdp=2, tensor=2)
  mesh = sharding.make_mesh(tiny_config.mesh)
  assert dict(mesh.shape) == {"data": 2, "fsdp": 2, "tensor": 2}


def test_param_shardings_follow_rules(tiny_config):
  tiny_config.mesh.update(data=2, fsdp=2, tensor=2)
  mesh = sharding.make_mesh(tiny_config.mesh)
  cfg = L.TransformerConfig(d_model=32, num_layers=2, num_heads=4, num_kv_heads=2, mlp_dim=64)
  abstract = jax.eval_shape(lambda: L.Transformer(cfg).init(jax.random.key(0), jnp.zeros((2, 4, 32)),
                                                             jnp.ones((2, 4), bool)))
  sh = sharding.param_shardings(abstract, mesh)["params"]["layers"]
  assert sh["mlp"]["gate"]["kernel"].spec == P(None, "fsdp", "tensor")
  assert sh["attn"]["query"]["kernel"].spec == P(None, "fsdp", "tensor", None)
  assert sh["attn"]["out"]["kernel"].spec == P(None, "tensor", None, "fsdp")
  assert sharding.batch_sharding(mesh, 3).spec == P(("data", "fsdp"), None, None)


def test_activation_rules_never_reuse_a_mesh_axis():
  rules = dict(sharding.LOGICAL_RULES)
  spec = nn.logical_to_mesh_axes(("batch", "length", "act_embed"), sharding.LOGICAL_RULES)
  assert spec == P(("data", "fsdp"), None, None)
  assert rules["embed"] == "fsdp"
