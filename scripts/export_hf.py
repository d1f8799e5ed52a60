"""Exports a run's latest checkpoint to the Hugging Face GPT-2 format (config.json + safetensors).

  python scripts/export_hf.py --workdir=runs/adamw_tiny            # -> runs/adamw_tiny/hf/
  python -c "import transformers as t; t.GPT2LMHeadModel.from_pretrained('runs/adamw_tiny/hf')"

Only pre-LN, multi-head-attention runs are exportable (jaxopt_study/export_hf.py says why and
gives the weight mapping). --crop_vocab drops the padded vocabulary rows (config.data.vocab_size
rows are kept), which lets a tokenizer of exactly that size match the embedding.
"""

import argparse
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

# pylint: disable=g-import-not-at-top,wrong-import-position
from jaxopt_study import export_hf
from jaxopt_study import restore
from jaxopt_study.models import gpt


def main(argv=None):
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--workdir", required=True, help="the training run's --workdir")
  parser.add_argument("--out", default="", help="output directory (default: WORKDIR/hf)")
  parser.add_argument("--crop_vocab", action="store_true",
                      help="keep only config.data.vocab_size rows (drop the padding)")
  args = parser.parse_args(argv)
  config = restore.load_config(args.workdir)
  export_hf.check_exportable(gpt.from_config(config.model, vocab_size=1))  # before any loading
  run = restore.load_run(args.workdir)
  vocab = config.data.vocab_size if args.crop_vocab else None
  out = export_hf.export(run.params, run.model_config, args.out or os.path.join(args.workdir, "hf"),
                         vocab_size=vocab)
  print(f"step {run.step} exported to {out}")


if __name__ == "__main__":
  main()
