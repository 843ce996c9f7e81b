"""Datasets and the device-side augmentation shared by train.py, eval.py and visualize.py.

A dataset is an `ImageData`: uint8 images (N, C, S, S) held once in memory (moved to the training device by
the caller) plus labels where the dataset has them; folders too large to hold are streamed through a DataLoader
with workers (`ImageData.files`). Either way the paper's two views are made on the device, batched, drawing from rng.py.
"""
import functools
import gzip
import math
import os
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F

import rng

IMAGENET_STATS = ((0.485, 0.456, 0.406), (0.229, 0.224, 0.225))
STATS = {  # per-channel mean and std of the training images, in [0, 1]
    "cifar10": ((0.4914, 0.4822, 0.4465), (0.2470, 0.2435, 0.2616)),
    "cifar100": ((0.5071, 0.4865, 0.4409), (0.2673, 0.2564, 0.2762)),
    "stl10": ((0.4467, 0.4398, 0.4066), (0.2603, 0.2566, 0.2713)),
    "fashion-mnist": ((0.2860,) * 3, (0.3530,) * 3),
    "mnist": ((0.1307,) * 3, (0.3081,) * 3),
    "synthetic": ((0.5,) * 3, (0.25,) * 3),
}


def stats(dataset):
    """Per-channel (mean, std) in [0, 1] of `dataset` as `load` gives it (ImageNet's: folders, flowers102, pets)."""
    return STATS.get(dataset, IMAGENET_STATS)


DATASETS = ("cifar10", "cifar100", "stl10", "fashion-mnist", "mnist", "flowers102", "pets", "synthetic")
DATASET_RULE = (lambda v: v in DATASETS or os.path.isdir(v),   # a --dataset flag's rule (see runtime.allowed)
                f"one of {', '.join(DATASETS)}, or a folder of images")
FASHION_MNIST_DEBIAN = "/usr/share/datasets/fashion-mnist"
IMAGE_EXTS = (".jpg", ".jpeg", ".png", ".bmp", ".gif", ".webp", ".tif", ".tiff", ".ppm")
MEMORY_BUDGET = 4 << 30  # bytes: folders whose decoded images exceed this are streamed each epoch


class DataError(ValueError):
    """A dataset that cannot be had (unknown name, missing folder, no images); one-line message."""


@dataclass
class ImageData:
    images: torch.Tensor | None   # (N, C, S, S) uint8, C = 1 or 3; None when streamed
    labels: torch.Tensor | None   # (N,) int64, or None for unlabelled data
    mean: tuple                   # per-channel mean of 3-channel images, in [0, 1]
    std: tuple
    num_classes: int = 0
    files: object = None          # a Dataset of uint8 images, when streamed instead of held
    skipped: int = 0              # unreadable files skipped (folders)

    def __len__(self):
        return len(self.images) if self.images is not None else len(self.files)


# === Loading

def load(name, data_dir="./data", train=True, limit=0, pretrain=False, size=32):
    """The `train` or test split of dataset `name` (one of DATASETS, or a folder of images).
    pretrain: the split for self-supervised pretraining (STL-10: unlabelled + train). size: side at
    which file-based images (folders, flowers102, pets) are held. limit: the first `limit` images (0: all)."""
    if name not in DATASETS and not os.path.isdir(name):
        raise DataError(f"no such folder: {name}" if os.sep in name or name.startswith(".") else
                        f"unknown dataset {name!r}; choose from {', '.join(DATASETS)} or a folder of images")
    if name not in DATASETS:
        data = load_folder(name, size)
    elif name == "synthetic":
        data = synthetic(train)
    elif name == "fashion-mnist":
        data = fashion_mnist(data_dir, train)
    else:
        data = torchvision_split(name, data_dir, train, pretrain, size)
    if limit and limit < len(data):
        data.images = data.images[:limit] if data.images is not None else None
        data.labels = data.labels[:limit] if data.labels is not None else None
        if data.files is not None:
            data.files = torch.utils.data.Subset(data.files, range(limit))
    return data


