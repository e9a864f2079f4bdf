"""The x0 estimate store (dddm/store/): both backends, the Arrow file, checkpoints, bad and damaged input."""

from __future__ import annotations

import copy
import logging
import os
import subprocess
import sys

import numpy as np
import pyarrow as pa
import pytest
import torch
from torch import nn

from dddm.store import (ArrowStore, DeviceStore, StoreError, initial_estimates, open_store, owned_indices,
                        read_store_file, remove_unused, store_path)

SHAPE = (2, 4, 4)
DTYPES = ["float32", "float16", "bfloat16"]
BACKENDS = ["device", "arrow"]


@pytest.fixture(autouse=True)
def one_thread():
    """Tiny tensors: intra-op threads only add contention (and make timings erratic on a busy machine)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def make(tmp_path, backend="arrow", n=40, shape=SHAPE, dtype="float32", seed=3, fingerprint="fp-1", rank=0,
         world_size=1, resume=False, sub="store"):
    return open_store(backend, tmp_path / sub, n, shape, dtype, seed, fingerprint, "cpu", rank, world_size,
                      resume=resume)


def as_storage(x: torch.Tensor, dtype: str) -> torch.Tensor:
    return x.to(getattr(torch, dtype)).float()


# ----------------------------------------------------------------------------- keys and initial values

@pytest.mark.parametrize("n,world", [(1, 1), (10, 3), (50, 4), (7, 8)])
def test_owned_indices_partition_the_dataset(n, world):
    parts = [owned_indices(n, r, world) for r in range(world)]
    joined = torch.cat(parts).sort().values
    assert torch.equal(joined, torch.arange(n))  # disjoint and covering: each index exactly once
    assert max(map(len, parts)) - min(map(len, parts)) <= 1


def test_two_ranks_stores_are_disjoint_and_cover_all_indices(tmp_path):
    n = 23
    stores = [make(tmp_path, "arrow", n=n, rank=r, world_size=2) for r in range(2)]
    owned = [set(s.owned.tolist()) for s in stores]
    assert owned[0].isdisjoint(owned[1]) and owned[0] | owned[1] == set(range(n))
    files = [pa.ipc.open_file(str(s.path)).read_all() for s in stores]
    assert stores[0].path != stores[1].path
    in_files = [set(f.column("index").to_pylist()) for f in files]
    assert in_files == owned
    # initial values depend on the index alone, not on the rank that holds it
    single = make(tmp_path, "device", n=n, sub="single")
    for s in stores + [single]:
        s.begin_epoch(0)
    for s in stores:
        idx = s.owned[torch.randperm(len(s.owned))[:5]]
        assert torch.equal(s.gather(idx), single.gather(idx))
        assert torch.equal(s.gather(idx), initial_estimates(idx, SHAPE, 3))
    with pytest.raises(StoreError, match="owned by rank 1"):
        stores[0].gather(torch.tensor([1]))
    with pytest.raises(StoreError, match="outside the dataset"):
        stores[0].gather(torch.tensor([n + 1]))


def test_initial_estimates_are_per_index_and_seeded():
    idx = torch.tensor([5, 0, 9])
    a = initial_estimates(idx, SHAPE, 1)
    assert a.dtype == torch.float32 and a.shape == (3, *SHAPE)
    assert torch.equal(a[1:2], initial_estimates(torch.tensor([0]), SHAPE, 1))
    assert not torch.equal(a, initial_estimates(idx, SHAPE, 2))
    assert abs(initial_estimates(torch.arange(200), SHAPE, 0).std().item() - 1) < 0.05


# ----------------------------------------------------------------------------- gather / scatter

@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("backend", BACKENDS)
def test_gather_scatter_round_trip(tmp_path, backend, dtype):
    n = 60
    store = make(tmp_path, backend, n=n, dtype=dtype)
    store.begin_epoch(0)
    gen = torch.Generator().manual_seed(0)
    expected = as_storage(initial_estimates(torch.arange(n), SHAPE, 3), dtype)
    assert torch.equal(store.estimates(), expected)
    for epoch in range(3):
        if epoch:
            store.begin_epoch(epoch)
        start_of_epoch = expected.clone()
        for idx in torch.randperm(n, generator=gen).split(17):
            got = store.gather(idx)
            assert got.dtype == torch.float32 and got.shape == (len(idx), *SHAPE)
            assert torch.equal(got, start_of_epoch[idx])
            new = torch.randn(len(idx), *SHAPE, generator=gen) * 3
            store.scatter(idx, new)
            expected[idx] = as_storage(new, dtype)
            assert torch.equal(store.estimates(idx), expected[idx])
        assert torch.equal(store.estimates(), expected)
    store.close()


@pytest.mark.parametrize("backend", BACKENDS)
def test_duplicates_gather_same_value_and_last_scatter_wins(tmp_path, backend):
    store = make(tmp_path, backend, n=20)
    store.begin_epoch(0)
    idx = torch.tensor([4, 7, 4, 4, 9, 7])
    got = store.gather(idx)
    assert torch.equal(got[0], got[2]) and torch.equal(got[0], got[3]) and torch.equal(got[1], got[5])
    vals = torch.arange(6, dtype=torch.float32).reshape(6, 1, 1, 1).expand(6, *SHAPE).contiguous()
    store.scatter(idx, vals)
    latest = store.estimates(torch.tensor([4, 7, 9]))
    assert latest[:, 0, 0, 0].tolist() == [3.0, 5.0, 4.0]  # the last occurrence of each index


@pytest.mark.parametrize("backend", BACKENDS)
def test_epoch_rules(tmp_path, backend):
    store = make(tmp_path, backend, n=10)
    with pytest.raises(StoreError, match="begin_epoch"):
        store.gather(torch.tensor([0]))
    store.begin_epoch(0)
    before = store.gather(torch.tensor([1, 2]))
    store.scatter(torch.tensor([1]), torch.zeros(1, *SHAPE))
    with pytest.raises(StoreError, match="already scattered in epoch 0"):
        store.gather(torch.tensor([2, 1]))
    assert torch.equal(store.gather(torch.tensor([2])), before[1:])  # not yet written: still allowed
    store.scatter(torch.tensor([1]), torch.ones(1, *SHAPE))  # scattering again: the last value wins
    with pytest.raises(StoreError, match="one at a time"):
        store.begin_epoch(2)
    store.begin_epoch(1)
    # epoch 1 reads what epoch 0 wrote; samples not visited in epoch 0 keep their estimate
    assert torch.equal(store.gather(torch.tensor([1])), torch.ones(1, *SHAPE))
    assert torch.equal(store.gather(torch.tensor([2])), before[1:])
    with pytest.raises(StoreError, match="shape"):
        store.scatter(torch.tensor([3]), torch.zeros(2, *SHAPE))


def test_unvisited_samples_agree_across_backends(tmp_path):
    """Partial epochs: each backend keeps unvisited estimates; the two stay identical."""
    stores = [make(tmp_path, b, n=16, dtype="float16", sub=b) for b in BACKENDS]
    gen = torch.Generator().manual_seed(1)
    for epoch in range(4):
        idx = torch.randperm(16, generator=gen)[:7]
        vals = torch.randn(7, *SHAPE, generator=gen)
        outs = []
        for s in stores:
            s.begin_epoch(epoch)
            outs.append(s.gather(idx))
            s.scatter(idx, vals + outs[-1])
        assert torch.equal(outs[0], outs[1])
        assert torch.equal(stores[0].estimates(), stores[1].estimates())


# ----------------------------------------------------------------------------- the Arrow file

def plain_pyarrow_estimates(path) -> tuple[np.ndarray, np.ndarray, dict]:
    """What any Arrow reader does: the newest slot per row, bfloat16 bits widened to float32."""
    import json
    table = pa.ipc.open_file(pa.memory_map(str(path))).read_all()
    meta = json.loads(table.schema.metadata[b"dddm.x0_store"])
    cols = [np.concatenate([chunk.to_numpy_ndarray() for chunk in table.column(c).chunks])
            for c in ("est_0", "est_1")]
    latest = table.column("latest").to_numpy()
    est = np.stack([cols[s][row] for row, s in enumerate(latest)])
    if meta["dtype"] == "bfloat16":
        est = (est.astype(np.uint32) << 16).view(np.float32)
    return table.column("index").to_numpy(), est.astype(np.float32), meta


@pytest.mark.parametrize("dtype", DTYPES)
def test_arrow_file_read_by_plain_pyarrow_equals_store(tmp_path, dtype):
    store = make(tmp_path, "arrow", n=30, dtype=dtype, rank=1, world_size=2)
    assert isinstance(store, ArrowStore)
    gen = torch.Generator().manual_seed(2)
    for epoch in range(3):
        store.begin_epoch(epoch)
        idx = store.owned[torch.randperm(store.num_owned, generator=gen)]
        for part in idx.split(4)[: 2 if epoch == 2 else None]:  # epoch 2 stops half-way: a mid-epoch checkpoint
            store.scatter(part, store.gather(part) * 0.5 + torch.randn(len(part), *SHAPE, generator=gen))
        store.state_dict()  # a checkpoint flushes the file
        index, est, meta = plain_pyarrow_estimates(store.path)
        assert np.array_equal(index, store.owned.numpy())
        assert np.array_equal(est, store.estimates().numpy())
        assert meta["dtype"] == dtype and meta["sample_shape"] == list(SHAPE) and meta["rank"] == 1
        view = read_store_file(store.path)
        assert np.array_equal(view["estimates"], est) and np.array_equal(view["index"], index)
    store.close()


def test_arrow_file_layout(tmp_path):
    store = make(tmp_path, "arrow", n=64, shape=(3, 8, 8), dtype="float16")
    f = store._file
    base = np.frombuffer(f._mm, np.uint8).ctypes.data
    assert (f.tables[0].parts[0].array.ctypes.data - base) % 4096 == 0  # est_0 page-aligned
    schema = pa.ipc.open_file(str(store.path)).schema
    assert schema.field("est_0").type == pa.fixed_shape_tensor(pa.float16(), [3, 8, 8])
    assert store.nbytes == 2 * 64 * 192 * 2


# ----------------------------------------------------------------------------- bad input

def test_truncated_file_is_rejected(tmp_path):
    store = make(tmp_path, "arrow", n=50)
    path = store.path
    store.close()
    size = os.path.getsize(path)
    for keep in (size - 3, size // 2, 10, 0):
        with open(path, "r+b") as f:
            f.truncate(keep)
        with pytest.raises(StoreError, match="truncated") as err:
            make(tmp_path, "arrow", n=50, resume=True)
        assert str(path) in str(err.value)


@pytest.mark.parametrize("field,kwargs,found", [
    ("seed", {"seed": 4}, "3"), ("fingerprint", {"fingerprint": "fp-2"}, "'fp-1'"),
    ("num_samples", {"n": 41}, "40"), ("dtype", {"dtype": "float16"}, "'float32'"),
    ("sample_shape", {"shape": (2, 4, 5)}, "[2, 4, 4]"), ("world_size", {"world_size": 2}, "1"),
])
def test_mismatched_file_is_rejected(tmp_path, field, kwargs, found):
    make(tmp_path, "arrow").close()
    with pytest.raises(StoreError) as err:
        make(tmp_path, "arrow", resume=True, **kwargs)
    msg = str(err.value)
    assert str(store_path(tmp_path / "store")) in msg and f"{field}: " in msg and f"found {found}" in msg


def test_other_arrow_file_is_rejected(tmp_path):
    path = store_path(tmp_path / "store")
    path.parent.mkdir()
    table = pa.table({"x": [1, 2]})
    with pa.ipc.new_file(str(path), table.schema) as w:
        w.write_table(table)
    with pytest.raises(StoreError, match="not an x0 store"):
        make(tmp_path, "arrow", resume=True)


def test_existing_file_is_never_reinitialised(tmp_path):
    make(tmp_path, "arrow").close()
    for policy in ("arrow", "auto"):
        with pytest.raises(StoreError, match="already exists") as err:
            make(tmp_path, policy)
        assert str(store_path(tmp_path / "store")) in str(err.value)


def test_a_store_file_another_process_has_open_is_neither_opened_nor_removed(tmp_path):
    """One writer per store file, whatever run it belongs to: another process's open file is refused, naming it,
    and left where it is; once that process is gone (its lock with it), it may be removed."""
    path = store_path(tmp_path / "store")
    holder = subprocess.Popen(
        [sys.executable, "-c", "import sys, test_store as t; from pathlib import Path; "
         "store = t.make(Path(sys.argv[1]), 'arrow'); print('open', flush=True); sys.stdin.read()", str(tmp_path)],
        cwd=os.path.dirname(__file__), stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline() == "open\n"
        inode = path.stat().st_ino
        for attempt in (lambda: make(tmp_path, "arrow", resume=True), lambda: remove_unused(path)):
            with pytest.raises(StoreError, match="another training process has this store file open") as err:
                attempt()
            assert str(err.value).startswith(f"{path}: ") and "\n" not in str(err.value)
        assert path.stat().st_ino == inode
    finally:
        holder.communicate("")
    remove_unused(path)
    assert not path.exists()


def test_checkpoint_must_name_the_same_file(tmp_path):
    first = make(tmp_path, "arrow")
    first.begin_epoch(0)
    state = first.state_dict()
    first.close()
    os.remove(first.path)
    make(tmp_path, "arrow").close()  # a new file with fresh estimates at the same place
    resumed = make(tmp_path, "arrow", resume=True)
    with pytest.raises(StoreError, match="not the store file the checkpoint refers to"):
        resumed.load_state_dict(state)
    with pytest.raises(StoreError, match="load_state_dict"):
        resumed.begin_epoch(0)
    other = make(tmp_path, "device", seed=9)
    with pytest.raises(StoreError, match="seed: the run expects 9, found 3"):
        other.load_state_dict(state)


# ----------------------------------------------------------------------------- policy

def test_auto_policy_spills_over_budget_and_logs(tmp_path, caplog):
    caplog.set_level(logging.INFO, logger="dddm.store")
    small = open_store("auto", tmp_path / "a", 40, SHAPE, "float32", 0, "fp", "cpu", budget_fraction=1.0)
    assert isinstance(small, DeviceStore)
    assert "-> device" in caplog.text and "5.1 KB" in caplog.text and "available RAM" in caplog.text
    big = open_store("auto", tmp_path / "b", 40, SHAPE, "float32", 0, "fp", "cpu", budget_fraction=1e-12)
    assert isinstance(big, ArrowStore) and big.path.exists()
    assert "-> arrow" in caplog.text
    big.begin_epoch(0)
    state = big.state_dict()
    big.close()
    # resuming under auto stays on the existing file, whatever the budget says now
    again = open_store("auto", tmp_path / "b", 40, SHAPE, "float32", 0, "fp", "cpu", budget_fraction=1.0,
                       resume=True)
    assert isinstance(again, ArrowStore)
    again.load_state_dict(state)


# ----------------------------------------------------------------------------- training

class Tiny(nn.Module):
    """F(x0_est, x_t): two convolutions over the concatenated images."""

    def __init__(self, channels: int):
        super().__init__()
        self.a = nn.Conv2d(2 * channels, 8, 3, padding=1)
        self.b = nn.Conv2d(8, channels, 3, padding=1)

    def forward(self, est, x_t):
        return x_t - self.b(torch.nn.functional.silu(self.a(torch.cat([est, x_t], 1))))


N_TRAIN, BATCH = 24, 5
STEPS_PER_EPOCH = -(-N_TRAIN // BATCH)
DATA = torch.rand(N_TRAIN, *SHAPE, generator=torch.Generator().manual_seed(7)) * 2 - 1


def new_model():
    torch.manual_seed(0)
    net = Tiny(SHAPE[0])
    return net, torch.optim.Adam(net.parameters(), lr=1e-2)


def train(store, net, opt, total_steps, start=0, checkpoint_every=None, crash_at=None):
    """training.py's loop in miniature; returns the last checkpoint taken."""
    saved = None
    step = start
    while step < total_steps:
        epoch, position = divmod(step, STEPS_PER_EPOCH)
        store.begin_epoch(epoch)
        order = torch.randperm(N_TRAIN, generator=torch.Generator().manual_seed(100 + epoch))
        for idx in list(torch.tensor_split(order, STEPS_PER_EPOCH))[position:]:
            g = torch.Generator().manual_seed(1000 + step)
            x0 = DATA[idx]
            x_t = x0 + torch.randn(x0.shape, generator=g)
            est = store.gather(idx)
            pred = net(est, x_t)
            w = 1 / (epoch + 1)
            loss = w * (pred - x0).pow(2).mean() + (1 - w) * (pred - est).pow(2).mean()
            opt.zero_grad()
            loss.backward()
            opt.step()
            store.scatter(idx, pred.detach())
            step += 1
            if (checkpoint_every and step % checkpoint_every == 0) or \
                    (step % STEPS_PER_EPOCH == 0 and store.needs_epoch_checkpoint):
                saved = {"step": step, "net": copy.deepcopy(net.state_dict()),
                         "opt": copy.deepcopy(opt.state_dict()), "store": store.state_dict()}
            if step == crash_at:
                return saved
            if step == total_steps:
                break
    return saved


