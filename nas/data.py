"""Data sets for supernet training, search and stand-alone training.

``digits`` (default, embedded, no network), ``cifar10`` and ``flowers102`` (torchvision's loaders,
downloading into a data folder), ``folder:PATH`` (torchvision ``ImageFolder`` layout). Every set is
decoded once into in-memory tensors at the space's resolution: the images are small after resizing,
and a 2-core machine would otherwise spend most of an epoch decoding JPEGs again.
"""

from __future__ import annotations

import dataclasses
import os
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, TypeVar

import torch
import torch.nn.functional as F
from torch.utils.data import DataLoader, TensorDataset
from torchvision import datasets, transforms
from tqdm import tqdm

from nas._schema import SpecError

if TYPE_CHECKING:
    from nas.space import SearchSpace
    from nas.spec import NetworkSpec

DEFAULT_DATA_DIR = Path("data")
VAL_FRACTION = 0.2  # of the training images, when a data set has no validation split of its own
# ImageNet statistics: the usual choice for MobileNets, and what torchvision's pretrained weights expect.
MEAN, STD = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)


@dataclass(frozen=True)
class DataSplit:
    name: str
    train: TensorDataset
    val: TensorDataset
    classes: tuple[str, ...]
    resolution: int

    @property
    def num_classes(self) -> int:
        return len(self.classes)

    def loader(self, split: str, batch_size: int, *, shuffle: bool, seed: int = 0) -> DataLoader:
        data = self.train if split == "train" else self.val
        return DataLoader(data, batch_size=batch_size, shuffle=shuffle, drop_last=shuffle,
                          generator=torch.Generator().manual_seed(seed) if shuffle else None)

    def key(self) -> str:
        """Identifies the data for caches: name, resolution and split sizes."""
        return f"{self.name.replace(':', '-').replace('/', '_')}-{self.resolution}px-{len(self.train)}-{len(self.val)}"


def _normalise(x: torch.Tensor) -> torch.Tensor:
    """``x``: float images in [0, 1], N x C x H x W; gray images are repeated to three channels."""
    if x.shape[1] == 1:
        x = x.expand(-1, 3, -1, -1)
    mean = torch.tensor(MEAN).view(1, 3, 1, 1)
    std = torch.tensor(STD).view(1, 3, 1, 1)
    return ((x - mean) / std).contiguous()


def _split(name: str, data: TensorDataset, classes: tuple[str, ...], resolution: int, seed: int) -> DataSplit:
    """A seeded VAL_FRACTION train/val split of one set of images."""
    x, y = data.tensors
    perm = torch.randperm(len(y), generator=torch.Generator().manual_seed(seed))
    n_val = max(1, round(len(y) * VAL_FRACTION))
    tr, va = perm[n_val:], perm[:n_val]
    return DataSplit(name, TensorDataset(x[tr], y[tr]), TensorDataset(x[va], y[va]), classes, resolution)


def digits(resolution: int, seed: int = 0) -> DataSplit:
    """scikit-learn's 1,797 handwritten digits (8x8, 16 gray levels), resized; a seeded 80/20 split."""
    from sklearn.datasets import load_digits

    bunch = load_digits()
    x = torch.tensor(bunch.images, dtype=torch.float32).unsqueeze(1) / 16.0
    x = F.interpolate(x, size=(resolution, resolution), mode="bilinear", align_corners=False).clamp(0, 1)
    y = torch.tensor(bunch.target, dtype=torch.long)
    return _split("digits", TensorDataset(_normalise(x), y), tuple(str(c) for c in bunch.target_names),
                  resolution, seed)


def _tensors(dataset: torch.utils.data.Dataset, desc: str) -> TensorDataset:
    """Decode a torchvision data set once (in two worker processes) into normalised tensors."""
    loader = DataLoader(dataset, batch_size=256, num_workers=min(2, os.cpu_count() or 1))
    xs, ys = [], []
    for x, y in tqdm(loader, desc=f"decoding {desc}", unit="batch", leave=False):
        xs.append(x)
        ys.append(y)
    return TensorDataset(_normalise(torch.cat(xs)), torch.cat(ys))


def _to_tensor(resolution: int) -> transforms.Compose:
    return transforms.Compose([transforms.Resize((resolution, resolution)), transforms.ToTensor()])


