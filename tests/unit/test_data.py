"""Tests for stalwart.runtime.data: tokenizers, corpora, packing, token cache and the global loader."""

from __future__ import annotations

import json
import threading
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
import torch

from stalwart.runtime.data.corpus import corpus_files, iter_documents, stdlib_sources
from stalwart.runtime.data.dataset import PackedDataset, TokenStream, pack_documents
from stalwart.runtime.data.loader import GlobalBatchLoader
from stalwart.runtime.data.tokenizer import ByteTokenizer, HFTokenizer, build_tokenizer

BYTE = ByteTokenizer()


# ---------------------------------------------------------------- tokenizers


def test_byte_tokenizer_round_trip_non_ascii() -> None:
    text = "héllo, wörld — 世界 🙂\n\ttabs"
    ids = BYTE.encode(text)
    assert len(ids) == len(text.encode("utf-8")) > len(text)
    assert all(0 <= i < 256 for i in ids)
    assert BYTE.decode(ids) == text
    assert BYTE.decode([BYTE.bos_id, *ids, BYTE.eos_id]) == text  # specials are dropped
    assert (BYTE.vocab_size, BYTE.bos_id, BYTE.eos_id) == (258, 256, 257)
    assert [a.tolist() for a in BYTE.encode_batch([text, "x"])] == [ids, [ord("x")]]
    assert BYTE.decode(BYTE.encode("🙂")[:2]) == "\ufffd"  # a cut character decodes, it does not raise