def params(net):
    return [p.detach().clone() for p in net.parameters()]


@pytest.mark.parametrize("dtype", DTYPES)
def test_backends_train_bit_identically(tmp_path, dtype):
    results = []
    for backend in BACKENDS:
        store = make(tmp_path, backend, n=N_TRAIN, dtype=dtype, sub=backend)
        net, opt = new_model()
        train(store, net, opt, total_steps=3 * STEPS_PER_EPOCH)
        results.append((params(net), store.estimates()))
    (p_dev, e_dev), (p_arr, e_arr) = results
    assert all(torch.equal(a, b) for a, b in zip(p_dev, p_arr))
    assert torch.equal(e_dev, e_arr)
    assert not torch.equal(e_dev, as_storage(initial_estimates(torch.arange(N_TRAIN), SHAPE, 3), dtype))


@pytest.mark.parametrize("backend,resume_backend", [("device", "device"), ("arrow", "arrow"),
                                                     ("device", "arrow"), ("arrow", "device")])
@pytest.mark.parametrize("crash_at", [9, 11, 14])  # after checkpoints at 8 (mid-epoch 1), 10 (Arrow: end of epoch 1; device: 8), 12
def test_resume_after_crash_matches_uninterrupted_run(tmp_path, backend, resume_backend, crash_at):
    total = 3 * STEPS_PER_EPOCH
    ref_store = make(tmp_path, backend, n=N_TRAIN, dtype="float16", sub="ref")
    ref_net, ref_opt = new_model()
    train(ref_store, ref_net, ref_opt, total, checkpoint_every=4)

    store = make(tmp_path, backend, n=N_TRAIN, dtype="float16", sub="run")
    net, opt = new_model()
    ckpt = train(store, net, opt, total, checkpoint_every=4, crash_at=crash_at)
    assert ckpt["step"] < crash_at  # the crashed run wrote estimates after its last checkpoint
    del store  # killed: no close, the Arrow file keeps whatever was written after the checkpoint

    sub = "run" if resume_backend == backend else "other"
    resumed = make(tmp_path, resume_backend, n=N_TRAIN, dtype="float16", sub=sub, resume=True)
    net, opt = new_model()
    net.load_state_dict(ckpt["net"])
    opt.load_state_dict(ckpt["opt"])
    resumed.load_state_dict(ckpt["store"])
    train(resumed, net, opt, total, start=ckpt["step"], checkpoint_every=4)
    assert all(torch.equal(a, b) for a, b in zip(params(net), params(ref_net)))
    assert torch.equal(resumed.estimates(), ref_store.estimates())


