"""Learning regression: a few hundred `tiny` steps on the shared flite corpus must leave resynthesis (ground truth ->
tokenizer -> FM, no vocoder) far closer to the ground-truth mel than the same networks untrained, with the tokenizer
still using many codes. The bounds are ratios to what the untrained model and the codebook give, not magic numbers."""
import jax
import numpy as np

from e2etts_jax import input_pipeline, optim, sharding, synthesis, train_step, trainer
from tests.conftest import tiny_train_config

STEPS = 240


def _mels(config, limit=6):
  """The held-out utterances (only a few in this 40-utterance corpus), then training ones up to `limit`."""
  mels = []
  for split in ("test", "train"):
    for batch in input_pipeline.make_dataset(config, split, seed=0, num_epochs=1, shuffle=False):
      for mel, mask in zip(batch["mel"], batch["mel_mask"]):
        if mask.any() and len(mels) < limit:   # (rows padding the last batch are empty)
          mels.append(np.asarray(mel[: int(mask.sum())]))
  return mels


def test_tiny_training_beats_the_untrained_model_at_resynthesis(tiny_shards, tmp_path):
  c = tiny_train_config(tiny_shards, steps=(STEPS, 0, 0))
  c.train.stage1.warmup_steps = STEPS // 10
  c.train.stage1.learning_rate = 1e-3
  c.train.checkpoint_every = STEPS
  c.train.log_every = STEPS // 4
  c.mesh.update(data=1, fsdp=1, tensor=1)
  mesh = sharding.make_mesh(c.mesh, jax.devices()[:1])
  result = trainer.train(c, str(tmp_path), progress=False, mesh=mesh)
  trained = synthesis.Synthesizer.from_workdir(str(tmp_path))
  state, _ = train_step.create_train_state(trained.system, optim.make_optimizer(c, "stage1"),
                                           mesh, jax.random.key(c.seed))
  untrained = synthesis.Synthesizer(trained.system, jax.device_get(state.params), trained.sp)
  mels = _mels(c)
  assert len(mels) == 6
  err_trained = np.mean(trained.resynthesis_mel_errors(mels))
  err_untrained = np.mean(untrained.resynthesis_mel_errors(mels))
  print(f"resynthesis mel MSE: trained {err_trained:.3f}, untrained {err_untrained:.3f}; "
        f"code perplexity {result.history[-1]['codes/perplexity']:.1f}")
  assert err_trained < 0.4 * err_untrained, (err_trained, err_untrained)
  # Every loss term of stage 1 fell from its first logged value, and the codes did not collapse: at least a
  # sixth of the codebook's perplexity (27 codes for tiny) is in use at the end.
  first, last = result.history[0], result.history[-1]
  for k in ("loss/fm", "loss/rm", "loss/llm"):
    assert last[k] < first[k], (k, first[k], last[k])
  assert last["codes/perplexity"] > trained.system.fsq.codebook_size / 6, last["codes/perplexity"]
