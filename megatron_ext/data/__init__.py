"""Data pipeline: tokenizers, preprocessing, curricula and the data API of the trainer.

The trainer calls (see docs/data.md):
    add_data_args(parser)                      # --data-path, --curriculum, --mock-data, ...
    opts = DataOptions.from_args(namespace)    # frozen, checked; what the data layer takes
    tok = build_tokenizer_from_options(opts); check_vocab(tok, model_vocab_size)
    data = build_pretraining_data(opts, tok, global_batch_size=, seq_length=, train_iters=, seed=)
    data.micro_batches(step, dp_rank, dp_size, micro_batch_size)   # pure in (step, rank)
    data.stage_at(step); data.consumed_tokens_by_source(step)
    data.validation_names(); data.validation_micro_batches(name, n, dp_rank, dp_size, mbs)

Only the light parts are imported eagerly: importing Megatron-Core costs seconds.
"""
import importlib

from megatron_ext.data.args import DataOptions, add_data_args, check_data_options
from megatron_ext.data.errors import DataConfigError

_LAZY = {
    "build_tokenizer": "tokenizer", "build_tokenizer_from_options": "tokenizer",
    "check_vocab": "tokenizer", "tokenizer_info": "tokenizer",
    "DEFAULT_TOKENIZER_MODEL": "tokenizer",
    "load_curriculum": "curriculum", "Curriculum": "curriculum",
    "check_indexed_dataset": "indexed",
    "prepare_sample_corpus": "sample",
    "build_pretraining_data": "pretraining", "PretrainingData": "pretraining",
}
__all__ = ["DataOptions", "add_data_args", "check_data_options", "DataConfigError", *_LAZY]


def __getattr__(name):
    if name in _LAZY:
        return getattr(importlib.import_module(f"{__name__}.{_LAZY[name]}"), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
