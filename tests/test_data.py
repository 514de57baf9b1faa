"""Tests for train_gpt2.py's DataLoaderLite: the reference's batches with one process (against
a naive loader written from the lecture's description), the same stream interleaved across ranks, shuffling,
saving and restoring the position, and the errors for bad shards."""
import json

import numpy as np
import pytest
import torch

from train_gpt2 import DataLoaderLite, UserError

B, T = 2, 4  # B*T = 8 tokens a micro-batch
# batches per shard: 5 (exact fit: 41 = 5*8+1), 3, 4 (40 = 5*8: one token short of a 5th),
# 6, 1 (9 = B*T+1): 19 in all, odd, and no length a multiple of 2*B*T, so with 2 ranks the
# shard ends and the wrap-arounds fall on either rank
SHARD_LENGTHS = (41, 30, 40, 52, 9)
EPOCH = sum((n - 1) // (B * T) for n in SHARD_LENGTHS)


def write_shards(root, lengths=SHARD_LENGTHS, seed=0):
    """Train shards 1..n (random tokens, uint16) and one val shard 0, as fineweb.py names them."""
    rng = np.random.default_rng(seed)
    root.mkdir(parents=True, exist_ok=True)
    np.save(root / "edufineweb_val_000000.npy", rng.integers(0, 50257, 100, dtype=np.uint16))
    paths = []
    for i, n in enumerate(lengths, start=1):
        paths.append(root / f"edufineweb_train_{i:06d}.npy")
        np.save(paths[-1], rng.integers(0, 50257, n, dtype=np.uint16))
    return paths


class ReferenceLoader:
    """The lecture's loader, literally: rank r starts at B*T*r, reads B*T+1 tokens, advances by
    B*T*num_processes, and moves to the next shard (wrapping around) when
    pos + B*T*num_processes + 1 > len."""

    def __init__(self, B, T, rank, num_processes, paths):
        self.B, self.T, self.rank, self.num_processes = B, T, rank, num_processes
        self.shards = [np.load(p) for p in paths]
        self.current, self.pos = 0, B * T * rank

    def next_batch(self):
        B, T, tokens = self.B, self.T, self.shards[self.current]
        buf = torch.from_numpy(tokens[self.pos:self.pos + B * T + 1].astype(np.int64))
        x, y = buf[:-1].view(B, T), buf[1:].view(B, T)
        self.pos += B * T * self.num_processes
        if self.pos + B * T * self.num_processes + 1 > len(tokens):
            self.current = (self.current + 1) % len(self.shards)
            self.pos = B * T * self.rank
        return x, y


def loader(root, rank=0, nproc=1, split="train", **kw):
    return DataLoaderLite(B, T, rank, nproc, split, str(root), **kw)


def batches(ldr, n):
    return [ldr.next_batch() for _ in range(n)]


def key(batch):
    return tuple(batch[0].flatten().tolist()) + (batch[1][-1, -1].item(),)


def assert_same(got, want):
    assert len(got) == len(want)
    for i, ((x, y), (rx, ry)) in enumerate(zip(got, want)):
        assert torch.equal(x, rx) and torch.equal(y, ry), f"micro-batch {i}"


def test_loader_one_process_equals_reference(tmp_path):
    paths = write_shards(tmp_path)
    ldr = loader(tmp_path)
    assert ldr.shards == [str(p) for p in paths]  # train shards only, sorted
    got = batches(ldr, 2 * EPOCH + 7)  # two wrap-arounds
    for x, y in got:
        assert x.shape == y.shape == (B, T) and x.dtype == y.dtype == torch.int64
        assert torch.equal(x.flatten()[1:], y.flatten()[:-1])  # y is x shifted by one
    assert_same(got, batches(ReferenceLoader(B, T, 0, 1, paths), len(got)))
    # an epoch is EPOCH batches: then the stream wraps around to shard 1's first batch
    assert_same(got[EPOCH:EPOCH + 1], got[:1])
    first = np.load(paths[0])
    assert got[0][0].flatten().tolist() == first[:B * T].astype(int).tolist()


def test_loader_shards_are_memory_mapped(tmp_path):
    write_shards(tmp_path)
    ldr = loader(tmp_path)
    assert len(ldr.tokens) == len(SHARD_LENGTHS)
    assert all(isinstance(s, np.memmap) for s in ldr.tokens)


@pytest.mark.parametrize("nproc", [2, 3])
@pytest.mark.parametrize("shuffle", [False, True])
def test_loader_ranks_interleave_the_single_process_stream(tmp_path, nproc, shuffle):
    write_shards(tmp_path)
    rounds = 2 * EPOCH // nproc + 3  # past two wrap-arounds
    stream = batches(loader(tmp_path, shuffle=shuffle, seed=3), rounds * nproc)
    ranks = [loader(tmp_path, r, nproc, shuffle=shuffle, seed=3) for r in range(nproc)]
    per_rank = [batches(ldr, rounds) for ldr in ranks]
    for r in range(nproc):  # micro-batch k of rank r = micro-batch nproc*k + r of one process
        assert_same(per_rank[r], stream[r::nproc])
    # every rank is at the same stream position
    assert all(ldr.state_dict() == ranks[0].state_dict() for ldr in ranks)


def test_loader_shuffle(tmp_path):
    write_shards(tmp_path)
    in_order = batches(loader(tmp_path), EPOCH)
    shuffled = batches(loader(tmp_path, shuffle=True, seed=1), 3 * EPOCH)
    epochs = [shuffled[i * EPOCH:(i + 1) * EPOCH] for i in range(3)]
    assert len({key(b) for b in in_order}) == EPOCH  # all batches distinct: keys identify them
    for e in epochs:  # every batch of the epoch exactly once
        assert sorted(key(b) for b in e) == sorted(key(b) for b in in_order)
    orders = [[key(b) for b in e] for e in epochs]
    assert orders[0] != [key(b) for b in in_order]
    assert orders[0] != orders[1] and orders[1] != orders[2]  # a fresh order every epoch
    # ... of the batches within a shard too, not only of the shards (shard 4 has 6 batches)
    shard4 = [key(b) for b in in_order[12:18]]
    assert len({tuple(k for k in order if k in shard4) for order in orders}) > 1
    assert_same(batches(loader(tmp_path, shuffle=True, seed=1), 3 * EPOCH), shuffled)  # same seed
    other = batches(loader(tmp_path, shuffle=True, seed=2), EPOCH)
    assert [key(b) for b in other] != orders[0]


@pytest.mark.parametrize("nproc", [1, 2])
@pytest.mark.parametrize("shuffle", [False, True])
def test_loader_state_round_trip(tmp_path, nproc, shuffle):
    write_shards(tmp_path)
    for k in (0, 4, 9, EPOCH + 2):  # start, mid-shard, shard boundary passed, next epoch
        ranks = [loader(tmp_path, r, nproc, shuffle=shuffle, seed=5) for r in range(nproc)]
        for ldr in ranks:
            batches(ldr, k)
        states = [ldr.state_dict() for ldr in ranks]
        assert all(s == states[0] for s in states)
        assert json.loads(json.dumps(states[0])) == states[0]  # plain types (safe torch.load)
        for r, ldr in enumerate(ranks):
            fresh = loader(tmp_path, r, nproc, shuffle=shuffle, seed=5)
            fresh.set_state(states[r])
            assert_same(batches(fresh, 20), batches(ldr, 20))


def test_loader_state_carries_over_to_another_world_size(tmp_path):
    """The saved position is one of the shared stream: 2 ranks after k steps are at
    micro-batch 2k, where one process resumes."""
    write_shards(tmp_path)
    stream = batches(loader(tmp_path), 40)
    ranks = [loader(tmp_path, r, 2) for r in range(2)]
    for ldr in ranks:
        batches(ldr, 6)
    single = loader(tmp_path)
    single.set_state(ranks[0].state_dict())
    assert_same(batches(single, 12), stream[12:24])


def test_loader_reset_restarts_the_stream(tmp_path):
    write_shards(tmp_path)
    ldr = loader(tmp_path, 1, 2)
    first = batches(ldr, 10)
    ldr.reset()
    assert_same(batches(ldr, 10), first)


def test_loader_reads_only_its_split(tmp_path):
    write_shards(tmp_path)
    val = loader(tmp_path, split="val")
    assert [p.rsplit("/", 1)[-1] for p in val.shards] == ["edufineweb_val_000000.npy"]
    x, _ = val.next_batch()
    assert x.flatten().tolist() == np.load(tmp_path / "edufineweb_val_000000.npy")[:B * T].tolist()


@pytest.mark.parametrize("bad", ["int32", "2d"])
def test_loader_rejects_malformed_shards(tmp_path, bad):
    write_shards(tmp_path)
    name = "edufineweb_train_000002.npy"
    tokens = np.arange(64)
    np.save(tmp_path / name, tokens.astype(np.int32) if bad == "int32"
            else tokens.astype(np.uint16).reshape(8, 8))
    with pytest.raises(UserError, match=name):
        loader(tmp_path)


def test_loader_missing_data(tmp_path):
    with pytest.raises(UserError, match="fineweb.py"):
        loader(tmp_path / "does_not_exist")
    root = tmp_path / "data"
    root.mkdir()
    np.save(root / "edufineweb_train_000001.npy", np.zeros(100, dtype=np.uint16))
    with pytest.raises(UserError, match="fineweb.py") as info:
        loader(root, split="val")
    assert "val" in str(info.value)


def test_folder_names_are_literal(tmp_path):
    """A data folder named like a glob pattern is read as it is named (no glob anywhere)."""
    root = tmp_path / "runs" / "lr[3e-4]*"
    paths = write_shards(root)
    ldr = loader(root)
    assert ldr.shards == [str(p) for p in paths]
    assert_same(batches(ldr, 7), batches(ReferenceLoader(B, T, 0, 1, paths), 7))


def test_only_a_val_shard_names_the_shard_size(tmp_path):
    root = tmp_path / "data"
    root.mkdir()
    np.save(root / "edufineweb_val_000000.npy", np.zeros(100, dtype=np.uint16))
    with pytest.raises(UserError, match="smaller --shard_size"):
        loader(root)


def test_pickled_shard_is_refused_not_unpickled(tmp_path):
    write_shards(tmp_path)
    np.save(tmp_path / "edufineweb_train_000002.npy", np.array([{"a": 1}], dtype=object),
            allow_pickle=True)
    with pytest.raises(UserError, match="edufineweb_train_000002.npy is not a token shard") as e:
        loader(tmp_path)
    assert "allow_pickle" not in str(e.value)  # no advice to unpickle


def test_saved_position_past_the_data_is_an_error(tmp_path):
    write_shards(tmp_path)
    ldr = loader(tmp_path)
    with pytest.raises(UserError, match="past the 5 shards"):
        ldr.set_state(dict(epoch=0, shard=7, batch=0))
