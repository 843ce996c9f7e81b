"""SiT: Self-supervised vIsion Transformer, with Group Masked Model Learning (GMML).

Atito, Awais, Kittler, "SiT: Self-supervised vIsion Transformer", arXiv 2104.03602 (v3, 2022);
companion paper "GMML is All you Need", arXiv 2205.14986. The method, from scratch, in the order
the paper tells it: the two corrupted views (GMML), the ViT, the light reconstruction decoder, the
contrastive projection head with its momentum teacher, the losses, then the training schedules.

Symbols used in shapes and comments:
    B batch, C channels, H x W image (pixels), P patch side (pixels), N = HW/P^2 patches,
    D token width, h attention heads, d = D/h head width, K teacher keys (B times world size).
Masks are booleans with True = corrupted ("1 = removed", as in MAE).
"""
import argparse
import copy
import dataclasses
import math
import os
import tempfile
from dataclasses import dataclass, field

import torch
import torch.distributed as dist
import torch.nn as nn
import torch.nn.functional as F

from cli import ANY, FOLDER, INT, allowed, bad_value, one_of

# ------------------------------------------------------------------------------------------------
# Config: every hyperparameter, with its unit. The command lines of train/eval are generated from it.
# ------------------------------------------------------------------------------------------------

MODEL_PRESETS = {"tiny": (192, 12, 3), "small": (384, 12, 6), "base": (768, 12, 12)}  # D, depth, h


def _f(default, help, rule=ANY):
    """A Config field: its --help text and the rule its value must follow (see `allowed`)."""
    return field(default=default, metadata={"help": help, "rule": rule})


