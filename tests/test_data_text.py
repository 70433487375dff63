"""The text task: tokenisers, windows, splits, token files, Austen-6."""

import hashlib
import os

import numpy as np
import pydoc_data.topics
import pytest

from sessa_jax import data
from sessa_jax.data import tokenizers

TRICKY = ("  two spaces, tabs\t\tand\r\nCRLF\n\n\nblank lines 0123456789 "
          "ünïcödé 日本語 \u2581 mark, emoji 🙂 trailing  ")


@pytest.fixture(scope="module")
def corpus_dir(tmp_path_factory):
  """Three documents from the stdlib's pydoc topics."""
  root = tmp_path_factory.mktemp("corpus")
  topics = sorted(pydoc_data.topics.topics.items())
  for k in range(3):
    text = "\n".join(v for _, v in topics[k::3][:12])
    (root / f"doc{k}.txt").write_text(text, encoding="utf-8")
  (root / "tricky.txt").write_text(TRICKY, encoding="utf-8")
  return root


@pytest.fixture(scope="module")
def spm_tokenizer():
  docs = list(pydoc_data.topics.topics.values())[:40]
  return tokenizers.SentencePieceTokenizer.train(docs, 400)


def test_byte_round_trip():
  tok = tokenizers.ByteTokenizer()
  ids = tok.encode(TRICKY)
  assert ids.max() < 256 and len(ids) == len(TRICKY.encode("utf-8"))
  assert tok.decode(ids) == TRICKY
  assert tok.decode(np.append(ids, tok.separator_id)) == TRICKY


def test_sentencepiece_round_trip(spm_tokenizer):
  tok = spm_tokenizer
  assert tok.vocab_size == 400
  for text in [TRICKY] + list(pydoc_data.topics.topics.values())[40:60]:
    ids = tok.encode(text)
    assert tok.decode(ids) == text
  # Not bytes in disguise: the model merges common strings.
  text = pydoc_data.topics.topics["if"]
  assert len(tok.encode(text)) < 0.8 * len(text.encode("utf-8"))


def test_sentencepiece_model_is_cached(tmp_path):
  docs = list(pydoc_data.topics.topics.values())[:10]
  a = tokenizers.SentencePieceTokenizer.train(docs, 400, str(tmp_path))
  (model,) = os.listdir(tmp_path)
  b = tokenizers.SentencePieceTokenizer.train(docs, 400, str(tmp_path))
  assert os.listdir(tmp_path) == [model] and a.fingerprint == b.fingerprint


def _stream(task, split):
  """The stream a split's windows cover: all inputs, then the last target."""
  n = task.num_examples(split)
  exs = [task.example(split, i) for i in range(n)]
  for ex in exs:
    np.testing.assert_array_equal(ex["inputs"][1:], ex["targets"][:-1])
    assert ex["loss_mask"].all()
  return np.concatenate([e["inputs"] for e in exs] + [exs[-1]["targets"][-1:]])


def test_windows_tile_the_stream(corpus_dir):
  task = data.get_task({"task": "text", "path": str(corpus_dir / "doc*.txt"),
                        "seq_len": 64, "val_fraction": 0.1,
                        "test_fraction": 0.2})
  assert task.vocab_size == 257 and task.bytes_per_token < 1
  docs = [(corpus_dir / f"doc{k}.txt").read_bytes() for k in range(3)]
  full = np.concatenate([np.append(np.frombuffer(d, np.uint8), 256)
                         for d in docs])
  parts = [task.streams[s] for s in ("train", "val", "test")]
  np.testing.assert_array_equal(np.concatenate(parts), full)
  assert len(parts[2]) == int(0.2 * len(full))
  assert len(parts[1]) == int(0.1 * len(full))
  for split, stream in zip(("train", "val", "test"), parts):
    n = task.num_examples(split)
    assert n == (len(stream) - 1) // 64
    np.testing.assert_array_equal(_stream(task, split), stream[:n * 64 + 1])
  text = task.tokenizer.decode(task.example("train", 0)["inputs"])
  assert docs[0].decode().startswith(text)


