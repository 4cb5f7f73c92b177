"""Analytic FLOP counts: the per-block terms a config switches on."""
import ml_collections

from e2etts_jax import flops


def test_depthwise_conv_adds_a_multiply_add_per_tap_and_channel():
  net = ml_collections.ConfigDict(dict(d_model=32, num_heads=4, num_kv_heads=2, mlp_dim=64, num_layers=3))
  plain = flops.transformer_flops(net, batch=2, length=10)
  net.conv_kernel = 7
  conv = flops.transformer_flops(net, batch=2, length=10)
  assert conv - plain == 2 * 7 * 64 * 3 * 2 * 10   # 2 FLOPs x taps x channels x layers x batch x length


def test_a_stage_whose_only_llm_term_is_alignment_still_runs_the_llm():
  """llm_align alone makes loss_fn run (and train) the LLM, so the step's FLOPs count its forward and backward."""
  from e2etts_jax import config_lib
  from e2etts_jax.system import DataInfo
  c = config_lib.get_config("tiny")
  c.train.stage2.trainable = "llm"
  c.train.stage2.weights.update({k: 0.0 for k in config_lib.LOSS_TERMS})
  info = DataInfo.for_config(c)
  fwd = flops.network_forward_flops(c, info, 4, 100)
  tokenizer_only = flops.step_flops(c, info, 4, 100, "stage2")
  c.train.stage2.weights.llm_align = 1.0
  assert flops.step_flops(c, info, 4, 100, "stage2") - tokenizer_only == 3 * fwd["llm"]


def test_a_speaker_term_detached_from_the_codes_costs_a_second_rm_encoder_pass():
  """token_grads without 'rm_spk' (but with 'rm') makes loss_fn run the RM again on detached codes."""
  from e2etts_jax import config_lib
  from e2etts_jax.system import DataInfo
  c = config_lib.get_config("tiny")
  info = DataInfo.for_config(c)
  joint = flops.step_flops(c, info, 4, 100, "stage1")
  c.train.stage1.token_grads = "llm,rm,fm"
  encoder = flops.transformer_flops(c.rm, 4, 100 // c.tokenizer.downsample)
  assert flops.step_flops(c, info, 4, 100, "stage1") - joint == 3 * encoder
  c.train.stage1.token_grads = "llm,fm"          # neither RM term shapes the codes: one pass, as before
  assert flops.step_flops(c, info, 4, 100, "stage1") == joint


def test_stage3_training_the_fm_adds_its_own_loss_and_not_a_trained_judge():
  """With the FM trainable in stage 3 its own loss costs a trained forward (3x); the E2E terms' pass through it
  stays a judge's (2x: gradients to its input only), as loss_fn detaches it."""
  from e2etts_jax import config_lib
  from e2etts_jax.system import DataInfo
  c = config_lib.get_config("tiny")
  info = DataInfo.for_config(c)
  fwd = flops.network_forward_flops(c, info, 4, 100)
  llm_only = flops.step_flops(c, info, 4, 100, "stage3")
  c.train.stage3.update(trainable="llm,fm")
  c.train.stage3.weights.fm = 1.0
  assert flops.step_flops(c, info, 4, 100, "stage3") - llm_only == 3 * fwd["fm"]


def test_train_flops_counts_each_stage_at_its_own_batch():
  from e2etts_jax import config_lib
  from e2etts_jax.system import DataInfo
  c = config_lib.get_config("tiny")
  info, frames = DataInfo.for_config(c), int(c.data.max_frames)
  per_step = {s: flops.step_flops(c, info, 1, frames, s) for s in config_lib.STAGES}
  assert all(flops.step_flops(c, info, 3, frames, s) == 3 * per_step[s] for s in config_lib.STAGES)   # linear in rows
  before = flops.train_flops(c, info)
  c.train.stage3.batch_size = 3 * c.data.batch_size
  assert flops.train_flops(c, info) - before == 2 * c.train.stage3.steps * c.data.batch_size * per_step["stage3"]
