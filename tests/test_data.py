"""Tests of jaxopt_study.data: synthetic ground truth, WikiText, packing, caches, eval, errors."""

import hashlib
import itertools
import json
import logging
import math
import pathlib
import re
import time

import jax
import numpy as np
import pytest
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

from jaxopt_study import data
from jaxopt_study.data import pipeline
from jaxopt_study.data import synthetic
from jaxopt_study.data import tokenizer as tokenizer_lib
from jaxopt_study.data import wikitext


def _synthetic_config(**overrides):
  c = data.default_config()
  c.vocab_size = overrides.pop("vocab_size", 1024)
  for k, v in overrides.items():
    c.synthetic[k] = v
  return c


def _shared_wikitext103() -> pathlib.Path | None:
  """../shared/data/wikitext-103 beside the repository (or beside its worktree folder), if there."""
  root = pathlib.Path(__file__).resolve().parents[1]
  for parent in (root.parent, root.parent.parent):
    folder = parent / "shared" / "data" / "wikitext-103"
    if (folder / "wiki.valid.tokens").is_file() and (folder / "wiki.test.tokens").is_file():
      return folder
  return None


# --- Synthetic corpus: ground truth ---------------------------------------------------------


@pytest.mark.parametrize("exponent", [0.9, 1.4])
def test_synthetic_zipf_exponent(exponent):
  ds = data.build_dataset(_synthetic_config(vocab_size=4096, zipf_exponent=exponent, shift="none"),
                          seq_len=256, global_batch_size=32, seed=0)
  counts = np.zeros(ds.vocab_size)
  for step in range(100):  # 822k tokens
    counts += np.bincount(ds.train_batch(step).ravel(), minlength=ds.vocab_size)
  freq = np.sort(counts)[::-1] / counts.sum()  # empirical rank-frequency
  ranks = np.arange(1, 201)  # >= ~150 counts per rank here: the fit is not tail noise.
  slope = np.polyfit(np.log(ranks), np.log(freq[:200]), 1)[0]
  assert abs(-slope - exponent) < 0.05, (slope, exponent)


def test_synthetic_switch_schedule():
  ds = data.build_dataset(_synthetic_config(num_topics=3, shift="switch", shift_every=5),
                          seq_len=128, global_batch_size=32, seed=1)
  tops = []
  for k in range(4):  # the 4th period wraps around to topic 0
    steps = range(5 * k, 5 * k + 5)
    assert [ds.topic_at(s) for s in steps] == [k % 3] * 5
    counts = np.bincount(np.concatenate([ds.train_batch(s).ravel() for s in steps]),
                         minlength=ds.vocab_size)
    top = set(np.argsort(counts)[::-1][:10].tolist())
    # The 10 most frequent tokens of the period are among the 15 most probable of its topic...
    assert top <= set(ds.topic_perms[k % 3][:15].tolist()), k
    tops.append(top)
  # ...and the topics really differ in which tokens are frequent.
  assert len(tops[0] & tops[1]) <= 3 and len(tops[1] & tops[2]) <= 3
  assert len(tops[0] & tops[3]) >= 7


@pytest.mark.parametrize("eval_at", ["seen", "last"])
def test_synthetic_eval_at_draws_validation_and_test_at_the_last_topic_or_all_seen(eval_at):
  # 4 topics, a switch every 10 steps, 40 steps: topics 0-3 each a quarter, topic 3 last.
  c = _synthetic_config(vocab_size=64, num_topics=4, shift="switch", shift_every=10,
                        copy_prob=0.0, num_eval_sequences=512, eval_at=eval_at)
  c.eval_batches = 16
  ds = data.build_dataset(c, seq_len=64, global_batch_size=32, seed=4, num_train_steps=40)
  ranks = np.arange(1, 65, dtype=np.float64)
  zipf = ranks ** -1.1 / np.sum(ranks ** -1.1)  # the rank law, by hand
  # Expected share of each token id in the split: the last topic's Zipf, or the average of all.
  topics = [3] if eval_at == "last" else [0, 1, 2, 3]
  expected = np.zeros(64)
  for k in topics:
    expected[ds.topic_perms[k]] += zipf / len(topics)
  for split in ("validation", "test"):
    tokens = np.concatenate([b.ravel() for b in ds.eval_batches(split)])  # 33k tokens
    share = np.bincount(tokens, minlength=64) / tokens.size
    assert np.abs(share - expected).max() < 0.01, (split, np.abs(share - expected).max())
    # Every batch is drawn at one step, i.e. one topic: its exact entropy is the Zipf law's.
    assert ds.baselines(split)["marginal_entropy"] == pytest.approx(
        -np.sum(zipf * np.log(zipf)), rel=1e-9)
  # Adaptation and forgetting stay what they were.
  assert set(ds.eval_splits) == {"validation", "test", "current", "past"}


def test_synthetic_eval_at_is_checked():
  with pytest.raises(ValueError, match="config.data.synthetic.eval_at='end'"):
    data.check_config(_synthetic_config(eval_at="end"), seq_len=8, global_batch_size=4)


def test_synthetic_drift_mixes():
  c = _synthetic_config(num_topics=2, shift="drift", shift_every=100, num_eval_sequences=4096)
  c.eval_batches = 128
  ds = data.build_dataset(c, seq_len=64, global_batch_size=32, seed=2)
  at = lambda step: data.build_dataset(c, seq_len=64, global_batch_size=32, seed=2,
                                       num_train_steps=step + 1)  # 'current' = step
  np.testing.assert_allclose(ds.mixture_at(0), [1.0, 0.0])
  np.testing.assert_allclose(ds.mixture_at(25), [0.75, 0.25])
  np.testing.assert_allclose(ds.mixture_at(150), [0.5, 0.5])  # from topic 1 back to topic 0
  np.testing.assert_allclose(ds.token_probs_at(50), 0.5 * ds.topic_probs.sum(0))
  head0, head1 = ds.topic_perms[0][0], ds.topic_perms[1][0]
  for step, w1 in ((0, 0.0), (50, 0.5), (90, 0.9)):
    tokens = np.concatenate([b.ravel() for b in at(step).eval_batches("current")])  # 266k
    emp = np.bincount(tokens, minlength=ds.vocab_size) / tokens.size
    p1 = ds.rank_probs[0]
    np.testing.assert_allclose(emp[[head0, head1]], [(1 - w1) * p1, w1 * p1], atol=0.006)
    assert np.abs(emp - ds.token_probs_at(step)).max() < 0.006


