"""Data: synthetic Zipfian/shifting corpus, WikiText (hub or local), SentencePiece, packing.

    ds = build_dataset(config.data, seq_len=T, global_batch_size=B, seed=config.seed,
                       process_index=jax.process_index(), process_count=jax.process_count(),
                       num_train_steps=config.num_steps)
    batches = prefetch_to_device(ds.train_batch, start_step, batch_sharding, config.prefetch)
"""

from jaxopt_study.data.pipeline import DATASETS
from jaxopt_study.data.pipeline import Dataset
from jaxopt_study.data.pipeline import Prefetcher
from jaxopt_study.data.pipeline import TextDataset
from jaxopt_study.data.pipeline import build_dataset
from jaxopt_study.data.pipeline import default_config
from jaxopt_study.data.pipeline import prefetch_to_device
from jaxopt_study.data.pipeline import resolve_cache_dir
from jaxopt_study.data.synthetic import SyntheticDataset
from jaxopt_study.data.wikitext import SourceUnavailableError
from jaxopt_study.data.wikitext import corpus_stats
from jaxopt_study.data.wikitext import count_articles

__all__ = [
    "DATASETS",
    "Dataset",
    "Prefetcher",
    "SourceUnavailableError",
    "SyntheticDataset",
    "TextDataset",
    "build_dataset",
    "corpus_stats",
    "count_articles",
    "default_config",
    "prefetch_to_device",
    "resolve_cache_dir",
]