def synthetic(train, n=None, size=32, classes=10):
    """Labelled toy images: a class-specific oriented colour grating, random phase, plus noise."""
    n = n or (2048 if train else 512)
    g = torch.Generator().manual_seed(1 if train else 2)
    labels = torch.arange(n) % classes
    angle = labels.float() * math.pi / classes                       # (N,) orientation per class
    colour = torch.rand(classes, 3, generator=torch.Generator().manual_seed(0))[labels]  # (N, 3)
    yy, xx = torch.meshgrid(torch.arange(size).float(), torch.arange(size).float(), indexing="ij")
    phase = torch.rand(n, 1, 1, generator=g) * 2 * math.pi
    wave = torch.sin((xx * angle.cos().view(-1, 1, 1) + yy * angle.sin().view(-1, 1, 1)) * 0.6 + phase)
    img = 0.5 + 0.4 * wave[:, None] * colour[..., None, None]        # (N, 3, S, S)
    img = img + 0.05 * torch.randn(img.shape, generator=g)
    images = (img.clamp(0, 1) * 255).round().to(torch.uint8)
    return ImageData(images, labels, *STATS["synthetic"], num_classes=classes)


def read_idx_gz(path):
    """An idx file (MNIST format), gzip-compressed, as a numpy array."""
    with gzip.open(path, "rb") as f:
        raw = f.read()
    ndim = raw[3]
    shape = [int.from_bytes(raw[4 + 4 * i: 8 + 4 * i], "big") for i in range(ndim)]
    return np.frombuffer(raw, dtype=np.uint8, offset=4 + 4 * ndim).reshape(shape)


def fashion_mnist(data_dir, train):
    """Fashion-MNIST from Debian's dataset-fashion-mnist when installed, else torchvision's download."""
    prefix = os.path.join(FASHION_MNIST_DEBIAN, "train" if train else "t10k")
    if not os.path.exists(f"{prefix}-images-idx3-ubyte.gz"):
        return torchvision_split("fashion-mnist", data_dir, train, False, 0)
    images = torch.from_numpy(read_idx_gz(f"{prefix}-images-idx3-ubyte.gz").copy())
    labels = torch.from_numpy(read_idx_gz(f"{prefix}-labels-idx1-ubyte.gz").astype(np.int64))
    return ImageData(images[:, None], labels, *STATS["fashion-mnist"], num_classes=10)


def torchvision_split(name, data_dir, train, pretrain, size):
    """CIFAR, STL-10, (Fashion-)MNIST, Flowers-102, Oxford-IIIT Pets through torchvision (downloaded once)."""
    import torchvision.datasets as tvd
    os.makedirs(data_dir, exist_ok=True)
    if name in ("cifar10", "cifar100"):
        ds = (tvd.CIFAR10 if name == "cifar10" else tvd.CIFAR100)(data_dir, train=train, download=True)
        images = torch.from_numpy(ds.data).permute(0, 3, 1, 2).contiguous()
        return ImageData(images, torch.tensor(ds.targets), *STATS[name], len(ds.classes))
    if name in ("mnist", "fashion-mnist"):
        ds = (tvd.MNIST if name == "mnist" else tvd.FashionMNIST)(data_dir, train=train, download=True)
        return ImageData(ds.data[:, None].clone(), ds.targets.clone(), *STATS[name], 10)
    if name == "stl10":
        split = "train+unlabeled" if (train and pretrain) else ("train" if train else "test")
        ds = tvd.STL10(data_dir, split=split, download=True)
        labels = torch.from_numpy(ds.labels.astype(np.int64))
        return ImageData(torch.from_numpy(ds.data), None if pretrain and train else labels, *STATS["stl10"], 10)
    if name == "flowers102":  # train + val for training, as is usual for this small dataset
        parts = [tvd.Flowers102(data_dir, split=s, download=True) for s in (("train", "val") if train else ("test",))]
        files = [(str(f), int(y)) for p in parts for f, y in zip(p._image_files, p._labels)]
        return decode_files(files, size, 102)
    if name == "pets":
        ds = tvd.OxfordIIITPet(data_dir, split="trainval" if train else "test", download=True)
        return decode_files([(str(f), int(y)) for f, y in zip(ds._images, ds._labels)], size, 37)
    raise DataError(f"unknown dataset {name!r}")


