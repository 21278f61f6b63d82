"""Training small decoders from scratch (offline corpus, local tokenizer, Hugging Face format)."""

from tl_sinks.train.corpus import DEFAULT_PACKAGES, Corpus, build_corpus
from tl_sinks.train.trainer import TrainConfig, build_model, lr_at, prepare_data, train, train_tokenizer

__all__ = [
    "DEFAULT_PACKAGES",
    "Corpus",
    "TrainConfig",
    "build_corpus",
    "build_model",
    "lr_at",
    "prepare_data",
    "train",
    "train_tokenizer",
]