def _download_error(name: str, root: Path, files: str, err: Exception) -> SpecError:
    return SpecError("", f"cannot load {name} from {root} ({type(err).__name__}: {str(err).splitlines()[0]}); "
                         f"with no network, put {files} in {root} yourself", source=f"--dataset {name}")


def cifar10(resolution: int, root: Path, seed: int = 0) -> DataSplit:
    """CIFAR-10: the 50,000 training images split 80/20 (seeded); the test set stays untouched."""
    try:
        full = datasets.CIFAR10(str(root), train=True, download=True, transform=_to_tensor(resolution))
    except Exception as e:  # torchvision raises URLError, RuntimeError or OSError depending on what failed
        raise _download_error("cifar10", root, "cifar-10-python.tar.gz (from https://www.cs.toronto.edu/~kriz/)",
                              e) from None
    return _split("cifar10", _tensors(full, "cifar10"), tuple(full.classes), resolution, seed)


def flowers102(resolution: int, root: Path) -> DataSplit:
    """Oxford Flowers102 with its own train and val splits (1,020 images each)."""
    try:
        train = datasets.Flowers102(str(root), split="train", download=True, transform=_to_tensor(resolution))
        val = datasets.Flowers102(str(root), split="val", download=True, transform=_to_tensor(resolution))
    except Exception as e:  # as above
        raise _download_error("flowers102", root, "flowers-102/ (102flowers.tgz, imagelabels.mat, setid.mat)",
                              e) from None
    return DataSplit("flowers102", _tensors(train, "flowers102 train"), _tensors(val, "flowers102 val"),
                     tuple(str(i) for i in range(102)), resolution)


def folder(path: str, resolution: int, seed: int = 0) -> DataSplit:
    """ImageFolder layout: ``PATH/train`` and ``PATH/val`` when present, else ``PATH`` split 80/20 (seeded)."""
    root = Path(path)
    where = f"--dataset folder:{path}"
    if not root.is_dir():
        raise SpecError("", "no such directory", source=where)

    def image_folder(p: Path) -> datasets.ImageFolder:
        try:
            return datasets.ImageFolder(str(p), transform=_to_tensor(resolution))
        except FileNotFoundError as e:  # torchvision's words: no class folders, or no images in them
            raise SpecError("", f"{p}: {e}", source=where) from None

    if (root / "train").is_dir():
        train = image_folder(root / "train")
        if (root / "val").is_dir():
            val = image_folder(root / "val")
            if val.classes != train.classes:
                raise SpecError("", f"{root / 'val'} has classes {val.classes}, train has {train.classes}",
                                source=where)
            return DataSplit(f"folder:{path}", _tensors(train, "train"), _tensors(val, "val"), tuple(train.classes),
                             resolution)
    else:
        train = image_folder(root)
    return _split(f"folder:{path}", _tensors(train, path), tuple(train.classes), resolution, seed)


T = TypeVar("T", "NetworkSpec", "SearchSpace")


def load_for(target: T, name: str, *, seed: int = 0, data_dir: str | os.PathLike[str] = DEFAULT_DATA_DIR
             ) -> tuple[T, DataSplit]:
    """Data set ``name`` at ``target``'s resolution, and ``target`` (a spec or a space) with the data set's number
    of classes: the one place a data set decides the class count. Training refuses a mismatch."""
    data = load_dataset(name, target.input.resolution, seed=seed, data_dir=data_dir)
    return dataclasses.replace(target, num_classes=data.num_classes), data


def check_classes(target: NetworkSpec | SearchSpace, data: DataSplit) -> None:
    if target.num_classes != data.num_classes:
        raise SpecError("num_classes", f"{target.num_classes}, but data set {data.name} has {data.num_classes} "
                                       "classes (load both with nas.data.load_for)")


def load_dataset(name: str, resolution: int, *, seed: int = 0, data_dir: str | os.PathLike[str] = DEFAULT_DATA_DIR
                 ) -> DataSplit:
    """``digits``, ``cifar10``, ``flowers102`` or ``folder:PATH``, at ``resolution`` x ``resolution``."""
    if name == "digits":
        return digits(resolution, seed)
    if name == "cifar10":
        return cifar10(resolution, Path(data_dir), seed)
    if name == "flowers102":
        return flowers102(resolution, Path(data_dir))
    if name.startswith("folder:") and len(name) > len("folder:"):
        return folder(name[len("folder:"):], resolution, seed)
    raise SpecError("dataset", f"{name!r} is not one of 'digits', 'cifar10', 'flowers102', 'folder:PATH'")