# === Image files: decoded by DataLoader workers, resized (short side) and centre-cropped to S x S

class ImageFiles(torch.utils.data.Dataset):
    """(path, label) pairs -> (uint8 (3, S, S) image, label); an unreadable file gives an empty image."""

    def __init__(self, items, size):
        self.items, self.size = items, size

    def __len__(self):
        return len(self.items)

    def __getitem__(self, i):
        from PIL import Image
        import torchvision.transforms.functional as TF
        path, label = self.items[i]
        try:
            with Image.open(path) as im:
                return TF.pil_to_tensor(TF.center_crop(TF.resize(im.convert("RGB"), self.size), self.size)), label
        except Exception:
            return torch.empty(0, dtype=torch.uint8), label


def find_images(folder):
    paths = sorted(os.path.join(root, f) for root, _, names in os.walk(folder, followlinks=True)
                   for f in names if f.lower().endswith(IMAGE_EXTS))
    if not paths:
        raise DataError(f"no images ({', '.join(IMAGE_EXTS)}) found under {folder}")
    return paths


def load_folder(folder, size):
    """Every image under `folder` (recursively), unlabelled; unreadable files are skipped and counted."""
    paths = find_images(folder)
    if len(paths) * 3 * size * size > MEMORY_BUDGET:
        return ImageData(None, None, *IMAGENET_STATS, files=ImageFiles([(p, -1) for p in paths], size))
    data = decode_files([(p, -1) for p in paths], size, 0)
    if not len(data):
        raise DataError(f"none of the {data.skipped} image files under {folder} could be read")
    data.labels = None
    return data


def decode_files(items, size, num_classes, workers=min(8, os.cpu_count() or 1)):
    """Decode every file once with DataLoader workers into one uint8 tensor (N, 3, S, S)."""
    loader = torch.utils.data.DataLoader(ImageFiles(items, size), batch_size=64, num_workers=workers, collate_fn=list)
    pairs = [pair for batch in loader for pair in batch]
    kept = [(img, label) for img, label in pairs if img.numel() > 0]   # an empty image: unreadable
    images = torch.stack([img for img, _ in kept]) if kept else torch.empty(0, 3, size, size, dtype=torch.uint8)
    labels = torch.tensor([label for _, label in kept], dtype=torch.long)
    return ImageData(images, labels, *IMAGENET_STATS, num_classes, skipped=len(pairs) - len(kept))


def collate_readable(batch):
    """Stack the readable images of a streamed batch (unreadable ones are dropped)."""
    return torch.stack([img for img, _ in batch if img.numel() > 0])


# === Batches of one epoch: a seeded permutation per epoch, so a resumed run sees the same order

def epoch_order(n, epoch, seed):
    """The permutation of n images for `epoch`; a pure function of (n, epoch, seed)."""
    return torch.randperm(n, generator=torch.Generator().manual_seed(seed * 100003 + epoch))


