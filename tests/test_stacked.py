"""K runs of one loop (``train.train_runs``) in one vmapped step behave like the same runs alone."""

import json
import os

import numpy as np
import pytest

from jaxopt_study import checkpointing
from jaxopt_study import rundir
from jaxopt_study import train
from tests.test_train import _ckpts, losses, tiny_config

STEPS = 12
RUNS = [{"optimizer.learning_rate": 1e-3, "seed": 0}, {"optimizer.learning_rate": 3e-3, "seed": 1}]


def _config(**kw):
  # Probes every 5 steps and at the end (vmapped over the stack).
  return tiny_config(num_steps=STEPS, eval_every=STEPS, **{"probes.every": 5}, **kw)


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
  root = tmp_path_factory.mktemp("stacked")
  configs = [_config(**r) for r in RUNS]
  stacked_dirs = [str(root / f"stacked{k}") for k in range(len(RUNS))]
  alone_dirs = [str(root / f"alone{k}") for k in range(len(RUNS))]
  stacked_results = train.train_runs(configs, stacked_dirs)
  alone_results = [train.train_and_evaluate(c, d) for c, d in zip(configs, alone_dirs)]
  return stacked_dirs, stacked_results, alone_dirs, alone_results


def test_a_stacked_run_equals_the_same_run_alone(runs):
  stacked_dirs, stacked_results, alone_dirs, alone_results = runs
  for sd, sr, ad, ar in zip(stacked_dirs, stacked_results, alone_dirs, alone_results):
    assert sr.status == ar.status == "completed" and sr.steps_done == ar.steps_done == STEPS
    assert sr.config_fingerprint == ar.config_fingerprint
    assert sr.init_params_fingerprint == ar.init_params_fingerprint
    assert sorted(losses(sd, "depth/log_var_slope")) == [5, 10, STEPS]
    for key in ("train/loss", "train/grad_norm", "eval/loss", "eval_test/loss",
                "depth/log_var_slope", "attention/entropy/layer=00"):
      got, want = losses(sd, key), losses(ad, key)
      assert got.keys() == want.keys() and got, key
      np.testing.assert_allclose([got[s] for s in want], list(want.values()), rtol=2e-5,
                                 err_msg=key)
    np.testing.assert_allclose(sr.final_eval_loss, ar.final_eval_loss, rtol=2e-5)
    assert _ckpts(sd) == _ckpts(ad)
    assert rundir.RunResults.load(sd) == sr
    assert json.load(open(os.path.join(sd, "config.json")))["seed"] == ar.seed
  # The two runs really are different runs (seed and rate), not one run twice.
  assert stacked_results[0].final_train_loss != stacked_results[1].final_train_loss


def test_a_stacked_run_can_be_resumed_alone(runs):
  """Checkpoints are saved unstacked: a run continues alone from its stacked checkpoint."""
  stacked_dirs, _, alone_dirs, _ = runs
  more = _config(**RUNS[1])
  more.num_steps = STEPS + 4
  with pytest.raises(rundir.ConfigChanged):  # num_steps is part of the trajectory (schedule)
    train.train_and_evaluate(more, stacked_dirs[1])
  again = train.train_and_evaluate(_config(**RUNS[1]), stacked_dirs[1])
  assert again.status == "completed" and again.steps_done == STEPS


def test_a_preempted_stack_resumes_stacked_on_the_same_trajectory(runs, tmp_path, monkeypatch):
  """Preempted together at step 7, the runs restore their unstacked checkpoints into one stack
  again and end where the same runs alone end."""
  _, _, alone_dirs, _ = runs
  configs = [_config(**r) for r in RUNS]
  dirs = [str(tmp_path / f"run{k}") for k in range(len(RUNS))]
  with monkeypatch.context() as m:
    m.setattr(checkpointing.Preemption, "reached", lambda self, step: step >= 7)
    first = train.train_runs(configs, dirs)
  assert [r.status for r in first] == ["preempted"] * 2 and {r.steps_done for r in first} == {7}
  again = train.train_runs(configs, dirs)
  for d, r, ad in zip(dirs, again, alone_dirs):
    assert r.status == "completed" and r.steps_done == STEPS
    got, want = losses(d, "train/loss"), losses(ad, "train/loss")
    assert got.keys() == want.keys()
    np.testing.assert_allclose([got[s] for s in want], list(want.values()), rtol=2e-5)


def test_configs_that_differ_beyond_rate_and_seed_are_refused(tmp_path):
  with pytest.raises(ValueError, match=r"differ in config\.model\.d_model"):
    train.train_runs([_config(), _config(**{"model.d_model": 64})],
                          [str(tmp_path / "a"), str(tmp_path / "b")])


def test_a_run_that_diverges_inside_a_stack_is_finished_there_and_the_others_go_on(
    runs, tmp_path, monkeypatch):
  """Run 1's parameters turn NaN before step 5 (fault injection keyed by its seed's dropout
  key): it is recorded diverged at step 5 and never checkpointed after it; run 0, stacked
  with it, trains on exactly as alone."""
  import jax  # pylint: disable=g-import-not-at-top
  import jax.numpy as jnp  # pylint: disable=g-import-not-at-top

  _, _, alone_dirs, alone_results = runs
  step_fn = train.train_step
  poisoned_key = jax.random.split(jax.random.PRNGKey(RUNS[1]["seed"]))[1]

  def poisoned(state, batch, **kw):
    hit = (state.step == 5) & jnp.all(state.rng == poisoned_key)
    params = jax.tree.map(lambda p: jnp.where(hit, jnp.nan, p), state.params)
    return step_fn(state.replace(params=params), batch, **kw)

  monkeypatch.setattr(train, "train_step", poisoned)
  configs = [_config(checkpoint_every=4, **r) for r in RUNS]
  dirs = [str(tmp_path / f"run{k}") for k in range(len(RUNS))]
  got = train.train_runs(configs, dirs)
  assert got[1].status == "diverged" and got[1].diverged_at_step == 5
  assert got[1].steps_done < STEPS and _ckpts(dirs[1]) == [4]  # nothing after step 5
  assert losses(dirs[1], "train/diverged") == {5: 1.0}
  assert max(losses(dirs[1], "train/loss")) <= got[1].steps_done
  assert rundir.RunResults.load(dirs[1]).status == "diverged"
  assert got[0].status == "completed" and got[0].steps_done == STEPS
  assert _ckpts(dirs[0]) == [8, STEPS]  # keep_checkpoints = 2
  want = losses(alone_dirs[0], "train/loss")
  np.testing.assert_allclose([losses(dirs[0], "train/loss")[s] for s in want],
                             list(want.values()), rtol=2e-5)
  np.testing.assert_allclose(got[0].final_eval_loss, alone_results[0].final_eval_loss, rtol=2e-5)
