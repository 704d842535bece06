"""The built-in task: corpus split, data= handling, batches, model, bits-per-byte eval."""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import pytest
import torch

from node.lm_task import (
    EVAL_ONE_IN,
    MAX_CORPUS_BYTES,
    Batcher,
    LMConfig,
    _load_cached,
    build_model,
    count_params,
    eval_starts,
    evaluate_bpb,
    is_eval_path,
    lm_loss,
    load_corpus,
    train_step,
    warmup_cosine,
)

TINY = LMConfig(context=16, d_model=32, n_layer=2, n_head=2)


def _contains(haystack: np.ndarray, needle: bytes) -> bool:
    return needle in haystack.tobytes()


def _make_folder(root: Path, n: int) -> list[str]:
    """n text files, each with a unique marker, in two subfolders; returns their relative paths."""
    rels = []
    for i in range(n):
        rel = f"{'a' if i % 2 else 'b'}/doc{i:03d}.txt"
        (root / rel).parent.mkdir(parents=True, exist_ok=True)
        (root / rel).write_text(f"<<marker-{i:03d}>> some text about file {i}\n" * 3)
        rels.append(rel)
    return rels


# ---- corpus ----------------------------------------------------------------------------------


def test_stdlib_corpus_loads_split_and_is_cached():
    corpus = load_corpus(None)
    assert corpus.source.startswith("stdlib:")
    assert corpus.train.dtype == np.uint8 and corpus.eval.dtype == np.uint8
    assert len(corpus.train) + len(corpus.eval) <= MAX_CORPUS_BYTES
    assert len(corpus.train) > 1_000_000 and len(corpus.eval) > 10_000
    # About 1 file in 20 is held out (binomial; hundreds of files keep it well inside 2-10%).
    frac = corpus.n_eval_files / (corpus.n_train_files + corpus.n_eval_files)
    assert 0.02 < frac < 0.10
    assert load_corpus(None) is corpus  # cached: the second call costs nothing
    assert not corpus.train.flags.writeable  # nobody can corrupt the shared cache


def test_stdlib_split_is_deterministic_across_reloads():
    first = load_corpus(None)
    _load_cached.cache_clear()
    second = load_corpus(None)
    assert second is not first
    assert np.array_equal(first.train, second.train)
    assert np.array_equal(first.eval, second.eval)


def test_is_eval_path_is_the_sha256_rule():
    import hashlib

    for rel in ["os.py", "json/decoder.py", "a/b/c.txt"]:
        h = int.from_bytes(hashlib.sha256(rel.encode()).digest()[:8], "big")
        assert is_eval_path(rel) == (h % EVAL_ONE_IN == 0)


def test_folder_split_is_disjoint_and_follows_the_path_hash(tmp_path):
    rels = _make_folder(tmp_path, 100)
    expected_eval = {r for r in rels if is_eval_path(r)}
    assert 0 < len(expected_eval) < 100  # the fixture exercises both sides
    corpus = load_corpus(tmp_path)
    assert corpus.n_eval_files == len(expected_eval)
    assert corpus.n_train_files == 100 - len(expected_eval)
    for i, rel in enumerate(rels):
        marker = f"<<marker-{i:03d}>>".encode()
        in_train, in_eval = _contains(corpus.train, marker), _contains(corpus.eval, marker)
        assert in_train != in_eval, rel  # every file is on exactly one side
        assert in_eval == (rel in expected_eval)


def test_folder_skips_binary_and_hidden_files(tmp_path):
    _make_folder(tmp_path, 40)
    (tmp_path / "blob.bin").write_bytes(b"\x00\x01BINARY-MARKER\x00" * 10)
    (tmp_path / "latin1.txt").write_bytes(b"caf\xe9 LATIN-MARKER")  # not UTF-8
    (tmp_path / ".git").mkdir()
    (tmp_path / ".git" / "config").write_text("HIDDEN-MARKER")
    corpus = load_corpus(str(tmp_path))
    everything = corpus.train.tobytes() + corpus.eval.tobytes()
    assert b"BINARY-MARKER" not in everything
    assert b"LATIN-MARKER" not in everything
    assert b"HIDDEN-MARKER" not in everything
    assert b"<<marker-000>>" in everything


def test_small_folder_falls_back_to_a_position_split(tmp_path):
    # One file: a 1-in-20 hash split would leave one side empty.
    _make_folder(tmp_path, 1)
    corpus = load_corpus(tmp_path)
    total = len(corpus.train) + len(corpus.eval)
    assert len(corpus.eval) == total // EVAL_ONE_IN
    assert corpus.n_train_files == corpus.n_eval_files == 1


