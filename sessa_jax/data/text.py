"""Language modelling on local files: UTF-8 text or flat token files.

Documents (one per file) are tokenised, each followed by the separator token,
concatenated into one stream per split, and cut into windows of seq_len + 1
tokens that overlap by one token: window i is stream[i T : i T + T + 1], so
its targets stream[i T + 1 : (i + 1) T + 1] tile the stream without gaps.

Splits come from separate globs (`val_path`, `test_path`) or, where those are
empty, from the tail of the training stream (`val_fraction`, `test_fraction`).
`path` and the split globs may list several globs separated by commas.
"""

from __future__ import annotations

import dataclasses
import glob
import hashlib
import os

import numpy as np

from sessa_jax import checks
from sessa_jax.data import base
from sessa_jax.data import tokenizers

TOKENIZERS = ("byte", "sentencepiece")
FORMATS = ("text", "uint16", "uint32")


@dataclasses.dataclass(frozen=True)
class TextConfig(base.TaskConfig):
  """Knobs of the text task.

  Attributes:
    path: comma-separated globs of the training files.
    val_path: globs of the validation files; empty: a fraction of `path`.
    test_path: globs of the test files; empty: a fraction of `path`.
    val_fraction: share of the training stream held out for validation.
    test_fraction: share of the training stream held out for test.
    format: `text` (UTF-8) or flat token files `uint16` / `uint32`.
    tokenizer: `byte` or `sentencepiece` (text format only).
    vocab_size: sentencepiece pieces to train, or the vocabulary of token
      files (required there).
    spm_model: an existing sentencepiece model to use instead of training.
    cache_dir: where trained models and token streams are cached; empty: the
      `tokenizer/` folder of the workdir, if one is given.
  """

  path: str = ""
  val_path: str = ""
  test_path: str = ""
  val_fraction: float = 0.05
  test_fraction: float = 0.05
  format: str = "text"
  tokenizer: str = "byte"
  vocab_size: int = 0
  spm_model: str = ""
  cache_dir: str = ""


def expand_globs(globs: str, key: str) -> list[str]:
  """Sorted files matched by comma-separated globs; each must match a file."""
  files = []
  for pattern in (g.strip() for g in globs.split(",")):
    matches = sorted(p for p in glob.glob(os.path.expanduser(pattern))
                     if os.path.isfile(p))
    if not matches:
      raise ValueError(f"data.{key}: glob {pattern!r} matches no files")
    files += [m for m in matches if m not in files]
  return files


def read_text(path: str) -> str:
  """Reads a UTF-8 file; a bad byte is an error naming file and line."""
  with open(path, "rb") as f:
    raw = f.read()
  try:
    return raw.decode("utf-8")
  except UnicodeDecodeError as e:
    line = raw.count(b"\n", 0, e.start) + 1
    raise ValueError(f"{path}, line {line}: not UTF-8 text ({e.reason} at "
                     f"byte {e.start})") from None