def test_device_checkpoint_holds_the_estimates(tmp_path):
    store = make(tmp_path, "device", n=N_TRAIN)
    store.begin_epoch(0)
    state = store.state_dict()
    assert state["estimates"].shape == (N_TRAIN, *SHAPE) and state["estimates"].dtype == torch.float32
    before = state["estimates"].clone()
    store.scatter(torch.tensor([0]), torch.zeros(1, *SHAPE))
    assert torch.equal(state["estimates"], before)  # a copy, not a view of the live buffer
    store_arrow = make(tmp_path, "arrow", n=N_TRAIN, sub="arrow")
    store_arrow.begin_epoch(0)
    small = store_arrow.state_dict()
    assert "estimates" not in small and small["slot"].numel() == (N_TRAIN + 7) // 8


@pytest.mark.parametrize("batches", [1, 4])
def test_from_disk_mode_and_record_batches(tmp_path, monkeypatch, batches):
    """The path for files larger than RAM (prefetch + pwrite), and files split into several record
    batches (more than 2^31 - 1 values per slot; here with a lowered limit), give the same values
    as the plain mapped path; a reopened multi-batch file validates and maps every batch."""
    shape = (4, 32, 32)
    monkeypatch.setattr("dddm.store.arrow_file.MAX_ARRAY_ELEMENTS", 8 * 4096 + 5 if batches > 1 else 2**31 - 1)
    stores = [make(tmp_path, "arrow", n=30, shape=shape, dtype="float16", sub=f"s{i}") for i in range(3)]
    assert pa.ipc.open_file(str(stores[0].path)).num_record_batches == batches
    for table in stores[1]._file.tables:
        table.from_disk = True
    stores[2].begin_epoch(0)
    state = stores[2].state_dict()
    stores[2].close()
    monkeypatch.setattr("dddm.store.arrow_file.MAX_ARRAY_ELEMENTS", 2**31 - 1)  # the file records its own split
    stores[2] = make(tmp_path, "arrow", n=30, shape=shape, dtype="float16", sub="s2", resume=True)
    stores[2].load_state_dict(state)
    gen = torch.Generator().manual_seed(5)
    for epoch in range(3):
        for s in stores:
            s.begin_epoch(epoch)
        for idx in torch.randperm(30, generator=gen).split(7):
            vals = torch.randn(len(idx), *shape, generator=gen)
            outs = [s.gather(idx) for s in stores]
            assert torch.equal(outs[0], outs[1]) and torch.equal(outs[0], outs[2])
            for s in stores:
                s.scatter(torch.cat([idx, idx[:1]]), torch.cat([vals, vals[:1] * 2]))
    for s in stores[1:]:
        assert torch.equal(stores[0].estimates(), s.estimates())
        s.state_dict()
        assert np.array_equal(plain_pyarrow_estimates(s.path)[1], stores[0].estimates().numpy())
        assert np.array_equal(read_store_file(s.path)["estimates"], stores[0].estimates().numpy())


