"""GTA5 and Cityscapes loaders on tiny fixture trees written with PIL."""
import numpy as np
import pytest
import torch
from PIL import Image
from torch.utils.data import DataLoader

from dataset.cityscapes import CityscapesDataset
from dataset.common import DatasetError, DatasetWarning, read_label_ids
from dataset.gta5 import GTA5Dataset
from dataset.labels import ID_TO_TRAINID, IGNORE_INDEX, colorize
from dataset.normalization import get_normalization
from dataset.paths import pseudo_label_path
from dataset.transforms import eval_transform, train_transform
from tests.helpers import truncate

H, W = 16, 32

# The official Cityscapes table (cityscapesscripts/helpers/labels.py), written out independently
# of dataset/labels.py: id -> trainId.
OFFICIAL_ID_TO_TRAINID = {
    0: 255, 1: 255, 2: 255, 3: 255, 4: 255, 5: 255, 6: 255, 7: 0, 8: 1, 9: 255, 10: 255, 11: 2, 12: 3,
    13: 4, 14: 255, 15: 255, 16: 255, 17: 5, 18: 255, 19: 6, 20: 7, 21: 8, 22: 9, 23: 10, 24: 11, 25: 12,
    26: 13, 27: 14, 28: 15, 29: 255, 30: 255, 31: 16, 32: 17, 33: 18,
}


# ---- fixture helpers ------------------------------------------------------------------------------
def save(array, path):
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(np.asarray(array, dtype=np.uint8)).save(path)
    return path


def make_image(seed, height=H, width=W):
    return np.random.default_rng(seed).integers(0, 256, size=(height, width, 3), dtype=np.uint8)


def make_ids(seed, height=H, width=W):
    """Random Cityscapes ids 0..33 (every one is in the table)."""
    return np.random.default_rng(seed).integers(0, 34, size=(height, width), dtype=np.uint8)


def expected_train_ids(ids):
    return np.vectorize(lambda i: OFFICIAL_ID_TO_TRAINID.get(int(i), 255))(ids)


def gta5_tree(root, n=3):
    ids = {}
    for k in range(n):
        name = f"{k:05d}"
        save(make_image(k), root / "images" / f"{name}.png")
        ids[name] = make_ids(100 + k)
        save(ids[name], root / "labels" / f"{name}.png")
    return ids


def official_tree(root, split="train", cities=("aachen", "bochum"), per_city=2, labels=True):
    ids = {}
    for c, city in enumerate(cities):
        for f in range(per_city):
            base = f"{city}_000000_{f:06d}"
            name = f"{city}/{base}"
            save(make_image(10 * c + f), root / "leftImg8bit" / split / city / f"{base}_leftImg8bit.png")
            ids[name] = make_ids(200 + 10 * c + f)
            if labels:
                save(ids[name], root / "gtFine" / split / city / f"{base}_gtFine_labelIds.png")
    return ids


def flat_tree(root):
    """Flat layout; labels named both ways; list lines written in each accepted style."""
    ids = {}
    bases = ["aachen_000000_000019", "aachen_000001_000019", "bremen_000000_000019", "zurich_000000_000019"]
    for k, base in enumerate(bases):
        save(make_image(50 + k), root / "images" / f"{base}_leftImg8bit.png")
        ids[base] = make_ids(300 + k)
        label_name = f"{base}_gtFine_labelIds.png" if k % 2 else f"{base}_leftImg8bit.png"
        save(ids[base], root / "labels" / label_name)
    (root / "train.txt").write_text(
        f"{bases[2]}_leftImg8bit.png\n\nimages/{bases[0]}_leftImg8bit.png\n./{bases[1]}_leftImg8bit.png\n")
    (root / "val.txt").write_text(f"{bases[3]}\n")
    return ids


# ---- the label table -----------------------------------------------------------------------------
def test_every_cityscapes_id_maps_as_the_official_table():
    assert len(OFFICIAL_ID_TO_TRAINID) == 34
    for label_id, train_id in OFFICIAL_ID_TO_TRAINID.items():
        assert ID_TO_TRAINID[label_id] == train_id, label_id
    assert (ID_TO_TRAINID[34:] == IGNORE_INDEX).all() and ID_TO_TRAINID.shape == (256,)