def test_synthetic_copy_spans_keep_marginals():
  c = _synthetic_config(vocab_size=64, zipf_exponent=1.1, shift="none", copy_prob=0.9,
                        span_min=2, span_max=8)
  ds = data.build_dataset(c, seq_len=63, global_batch_size=64, seed=3)
  batches = np.stack([ds.train_batch(s) for s in range(200)])  # [200, 64, 64]
  p = ds.token_probs_at(0)
  # Copies really happen: far more repeated bigrams than iid draws would give.
  x = batches.reshape(-1, 64)
  src = synthetic.copy_sources(np.random.default_rng(0), 256, 64, 0.9, 2, 8)
  assert (src != np.arange(64)).mean() > 0.6
  assert np.all(src <= np.arange(64)) and np.all(np.take_along_axis(src, src, 1) == src)
  repeats = np.mean([len(set(zip(r[:-1], r[1:]))) for r in x]) / 63
  assert repeats < 0.75
  # Each position's marginal is exactly p: rows are independent, so a chi-square test is valid.
  for pos in (0, 1, 32, 63):
    counts = np.bincount(batches[:, :, pos].ravel(), minlength=64)  # 12,800 samples
    n = counts.sum()
    keep = p * n >= 5  # merge the rare tail (if any) into one bin
    obs, exp = counts[keep], p[keep] * n
    if not keep.all():
      obs, exp = np.append(obs, counts[~keep].sum()), np.append(exp, p[~keep].sum() * n)
    chi2, dof = ((obs - exp) ** 2 / exp).sum(), len(obs) - 1
    assert (chi2 - dof) / np.sqrt(2 * dof) < 5.0, (pos, chi2, dof)
  pooled = np.bincount(batches.ravel(), minlength=64) / batches.size
  assert np.abs(pooled - p).max() < 0.01


def test_synthetic_token_frequencies_horizon():
  c = _synthetic_config(num_topics=3, shift="switch", shift_every=10)
  ds = data.build_dataset(c, seq_len=8, global_batch_size=4, seed=0, num_train_steps=25)
  np.testing.assert_allclose(ds.horizon_weights(), [0.4, 0.4, 0.2])
  np.testing.assert_allclose(ds.token_frequencies,
                             np.mean([ds.token_probs_at(s) for s in range(25)], axis=0))
  assert ds.token_frequencies.dtype == np.float64 and ds.token_frequencies.shape == (1024,)
  assert ds.token_frequencies.sum() == pytest.approx(1.0)
  # Unknown horizon: one full topic cycle.
  ds = data.build_dataset(c, seq_len=8, global_batch_size=4, seed=0)
  np.testing.assert_allclose(ds.horizon_weights(), [1 / 3] * 3)
  c.synthetic.shift = "drift"
  ds = data.build_dataset(c, seq_len=8, global_batch_size=4, seed=0, num_train_steps=1000)
  np.testing.assert_allclose(ds.token_frequencies,
                             np.mean([ds.token_probs_at(s) for s in range(1000)], axis=0))