def test_device_checkpoint_into_an_existing_arrow_file(tmp_path):
    """auto resumes on the Arrow file when one exists, even if the checkpoint came from the device store."""
    device = make(tmp_path, "device", n=N_TRAIN, sub="dev")
    net, opt = new_model()
    ckpt = train(device, net, opt, total_steps=7, checkpoint_every=7)  # mid-epoch 1
    make(tmp_path, "arrow", n=N_TRAIN, sub="arr").close()  # an existing file with other contents
    arrow = make(tmp_path, "arrow", n=N_TRAIN, sub="arr", resume=True)
    arrow.load_state_dict(ckpt["store"])
    assert torch.equal(arrow.estimates(), device.estimates())
    for s in (device, arrow):
        s.begin_epoch(1)
    rest = torch.arange(N_TRAIN)[~torch.from_numpy(device._written)]
    assert torch.equal(arrow.gather(rest), device.gather(rest))


# ----------------------------------------------------------------------------- damaged store files

BIG = (3, 16, 16)  # 3 KB rows: an 8 KB patch lies inside the estimates of a few rows


def checkpointed_file(tmp_path, epochs=2, mid_epoch=False):
    """An Arrow store after `epochs` epochs of scatters (and half of the next one if mid_epoch), its
    checkpoint state and the estimates that state stands for; the store is closed."""
    store = make(tmp_path, "arrow", n=24, shape=BIG)
    gen = torch.Generator().manual_seed(1)
    for epoch in range(epochs + mid_epoch):
        store.begin_epoch(epoch)
        order = torch.randperm(24, generator=gen)
        for idx in (order[:12] if epoch == epochs else order).split(5):
            store.gather(idx)
            store.scatter(idx, torch.randn(len(idx), *BIG, generator=gen))
    state, expected = store.state_dict(), store.estimates()
    slot_offsets = [int(table.offsets[0]) for table in store._file.tables]  # file offset of row 0 per slot
    store.close()
    return store, state, expected, slot_offsets


