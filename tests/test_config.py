"""Config: sizes, overrides through absl's config_flags, locking, and one test per validate() rule."""
import json
import subprocess
import sys
import textwrap

import pytest

from e2etts_jax import config_lib
from e2etts_jax.config_lib import ConfigError, validate


@pytest.mark.parametrize("size", config_lib.SIZES)
@pytest.mark.parametrize("mode", config_lib.MODES)
def test_every_shipped_config_validates(size, mode):
  validate(config_lib.get_config(size, mode), num_devices=1)


def test_config_files_load_and_override_through_absl(tmp_path):
  script = tmp_path / "show.py"
  script.write_text(textwrap.dedent("""
      from absl import app
      from ml_collections import config_flags
      _CONFIG = config_flags.DEFINE_config_file("config", lock_config=True)
      def main(_):
        c = _CONFIG.value
        print(c.name, c.train.mode, c.train.stage1.learning_rate, c.llm.num_layers)
      app.run(main)
  """))
  out = subprocess.run([sys.executable, str(script), "--config", "configs/tiny.py:cascaded",
                        "--config.train.stage1.learning_rate=3e-4", "--config.llm.num_layers=3"],
                       capture_output=True, text=True, check=True).stdout.split()
  assert out == ["tiny", "cascaded", "0.0003", "3"]


def test_override_typo_fails_and_names_closest_key(tmp_path):
  script = tmp_path / "show.py"
  script.write_text("from absl import app\nfrom ml_collections import config_flags\n"
                    "_C = config_flags.DEFINE_config_file('config', lock_config=True)\n"
                    "app.run(lambda _: print(_C.value.name))\n")
  res = subprocess.run([sys.executable, str(script), "--config", "configs/tiny.py",
                        "--config.train.stage1.learnin_rate=3e-4"], capture_output=True, text=True)
  assert res.returncode != 0
  assert "learning_rate" in res.stderr


def test_locked_config_rejects_new_keys():
  c = config_lib.get_config("tiny")
  c.lock()
  with pytest.raises(AttributeError, match="d_model"):
    c.llm.d_modle = 3


def test_apply_overrides_parses_types_and_suggests_keys():
  c = config_lib.get_config("tiny")
  config_lib.apply_overrides(c, ["train.stage1.steps=7", "train.stage1.learning_rate=1", "model.dtype=bfloat16",
                                 "tokenizer.fsq_levels=(5,5)"])
  assert c.train.stage1.steps == 7 and c.train.stage1.learning_rate == 1.0
  assert isinstance(c.train.stage1.learning_rate, float)
  assert c.model.dtype == "bfloat16" and c.tokenizer.fsq_levels == (5, 5)
  with pytest.raises(ConfigError, match="did you mean 'learning_rate'"):
    config_lib.apply_overrides(c, ["train.stage1.learnin_rate=1"])
  with pytest.raises(ConfigError, match="'train.stage1.steps' has no value: write train.stage1.steps=VALUE"):
    config_lib.apply_overrides(c, ["train.stage1.steps"])
  assert c.train.stage1.steps == 7   # nothing applied


def test_cascaded_keeps_the_step_budget():
  e2e, cas = config_lib.get_config("small"), config_lib.get_config("small", "cascaded")
  total = lambda c: sum(c.train[s].steps for s in config_lib.STAGES)
  assert total(e2e) == total(cas)
  assert cas.train.stage3.steps == 0
  assert config_lib.parse_list(cas.train.stage1.trainable) == ("tokenizer", "rm")
  assert cas.train.stage1.weights.llm == 0 and cas.train.stage1.weights.fm == 0
  assert cas.train.stage1.weights.usage == e2e.train.stage1.weights.usage > 0   # same anti-collapse term


def test_cascaded_moves_stage3_rows_not_steps_where_the_batches_differ():
  c = config_lib.get_config("small")
  c.train.stage3.batch_size = 2 * c.data.batch_size
  stage2, stage3 = c.train.stage2.steps, c.train.stage3.steps
  cas = config_lib.make_cascaded(c)
  assert cas.train.stage2.steps == stage2 + 2 * stage3 and cas.train.stage3.steps == 0


