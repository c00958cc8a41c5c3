"""Datasets that stream: rows read from the stored file, batches identical to the in-memory
path (sharded too), images.npy written a face at a time, calibration bounded in the gallery."""

from __future__ import annotations

import gc
import io
import threading
import zipfile
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from facegrad.data.archive import DatasetError, Limits
from facegrad.data.batches import DeviceBatches, StreamBatches, loading_mode, make_batches
from facegrad.data.datasets import build_from_zip
from facegrad.data.store import FaceArrays, NpyRows, NpyRowWriter, rows_source
from facegrad.pipeline import run_training_job
from facegrad.recognition import open_set
from facegrad.recognition.architectures import build_model
from facegrad.recognition.gallery import embed
from tests.test_training import _orl_faces, cfg

CPU = torch.device("cpu")


@pytest.fixture(scope="module")
def stored(tmp_path_factory):
    """A stored dataset of 120 random 150x150 faces, 6 identities, and its arrays in memory."""
    rng = np.random.default_rng(7)
    images = rng.integers(0, 256, (120, 150, 150, 3), dtype=np.uint8)
    labels = np.arange(120) % 6
    folder = tmp_path_factory.mktemp("ds")
    FaceArrays(images, labels, [f"p{i}" for i in range(6)]).save(folder)
    return folder, images, labels


def _mapped(path: Path) -> bool:
    return str(path) in Path("/proc/self/maps").read_text()


def test_reader_reads_any_rows_without_mapping_the_file(stored):
    folder, images, _ = stored
    reader = NpyRows(folder / "images.npy")
    assert len(reader) == 120 and reader.row_shape == (150, 150, 3)
    rng = np.random.default_rng(0)
    for rows in (rng.integers(0, 120, 50), np.array([7, 7, 3, 119, 0, 3]),
                 np.arange(10, 40), np.array([5]), np.array([], dtype=np.int64)):
        got = reader.read(rows)
        assert got.shape == (len(rows), 150, 150, 3)
        assert np.array_equal(got, images[rows])
    out = np.empty((3, 150, 150, 3), np.uint8)
    assert reader.read([9, 1, 9], out=out) is out and np.array_equal(out, images[[9, 1, 9]])
    with pytest.raises(IndexError):
        reader.read([120])
    assert not _mapped(folder / "images.npy")
    # a memory-mapped stored dataset is read through the file, an array in memory indexed
    assert isinstance(rows_source(FaceArrays.load(folder).images), NpyRows)
    assert not isinstance(rows_source(images), NpyRows)
    assert not isinstance(rows_source(np.asarray(FaceArrays.load(folder).images)[::2]), NpyRows)


def _batches(b, seed, augment, drop_last, shard=(0, 1), batch_size=16):
    g = torch.Generator().manual_seed(seed)
    return list(b.epoch(batch_size, g, augment, drop_last, shard=shard))


@pytest.mark.parametrize("source", ["mapped", "path", "array"])
@pytest.mark.parametrize("augment,drop_last", [(True, True), (True, False), (False, False)])
@pytest.mark.parametrize("resize_once", [True, False])
def test_stream_yields_the_batches_of_memory(stored, source, augment, drop_last, resize_once):
    folder, images, labels = stored
    src = {"mapped": FaceArrays.load(folder).images, "path": folder / "images.npy",
           "array": images}[source]
    index = np.arange(3, 120, 2)
    mem = DeviceBatches(images, labels, 48, CPU, index=index)
    stream = StreamBatches(src, labels, 48, CPU, index=index, resize_once=resize_once)
    assert (stream.resized is not None) == resize_once
    # the resized copy is an unlinked file: nothing is left in the dataset's folder
    assert sorted(p.name for p in folder.iterdir()) == ["images.npy", "labels.npy",
                                                        "names.json"]
    assert len(mem) == len(stream) == len(index)
    assert mem.num_batches(16, drop_last) == stream.num_batches(16, drop_last)
    a, b = _batches(mem, 5, augment, drop_last), _batches(stream, 5, augment, drop_last)
    assert len(a) == len(b) == mem.num_batches(16, drop_last)
    for (xa, ya), (xb, yb) in zip(a, b):
        assert torch.equal(xa, xb) and torch.equal(ya, yb)
    # and the generator is left in the same state: the next epoch matches too
    ga, gb = torch.Generator().manual_seed(5), torch.Generator().manual_seed(5)
    for _ in range(2):
        pa = list(mem.epoch(16, ga, augment, drop_last))
        pb = list(stream.epoch(16, gb, augment, drop_last))
    assert all(torch.equal(x, y) for (x, _), (y, _) in zip(pa, pb))


