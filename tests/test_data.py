import tarfile
from pathlib import Path

import pytest
import torch

import nas
from nas.data import digits, load_dataset

CIFAR = Path(__file__).resolve().parents[2] / "shared" / "data" / "cifar10-jpeg-train.tar.gz"


def test_digits_is_embedded_resized_and_split_the_same_way_every_time() -> None:
    a, b = digits(32, seed=0), digits(32, seed=0)
    x, y = a.train.tensors
    assert x.shape[1:] == (3, 32, 32) and len(a.train) + len(a.val) == 1797
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


def test_folder_loader_reads_real_jpegs_with_a_seeded_split(cifar_subset: Path) -> None:
    data = load_dataset(f"folder:{cifar_subset / 'train'}", 32, seed=0)
    assert data.classes == ("airplane", "cat", "ship")
    assert len(data.train) + len(data.val) == 36 and len(data.val) == 7
    x, y = data.train.tensors
    assert x.shape[1:] == (3, 32, 32) and x.dtype == torch.float32 and set(y.tolist()) <= {0, 1, 2}
    assert x.std() > 0.3  # real pixels, normalised


def test_folder_loader_uses_train_and_val_folders(cifar_subset: Path, tmp_path: Path) -> None:
    import shutil
    for split, take in (("train", slice(0, 8)), ("val", slice(8, 12))):
        for cls in ("cat", "ship"):
            files = sorted((cifar_subset / "train" / cls).iterdir())[take]
            (tmp_path / split / cls).mkdir(parents=True)
            for f in files:
                shutil.copy(f, tmp_path / split / cls / f.name)
    data = load_dataset(f"folder:{tmp_path}", 16)
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
