"""Both metric-writer back ends write TensorBoard events; metrics.jsonl mirrors the scalars."""

import json
import os

import numpy as np
import pytest
from tensorboard.backend.event_processing import event_accumulator

from jaxopt_study import rundir
from jaxopt_study import writers


def _read_scalars(logdir):
  acc = event_accumulator.EventAccumulator(logdir, size_guidance={"tensors": 0, "scalars": 0})
  acc.Reload()
  out = {}
  for tag in acc.Tags()["scalars"]:
    out[tag] = [(e.step, e.value) for e in acc.Scalars(tag)]
  for tag in acc.Tags()["tensors"]:  # TF2 summaries store scalars as tensors
    from tensorboard.util import tensor_util
    out[tag] = [(e.step, float(tensor_util.make_ndarray(e.tensor_proto))) for e in acc.Tensors(tag)
                if e.tensor_proto.tensor_shape.dim == []]
  return out, acc.Tags()


@pytest.mark.parametrize("backend", ["tensorboardx", "clu"])
def test_writer_backends(backend, tmp_path):
  if backend == "clu":
    pytest.importorskip("tensorflow", reason="CLU's SummaryWriter needs TensorFlow")
  w = writers.create_writer(str(tmp_path), backend=backend)
  w.write_hparams({"lr": 0.1, "name": "adamw"})
  w.write_scalars(3, {"train/loss": 2.5, "sparsity/zero_frac": 0.25})
  w.write_histograms(3, {"aging/age_hist": np.arange(10.0)})
  w.flush()
  w.close()
  scalars, tags = _read_scalars(str(tmp_path))
  assert scalars["train/loss"] == [(3, 2.5)]
  assert scalars["sparsity/zero_frac"] == [(3, 0.25)]
  assert tags["histograms"] or "aging/age_hist" in tags["tensors"]
  rows = [json.loads(l) for l in open(tmp_path / rundir.METRICS)]
  assert rows == [{"step": 3, "train/loss": 2.5, "sparsity/zero_frac": 0.25}]


def test_just_logging_writes_no_files(tmp_path):
  w = writers.create_writer(str(tmp_path), just_logging=True)
  w.write_scalars(1, {"train/loss": 1.0})
  w.flush()
  assert os.listdir(tmp_path) == []


def test_unknown_backend():
  with pytest.raises(ValueError, match="backend"):
    writers.create_writer("/tmp/x", backend="wandb")


def test_fallback_progress_reports_rate_and_eta():
  class Rec:
    def __init__(self):
      self.rows = []

    def write_scalars(self, step, scalars):
      self.rows.append((step, scalars))

  rec = Rec()
  p = writers._FallbackReportProgress(num_train_steps=100, writer=rec, every_secs=1.0)
  assert not p(0, t=0.0)
  assert not p(5, t=0.5)
  assert p(20, t=2.0)
  assert rec.rows == [(20, {"steps_per_sec": 10.0})]


class _Recorder:
  def __init__(self):
    self.scalars, self.hists = [], []

  def write_scalars(self, step, scalars):
    self.scalars.append((step, dict(scalars)))

  def write_histograms(self, step, arrays):
    self.hists.append((step, {k: np.asarray(v) for k, v in arrays.items()}))


def test_metric_buffer_writes_every_buffered_step_once_and_keeps_the_last_finite_train():
  import jax.numpy as jnp  # pylint: disable=g-import-not-at-top

  rec = _Recorder()
  buf = writers.MetricBuffer([rec])
  buf.add(1, {"train/loss": jnp.float32(3.0), "h": jnp.array([1.0, jnp.nan, 2.0])})
  buf.add(2, {"train/loss": jnp.float32(2.0)})
  buf.add(3, {"train/loss": jnp.float32(jnp.nan)})
  assert rec.scalars == []  # nothing leaves the device before a flush
  buf.flush()
  assert [s for s, _ in rec.scalars] == [1, 2, 3]
  assert buf.last_train == [{"train/loss": 2.0}]  # step 3 is not finite
  assert rec.hists[0][0] == 1 and list(rec.hists[0][1]["h"]) == [1.0, 2.0]
  buf.flush()
  assert len(rec.scalars) == 3  # flushed entries are not written again


def test_metric_buffer_writes_fetched_records_a_few_at_a_time_in_order():
  import jax.numpy as jnp  # pylint: disable=g-import-not-at-top

  rec = _Recorder()
  buf = writers.MetricBuffer([rec])
  for step in (1, 2, 3):
    buf.add(step, {"train/loss": jnp.float32(step)})
  buf.fetch()
  buf.add(4, {"train/loss": jnp.float32(4.0)})  # after the fetch: waits for the next one
  assert rec.scalars == []  # fetching writes nothing
  buf.write(limit=2)
  assert [s for s, _ in rec.scalars] == [1, 2] and buf.last_train == [{"train/loss": 2.0}]
  buf.write(limit=2)
  assert [s for s, _ in rec.scalars] == [1, 2, 3]  # step 4 is not fetched yet
  buf.flush()
  assert [s for s, _ in rec.scalars] == [1, 2, 3, 4] and buf.last_train == [{"train/loss": 4.0}]


def test_metric_buffer_of_a_stack_writes_run_k_its_slice_and_only_live_runs_every_run_records():
  import jax.numpy as jnp  # pylint: disable=g-import-not-at-top

  recs = [_Recorder(), _Recorder(), _Recorder()]
  buf = writers.MetricBuffer(recs, stacked=True)
  buf.add(1, {"train/loss": jnp.array([1.0, 2.0, 3.0]), "h": jnp.ones((3, 4))})
  buf.add(1, {"eval/loss": 7.0}, run=2)
  buf.fetch()
  buf.add(2, {"train/loss": jnp.array([4.0, 5.0, jnp.nan])})
  buf.add(2, {"train/diverged": 1.0}, run=2)  # one run's own record reaches it when not live
  buf.flush(runs={0, 1})
  assert [(s, dict(m)) for s, m in recs[0].scalars] == [(1, {"train/loss": 1.0}),
                                                       (2, {"train/loss": 4.0})]
  assert [(s, dict(m)) for s, m in recs[2].scalars] == [
      (1, {"train/loss": 3.0}), (1, {"eval/loss": 7.0}), (2, {"train/diverged": 1.0})]
  assert [h[1]["h"].shape for h in recs[1].hists] == [(4,)]
  assert buf.last_train == [{"train/loss": 4.0}, {"train/loss": 5.0}, {"train/loss": 3.0}]


def test_tensorboardx_writes_non_finite_scalars_without_a_warning_each(tmp_path, caplog):
  w = writers.create_writer(str(tmp_path), backend="tensorboardx")
  with caplog.at_level("WARNING"):
    for step in range(3):
      w.write_scalars(step, {"train/loss": float("nan"), "sparsity/zero_frac": float("inf")})
  w.close()
  assert not [r for r in caplog.records if "NaN or Inf" in r.getMessage()]
  scalars, _ = _read_scalars(str(tmp_path))
  assert np.isnan([v for _, v in scalars["train/loss"]]).all()
  assert [v for _, v in scalars["sparsity/zero_frac"]] == [np.inf] * 3
