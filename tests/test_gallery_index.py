"""The gallery's vector index (facegrad.recognition.index) and its use by
facegrad.recognition.inference: top-k identities as the dense nearest-image scoring gives them, the
approximate index against the exact one, add/remove, persistence (reload, stale or corrupt index
rebuilt), and enrolment seen across LoadedModel instances and processes."""

from __future__ import annotations

import multiprocessing as mp

import numpy as np
import pytest
import torch

from facegrad.data.preprocess import PREPROCESSING_VERSION
from facegrad.recognition import index as gi
from facegrad.recognition.architectures import build_model
from facegrad.recognition.gallery import INDEX_FILE, Candidates, Gallery
from facegrad.recognition.index import EXACT_BELOW, GalleryIndex, top_identities
from facegrad.recognition.inference import LoadedModel
from facegrad.training import checkpoint as ckpt

D = 128


def descriptors(n: int, seed: int = 0, spread: float = 1 / 3, shared: float = 0.22):
    """``n`` unit vectors built like face descriptors (as bench/gallery_scale.py builds them):
    identities of 1-9 images around a centre; same-person cosine about 1 / (1 + spread²) = 0.9,
    different people about 0.2. Returns (emb, owner, centres)."""
    rng = np.random.default_rng(seed)
    sizes = rng.integers(1, 10, size=n // 4 + 10)
    sizes = sizes[:np.searchsorted(np.cumsum(sizes), n) + 1]
    owner = np.repeat(np.arange(len(sizes)), sizes)[:n]
    common = _unit(rng.standard_normal(D))
    centres = _unit(np.sqrt(shared) * common
                    + np.sqrt(1 - shared) * _unit(rng.standard_normal((len(sizes), D))))
    return views(centres[owner], rng, spread), owner, centres


def views(centres: np.ndarray, rng, spread: float = 1 / 3) -> np.ndarray:
    return _unit(centres + spread * rng.standard_normal(centres.shape) / np.sqrt(D))


def _unit(x: np.ndarray) -> np.ndarray:
    return (x / np.linalg.norm(x, axis=-1, keepdims=True)).astype(np.float32)


def gallery_of(emb: np.ndarray, owner: np.ndarray) -> Gallery:
    c = int(owner.max()) + 1
    return Gallery([f"p{i}" for i in range(c)], torch.from_numpy(emb),
                   torch.from_numpy(owner).long(), torch.bincount(torch.from_numpy(owner),
                                                                  minlength=c))


def dense_top(g: Gallery, probes: torch.Tensor, k: int) -> Candidates:
    return Candidates.from_dense(g.scores(probes), k)


def assert_same_ranking(got: Candidates, want: Candidates, atol: float = 1e-5) -> None:
    """The same identities in the same order, except where two identities' scores lie within
    ``atol``: FAISS and torch's matrix product sum in other orders (and other kernels per CPU),
    so such a near-tie may come out either way."""
    torch.testing.assert_close(got.scores, want.scores, rtol=0, atol=atol)
    differ = got.index != want.index
    assert bool(torch.all((got.scores[differ] - want.scores[differ]).abs() <= atol)), \
        "identities ranked differently where their scores are not tied"


# --- top-k identities against the dense scoring --------------------------------------------

def test_top_identities_are_the_dense_scorings_on_a_small_gallery():
    rng = np.random.default_rng(1)
    emb, owner, centres = descriptors(2000, seed=1)
    g = gallery_of(emb, owner)
    assert g.index.kind == "exact"
    probes = torch.from_numpy(np.concatenate([views(centres[:40], rng),
                                              _unit(rng.standard_normal((20, D)))]))
    for k in (1, 3, 5, 20, 100):
        got, want = g.search(probes, k), dense_top(g, probes, k)
        assert_same_ranking(got, want)
    # the identities' best images are what the scores are: p0's probe names p0 first
    assert (g.search(probes[:40], 1).index[:, 0] == torch.arange(40)).float().mean() >= 0.95


def test_a_crowded_identity_makes_the_search_fetch_more_images():
    """One identity with 60 images right around the probe fills the first fetch (k - 1 +
    max_images images); the search fetches more until it holds k identities."""
    rng = np.random.default_rng(2)
    emb, owner, centres = descriptors(500, seed=2)
    g = gallery_of(emb, owner)
    probe = torch.from_numpy(views(centres[:1], rng, spread=0.05))
    g.enroll("crowd", torch.from_numpy(views(np.repeat(centres[:1], 60, 0), rng, spread=0.05)))
    g.enroll("nobody", torch.zeros(0, D))  # an identity without images is never a candidate
    got, want = g.search(probe, 5), dense_top(g, probe, 5)
    assert_same_ranking(got, want)
    assert (got.index >= 0).all()
    assert {g.labels[i] for i in got.index[0, :2].tolist()} == {"crowd", "p0"}
    assert g.labels.index("nobody") not in got.index.tolist()[0]


def test_fewer_identities_than_asked_are_padded():
    emb, owner, _ = descriptors(12, seed=3)
    g = gallery_of(emb, owner)
    c = len(g.labels)
    got = g.search(torch.from_numpy(emb[:2]), c + 3)
    assert (got.index[:, :c] >= 0).all() and (got.index[:, c:] == -1).all()
    assert (got.scores[:, c:] == -2).all()
    empty = Gallery([], torch.zeros(0, D), torch.zeros(0, dtype=torch.long),
                    torch.zeros(0, dtype=torch.long))
    out = empty.search(torch.from_numpy(emb[:2]), 5)
    assert (out.index == -1).all() and out.index.shape == (2, 5)


def test_edits_keep_the_index_equal_to_the_dense_scoring():
    rng = np.random.default_rng(4)
    emb, owner, centres = descriptors(3000, seed=4)
    g = gallery_of(emb, owner)
    g.index  # noqa: B018 (built, then edited in place)
    probes = torch.from_numpy(views(centres[:60], rng))
    g.remove("p3")
    g.remove("p0")
    g.enroll("newcomer", torch.from_numpy(views(centres[3:4].repeat(4, 0), rng)))
    g.enroll("p7", torch.from_numpy(views(centres[7:8], rng)))
    assert g.index.ntotal == g.emb.shape[0]
    for k in (1, 5):
        assert_same_ranking(g.search(probes, k), dense_top(g, probes, k))
    # p3's probe is now the newcomer (views of the same centre)
    assert g.labels[int(g.search(probes[3:4], 1).index[0, 0])] == "newcomer"


# --- approximate index ------------------------------------------------------------------------

@pytest.fixture(scope="module")
def large():
    """A gallery just above the exact size, and probes: new views of enrolled identities."""
    n = EXACT_BELOW + 10_000
    emb, owner, centres = descriptors(n, seed=5)
    rng = np.random.default_rng(6)
    who = rng.choice(int(owner.max()) + 1, 500, replace=False)
    return emb, owner, centres, torch.from_numpy(views(centres[who], rng)), who


def test_the_approximate_index_agrees_with_the_exact_one(large):
    emb, owner, _, probes, who = large
    g = gallery_of(emb, owner)
    assert g.index.kind == "ivf"
    nlist, nprobe = gi.ivf_params(len(emb))
    assert g.index.nprobe == nprobe and 16 <= nprobe < nlist
    exact = GalleryIndex.build(emb, owner, exact_below=len(emb) + 1)
    assert exact.kind == "exact"
    max_images = int(g.counts.max())
    want, _ = top_identities(exact, probes, 5, max_images)
    got = g.search(probes, 5).index.numpy()  # keys are positions here (nothing removed)
    recall = float(np.mean(got[:, 0] == want[:, 0]))
    assert recall >= 0.99, recall
    assert float(np.mean(want[:, 0] == who)) >= 0.99  # the probes are findable at all
    # the other candidates mostly agree too (they score ~0.2-0.4, where IVF misses some)
    assert np.mean([len(set(a) & set(b)) for a, b in zip(got, want)]) >= 3


def test_the_approximate_index_adds_and_removes_without_a_rebuild(large, monkeypatch):
    emb, owner, centres, probes, who = large
    g = gallery_of(emb, owner)
    index = g.index
    builds = []
    monkeypatch.setattr(GalleryIndex, "build", lambda *a, **k: builds.append(1))
    rng = np.random.default_rng(7)
    newcomer = _unit(rng.standard_normal((1, D)))
    g.enroll("newcomer", torch.from_numpy(views(np.repeat(newcomer, 3, 0), rng)))
    probe = torch.from_numpy(views(newcomer, rng))
    assert g.labels[int(g.search(probe, 1).index[0, 0])] == "newcomer"
    victim = f"p{who[0]}"
    g.remove(victim)
    assert g.index is index and not builds
    assert index.ntotal == g.emb.shape[0] == len(emb) + 3 - int((owner == who[0]).sum())
    named = [g.labels[i] for i in g.search(probes[:1], 5).index[0].tolist()]
    assert victim not in named and len(named) == 5


def test_the_index_kind_follows_the_gallery_size():
    emb, owner, _ = descriptors(3000, seed=8)
    small = GalleryIndex.build(emb[:900], owner[:900], exact_below=1000)
    assert small.kind == "exact" and small.fits(1000)
    small.add(emb[900:1100], owner[900:1100])
    assert not small.fits(1000)  # grown past the exact size
    big = GalleryIndex.build(emb[:1100], owner[:1100], exact_below=1000)
    assert big.kind == "ivf" and big.fits(1000)
    big.remove(np.unique(owner[:700]))
    assert not big.fits(1000)  # below half the exact size: back to exact
    big2 = GalleryIndex.build(emb[:1100], owner[:1100], exact_below=1000)
    big2.add(emb[:2000], np.arange(2000) + 10**6)
    big2.add(emb[:2000], np.arange(2000) + 10**7)
    assert not big2.fits(1000)  # 4x what its centroids were trained on


# --- persistence --------------------------------------------------------------------------------

def test_an_approximate_index_is_saved_reloaded_and_rebuilt_when_stale(large, tmp_path,
                                                                         monkeypatch):
    emb, owner, centres, probes, _ = large
    g = gallery_of(emb, owner)
    g.save(tmp_path)
    assert (tmp_path / INDEX_FILE).is_file() and g.sha256
    want = g.search(probes, 5)
    builds = []
    real_build = GalleryIndex.build.__func__

    def counted(cls, *a, **k):
        builds.append(1)
        return real_build(cls, *a, **k)

    monkeypatch.setattr(GalleryIndex, "build", classmethod(counted))
    again = Gallery.load(tmp_path)
    assert not builds and again.index.kind == "ivf"
    assert torch.equal(again.search(probes, 5).index, want.index)

    # stale: the gallery file changed behind the index (a save interrupted between the two)
    stale = (tmp_path / INDEX_FILE).read_bytes()
    again.enroll("late", torch.from_numpy(emb[:2]))
    again.save(tmp_path)
    (tmp_path / INDEX_FILE).write_bytes(stale)
    third = Gallery.load(tmp_path)
    assert builds == [1] and "late" in third.labels
    assert third.index.ntotal == len(emb) + 2
    # the rebuilt index was written back, tagged for this gallery: the next load reads it
    Gallery.load(tmp_path)
    assert builds == [1]

    # corrupt or missing: rebuilt
    data = bytearray((tmp_path / INDEX_FILE).read_bytes())
    data[-100] ^= 0xFF
    (tmp_path / INDEX_FILE).write_bytes(bytes(data))
    assert Gallery.load(tmp_path).index.ntotal == len(emb) + 2 and builds == [1, 1]
    (tmp_path / INDEX_FILE).unlink()
    assert Gallery.load(tmp_path).index.ntotal == len(emb) + 2 and builds == [1, 1, 1]
    assert GalleryIndex.load(tmp_path / INDEX_FILE, {"gallery_sha256": "x"}) is None


def test_a_gallery_without_keys_loads_with_keys_by_position(tmp_path):
    """Gallery files written before the index had no keys: identity i has key i."""
    emb, owner, _ = descriptors(300, seed=9)
    c = int(owner.max()) + 1
    ckpt.save(tmp_path / "gallery", {"emb": torch.from_numpy(emb),
                                     "owner": torch.from_numpy(owner),
                                     "counts": torch.bincount(torch.from_numpy(owner))},
              {"kind": "gallery", "labels": [f"p{i}" for i in range(c)], "version": 3,
               "scoring": "nearest_image"})
    g = Gallery.load(tmp_path)
    assert torch.equal(g.keys, torch.arange(c)) and (tmp_path / INDEX_FILE).is_file()
    probes = torch.from_numpy(emb[:30])
    assert_same_ranking(g.search(probes, 3), dense_top(g, probes, 3))


# --- consistency across loaded models and processes ------------------------------------------

def _write_model(folder) -> np.ndarray:
    """A seed_cnn model folder (random weights) whose training gallery holds 3 people x 4
    images; returns the gallery's embeddings."""
    torch.manual_seed(0)
    net = build_model("seed_cnn", 3, 32)
    emb, owner, _ = descriptors(12, seed=10)
    owner = np.repeat(np.arange(3), 4)
    tensors = {f"model.{k}": v for k, v in net.state_dict().items()}
    tensors |= {"gallery.emb": torch.from_numpy(emb), "gallery.owner": torch.from_numpy(owner),
                "gallery.counts": torch.tensor([4, 4, 4])}
    pre = {"version": PREPROCESSING_VERSION, "store_size": 150, "image_size": 32,
           "channels": 3, "normalisation": "per_image_standardise", "descriptor": "embedding"}
    meta = {"kind": "model", "architecture": "seed_cnn", "labels": ["ann", "bob", "cy"],
            "classifier_labels": ["ann", "bob", "cy"], "num_classes": 3,
            "preprocessing": pre, "open_set": {"threshold": 0.5, "verify_threshold": 0.5}}
    folder.mkdir(parents=True, exist_ok=True)
    ckpt.save(folder / "model", tensors, meta)
    return emb


def _enroll(lm: LoadedModel, identity: str, emb: np.ndarray) -> Gallery:
    with lm.edit_gallery() as g:
        g.enroll(identity, torch.from_numpy(emb))
        g.save(lm.folder)
    return g


def test_enrolment_in_one_loaded_model_is_seen_by_another_and_after_a_restart(tmp_path):
    _write_model(tmp_path)
    a, b = LoadedModel(tmp_path), LoadedModel(tmp_path)
    rng = np.random.default_rng(11)
    dan, eve = _unit(rng.standard_normal((2, D)))
    served = a.gallery
    ga = _enroll(a, "dan", views(np.repeat(dan[None], 3, 0), rng))
    assert served.labels == ["ann", "bob", "cy"]  # the served gallery is never edited in place
    assert a.gallery is ga and ga.version == 1
    # b still serves what it loaded; its edit starts from the files a wrote, so dan stays
    assert "dan" not in b.gallery.labels
    gb = _enroll(b, "eve", views(np.repeat(eve[None], 2, 0), rng))
    assert gb.labels == ["ann", "bob", "cy", "dan", "eve"] and gb.version == 2
    a.refresh_gallery()
    assert a.gallery.labels == gb.labels and a.gallery.version == 2
    probe = torch.from_numpy(views(eve[None], rng))
    assert a.match(probe, top_k=1, threshold=0.5)[0][0] == "eve"
    # removal, then a restart: a fresh LoadedModel reads the gallery and its saved index
    with b.edit_gallery() as g:
        g.remove("dan")
        g.save(b.folder)
    fresh = LoadedModel(tmp_path)
    assert fresh.gallery.labels == ["ann", "bob", "cy", "eve"] and fresh.gallery.version == 3
    assert fresh.gallery.index.ntotal == 14
    assert fresh.match(probe, top_k=1, threshold=0.5)[0][0] == "eve"
    # a's refresh after b's removal: dan gone, and the keys still name the right people
    a.refresh_gallery()
    got = a.match(torch.from_numpy(views(dan[None], rng)), top_k=5, threshold=-1)[0]
    assert "dan" not in [c for c, _ in got[2]] and got[0] in ("ann", "bob", "cy", "eve")
    # a failed edit changes nothing
    with pytest.raises(KeyError), a.edit_gallery() as g:
        g.enroll("zed", torch.from_numpy(views(np.repeat(eve[None], 1, 0), rng)))
        raise KeyError("refused before saving")
    assert "zed" not in a.gallery.labels and "zed" not in LoadedModel(tmp_path).gallery.labels


def _enroll_many(folder, tag: str, count: int, start) -> None:
    lm = LoadedModel(folder)
    rng = np.random.default_rng(ord(tag))
    start.wait()
    for i in range(count):
        _enroll(lm, f"{tag}{i}", _unit(rng.standard_normal((2, D))))


def test_two_processes_enrolling_at_once_lose_nothing(tmp_path):
    """Two processes, each with its own LoadedModel (as two API processes have), enrol 8
    people each at the same time: the gallery file lock and the reload of a gallery another
    process saved keep all 16, and the saved index is the gallery's."""
    _write_model(tmp_path)
    ctx = mp.get_context("spawn")
    start = ctx.Barrier(2)
    procs = [ctx.Process(target=_enroll_many, args=(tmp_path, tag, 8, start))
             for tag in ("x", "y")]
    for p in procs:
        p.start()
    for p in procs:
        p.join(120)
    assert [p.exitcode for p in procs] == [0, 0]
    g = LoadedModel(tmp_path).gallery
    assert sorted(g.labels[3:]) == sorted(f"{t}{i}" for t in "xy" for i in range(8))
    assert g.version == 16 and g.emb.shape[0] == 12 + 32 and g.index.ntotal == 44
    assert GalleryIndex.load(tmp_path / INDEX_FILE, g._index_tag()) is not None


def test_faces_are_described_alike_whatever_the_forward_pass_size():
    """embed splits a batch into the forward passes measured fastest on the CPU
    (gallery.forward_images); the descriptors must not depend on that split (to float
    rounding: convolutions may sum in another order at another batch size)."""
    from facegrad.recognition import gallery as gal

    net = build_model("seed_cnn", 3, 32).eval()
    crops = np.random.default_rng(0).integers(0, 256, size=(37, 32, 32, 3), dtype=np.uint8)
    chosen = gal.forward_images(net, 32, torch.device("cpu"))
    assert chosen in gal.FORWARD_SIZES
    assert gal.forward_images(net, 32, torch.device("cpu")) == chosen  # measured once
    out = {}
    for n in (2, 32):
        gal._forward_images[net] = {(32, torch.get_num_threads()): n}
        for descriptor in gal.DESCRIPTORS:
            out[n, descriptor] = gal.embed(net, crops, 32, descriptor=descriptor)
    for descriptor in gal.DESCRIPTORS:
        assert out[2, descriptor].shape == (37, out[2, descriptor].shape[1])
        torch.testing.assert_close(out[2, descriptor], out[32, descriptor],
                                   atol=1e-5, rtol=1e-4)
    assert gal.forward_images(net, 32, torch.device("cuda")) > 1000  # an accelerator: whole
