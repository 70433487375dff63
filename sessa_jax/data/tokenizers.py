"""Lossless text tokenisers: UTF-8 bytes, or sentencepiece trained locally.

Both satisfy decode(encode(x)) == x for any string x and reserve one id,
`separator_id`, that the text task puts between documents.
"""

from __future__ import annotations

import hashlib
import io
import os
from typing import Iterable, Sequence

import numpy as np
import sentencepiece as spm

# Every trainer argument that decides the model, so that a cached model is only
# reused for the same settings. byte_fallback spells any character outside the
# pieces as UTF-8 bytes; identity normalisation and no whitespace or dummy-
# prefix rewriting keep every character as it is.
SPM_SETTINGS = (
    ("model_type", "bpe"),
    ("byte_fallback", True),
    ("character_coverage", 0.9995),
    ("normalization_rule_name", "identity"),
    ("remove_extra_whitespaces", False),
    ("add_dummy_prefix", False),
    ("split_digits", True),
    ("allow_whitespace_only_pieces", True),
    ("max_sentence_length", 16384),
    ("input_sentence_size", 2_000_000),
    ("shuffle_input_sentence", True),
    ("seed_sentencepiece_size", 200_000),
    ("unk_id", 0),
    ("bos_id", -1),
    ("eos_id", 1),
    ("pad_id", -1),
    ("num_threads", 2),
    ("minloglevel", 2),
)


_SPACE_MARK = "\u2581"


class ByteTokenizer:
  """UTF-8 bytes as ids 0..255; id 256 separates documents."""

  separator_id = 256
  vocab_size = 257
  fingerprint = "bytes"

  def encode(self, text: str) -> np.ndarray:
    return np.frombuffer(text.encode("utf-8"), np.uint8).astype(np.int32)

  def decode(self, ids: Sequence[int] | np.ndarray) -> str:
    ids = np.asarray(ids)
    return ids[ids < 256].astype(np.uint8).tobytes().decode(
        "utf-8", errors="replace")


class SentencePieceTokenizer:
  """A sentencepiece BPE model with byte fallback; eos separates documents."""

  def __init__(self, model_proto: bytes):
    self._proto = model_proto
    self._sp = spm.SentencePieceProcessor(model_proto=model_proto)
    self.separator_id = self._sp.eos_id()
    self.vocab_size = self._sp.get_piece_size()
    self.fingerprint = "spm-" + hashlib.sha256(model_proto).hexdigest()[:16]
    self._space_mark_ids = [self._sp.piece_to_id(f"<0x{b:02X}>")
                            for b in _SPACE_MARK.encode("utf-8")]

  def __getstate__(self):
    return {"model_proto": self._proto}

  def __setstate__(self, state):
    self.__init__(state["model_proto"])

  @classmethod
  def train(cls, texts: Iterable[str], vocab_size: int,
            cache_dir: str | None = None) -> SentencePieceTokenizer:
    """Trains a model on the lines of `texts`, or loads it from the cache.

    Args:
      texts: the training documents.
      vocab_size: number of pieces, including the 256 byte pieces.
      cache_dir: directory for `spm_<hash>.model`, keyed by the training text
        and settings; None trains in memory without caching.

    Returns:
      The tokeniser.
    """
    texts = list(texts)
    digest = hashlib.sha256(repr((SPM_SETTINGS, vocab_size)).encode())
    for text in texts:
      digest.update(hashlib.sha256(text.encode("utf-8")).digest())
    path = None
    if cache_dir:
      path = os.path.join(cache_dir, f"spm_{digest.hexdigest()[:16]}.model")
      if os.path.exists(path):
        with open(path, "rb") as f:
          return cls(f.read())
    lines = (line for text in texts for line in text.split("\n") if line)
    buffer = io.BytesIO()
    try:
      spm.SentencePieceTrainer.train(
          sentence_iterator=lines, model_writer=buffer, vocab_size=vocab_size,
          **dict(SPM_SETTINGS))
    except RuntimeError as e:
      raise ValueError(
          f"sentencepiece could not train {vocab_size} pieces (data.vocab_size)"
          f" on this text: {e}") from None
    proto = buffer.getvalue()
    if path:
      os.makedirs(cache_dir, exist_ok=True)
      tmp = f"{path}.tmp{os.getpid()}"
      with open(tmp, "wb") as f:
        f.write(proto)
      os.replace(tmp, path)
    return cls(proto)

  @classmethod
  def load(cls, path: str) -> SentencePieceTokenizer:
    with open(path, "rb") as f:
      return cls(f.read())

  def encode(self, text: str) -> np.ndarray:
    # sentencepiece reads U+2581 as its whitespace mark; spell it in bytes.
    parts = [self._sp.encode(part) for part in text.split(_SPACE_MARK)]
    ids = parts[0]
    for part in parts[1:]:
      ids += self._space_mark_ids + part
    return np.asarray(ids, np.int32)

  def decode(self, ids: Sequence[int] | np.ndarray) -> str:
    ids = [int(i) for i in ids if int(i) != self.separator_id]
    return self._sp.decode(ids)