def epoch_batches(data, images, batch_size, epoch, seed, start=0, rank=0, world=1, workers=4):
    """uint8 batches (B/world, C, S, S) for this rank, from batch index `start`, on the device of `images`
    (data.images moved there, or None to stream data.files). The last incomplete global batch is dropped."""
    order = epoch_order(len(data), epoch, seed)
    steps, local = len(data) // batch_size, batch_size // world
    if images is not None:
        order = order.to(images.device)
        for s in range(start, steps):
            idx = order[s * batch_size + rank * local: s * batch_size + (rank + 1) * local]
            yield images[idx]
        return
    order = order.tolist()
    idx = [order[s * batch_size + rank * local + j] for s in range(start, steps) for j in range(local)]
    yield from torch.utils.data.DataLoader(torch.utils.data.Subset(data.files, idx), batch_size=local,
                                           num_workers=workers, collate_fn=collate_readable,
                                           pin_memory=torch.cuda.is_available(), persistent_workers=False)


# === Device-side augmentation (batched): crop, flip, colour jitter, grayscale, blur, solarize

def to_unit(x, size=None):
    """uint8 (B, C, S, S), C = 1 or 3 -> float (B, 3, S, S) in [0, 1]; shrunk to `size` if larger (see `augment`)."""
    x = x.float() / 255
    x = x.expand(-1, 3, -1, -1) if x.shape[1] == 1 else x
    if size and (x.shape[-1] > size or x.shape[-2] > size):
        x = F.interpolate(x, size=(size, size), mode="bilinear", antialias=True, align_corners=False)
    return x


def constant(values, device):
    """A small constant tensor made once per device (in a compiled graph, a constant of the graph)."""
    if torch.compiler.is_compiling():
        return torch.tensor(values, device=device)
    return cached_constant(values, device=device)


cached_constant = functools.lru_cache(maxsize=64)(torch.tensor)


def channel_stats(mean, std, device):
    """Per-channel mean and std as (1, 3, 1, 1) tensors on `device`."""
    return constant(tuple(mean), device).view(1, -1, 1, 1), constant(tuple(std), device).view(1, -1, 1, 1)


def normalize(x, mean, std):
    m, s = channel_stats(mean, std, x.device)
    return (x - m) / s


def denormalize(x, mean, std):
    m, s = channel_stats(mean, std, x.device)
    return (x * s + m).clamp(0, 1)


def prepare(x, size, mean, std):
    """Evaluation transform: uint8 (B, C, S, S) -> normalised float (B, 3, size, size)."""
    x = to_unit(x)
    if x.shape[-1] != size or x.shape[-2] != size:
        x = F.interpolate(x, size=(size, size), mode="bilinear", antialias=True, align_corners=False)
    return normalize(x, mean, std)


def rand(B, device, lo=0.0, hi=1.0):
    """(B,) uniform in [lo, hi): rng.rand, which the training step replays."""
    return lo + (hi - lo) * rng.rand(B, device=device)


def random_resized_crop(x, size, scale=(0.2, 1.0), ratio=(3 / 4, 4 / 3), flip=0.5):
    """Per-image crop of area share ~U(scale) and aspect ~logU(ratio), resized to size; flip p 0.5; one
    affine grid_sample for the batch. Differs from torchvision: a crop that would not fit is clamped to
    the image instead of re-drawn (up to 10 times) and falling back to a centre crop, because a re-draw
    is a loop whose length depends on the draws, which a batched, compiled step cannot have."""
    B, dev = x.shape[0], x.device
    area = rand(B, dev, *scale)
    log_r = rand(B, dev, math.log(ratio[0]), math.log(ratio[1]))
    w = (area * log_r.exp()).sqrt().clamp(max=1)                    # crop width / image width
    h = (area / log_r.exp()).sqrt().clamp(max=1)
    cx = (2 * rand(B, dev) - 1) * (1 - w)                # crop centre, in [-1, 1] coords
    cy = (2 * rand(B, dev) - 1) * (1 - h)
    sign = torch.where(rand(B, dev) < flip, -1.0, 1.0)
    # the output's pixel centres in grid_sample's [-1, 1] coordinates, scaled and moved into the crop: the
    # affine grid of an axis-aligned crop, made directly (F.affine_grid's batched 3x2 products cost 4x more)
    t = (torch.arange(size, device=dev) * 2 + 1) / size - 1
    gx, gy = cx[:, None] + (w * sign)[:, None] * t, cy[:, None] + h[:, None] * t            # (B, size) each
    grid = torch.stack(torch.broadcast_tensors(gx[:, None, :], gy[:, :, None]), -1)      # (B, size, size, 2)
    return F.grid_sample(x, grid, mode="bilinear", padding_mode="reflection", align_corners=False)


