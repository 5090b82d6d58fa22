"""Tests for gpipe.train.data: the bundled stdlib corpus, folder corpora, entropy and batching."""

from __future__ import annotations

import math
from pathlib import Path

import pytest
import torch

from gpipe.train.data import Corpus, get_batch, load_corpus, unigram_entropy


@pytest.fixture(scope="module")
def corpus() -> Corpus:
    return load_corpus()


def test_default_corpus_is_nonempty_and_capped():
    c = load_corpus(max_bytes=2**20, max_val_bytes=50_000)
    assert 0 < c.val.numel() <= 50_000
    assert c.train.dtype == torch.uint8 and c.train.dim() == 1
    assert 0 < c.train.numel() <= 2**20
    assert c.val.numel() > 0
    assert "stdlib" in c.description and f"{len(c.train_files)} files" in c.description


def test_default_corpus_is_deterministic(corpus):
    again = load_corpus()
    assert torch.equal(corpus.train, again.train) and torch.equal(corpus.val, again.val)
    assert corpus.train_files == again.train_files and corpus.val_files == again.val_files
    assert list(corpus.train_files) == sorted(corpus.train_files)


def test_default_corpus_excludes_tests_and_site_packages(corpus):
    for rel in corpus.train_files + corpus.val_files:
        parts = Path(rel).parts
        assert rel.endswith(".py")
        assert not {"test", "tests", "idle_test", "site-packages"} & set(parts), rel


def test_train_and_val_are_disjoint_by_file(corpus):
    assert corpus.val_files and corpus.train_files
    assert not set(corpus.train_files) & set(corpus.val_files)
    # Validation is the same set of files whatever the train cap.
    assert load_corpus(max_bytes=100_000).val_files == corpus.val_files


def test_unigram_entropy_of_python_source(corpus):
    h = unigram_entropy(corpus.train)
    # Python source: ≈ 4.6 bits ≈ 3.2 nats per byte (measured: 3.22 nats on CPython 3.11).
    assert 3.0 < h < 3.5
    assert unigram_entropy(torch.arange(256)) == pytest.approx(math.log(256))
    assert unigram_entropy(torch.full((10,), 7, dtype=torch.uint8)) == 0.0
    assert unigram_entropy(torch.tensor([0, 1])) == pytest.approx(math.log(2))
    with pytest.raises(ValueError, match="empty"):
        unigram_entropy(torch.empty(0, dtype=torch.uint8))


def test_get_batch_is_deterministic_and_shifted(corpus):
    rng_before = torch.get_rng_state()
    x, y = get_batch(corpus.train, 4, 32, seed=3, step=5)
    assert torch.equal(torch.get_rng_state(), rng_before)
    x2, y2 = get_batch(corpus.train, 4, 32, seed=3, step=5)
    assert torch.equal(x, x2) and torch.equal(y, y2)
    assert x.shape == y.shape == (4, 32) and x.dtype == y.dtype == torch.int64
    assert torch.equal(x[:, 1:], y[:, :-1])
    x3, _ = get_batch(corpus.train, 4, 32, seed=3, step=6)
    x4, _ = get_batch(corpus.train, 4, 32, seed=4, step=5)
    assert not torch.equal(x, x3) and not torch.equal(x, x4)


def test_get_batch_windows_come_from_the_tokens():
    tokens = torch.arange(1000)
    x, y = get_batch(tokens, 8, 10, seed=0, step=0)
    assert torch.equal(y, x + 1)
    assert torch.equal(x - x[:, :1], torch.arange(10).expand(8, 10))
    assert int(y.max()) <= 999
    # The shortest corpus that fits one window always gives that window.
    x, y = get_batch(torch.arange(11), 2, 10, seed=1, step=2)
    assert torch.equal(x[0], torch.arange(10)) and torch.equal(y[1], torch.arange(1, 11))


def test_get_batch_errors():
    with pytest.raises(ValueError, match="seq_len \\+ 1 = 11"):
        get_batch(torch.arange(10), 1, 10, seed=0, step=0)
    with pytest.raises(ValueError, match="1-D"):
        get_batch(torch.zeros(4, 4), 1, 2, seed=0, step=0)
    with pytest.raises(ValueError, match="positive"):
        get_batch(torch.arange(100), 0, 2, seed=0, step=0)


def test_folder_corpus(tmp_path):
    texts = {f"doc{i}.txt": f"text number {i}\n".encode() * 20 for i in range(10)}
    (tmp_path / "sub").mkdir()
    texts["sub/inner.md"] = b"# nested heading\n" * 5
    for rel, data in texts.items():
        (tmp_path / rel).write_bytes(data)
    (tmp_path / "blob.bin").write_bytes(bytes(range(256)))  # NUL byte: binary, skipped
    (tmp_path / "latin1.txt").write_bytes(b"caf\xe9\n")  # not UTF-8, skipped
    (tmp_path / ".hidden").mkdir()
    (tmp_path / ".hidden" / "secret.txt").write_text("hidden\n")

    c = load_corpus(str(tmp_path), val_fraction=0.2)
    assert set(c.train_files) | set(c.val_files) == set(texts)
    assert not set(c.train_files) & set(c.val_files) and c.val_files
    assert bytes(c.train.tolist()) == b"".join(texts[r] for r in c.train_files)
    assert bytes(c.val.tolist()) == b"".join(texts[r] for r in c.val_files)
    assert str(tmp_path) in c.description
    again = load_corpus(tmp_path, val_fraction=0.2)
    assert torch.equal(c.train, again.train) and c.val_files == again.val_files


def test_single_file_corpus_splits_by_position(tmp_path):
    path = tmp_path / "one.txt"
    data = b"abcdefghij" * 100
    path.write_bytes(data)
    c = load_corpus(path, val_fraction=0.1)
    assert bytes(c.train.tolist()) == data[:900] and bytes(c.val.tolist()) == data[900:]


def test_bad_paths(tmp_path):
    with pytest.raises(FileNotFoundError, match="does not exist"):
        load_corpus(tmp_path / "missing")
    (tmp_path / "blob.bin").write_bytes(b"\x00\x01\x02")
    with pytest.raises(ValueError, match="no usable text"):
        load_corpus(tmp_path)
    with pytest.raises(ValueError, match="not UTF-8"):
        load_corpus(tmp_path / "blob.bin")
    with pytest.raises(ValueError, match="val_fraction"):
        load_corpus(val_fraction=1.0)