# ---- GTA5 -------------------------------------------------------------------------------------------
def test_gta5_reads_images_and_exact_train_ids(tmp_path):
    ids = gta5_tree(tmp_path)
    dataset = GTA5Dataset(tmp_path)
    assert len(dataset) == 3 and dataset.domain == "gta5" and dataset.names == ["00000", "00001", "00002"]
    sample = dataset[1]
    assert sample["name"] == "00001" and sample["index"] == 1
    assert sample["image"].dtype == torch.float32 and sample["image"].shape == (3, H, W)
    assert sample["label"].dtype == torch.int64
    np.testing.assert_array_equal(sample["label"].numpy(), expected_train_ids(ids["00001"]))
    torch.testing.assert_close(sample["image"], get_normalization("imagenet", "gta5")(make_image(1)))


def test_gta5_palette_labels_read_as_their_indices(tmp_path):
    """GTA5 ships its labels as palette PNGs: the indices are the ids, not the colours."""
    ids = gta5_tree(tmp_path, n=1)
    palette_label = Image.fromarray(ids["00000"])
    palette_label.putpalette(np.random.default_rng(0).integers(0, 256, 768).tolist())  # L -> P, same indices
    assert palette_label.mode == "P"
    palette_label.save(tmp_path / "labels" / "00000.png")
    np.testing.assert_array_equal(GTA5Dataset(tmp_path)[0]["label"].numpy(), expected_train_ids(ids["00000"]))


