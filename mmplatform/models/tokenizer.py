"""A word-level tokenizer built locally from the training captions with ``tokenizers`` (no hub needed).

BERT-style normalisation (lower case, accents stripped) and pre-tokenisation; ``[CLS] ... [SEP]`` around
each text. The decoder uses ``[CLS]`` as its start token and ``[SEP]`` as its end token.

Why word-level and counted here rather than a trained WordPiece: the WordPiece trainer breaks frequency
ties in hash order, so its vocabulary (and every id) changed between processes, and with it the model a
fixed seed gives. Counting words ourselves and ordering them (frequency, then text) is deterministic;
captions of a closed vocabulary (the synthetic scenes) are covered exactly, and words outside the
``vocab_size`` most frequent become ``[UNK]``. Models from the hub bring their own tokenizer.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Iterable
from pathlib import Path

from tokenizers import Tokenizer, decoders, models, normalizers, pre_tokenizers, processors
from transformers import PreTrainedTokenizerFast

SPECIAL = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"]


def train_tokenizer(texts: Iterable[str], vocab_size: int = 512) -> PreTrainedTokenizerFast:
    normalizer = normalizers.BertNormalizer(lowercase=True, strip_accents=True)
    pre_tokenizer = pre_tokenizers.BertPreTokenizer()
    counts: Counter[str] = Counter()
    for text in texts:
        counts.update(w for w, _ in pre_tokenizer.pre_tokenize_str(normalizer.normalize_str(text)))
    words = sorted(counts, key=lambda w: (-counts[w], w))[: max(0, vocab_size - len(SPECIAL))]
    vocab = {t: i for i, t in enumerate(SPECIAL + sorted(words))}
    tok = Tokenizer(models.WordLevel(vocab=vocab, unk_token="[UNK]"))
    tok.normalizer = normalizer
    tok.pre_tokenizer = pre_tokenizer
    tok.decoder = decoders.WordPiece()  # joins words with spaces, glues punctuation-free pieces back
    tok.post_processor = processors.TemplateProcessing(
        single="[CLS] $A [SEP]", special_tokens=[("[CLS]", vocab["[CLS]"]), ("[SEP]", vocab["[SEP]"])]
    )
    return PreTrainedTokenizerFast(
        tokenizer_object=tok, unk_token="[UNK]", pad_token="[PAD]", cls_token="[CLS]",
        sep_token="[SEP]", mask_token="[MASK]",
    )


def save_tokenizer(tok: PreTrainedTokenizerFast, path: str | Path) -> None:
    tok.save_pretrained(str(path))


def load_tokenizer(path: str | Path) -> PreTrainedTokenizerFast:
    return PreTrainedTokenizerFast.from_pretrained(str(path))
