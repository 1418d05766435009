"""Data sets for supernet training, search and stand-alone training.

``digits`` (default, embedded, no network), ``cifar10`` and ``flowers102`` (torchvision's loaders,
downloading into a data folder), ``folder:PATH`` (torchvision ``ImageFolder`` layout). Every set is
decoded once into uint8 tensors at the space's resolution (a folder's into a cache file under
``<data_dir>/cache/``, so later commands skip decoding); batches are converted to normalised floats, and
training batches augmented, on the training device, so neither decoding nor augmentation starves it.
"""

from __future__ import annotations

import dataclasses
import math
import os
import sys
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, TypeVar

import torch
import torch.nn.functional as F
from torch.utils.data import DataLoader, DistributedSampler, TensorDataset
from torchvision import datasets, transforms
from tqdm import tqdm

from nas._schema import SpecError, digest, write_atomic

if TYPE_CHECKING:
    from nas.space import SearchSpace
    from nas.spec import NetworkSpec

DEFAULT_DATA_DIR = Path("data")
VAL_FRACTION = 0.2  # of the training images, when a data set has no validation split of its own
# ImageNet statistics: the usual choice for MobileNets, and what torchvision's pretrained weights expect.
MEAN, STD = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)
CACHE_VERSION = 1
# Up to this resolution augmentation is CIFAR's random crop after zero padding by 1/8 of the side; above it,
# Inception's random-resized crop (scale 0.25-1: the images are small data sets' already-resized ones).
PAD_CROP_MAX_RESOLUTION = 64
RRC_SCALE, RRC_RATIO = (0.25, 1.0), (3 / 4, 4 / 3)


@dataclass(frozen=True)
class DataSplit:
    name: str
    train: TensorDataset  # uint8 images N x 3 x H x W, int64 labels
    val: TensorDataset
    classes: tuple[str, ...]
    resolution: int
    natural: bool = True  # photographs (augmented by default); False for digits

    @property
    def num_classes(self) -> int:
        return len(self.classes)

    def batches(self, split: str, batch_size: int, *, shuffle: bool, seed: int = 0,
                device: torch.device | str = "cpu", augment: bool = False, rank: int = 0, world: int = 1
                ) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        """Normalised float batches of ``split`` on ``device``; shuffled ones drop the last partial batch. With
        ``augment`` each image is randomly cropped and flipped (on ``device``, seeded by ``seed``). Process ``rank``
        of ``world`` gets its share of a shuffled permutation (``DistributedSampler``'s): with ``batch_size`` B/N,
        batch k of all N processes together is batch k of one process at B."""
        data = self.train if split == "train" else self.val
        x_all, y_all = data.tensors
        g = torch.Generator().manual_seed(seed)
        if shuffle and world > 1:
            order = torch.tensor(list(DistributedSampler(data, num_replicas=world, rank=rank, seed=seed,
                                                         drop_last=True)))
            g.manual_seed(seed * 7919 + rank)  # each process its own augmentation draws
        else:
            order = torch.randperm(len(y_all), generator=g) if shuffle else torch.arange(len(y_all))
        stop = len(order) - len(order) % batch_size if shuffle else len(order)
        order = order.to(x_all.device)
        for i in range(0, stop, batch_size):
            idx = order[i:i + batch_size]
            x = x_all[idx].to(device, non_blocking=True)
            x = augment_batch(x, g) if augment else x.float().div_(255)
            yield normalise(x), y_all[idx].to(device, non_blocking=True)

    def on(self, device: torch.device) -> DataSplit:
        """This data set with its uint8 images held on ``device`` (a CUDA device: a few hundred MB for CIFAR-10 at
        32px, so no batch waits for a host-to-device copy); itself on the CPU."""
        if device.type == "cpu":
            return self
        return dataclasses.replace(self, train=TensorDataset(*(t.to(device) for t in self.train.tensors)),
                                   val=TensorDataset(*(t.to(device) for t in self.val.tensors)))

    def steps(self, batch_size: int) -> int:
        """Training steps per epoch (shuffled batches drop the last partial one)."""
        return len(self.train) // batch_size

    def key(self) -> str:
        """Identifies the data for caches: name, resolution and split sizes."""
        return f"{self.name.replace(':', '-').replace('/', '_')}-{self.resolution}px-{len(self.train)}-{len(self.val)}"


def normalise(x: torch.Tensor) -> torch.Tensor:
    """``x``: float images in [0, 1], N x 3 x H x W, on any device."""
    mean = torch.tensor(MEAN, device=x.device).view(1, 3, 1, 1)
    std = torch.tensor(STD, device=x.device).view(1, 3, 1, 1)
    return (x - mean) / std