def test_single_file_splits_by_position(tmp_path):
    text = bytes(range(32, 127)) * 50  # 4,750 bytes
    path = tmp_path / "book.txt"
    path.write_bytes(text)
    corpus = load_corpus(path)
    cut = len(text) - len(text) // EVAL_ONE_IN
    assert corpus.train.tobytes() == text[:cut]
    assert corpus.eval.tobytes() == text[cut:]
    assert len(corpus.eval) == 237


def test_max_bytes_caps_the_corpus(tmp_path):
    _make_folder(tmp_path, 100)  # 100 files x 126 bytes
    corpus = load_corpus(tmp_path, max_bytes=3000)
    assert len(corpus.train) + len(corpus.eval) <= 3000 + 100  # + the b"\n" joins
    assert load_corpus(tmp_path, max_bytes=3000).train.tobytes() == corpus.train.tobytes()


@pytest.mark.parametrize(
    "setup, message",
    [
        (lambda d: d / "missing.txt", "does not exist"),
        (lambda d: (d / "empty.txt").write_bytes(b"") and None or d / "empty.txt", "is empty"),
        (lambda d: (d / "x.bin").write_bytes(b"\x00\xff" * 100) and None or d / "x.bin", "not text"),
        (lambda d: (d / "tiny.txt").write_bytes(b"hi") and None or d / "tiny.txt", "only 2 bytes"),
    ],
    ids=["missing", "empty-file", "binary-file", "too-small"],
)
def test_bad_data_file_raises_value_error(tmp_path, setup, message):
    with pytest.raises(ValueError, match=message):
        load_corpus(setup(tmp_path))


def test_folder_without_text_raises_value_error(tmp_path):
    (tmp_path / "empty").mkdir()
    with pytest.raises(ValueError, match="no text files"):
        load_corpus(tmp_path / "empty")
    (tmp_path / "bin").mkdir()
    for i in range(5):
        (tmp_path / "bin" / f"{i}.dat").write_bytes(bytes([0, i, 255]) * 64)
    with pytest.raises(ValueError, match="no text files"):
        load_corpus(tmp_path / "bin")


# ---- batches ---------------------------------------------------------------------------------


def test_batcher_shapes_and_shift():
    corpus = load_corpus(None)
    x, y = Batcher(corpus, batch_size=4, context=32, rank=0, seed=0).next()
    assert x.shape == y.shape == (4, 32)
    assert x.dtype == y.dtype == torch.int64
    assert torch.equal(x[:, 1:], y[:, :-1])  # y is x shifted by one byte
    train = corpus.train.tobytes()
    for row_x, row_y in zip(x.tolist(), y.tolist()):
        window = bytes(row_x) + bytes(row_y[-1:])
        assert window in train


def test_batcher_is_deterministic_per_rank_and_seed():
    corpus = load_corpus(None)
    a = [Batcher(corpus, 2, 16, rank=1, seed=7).next()[0] for _ in range(2)]
    assert torch.equal(a[0], a[1])
    other_rank = Batcher(corpus, 2, 16, rank=2, seed=7).next()[0]
    other_seed = Batcher(corpus, 2, 16, rank=1, seed=8).next()[0]
    assert not torch.equal(a[0], other_rank)
    assert not torch.equal(a[0], other_seed)


def test_batcher_start_resumes_at_batch_k():
    corpus = load_corpus(None)
    b = Batcher(corpus, 2, 16, rank=0, seed=3)
    seq = [b.next()[0] for _ in range(4)]
    assert b.position == 4
    assert torch.equal(Batcher(corpus, 2, 16, rank=0, seed=3, start=3).next()[0], seq[3])


def test_batcher_rejects_data_shorter_than_context(tmp_path):
    (tmp_path / "t.txt").write_text("x" * 100)
    corpus = load_corpus(tmp_path / "t.txt")
    with pytest.raises(ValueError, match="smaller context"):
        Batcher(corpus, 2, context=128, rank=0, seed=0)
    with pytest.raises(ValueError, match="batch_size"):
        Batcher(corpus, 0, context=8, rank=0, seed=0)
    with pytest.raises(ValueError, match="eval data has 5 bytes"):
        eval_starts(corpus, context=8, n_seqs=4)


def test_eval_starts_are_fixed():
    corpus = load_corpus(None)
    a = eval_starts(corpus, 128, 16, seed=0)
    assert np.array_equal(a, eval_starts(corpus, 128, 16, seed=0))
    assert not np.array_equal(a, eval_starts(corpus, 128, 16, seed=1))
    assert a.min() >= 0 and a.max() <= len(corpus.eval) - 128


# ---- model -----------------------------------------------------------------------------------