def test_sentencepiece_task_and_separate_split_files(corpus_dir, tmp_path):
  cfg = {"task": "text", "path": str(corpus_dir / "doc0.txt") + ","
         + str(corpus_dir / "doc1.txt"),
         "val_path": str(corpus_dir / "doc2.txt"),
         "test_path": str(corpus_dir / "tricky.txt"), "seq_len": 16,
         "tokenizer": "sentencepiece", "vocab_size": 400}
  task = data.get_task(cfg, workdir=str(tmp_path))
  assert task.vocab_size == 400
  cached = sorted(os.listdir(tmp_path / "tokenizer"))
  assert cached[0].startswith("spm_") and len(cached) == 4
  tok = task.tokenizer
  assert tok.decode(task.streams["test"]) == TRICKY
  val = task.streams["val"]
  assert val[-1] == tok.separator_id
  assert tok.decode(val) == (corpus_dir / "doc2.txt").read_text()
  np.testing.assert_array_equal(_stream(task, "val"),
                                val[:task.num_examples("val") * 16 + 1])
  again = data.get_task(cfg, workdir=str(tmp_path))
  assert sorted(os.listdir(tmp_path / "tokenizer")) == cached
  np.testing.assert_array_equal(again.streams["train"], task.streams["train"])


def test_token_files(tmp_path):
  tokens = np.arange(1000, dtype=np.uint16) % 700
  tokens.tofile(tmp_path / "a.bin")
  tokens[:300].tofile(tmp_path / "b.bin")
  task = data.get_task({"task": "text", "path": str(tmp_path / "*.bin"),
                        "format": "uint16", "vocab_size": 700, "seq_len": 32,
                        "val_fraction": 0.0, "test_fraction": 0.1})
  assert task.vocab_size == 700 and "bits_per_byte" not in task.metrics
  full = np.concatenate([tokens, tokens[:300]])
  np.testing.assert_array_equal(
      np.concatenate([task.streams["train"], task.streams["test"]]), full)
  assert task.num_examples("val") == 0
  with pytest.raises(ValueError,
                     match=r"a.bin: token 699.*data.vocab_size=600"):
    data.get_task({"task": "text", "path": str(tmp_path / "a.bin"),
                   "format": "uint16", "vocab_size": 600})


def test_errors(tmp_path):
  with pytest.raises(ValueError, match=r"data.path: glob '.*nothing\*.txt' "
                     "matches no files"):
    data.get_task({"task": "text", "path": str(tmp_path / "nothing*.txt")})
  (tmp_path / "bad.txt").write_bytes(b"fine\nfine\nbad \xff byte\n")
  with pytest.raises(ValueError, match=r"bad.txt, line 3: not UTF-8"):
    data.get_task({"task": "text", "path": str(tmp_path / "bad.txt")})
  with pytest.raises(ValueError, match="data.tokenizer='bpe' is not one of: "
                     "byte, sentencepiece"):
    data.get_task({"task": "text", "path": "x", "tokenizer": "bpe"})
  with pytest.raises(ValueError,
                     match=r"could not train 300 pieces \(data.vocab"):
    tokenizers.SentencePieceTokenizer.train(["abc" * 9, TRICKY * 3], 300)
  with pytest.raises(ValueError, match="known keys:.*val_fraction"):
    data.get_task({"task": "text", "path": "x", "val_frac": 0.1})


def test_austen_six(austen_dir):
  sums = dict(line.split()[::-1]
              for line in (austen_dir / "SHA256SUMS").read_text().splitlines())
  assert len(sums) == 6
  for name, digest in sums.items():
    got = hashlib.sha256((austen_dir / name).read_bytes()).hexdigest()
    assert got == digest
  d = str(austen_dir)
  task = data.get_task({
      "task": "text", "seq_len": 256,
      "path": ",".join(f"{d}/{n}.txt" for n in (
          "emma", "mansfieldpark", "prideprejudice", "sensesensibility")),
      "val_path": f"{d}/northangerabbey.txt",
      "test_path": f"{d}/persuasion.txt"})
  persuasion = (austen_dir / "persuasion.txt").read_text()
  assert task.tokenizer.decode(task.streams["test"]) == persuasion
  assert len(task.streams["test"]) == len(persuasion.encode()) + 1
  assert task.num_examples("train") == (3_124_764 + 4 - 1) // 256
  batch = next(data.make_iterator(task, "val", batch_size=4, seed=0))
  assert batch["inputs"].shape == (4, 256)


def test_odd_length_token_file_is_refused(tmp_path):
  # Old code: numpy read it silently, dropping the last byte.
  (tmp_path / "a.bin").write_bytes(b"\0" * 2001)
  with pytest.raises(ValueError, match=r"a.bin: 2001 bytes is not a whole "
                                       "number of uint16 tokens"):
    data.get_task({"task": "text", "path": str(tmp_path / "a.bin"),
                   "format": "uint16", "vocab_size": 700})