def test_gta5_resizes_a_mismatched_label_nearest_and_counts_it(tmp_path):
    gta5_tree(tmp_path)
    small = np.zeros((H // 2, W // 2), dtype=np.uint8)
    small[:, : W // 4] = 7   # road -> 0
    small[:, W // 4:] = 26  # car -> 13
    save(small, tmp_path / "labels" / "00002.png")
    dataset = GTA5Dataset(tmp_path)
    with pytest.warns(DatasetWarning, match="00002.png"):
        label = dataset[2]["label"].numpy()
    expected = np.zeros((H, W), dtype=np.int64)
    expected[:, W // 2:] = 13
    np.testing.assert_array_equal(label, expected)
    assert dataset.stats["resized_labels"] == 1
    dataset[0]
    assert dataset.stats["resized_labels"] == 1


def test_gta5_split_lists(tmp_path):
    gta5_tree(tmp_path)
    (tmp_path / "train.txt").write_text("00000.png\nimages/00002.png\n")
    (tmp_path / "val.txt").write_text("00001\n")
    assert GTA5Dataset(tmp_path, split="train").names == ["00000", "00002"]
    assert GTA5Dataset(tmp_path, split="val").names == ["00001"]
    assert len(GTA5Dataset(tmp_path, split="all")) == 3
    assert GTA5Dataset(tmp_path, list_file=tmp_path / "val.txt").names == ["00001"]


def test_gta5_list_naming_a_missing_file_is_a_clear_error(tmp_path):
    gta5_tree(tmp_path)
    (tmp_path / "labels" / "00001.png").unlink()
    (tmp_path / "train.txt").write_text("00000.png\n00001.png\n09999.png\n")
    with pytest.raises(DatasetError, match=r"09999\.png") as error:
        GTA5Dataset(tmp_path, split="train")
    assert "1 missing image" in str(error.value) and "2 missing labels" in str(error.value)
    (tmp_path / "train.txt").write_text("00000.png\n00001.png\n")
    with pytest.raises(DatasetError, match=r"labels[/\\]00001\.png"):
        GTA5Dataset(tmp_path, split="train")


def test_gta5_image_without_label_is_named(tmp_path):
    gta5_tree(tmp_path)
    save(make_image(9), tmp_path / "images" / "00042.png")
    with pytest.raises(DatasetError, match="00042.png"):
        GTA5Dataset(tmp_path)


def test_gta5_root_errors_say_what_was_looked_for_and_found(tmp_path):
    (tmp_path / "imgs").mkdir()
    (tmp_path / "readme.txt").write_text("x")
    with pytest.raises(DatasetError, match="images") as error:
        GTA5Dataset(tmp_path)
    assert "labels" in str(error.value) and "imgs/" in str(error.value) and "readme.txt" in str(error.value)
    with pytest.raises(DatasetError, match="does not exist"):
        GTA5Dataset(tmp_path / "nowhere")


def test_gta5_empty_split_is_an_error(tmp_path):
    (tmp_path / "images").mkdir()
    (tmp_path / "labels").mkdir()
    with pytest.raises(DatasetError, match="empty"):
        GTA5Dataset(tmp_path)
    gta5_tree(tmp_path)
    (tmp_path / "val.txt").write_text("\n# nothing here\n")
    with pytest.raises(DatasetError, match="empty"):
        GTA5Dataset(tmp_path, split="val")
    with pytest.raises(DatasetError, match="train.txt"):
        GTA5Dataset(tmp_path, split="train")


def test_unknown_ids_are_counted_and_ignored(tmp_path):
    ids = gta5_tree(tmp_path, n=1)["00000"]
    ids[0, :5] = 34
    ids[1, :3] = 200
    save(ids, tmp_path / "labels" / "00000.png")
    dataset = GTA5Dataset(tmp_path)
    with pytest.warns(DatasetWarning, match="not in the label table"):
        label = dataset[0]["label"].numpy()
    assert (label[0, :5] == IGNORE_INDEX).all() and (label[1, :3] == IGNORE_INDEX).all()
    np.testing.assert_array_equal(label, expected_train_ids(ids))
    assert dataset.stats["unknown_ids"] == 8 and dataset.stats["unknown_id_samples"] == 1


# ---- Cityscapes -------------------------------------------------------------------------------------
def test_cityscapes_official_layout(tmp_path):
    ids = official_tree(tmp_path)
    official_tree(tmp_path, split="val", cities=("frankfurt",), per_city=1)
    dataset = CityscapesDataset(tmp_path, split="train")
    assert dataset.layout == "official" and dataset.domain == "cityscapes" and len(dataset) == 4
    assert dataset.names == ["aachen/aachen_000000_000000", "aachen/aachen_000000_000001",
                             "bochum/bochum_000000_000000", "bochum/bochum_000000_000001"]
    for index, name in enumerate(dataset.names):
        sample = dataset[index]
        assert sample["name"] == name and sample["index"] == index
        np.testing.assert_array_equal(sample["label"].numpy(), expected_train_ids(ids[name]))
    assert CityscapesDataset(tmp_path, split="val").names == ["frankfurt/frankfurt_000000_000000"]


def test_cityscapes_flat_layout(tmp_path):
    ids = flat_tree(tmp_path)
    dataset = CityscapesDataset(tmp_path, split="train")
    assert dataset.layout == "flat"
    assert dataset.names == ["aachen_000000_000019", "aachen_000001_000019", "bremen_000000_000019"]
    assert [p.name for p in dataset.label_paths] == [
        "aachen_000000_000019_leftImg8bit.png", "aachen_000001_000019_gtFine_labelIds.png",
        "bremen_000000_000019_leftImg8bit.png"]
    for index, name in enumerate(dataset.names):
        np.testing.assert_array_equal(dataset[index]["label"].numpy(), expected_train_ids(ids[name]))
    val = CityscapesDataset(tmp_path, split="val")
    assert val.names == ["zurich_000000_000019"]
    np.testing.assert_array_equal(val[0]["label"].numpy(), expected_train_ids(ids["zurich_000000_000019"]))


def test_cityscapes_flat_missing_image_or_label_is_named(tmp_path):
    flat_tree(tmp_path)
    (tmp_path / "labels" / "bremen_000000_000019_leftImg8bit.png").unlink()
    with pytest.raises(DatasetError, match="bremen_000000_000019_gtFine_labelIds.png"):
        CityscapesDataset(tmp_path, split="train")
    (tmp_path / "val.txt").write_text("lindau_000000_000019_leftImg8bit.png\n")
    with pytest.raises(DatasetError, match="lindau_000000_000019"):
        CityscapesDataset(tmp_path, split="val")


def test_cityscapes_unlabeled_needs_no_gtfine(tmp_path):
    official_tree(tmp_path, labels=False)
    assert not (tmp_path / "gtFine").exists()
    with pytest.raises(DatasetError, match="labeled=False"):
        CityscapesDataset(tmp_path, split="train")
    dataset = CityscapesDataset(tmp_path, split="train", labeled=False)
    assert dataset.label_paths == [None] * 4 and not dataset.labeled
    sample = dataset[0]
    assert "label" not in sample and sample["image"].shape == (3, H, W)
    batch = next(iter(DataLoader(dataset, batch_size=2)))
    assert "label" not in batch and batch["image"].shape == (2, 3, H, W)


def test_cityscapes_unlabeled_flat_needs_no_labels(tmp_path):
    flat_tree(tmp_path)
    for path in (tmp_path / "labels").iterdir():
        path.unlink()
    (tmp_path / "labels").rmdir()
    dataset = CityscapesDataset(tmp_path, split="train", labeled=False)
    assert len(dataset) == 3 and "label" not in dataset[2]


def test_cityscapes_pseudo_labels_are_read_unchanged(tmp_path):
    official_tree(tmp_path, labels=False)
    pseudo_dir = tmp_path / "pseudo"
    dataset = CityscapesDataset(tmp_path, split="train", labeled=False)
    written = {}
    for k, name in enumerate(dataset.names):
        values = np.random.default_rng(k).choice(np.array([*range(19), 255], dtype=np.uint8), size=(H, W))
        values[0, 0] = 7  # an id that the id->trainId table would turn into 0
        written[name] = values
        save(values, pseudo_label_path(pseudo_dir, name))
    pseudo = CityscapesDataset(tmp_path, split="train", pseudo_label_dir=pseudo_dir)
    for index, name in enumerate(pseudo.names):
        assert pseudo.label_paths[index] == pseudo_label_path(pseudo_dir, name)
        np.testing.assert_array_equal(pseudo[index]["label"].numpy(), written[name])
    # A value that is no trainId is refused, naming the file.
    bad = written[pseudo.names[1]].copy()
    bad[3, 3] = 33
    save(bad, pseudo_label_path(pseudo_dir, pseudo.names[1]))
    with pytest.raises(DatasetError, match="aachen_000000_000001_pseudo_trainIds.png"):
        pseudo[1]
    # So is a pseudo label of another size than its image.
    save(np.zeros((H, W + 1), np.uint8), pseudo_label_path(pseudo_dir, pseudo.names[2]))
    with pytest.raises(DatasetError, match="bochum_000000_000000_pseudo_trainIds.png"):
        pseudo[2]
    # And a missing one, already at construction.
    pseudo_label_path(pseudo_dir, pseudo.names[3]).unlink()
    with pytest.raises(DatasetError, match="bochum_000000_000001_pseudo_trainIds.png"):
        CityscapesDataset(tmp_path, split="train", pseudo_label_dir=pseudo_dir)


def test_cityscapes_size_mismatch_names_both_files(tmp_path):
    official_tree(tmp_path)
    label = tmp_path / "gtFine/train/aachen/aachen_000000_000000_gtFine_labelIds.png"
    save(make_ids(0, H // 2, W // 2), label)
    with pytest.raises(DatasetError, match="8x16") as error:
        CityscapesDataset(tmp_path)[0]
    assert str(label) in str(error.value) and "aachen_000000_000000_leftImg8bit.png" in str(error.value)
    assert f"{H}x{W}" in str(error.value)


def test_rgb_colour_label_is_a_clear_error(tmp_path):
    ids = official_tree(tmp_path)
    label = tmp_path / "gtFine/train/aachen/aachen_000000_000000_gtFine_labelIds.png"
    save(colorize(ID_TO_TRAINID[ids["aachen/aachen_000000_000000"]]), label)
    with pytest.raises(DatasetError, match="single-channel id PNG") as error:
        CityscapesDataset(tmp_path)[0]
    assert str(label) in str(error.value) and "_gtFine_labelIds.png" in str(error.value)
    with pytest.raises(DatasetError, match="single-channel"):
        read_label_ids(label)


def test_truncated_png_is_named_and_can_be_skipped(tmp_path):
    official_tree(tmp_path)
    broken = tmp_path / "leftImg8bit/train/aachen/aachen_000000_000001_leftImg8bit.png"
    truncate(broken)
    with pytest.raises(DatasetError, match="aachen_000000_000001_leftImg8bit.png"):
        CityscapesDataset(tmp_path)[1]
    dataset = CityscapesDataset(tmp_path, skip_bad=True)
    with pytest.warns(DatasetWarning, match="aachen_000000_000001"):
        sample = dataset[1]
    assert sample["name"] == "bochum/bochum_000000_000000" and sample["index"] == 2
    assert dataset.stats["skipped"] == 1
    assert dataset[0]["index"] == 0 and dataset.stats["skipped"] == 1


def test_truncated_label_is_named(tmp_path):
    gta5_tree(tmp_path)
    truncate(tmp_path / "labels" / "00001.png", keep=0.6)
    with pytest.raises(DatasetError, match=r"labels[/\\]00001\.png"):
        GTA5Dataset(tmp_path)[1]


def test_cityscapes_root_in_neither_layout_lists_what_was_found(tmp_path):
    (tmp_path / "leftImg8bit_trainvaltest").mkdir()
    (tmp_path / "license.txt").write_text("x")
    with pytest.raises(DatasetError, match="neither layout") as error:
        CityscapesDataset(tmp_path)
    message = str(error.value)
    assert "leftImg8bit_trainvaltest/" in message and "license.txt" in message
    assert "leftImg8bit" in message and "images" in message


def test_cityscapes_empty_or_missing_split_is_an_error(tmp_path):
    official_tree(tmp_path)
    (tmp_path / "leftImg8bit" / "test").mkdir()
    with pytest.raises(DatasetError, match="empty"):
        CityscapesDataset(tmp_path, split="test", labeled=False)
    with pytest.raises(DatasetError, match="train/"):  # the error lists the splits there are
        CityscapesDataset(tmp_path, split="val")
    flat = tmp_path / "flat"
    flat_tree(flat)
    (flat / "val.txt").write_text("")
    with pytest.raises(DatasetError, match="empty"):
        CityscapesDataset(flat, split="val")
    with pytest.raises(DatasetError, match="test.txt"):
        CityscapesDataset(flat, split="test")


# ---- batching, transforms, normalization ------------------------------------------------------------
def test_dataloader_collates_samples(tmp_path):
    official_tree(tmp_path)
    dataset = CityscapesDataset(tmp_path, transform=eval_transform((8, 16)))
    batch = next(iter(DataLoader(dataset, batch_size=2)))
    assert batch["image"].shape == (2, 3, 8, 16) and batch["image"].dtype == torch.float32
    assert batch["label"].shape == (2, H, W) and batch["label"].dtype == torch.int64
    assert batch["name"] == dataset.names[:2] and batch["index"].tolist() == [0, 1]


def test_train_transform_inside_workers_is_reproducible(tmp_path):
    gta5_tree(tmp_path, n=4)
    dataset = GTA5Dataset(tmp_path, transform=train_transform((8, 8), scale_range=(0.5, 1.5)))

    def run():
        loader = DataLoader(dataset, batch_size=2, num_workers=2, shuffle=True,
                            generator=torch.Generator().manual_seed(7))
        return [batch for batch in loader]

    first, second = run(), run()
    for a, b in zip(first, second):
        assert a["name"] == b["name"]
        torch.testing.assert_close(a["image"], b["image"])
        torch.testing.assert_close(a["label"], b["label"])
        assert a["image"].shape == (2, 3, 8, 8)
        assert set(a["label"].unique().tolist()) <= set(range(19)) | {IGNORE_INDEX}


def test_normalization_can_be_chosen(tmp_path):
    official_tree(tmp_path)
    course = get_normalization("course", "cityscapes")
    dataset = CityscapesDataset(tmp_path, normalization=course)
    torch.testing.assert_close(dataset[0]["image"], course(make_image(0)))


def test_transform_returning_tensors_is_refused(tmp_path):
    gta5_tree(tmp_path, n=1)
    dataset = GTA5Dataset(tmp_path, transform=lambda image, label: (torch.zeros(3, 2, 2), label))
    with pytest.raises(TypeError, match="PIL"):
        dataset[0]