def _train_tiny_bpe(tmp_path: Path, specials: list[str]) -> Path:
    """A byte-level BPE trained on a few strings and saved as tokenizer.json: no downloads."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=300, special_tokens=specials, initial_alphabet=pre_tokenizers.ByteLevel.alphabet()
    )
    corpus = ["def forward(self, x):\n    return x", "import torch\nimport numpy as np", "hello world"] * 20
    tok.train_from_iterator(corpus, trainer=trainer)
    out = tmp_path / "tokenizer.json"
    tok.save(str(out))
    return out


def test_hf_tokenizer_from_trained_tokenizer_json(tmp_path: Path) -> None:
    path = _train_tiny_bpe(tmp_path, ["<s>", "</s>"])
    tok = build_tokenizer(str(tmp_path))  # a folder containing tokenizer.json
    assert isinstance(tok, HFTokenizer)
    vocab = json.loads(path.read_text())["model"]["vocab"]
    assert tok.bos_id == vocab["<s>"] and tok.eos_id == vocab["</s>"] and tok.bos_id != tok.eos_id
    text = "def forward(self, x):\n    return torch.ünïcode"
    ids = tok.encode(text)
    assert ids and tok.bos_id not in ids and tok.eos_id not in ids
    assert tok.decode(ids) == text
    assert tok.decode([tok.bos_id, *ids, tok.eos_id]) == text
    assert [a.tolist() for a in tok.encode_batch([text])] == [ids]
    assert build_tokenizer(str(path)).identity == tok.identity

    stream = pack_documents(["hello world", "import torch"], tok)
    assert stream[0] == tok.bos_id and stream[-1] == tok.eos_id
    assert (stream == tok.bos_id).sum() == 2 and (stream == tok.eos_id).sum() == 2


def test_hf_tokenizer_without_specials_names_the_fix(tmp_path: Path) -> None:
    _train_tiny_bpe(tmp_path, [])
    with pytest.raises(ValueError, match="bos_token=/eos_token="):
        build_tokenizer(str(tmp_path / "tokenizer.json"))


def test_build_tokenizer_missing_path_names_the_fix(tmp_path: Path) -> None:
    missing = tmp_path / "nope"
    with pytest.raises(FileNotFoundError, match="byte") as info:
        build_tokenizer(str(missing))
    assert str(missing) in str(info.value)
    assert isinstance(build_tokenizer("byte"), ByteTokenizer)


# ---------------------------------------------------------------- corpus


def _make_corpus(root: Path) -> list[str]:
    """Files in deliberately unsorted creation order; returns the documents in expected order."""
    (root / "sub").mkdir(parents=True)
    (root / "__pycache__").mkdir()
    (root / "z.txt").write_text("last file")
    (root / "sub" / "b.md").write_text("# in a subfolder")
    (root / "a.jsonl").write_text(
        json.dumps({"text": "first line", "id": 1}) + "\n\n" + json.dumps({"text": "ünïcode line"}) + "\n"
    )
    (root / "m.py").write_text("print('hi')\n")
    (root / "empty.txt").write_text("")
    (root / "blob.bin").write_bytes(b"\x00\x01binary")  # not a text suffix: skipped in folders
    (root / "__pycache__" / "m.txt").write_text("skipped")
    return ["first line", "ünïcode line", "print('hi')\n", "# in a subfolder", "last file"]


def test_folder_corpus_order_is_deterministic(tmp_path: Path) -> None:
    expected = _make_corpus(tmp_path / "data")
    assert list(iter_documents("files", str(tmp_path / "data"))) == expected
    assert list(iter_documents("files", tmp_path / "data")) == expected
    names = [p.name for p in corpus_files("files", tmp_path / "data")]
    assert names == ["a.jsonl", "empty.txt", "m.py", "b.md", "z.txt"]
    assert list(iter_documents("files", tmp_path / "data" / "z.txt")) == ["last file"]


def test_jsonl_custom_field_and_missing_field(tmp_path: Path) -> None:
    f = tmp_path / "d.jsonl"
    f.write_text(json.dumps({"content": "a"}) + "\n" + json.dumps({"content": "b"}) + "\n")
    assert list(iter_documents("files", f, jsonl_field="content")) == ["a", "b"]
    with pytest.raises(ValueError, match=r"d\.jsonl:1: no 'text' field .*content.*jsonl_field"):
        list(iter_documents("files", f))


def test_missing_data_path_error_names_path_and_fix(tmp_path: Path) -> None:
    missing = tmp_path / "does-not-exist"
    with pytest.raises(FileNotFoundError) as info:
        iter_documents("files", str(missing))
    msg = str(info.value)
    assert str(missing) in msg and ".jsonl" in msg and 'source = "stdlib"' in msg
    with pytest.raises(ValueError, match="needs a path"):
        iter_documents("files", None)
    with pytest.raises(ValueError, match='use source = "stdlib"'):
        iter_documents("wikipedia", None)


def test_stdlib_corpus_real() -> None:
    files = stdlib_sources()
    assert len(files) > 100
    assert not any(part in {"site-packages", "dist-packages", "__pycache__"} for f in files for part in f.parts)
    assert all(f.suffix == ".py" for f in files)

    first = TokenStream.build("stdlib", None, BYTE)
    second = TokenStream.build("stdlib", None, BYTE)
    assert len(first) > 1_000_000
    assert np.array_equal(first.tokens, second.tokens)

    ds = PackedDataset(first, seq_len=1024)
    text = "".join(BYTE.decode(ds[i][0].tolist()) for i in range(len(ds) // 2, len(ds) // 2 + 8))
    assert sum(kw in text for kw in ("def ", "import ", "return", "self", "class ")) >= 3, text[:500]


# ---------------------------------------------------------------- packing


def test_packing_shifts_by_one_and_marks_documents(tmp_path: Path) -> None:
    stream = pack_documents(["ab", "cde"], BYTE)
    assert stream.tolist() == [256, 97, 98, 257, 256, 99, 100, 101, 257]
    ds = PackedDataset(stream, seq_len=3)
    assert len(ds) == 2  # (9 - 1) // 3; the incomplete tail is dropped
    x0, y0 = ds[0]
    assert x0.dtype == torch.int64 and x0.shape == (3,)
    assert x0.tolist() == [256, 97, 98] and y0.tolist() == [97, 98, 257]
    x1, y1 = ds[1]
    assert x1.tolist() == [257, 256, 99] and y1.tolist() == [256, 99, 100]
    with pytest.raises(IndexError):
        ds[2]

    _make_corpus(tmp_path / "data")
    ds = PackedDataset.from_source("files", tmp_path / "data", BYTE, seq_len=5)
    assert ds.tokens[0] == BYTE.bos_id and ds.tokens[-1] == BYTE.eos_id
    assert (ds.tokens == BYTE.bos_id).sum() == 5 == (ds.tokens == BYTE.eos_id).sum()
    for i in range(len(ds)):
        x, y = ds[i]
        assert torch.equal(x[1:], y[:-1])
        assert torch.equal(torch.cat([x, y[-1:]]), torch.from_numpy(ds.tokens[i * 5 : i * 5 + 6].astype(np.int64)))

    capped = TokenStream.build("files", tmp_path / "data", BYTE, max_tokens=7)
    assert capped.tokens.tolist() == ds.tokens[:7].tolist()
    with pytest.raises(ValueError, match="smaller seq_len"):
        PackedDataset(capped, seq_len=7)


# ---------------------------------------------------------------- cache


class _CountingByteTokenizer(ByteTokenizer):
    def __init__(self) -> None:
        self.calls = 0
        self._lock = threading.Lock()

    def encode_batch(self, texts):  # type: ignore[no-untyped-def]
        with self._lock:
            self.calls += 1
        return super().encode_batch(texts)


def test_token_cache_round_trip_and_invalidation(tmp_path: Path) -> None:
    _make_corpus(tmp_path / "data")
    cache = tmp_path / "cache"
    first = TokenStream.build("files", tmp_path / "data", BYTE, cache_dir=cache)
    assert not first.from_cache and first.cache_path is not None and first.cache_path.exists()
    second = TokenStream.build("files", tmp_path / "data", BYTE, cache_dir=cache)
    assert second.from_cache and second.cache_path == first.cache_path
    assert np.array_equal(first.tokens, second.tokens) and second.tokens.dtype == first.tokens.dtype
    assert sorted(p.name for p in cache.iterdir() if p.suffix not in {".npy", ".lock"}) == []  # no temp files left

    (tmp_path / "data" / "z.txt").write_text("last file, edited")
    third = TokenStream.build("files", tmp_path / "data", BYTE, cache_dir=cache)
    assert not third.from_cache and third.cache_path != first.cache_path
    assert BYTE.decode(third.tokens.tolist()).endswith("last file, edited")
    fourth = TokenStream.build("files", tmp_path / "data", BYTE, cache_dir=cache, max_tokens=10)
    assert not fourth.from_cache and len(fourth) == 10


def test_token_cache_builds_once_under_concurrency(tmp_path: Path) -> None:
    _make_corpus(tmp_path / "data")
    tok = _CountingByteTokenizer()
    results: list[TokenStream] = []

    def build() -> None:
        results.append(TokenStream.build("files", tmp_path / "data", tok, cache_dir=tmp_path / "cache"))

    threads = [threading.Thread(target=build) for _ in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert len(results) == 8 and tok.calls == 1
    assert sum(not r.from_cache for r in results) == 1
    assert all(np.array_equal(r.tokens, results[0].tokens) for r in results)


# ---------------------------------------------------------------- loader


SEQ = 4


def _id_dataset(n_samples: int) -> PackedDataset:
    """Tokens 0..N: sample i's first input token is i*SEQ, so every batch reveals its sample ids."""
    return PackedDataset(np.arange(n_samples * SEQ + 1, dtype=np.int32), seq_len=SEQ)


