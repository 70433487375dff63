"""Tests of the SymbolSoup generator, tokeniser, TSV reader and writer."""

import collections
import csv
import os
import pathlib
import random
import subprocess
import sys

import numpy as np
import pytest

from sessa_jax import data
from sessa_jax.data import base
from sessa_jax.data import symbol_soup as ss

GOLDEN = "symbol_soup_official_train40.tsv"
REPO = pathlib.Path(__file__).resolve().parents[1]


def _letter_lines(text):
  lines = text.split("\n")
  assert [lines[i] for i in (0, 2, 4, 6, 8, 10)] == [
      "<bos>", "<sep1>", "<sep2>", "<sep1>", "<sep2>", "<sep> <label>"]
  return [np.array([ss.ALPHABET.index(c) for c in lines[i].split(" ")])
          for i in (1, 3, 5, 7, 9)]


def test_vocabulary():
  assert len(ss.VOCAB) == 46 and ss.VOCAB[0] == "<pad>"
  task = data.get_task({"task": "symbol_soup"})
  assert task.vocab_size == 46
  classes = [task.special_tokens[f"CLASS_{k}"] for k in range(20)]
  assert classes == list(range(26, 46))
  assert {"<bos>", "<sep1>", "<sep2>", "<sep>", "<label>", "<eos>",
          "[MASK]"} <= set(task.special_tokens)


def test_styles_follow_the_published_seeds():
  left, right = ss.styles()
  assert len(left) == 4 and len(right) == 5
  # Each style shuffles a fresh copy of the alphabet with one shared Random.
  rng = random.Random(456)
  for style in right:
    order = list(range(16))
    rng.shuffle(order)
    assert style.order == tuple(order)
  style = left[0]
  p, s = style.primaries, style.secondaries
  weights = np.diff(np.array((0.0,) + style.unigram_cdf))
  assert weights[list(p)].tolist() == [3.0] * 4
  assert weights[list(s)].tolist() == [2.0] * 4
  assert sorted(weights)[:8] == [1.0] * 8
  bigram = np.diff(np.array(style.bigram_cdf), prepend=0.0, axis=1)
  assert bigram[p[0], p[1]] == 12.0 and bigram[p[3], p[0]] == 12.0
  assert bigram[p[0], p[0]] == 12.0 and bigram[s[2], s[2]] == 8.0
  assert bigram[p[1], s[1]] == 8.0 and bigram[s[1], p[1]] == 12.0
  assert bigram[p[0], p[2]] == 3.0 and bigram[s[0], s[1]] == 2.0
  assert len(ss.MOTIFS) == 39
  motif_w = np.diff(np.array((0.0,) + style.motif_cdf[5]))
  for motif, w in zip(ss.MOTIFS, motif_w):
    expected = (1 + 0.9 * len(set(motif) & set(p))
                + 0.5 * len(set(motif) & set(s)))
    assert w == pytest.approx(expected)


def test_lengths_stay_in_bounds_over_thousands_of_draws():
  for lo_tok, hi_tok in [(400, 600), (101, 140), (20, 30)]:
    seen = set()
    for index in range(3000):
      rng = base.example_rng(0, "train", index)
      total, left, right, n0, n1, n2 = ss.sample_lengths(rng, lo_tok, hi_tok)
      assert lo_tok <= 2 * total + 13 <= hi_tok
      assert min(left, right, n0, n1, n2) >= 1
      assert left + right + n0 + n1 + n2 == total
      noise = n0 + n1 + n2
      assert max(3, int(0.3 * total)) <= noise <= max(
          max(3, int(0.3 * total)), int(0.6 * total))
      seen.add(2 * total + 13)
    lo, hi = ss.letter_range(lo_tok, hi_tok)
    assert min(seen) == 2 * lo + 13 and max(seen) == 2 * hi + 13


def test_examples_have_2m_plus_13_tokens_and_round_trip():
  for index in range(150):
    text, name = ss.generate_text(1, "val", index)
    ids = ss.tokenize(text)
    blocks = _letter_lines(text)
    assert len(ids) == 2 * sum(len(b) for b in blocks) + 13
    assert 400 <= len(ids) <= 600
    assert ss.detokenize(ids) == text
    gen_blocks, label = ss.generate_letters(1, "val", index)
    assert name == f"CLASS_{label}"
    np.testing.assert_array_equal(ss.blocks_to_ids(gen_blocks), ids)