@dataclass
class Config:
    # --- model (ViT backbone, decoder, projection head) ---
    model: str = _f("small", "ViT preset: tiny | small | base (D/depth/h 192/12/3, 384/12/6, 768/12/12)",
        one_of(*MODEL_PRESETS))
    dim: int = _f(0, "D, token width; 0 = from --model", allowed(0, kind=INT))
    depth: int = _f(0, "number of transformer blocks; 0 = from --model", allowed(0, kind=INT))
    heads: int = _f(0, "h, attention heads; 0 = from --model", allowed(0, kind=INT))
    mlp_ratio: float = _f(4.0, "MLP hidden width as a multiple of D", allowed(0, 64, open_lo=True))
    img_size: int = _f(32, "H = W, training image side in pixels", allowed(1, kind=INT))
    patch_size: int = _f(4, "P, patch side in pixels (H must be a multiple)", allowed(1, kind=INT))
    in_chans: int = _f(3, "C, image channels", ((lambda v: v == 3), "3 (gray images are repeated to 3 channels)"))
    drop_path: float = _f(0.1, "student stochastic depth rate at the last block (linear in depth)",
        allowed(0, 1, open_hi=True))
    proj_hidden: int = _f(4096, "projection head hidden width", allowed(1, kind=INT))
    proj_dim: int = _f(256, "projection head output width (contrastive embedding)", allowed(1, kind=INT))
    # --- GMML corruption ---
    drop_perc: float = _f(0.5, "p: share of each view corrupted ~ U(min(0.5, p), p), in [0, 1]", allowed(0, 1))
    drop_replace: float = _f(0.3, "share replaced by another image of the batch, when that fill is drawn (p = 1/2)",
        allowed(0, 1))
    drop_align: int = _f(0, "grid for block corners and sides in pixels; 0 = patch size (groups of tokens)",
        allowed(0, kind=INT))
    drop_type: str = _f("noise", "fill of corrupted blocks: noise (N(0,1), normalised) | zeros (mean colour)",
        one_of("noise", "zeros"))
    max_block: float = _f(0.3, "largest block side as a share of the image side", allowed(0, 1, open_lo=True))
    # --- losses ---
    alpha: float = _f(5.0, "alpha: weight of L_recons in L_total = alpha L_recons + L_contr", allowed(0))
    tau: float = _f(0.2, "tau: InfoNCE temperature", allowed(0, open_lo=True))
    # --- optimisation ---
    epochs: int = _f(100, "pretraining epochs (the paper runs 800 on small datasets)", allowed(1, kind=INT))
    batch_size: int = _f(256, "images per step, summed over all GPUs", allowed(2, kind=INT))
    lr: float = _f(5e-4, "peak learning rate per 256 images (scaled by batch/256)", allowed(0, open_lo=True))
    min_lr: float = _f(1e-6, "learning rate at the end of the cosine", allowed(0))
    warmup_epochs: float = _f(10, "epochs of linear learning-rate warm-up", allowed(0))
    weight_decay: float = _f(0.04, "AdamW weight decay at the start (cosine to --weight-decay-end)", allowed(0))
    weight_decay_end: float = _f(0.1, "AdamW weight decay at the end", allowed(0))
    momentum_teacher: float = _f(0.996, "teacher EMA momentum at the start (cosine to 1)", allowed(0, 1))
    clip_grad: float = _f(3.0, "gradient-norm clipping threshold; 0 = off", allowed(0))
    clip_mode: str = _f("global", "clip one norm over all gradients (global) or each parameter tensor's own "
                        "(per-tensor, as the authors' code)", one_of("global", "per-tensor"))
    head_bn: str = _f("pair", "projection heads' batch norm statistics: over both views at once (pair, one call "
                      "on 2B, as the authors' code) or per view (view)", one_of("pair", "view"))
    # --- data ---
    dataset: str = _f("cifar10", "dataset name, or a folder of images (see data.py)")
    data_dir: str = _f("./data", "where datasets are downloaded / read", FOLDER)
    limit: int = _f(0, "use only the first N training images; 0 = all", allowed(0, kind=INT))
    workers: int = _f(4, "DataLoader workers, only for datasets too large to hold on the device", allowed(0, kind=INT))
    # --- system ---
    out: str = _f("", "run folder; empty = runs/<dataset>")
    device: str = _f("auto", "auto | cuda | mps | cpu (auto: cuda, then mps, then cpu)",
        ((lambda v: v.split(":")[0] in ("auto", "cuda", "mps", "cpu")), "auto, cuda, mps or cpu"))
    compile: bool = _f(None, "torch.compile the whole training step into one graph (default: on with CUDA, off elsewhere)")
    cuda_graphs: bool = _f(True, "with --compile on CUDA: replay the step as a CUDA graph (mode reduce-overhead)")
    resume: bool = _f(False, "continue the run in --out from its ckpt.pt")
    save_every: float = _f(10.0, "minutes between checkpoints within an epoch (besides each epoch end); 0 = epoch "
                           "ends only", allowed(0))
    time_budget: float = _f(0.0, "minutes of pretraining: the run sets --epochs from its measured speed and ends "
                            "on time; 0 = off", allowed(0))
    knn_every: int = _f(10, "k-NN monitor every N epochs (also at step 0 and at the end); 0 = only the end",
        allowed(0, kind=INT))
    log_every: int = _f(50, "steps between progress-bar/log.jsonl updates", allowed(1, kind=INT))
    bench: int = _f(0, "if > 0: time this many steps on synthetic data, print img/s and MFU, exit",
        allowed(0, kind=INT))
    peak_tflops: float = _f(989.0, "accelerator peak TFLOP/s for MFU (989 = H100 bf16 dense)", allowed(0, open_lo=True))
    seed: int = _f(0, "random seed (data order, augmentation, corruption, init)", allowed(0, 2**32 - 1, kind=INT))

    def __post_init__(self):
        for f in dataclasses.fields(self):                           # each value within its rule
            problem = bad_value("--" + f.name.replace("_", "-"), getattr(self, f.name), f.metadata["rule"])
            if problem:
                raise ValueError(problem)
        D, depth, h = MODEL_PRESETS[self.model]
        self.dim, self.depth, self.heads = self.dim or D, self.depth or depth, self.heads or h
        self.drop_align = self.drop_align or self.patch_size
        if self.img_size % self.patch_size:
            raise ValueError(f"--img-size {self.img_size} is not a multiple of --patch-size {self.patch_size}")
        if self.dim % self.heads:
            raise ValueError(f"--dim {self.dim} is not a multiple of --heads {self.heads}")

    def to_dict(self):
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, d):
        """Rebuild from a saved dict, ignoring keys this version no longer has."""
        names = {f.name for f in dataclasses.fields(cls)}
        d = {"head_bn": "view", **d}        # saved before --head-bn existed: the heads normalised per view
        return cls(**{k: v for k, v in d.items() if k in names})

    @classmethod
    def add_args(cls, parser, only=None):
        """Add one --flag per field (or per field in `only`), with its help text and default."""
        for f in dataclasses.fields(cls):
            if only is not None and f.name not in only:
                continue
            flag = "--" + f.name.replace("_", "-")
            if f.type in (bool, "bool"):
                parser.add_argument(flag, action=argparse.BooleanOptionalAction, default=f.default,
                                    help=f.metadata["help"])
            else:
                typ = {"int": int, "float": float, "str": str}.get(f.type, f.type)
                parser.add_argument(flag, type=typ, default=f.default,
                                    help=f"{f.metadata['help']} (default: {f.default})")

    @classmethod
    def from_args(cls, args):
        names = {f.name for f in dataclasses.fields(cls)}
        return cls(**{k: v for k, v in vars(args).items() if k in names})