def bits(packed: torch.Tensor) -> np.ndarray:
    return np.unpackbits(packed.numpy(), count=24)


def damage(path, offset, data: bytes) -> None:
    with open(path, "r+b") as f:
        f.seek(offset)
        f.write(data)


@pytest.mark.parametrize("kind", ["random", "0xff", "1e4"])
def test_damaged_estimates_stop_the_resume_naming_the_file(tmp_path, kind):
    """The three cases of issue #12: 8 KB of random bytes or of 0xFF in the middle of the file, and
    64 estimates set to 1e4 (finite, plausible): each stops the resume with the file and the way out,
    instead of a NaN later, a run that fails forever, or a different model."""
    store, state, _, slot_offsets = checkpointed_file(tmp_path)
    size = os.path.getsize(store.path)
    if kind == "1e4":  # in row 1's newest estimate, which the checkpoint needs
        newest = bits(state["slot"]) ^ bits(state["written"])
        damage(store.path, slot_offsets[newest[1]] + 4 * 1000, np.full(64, 1e4, np.float32).tobytes())
    else:
        patch = np.random.default_rng(0).bytes(8192) if kind == "random" else b"\xff" * 8192
        damage(store.path, size // 2 - 4096, patch)
    resumed = make(tmp_path, "arrow", n=24, shape=BIG, resume=True)
    with pytest.raises(StoreError, match="do not match their checksums") as err:
        resumed.load_state_dict(state)
    assert str(store.path) in str(err.value) and "train.resume=never" in str(err.value)


def test_damage_while_training_is_caught_at_gather(tmp_path):
    store = make(tmp_path, "arrow", n=24, shape=BIG)
    store.begin_epoch(0)
    damage(store.path, int(store._file.tables[0].offsets[0]) + 3 * 3072, b"\xff" * 4096)  # rows 3 and 4
    store.gather(torch.tensor([0, 1, 2, 5]))  # undamaged rows read fine
    with pytest.raises(StoreError, match="dataset index 3, column est_0") as err:
        store.gather(torch.tensor([2, 3]))
    assert str(store.path) in str(err.value)


def test_damage_to_a_slot_the_checkpoint_does_not_need_is_harmless(tmp_path):
    """Mid-epoch, the free slot of the rows not yet written holds nothing the checkpoint needs: the
    resume verifies, and continues from exactly the checkpoint's estimates."""
    store, state, expected, slot_offsets = checkpointed_file(tmp_path, epochs=1, mid_epoch=True)
    row = int(np.flatnonzero(bits(state["written"]) == 0)[0])
    damage(store.path, slot_offsets[1 - bits(state["slot"])[row]] + row * 3 * 16 * 16 * 4, b"\xff" * 1024)
    resumed = make(tmp_path, "arrow", n=24, shape=BIG, resume=True)
    resumed.load_state_dict(state)
    assert torch.equal(resumed.estimates(), expected)


@pytest.mark.parametrize("where", ["magic", "schema metadata", "footer"])
def test_damaged_header_or_footer_is_rejected_naming_the_file(tmp_path, where):
    store, state, _, _ = checkpointed_file(tmp_path, epochs=1)
    raw = store.path.read_bytes()
    offset = {"magic": 0, "schema metadata": raw.index(b"fp-1"), "footer": len(raw) - 10}[where]
    damage(store.path, offset, b"\x00XYZ")
    with pytest.raises(StoreError) as err:
        make(tmp_path, "arrow", n=24, shape=BIG, resume=True).load_state_dict(state)
    assert str(store.path) in str(err.value)


def test_non_finite_estimates_are_caught(tmp_path):
    """A NaN in a device checkpoint is refused on load; one that reaches the buffer, at gather."""
    store = make(tmp_path, "device", n=24)
    store.begin_epoch(0)
    state = store.state_dict()
    state["estimates"][5, 0, 1, 1] = float("nan")
    with pytest.raises(StoreError, match="sample 5 in the checkpoint is not finite"):
        make(tmp_path, "device", n=24, resume=True).load_state_dict(state)
    store._buf[7, 3] = float("inf")
    store.gather(torch.tensor([6, 8]))
    with pytest.raises(StoreError, match="sample 7 is not finite"):
        store.gather(torch.tensor([1, 7]))