def gray(x):
    """Luma (B, 1, H, W) of RGB images in [0, 1] (ITU-R 601 weights, as torchvision), one matrix product."""
    B, C, H, W = x.shape
    return (constant((0.299, 0.587, 0.114), x.device) @ x.reshape(B, C, H * W)).view(B, 1, H, W)


def enhance(x, degenerate, factor):
    """PIL's ImageEnhance (torchvision's blend): from `degenerate` (factor 0) through x (factor 1) and
    beyond, clamped to [0, 1]; factor (B,)."""
    return torch.lerp(degenerate, x, factor.view(-1, 1, 1, 1)).clamp(0, 1)


RGB_TO_YIQ = ((0.299, 0.587, 0.114), (0.596, -0.274, -0.322), (0.211, -0.523, 0.312))  # NTSC
YIQ_TO_RGB = tuple(map(tuple, torch.linalg.inv(torch.tensor(RGB_TO_YIQ, dtype=torch.float64)).tolist()))  # exact


def color_jitter(x, p=0.8, brightness=0.4, contrast=0.4, saturation=0.2, hue=0.1):
    """Brightness, contrast, saturation and hue jitter, each image with probability p. Differs from
    torchvision: a fixed order (not a random one) and hue rotated in YIQ space (a 3x3 matrix per image)
    instead of through HSV; both keep it a few batched ops."""
    B, dev = x.shape[0], x.device
    on = (rand(B, dev) < p).float()
    def factor(a):
        return 1 + on * rand(B, dev, -a, a)
    x = (x * factor(brightness).view(B, 1, 1, 1)).clamp(0, 1)
    x = enhance(x, gray(x).mean((2, 3), keepdim=True), factor(contrast))
    x = enhance(x, gray(x), factor(saturation))
    angle = on * rand(B, dev, -hue, hue) * 2 * math.pi
    c, s = angle.cos(), angle.sin()
    rot = torch.zeros(B, 3, 3, device=dev)
    rot[:, 0, 0], rot[:, 1, 1], rot[:, 1, 2], rot[:, 2, 1], rot[:, 2, 2] = 1, c, -s, s, c
    m = constant(YIQ_TO_RGB, dev) @ rot @ constant(RGB_TO_YIQ, dev)  # (B, 3, 3)
    return torch.einsum("bij,bjhw->bihw", m, x).clamp(0, 1)


def random_grayscale(x, p=0.2):
    on = (rand(x.shape[0], x.device) < p).view(-1, 1, 1, 1)
    return torch.where(on, gray(x), x)


def gaussian_blur(x, p, sigma=(0.1, 2.0)):
    """Per-image Gaussian blur with probability p, sigma ~ U(sigma) (pixels), separable, one conv each way."""
    (B, C, H, W), dev = x.shape, x.device
    s = rand(B, dev, *sigma)
    s = torch.where(rand(B, dev) < p, s, torch.full_like(s, 1e-3))  # ~ identity kernel
    r = max(1, math.ceil(3 * sigma[1]))
    t = torch.arange(-r, r + 1, device=dev, dtype=x.dtype)
    k = torch.exp(-t[None] ** 2 / (2 * s[:, None] ** 2))
    k = (k / k.sum(1, keepdim=True)).repeat_interleave(C, 0)        # (B*C, 2r+1)
    y = F.pad(x.reshape(1, B * C, H, W), (r, r, r, r), mode="reflect" if r < min(H, W) else "replicate")
    y = F.conv2d(y, k.view(B * C, 1, 1, -1), groups=B * C)
    y = F.conv2d(y, k.view(B * C, 1, -1, 1), groups=B * C)
    return y.view(B, C, H, W)