def test_classes_balanced_per_split():
  for split, n in [("train", 400), ("test", 200)]:
    counts = collections.Counter(ss.class_of(3, split, i) for i in range(n))
    assert sorted(counts) == list(range(20))
    assert set(counts.values()) == {n // 20}
  a = [ss.class_of(3, "train", i) for i in range(40)]
  b = [ss.class_of(3, "val", i) for i in range(40)]
  assert a != b and a[:20] != list(range(20))


def test_primaries_more_frequent_in_style_blocks_than_in_noise():
  excess = {"style": [0.0, 0], "noise": [0.0, 0]}
  for index in range(200):
    blocks, label = ss.generate_letters(0, "train", index)
    left, right = ss.class_styles(label)
    prim = set(left.primaries) | set(right.primaries)
    for k, block in enumerate(blocks):
      kind = "style" if k in (1, 3) else "noise"
      excess[kind][0] += sum(int(x) in prim for x in block)
      excess[kind][0] -= len(prim) / 16 * len(block)
      excess[kind][1] += len(block)
  # Noise letters are uniform: the classes' primaries only as often as chance.
  assert abs(excess["noise"][0] / excess["noise"][1]) < 0.02
  assert excess["style"][0] / excess["style"][1] > 0.05
  # In each style's own blocks its 4 primaries take well over 4/16 of the
  # letters (motifs, which ignore the style's letters, dilute them).
  rng = np.random.default_rng(0)
  for style in ss.styles()[0] + ss.styles()[1]:
    block = np.concatenate(
        [ss.stylized_block(style, 300, rng) for _ in range(20)])
    freq = np.bincount(block, minlength=16) / len(block)
    order = list(style.order)
    assert freq[order[:4]].sum() > 0.32
    assert (freq[order[:4]].mean() > freq[order[4:8]].mean()
            > freq[order[8:]].mean())


def test_same_example_in_a_new_process():
  code = ("from sessa_jax.data import symbol_soup as ss, get_task;"
          "t = get_task({'task': 'symbol_soup', 'seed': 7});"
          "print(repr(ss.generate_text(7, 'val', 123)));"
          "print(t.example('test', 45)['inputs'].tolist())")
  out = subprocess.run([sys.executable, "-c", code], cwd=REPO, check=True,
                       capture_output=True, text=True).stdout.splitlines()
  assert out[0] == repr(ss.generate_text(7, "val", 123))
  task = data.get_task({"task": "symbol_soup", "seed": 7})
  assert out[1] == str(task.example("test", 45)["inputs"].tolist())
  assert ss.generate_text(8, "val", 123) != ss.generate_text(7, "val", 123)


def test_example_predicts_the_class_at_label():
  task = data.get_task({"task": "symbol_soup", "num_train": 40})
  ex = task.example("train", 5)
  ids, label = task.tokens("train", 5)
  (pos,) = np.flatnonzero(ex["loss_mask"])
  assert pos == len(ids) - 1
  assert ex["inputs"][pos] == ss.TOKEN_IDS["<label>"]
  assert ex["targets"][pos] == ss.TOKEN_IDS[f"CLASS_{label}"]
  assert (ex["inputs"][len(ids):] == 0).all()


def test_reads_the_official_file(assets_dir):
  path = str(assets_dir / GOLDEN)
  ids, labels = ss.read_tsv(path)
  assert len(ids) == 40
  assert sorted(collections.Counter(labels.tolist()).values()) == [2] * 20
  with open(path, newline="", encoding="utf-8") as f:
    rows = list(csv.reader(f, delimiter="\t"))[1:]
  for x, label, (text, answer) in zip(ids, labels, rows):
    assert answer == f"CLASS_{label}"
    blocks = _letter_lines(text)
    assert len(x) == 2 * sum(len(b) for b in blocks) + 13
    assert 400 <= len(x) <= 600
    # Our generator's token ids for these letter blocks equal the reader's.
    np.testing.assert_array_equal(ss.blocks_to_ids(blocks), x)
    assert ss.detokenize(x) == text
  task = data.get_task({"task": "symbol_soup", "path": path})
  assert task.num_examples("train") == 40
  ex = task.example("train", 0)
  assert ex["targets"][ex["loss_mask"] > 0] == [26 + labels[0]]


def test_writer_and_directory_reader_round_trip(tmp_path):
  ss.main(["--output_dir", str(tmp_path), "--seed", "4", "--num_train", "30",
           "--num_val", "10", "--num_test", "20"])
  assert sorted(os.listdir(tmp_path)) == [
      "symbol_soup_test.tsv", "symbol_soup_train.tsv", "symbol_soup_val.tsv"]
  head = (tmp_path / "symbol_soup_val.tsv").read_bytes()[:20]
  assert head.startswith(b'Text\tAnswer\r\n"<bos>\n')
  files = data.get_task({"task": "symbol_soup", "path": str(tmp_path)})
  gen = data.get_task({"task": "symbol_soup", "seed": 4})
  for split, n in [("train", 30), ("val", 10), ("test", 20)]:
    assert files.num_examples(split) == n
    for i in (0, n - 1):
      a, b = files.example(split, i), gen.example(split, i)
      for k in a:
        np.testing.assert_array_equal(a[k], b[k])


def _write(path, content):
  path.write_text(content, encoding="utf-8", newline="")
  return str(path)


def test_tsv_errors_name_file_and_line(tmp_path):
  text, _ = ss.generate_text(0, "train", 0)
  good = f'"{text}"\tCLASS_3\r\n'
  path = _write(tmp_path / "a.tsv", "Text\tLabel\r\n" + good)
  with pytest.raises(ValueError,
                     match=r"a.tsv, line 1: missing column 'Answer'"):
    ss.read_tsv(path)
  path = _write(tmp_path / "b.tsv", "Text\tAnswer\r\n" + good
                + good.replace("CLASS_3", "CLASS_20"))
  with pytest.raises(ValueError,
                     match=r"b.tsv, line 13: unknown class 'CLASS_20'"):
    ss.read_tsv(path)
  bad = good.replace("<sep2>\n", "<sep2>\nq ", 1)
  path = _write(tmp_path / "c.tsv", "Text\tAnswer\r\n" + good + bad)
  with pytest.raises(ValueError, match=r"c.tsv, line 18: line 6 of the text, "
                     r"column 1: character 'q'"):
    ss.read_tsv(path)
  path = _write(tmp_path / "d.tsv", "Text\tAnswer\r\n" + good
                + good.replace("\tCLASS_3", ""))
  with pytest.raises(ValueError, match=r"d.tsv, line 13: 1 fields, expected 2"):
    ss.read_tsv(path)


def test_directory_without_a_split_names_the_glob(tmp_path):
  ss.write_tsv(str(tmp_path / "x_train.tsv"), [ss.generate_text(0, "train", 0)])
  with pytest.raises(ValueError, match=r"\*_val.tsv"):
    data.get_task({"task": "symbol_soup", "path": str(tmp_path)})


def test_seq_len_shorter_than_examples_is_an_error(assets_dir):
  with pytest.raises(ValueError, match=r"599 tokens.*data.seq_len=512"):
    data.get_task({"task": "symbol_soup", "seq_len": 512})
  with pytest.raises(ValueError, match=r"official_train40.tsv has 599 tokens.*"
                     r"data.seq_len=500"):
    data.get_task({"task": "symbol_soup", "seq_len": 500,
                   "path": str(assets_dir / GOLDEN)})


def test_impossible_token_bounds_are_an_error():
  with pytest.raises(ValueError, match=r"\[400, 400\]"):
    data.get_task({"task": "symbol_soup", "min_tokens": 400, "max_tokens": 400})


@pytest.mark.parametrize("line,message", [
    (b"\xff\xfe\tCLASS_0\n", "line 2: not UTF-8"),
    (b"a" * 131_073 + b"\tCLASS_0\n", "line 2: field larger than field limit"),
    (b"\tCLASS_0\n", "line 2: empty Text field"),
])
def test_bad_tsv_lines_name_file_and_line(tmp_path, line, message):
  # Old code: a bare UnicodeDecodeError or csv.Error, and an empty text
  # trained as all padding.
  path = tmp_path / "bad.tsv"
  path.write_bytes(b"Text\tAnswer\n" + line)
  with pytest.raises(ValueError, match=f"{path}, {message}"):
    ss.read_tsv(str(path))
