import os
import tarfile
from pathlib import Path

import pytest
import torch

import nas
import nas.data
from nas.data import augment_batch, digits, load_dataset
from nas.train import TrainSettings

CIFAR = Path(__file__).resolve().parents[2] / "shared" / "data" / "cifar10-jpeg-train.tar.gz"


def test_digits_is_embedded_resized_and_split_the_same_way_every_time() -> None:
    a, b = digits(32, seed=0), digits(32, seed=0)
    x, y = a.train.tensors
    assert x.shape[1:] == (3, 32, 32) and x.dtype == torch.uint8 and len(a.train) + len(a.val) == 1797
    assert not a.natural and TrainSettings().augments(a) is False and TrainSettings(augment=True).augments(a)
    assert a.num_classes == 10 and len(a.val) == 359
    assert torch.equal(x, b.train.tensors[0]) and torch.equal(y, b.train.tensors[1])
    assert not torch.equal(digits(32, seed=1).val.tensors[1], a.val.tensors[1])


@pytest.fixture(scope="module")
def cifar_subset(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """12 real JPEGs per class for 3 classes, extracted from the shared CIFAR-10 archive."""
    if not CIFAR.exists():
        pytest.skip(f"{CIFAR} is absent (the shared CIFAR-10 JPEG archive; CI has it)")
    root = tmp_path_factory.mktemp("cifar")
    wanted = {"airplane": 0, "cat": 0, "ship": 0}
    with tarfile.open(CIFAR, "r:gz") as tar:
        for member in tar:
            parts = Path(member.name).parts
            if member.isfile() and len(parts) == 3 and parts[1] in wanted and wanted[parts[1]] < 12:
                wanted[parts[1]] += 1
                tar.extract(member, root, filter="data")
            if all(n == 12 for n in wanted.values()):
                break
    return root


def test_folder_loader_reads_real_jpegs_with_a_seeded_split(cifar_subset: Path, tmp_path: Path) -> None:
    data = load_dataset(f"folder:{cifar_subset / 'train'}", 32, seed=0, data_dir=tmp_path)
    assert data.classes == ("airplane", "cat", "ship") and data.natural and TrainSettings().augments(data)
    assert len(data.train) + len(data.val) == 36 and len(data.val) == 7
    x, y = data.train.tensors
    assert x.shape[1:] == (3, 32, 32) and x.dtype == torch.uint8 and set(y.tolist()) <= {0, 1, 2}
    xb, yb = next(data.batches("val", 7, shuffle=False))
    assert xb.dtype == torch.float32 and xb.std() > 0.3 and torch.equal(yb, data.val.tensors[1])  # normalised


def test_a_folder_is_decoded_once_and_again_only_when_its_files_change(
        cifar_subset: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    import shutil
    root = tmp_path / "images"
    shutil.copytree(cifar_subset / "train", root)
    first = load_dataset(f"folder:{root}", 32, data_dir=tmp_path / "d")
    (cache,) = (tmp_path / "d" / "cache").iterdir()

    def no_decoding(*_: object, **__: object) -> None:
        raise AssertionError("decoded again")

    monkeypatch.setattr(nas.data, "_tensors", no_decoding)
    again = load_dataset(f"folder:{root}", 32, data_dir=tmp_path / "d")
    assert torch.equal(again.train.tensors[0], first.train.tensors[0]) and again.classes == first.classes
    monkeypatch.undo()
    victim = next((root / "cat").iterdir())
    os.utime(victim, ns=(victim.stat().st_atime_ns, victim.stat().st_mtime_ns + 10**9))  # touched: decode again
    load_dataset(f"folder:{root}", 32, data_dir=tmp_path / "d")
    load_dataset(f"folder:{root}", 16, data_dir=tmp_path / "d")  # another resolution: its own cache
    assert len(list((tmp_path / "d" / "cache").iterdir())) == 3 and cache.exists()


def test_folder_loader_uses_train_and_val_folders(cifar_subset: Path, tmp_path: Path) -> None:
    import shutil
    for split, take in (("train", slice(0, 8)), ("val", slice(8, 12))):
        for cls in ("cat", "ship"):
            files = sorted((cifar_subset / "train" / cls).iterdir())[take]
            (tmp_path / split / cls).mkdir(parents=True)
            for f in files:
                shutil.copy(f, tmp_path / split / cls / f.name)
    data = load_dataset(f"folder:{tmp_path}", 16, data_dir=tmp_path / "data")
    assert (len(data.train), len(data.val)) == (16, 8)
    assert data.train.tensors[0].shape[1:] == (3, 16, 16)


def test_folder_errors_are_one_line(tmp_path: Path) -> None:
    with pytest.raises(nas.SpecError, match=r"folder:.*/missing: no such directory"):
        load_dataset(f"folder:{tmp_path / 'missing'}", 32)
    with pytest.raises(nas.SpecError, match="Couldn't find any class folder"):
        load_dataset(f"folder:{tmp_path}", 32)
    (tmp_path / "cat").mkdir()
    (tmp_path / "cat" / "notes.txt").write_text("no images here")
    with pytest.raises(nas.SpecError, match="Found no valid file"):
        load_dataset(f"folder:{tmp_path}", 32)
    with pytest.raises(nas.SpecError, match="'imagenet' is not one of 'digits', 'cifar10'"):
        load_dataset("imagenet", 32)


def test_downloads_fail_here_with_a_clear_message(tmp_path: Path) -> None:
    # No network on CI: torchvision's download fails and the message says where to put the files.
    with pytest.raises(nas.SpecError, match=r"cannot load cifar10 from .*put cifar-10-python\.tar\.gz .* in "):
        load_dataset("cifar10", 32, data_dir=tmp_path)


def test_augmentation_crops_and_flips_each_image_on_its_own_and_is_seeded() -> None:
    # Distinct pixel values, so each output shows exactly which shift and flip it got.
    x = torch.arange(6 * 3 * 16 * 16).remainder(251).to(torch.uint8).reshape(6, 3, 16, 16)
    out = augment_batch(x, torch.Generator().manual_seed(0))
    assert torch.equal(out, augment_batch(x, torch.Generator().manual_seed(0)))
    padded = torch.nn.functional.pad(x, (2, 2, 2, 2)).float() / 255
    draws = set()
    for i in range(6):
        hits = [(dy, dx, f) for dy in range(5) for dx in range(5) for f in (False, True)
                if torch.equal(out[i], (lambda c: c.flip(2) if f else c)(padded[i, :, dy:dy + 16, dx:dx + 16]))]
        assert len(hits) == 1  # a crop of the zero-padded image, flipped or not
        draws.add(hits[0])
    assert len(draws) > 1  # not one draw for the whole batch
    big = torch.randint(0, 256, (4, 3, 96, 96), dtype=torch.uint8)  # above 64 px: random-resized crop
    out = augment_batch(big, torch.Generator().manual_seed(1))
    assert out.shape == (4, 3, 96, 96) and out.min() >= 0 and out.max() <= 1 and not torch.equal(out[0], out[1])