def augment_batch(x: torch.Tensor, g: torch.Generator) -> torch.Tensor:
    """Random crop (padded, or random-resized above PAD_CROP_MAX_RESOLUTION) and horizontal flip of uint8 images
    ``x`` on their own device, each image its own draw; returns floats in [0, 1].

    Written out because torchvision's transforms draw one set of parameters per call, i.e. per batch, and a
    per-image loop would cost a kernel launch per image on a GPU. The random numbers come from ``g`` on the CPU,
    so a seed gives the same crops on every device.
    """
    n, _, h, w = x.shape
    dev = x.device
    flip = (torch.rand(n, generator=g) < 0.5).to(dev)
    if h <= PAD_CROP_MAX_RESOLUTION:
        pad = max(1, h // 8)
        padded = F.pad(x, (pad, pad, pad, pad))
        dy = torch.randint(0, 2 * pad + 1, (n,), generator=g).to(dev)
        dx = torch.randint(0, 2 * pad + 1, (n,), generator=g).to(dev)
        rows = (dy[:, None] + torch.arange(h, device=dev))[:, None, :, None]
        cols = (dx[:, None] + torch.arange(w, device=dev))[:, None, None, :]
        x = padded[torch.arange(n, device=dev)[:, None, None, None], torch.arange(3, device=dev)[None, :, None, None],
                   rows, cols].float().div_(255)
    else:  # random-resized crop as one batched affine resampling
        area = torch.empty(n).uniform_(*RRC_SCALE, generator=g)
        log_ratio = torch.empty(n).uniform_(math.log(RRC_RATIO[0]), math.log(RRC_RATIO[1]), generator=g)
        sw = (area * log_ratio.exp()).sqrt().clamp(max=1.0)  # crop width and height as fractions of the side
        sh = (area / log_ratio.exp()).sqrt().clamp(max=1.0)
        cx = (torch.rand(n, generator=g) * 2 - 1) * (1 - sw)  # crop centre in [-1, 1] coordinates, inside
        cy = (torch.rand(n, generator=g) * 2 - 1) * (1 - sh)
        theta = torch.zeros(n, 2, 3)
        theta[:, 0, 0], theta[:, 0, 2], theta[:, 1, 1], theta[:, 1, 2] = sw, cx, sh, cy
        grid = F.affine_grid(theta.to(dev), [n, 3, h, w], align_corners=False)
        x = F.grid_sample(x.float().div_(255), grid, mode="bilinear", padding_mode="border", align_corners=False)
    return torch.where(flip[:, None, None, None], x.flip(3), x)


def _split(name: str, data: TensorDataset, classes: tuple[str, ...], resolution: int, seed: int,
           natural: bool = True) -> DataSplit:
    """A seeded VAL_FRACTION train/val split of one set of images."""
    x, y = data.tensors
    perm = torch.randperm(len(y), generator=torch.Generator().manual_seed(seed))
    n_val = max(1, round(len(y) * VAL_FRACTION))
    tr, va = perm[n_val:], perm[:n_val]
    return DataSplit(name, TensorDataset(x[tr], y[tr]), TensorDataset(x[va], y[va]), classes, resolution, natural)


def digits(resolution: int, seed: int = 0) -> DataSplit:
    """scikit-learn's 1,797 handwritten digits (8x8, 16 gray levels), resized; a seeded 80/20 split."""
    from sklearn.datasets import load_digits

    bunch = load_digits()
    x = torch.tensor(bunch.images, dtype=torch.float32).unsqueeze(1) / 16.0
    x = F.interpolate(x, size=(resolution, resolution), mode="bilinear", align_corners=False).clamp(0, 1)
    x = (x * 255).round().to(torch.uint8).expand(-1, 3, -1, -1).contiguous()
    y = torch.tensor(bunch.target, dtype=torch.long)
    return _split("digits", TensorDataset(x, y), tuple(str(c) for c in bunch.target_names), resolution, seed,
                  natural=False)


def _tensors(dataset: torch.utils.data.Dataset, desc: str) -> TensorDataset:
    """Decode a torchvision data set once (in two worker processes) into uint8 tensors."""
    loader = DataLoader(dataset, batch_size=256, num_workers=min(2, os.cpu_count() or 1))
    xs, ys = [], []
    for x, y in tqdm(loader, desc=f"decoding {desc}", unit="batch", leave=False):
        xs.append(x)
        ys.append(y)
    return TensorDataset(torch.cat(xs), torch.cat(ys).long())


def _to_uint8(resolution: int) -> transforms.Compose:
    return transforms.Compose([transforms.Resize((resolution, resolution)), transforms.PILToTensor()])


def _download_error(name: str, root: Path, files: str, err: Exception) -> SpecError:
    return SpecError("", f"cannot load {name} from {root} ({type(err).__name__}: {str(err).splitlines()[0]}); "
                         f"with no network, put {files} in {root} yourself", source=f"--dataset {name}")


def cifar10(resolution: int, root: Path, seed: int = 0) -> DataSplit:
    """CIFAR-10: the 50,000 training images split 80/20 (seeded); the test set stays untouched."""
    try:
        full = datasets.CIFAR10(str(root), train=True, download=True, transform=_to_uint8(resolution))
    except Exception as e:  # torchvision raises URLError, RuntimeError or OSError depending on what failed
        raise _download_error("cifar10", root, "cifar-10-python.tar.gz (from https://www.cs.toronto.edu/~kriz/)",
                              e) from None
    return _split("cifar10", _tensors(full, "cifar10"), tuple(full.classes), resolution, seed)


def flowers102(resolution: int, root: Path) -> DataSplit:
    """Oxford Flowers102 with its own train and val splits (1,020 images each)."""
    try:
        train = datasets.Flowers102(str(root), split="train", download=True, transform=_to_uint8(resolution))
        val = datasets.Flowers102(str(root), split="val", download=True, transform=_to_uint8(resolution))
    except Exception as e:  # as above
        raise _download_error("flowers102", root, "flowers-102/ (102flowers.tgz, imagelabels.mat, setid.mat)",
                              e) from None
    return DataSplit("flowers102", _tensors(train, "flowers102 train"), _tensors(val, "flowers102 val"),
                     tuple(str(i) for i in range(102)), resolution)


def _size_and_mtime(path: str) -> tuple[int, int]:
    st = os.stat(path)
    return st.st_size, st.st_mtime_ns


def _image_folder(p: Path, resolution: int, cache_dir: Path, where: str) -> tuple[TensorDataset, tuple[str, ...]]:
    """The images of ImageFolder ``p`` as uint8 tensors, decoded once: the cache file is keyed on the folder's
    classes and every image's path, size and modification time, and the resolution, so any change decodes again."""
    try:
        classes, to_idx = datasets.folder.find_classes(str(p))
        files = datasets.folder.make_dataset(str(p), to_idx, extensions=datasets.folder.IMG_EXTENSIONS)
    except FileNotFoundError as e:  # torchvision's words: no class folders, or no images in them
        raise SpecError("", f"{p}: {e}", source=where) from None
    listing = [(os.path.relpath(f, p), *_size_and_mtime(f), label) for f, label in files]
    path = cache_dir / f"folder-{p.name}-{resolution}px-{digest(CACHE_VERSION, classes, listing, resolution)}.pt"
    if path.is_file():
        try:
            cached = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
            return TensorDataset(cached["x"], cached["y"]), tuple(classes)
        except Exception as e:  # a truncated or foreign file: decode again and replace it
            print(f"warning: {path}: unreadable decoded-image cache ({type(e).__name__}); decoding again",
                  file=sys.stderr)
    folder_set = datasets.ImageFolder(str(p), transform=_to_uint8(resolution))
    data = _tensors(folder_set, str(p))
    try:
        write_atomic(path, lambda tmp: torch.save({"x": data.tensors[0], "y": data.tensors[1]}, tmp))
    except SpecError as e:  # the data are fine; only later commands lose the shortcut, and the user is told
        print(f"warning: decoded images not cached: {e}", file=sys.stderr)
    return data, tuple(classes)


def folder(path: str, resolution: int, seed: int = 0, data_dir: str | os.PathLike[str] = DEFAULT_DATA_DIR
           ) -> DataSplit:
    """ImageFolder layout: ``PATH/train`` and ``PATH/val`` when present, else ``PATH`` split 80/20 (seeded)."""
    root = Path(path)
    where = f"--dataset folder:{path}"
    if not root.is_dir():
        raise SpecError("", "no such directory", source=where)
    cache = Path(data_dir) / "cache"
    if (root / "train").is_dir():
        train, classes = _image_folder(root / "train", resolution, cache, where)
        if (root / "val").is_dir():
            val, val_classes = _image_folder(root / "val", resolution, cache, where)
            if val_classes != classes:
                raise SpecError("", f"{root / 'val'} has classes {list(val_classes)}, train has {list(classes)}",
                                source=where)
            return DataSplit(f"folder:{path}", train, val, classes, resolution)
    else:
        train, classes = _image_folder(root, resolution, cache, where)
    return _split(f"folder:{path}", train, classes, resolution, seed)


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
        return folder(name[len("folder:"):], resolution, seed, data_dir)
    raise SpecError("dataset", f"{name!r} is not one of 'digits', 'cifar10', 'flowers102', 'folder:PATH'")
