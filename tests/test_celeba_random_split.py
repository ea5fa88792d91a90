"""The CDVAE-GAN data (classifier_celeba_38's config): CelebA's 38 attributes and the paper's random 1:1 split,
on the tiny CelebA in the official layout; the official split stays the DataModule's default."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from configs.loader import compose, instantiate
from datamodules.celeba import CelebADataModule
from datamodules.celeba_format import CELEBA_ATTRIBUTES, PARTITION_FILE, SPLITS
from tests.helpers.celeba_layout import write_tiny_celeba

ATTRIBUTES_38 = [a for a in CELEBA_ATTRIBUTES if a not in ("Wearing_Necktie", "Young")]


@pytest.fixture
def tiny(tmp_path: Path) -> Path:
    return write_tiny_celeba(tmp_path / "celeba", n_train=20, n_val=10, n_test=10)


def paper_datamodule(root: Path, *overrides: str) -> CelebADataModule:
    cfg = compose("classifier_celeba_38", [f"data.root={root}", "data.cache=never", "data.num_workers=0", *overrides])
    return instantiate(cfg.data, "data")


def test_the_paper_data_has_38_attributes_and_a_seeded_1_to_1_split(tiny: Path):
    (tiny / PARTITION_FILE).unlink()  # the random split must not need the official partition
    dm = paper_datamodule(tiny)
    assert dm.attribute_names == ATTRIBUTES_38 and len(ATTRIBUTES_38) == 38
    rows = {s: dm.split_rows(s) for s in SPLITS}
    assert {s: len(r) for s, r in rows.items()} == {"train": 18, "val": 2, "test": 20}
    # train + val (the paper's training half) : test = 1 : 1, disjoint, covering every image
    assert sorted(np.concatenate(list(rows.values())).tolist()) == list(range(40))
    again = paper_datamodule(tiny)
    assert all(np.array_equal(again.split_rows(s), rows[s]) for s in SPLITS)
    other = paper_datamodule(tiny, "seed=1")
    assert not np.array_equal(other.split_rows("test"), rows["test"])
    item = dm.dataset("train")[0]
    assert sorted(item["pa"]) == sorted(ATTRIBUTES_38) and set(item["pa"]["Smiling"].unique().tolist()) <= {0.0, 1.0}


def test_official_split_is_the_default_and_an_option(tiny: Path):
    official = CelebADataModule(str(tiny), ATTRIBUTES_38, cache="never")
    assert official.split == "official"
    assert [len(official.split_rows(s)) for s in SPLITS] == [20, 10, 10]
    assert np.array_equal(paper_datamodule(tiny, "data.split=official").split_rows("test"),
                          official.split_rows("test"))


def test_the_paper_split_at_128_pixels(tiny: Path):
    dm = paper_datamodule(tiny, "data.image_size=128")
    assert dm.dataset("test")[0]["x"].shape == (3, 128, 128)