@pytest.mark.parametrize("cls", [DeviceBatches, StreamBatches])
@pytest.mark.parametrize("world", [2, 3])
def test_shards_together_are_the_one_process_batch(stored, cls, world):
    folder, images, labels = stored
    kw = {"resize_once": world == 2} if cls is StreamBatches else {}
    b = cls(folder / "images.npy" if cls is StreamBatches else images, labels, 40, CPU,
            index=np.arange(100), **kw)
    whole = _batches(b, 9, True, False, batch_size=32)  # 4 batches, the last of 4 rows
    shards = [_batches(b, 9, True, False, (r, world), 32) for r in range(world)]
    for r in range(world):
        assert len(shards[r]) == len(whole) == b.num_batches(32, False)
    # the same rows, the same random draws and the same per-image operations, but a shard is a
    # smaller batch than the whole (down to 1 row of the last): torch may split a reduction
    # such as the per-image mean across threads by the batch's shape and the CPU's thread
    # count, so the floats agree to float32 rounding, not to the bit; the rows and labels
    # must match exactly
    for i, (x, y) in enumerate(whole):
        for r in range(world):
            xr, yr = shards[r][i]
            torch.testing.assert_close(xr, x[r::world])
            assert torch.equal(yr, y[r::world])
        joined = torch.empty_like(x)
        for r in range(world):
            joined[r::world] = shards[r][i][0]
        torch.testing.assert_close(joined, x)
    with pytest.raises(ValueError):
        next(b.epoch(32, None, False, shard=(2, 2)))


def _stream_threads():
    return [t for t in threading.enumerate() if t.name == "facegrad-stream-batches"]


def test_the_reading_thread_stops_when_the_epoch_is_dropped(stored):
    folder, _, labels = stored
    b = StreamBatches(folder / "images.npy", labels, 32, CPU)
    before = len(_stream_threads())
    it = b.epoch(4, torch.Generator().manual_seed(0), True)
    next(it)
    assert len(_stream_threads()) == before + 1
    it.close()
    assert len(_stream_threads()) == before
    it = b.epoch(4, torch.Generator().manual_seed(0), True)
    next(it)
    del it
    gc.collect()
    assert len(_stream_threads()) == before
    assert sum(len(x) for x, _ in b.epoch(4, None, False)) == 120  # ran to its end
    assert len(_stream_threads()) == before


