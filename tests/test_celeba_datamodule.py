"""CelebADataModule on tiny datasets written in CelebA's real layout (``tests.helpers.celeba_layout``)."""

from __future__ import annotations

import math
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from torchvision.transforms.v2 import functional as TF

from datamodules.base import Attribute, DatasetError
from datamodules.celeba import CelebADataModule
from datamodules.celeba_format import (
    ATTR_FILE,
    CELEBA_ATTRIBUTES,
    IMAGE_DIR,
    PARTITION_FILE,
    SPLITS,
    read_attributes,
    read_partition,
)
from tests.helpers.celeba_layout import write_tiny_celeba

ATTRS = ["Smiling", "Male", "Young"]


@pytest.fixture(scope="module")
def tiny(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A read-only tiny CelebA shared by the tests that do not modify files."""
    return write_tiny_celeba(tmp_path_factory.mktemp("celeba"))


@pytest.fixture
def tiny_rw(tmp_path: Path) -> Path:
    """A private tiny CelebA for tests that break files."""
    return write_tiny_celeba(tmp_path / "data")


def make_dm(root: Path | str, **kwargs) -> CelebADataModule:
    kwargs = {"attributes": ATTRS, "batch_size": 4, "cache": "never", **kwargs}
    return CelebADataModule(str(root), **kwargs)


def all_items(dm: CelebADataModule, split: str) -> list[dict]:
    dataset = dm.dataset(split)
    return [dataset[i] for i in range(len(dataset))]


# -- reading the layout ------------------------------------------------------------------------------


@pytest.mark.parametrize("torchvision_layout", [False, True], ids=["direct", "torchvision"])
def test_reads_both_layouts(tmp_path: Path, torchvision_layout: bool) -> None:
    data_dir = write_tiny_celeba(tmp_path, torchvision_layout=torchvision_layout)
    assert (data_dir / ATTR_FILE).is_file()
    dm = make_dm(tmp_path)
    dm.setup()
    assert dm.data_dir == data_dir
    assert dm.attributes == tuple(Attribute(n, "binary") for n in ATTRS)
    assert dm.attribute_names == ATTRS
    assert dm.image_shape == (3, 64, 64)
    assert not dm.has_true_counterfactuals
    assert {s: len(dm.dataset(s)) for s in SPLITS} == {"train": 12, "val": 4, "test": 4}


def test_batch_contract(tiny: Path) -> None:
    filenames, header, values = read_attributes(tiny / ATTR_FILE)
    dm = make_dm(tiny)
    dm.setup("fit")
    batches = list(dm.val_dataloader())
    assert sum(len(b["index"]) for b in batches) == 4
    for batch in batches:
        assert set(batch) == {"x", "pa", "index"}
        x, pa, index = batch["x"], batch["pa"], batch["index"]
        assert x.dtype == torch.float32 and x.shape == (len(index), 3, 64, 64)
        assert 0.0 <= x.min() and x.max() <= 1.0
        assert index.dtype == torch.int64
        assert list(pa) == ATTRS
        for name in ATTRS:
            assert pa[name].dtype == torch.float32 and pa[name].shape == index.shape
            expected = (values[index.numpy(), header.index(name)] == 1).astype(np.float32)
            np.testing.assert_array_equal(pa[name].numpy(), expected)
    dataset = dm.dataset("val")
    for i in range(len(dataset)):
        assert dataset.filenames[i] == filenames[int(dataset[i]["index"])]


def test_train_loader_shuffles_reproducibly(tiny: Path) -> None:
    dm = make_dm(tiny, drop_last_train=True)
    dm.setup("fit")
    torch.manual_seed(0)
    first = torch.cat([b["index"] for b in dm.train_dataloader()])
    torch.manual_seed(0)
    again = torch.cat([b["index"] for b in dm.train_dataloader()])
    assert torch.equal(first, again)
    assert sorted(first.tolist()) == sorted(dm.split_rows("train").tolist())
    assert not torch.equal(first, torch.as_tensor(dm.split_rows("train")))


def test_drop_last_never_empties_a_tiny_epoch(tiny: Path) -> None:
    dm = make_dm(tiny, batch_size=64)
    assert len(dm.train_dataloader()) == 1


def test_official_partitions(tiny: Path) -> None:
    filenames, _, _ = read_attributes(tiny / ATTR_FILE)
    partition = read_partition(tiny / PARTITION_FILE)
    dm = make_dm(tiny)
    for split, code in SPLITS.items():
        expected = [i for i, f in enumerate(filenames) if partition[f] == code]
        assert dm.split_rows(split).tolist() == expected
        assert sorted(int(item["index"]) for item in all_items(dm, split)) == expected


def test_limit_per_split(tiny: Path) -> None:
    dm = make_dm(tiny, limit_per_split=3)
    assert [len(dm.dataset(s)) for s in SPLITS] == [3, 3, 3]
    full = make_dm(tiny)
    assert dm.split_rows("train").tolist() == full.split_rows("train")[:3].tolist()


def test_random_split_is_seeded_and_disjoint(tiny_rw: Path) -> None:
    # The random split must not need the partition file.
    (tiny_rw / PARTITION_FILE).unlink()
    kwargs = {"split": "random", "split_fractions": [0.5, 0.25, 0.25]}
    rows = {s: make_dm(tiny_rw, seed=1, **kwargs).split_rows(s) for s in SPLITS}
    assert {s: len(r) for s, r in rows.items()} == {"train": 10, "val": 5, "test": 5}
    assert sorted(np.concatenate(list(rows.values())).tolist()) == list(range(20))
    again = make_dm(tiny_rw, seed=1, **kwargs)
    assert all(np.array_equal(again.split_rows(s), rows[s]) for s in SPLITS)
    other = make_dm(tiny_rw, seed=2, **kwargs)
    assert not np.array_equal(other.split_rows("train"), rows["train"])
    empty_val = make_dm(tiny_rw, split="random", split_fractions=[0.5, 0.0, 0.5])
    assert [len(empty_val.split_rows(s)) for s in SPLITS] == [10, 0, 10]


# -- preprocessing and caching -----------------------------------------------------------------------


@pytest.mark.parametrize("image_size", [64, 128])
def test_crop_and_resize_match_torchvision(tiny: Path, image_size: int) -> None:
    dm = make_dm(tiny, image_size=image_size)
    item = dm.dataset("test")[0]
    assert item["x"].shape == (3, image_size, image_size)
    with Image.open(tiny / IMAGE_DIR / dm.dataset("test").filenames[0]) as img:
        reference = TF.resize(TF.center_crop(img.convert("RGB"), [140, 140]), [image_size, image_size],
                              interpolation=TF.InterpolationMode.BICUBIC)
    expected = torch.from_numpy(np.array(reference)).permute(2, 0, 1).float() / 255
    torch.testing.assert_close(item["x"], expected, rtol=0, atol=0)


def test_no_crop_on_square_images(tmp_path: Path) -> None:
    data_dir = write_tiny_celeba(tmp_path, image_size=32)
    assert make_dm(data_dir, crop_size=None).dataset("train")[0]["x"].shape == (3, 64, 64)
    with pytest.raises(ValueError, match="crop_size=140 is larger than the 32x32"):
        make_dm(data_dir).setup("fit")


def test_cache_gives_the_same_tensors(tiny: Path) -> None:
    cached, uncached = make_dm(tiny, cache="always"), make_dm(tiny, cache="never")
    for split in SPLITS:
        assert cached.dataset(split).cache is not None and uncached.dataset(split).cache is None
        for a, b in zip(all_items(cached, split), all_items(uncached, split), strict=True):
            assert torch.equal(a["x"], b["x"]) and torch.equal(a["index"], b["index"])
            assert all(torch.equal(a["pa"][n], b["pa"][n]) for n in ATTRS)


def test_auto_cache_respects_the_byte_budget(tiny: Path) -> None:
    one_split = 12 * 3 * 64 * 64
    dm = make_dm(tiny, cache="auto", cache_max_bytes=one_split)
    dm.setup()
    # train fills the whole budget, so val and test stay on disk.
    assert [dm.dataset(s).cache is not None for s in SPLITS] == [True, False, False]


# -- balanced sampling -------------------------------------------------------------------------------


def test_balanced_sampler(tmp_path: Path) -> None:
    data_dir = write_tiny_celeba(tmp_path, n_train=40)
    freqs = make_dm(data_dir, attributes=list(CELEBA_ATTRIBUTES)).label_frequencies("train")
    name = max(freqs, key=lambda n: abs(freqs[n] - 0.5))
    assert abs(freqs[name] - 0.5) > 0.2, "the fixture should hold an imbalanced attribute"
    dm = make_dm(data_dir, attributes=[name], balance_attribute=name)
    sampler = dm.train_dataloader().sampler
    labels = dm.dataset("train").labels[:, 0]
    draws = []
    for epoch in range(100):
        sampler.set_epoch(epoch)  # as Lightning does at the start of every epoch
        draws.append(labels[list(sampler)])
    drawn = np.concatenate(draws)
    # Each draw is Bernoulli(0.5) under balancing: allow 5 standard deviations of the mean.
    tolerance = 5 * math.sqrt(0.25 / len(drawn))
    assert abs(drawn.mean() - 0.5) < tolerance, (drawn.mean(), freqs[name], tolerance)


# -- errors ------------------------------------------------------------------------------------------


def test_missing_root(tmp_path: Path) -> None:
    with pytest.raises(DatasetError, match="root folder not found") as err:
        make_dm(tmp_path / "nowhere")
    assert "nowhere" in str(err.value) and "img_align_celeba.zip" in str(err.value)
    assert "_synth" in str(err.value)


@pytest.mark.parametrize("missing", [ATTR_FILE, PARTITION_FILE, IMAGE_DIR])
def test_missing_file_fails_at_construction(tiny_rw: Path, missing: str) -> None:
    path = tiny_rw / missing
    if path.is_dir():
        for f in path.iterdir():
            f.unlink()
        path.rmdir()
    else:
        path.unlink()
    with pytest.raises(DatasetError) as err:
        make_dm(tiny_rw)
    message = str(err.value)
    assert str(path) in message and "img_align_celeba.zip" in message and "data=synthetic_faces" in message


def test_missing_image(tiny_rw: Path) -> None:
    dm = make_dm(tiny_rw)
    victim = tiny_rw / IMAGE_DIR / dm.dataset("val").filenames[1]
    victim.unlink()
    with pytest.raises(DatasetError, match="missing") as err:
        make_dm(tiny_rw).setup("validate")
    assert str(victim) in str(err.value) and "Re-download" in str(err.value)
    # Deleted after setup: the read itself reports it.
    with pytest.raises(DatasetError, match="missing") as err:
        dm.dataset("val")[1]
    assert str(victim) in str(err.value)


@pytest.mark.parametrize("content", [b"not a jpeg at all", None], ids=["garbage", "truncated"])
def test_corrupt_jpeg(tiny_rw: Path, content: bytes | None) -> None:
    dm = make_dm(tiny_rw)
    victim = tiny_rw / IMAGE_DIR / dm.dataset("test").filenames[2]
    victim.write_bytes(content if content is not None else victim.read_bytes()[:300])
    with pytest.raises(DatasetError, match="cannot decode") as err:
        dm.dataset("test")[2]
    assert str(victim) in str(err.value) and "regenerate" in str(err.value)
    with pytest.raises(DatasetError, match="cannot decode"):
        make_dm(tiny_rw, cache="always").setup("test")


def test_corrupt_jpeg_inside_a_worker(tiny_rw: Path) -> None:
    dm = make_dm(tiny_rw, num_workers=1)
    victim = tiny_rw / IMAGE_DIR / dm.dataset("test").filenames[0]
    victim.write_bytes(b"garbage")
    try:
        next(iter(dm.test_dataloader()))
    except DatasetError as err:
        message = str(err)
        # The traceback holds the loader's iterator in a reference cycle; shutting its worker down from the
        # garbage collector instead of by reference count costs torch a 5 s timeout.
        err.__traceback__ = None
    else:
        pytest.fail("a corrupt JPEG read in a worker raised no DatasetError")
    assert "cannot decode" in message and str(victim) in message and "regenerate" in message


def _edit_attr_line(root: Path, line_no: int, edit: Callable[[list[str]], list[str]]) -> None:
    """Replace 1-based line ``line_no`` of the attribute file by ``edit`` of its fields."""
    lines = (root / ATTR_FILE).read_text().splitlines()
    lines[line_no - 1] = " ".join(edit(lines[line_no - 1].split()))
    (root / ATTR_FILE).write_text("\n".join(lines) + "\n")


def test_truncated_attribute_file(tiny_rw: Path) -> None:
    lines = (tiny_rw / ATTR_FILE).read_text().splitlines()
    (tiny_rw / ATTR_FILE).write_text("\n".join(lines[:-3]) + "\n")
    with pytest.raises(DatasetError, match="declares 20 images on line 1 but lists 17") as err:
        make_dm(tiny_rw).setup()
    assert ATTR_FILE in str(err.value)


def test_attribute_value_not_plus_minus_one(tiny_rw: Path) -> None:
    _edit_attr_line(tiny_rw, 5, lambda fields: [fields[0], "0", *fields[2:]])
    with pytest.raises(DatasetError, match=r"line 5: attribute values must be 1 or -1") as err:
        make_dm(tiny_rw).setup()
    assert ATTR_FILE in str(err.value)


def test_attribute_line_with_wrong_field_count(tiny_rw: Path) -> None:
    _edit_attr_line(tiny_rw, 3, lambda fields: fields[:-1])
    with pytest.raises(DatasetError, match=r"line 3: expected a file name and 40 values, found 40 fields"):
        make_dm(tiny_rw).setup()


def test_partition_must_cover_every_image(tiny_rw: Path) -> None:
    lines = (tiny_rw / PARTITION_FILE).read_text().splitlines()
    (tiny_rw / PARTITION_FILE).write_text("\n".join(lines[1:]) + "\n")
    with pytest.raises(DatasetError, match="assigns no split to 1 of the 20 images") as err:
        make_dm(tiny_rw).setup()
    assert "000001.jpg" in str(err.value)


def test_unknown_attribute_suggests_the_closest(tiny: Path) -> None:
    with pytest.raises(ValueError, match=r"unknown CelebA attribute 'Smilling'; did you mean 'Smiling'\?"):
        make_dm(tiny, attributes=["Male", "Smilling"])
    with pytest.raises(ValueError, match="did you mean 'Eyeglasses'"):
        make_dm(tiny, balance_attribute="eyeglases")


# -- ground-truth counterfactuals from a builder -----------------------------------------------------


class FakeBuilder:
    """Duck-types the synthetic faces builder: writes a tiny layout; its 'counterfactuals' are the
    stored images unchanged, so after preprocessing they must equal the dataset's ``x`` exactly."""

    def __init__(self) -> None:
        self.built: list[Path] = []
        self.calls: list[tuple[np.ndarray, dict[str, np.ndarray]]] = []

    def build(self, root: Path) -> Path:
        self.built.append(Path(root))
        return write_tiny_celeba(root)

    def true_counterfactual(self, root: Path, indices: np.ndarray, do: dict[str, np.ndarray]) -> np.ndarray:
        self.calls.append((indices, do))
        filenames, _, _ = read_attributes(Path(root) / ATTR_FILE)
        images = []
        for i in indices:
            with Image.open(Path(root) / IMAGE_DIR / filenames[i]) as img:
                images.append(np.array(img.convert("RGB")))
        return np.stack(images)


@pytest.mark.parametrize("cache", ["always", "never"])
def test_true_counterfactual_uses_the_same_preprocessing(tmp_path: Path, cache: str) -> None:
    builder = FakeBuilder()
    dm = make_dm(tmp_path / "synth", builder=builder, cache=cache)  # no files yet: no error
    assert dm.has_true_counterfactuals
    with pytest.raises(DatasetError, match="prepare_data"):
        dm.setup("test")
    dm.prepare_data()
    assert builder.built == [tmp_path / "synth"]
    dm.setup("test")
    batch = next(iter(dm.test_dataloader()))
    do = {"Smiling": 1.0 - batch["pa"]["Smiling"]}
    cf = dm.true_counterfactual(batch["index"], do)
    assert cf.dtype == torch.float32 and cf.device.type == "cpu"
    assert torch.equal(cf, batch["x"])
    indices, passed = builder.calls[-1]
    np.testing.assert_array_equal(indices, batch["index"].numpy())
    np.testing.assert_array_equal(passed["Smiling"], do["Smiling"].numpy().astype(np.int64))


def test_true_counterfactual_rejects_non_binary_values(tmp_path: Path) -> None:
    dm = make_dm(tmp_path, builder=FakeBuilder())
    dm.prepare_data()
    with pytest.raises(ValueError, match="0/1"):
        dm.true_counterfactual(torch.tensor([0, 1]), {"Smiling": torch.tensor([0.5, 1.0])})


def test_true_counterfactual_needs_a_builder(tiny: Path) -> None:
    with pytest.raises(NotImplementedError):
        make_dm(tiny).true_counterfactual(torch.tensor([0]), {"Smiling": torch.tensor([1.0])})


def test_train_order_depends_on_seed_and_epoch_only(tiny: Path) -> None:
    """Resumed runs must see the batches the uninterrupted run would have (datamodules.base.EpochSampler)."""
    sampler = make_dm(tiny, seed=3).train_dataloader().sampler
    torch.manual_seed(0)
    first = list(sampler)
    torch.manual_seed(1)  # the global RNG does not matter
    assert list(sampler) == first and sorted(first) == list(range(len(first)))
    sampler.set_epoch(1)
    second = list(sampler)
    assert second != first and sorted(second) == sorted(first)
    other = make_dm(tiny, seed=4).train_dataloader().sampler
    assert list(other) != first