def test_synthetic_determinism_and_shapes():
  c = _synthetic_config()
  a = data.build_dataset(c, seq_len=32, global_batch_size=8, seed=0)
  b = data.build_dataset(c, seq_len=32, global_batch_size=8, seed=0)
  assert isinstance(a, data.Dataset)
  assert a.train_batch(7).shape == (8, 33) and a.train_batch(7).dtype == np.int32
  np.testing.assert_array_equal(a.train_batch(7), b.train_batch(7))
  np.testing.assert_array_equal(a.train_batch(7), a.train_batch(7))
  assert not np.array_equal(a.train_batch(7), a.train_batch(8))
  other = data.build_dataset(c, seq_len=32, global_batch_size=8, seed=1)
  assert not np.array_equal(a.train_batch(7), other.train_batch(7))
  evals = list(a.eval_batches())
  assert len(evals) == min(c.eval_batches, c.synthetic.num_eval_sequences // 8)
  assert all(e.shape == (8, 33) and e.dtype == np.int32 for e in evals)
  for e1, e2 in zip(evals, b.eval_batches()):
    np.testing.assert_array_equal(e1, e2)
  # Held out: no eval window is a training window.
  train_rows = {r.tobytes() for s in range(50) for r in a.train_batch(s)}
  assert not any(r.tobytes() in train_rows for e in evals for r in e)
  assert all(0 <= x.min() and x.max() < a.vocab_size for x in evals)


@pytest.mark.parametrize("name", ["synthetic", "local"])
def test_process_slices_concatenate_to_global_batch(name, tmp_path):
  if name == "synthetic":
    c = _synthetic_config()
  else:
    c = _local_config(_write_wikitext(tmp_path / "wiki"), tmp_path / "cache")
  kw = dict(seq_len=16, global_batch_size=8, seed=0)
  whole = data.build_dataset(c, **kw)
  parts = [data.build_dataset(c, process_index=i, process_count=4, **kw) for i in range(4)]
  for step in (0, 3, 1000):
    np.testing.assert_array_equal(np.concatenate([p.train_batch(step) for p in parts]),
                                  whole.train_batch(step))
  for b, *pb in zip(whole.eval_batches(), *[p.eval_batches() for p in parts]):
    assert all(x.shape == (2, 17) for x in pb)
    np.testing.assert_array_equal(np.concatenate(pb), b)


# --- WikiText --------------------------------------------------------------------------------

_WORDS = ("the of and in to a was is for on as by with he at from that his it an were are which "
          "river castle storm lobster highway album season army church species born game ship "
          "first two 1994 , . ( ) \" @-@ <unk>").split()


def _write_wikitext(folder: pathlib.Path,
                    articles=(("train", 6), ("valid", 3), ("test", 3))) -> pathlib.Path:
  """WikiText-format files; returns the folder. Each article: header, 2 sections, paragraphs."""
  folder.mkdir(parents=True, exist_ok=True)
  rng = np.random.default_rng(0)
  for split, n in articles:
    lines = [" "]
    for a in range(n):
      lines += [f" = Article {split} {a} = ", " "]
      for sec in range(2):
        lines += [" " + " ".join(rng.choice(_WORDS, size=60)) + " " for _ in range(3)]
        lines += [" ", f" = = Section {sec} = = ", " "]
        lines += [f" = = = Sub {sec} = = = ", " "]
      lines += [" " + " ".join(rng.choice(_WORDS, size=40)) + " ", " "]
    (folder / f"wiki.{split}.tokens").write_text("\n".join(lines) + "\n", encoding="utf-8")
  return folder


def _local_config(folder, cache_dir, vocab_size=400):
  c = data.default_config()
  c.name, c.path, c.cache_dir, c.vocab_size = "local", str(folder), str(cache_dir), vocab_size
  return c


def test_wikitext_headers():
  assert wikitext.is_article_header(" = Homarus gammarus = ")
  assert wikitext.is_article_header(" = M @-@ 82 ( Michigan highway ) = \n")
  assert not wikitext.is_article_header(" = = Description = = ")
  assert not wikitext.is_article_header(" = = = Sub = = = ")
  assert not wikitext.is_article_header(" = Qualified for the next round ")  # a table legend
  assert not wikitext.is_article_header(" The sum = 3 = 1 + 2 . ")
  assert wikitext.is_section_header(" = = Description = = ")
  assert wikitext.is_section_header(" = = = Sub = = = ")
  assert not wikitext.is_section_header(" = Homarus gammarus = ")
  lines = [" ", " = A = ", " x ", " = = S = = ", " = B = ", " y "]
  assert wikitext.count_articles(lines) == 2
  assert [len(a) for a in wikitext.split_articles(lines)] == [4, 2]  # the blank joins A
  assert wikitext.split_articles([" ", " x "]) == [[" ", " x "]]  # no header: one article


def test_local_wikitext_loads_packs_and_counts(tmp_path):
  folder = _write_wikitext(tmp_path / "wiki")
  lines = list(wikitext.read_lines(folder / "wiki.train.tokens"))
  stats = wikitext.corpus_stats(lines)
  nonblank = [l for l in lines if l.strip()]
  assert stats.articles == 6 and stats.sections == 6 * 4
  assert stats.lines == len(lines) == 1 + 6 * (2 + 2 * 8 + 2)
  # Headers count as words ('=', 'Article', 'train', '0', '='), as in WikiText's own counts.
  assert stats.words == sum(len(l.split()) for l in lines) == 6 * (5 + 2 * (3 * 60 + 6 + 8) + 40)

  ds = data.build_dataset(_local_config(folder, tmp_path / "cache"), seq_len=32,
                          global_batch_size=4, seed=0)
  assert isinstance(ds, data.Dataset) and ds.vocab_size == 400 and ds.eos_id == 2
  tokens = np.asarray(ds.train_tokens)
  assert tokens.dtype == np.uint16 and tokens.max() < 400
  assert (tokens == ds.eos_id).sum() == len(nonblank)  # one EOS per line, blank lines dropped
  assert (tokens == tokenizer_lib.UNK_ID).sum() == 0  # byte fallback: nothing is unknown
  # The first line round-trips through the tokenizer.
  first_eos = int(np.argmax(tokens == ds.eos_id))
  assert ds.tokenizer.decode(tokens[:first_eos].tolist()) == nonblank[0].strip()
  np.testing.assert_allclose(ds.token_frequencies,
                             np.bincount(tokens, minlength=400) / tokens.size)

  # Packing: window i = tokens[32 i : 32 i + 33]; neighbours share exactly one token.
  T, W = 32, ds.num_train_windows
  assert W == (tokens.size - 1) // T
  windows = pipeline.gather_windows(tokens, np.arange(W), T)
  np.testing.assert_array_equal(windows[:-1, -1], windows[1:, 0])
  np.testing.assert_array_equal(np.concatenate([windows[:, :-1].ravel(), windows[-1:, -1]]),
                                tokens[:W * T + 1])
  # One epoch of training batches visits every window once; rows are windows, never padded.
  steps = W // 4
  ids = np.concatenate([ds.train_window_ids(s) for s in range(steps)])
  assert len(set(ids.tolist())) == len(ids) == steps * 4
  for s in range(3):
    np.testing.assert_array_equal(ds.train_batch(s), windows[ds.train_window_ids(s)])
  assert ds.train_batch(0).dtype == np.int32 and ds.train_batch(0).shape == (4, 33)
  # A new epoch is a new order: global window g = step * B + b sits in epoch g // W.
  next_epoch = pipeline.epoch_permutation(0, 1, W)
  np.testing.assert_array_equal(ds._perm(1), next_epoch)
  assert not np.array_equal(ds._perm(0), next_epoch)
  # Eval: the eval split's windows in order, remainder dropped.
  evals = list(ds.eval_batches())
  ev = np.asarray(ds.eval_tokens["validation"])
  assert len(evals) == min(16, ((ev.size - 1) // T) // 4)
  np.testing.assert_array_equal(evals[0][0], ev[:T + 1])
  np.testing.assert_array_equal(evals[1][0], ev[4 * T:5 * T + 1])


def test_cache_is_reused(tmp_path, monkeypatch):
  folder = _write_wikitext(tmp_path / "wiki")
  c = _local_config(folder, tmp_path / "cache")
  first = data.build_dataset(c, seq_len=32, global_batch_size=4, seed=0)
  files = {p: p.stat().st_mtime_ns for p in (tmp_path / "cache").rglob("*") if p.is_file()}
  # tokenizer model, train/valid/test ids, train counts; each with its sidecar.
  assert len(files) == 10 and len([p for p in files if p.suffix == ".json"]) == 5

  def boom(*args, **kwargs):
    raise AssertionError("the cache should have been used")
  monkeypatch.setattr(tokenizer_lib, "train_tokenizer", boom)
  monkeypatch.setattr(tokenizer_lib, "encode_lines", boom)
  second = data.build_dataset(c, seq_len=32, global_batch_size=4, seed=0)
  assert {p: p.stat().st_mtime_ns for p in (tmp_path / "cache").rglob("*") if p.is_file()} == files
  assert isinstance(second.train_tokens, np.memmap)
  np.testing.assert_array_equal(first.train_batch(5), second.train_batch(5))
  # Another vocabulary is another tokenizer: it trains (and here, fails on purpose).
  c.vocab_size = 500
  with pytest.raises(AssertionError, match="cache"):
    data.build_dataset(c, seq_len=32, global_batch_size=4, seed=0)


def test_real_wikitext103_offline_preset(tmp_path):
  """Issue 10's offline real-text set-up on the real files: trained on validation, evaluated on
  held-out halves of test."""
  folder = _shared_wikitext103()
  if folder is None:
    pytest.skip("../shared/data/wikitext-103/wiki.{valid,test}.tokens are absent (only the dev "
                "machines have them; they are never copied into the repository)")
  valid_lines = list(wikitext.read_lines(folder / "wiki.valid.tokens"))
  stats = wikitext.corpus_stats(valid_lines)
  assert stats.lines == 3_760
  assert stats.articles == 60
  # 213,886 whitespace tokens; plus one <eos> per line gives the paper's 217,646.
  assert stats.words == 213_886
  assert stats.words_with_eos == 217_646

  c = data.default_config("wikitext-103-offline")
  assert (c.name, c.train_split, c.validation_split, c.test_split) == (
      "local", "valid", "test[:50%]", "test[50%:]")
  c.path, c.cache_dir, c.vocab_size = str(folder), str(tmp_path / "cache"), 512
  ds = data.build_dataset(c, seq_len=128, global_batch_size=8, seed=0)
  assert ds.eval_splits == ("validation", "test", data.TRAIN_SAMPLE)
  train = np.asarray(ds.train_tokens)
  # The train sample is the training text's start, cut like every eval split: consecutive
  # windows of T + 1 tokens overlapping by one, batch after batch.
  first_two = list(itertools.islice(ds.eval_batches(data.TRAIN_SAMPLE), 2))
  np.testing.assert_array_equal(first_two[0][0], train[:129])
  np.testing.assert_array_equal(first_two[1][0], train[8 * 128:8 * 128 + 129])
  assert (train == ds.eos_id).sum() == sum(1 for l in valid_lines if l.strip())  # 2,461 lines
  assert (train == tokenizer_lib.UNK_ID).sum() == 0
  # The test file's 62 ' = Title = ' articles: the first 31 are 'validation', the last 31
  # 'test' (found here with a regex, independently of the loader).
  test_lines = list(wikitext.read_lines(folder / "wiki.test.tokens"))
  heads = [i for i, l in enumerate(test_lines) if re.fullmatch(r" = [^=].*[^=] = ", l)]
  assert len(heads) == 62
  halves = {"validation": test_lines[:heads[31]], "test": test_lines[heads[31]:]}
  for split, lines in halves.items():
    tokens = np.asarray(ds.eval_tokens[split])
    assert (tokens == ds.eos_id).sum() == sum(1 for l in lines if l.strip()), split
    first = int(np.argmax(tokens == ds.eos_id))
    first_line = next(l for l in lines if l.strip()).strip()
    assert ds.tokenizer.decode(tokens[:first].tolist()) == first_line
  assert ds.train_batch(0).shape == (8, 129)
  assert all(len(list(ds.eval_batches(split))) == 16 for split in ds.eval_splits)
  b = ds.baselines()
  assert b["uniform"] == pytest.approx(np.log(512))
  assert 4.0 < b["unigram"] < b["uniform"]


def test_hub_source_through_datasets(tmp_path, monkeypatch):
  """The hub path end to end, with load_dataset replaced by the same text in memory."""
  import datasets  # pylint: disable=g-import-not-at-top
  folder = _write_wikitext(tmp_path / "wiki")
  calls = []

  def fake_load_dataset(path, name, split, cache_dir):
    calls.append((path, name, split))
    file = folder / f"wiki.{'valid' if split == 'validation' else split}.tokens"
    # The hub's rows are the file's lines with their newline, as in Salesforce/wikitext.
    return datasets.Dataset.from_dict({"text": file.read_text().splitlines(keepends=True)})

  for var in ("HF_DATASETS_OFFLINE", "HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE"):
    monkeypatch.delenv(var, raising=False)
  monkeypatch.setattr(wikitext, "hub_reachable", lambda timeout_s: (True, "mock"))
  monkeypatch.setattr(datasets, "load_dataset", fake_load_dataset)
  c = data.default_config()
  c.name, c.cache_dir, c.vocab_size = "wikitext-2", str(tmp_path / "cache"), 400
  hub = data.build_dataset(c, seq_len=32, global_batch_size=4, seed=0)
  assert {call[2] for call in calls} == {"train", "validation", "test"}
  assert all(call[:2] == ("Salesforce/wikitext", "wikitext-2-raw-v1") for call in calls)
  local = data.build_dataset(_local_config(folder, tmp_path / "cache"), seq_len=32,
                             global_batch_size=4, seed=0)
  np.testing.assert_array_equal(np.asarray(hub.train_tokens), np.asarray(local.train_tokens))
  # Cached now: a second build needs neither the hub nor the network.
  calls.clear()
  monkeypatch.setattr(wikitext, "hub_reachable", lambda timeout_s: (False, "no network"))
  again = data.build_dataset(c, seq_len=32, global_batch_size=4, seed=0)
  assert not calls
  np.testing.assert_array_equal(again.train_batch(3), hub.train_batch(3))


# --- Prefetching ---------------------------------------------------------------------------


def test_prefetch_to_device():
  mesh = Mesh(np.array(jax.devices()[:1]), ("data",))
  sharding = NamedSharding(mesh, P("data"))
  ds = data.build_dataset(_synthetic_config(), seq_len=16, global_batch_size=4, seed=0)
  with data.prefetch_to_device(ds.train_batch, 5, sharding, buffer_size=2) as it:
    for want in range(5, 9):
      step, batch = next(it)
      assert step == want and isinstance(batch, jax.Array) and batch.sharding == sharding
      np.testing.assert_array_equal(np.asarray(batch), ds.train_batch(want))
    assert it.wait_seconds >= 0 and it.num_waited == 4
  assert not it._thread.is_alive()
  # Finite with end_step; numpy passthrough without a sharding.
  assert [s for s, _ in data.prefetch_to_device(ds.train_batch, 0, None, end_step=3)] == [0, 1, 2]


def test_prefetch_reraises_errors():
  def batch_fn(step):
    if step == 2:
      raise KeyError("bad step")
    return np.zeros((1, 2), np.int32)
  it = data.prefetch_to_device(batch_fn, 0, None)
  assert [next(it)[0], next(it)[0]] == [0, 1]
  with pytest.raises(KeyError, match="bad step"):
    next(it)
  with pytest.raises(StopIteration):
    next(it)


# --- Bad inputs ----------------------------------------------------------------------------


def test_unknown_name():
  c = data.default_config()
  c.name = "wikitext-104"
  with pytest.raises(ValueError, match=r"config\.data\.name='wikitext-104'.*'local'.*'synthetic'"):
    data.build_dataset(c, seq_len=8, global_batch_size=4, seed=0)
  with pytest.raises(ValueError, match=r"preset 'wikitext'.*'wikitext-103-offline'"):
    data.default_config("wikitext")
  assert data.default_config("wikitext-103").name == "wikitext-103"


def test_missing_local_files(tmp_path):
  c = _local_config(tmp_path / "nowhere", tmp_path / "cache")
  with pytest.raises(FileNotFoundError, match=r"config\.data\.path.*wiki\.train\..*wiki\.valid"):
    data.build_dataset(c, seq_len=8, global_batch_size=4, seed=0)
  c.path = ""
  with pytest.raises(FileNotFoundError, match=r"config\.data\.path"):
    data.build_dataset(c, seq_len=8, global_batch_size=4, seed=0)
  folder = _write_wikitext(tmp_path / "half", articles=(("train", 1),))  # no valid split
  with pytest.raises(FileNotFoundError, match=r"wiki\.valid.*holds \[.wiki\.train\.tokens.\]"):
    data.build_dataset(_local_config(folder, tmp_path / "cache"), seq_len=8,
                       global_batch_size=4, seed=0)
  assert not (tmp_path / "cache").exists()  # failed before any work


def test_offline_without_cache_fails_fast(tmp_path, monkeypatch):
  monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
  monkeypatch.setenv("HF_HUB_OFFLINE", "1")
  c = data.default_config()
  c.name, c.cache_dir = "wikitext-2", str(tmp_path / "empty_cache")
  t0 = time.perf_counter()
  with pytest.raises(data.SourceUnavailableError,
                     match=r"(?s)config\.data\.name='wikitext-2'.*offline.*"
                           r"config\.data\.name='local'.*config\.data\.path"):
    data.build_dataset(c, seq_len=8, global_batch_size=4, seed=0)
  assert time.perf_counter() - t0 < 10


def test_unreachable_hub_fails_fast(tmp_path, monkeypatch):
  for var in ("HF_DATASETS_OFFLINE", "HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE"):
    monkeypatch.delenv(var, raising=False)
  monkeypatch.setenv("HF_ENDPOINT", "http://127.0.0.1:9")  # discard port: refused at once
  c = data.default_config()
  c.name, c.cache_dir, c.hub_timeout_s = "wikitext-103", str(tmp_path / "empty_cache"), 2.0
  t0 = time.perf_counter()
  with pytest.raises(data.SourceUnavailableError, match=r"(?s)unreachable.*config\.data\.path"):
    data.build_dataset(c, seq_len=8, global_batch_size=4, seed=0)
  assert time.perf_counter() - t0 < 10


@pytest.mark.parametrize("kwargs, match", [
    (dict(global_batch_size=10, process_count=4), r"global_batch_size=10.*process_count=4"),
    (dict(process_index=4, process_count=4), r"process_index=4"),
    (dict(seq_len=0), r"seq_len=0"),
    (dict(global_batch_size=0), r"global_batch_size=0"),
])
def test_impossible_batch_or_process_split(kwargs, match):
  args = dict(seq_len=8, global_batch_size=8, seed=0) | kwargs
  with pytest.raises(ValueError, match=match):
    data.build_dataset(data.default_config(), **args)


@pytest.mark.parametrize("field, value, match", [
    ("vocab_size", 1, r"config\.data\.vocab_size=1"),
    ("synthetic.shift", "sudden", r"config\.data\.synthetic\.shift=.sudden."),
    ("synthetic.zipf_exponent", 0.0, r"config\.data\.synthetic\.zipf_exponent"),
    ("synthetic.copy_prob", 1.5, r"config\.data\.synthetic\.copy_prob"),
    ("synthetic.markov", 1.0, r"config\.data\.synthetic\.markov=1\.0"),
    ("synthetic.markov_successors", 0, r"config\.data\.synthetic\.markov_successors"),
    ("synthetic.span_max", 2, r"config\.data\.synthetic\.span_max=2"),
    ("eval_batches", 0, r"config\.data\.eval_batches=0"),
    ("synthetic.num_eval_sequences", 3, r"config\.data\.synthetic\.num_eval_sequences=3"),
])
def test_bad_synthetic_fields(field, value, match):
  c = data.default_config()
  block, _, key = field.rpartition(".")
  (c[block] if block else c)[key] = value
  with pytest.raises(ValueError, match=match):
    data.build_dataset(c, seq_len=8, global_batch_size=4, seed=0)


def test_bad_text_fields(tmp_path):
  c = _local_config(tmp_path, tmp_path / "cache", vocab_size=100)
  with pytest.raises(ValueError, match=r"config\.data\.vocab_size=100"):
    data.build_dataset(c, seq_len=8, global_batch_size=4, seed=0)
  c.vocab_size, c.validation_split = 512, "validation"
  with pytest.raises(ValueError, match=r"config\.data\.validation_split='validation'"):
    data.build_dataset(c, seq_len=8, global_batch_size=4, seed=0)
  # An eval split shorter than one global batch of windows.
  folder = _write_wikitext(tmp_path / "wiki", articles=(("train", 2), ("valid", 1), ("test", 1)))
  with pytest.raises(ValueError, match=r"validation_split.*fewer than one global batch"):
    data.build_dataset(_local_config(folder, tmp_path / "cache"), seq_len=256,
                       global_batch_size=64, seed=0)


def test_split_specs_select_whole_articles():
  lines = [" ", " = A = ", " a ", " = = S = = ", " = B = ", " b ", " = C = ", " c ", " = D = "]
  spec = wikitext.parse_split("test[:50%]", "validation_split")
  assert (spec.split, spec.start, spec.stop, str(spec)) == ("test", None, "50%", "test[:50%]")
  # Lines before the first header join the first article: 4 articles, halves of 2.
  assert list(wikitext.select(lines, spec)) == lines[:6]
  assert list(wikitext.select(lines, wikitext.parse_split("test[50%:]", "f"))) == lines[6:]
  assert list(wikitext.select(lines, wikitext.parse_split("test[1:3]", "f"))) == lines[4:8]
  assert list(wikitext.select(lines, wikitext.parse_split("test", "f"))) == lines
  for bad in ("validation", "test[:50", "test[a:]", "test[:150%]", "test[1:2:3]"):
    with pytest.raises(ValueError, match=r"config\.data\.test_split="):
      wikitext.parse_split(bad, "test_split")


@pytest.mark.parametrize("fields, match", [
    (dict(validation_split="train"), r"train_split='train' and config\.data\.validation_split"),
    (dict(validation_split="test", test_split="test[50%:]"), r"validation_split='test' and"),
])
def test_eval_text_must_be_held_out(fields, match):
  c = data.default_config()
  c.name, c.path = "local", "/nowhere"
  c.update(fields)
  with pytest.raises(ValueError, match=match):
    data.check_config(c, seq_len=8, global_batch_size=4)


def test_overlapping_article_ranges_are_refused(tmp_path):
  c = _local_config(_write_wikitext(tmp_path / "wiki"), tmp_path / "cache")
  c.validation_split, c.test_split = "test[:2]", "test[1:]"  # share article 1 of 0..2
  with pytest.raises(ValueError, match=r"validation text 'test\[:2\]' \(articles 0\.\.1\).*"
                                       r"overlap"):
    data.build_dataset(c, seq_len=8, global_batch_size=4, seed=0)
  c.validation_split, c.test_split = "test[:0]", "test[1:]"
  with pytest.raises(ValueError, match=r"validation text 'test\[:0\]' selects none"):
    data.build_dataset(c, seq_len=8, global_batch_size=4, seed=0)


# --- Verified caches --------------------------------------------------------------------------


def _corrupt(path: pathlib.Path, how: str) -> None:
  """Damages a cached file as issue 14 found them damaged."""
  raw = path.read_bytes()
  if how == "random_bytes":  # ids >= vocab_size with an intact .npy header
    header = len(raw) - np.load(path, mmap_mode="r").nbytes
    junk = np.random.default_rng(0).integers(0, 256, len(raw) - header, np.uint8).tobytes()
    path.write_bytes(raw[:header] + junk)
  elif how == "zeroed":  # every id 0 (<unk>): trains quietly on nothing
    header = len(raw) - np.load(path, mmap_mode="r").nbytes
    path.write_bytes(raw[:header] + bytes(len(raw) - header))
  elif how == "truncated":  # "mmap length is greater than file size"
    path.write_bytes(raw[:len(raw) // 2])
  elif how == "object_npy":  # a planted pickle-carrying .npy
    with open(path, "wb") as f:
      np.save(f, np.array([{"a": 1}, None], dtype=object), allow_pickle=True)
  elif how == "no_sidecar":  # a cache written before sidecars existed
    path.with_name(path.name + ".json").unlink()
  elif how == "wrong_vocab_sidecar":  # the sidecar of another vocabulary
    side = path.with_name(path.name + ".json")
    side.write_text(json.dumps(json.loads(side.read_text()) | {"vocab_size": 1 << 16}))
  else:
    raise ValueError(how)


@pytest.mark.parametrize("how", ["random_bytes", "zeroed", "truncated", "object_npy",
                                 "no_sidecar", "wrong_vocab_sidecar"])
def test_bad_token_cache_is_detected_and_rebuilt(how, tmp_path, caplog):
  c = _local_config(_write_wikitext(tmp_path / "wiki"), tmp_path / "cache")
  good = np.array(data.build_dataset(c, seq_len=32, global_batch_size=4, seed=0).train_tokens)
  (path,) = (tmp_path / "cache").rglob("train-*-tok*[0-9a-f].npy")
  _corrupt(path, how)
  with caplog.at_level(logging.WARNING):
    ds = data.build_dataset(c, seq_len=32, global_batch_size=4, seed=0)
  assert any(str(path) in r.getMessage() and "Rebuilding" in r.getMessage()
             for r in caplog.records if r.levelno == logging.WARNING), caplog.text
  np.testing.assert_array_equal(np.asarray(ds.train_tokens), good)
  np.testing.assert_array_equal(ds.train_batch(3), pipeline.gather_windows(
      good, ds.train_window_ids(3), 32))
  # The rebuilt file verifies: a third build is silent.
  caplog.clear()
  with caplog.at_level(logging.WARNING):
    data.build_dataset(c, seq_len=32, global_batch_size=4, seed=0)
  assert not [r for r in caplog.records if r.levelno >= logging.WARNING]


@pytest.mark.parametrize("pattern", ["*.model", "*.counts.npy"])
def test_bad_tokenizer_or_counts_cache_is_rebuilt(pattern, tmp_path, caplog):
  c = _local_config(_write_wikitext(tmp_path / "wiki"), tmp_path / "cache")
  first = data.build_dataset(c, seq_len=32, global_batch_size=4, seed=0)
  (path,) = (tmp_path / "cache").rglob(pattern)
  _corrupt(path, "zeroed" if path.suffix == ".npy" else "truncated")
  with caplog.at_level(logging.WARNING):
    again = data.build_dataset(c, seq_len=32, global_batch_size=4, seed=0)
  assert str(path) in caplog.text and "Rebuilding" in caplog.text
  np.testing.assert_array_equal(again.token_counts, first.token_counts)
  np.testing.assert_array_equal(np.asarray(again.eval_tokens["test"]),
                                np.asarray(first.eval_tokens["test"]))


# --- Bad text files ------------------------------------------------------------------------


@pytest.mark.parametrize("content, match", [
    ("caf\xe9 au lait\n".encode("latin-1"), r"byte 3 \(line 1\) is 0xe9, which is not UTF-8"),
    (b" = A = \n ok \n" + bytes(range(256)) * 4, r"byte 13 \(line 3\) is a NUL byte"),
    (b"", r"has no text: it is empty"),
    (b" \n\n   \n", r"has no text"),
])
def test_unusable_train_file_is_named(content, match, tmp_path):
  folder = _write_wikitext(tmp_path / "wiki")
  (folder / "wiki.train.tokens").write_bytes(content)
  c = _local_config(folder, tmp_path / "cache")
  with pytest.raises(ValueError, match=re.escape(str(folder / "wiki.train.tokens")) +
                     r" \(config\.data\.train_split\).*" + match + r".*Fix: "):
    data.build_dataset(c, seq_len=8, global_batch_size=4, seed=0)
  assert not list((tmp_path / "cache").rglob("*.model"))  # failed before the tokenizer


@pytest.mark.parametrize("prefetch", [0, -1, 1.5, True])
def test_check_config_rejects_bad_prefetch(prefetch):
  with pytest.raises(ValueError, match=rf"config\.prefetch={prefetch!r} must be a positive"):
    data.check_config(data.default_config(), seq_len=8, global_batch_size=4, prefetch=prefetch)
  data.check_config(data.default_config(), seq_len=8, global_batch_size=4, prefetch=2)


# --- Eval splits and baselines (CONTRACTS item 2) -----------------------------------------------


@pytest.mark.parametrize("name", ["synthetic", "local"])
def test_eval_splits_contract(name, tmp_path):
  if name == "synthetic":
    c = _synthetic_config()
  else:
    c = _local_config(_write_wikitext(tmp_path / "wiki"), tmp_path / "cache")
  ds = data.build_dataset(c, seq_len=16, global_batch_size=4, seed=0, num_train_steps=300)
  assert ds.eval_splits[0] == "validation" and "test" in ds.eval_splits
  assert len(set(ds.eval_splits)) == len(ds.eval_splits)
  rows = {}
  for split in ds.eval_splits:
    first, second = list(ds.eval_batches(split)), list(ds.eval_batches(split))
    assert 1 <= len(first) <= c.eval_batches and len(first) == len(second)
    for a, b in zip(first, second):  # the same every call
      assert a.shape == (4, 17) and a.dtype == np.int32
      np.testing.assert_array_equal(a, b)
    rows[split] = {r.tobytes() for b in first for r in b}
  assert not rows["validation"] & rows["test"]  # different text / different streams
  np.testing.assert_array_equal(next(ds.eval_batches()), next(ds.eval_batches("validation")))
  with pytest.raises(ValueError, match=r"'valid' is not one of .*'validation', 'test'"):
    next(ds.eval_batches("valid"))
  if name == "local":  # the real valid / test files, in order
    np.testing.assert_array_equal(next(ds.eval_batches("test"))[0],
                                  np.asarray(ds.eval_tokens["test"][:17]))


def test_synthetic_current_and_past_splits():
  # 3 topics switching every 5 steps over 20 steps: topics 0, 1, 2, 0. The last step's topic is
  # 0, so 'current' is topic 0 and 'past' the steps 5..14 of topics 1 and 2, half each.
  c = _synthetic_config(vocab_size=64, num_topics=3, shift="switch", shift_every=5,
                        num_eval_sequences=1024)
  c.eval_batches = 32
  ds = data.build_dataset(c, seq_len=63, global_batch_size=32, seed=4, num_train_steps=20)
  assert ds.eval_splits == ("validation", "test", "current", "past")
  p = ds.topic_probs  # [3, 64], ground truth
  want = {"current": p[0], "past": 0.5 * (p[1] + p[2]),
          "validation": (2 * p[0] + p[1] + p[2]) / 4}
  for split, q in want.items():
    tokens = np.concatenate([b.ravel() for b in ds.eval_batches(split)])  # 65,536 tokens
    emp = np.bincount(tokens, minlength=64) / tokens.size
    assert np.abs(emp - q).max() < 0.015, split
  # No past before the first switch; no current or past without shifts.
  early = data.build_dataset(c, seq_len=63, global_batch_size=32, seed=4, num_train_steps=5)
  assert early.eval_splits == ("validation", "test", "current")
  c.synthetic.shift = "none"
  assert data.build_dataset(c, seq_len=63, global_batch_size=32, seed=4).eval_splits == (
      "validation", "test")


def _zipf_entropy(vocab_size, s):
  """-sum p ln p of p(r) = r^-s / sum_j j^-s, written out from the definition."""
  w = [r ** -s for r in range(1, vocab_size + 1)]
  z = sum(w)
  return -sum(x / z * math.log(x / z) for x in w)


def test_synthetic_baselines_iid():
  c = _synthetic_config(vocab_size=300, zipf_exponent=1.2, shift="none", copy_prob=0.0)
  ds = data.build_dataset(c, seq_len=32, global_batch_size=8, seed=0)
  b = ds.baselines()
  assert b["uniform"] == pytest.approx(math.log(300))
  assert b["marginal_entropy"] == pytest.approx(_zipf_entropy(300, 1.2), rel=1e-12)
  assert b["entropy_floor"] == pytest.approx(b["marginal_entropy"], rel=1e-12)  # no copies
  targets = np.concatenate([x[:, 1:].ravel() for x in ds.eval_batches()])
  assert b["unigram"] == pytest.approx(-np.mean(np.log(ds.token_frequencies[targets])), rel=1e-12)
  # Stationary: the training unigram is the eval distribution, so unigram ~ its entropy.
  assert b["unigram"] == pytest.approx(_zipf_entropy(300, 1.2), abs=0.05)


def test_synthetic_baselines_drift_mixture():
  # 'current' at step 50 of a 2-topic drift with shift_every 100: q = (p_0 + p_1) / 2 exactly.
  c = _synthetic_config(vocab_size=200, num_topics=2, shift="drift", shift_every=100,
                        copy_prob=0.0)
  ds = data.build_dataset(c, seq_len=32, global_batch_size=8, seed=1, num_train_steps=51)
  q = 0.5 * (ds.topic_probs[0] + ds.topic_probs[1])
  b = ds.baselines("current")
  assert b["marginal_entropy"] == pytest.approx(-sum(x * math.log(x) for x in q), rel=1e-12)
  assert b["entropy_floor"] == pytest.approx(b["marginal_entropy"], rel=1e-12)
  targets = np.concatenate([x[:, 1:].ravel() for x in ds.eval_batches("current")])
  assert b["unigram"] == pytest.approx(-np.mean(np.log(ds.token_frequencies[targets])), rel=1e-12)


def test_entropy_floor_with_copies_matches_the_generator():
  # P(position t is a fresh draw) from the renewal formula vs the generator's own layouts.
  length, copy_prob, lo, hi = 40, 0.7, 2, 6
  src = synthetic.copy_sources(np.random.default_rng(5), 60_000, length, copy_prob, lo, hi)
  empirical = (src == np.arange(length)).mean(0)  # [40]
  exact = synthetic.original_probs(length, copy_prob, lo, hi)
  assert np.abs(exact - empirical).max() < 0.01  # ~5 standard errors
  assert exact[0] == exact[1] == 1.0  # the first span has no room for a source
  c = _synthetic_config(vocab_size=300, zipf_exponent=1.2, shift="none", copy_prob=copy_prob,
                        span_min=lo, span_max=hi)
  b = data.build_dataset(c, seq_len=length - 1, global_batch_size=8, seed=0).baselines()
  assert b["marginal_entropy"] == pytest.approx(_zipf_entropy(300, 1.2), rel=1e-12)
  # Targets are positions 1..T; a copied target has zero entropy given the layout.
  assert b["entropy_floor"] == pytest.approx(b["marginal_entropy"] * empirical[1:].mean(),
                                             rel=0.01)
  assert b["entropy_floor"] < b["marginal_entropy"]


# --- Synthetic corpus: the Markov (bigram) structure --------------------------------------


def _dense_chain(zipf, strength, succ):
  """T[r, r'] = (1 - lambda) p(r') + lambda #{j : succ[r, j] = r'} / d, written out entry by entry."""
  v, d = succ.shape
  t = np.empty((v, v))
  for r in range(v):
    for r2 in range(v):
      t[r, r2] = (1 - strength) * zipf[r2] + strength * sum(s == r2 for s in succ[r]) / d
  return t


def _markov_dataset(copy_prob=0.0, vocab_size=12, successors=3, strength=0.8, **kw):
  c = _synthetic_config(vocab_size=vocab_size, zipf_exponent=1.0, shift="none",
                        copy_prob=copy_prob, markov=strength, markov_successors=successors,
                        span_min=2, span_max=5, **kw)
  return data.build_dataset(c, seq_len=31, global_batch_size=64, seed=3)


def test_markov_stationary_law_and_entropy_rate_by_hand():
  ds = _markov_dataset()
  t = _dense_chain(ds.zipf, 0.8, ds.successors)
  assert np.allclose(t.sum(1), 1.0)
  # The left eigenvector of T for eigenvalue 1, by numpy.linalg.
  vals, vecs = np.linalg.eig(t.T)
  pi = np.real(vecs[:, np.argmin(np.abs(vals - 1))])
  pi /= pi.sum()
  assert np.allclose(ds.rank_probs, pi, rtol=1e-10, atol=1e-13)
  rate = -sum(pi[r] * t[r, q] * math.log(t[r, q]) for r in range(12) for q in range(12))
  assert ds.entropy_rate == pytest.approx(rate, rel=1e-12)
  b = ds.baselines()
  assert b["entropy_floor"] == pytest.approx(rate, rel=1e-12)  # no copies: the rate itself
  assert b["marginal_entropy"] == pytest.approx(-(pi * np.log(pi)).sum(), rel=1e-12)
  assert b["entropy_floor"] < b["marginal_entropy"]


@pytest.mark.parametrize("copy_prob", [0.0, 0.5])
def test_markov_windows_follow_the_chain(copy_prob):
  ds = _markov_dataset(copy_prob=copy_prob)
  t = _dense_chain(ds.zipf, 0.8, ds.successors)
  rank_of = np.argsort(ds.topic_perms[0])  # shift 'none': topic 0 maps rank -> token
  ranks = np.concatenate([rank_of[ds.train_batch(s)] for s in range(60)])  # [N, 32]
  # Every position has the stationary marginal (copies included).
  for pos in (0, 1, 16, 31):
    freq = np.bincount(ranks[:, pos], minlength=12) / ranks.shape[0]
    assert np.abs(freq - ds.rank_probs).max() < 0.03, pos  # N = 3840: ~4 standard errors
  # Without copies, consecutive ranks are distributed as pi(r) T(r, r').
  if copy_prob == 0:
    pairs = np.zeros((12, 12))
    np.add.at(pairs, (ranks[:, :-1].ravel(), ranks[:, 1:].ravel()), 1)
    pairs /= pairs.sum()
    assert np.abs(pairs - ds.rank_probs[:, None] * t).max() < 0.01
    # The mean log-loss of the true conditional is the entropy rate (the floor).
    nll = -np.log(t[ranks[:, :-1], ranks[:, 1:]]).mean()
    assert nll == pytest.approx(ds.entropy_rate, abs=0.03)


def test_markov_floor_with_copies_and_old_corpus_unchanged():
  ds = _markov_dataset(copy_prob=0.5)
  fresh = synthetic.original_probs(32, 0.5, 2, 5)
  assert ds.baselines()["entropy_floor"] == pytest.approx(ds.entropy_rate * fresh[1:].mean(),
                                                          rel=1e-12)
  # markov = 0 is the corpus as it was: a batch's digest recorded with the code before the field.
  c = _synthetic_config(vocab_size=64, shift="drift")
  batch = data.build_dataset(c, seq_len=15, global_batch_size=4, seed=0).train_batch(7)
  assert batch[0, :8].tolist() == [24, 53, 46, 54, 59, 2, 24, 23]
  assert hashlib.sha256(batch.tobytes()).hexdigest() == (
      "8a61d1d3fca6eaa0bae3a0c72dabe31faa25345f610043731cf9c457c919ca9e")


def test_text_unigram_baseline_by_hand():
  # Training counts over V = 8: id 0 once, 1 twice, 2 three times, 3 four times (N = 10);
  # add-one: p(v) = (count + 1) / 18. Two eval windows of T = 3 score tokens 1..6.
  ds = pipeline.TextDataset(
      train_tokens=np.array([0, 1, 1, 2, 2, 2, 3, 3, 3, 3], np.uint16),
      eval_tokens={"validation": np.array([5, 1, 2, 3, 0, 7, 2, 6], np.uint16),
                   "test": np.array([1, 1, 1, 1, 1, 1, 1], np.uint16)},
      token_counts=np.array([1, 2, 3, 4, 0, 0, 0, 0]), vocab_size=8, tokenizer=None,
      seq_len=3, global_batch_size=1, seed=0, eval_batches=16)
  b = ds.baselines()
  assert b["uniform"] == pytest.approx(math.log(8))
  # targets 1, 2, 3, 0, 7, 2 (the trailing 6 is in no window)
  want = -(math.log(3 / 18) + math.log(4 / 18) + math.log(5 / 18) + math.log(2 / 18)
           + math.log(1 / 18) + math.log(4 / 18)) / 6
  assert b["unigram"] == pytest.approx(want, rel=1e-12)
  assert ds.baselines("test")["unigram"] == pytest.approx(-math.log(3 / 18), rel=1e-12)
  np.testing.assert_allclose(ds.token_frequencies, [0.1, 0.2, 0.3, 0.4, 0, 0, 0, 0])


def test_too_small_a_vocabulary_names_the_size_this_corpus_needs(tmp_path):
  """SentencePiece needs one piece per required character plus its special pieces: the error
  gives that number (here > 400 CJK characters), not the generic minimum."""
  chars = "".join(chr(0x4E00 + i) for i in range(400))
  lines = [chars[i:i + 40] + " " + chars[::-1][i:i + 40] for i in range(360)] * 5
  with pytest.raises(ValueError, match=r"config\.data\.vocab_size=320 .*raise it \(>= (\d+)") as e:
    tokenizer_lib.train_tokenizer(lines, tmp_path / "m.model", vocab_size=320)
  assert int(re.search(r"raise it \(>= (\d+)", str(e.value))[1]) > 400