def _loaders(ds: PackedDataset, gbs: int, mbs: int, dp: int, seed: int = 7) -> list[GlobalBatchLoader]:
    return [GlobalBatchLoader(ds, gbs, mbs, dp_rank=r, dp_size=dp, seed=seed) for r in range(dp)]


def _step(loaders: list[GlobalBatchLoader]) -> list[list[int]]:
    """One optimizer step on every simulated rank → per-rank sample ids, checked against the tensors."""
    out = []
    for loader in loaders:
        expected = loader.sample_ids_for_step()
        micro = loader.next_step()
        assert len(micro) == loader.grad_accum_steps
        ids = []
        for (x, y), exp in zip(micro, expected):
            assert x.shape == y.shape == (loader.microbatch_size, SEQ) and x.dtype == torch.int64
            assert torch.equal(x[:, 1:], y[:, :-1])
            got = (x[:, 0] // SEQ).tolist()
            assert got == exp
            ids.extend(got)
        out.append(ids)
    assert len({json.dumps(lo.state_dict()) for lo in loaders}) == 1  # job-global state
    return out


def test_resume_same_dp_is_identical() -> None:
    ds = _id_dataset(30)
    straight = _loaders(ds, gbs=8, mbs=2, dp=2)
    reference = [_step(straight) for _ in range(10)]  # crosses epochs (30 % 8 != 0)

    first = _loaders(ds, gbs=8, mbs=2, dp=2)
    resumed_run = [_step(first) for _ in range(4)]
    state = first[0].state_dict()
    assert state == {
        "position": 32,
        "seed": 7,
        "shuffle": True,
        "global_batch_size": 8,
        "dataset_len": 30,
        "version": 1,
    }
    fresh = _loaders(ds, gbs=8, mbs=2, dp=2)
    for loader in fresh:
        loader.load_state_dict(json.loads(json.dumps(state)))
    resumed_run += [_step(fresh) for _ in range(6)]
    assert resumed_run == reference


@pytest.mark.parametrize(("dp_before", "dp_after", "gbs_after"), [(4, 2, 8), (1, 4, 8), (2, 4, 16), (4, 1, 4)])
def test_resume_with_different_dp_is_exact(dp_before: int, dp_after: int, gbs_after: int) -> None:
    n, gbs = 52, 8
    ds = _id_dataset(n)
    straight = _loaders(ds, gbs, 1, 1)
    reference = [sum(_step(straight), []) for _ in range(13)]  # 104 samples = exactly 2 epochs

    before = _loaders(ds, gbs, 1, dp_before)
    consumed = [sum(_step(before), []) for _ in range(3)]
    state = before[0].state_dict()
    after = _loaders(ds, gbs_after, 1, dp_after)
    for loader in after:
        loader.load_state_dict(state)
    while after[0].position < 2 * n:
        consumed.append(sum(_step(after), []))

    flat = sum(consumed, [])
    assert len(flat) == 2 * n
    for epoch in range(2):  # every sample exactly once per epoch: nothing skipped, nothing repeated
        assert Counter(flat[epoch * n : (epoch + 1) * n]) == Counter(range(n))
    assert flat == sum(reference, [])  # and in the uninterrupted run's global order
    if gbs_after == gbs:  # per step, the union over ranks is the same global slice
        assert consumed == reference


def test_order_depends_only_on_seed_and_epoch() -> None:
    ds = _id_dataset(20)
    a, b = GlobalBatchLoader(ds, 4, 2, 0, 2, seed=1), GlobalBatchLoader(ds, 8, 1, 1, 4, seed=1)
    assert np.array_equal(a.epoch_order(3), b.epoch_order(3))
    assert sorted(a.epoch_order(0).tolist()) == list(range(20))
    assert not np.array_equal(a.epoch_order(0), a.epoch_order(1))
    assert not np.array_equal(a.epoch_order(0), GlobalBatchLoader(ds, 4, 2, 0, 2, seed=2).epoch_order(0))
    plain = GlobalBatchLoader(ds, 4, 2, 1, 2, shuffle=False)
    assert plain.sample_ids_for_step() == [[2, 3]]


def test_bad_global_batch_divisibility_names_the_fix() -> None:
    ds = _id_dataset(10)
    with pytest.raises(ValueError, match=r"global_batch_size=10 .* dp_size\*microbatch_size=4 .*multiple of 4"):
        GlobalBatchLoader(ds, global_batch_size=10, microbatch_size=2, dp_rank=0, dp_size=2)
    with pytest.raises(ValueError, match="dp_rank=2"):
        GlobalBatchLoader(ds, global_batch_size=8, microbatch_size=2, dp_rank=2, dp_size=2)
    assert GlobalBatchLoader(ds, 12, 2, 0, 2).grad_accum_steps == 3


def test_load_state_dict_rejects_changed_data_or_seed() -> None:
    loader = GlobalBatchLoader(_id_dataset(10), 4, 1, 0, 1, seed=3)
    state = loader.state_dict()
    with pytest.raises(ValueError, match="data changed under a resume.*10 samples, now there are 11"):
        GlobalBatchLoader(_id_dataset(11), 4, 1, 0, 1, seed=3).load_state_dict(state)
    with pytest.raises(ValueError, match="set the data seed back to 3"):
        GlobalBatchLoader(_id_dataset(10), 4, 1, 0, 1, seed=4).load_state_dict(state)
    with pytest.raises(ValueError, match="version"):
        loader.load_state_dict({**state, "version": 99})


def test_skip_and_fetch_time() -> None:
    ds = _id_dataset(16)
    loader = GlobalBatchLoader(ds, 4, 2, 1, 2, seed=0)
    loader.skip(5)
    assert loader.position == 5
    assert loader.sample_ids_for_step() == [loader.global_sample_ids(7, 2).tolist()]
    loader.next_step()
    assert loader.position == 9 and loader.last_fetch_seconds > 0
    with pytest.raises(ValueError, match="cannot rewind"):
        loader.skip(-1)