# One test per validate() rule: each breaks exactly one field and checks the message names it.
RULES = [
    ("audio.win_length", lambda c: setattr(c.audio, "win_length", c.audio.n_fft + 1), "audio.win_length"),
    ("audio.fmax", lambda c: setattr(c.audio, "fmax", 9000.0), "Nyquist"),
    ("token rate", lambda c: setattr(c.audio, "hop_length", 160), "tokenizer.token_rate"),
    ("fsq levels", lambda c: setattr(c.tokenizer, "fsq_levels", (3, 1)), "tokenizer.fsq_levels"),
    ("heads", lambda c: setattr(c.llm, "num_heads", 3), "llm.d_model=32 is not divisible by llm.num_heads"),
    ("kv heads", lambda c: setattr(c.fm, "num_kv_heads", 3), "fm.num_heads=2 is not divisible"),
    ("head dim odd", lambda c: (setattr(c.rm, "d_model", 6), setattr(c.rm, "num_heads", 2)), "RoPE"),
    ("dtype", lambda c: setattr(c.model, "dtype", "float16"), "model.dtype"),
    ("remat", lambda c: setattr(c.model, "remat", "some"), "model.remat"),
    ("scan unroll", lambda c: setattr(c.model, "scan_unroll", -1), "model.scan_unroll"),
    ("ctc units", lambda c: setattr(c.text, "ctc_units", "phone"), "text.ctc_units"),
    ("text frontend", lambda c: setattr(c.text, "frontend", "ipa"), "text.frontend='ipa'"),
    ("phones need a word model", lambda c: setattr(c.text, "frontend", "phones"), "text.model_type='word'"),
    ("phones spell no ctc", lambda c: c.text.update(frontend="phones", model_type="word", ctc_units="sentencepiece"),
     "text.ctc_units='char'"),
    ("fm time schedule", lambda c: setattr(c.fm, "t_schedule", "cos"), "fm.t_schedule"),
    ("fm decoder", lambda c: setattr(c.fm, "decoder", "vocoder"), "fm.decoder='vocoder'"),
    ("fm start time", lambda c: setattr(c.fm, "start_t", 1.0), "fm.start_t=1.0: must be in"),
    ("conv taps even", lambda c: setattr(c.fm, "conv_kernel", 4), "fm.conv_kernel=4"),
    ("conv taps negative", lambda c: setattr(c.rm, "conv_kernel", -1), "rm.conv_kernel=-1"),
    ("dropout of everything", lambda c: setattr(c.llm, "dropout", 1.0), "llm.dropout=1.0"),
    ("buckets order", lambda c: setattr(c.data, "bucket_boundaries", (100, 50, 200)), "strictly increasing"),
    ("buckets end", lambda c: setattr(c.data, "bucket_boundaries", (50, 100)), "data.max_frames"),
    ("buckets multiple", lambda c: setattr(c.data, "bucket_boundaries", (51, 100, 200)), "tokenizer.downsample"),
    ("stage buckets", lambda c: setattr(c.train.stage2, "bucket_boundaries", (100,)),
     "train.stage2.bucket_boundaries must end at data.max_frames=200"),
    ("stage buckets order", lambda c: setattr(c.train.stage3, "bucket_boundaries", (200, 100)),
     "train.stage3.bucket_boundaries=(200, 100) must be strictly increasing"),
    ("max seconds", lambda c: setattr(c.data, "max_seconds", 10.0), "data.max_seconds"),
    ("min seconds", lambda c: setattr(c.data, "min_seconds", 5.0), "data.min_seconds"),
    ("join", lambda c: setattr(c.data, "join_prob", 1.5), "data.join_prob=1.5 must be in"),
    ("batch multiple", lambda c: c.data.update(dynamic_batch=True, batch_multiple=3),
     "data.batch_multiple=3 must be >= 1 and, with data.dynamic_batch, divide data.batch_size=4"),
    ("dynamic batches of joined rows", lambda c: c.data.update(dynamic_batch=True, join_prob=0.5),
     "data.dynamic_batch=True cannot be combined with data.join_prob=0.5"),
    ("llm max_len", lambda c: setattr(c.llm, "max_len", 100), "llm.max_len"),
    ("mode", lambda c: setattr(c.train, "mode", "joint"), "train.mode"),
    ("trainable", lambda c: setattr(c.train.stage2, "trainable", "llm,flow"), "unknown network 'flow'"),
    ("init networks", lambda c: setattr(c.train, "init_networks", "tokeniser,fm"),
     "train.init_networks names unknown network 'tokeniser' (did you mean 'tokenizer'"),
    ("steps", lambda c: setattr(c.train.stage1, "steps", -1), "train.stage1.steps"),
    ("stage batch", lambda c: setattr(c.train.stage3, "batch_size", -2), "train.stage3.batch_size=-2"),
    ("eval batches", lambda c: setattr(c.train, "eval_batches", -2), "train.eval_batches=-2 must be >= -1"),
    ("eval draws", lambda c: setattr(c.train, "eval_draws", 0), "train.eval_draws=0 must be >= 1"),
    ("warmup", lambda c: setattr(c.train.stage2, "warmup_steps", 1000), "train.stage2.warmup_steps"),
    ("weights", lambda c: c.train.stage2.weights.update({k: 0.0 for k in config_lib.LOSS_TERMS}), "all zero"),
    ("stage3 tokenizer", lambda c: setattr(c.train.stage3, "trainable", "llm,tokenizer"), "stage3.trainable"),
    ("dependence", lambda c: setattr(c.tokenizer, "usage_dependence", -1.0), "tokenizer.usage_dependence=-1.0"),
    ("usage frozen", lambda c: setattr(c.train.stage2.weights, "usage", 0.5), "weights.usage=0.5"),
    ("token grads", lambda c: setattr(c.train.stage1, "token_grads", "rm,asr"), "token_grads names 'asr'"),
    ("speaker scale", lambda c: setattr(c.train.stage2, "rm_spk_scale", -1.0), "train.stage2.rm_spk_scale=-1.0"),
    ("lr scale", lambda c: setattr(c.train.lr_scale, "fm", -0.5), "train.lr_scale.fm=-0.5 must be >= 0"),
    ("stage lr scale", lambda c: setattr(c.train.stage2.lr_scale, "rm", -0.1), "train.stage2.lr_scale.rm=-0.1"),
    ("ema decay", lambda c: setattr(c.train, "ema_decay", 1.0), "train.ema_decay=1.0: must be in"),
    ("ema networks", lambda c: setattr(c.train, "ema_networks", "llm,flow"),
     "train.ema_networks names unknown network 'flow'"),
]