class Text(base.Task):
  """Next-token prediction on windows of a concatenated token stream."""

  name = "text"
  Config = TextConfig
  metrics = ("perplexity", "bits_per_byte", "accuracy")
  uses_workdir = True
  path_use = "required"

  def __init__(self, cfg: TextConfig, workdir: str | None = None):
    super().__init__(cfg)
    checks.one_of("data", "format", cfg.format, FORMATS)
    checks.one_of("data", "tokenizer", cfg.tokenizer, TOKENIZERS)
    held_out = {"val": cfg.val_fraction, "test": cfg.test_fraction}
    if min(held_out.values()) < 0 or sum(held_out.values()) >= 1:
      raise ValueError(
          "data.val_fraction and data.test_fraction must be >= 0 with a sum "
          f"below 1, got {cfg.val_fraction} and {cfg.test_fraction}")
    self._cache_dir = cfg.cache_dir or (
        os.path.join(workdir, "tokenizer") if workdir else None)
    files = {"train": expand_globs(cfg.path, "path")}
    for split in ("val", "test"):
      key = f"{split}_path"
      if getattr(cfg, key):
        files[split] = expand_globs(getattr(cfg, key), key)
        held_out[split] = 0.0
    self._sources = {}  # For error messages: where each split comes from.
    for split in base.SPLITS:
      key = "path" if split == "train" else f"{split}_path"
      if split in files:
        shown = ", ".join(files[split][:3]) + (
            ", ..." if len(files[split]) > 3 else "")
        self._sources[split] = f"data.{key}={getattr(cfg, key)!r}: {shown}"
      else:
        self._sources[split] = f"held out from data.path={cfg.path!r}"

    if cfg.format == "text":
      docs = {split: [read_text(f) for f in fs] for split, fs in files.items()}
      self.tokenizer = self._make_tokenizer(docs["train"])
      streams = {split: self._encode(d) for split, d in docs.items()}
      num_bytes = sum(len(d.encode("utf-8"))
                      for ds in docs.values() for d in ds)
      self.bytes_per_token = num_bytes / sum(len(s) for s in streams.values())
    else:
      if cfg.vocab_size < 1:
        raise ValueError(
            f"data.vocab_size must give the vocabulary of {cfg.format} token "
            "files")
      self.tokenizer = None
      self.metrics = ("perplexity", "accuracy")
      streams = {split: self._read_tokens(fs) for split, fs in files.items()}

    train = streams["train"]
    cut_test = len(train) - int(held_out["test"] * len(train))
    cut_val = cut_test - int(held_out["val"] * len(train))
    self.streams = {
        "train": train[:cut_val],
        "val": streams.get("val", train[cut_val:cut_test]),
        "test": streams.get("test", train[cut_test:]),
    }

  def _make_tokenizer(self, train_docs: list[str]):
    cfg = self.cfg
    if cfg.tokenizer == "byte":
      return tokenizers.ByteTokenizer()
    if cfg.spm_model:
      return tokenizers.SentencePieceTokenizer.load(cfg.spm_model)
    checks.at_least("data", cfg, ("vocab_size",), minimum=260)
    return tokenizers.SentencePieceTokenizer.train(
        train_docs, cfg.vocab_size, self._cache_dir)

  def _encode(self, docs: list[str]) -> np.ndarray:
    """Token stream of documents, each followed by the separator."""
    cache = None
    if self._cache_dir and self.cfg.tokenizer != "byte":
      digest = hashlib.sha256(self.tokenizer.fingerprint.encode())
      for doc in docs:
        digest.update(hashlib.sha256(doc.encode("utf-8")).digest())
      cache = os.path.join(self._cache_dir,
                           f"tokens_{digest.hexdigest()[:16]}.npy")
      if os.path.exists(cache):
        return np.load(cache)
    sep = np.asarray([self.tokenizer.separator_id], np.int32)
    parts = [p for doc in docs for p in (self.tokenizer.encode(doc), sep)]
    dtype = np.uint16 if self.tokenizer.vocab_size <= 2**16 else np.uint32
    stream = np.concatenate(parts).astype(dtype)
    if cache:
      os.makedirs(self._cache_dir, exist_ok=True)
      tmp = f"{cache}.tmp{os.getpid()}.npy"
      np.save(tmp, stream)
      os.replace(tmp, cache)
    return stream

  def _read_tokens(self, files: list[str]) -> np.ndarray:
    parts = []
    itemsize = np.dtype(self.cfg.format).itemsize
    for path in files:
      size = os.path.getsize(path)
      if size % itemsize:
        raise ValueError(
            f"{path}: {size} bytes is not a whole number of "
            f"{self.cfg.format} tokens ({itemsize} bytes each); is "
            "data.format right?")
      tokens = np.fromfile(path, np.dtype(self.cfg.format))
      if tokens.size and tokens.max() >= self.cfg.vocab_size:
        raise ValueError(
            f"{path}: token {tokens.max()} at position {tokens.argmax()} is "
            f"not below data.vocab_size={self.cfg.vocab_size}")
      parts.append(tokens)
    return np.concatenate(parts)

  @property
  def vocab_size(self) -> int:
    if self.tokenizer is None:
      return self.cfg.vocab_size
    return self.tokenizer.vocab_size

  def num_examples(self, split: str) -> int:
    base.check_split(split)
    return max(0, (len(self.streams[split]) - 1) // self.seq_len)

  def source(self, split: str) -> str:
    base.check_split(split)
    tokens = len(self.streams[split])
    return f"{self._sources[split]}; {tokens} tokens"

  def example(self, split: str, index: int) -> dict[str, np.ndarray]:
    base.check_index(split, index, self.num_examples(split))
    start = index * self.seq_len
    window = self.streams[split][start:start + self.seq_len + 1]
    return base.lm_example(window.astype(np.int32), self.seq_len)