def test_default_model_size_and_shapes():
    cfg = LMConfig()
    model = build_model(cfg, seed=0)
    assert count_params(model) == 1_232_128
    assert 1_000_000 <= count_params(model) <= 5_000_000
    logits = model(torch.zeros(2, cfg.context, dtype=torch.long))
    assert logits.shape == (2, cfg.context, 256)
    with pytest.raises(ValueError, match="exceeds the model's context"):
        model(torch.zeros(1, cfg.context + 1, dtype=torch.long))


def test_build_model_is_a_function_of_the_seed_only():
    torch.manual_seed(123)
    before = torch.random.get_rng_state()
    a, b, c = build_model(TINY, 5), build_model(TINY, 5), build_model(TINY, 6)
    assert torch.equal(torch.random.get_rng_state(), before)  # global RNG untouched
    for pa, pb in zip(a.parameters(), b.parameters()):
        assert torch.equal(pa, pb)
    assert not torch.equal(a.wte.weight, c.wte.weight)
    assert a.head.weight is a.wte.weight  # tied


def test_config_errors_say_how_to_fix():
    with pytest.raises(ValueError, match="multiple of n_head"):
        LMConfig(d_model=130, n_head=4)
    with pytest.raises(ValueError, match="n_layer must be >= 1"):
        LMConfig(n_layer=0)


def test_zeroed_head_scores_exactly_eight_bits_per_byte():
    cfg = LMConfig()
    model = build_model(cfg, seed=0)
    with torch.no_grad():
        model.head.weight.zero_()  # tied: all logits become 0 -> uniform over 256 bytes
    bpb = evaluate_bpb(model, load_corpus(None), cfg, n_seqs=4)
    assert bpb == pytest.approx(8.0, abs=1e-4)
    assert model.training  # evaluate restores the mode


def test_untrained_model_scores_near_eight_bits():
    # Not exactly 8: with tied embeddings the input byte's own logit starts at about
    # d_model * init_std = 2.56 above the rest, so a fresh model mildly predicts "repeat".
    cfg = LMConfig()
    bpb = evaluate_bpb(build_model(cfg, seed=0), load_corpus(None), cfg, n_seqs=4)
    assert 7.5 < bpb < 8.0


def test_bpb_is_loss_in_nats_over_ln2():
    corpus = load_corpus(None)
    model = build_model(TINY, seed=1)
    starts = eval_starts(corpus, TINY.context, 3, seed=0)
    idx = starts[:, None] + np.arange(TINY.context + 1)
    seqs = torch.from_numpy(corpus.eval[idx].astype(np.int64))
    with torch.no_grad():
        nats = float(lm_loss(model, seqs[:, :-1], seqs[:, 1:]))
    assert evaluate_bpb(model, corpus, TINY, n_seqs=3, batch_size=2) == pytest.approx(nats / math.log(2), rel=1e-5)


def test_a_few_steps_reduce_loss_on_a_fixed_batch():
    torch.manual_seed(0)
    model = build_model(TINY, seed=0)
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3)
    x, y = Batcher(load_corpus(None), 8, TINY.context, rank=0, seed=0).next()
    first = train_step(model, opt, x, y)
    for _ in range(20):
        last = train_step(model, opt, x, y)
    assert first == pytest.approx(math.log(256), abs=0.2)  # near uniform at init
    assert last < 0.8 * first


def test_warmup_cosine_hand_computed():
    assert warmup_cosine(0, warmup=4, total=20) == 0.25
    assert warmup_cosine(3, warmup=4, total=20) == 1.0
    assert warmup_cosine(4, warmup=4, total=20) == 1.0
    assert warmup_cosine(12, warmup=4, total=20) == pytest.approx(0.55)  # halfway: 0.1 + 0.9 * 0.5
    assert warmup_cosine(20, warmup=4, total=20) == 0.1
    assert warmup_cosine(99, warmup=0, total=20, min_ratio=0.0) == 0.0
    with pytest.raises(ValueError):
        warmup_cosine(0, warmup=-1, total=10)


def test_big_file_is_read_only_up_to_the_cap(tmp_path):
    # A multi-byte character cut by the cap is still text; the cap bounds what is read.
    path = tmp_path / "big.txt"
    path.write_text("é" * 5000, encoding="utf-8")  # 10,000 bytes, 2 per character
    corpus = load_corpus(path, max_bytes=1001)  # cuts the 501st "é" in half
    assert len(corpus.train) + len(corpus.eval) == 1001
    (tmp_path / "bad.txt").write_bytes(b"ok " * 400 + b"\xff\xfe" + b"more" * 10)
    with pytest.raises(ValueError, match="not text"):
        load_corpus(tmp_path / "bad.txt", max_bytes=5000)  # invalid UTF-8 well before the cut
