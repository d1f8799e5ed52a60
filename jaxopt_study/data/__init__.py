"""Data: synthetic Zipfian/shifting corpus, WikiText (hub or local), SentencePiece, packing.

    data.check_config(config.data, seq_len=T, global_batch_size=B, prefetch=config.prefetch)
    ds = build_dataset(config.data, seq_len=T, global_batch_size=B, seed=config.seed,
                       process_index=jax.process_index(), process_count=jax.process_count(),
                       num_train_steps=config.num_steps)
    batches = prefetch_to_device(ds.train_batch, start_step, batch_sharding, config.prefetch)
    for split in ds.eval_splits:          # 'validation' first, then 'test', ...
      for batch in ds.eval_batches(split): ...
    ds.baselines(split)                   # {'uniform', 'unigram', ...} in nats/token
"""

from jaxopt_study.data.cache import CacheError
from jaxopt_study.data.pipeline import DATASETS
from jaxopt_study.data.pipeline import PRESETS
from jaxopt_study.data.pipeline import Dataset
from jaxopt_study.data.pipeline import Prefetcher
from jaxopt_study.data.pipeline import TRAIN_SAMPLE
from jaxopt_study.data.pipeline import TextDataset
from jaxopt_study.data.pipeline import build_dataset
from jaxopt_study.data.pipeline import check_config
from jaxopt_study.data.pipeline import default_config
from jaxopt_study.data.pipeline import prefetch_to_device
from jaxopt_study.data.pipeline import resolve_cache_dir
from jaxopt_study.data.synthetic import SyntheticDataset
from jaxopt_study.data.wikitext import SourceUnavailableError
from jaxopt_study.data.wikitext import corpus_stats
from jaxopt_study.data.wikitext import count_articles

__all__ = [
    "CacheError",
    "DATASETS",
    "Dataset",
    "PRESETS",
    "Prefetcher",
    "SourceUnavailableError",
    "SyntheticDataset",
    "TRAIN_SAMPLE",
    "TextDataset",
    "build_dataset",
    "check_config",
    "corpus_stats",
    "count_articles",
    "default_config",
    "prefetch_to_device",
    "resolve_cache_dir",
]