def solarize(x, p):
    """Per image with probability p, values of 0.5 and more inverted: min(x, 1 - x)."""
    if p == 0:
        return x
    on = (rand(x.shape[0], x.device) < p).view(-1, 1, 1, 1)
    return torch.where(on, x.minimum(1 - x), x)


def augment(x, size, blur_p, solarize_p, crop_min):
    """One view: uint8 (B, C, S, S) -> float (B, 3, size, size) in [0, 1]. Larger images (STL-10's 96 px
    for 32 px training) are first shrunk to `size` with antialiasing by `to_unit`, as `prepare` does:
    cropping and shrinking in one bilinear grid_sample would alias, and train and test sharpness would differ."""
    x = to_unit(x, size)
    x = random_resized_crop(x, size, scale=(crop_min, 1.0))
    x = random_grayscale(color_jitter(x))
    # The reference blurs 224 px images with sigma in [0.1, 2]: the same relative blur is sigma x size / 224
    x = gaussian_blur(x, blur_p, sigma=(0.1 * size / 224, 2.0 * size / 224))
    return solarize(x, solarize_p)


def two_views(x, size, mean, std, crop_min=0.2):
    """The two normalised views of a uint8 batch, stacked (2B, 3, size, size): [view 1; view 2]. Crops
    of area share ~U(crop_min, 1); view 1: blur p 1.0; view 2: blur p 0.1, solarize p 0.2 (as in
    BYOL/DINO and the reference)."""
    v1 = augment(x, size, 1.0, 0.0, crop_min)
    v2 = augment(x, size, 0.1, 0.2, crop_min)
    return normalize(torch.cat([v1, v2]), mean, std)


# === Fine-tuning augmentation (DeiT/MAE recipe), batched on the device
# DeiT's training transform (Touvron et al., arXiv 2012.12877), also MAE's fine-tuning (He et al., arXiv
# 2111.06377): random-resized crop (area 0.08..1) and flip, RandAugment (Cubuk et al., arXiv 1909.13719)
# as timm's "rand-m9-mstd0.5-inc1", normalisation, random erasing (Zhong et al., arXiv 1708.04896) p 0.25.
# Mixup, CutMix and label smoothing change the labels too: they live in eval.py. Every draw is `rand`'s.
# RAND_AUGMENT_OPS is timm's increasing-magnitude list, in its order.

RAND_AUGMENT_OPS = ("autocontrast", "equalize", "invert", "rotate", "posterize", "solarize", "solarize_add", "color",
                    "contrast", "brightness", "sharpness", "shear_x", "shear_y", "translate_x", "translate_y")


def affine_ops(x, pick, signed, fill):
    """Rotate (30 deg), shear x / y (0.3), translate x / y (0.45 of the side), times `signed` (B,) in [-1, 1],
    on x (B, 3, H, W) where `pick` (B,) (index into RAND_AUGMENT_OPS) chose them, the others untouched. One
    bilinear grid_sample for the batch, about the image centre; uncovered pixels take the colour `fill`."""
    B, C, H, W = x.shape
    def on(name):
        return (pick == RAND_AUGMENT_OPS.index(name)).float()
    angle = math.radians(30) * signed * on("rotate")
    shear_x, shear_y = 0.3 * signed * on("shear_x"), 0.3 * signed * on("shear_y")
    shift_x, shift_y = 0.45 * signed * on("translate_x"), 0.45 * signed * on("translate_y")
    c, s = angle.cos(), angle.sin()
    # output -> input map in grid_sample's [-1, 1] coordinates; at most one op is non-zero per image
    theta = torch.stack([c, (shear_x - s) * H / W, 2 * shift_x, (s + shear_y) * W / H, c, 2 * shift_y], 1)
    grid = F.affine_grid(theta.view(B, 2, 3), (B, C, H, W), align_corners=False)
    m = constant(tuple(fill), x.device).view(1, -1, 1, 1)
    warped = F.grid_sample(x - m, grid, mode="bilinear", padding_mode="zeros", align_corners=False) + m
    moved = (on("rotate") + on("shear_x") + on("shear_y") + on("translate_x") + on("translate_y")) > 0
    return torch.where(moved.view(B, 1, 1, 1), warped.clamp(0, 1), x)