@pytest.mark.parametrize("name,breaker,message", RULES, ids=[r[0] for r in RULES])
def test_validate_rule(tiny_config, name, breaker, message):
  validate(tiny_config, num_devices=1)  # valid before the change
  breaker(tiny_config)
  with pytest.raises(ConfigError, match=message.replace("(", r"\(").replace(")", r"\)")):
    validate(tiny_config, num_devices=1)


@pytest.mark.parametrize("mesh,devices,message", [
    ((4, 1, 1), 8, "= 4 but there are 8 devices"),
    ((-1, -1, 1), 8, "at most one"),
    ((-1, 3, 1), 8, "cannot be split"),
    ((0, 1, 1), 8, "mesh.data=0"),
])
def test_validate_mesh_versus_device_count(tiny_config, mesh, devices, message):
  tiny_config.mesh.update(dict(zip(("data", "fsdp", "tensor"), mesh)))
  with pytest.raises(ConfigError, match=message):
    validate(tiny_config, num_devices=devices)


def test_validate_batch_versus_data_parallel(tiny_config):
  tiny_config.data.batch_size = 6
  tiny_config.mesh.update(data=-1, fsdp=1, tensor=1)
  with pytest.raises(ConfigError, match="data.batch_size=6 is not divisible"):
    validate(tiny_config, num_devices=4)
  tiny_config.data.batch_size = 8
  tiny_config.train.stage3.batch_size = 6
  with pytest.raises(ConfigError, match="train.stage3.batch_size=6 is not divisible"):
    validate(tiny_config, num_devices=4)
  tiny_config.data.batch_size = 6
  tiny_config.mesh.update(data=-1, fsdp=1, tensor=2)   # 2-way data parallel: 6 is fine
  validate(tiny_config, num_devices=4)
  assert config_lib.resolve_mesh_shape(tiny_config.mesh, 4) == (2, 1, 2)


def test_flatten_names_keys_as_overrides_do():
  c = config_lib.get_config("tiny")
  flat = config_lib.flatten(json.loads(c.to_json_best_effort()))
  assert flat["train.stage1.learning_rate"] == c.train.stage1.learning_rate
  assert flat["tokenizer.fsq_levels"] == list(c.tokenizer.fsq_levels)
  assert not any(isinstance(v, dict) for v in flat.values())
  # Every flattened key is one an override accepts: setting each to its own value changes nothing.
  again = config_lib.apply_overrides(config_lib.get_config("tiny"), {k: config_lib.get_path(c, k) for k in flat})
  assert again.to_json_best_effort() == c.to_json_best_effort()


def test_stage_data_is_the_stages_batches_and_leaves_the_config_alone(tiny_config):
  tiny_config.train.stage3.update(batch_size=2 * tiny_config.data.batch_size, bucket_boundaries=(200,))
  data = tiny_config.data.to_dict()
  assert config_lib.stage_data(tiny_config, "stage1") is tiny_config   # keeps data's batches: no copy
  s3 = config_lib.stage_data(tiny_config, "stage3")
  assert (s3.data.batch_size, tuple(s3.data.bucket_boundaries)) == (2 * tiny_config.data.batch_size, (200,))
  assert {k: v for k, v in s3.data.to_dict().items() if k not in ("batch_size", "bucket_boundaries")} == {
      k: v for k, v in data.items() if k not in ("batch_size", "bucket_boundaries")}
  assert tiny_config.data.to_dict() == data
  assert config_lib.stage_buckets(tiny_config, "stage2") == tuple(data["bucket_boundaries"]) != (200,)


def test_stages_label_names_a_batch_per_stage_only_where_they_differ(tiny_config):
  tiny_config.train.stage3.batch_size = 2 * tiny_config.data.batch_size
  steps = {s: int(tiny_config.train[s].steps) for s in config_lib.STAGES}
  batches = {s: config_lib.stage_batch_size(tiny_config, s) for s in config_lib.STAGES}
  b = tiny_config.data.batch_size
  s1, s2, s3 = (steps[s] for s in config_lib.STAGES)
  assert config_lib.stages_label(steps) == f"{s1}/{s2}/{s3}"
  assert config_lib.stages_label(steps, batches) == f"{s1}/{s2}/{s3} x {b}/{b}/{2 * b}"
  assert config_lib.stages_label(steps, {**batches, "stage3": b}) == f"{s1}/{s2}/{s3} x {b}"
  assert config_lib.stages_label({"stage1": 4}, {"stage1": 8}) == "4 x 8"