# ------------------------------------------------------------------------------------------------
# Patches: image <-> sequence of flattened P x P x C patches
# ------------------------------------------------------------------------------------------------

def patchify(x, P):
    """(B, C, H, W) -> (B, N, P*P*C), patches in row-major order, pixels (p, q, c) inside."""
    B, C, H, W = x.shape
    x = x.reshape(B, C, H // P, P, W // P, P)                       # (B, C, h', P, w', P)
    return x.permute(0, 2, 4, 3, 5, 1).reshape(B, (H // P) * (W // P), P * P * C)


def unpatchify(x, P, H, W):
    """(B, N, P*P*C) -> (B, C, H, W); the inverse of patchify."""
    B, N, L = x.shape
    C = L // (P * P)
    x = x.reshape(B, H // P, W // P, P, P, C)                       # (B, h', w', P, P, C)
    return x.permute(0, 5, 1, 3, 2, 4).reshape(B, C, H, W)


# ------------------------------------------------------------------------------------------------
# Random numbers: from a torch.Generator, or from a stream drawn once per training step
# ------------------------------------------------------------------------------------------------

class Uniforms:
    """U[0, 1) numbers handed out in order from one flat tensor drawn beforehand.

    The training step draws all its random numbers (views, corruption, drop path) as one
    `torch.rand(n, generator=...)` outside the compiled graph, and the graph reads them from here:
    torch.compile cannot take a torch.Generator inside a graph, and this way the eager and the
    compiled step see the same numbers, and --resume continues both exactly. With no buffer it
    counts what is asked (a dry run on the meta device sizes the buffer) and hands out 0.5.
    """

    def __init__(self, buffer=None):
        self.buffer, self.used = buffer, 0

    def take(self, shape, device):
        n = math.prod(shape)
        if self.buffer is None:
            out = torch.full(shape, 0.5, device=device)
        else:
            out = self.buffer[self.used:self.used + n].view(shape)
        self.used += n
        return out


def uniform(shape, generator, device):
    """U[0, 1) float32 of `shape` from a torch.Generator (None: the global one) or a Uniforms stream."""
    if isinstance(generator, Uniforms):
        return generator.take(tuple(shape), device)
    return torch.rand(shape, generator=generator, device=device)


def normal(shape, generator, device):
    """N(0, 1) float32 from uniforms (inverse CDF: sqrt(2) erfinv(2u - 1)), so either source works."""
    u = uniform(shape, generator, device)
    return math.sqrt(2) * torch.erfinv((2 * u - 1).clamp(-1 + 1e-6, 1 - 1e-6))   # |z| < 4.9


# ------------------------------------------------------------------------------------------------
# GMML corruption (paper Sec. 3.1): connected blocks of each view are replaced by noise, zeros or
# the same region of another image. Batched on the images' device, from an optional generator.
# ------------------------------------------------------------------------------------------------

def gmml_mask(share, H, W, align, max_block=0.3, generator=None, max_share=0.95):
    """Boolean mask (B, 1, H, W), True = corrupted, made of rectangles on an `align`-pixel grid.

    share: (B,) target share of pixels per image, at most `max_share` (a float, so that the number
    of rectangles drawn is known without reading the device). Rectangles, each side up to
    `max_block` of the image side, are added one after another until the share is reached, as in
    the reference code; all images draw their rectangles at once (no loop over the batch).
    Differs from the reference code: block sizes are drawn in grid cells, so patch-aligned blocks
    (align = P) work at 32x32 instead of degenerating, and draws come from `generator` (a
    torch.Generator or a Uniforms stream; see `uniform`).
    """
    B, device = share.shape[0], share.device
    gh, gw = math.ceil(H / align), math.ceil(W / align)             # grid cells
    mh, mw = max(1, int(gh * max_block)), max(1, int(gw * max_block))  # largest block, cells
    # Enough rectangles that the union reaches the largest share in expectation, twice over.
    mean_area = min((mh + 1) * (mw + 1) / 4 / (gh * gw), 0.99)       # share of one block, on average
    K = min(250, max(8, 2 * math.ceil(math.log(1 - min(max_share, 0.95)) / math.log(1 - mean_area))))
    u = uniform((B, K, 4), generator, device)
    bh = 1 + (u[..., 0] * mh).long()                                # (B, K) block height, cells
    bw = 1 + (u[..., 1] * mw).long()
    top = (u[..., 2] * (gh - bh + 1)).long()                        # (B, K) top-left corner
    left = (u[..., 3] * (gw - bw + 1)).long()
    rows = torch.arange(gh, device=device)
    cols = torch.arange(gw, device=device)
    in_rows = (rows >= top[..., None]) & (rows < (top + bh)[..., None])    # (B, K, gh)
    in_cols = (cols >= left[..., None]) & (cols < (left + bw)[..., None])  # (B, K, gw)
    # first[b, i, j]: index of the first block covering cell (i, j); K if none does.
    order = torch.arange(K, device=device, dtype=torch.uint8).view(1, K, 1, 1)
    first = torch.where(in_rows[..., None] & in_cols[..., None, :], order, K).amin(1)  # (B, gh, gw)
    # Share covered by the first n blocks, for every n = 0..K at once.
    hits = torch.zeros(B, K + 1, device=device).scatter_add_(
        1, first.view(B, -1).long(), torch.ones(B, gh * gw, device=device))
    covered = F.pad(hits[:, :K].cumsum(1), (1, 0)) / (gh * gw)      # (B, K + 1)
    reached = covered >= share[:, None]
    # Keep blocks up to the first that reaches the share (none for share 0; all K if none does).
    n = torch.where(reached.any(1), reached.float().argmax(1), K)
    cells = first < n.view(B, 1, 1)                                 # (B, gh, gw)
    mask = cells.repeat_interleave(align, 1).repeat_interleave(align, 2)[:, :H, :W]
    return mask[:, None]                                            # (B, 1, H, W)


def gmml_corrupt(x, drop_perc=0.5, drop_replace=0.3, align=4, drop_type="noise", max_block=0.3,
                 generator=None):
    """Corrupt a batch of normalised images x (B, C, H, W); returns (x_corrupted, mask (B, 1, H, W)).

    Per image: with probability 1/2 (when B > 1) blocks covering ~U(min(0.5, r), r), r = drop_replace,
    take the same region of another image of the batch; otherwise blocks covering ~U(min(0.5, p), p),
    p = drop_perc, are filled with N(0, 1) noise or zeros (the mean colour after normalisation).
    """
    B, C, H, W = x.shape
    u = uniform((B, 3), generator, x.device)
    replace = (u[:, 0] < 0.5) & (B > 1)                             # (B,) fill from another image
    hi = torch.where(replace, torch.full_like(u[:, 0], drop_replace), torch.full_like(u[:, 0], drop_perc))
    share = hi.clamp(max=0.5) + u[:, 1] * (hi - hi.clamp(max=0.5))  # ~ U(min(0.5, hi), hi)
    mask = gmml_mask(share, H, W, align, max_block, generator, max_share=max(drop_perc, drop_replace))
    # Differs from the reference code: the source is never the image itself (offset in 1..B-1).
    src = (torch.arange(B, device=x.device) + 1 + (u[:, 2] * max(B - 1, 1)).long().clamp(max=max(B - 2, 0))) % B
    if drop_type == "noise":
        fill = normal(x.shape, generator, x.device).to(x.dtype)
    else:
        fill = torch.zeros_like(x)
    fill = torch.where(replace.view(B, 1, 1, 1), x[src], fill)
    return torch.where(mask, fill, x), mask


# ------------------------------------------------------------------------------------------------
# Transformer parts: attention, MLP, block (pre-norm), patch embedding, ViT
# ------------------------------------------------------------------------------------------------

class Attention(nn.Module):
    def __init__(self, dim, heads):
        super().__init__()
        self.heads = heads
        self.qkv = nn.Linear(dim, 3 * dim, bias=True)
        self.proj = nn.Linear(dim, dim)

    def _qkv(self, x):
        B, N, D = x.shape
        qkv = self.qkv(x).reshape(B, N, 3, self.heads, D // self.heads).permute(2, 0, 3, 1, 4)
        return qkv.unbind(0)                                        # 3 x (B, h, N, d)

    def forward(self, x):
        B, N, D = x.shape
        q, k, v = self._qkv(x)
        x = F.scaled_dot_product_attention(q, k, v)                 # (B, h, N, d), fused kernel
        return self.proj(x.transpose(1, 2).reshape(B, N, D))

    def weights(self, x):
        """softmax(q k^T / sqrt(d)), (B, h, N, N): computed only when a picture asks for it."""
        q, k, _ = self._qkv(x)
        return (q @ k.transpose(-2, -1) * q.shape[-1] ** -0.5).softmax(-1)


class MLP(nn.Module):
    def __init__(self, dim, hidden):
        super().__init__()
        self.fc1, self.fc2 = nn.Linear(dim, hidden), nn.Linear(hidden, dim)

    def forward(self, x):
        return self.fc2(F.gelu(self.fc1(x)))


def drop_path(x, rate, training, generator=None):
    """Stochastic depth: drop the whole residual branch per sample with probability `rate`.

    The keep draw is float32 even under bf16 autocast (a bf16 uniform has only 256 levels).
    """
    if rate == 0.0 or not training:
        return x
    keep = uniform((x.shape[0], 1, 1), generator, x.device) >= rate
    return x * keep.to(x.dtype) / (1 - rate)


class Block(nn.Module):
    def __init__(self, dim, heads, mlp_ratio=4.0, drop_path=0.0):
        super().__init__()
        self.norm1 = nn.LayerNorm(dim, eps=1e-6)
        self.attn = Attention(dim, heads)
        self.norm2 = nn.LayerNorm(dim, eps=1e-6)
        self.mlp = MLP(dim, int(dim * mlp_ratio))
        self.drop_path = drop_path

    def forward(self, x, generator=None):
        x = x + drop_path(self.attn(self.norm1(x)), self.drop_path, self.training, generator)
        return x + drop_path(self.mlp(self.norm2(x)), self.drop_path, self.training, generator)


class PatchEmbed(nn.Module):
    """Non-overlapping P x P patches -> D-dim tokens (a conv with kernel = stride = P)."""

    def __init__(self, patch_size, in_chans, dim):
        super().__init__()
        self.proj = nn.Conv2d(in_chans, dim, patch_size, stride=patch_size)

    def forward(self, x):
        return self.proj(x).flatten(2).transpose(1, 2)              # (B, N, D)


class ViT(nn.Module):
    """Vision transformer: patch embedding, one CLS token, learned positions, pre-norm blocks."""

    def __init__(self, img_size=32, patch_size=4, in_chans=3, dim=384, depth=12, heads=6,
                 mlp_ratio=4.0, drop_path=0.0):
        super().__init__()
        self.patch_size, self.grid = patch_size, img_size // patch_size
        self.patch_embed = PatchEmbed(patch_size, in_chans, dim)
        self.cls_token = nn.Parameter(torch.zeros(1, 1, dim))
        self.pos_embed = nn.Parameter(torch.zeros(1, 1 + self.grid ** 2, dim))
        rates = [drop_path * i / max(depth - 1, 1) for i in range(depth)]  # linear in depth
        self.blocks = nn.ModuleList(Block(dim, heads, mlp_ratio, r) for r in rates)
        self.norm = nn.LayerNorm(dim, eps=1e-6)
        nn.init.trunc_normal_(self.pos_embed, std=0.02)
        nn.init.trunc_normal_(self.cls_token, std=0.02)
        self.apply(init_weights)

    def pos_embed_for(self, h, w):
        """Position embedding (1, 1 + h*w, D), bicubically interpolated if the grid is not h x w."""
        if h == w == self.grid:
            return self.pos_embed
        cls, grid = self.pos_embed[:, :1], self.pos_embed[:, 1:]
        D = grid.shape[-1]
        grid = grid.reshape(1, self.grid, self.grid, D).permute(0, 3, 1, 2)  # (1, D, g, g)
        grid = F.interpolate(grid, size=(h, w), mode="bicubic", align_corners=False)
        return torch.cat([cls, grid.flatten(2).transpose(1, 2)], dim=1)

    def embed(self, x):
        """Images (B, C, H, W) -> tokens (B, 1 + N, D) with CLS first and positions added."""
        B, C, H, W = x.shape
        tokens = self.patch_embed(x)                                # (B, N, D)
        tokens = torch.cat([self.cls_token.expand(B, -1, -1), tokens], dim=1)
        return tokens + self.pos_embed_for(H // self.patch_size, W // self.patch_size)

    def forward(self, x, generator=None):
        """(B, C, H, W) -> normalised tokens (B, 1 + N, D); [:, 0] is the CLS token.

        generator: where drop path draws from in training (None: the global generator).
        """
        x = self.embed(x)
        for block in self.blocks:
            x = block(x, generator)
        return self.norm(x)

    @torch.no_grad()
    def last_attention(self, x):
        """Attention weights of the last block, (B, h, 1 + N, 1 + N). Training never calls this."""
        x = self.embed(x)
        for block in self.blocks[:-1]:
            x = block(x)
        return self.blocks[-1].attn.weights(self.blocks[-1].norm1(x))


def init_weights(m):
    if isinstance(m, nn.Linear):
        nn.init.trunc_normal_(m.weight, std=0.02)
        if m.bias is not None:
            nn.init.zeros_(m.bias)
    elif isinstance(m, nn.LayerNorm):
        nn.init.ones_(m.weight)
        nn.init.zeros_(m.bias)


# ------------------------------------------------------------------------------------------------
# Heads: the light reconstruction decoder and the contrastive projection head
# ------------------------------------------------------------------------------------------------

class Decoder(nn.Module):
    """Patch tokens (B, N, D) -> image (B, C, H, W): 3 x (Linear, GELU), then per-token Linear to P*P*C.

    The reference writes the last layer as ConvTranspose2d(D, C, P, stride=P); a per-token linear
    map followed by unpatchify is the same function.
    """

    def __init__(self, dim, patch_size, in_chans):
        super().__init__()
        self.patch_size = patch_size
        self.mlp = nn.Sequential(*[m for _ in range(3) for m in (nn.Linear(dim, dim), nn.GELU())])
        self.to_pixels = nn.Linear(dim, patch_size * patch_size * in_chans)
        self.apply(init_weights)

    def forward(self, tokens, H, W):
        return unpatchify(self.to_pixels(self.mlp(tokens)), self.patch_size, H, W)


class ProjectionHead(nn.Module):
    """CLS (B, D) -> embedding (B, out): Linear-BN-ReLU-Linear-BN-GELU-Linear-BN (no affine)."""

    def __init__(self, dim, hidden=4096, out=256):
        super().__init__()
        self.net = nn.Sequential(
            nn.Linear(dim, hidden), nn.BatchNorm1d(hidden), nn.ReLU(inplace=True),
            nn.Linear(hidden, hidden), nn.BatchNorm1d(hidden), nn.GELU(),
            nn.Linear(hidden, out), nn.BatchNorm1d(out, affine=False))
        self.apply(init_weights)

    def forward(self, x):
        return self.net(x)


# ------------------------------------------------------------------------------------------------
# SiT: student (ViT + decoder + head) and its momentum teacher (ViT + head)
# ------------------------------------------------------------------------------------------------

class SiT(nn.Module):
    """The student learns from corrupted views; the teacher, an EMA of it, embeds the clean views."""

    def __init__(self, cfg):
        super().__init__()
        self.alpha, self.tau, self.head_bn = cfg.alpha, cfg.tau, cfg.head_bn
        backbone = ViT(cfg.img_size, cfg.patch_size, cfg.in_chans, cfg.dim, cfg.depth, cfg.heads,
                       cfg.mlp_ratio, cfg.drop_path)
        head = ProjectionHead(cfg.dim, cfg.proj_hidden, cfg.proj_dim)
        self.student = nn.ModuleDict(dict(backbone=backbone, head=head,
                                          decoder=Decoder(cfg.dim, cfg.patch_size, cfg.in_chans)))
        # The teacher starts as a copy of the student's backbone and head (it never reconstructs).
        self.teacher = nn.ModuleDict(dict(backbone=copy.deepcopy(backbone), head=copy.deepcopy(head)))
        for block in self.teacher.backbone.blocks:
            block.drop_path = 0.0                                    # the teacher has no drop path
        self.teacher.requires_grad_(False)

    def forward(self, clean, corrupted, mask, generator=None):
        """Two views stacked: clean, corrupted (2B, C, H, W), mask (2B, 1, H, W) (True = corrupted).

        generator: the student's drop path draws from it (None: the global generator).
        Returns dict(loss, loss_recons, loss_contr, recon (2B, C, H, W), mask).
        """
        B2, C, H, W = clean.shape
        tokens = self.student.backbone(corrupted, generator)         # (2B, 1 + N, D)
        recon = self.student.decoder(tokens[:, 1:], H, W)            # (2B, C, H, W)
        loss_recons = recon_loss(recon, clean, mask)
        q1, q2 = self.project(self.student.head, tokens[:, 0])        # 2 x (B, D')
        with torch.no_grad():
            k1, k2 = self.project(self.teacher.head, self.teacher.backbone(clean)[:, 0])
        loss_contr = contrastive_loss(q1, k2, self.tau) + contrastive_loss(q2, k1, self.tau)
        loss = self.alpha * loss_recons + loss_contr                 # L_total
        return dict(loss=loss, loss_recons=loss_recons, loss_contr=loss_contr, recon=recon, mask=mask)

    def project(self, head, cls):
        """Both views' CLS tokens (2B, D) through a projection head -> 2 x (B, D').

        head_bn "pair" (default): one call on all 2B tokens, so each batch norm's statistics mix both
        views, as in the authors' code; "view": one call per view, each with its own statistics.
        "pair" scored a little higher in the README's ablation (k-NN +0.9, linear +0.4, one seed).
        """
        if self.head_bn == "pair":
            return head(cls).chunk(2)
        return tuple(head(c) for c in cls.chunk(2))

    @torch.no_grad()
    def update_teacher(self, m):
        """theta_t <- m theta_t + (1 - m) theta_s over the teacher's parameters (foreach ops).

        m: a float, or a 0-dim tensor (the compiled step reads it from the device).
        """
        student = dict(self.student.named_parameters())              # same names, plus the decoder
        t_params, s_params = zip(*[(p, student[name]) for name, p in self.teacher.named_parameters()])
        torch._foreach_mul_(t_params, m)
        torch._foreach_add_(t_params, torch._foreach_mul(s_params, 1 - m))


# ------------------------------------------------------------------------------------------------
# Losses
# ------------------------------------------------------------------------------------------------

def recon_loss(recon, clean, mask):
    """L_recons: L1 between reconstruction and clean view over corrupted pixels only.

    Kept from the reference code: averaged over all corrupted pixels of the batch, so images with
    more corruption weigh more than images with less. Summed and counted in float32: under bf16
    autocast a bf16 count of ~10^5 pixels would be rounded to 3 significant digits.
    """
    m = mask.float()                                                 # (B, 1, H, W), broadcast over C
    denom = (m.sum() * recon.shape[1]).clamp(min=1)
    return ((recon.float() - clean.float()).abs() * m).sum() / denom


def gather_keys(k):
    """Teacher keys of every rank (K = B x world, D'), and this rank's offset; identity in one process."""
    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
        return k, 0
    keys = [torch.empty_like(k) for _ in range(dist.get_world_size())]
    dist.all_gather(keys, k.contiguous())
    return torch.cat(keys), dist.get_rank() * k.shape[0]


def contrastive_loss(q, k, tau):
    """InfoNCE of student queries q (B, D') against teacher keys k (B, D'), times 2 tau.

    Positives are the same image's other view; negatives every other key of the global batch.
    """
    q, k = F.normalize(q.float(), dim=1), F.normalize(k.float(), dim=1)
    k_all, offset = gather_keys(k)                                   # (K, D')
    logits = q @ k_all.t() / tau                                     # (B, K)
    labels = torch.arange(q.shape[0], device=q.device) + offset
    return F.cross_entropy(logits, labels) * (2 * tau)


# ------------------------------------------------------------------------------------------------
# Schedules: pure functions of the global step
# ------------------------------------------------------------------------------------------------

def cosine(start, end, step, total):
    """Half cosine from `start` (step 0) to `end` (step `total` and after)."""
    t = min(max(step, 0), total) / max(total, 1)
    return end + (start - end) * 0.5 * (1 + math.cos(math.pi * t))


def lr_at(step, cfg, steps_per_epoch):
    """Linear warm-up to lr x batch/256, then cosine to min_lr."""
    peak = cfg.lr * cfg.batch_size / 256
    warm = int(cfg.warmup_epochs * steps_per_epoch)
    if step < warm:
        return peak * step / warm
    return cosine(peak, cfg.min_lr, step - warm, cfg.epochs * steps_per_epoch - warm)


def weight_decay_at(step, cfg, steps_per_epoch):
    return cosine(cfg.weight_decay, cfg.weight_decay_end, step, cfg.epochs * steps_per_epoch)


def momentum_at(step, cfg, steps_per_epoch):
    """Teacher momentum m: cosine from momentum_teacher to 1."""
    return cosine(cfg.momentum_teacher, 1.0, step, cfg.epochs * steps_per_epoch)


def schedule_table(cfg, steps_per_epoch):
    """(3, T + 1) float32 table of lr, weight decay and teacher momentum for steps 0..T (T = all steps).

    Precomputed once, as in DINO, so the compiled step reads its hyperparameters from the device
    by step index: nothing is sent from the host and nothing recompiles from one step to the next.
    """
    steps = range(cfg.epochs * steps_per_epoch + 1)
    return torch.tensor([[f(t, cfg, steps_per_epoch) for t in steps]
                         for f in (lr_at, weight_decay_at, momentum_at)], dtype=torch.float32)


# ------------------------------------------------------------------------------------------------
# Checkpoints: plain types only, written atomically; one loader for train, eval and visualize
# ------------------------------------------------------------------------------------------------

class CheckpointError(ValueError):
    """A checkpoint that is missing, truncated or not one of ours (message fits on one line)."""


def pick_device(name="auto", index=0):
    """--device: auto picks cuda, then mps, then cpu; a named device must be available here."""
    has = dict(cuda=torch.cuda.is_available(), mps=torch.backends.mps.is_available(), cpu=True)
    if name == "auto":
        name = next(d for d in ("cuda", "mps", "cpu") if has[d])
    kind = name.split(":")[0]
    if kind not in has:
        raise ValueError(f"unknown --device {name!r}; choose from auto, cuda, mps, cpu")
    if not has[kind]:
        raise ValueError(f"--device {name} is not available on this machine (try --device cpu)")
    return torch.device("cuda", index) if name == "cuda" else torch.device(name)


def atomic_write(path, write):
    """Call write(f) on a binary temp file beside `path` (.NAME.*.tmp), fsync, rename it to `path`:
    the file appears whole or not at all, and a failed write leaves the old one as it was."""
    folder = os.path.dirname(os.path.abspath(path))
    os.makedirs(folder, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=folder, prefix=f".{os.path.basename(path)}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.remove(tmp)
        raise


def atomic_save(state, path):
    """torch.save `state` to `path` with `atomic_write`."""
    atomic_write(path, lambda f: torch.save(state, f))


def save_checkpoint(path, cfg, model, optimizer=None, step=0, epoch=0, extra=None):
    """Write config, student, teacher, optimizer state, step, epoch (+ `extra` plain data) to `path`.

    optimizer: the optimizer's state dict (torch.optim's layout), or None.

    `model` is the plain SiT module (not a compiled wrapper), so keys carry no prefixes.
    The file appears whole or not at all: temp file in the same folder, then rename.
    """
    state = dict(format="sit-checkpoint-v1", config=cfg.to_dict(), torch_version=str(torch.__version__),
                 student=model.student.state_dict(), teacher=model.teacher.state_dict(),
                 optimizer=optimizer,
                 step=int(step), epoch=int(epoch), extra=extra or {})
    atomic_save(state, path)


def load_checkpoint(path, device="cpu"):
    """Rebuild (cfg, SiT model, raw checkpoint dict) from `path` alone; loads strictly."""
    if not os.path.isfile(path):
        raise CheckpointError(f"checkpoint not found: {path}")
    try:
        ckpt = torch.load(path, map_location=device, weights_only=True)
    except Exception as e:
        raise CheckpointError(f"cannot read {path} as a checkpoint (truncated or not a torch file): "
                              f"{type(e).__name__}") from None
    if not isinstance(ckpt, dict) or ckpt.get("format") != "sit-checkpoint-v1":
        raise CheckpointError(f"{path} is not a SiT checkpoint written by this code")
    cfg = Config.from_dict(ckpt["config"])
    model = SiT(cfg).to(device)
    try:
        model.student.load_state_dict(ckpt["student"])
        model.teacher.load_state_dict(ckpt["teacher"])
    except RuntimeError as e:
        raise CheckpointError(f"{path}: weights do not match its config ({str(e).splitlines()[0]})") from None
    return cfg, model, ckpt