def smooth(x):
    """PIL's SMOOTH filter (3 x 3, centre 5, the others 1, over 13) inside, x on the 1-pixel border:
    what ImageEnhance.Sharpness blends away from."""
    if min(x.shape[-2:]) < 3:
        return x
    out = x.clone()
    out[..., 1:-1, 1:-1] = (9 * F.avg_pool2d(x, 3, stride=1) + 4 * x[..., 1:-1, 1:-1]) / 13
    return out


def autocontrast(x):
    """Each channel of each image stretched to span 0..1 (PIL's ImageOps.autocontrast, no cutoff)."""
    lo, hi = x.amin((2, 3), keepdim=True), x.amax((2, 3), keepdim=True)
    return torch.where(hi > lo, (x - lo) / (hi - lo).clamp(min=1e-6), x)


def equalize(x):
    """PIL's ImageOps.equalize per channel over 256 levels: level i -> (step // 2 + pixels below i) // step,
    step = (pixels not at the top level) // 255; a channel with step 0 (nearly constant) is left as it is."""
    B, C, H, W = x.shape
    v = (x * 255).round().long().clamp(0, 255).view(B * C, H * W)
    hist = torch.zeros(B * C, 256, dtype=torch.long, device=x.device).scatter_add_(1, v, torch.ones_like(v))
    below = hist.cumsum(1) - hist                                    # (B*C, 256) pixels below level i
    step = (H * W - hist.gather(1, v.amax(1, keepdim=True))) // 255  # (B*C, 1)
    lut = ((step // 2 + below) // step.clamp(min=1)).clamp(max=255)
    out = (lut.gather(1, v).float() / 255).view(B, C, H, W)
    return torch.where((step > 0).view(B, C, 1, 1), out, x)


def colour_ops(x, pick, level, signed):
    """The 10 colour ops of RAND_AUGMENT_OPS at `level` (B,) in [0, 1], each where picked. Enhance factors
    1 + 0.9 signed (at least 0.1); posterize keeps 4 - floor(4 level) bits; solarize inverts values
    >= 256 - floor(256 level) (of 255); solarize_add adds floor(110 level) to values below 128."""
    B = x.shape[0]
    def on(name):
        return (pick == RAND_AUGMENT_OPS.index(name)).view(B, 1, 1, 1)
    factor = (1 + 0.9 * signed).clamp(min=0.1)                       # (B,)
    level = level.view(B, 1, 1, 1)
    x = torch.where(on("autocontrast"), autocontrast(x), x)
    x = torch.where(on("equalize"), equalize(x), x)
    x = torch.where(on("invert"), 1 - x, x)
    step = 2 ** (4 + (4 * level).floor())                            # 2^(8 - bits)
    x = torch.where(on("posterize"), ((x * 255).round() / step).floor() * step / 255, x)
    x = torch.where(on("solarize") & (x * 255 >= 256 - (256 * level).floor()), 1 - x, x)
    x = torch.where(on("solarize_add") & (x * 255 < 128), (x + (110 * level).floor() / 255).clamp(max=1), x)
    x = torch.where(on("color"), enhance(x, gray(x), factor), x)
    x = torch.where(on("contrast"), enhance(x, gray(x).mean((2, 3), keepdim=True), factor), x)
    x = torch.where(on("brightness"), enhance(x, torch.zeros_like(x), factor), x)
    return torch.where(on("sharpness"), enhance(x, smooth(x), factor), x)


def rand_augment(x, n=2, magnitude=9.0, magnitude_std=0.5, p=0.5, fill=(0.5, 0.5, 0.5)):
    """RandAugment as timm's "rand-m9-mstd0.5-inc1" (DeiT's, MAE's) on x (B, 3, H, W) in [0, 1]: n times, each
    image picks one of the 15 RAND_AUGMENT_OPS (with replacement), applied with probability p at magnitude
    ~ N(magnitude, magnitude_std) clipped to 0..10 (level = magnitude / 10), signed ops (geometry, enhance)
    with a random sign; `fill`: the mean colour (timm's img_mean). Differs from timm (uint8 PIL images one
    at a time): float images, all at once (every op computed for the batch, kept where picked); bilinear
    only (timm: bilinear or bicubic); shears about the centre (PIL: top-left corner); contrast: unrounded mean gray."""
    B, dev, K = x.shape[0], x.device, len(RAND_AUGMENT_OPS)
    for _ in range(n):
        pick = (rand(B, dev) * K).long().clamp(max=K - 1)
        pick = torch.where(rand(B, dev) < p, pick, -1)   # -1: this image skips the op
        level = (magnitude + magnitude_std * rng.randn(B, device=dev)).clamp(0, 10) / 10
        signed = level * torch.where(rand(B, dev) < 0.5, -1.0, 1.0)
        x = colour_ops(affine_ops(x, pick, signed, fill), pick, level, signed)
    return x


def random_erasing(x, p=0.25, area=(0.02, 1 / 3), aspect=(0.3, 1 / 0.3)):
    """With probability p per image, a rectangle of normalised x (B, C, H, W) becomes N(0, 1) noise: area share
    ~ U(area), aspect h/w ~ logU(aspect), noise per pixel and channel (timm's "pixel" mode, DeiT's and MAE's).
    Differs from timm: a rectangle that does not fit is clamped to the image, not re-drawn (10 tries) or skipped."""
    (B, C, H, W), dev = x.shape, x.device
    target = rand(B, dev, *area) * H * W                  # (B,) pixels
    aspect = rand(B, dev, math.log(aspect[0]), math.log(aspect[1])).exp()
    h = (target * aspect).sqrt().round().clamp(1, H)
    w = (target / aspect).sqrt().round().clamp(1, W)
    top = (rand(B, dev) * (H - h + 1)).floor().view(B, 1, 1)
    left = (rand(B, dev) * (W - w + 1)).floor().view(B, 1, 1)
    on = (rand(B, dev) < p).view(B, 1, 1)
    ys, xs = torch.arange(H, device=dev).view(1, H, 1), torch.arange(W, device=dev).view(1, 1, W)
    box = on & (ys >= top) & (ys < top + h.view(B, 1, 1)) & (xs >= left) & (xs < left + w.view(B, 1, 1))
    noise = rng.randn(B, C, H, W, device=dev).to(x.dtype)
    return torch.where(box.unsqueeze(1), noise, x)                   # (B, 1, H, W) box, per channel


def finetune_view(x, size, mean, std, crop_min=0.08, randaug_n=2, randaug_m=9.0, randaug_mstd=0.5, reprob=0.25):
    """DeiT's training transform: uint8 (B, C, S, S) -> normalised float (B, 3, size, size). Crop of area
    share ~U(crop_min, 1) and flip, RandAugment (randaug_n = 0: off), normalisation, random erasing
    (reprob = 0: off). Larger images are first shrunk to `size` as `prepare` does."""
    x = to_unit(x, size)
    x = random_resized_crop(x, size, scale=(crop_min, 1.0))
    if randaug_n:
        x = rand_augment(x, randaug_n, randaug_m, randaug_mstd, fill=mean)
    x = normalize(x, mean, std)
    return random_erasing(x, reprob) if reprob > 0 else x