def test_reading_errors_reach_the_training_thread(stored, tmp_path):
    folder, images, labels = stored
    path = tmp_path / "images.npy"
    path.write_bytes((folder / "images.npy").read_bytes())
    b = StreamBatches(path, labels, 32, CPU, resize_once=False)
    with open(path, "r+b") as f:  # truncated after it was opened
        f.truncate(path.stat().st_size // 2)
    with pytest.raises(OSError):
        list(b.epoch(8, None, False))
    assert not _stream_threads()


def test_make_batches_picks_by_data_loading(stored):
    folder, images, labels = stored
    assert loading_mode("auto", 1000, 64) == "memory"
    assert loading_mode("auto", 100_000, 64) == "stream"  # 1.2 GB resized
    assert loading_mode("stream", 10, 64) == "stream"
    for mode, cls in (("memory", DeviceBatches), ("stream", StreamBatches),
                      ("auto", DeviceBatches)):
        b = make_batches(folder / "images.npy", labels, np.arange(50), 32, CPU, mode=mode)
        assert isinstance(b, cls) and len(b) == 50


def test_row_writer_writes_a_valid_npy_atomically(tmp_path):
    rng = np.random.default_rng(1)
    rows = rng.integers(0, 256, (7, 5, 4, 3), dtype=np.uint8)
    path = tmp_path / "images.npy"
    with NpyRowWriter(path, (5, 4, 3)) as w:
        w.append(rows[0])
        w.append(rows[1:6])
        assert not path.exists()  # nothing at the final name until finished
        w.append(rows[6])
        w.finish()
    assert np.array_equal(np.load(path), rows)
    assert np.array_equal(NpyRows(path).read([6, 0]), rows[[6, 0]])
    assert sorted(p.name for p in tmp_path.iterdir()) == ["images.npy"]
    with NpyRowWriter(tmp_path / "empty.npy", (2,), np.int64) as w:
        w.finish()
    assert np.load(tmp_path / "empty.npy").shape == (0, 2)

    with pytest.raises(RuntimeError):
        with NpyRowWriter(tmp_path / "failed.npy", (5, 4, 3)) as w:
            w.append(rows[0])
            raise RuntimeError("decoding failed")
    with pytest.raises(ValueError):
        with NpyRowWriter(tmp_path / "failed.npy", (5, 4, 3)) as w:
            w.append(rows[0, :2])
    assert sorted(p.name for p in tmp_path.iterdir()) == ["empty.npy", "images.npy"]


def _zip(path: Path, faces: dict[str, list[np.ndarray]]) -> Path:
    with zipfile.ZipFile(path, "w") as z:
        for who, imgs in faces.items():
            for i, img in enumerate(imgs):
                buf = io.BytesIO()
                Image.fromarray(img).save(buf, "PNG")
                z.writestr(f"{who}/{i}.png", buf.getvalue())
    return path


def test_upload_builds_images_npy_incrementally(tmp_path):
    rng = np.random.default_rng(2)
    faces = {f"p{k}": [rng.integers(0, 256, (150, 150, 3), dtype=np.uint8) for _ in range(3)]
             for k in range(3)}
    up = _zip(tmp_path / "upload-1", faces)
    report = build_from_zip(up, Limits())
    arrays = report.arrays
    assert isinstance(arrays.images, np.memmap) and arrays.images.shape == (9, 150, 150, 3)
    assert np.array_equal(arrays.images, np.stack([f for k in sorted(faces) for f in faces[k]]))
    dest = tmp_path / "datasets" / "d1"
    arrays.save(dest)  # linked into place, not read back through memory
    again = FaceArrays.load(dest)
    assert np.array_equal(again.images, arrays.images) and again.names == ["p0", "p1", "p2"]
    assert (up.parent / "upload-1.images.npy").exists()
    del report, arrays
    gc.collect()
    assert not (up.parent / "upload-1.images.npy").exists()  # the build's copy is gone
    assert np.array_equal(FaceArrays.load(dest).images[4], faces["p1"][1])

    # a failed build (one identity only) leaves no images.npy and no part file
    up2 = _zip(tmp_path / "upload-2", {"p0": faces["p0"]})
    with pytest.raises(DatasetError):
        build_from_zip(up2, Limits())
    gc.collect()
    assert not [p for p in tmp_path.iterdir() if p.name.startswith("upload-2.")]


def test_embed_reads_a_stored_dataset_through_the_reader(stored):
    folder, images, _ = stored
    model = build_model("seed_cnn", 6, 32).eval()
    mapped = FaceArrays.load(folder).images
    a = embed(model, np.asarray(mapped), 32, batch_size=16)
    assert not _mapped(folder / "images.npy") or not _touched(folder / "images.npy")
    b = embed(model, images, 32, batch_size=16)
    c = embed(model, folder / "images.npy", 32, batch_size=16, index=np.arange(0, 120, 3))
    # a and b run the same batches through the same kernels: equal to the bit. c embeds a
    # third of the rows, so its batches hold other rows and other counts; oneDNN's convolution
    # blocking (and so its float rounding) follows the batch shape and the CPU's ISA, so c
    # agrees with b[::3] to float32 rounding only (differs by ~1e-7 on Intel, equal on AMD)
    assert torch.equal(a, b)
    torch.testing.assert_close(c, b[::3], rtol=0, atol=1e-5)


def _touched(path: Path) -> bool:
    """Whether any page of ``path``'s mappings in this process is resident (Rss > 0)."""
    lines = Path("/proc/self/smaps").read_text().splitlines()
    for i, line in enumerate(lines):
        if line.endswith(str(path)):
            for entry in lines[i + 1:i + 8]:
                if entry.startswith("Rss:") and int(entry.split()[1]) > 0:
                    return True
    return False


def _old_verify(emb, labels):
    """verify_threshold as it was (every pair, no sampling), for the comparison."""
    n = emb.shape[0]
    iu = torch.triu_indices(n, n, 1)
    sims = (emb @ emb.t())[iu[0], iu[1]].double()
    return open_set._best_cut(sims, labels[iu[0]] == labels[iu[1]])


def _gallery(n_ids=12, per=8, seed=0):
    g = torch.Generator().manual_seed(seed)
    centres = torch.nn.functional.normalize(torch.randn(n_ids, 32, generator=g), dim=1)
    owner = torch.arange(n_ids).repeat_interleave(per)
    emb = torch.nn.functional.normalize(centres[owner] + 0.6 * torch.randn(len(owner), 32,
                                                                          generator=g), dim=1)
    return emb, owner


def test_calibration_in_chunks_is_calibration_at_once(monkeypatch):
    emb, owner = _gallery()
    honest = torch.tensor([1, 4, 7])
    known = torch.cat([torch.nonzero(torch.isin(owner, honest)).view(-1), torch.arange(5)])
    whole = open_set.calibrate(emb, owner, 12, honest, known, None)
    scores = open_set.leave_out_scores(emb, owner, 12, honest, known)
    monkeypatch.setattr(open_set, "SCORE_CELLS", 3 * 96)  # 3 probes at a time
    # each probe row is scored on its own; only the matrix product's blocking differs, and with
    # it the float rounding of the scores on some CPUs (a few 1e-8): figures and thresholds read
    # off them agree to that, not to the bit
    assert open_set.calibrate(emb, owner, 12, honest, known, None) == pytest.approx(whole,
                                                                                    abs=1e-5)
    small = open_set.leave_out_scores(emb, owner, 12, honest, known)
    assert torch.equal(scores["known_ok"], small["known_ok"])  # no near-tie in this gallery
    for k in ("known_score", "stranger_score"):
        assert torch.allclose(scores[k], small[k], atol=1e-6, rtol=0)
    is_h = torch.isin(owner, honest)
    assert open_set.verify_threshold(emb[is_h], owner[is_h]) == _old_verify(emb[is_h],
                                                                             owner[is_h])


def test_calibration_samples_the_probes_of_a_large_gallery(monkeypatch):
    """Past MAX_PROBES probes of a kind, a seeded sample of them is scored: the cost stays
    linear in the gallery, and the threshold read off the sample is close to the full one's."""
    emb, owner = _gallery(n_ids=40, per=30, seed=5)  # 1200 images
    honest = torch.arange(0, 40, 2)  # 20 people, 600 images: 600 known and 600 stranger probes
    full = open_set.calibrate(emb, owner, 40, honest, None, None)
    monkeypatch.setattr(open_set, "MAX_PROBES", 300)
    scores = open_set.leave_out_scores(emb, owner, 40, honest)
    assert len(scores["known_score"]) == len(scores["stranger_score"]) == 300
    sampled = open_set.calibrate(emb, owner, 40, honest, None, None)
    assert sampled["calibrated_on"] == 300 and full["calibrated_on"] == 600
    assert abs(sampled["threshold"] - full["threshold"]) < 0.03
    assert open_set.calibrate(emb, owner, 40, honest, None, None) == sampled  # seeded


def test_verify_threshold_samples_pairs_of_a_large_gallery():
    emb, owner = _gallery(n_ids=40, per=30, seed=3)  # 1200 images, 719400 pairs
    exact = open_set.verify_threshold(emb, owner)
    assert exact == _old_verify(emb, owner) and exact[2] == 1200 * 1199 // 2
    # the same-person pairs (17400) all fit in the sample; the different ones are drawn
    thr, acc, pairs = open_set.verify_threshold(emb, owner, max_pairs=10_000,
                                                sample_pairs=20_000)
    assert pairs == 17_400 + 20_000
    assert abs(thr - exact[0]) < 0.03 and abs(acc - exact[1]) < 0.01
    # fewer than the same-person pairs: those are drawn too; seeded, so repeatable
    thr2, acc2, pairs2 = open_set.verify_threshold(emb, owner, 10_000, 5_000)
    assert pairs2 == 10_000 and abs(thr2 - exact[0]) < 0.05 and abs(acc2 - exact[1]) < 0.02
    assert open_set.verify_threshold(emb, owner, 10_000, 5_000) == (thr2, acc2, pairs2)
    i, j = open_set._sample_pairs(owner, 5_000)
    assert bool((i != j).all())
    assert int((owner[i] == owner[j]).sum()) == 5_000


def test_verify_threshold_caps_the_false_accept_rate():
    """With max_far the best cut is raised, where it lets more different-person pairs through,
    to the score only that share of them reach; the balanced accuracy is the one at it."""
    emb, owner = _gallery(n_ids=20, per=10, seed=7)  # hard pairs: the best cut is in the tails
    sims, same = open_set.pair_scores(emb, owner)  # every pair, as verify_threshold scores them
    best = open_set.verify_threshold(emb, owner)
    assert float((sims[~same] >= best[0]).double().mean()) > 0.01  # the best cut alone
    thr, acc, pairs = open_set.verify_threshold(emb, owner, max_far=0.01)
    assert thr > best[0] and pairs == best[2]
    assert float((sims[~same] >= thr).double().mean()) <= 0.01
    accepted = sims >= thr
    expected = 0.5 * (float(accepted[same].double().mean())
                      + float((~accepted[~same]).double().mean()))
    assert acc == pytest.approx(expected) and acc < best[1]
    # a cap the best cut already meets changes nothing
    assert open_set.verify_threshold(emb, owner, max_far=0.5) == best


def test_training_streams_the_same_run_as_memory(tmp_path):
    faces = _orl_faces(6)
    folder = tmp_path / "ds"
    faces.save(folder)
    runs = {}
    for mode in ("memory", "stream"):
        data = FaceArrays.load(folder)
        runs[mode] = run_training_job(cfg(epochs=2, data_loading=mode), data, tmp_path / mode)
    assert len(runs["stream"].history) == 2
    for a, b in zip(runs["memory"].history, runs["stream"].history):
        for key in ("train_loss", "train_acc", "val_loss", "val_acc"):
            assert a[key] == b[key], key
    assert runs["memory"].open_set == runs["stream"].open_set
    assert not _stream_threads()
