"""SiT: Self-supervised vIsion Transformer, with Group Masked Model Learning (GMML).

Atito, Awais, Kittler, "SiT: Self-supervised vIsion Transformer", arXiv 2104.03602 (v3, 2022), and
"GMML is All you Need", arXiv 2205.14986. The method alone, in the paper's order: hyperparameters,
patches, GMML, the ViT, the decoder, the projection head, SiT (student, momentum teacher, L_total),
the losses, the schedules. `train.train_step` puts them together; nothing here reads files or flags.

Symbols used in shapes and comments:
    B batch, C channels, H x W image (pixels), P patch side (pixels), N = HW/P^2 patches,
    D token width, h attention heads, d = D/h head width, K teacher keys (B times world size).
Masks are booleans with True = corrupted ("1 = removed", as in MAE). Random draws go through
`rng.rand` / `rng.randn`: torch.rand / torch.randn, replayable by the training step (rng.py).
"""
import copy
import dataclasses
import math

import torch
import torch.distributed as dist
import torch.nn as nn
import torch.nn.functional as F

import rng

# === The method's hyperparameters (paper Sec. 4 and the authors' defaults); units in the comments

MODEL_PRESETS = {"tiny": (192, 12, 3), "small": (384, 12, 6), "base": (768, 12, 12)}  # D, depth, h


@dataclasses.dataclass
class Config:
    model: str = "small"          # ViT preset, MODEL_PRESETS; dim/depth/heads 0 = the preset's
    dim: int = 0                  # D, token width
    depth: int = 0                # transformer blocks
    heads: int = 0                # h, attention heads
    mlp_ratio: float = 4.0        # MLP hidden width / D
    img_size: int = 32            # H = W, pixels
    patch_size: int = 4           # P, pixels
    in_chans: int = 3             # C (gray images are repeated to 3 channels)
    crop_min: float = 0.2         # views: each crop's area share ~ U(crop_min, 1)
    drop_path: float = 0.1        # student stochastic depth at the last block, linear in depth
    proj_hidden: int = 4096       # projection head hidden width
    proj_dim: int = 256           # projection head output width
    drop_perc: float = 0.5        # GMML: share corrupted ~ U(min(0.5, p), p), p = drop_perc
    drop_replace: float = 0.3     # GMML: share replaced by another image, when that fill is drawn
    drop_align: int = 0           # GMML: block grid in pixels; 0 = P (groups of tokens)
    drop_type: str = "noise"      # GMML fill: noise N(0, 1) | zeros (the mean colour)
    max_block: float = 0.3        # GMML: largest block side / image side
    alpha: float = 5.0            # alpha, weight of L_recons in L_total = alpha L_recons + L_contr
    tau: float = 0.2              # tau, InfoNCE temperature
    epochs: int = 100             # pretraining epochs (the paper: 800 on small datasets)
    batch_size: int = 256         # images per step, over all processes
    lr: float = 5e-4              # peak learning rate per 256 images (x batch/256)
    min_lr: float = 1e-6          # learning rate at the end of the cosine
    warmup_epochs: float = 10     # linear warm-up, epochs
    weight_decay: float = 0.04    # AdamW weight decay at the start (cosine to weight_decay_end)
    weight_decay_end: float = 0.1
    momentum_teacher: float = 0.996  # m, teacher EMA momentum at the start (cosine to 1)
    clip_grad: float = 3.0        # gradient-norm threshold; 0 = off
    clip_mode: str = "global"     # global | per-tensor (the authors': each tensor on its own)
    head_bn: str = "pair"         # heads' batch norm statistics: both views at once (pair) | per view

    def __post_init__(self):
        D, depth, h = MODEL_PRESETS[self.model]
        self.dim, self.depth, self.heads = self.dim or D, self.depth or depth, self.heads or h
        self.drop_align = self.drop_align or self.patch_size
        if self.img_size % self.patch_size:
            raise ValueError(f"--img-size {self.img_size} is not a multiple of --patch-size {self.patch_size}")
        if self.dim % self.heads:
            raise ValueError(f"--dim {self.dim} is not a multiple of --heads {self.heads}")

    @classmethod
    def from_dict(cls, d):
        """From a saved dict, ignoring keys that are not the method's (the run's options)."""
        d = {"head_bn": "view", **d}        # saved before head_bn existed: the heads normalised per view
        return cls(**{f.name: d[f.name] for f in dataclasses.fields(cls) if f.name in d})


# === Patches: image <-> sequence of flattened P x P x C patches

def patchify(x, P):
    """(B, C, H, W) -> (B, N, P*P*C), patches in row-major order, pixels (p, q, c) inside."""
    B, C, H, W = x.shape
    x = x.reshape(B, C, H // P, P, W // P, P)                       # (B, C, h', P, w', P)
    return x.permute(0, 2, 4, 3, 5, 1).reshape(B, (H // P) * (W // P), P * P * C)


def unpatchify(x, P, H, W):
    """(B, N, P*P*C) -> (B, C, H, W); the inverse of patchify."""
    B, N, L = x.shape
    x = x.reshape(B, H // P, W // P, P, P, L // (P * P))            # (B, h', w', P, P, C)
    return x.permute(0, 5, 1, 3, 2, 4).reshape(B, -1, H, W)


# === GMML (paper Sec. 3.1): blocks of a view replaced by noise, zeros or another image's region

def gmml_mask(share, H, W, align, max_block=0.3, max_share=0.95):
    """Boolean mask (B, 1, H, W), True = corrupted, made of rectangles on an `align`-pixel grid.

    The idea, as in the reference code: drop random rectangles (each side up to `max_block` of the
    image side) one after another until their union covers `share` (B,) of the image. Batched: every
    image draws K rectangles at once and keeps the first n that reach its share, where K is enough
    for the union of K average blocks to reach `max_share` twice over in expectation:
    K = 2 log(1 - max_share) / log(1 - mean block area), between 8 and 250. Shares of 0.9 and more
    need many blocks, so an image may stop short of its share (all K kept), most often at align 1.
    Differs from the reference code: sizes are drawn in grid cells, so patch-aligned blocks
    (align = P) work at 32x32 instead of degenerating.
    """
    B, device = share.shape[0], share.device
    gh, gw = math.ceil(H / align), math.ceil(W / align)             # grid cells
    mh, mw = max(1, int(gh * max_block)), max(1, int(gw * max_block))  # largest block, cells
    mean_area = min((mh + 1) * (mw + 1) / 4 / (gh * gw), 0.99)       # one block's share, on average
    K = min(250, max(8, 2 * math.ceil(math.log(1 - min(max_share, 0.95)) / math.log(1 - mean_area))))
    u = rng.rand(B, K, 4, device=device)
    bh, bw = 1 + (u[..., 0] * mh).long(), 1 + (u[..., 1] * mw).long()      # (B, K) block size, cells
    top, left = (u[..., 2] * (gh - bh + 1)).long(), (u[..., 3] * (gw - bw + 1)).long()  # corner
    rows, cols = torch.arange(gh, device=device), torch.arange(gw, device=device)
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
    n = torch.where(reached.any(1), reached.float().argmax(1), K)   # blocks kept (0 for share 0)
    cells = first < n.view(B, 1, 1)                                 # (B, gh, gw)
    return cells.repeat_interleave(align, 1).repeat_interleave(align, 2)[:, None, :H, :W]


def gmml_corrupt(x, drop_perc=0.5, drop_replace=0.3, align=4, drop_type="noise", max_block=0.3):
    """Corrupt a batch of normalised images x (B, C, H, W); returns (x_corrupted, mask (B, 1, H, W)).

    Per image: with probability 1/2 (when B > 1) blocks covering ~U(min(0.5, r), r), r = drop_replace,
    take the same region of another image of the batch; otherwise blocks covering ~U(min(0.5, p), p),
    p = drop_perc, are filled with N(0, 1) noise or zeros (the mean colour after normalisation).
    """
    B = x.shape[0]
    u = rng.rand(B, 3, device=x.device)
    replace = (u[:, 0] < 0.5) & (B > 1)                             # (B,) fill from another image
    hi = torch.where(replace, drop_replace, drop_perc)
    share = hi.clamp(max=0.5) + u[:, 1] * (hi - hi.clamp(max=0.5))  # ~ U(min(0.5, hi), hi)
    mask = gmml_mask(share, *x.shape[2:], align, max_block, max_share=max(drop_perc, drop_replace))
    # Differs from the reference code: never the image itself (offset 1..B-1), which L_recons would count as corrupted.
    src = (torch.arange(B, device=x.device) + 1 + (u[:, 2] * max(B - 1, 1)).long().clamp(max=max(B - 2, 0))) % B
    fill = rng.randn(*x.shape, device=x.device).to(x.dtype) if drop_type == "noise" else torch.zeros_like(x)
    fill = torch.where(replace.view(B, 1, 1, 1), x[src], fill)
    return torch.where(mask, fill, x), mask


# === The vision transformer: attention, MLP, pre-norm block, patch embedding, ViT

class Attention(nn.Module):
    def __init__(self, dim, heads):
        super().__init__()
        self.heads, self.qkv, self.proj = heads, nn.Linear(dim, 3 * dim, bias=True), nn.Linear(dim, dim)

    def forward(self, x):
        B, N, D = x.shape
        q, k, v = self.qkv(x).reshape(B, N, 3, self.heads, D // self.heads).permute(2, 0, 3, 1, 4)  # 3 x (B, h, N, d)
        x = F.scaled_dot_product_attention(q, k, v)                 # softmax(q k^T / sqrt(d)) v
        return self.proj(x.transpose(1, 2).reshape(B, N, D))


class MLP(nn.Module):
    def __init__(self, dim, hidden):
        super().__init__()
        self.fc1, self.fc2 = nn.Linear(dim, hidden), nn.Linear(hidden, dim)

    def forward(self, x):
        return self.fc2(F.gelu(self.fc1(x)))


def drop_path(x, rate, training):
    """Stochastic depth: drop the whole residual branch per sample with probability `rate`
    (a float32 draw even under bf16 autocast, whose uniforms have only 256 levels)."""
    if rate == 0.0 or not training:
        return x
    keep = rng.rand(x.shape[0], 1, 1, device=x.device) >= rate
    return x * keep.to(x.dtype) / (1 - rate)


class Block(nn.Module):
    def __init__(self, dim, heads, mlp_ratio=4.0, drop_path=0.0):
        super().__init__()
        self.norm1, self.attn = nn.LayerNorm(dim, eps=1e-6), Attention(dim, heads)
        self.norm2, self.mlp = nn.LayerNorm(dim, eps=1e-6), MLP(dim, int(dim * mlp_ratio))
        self.drop_path = drop_path

    def forward(self, x):
        x = x + drop_path(self.attn(self.norm1(x)), self.drop_path, self.training)
        return x + drop_path(self.mlp(self.norm2(x)), self.drop_path, self.training)


class PatchEmbed(nn.Module):
    """Non-overlapping P x P patches -> D-dim tokens (a conv with kernel = stride = P)."""
    def __init__(self, patch_size, in_chans, dim):
        super().__init__()
        self.proj = nn.Conv2d(in_chans, dim, patch_size, stride=patch_size)

    def forward(self, x):
        return self.proj(x).flatten(2).transpose(1, 2)              # (B, N, D)


class ViT(nn.Module):
    """Vision transformer: patch embedding, one CLS token, learned positions, pre-norm blocks."""

    def __init__(self, img_size=32, patch_size=4, in_chans=3, dim=384, depth=12, heads=6, mlp_ratio=4.0, drop_path=0.0):
        super().__init__()
        self.patch_size, self.grid = patch_size, img_size // patch_size
        self.patch_embed = PatchEmbed(patch_size, in_chans, dim)
        self.cls_token = nn.Parameter(torch.zeros(1, 1, dim))
        self.pos_embed = nn.Parameter(torch.zeros(1, 1 + self.grid ** 2, dim))
        rates = [drop_path * i / max(depth - 1, 1) for i in range(depth)]  # linear in depth
        self.blocks = nn.ModuleList(Block(dim, heads, mlp_ratio, r) for r in rates)
        self.norm = nn.LayerNorm(dim, eps=1e-6)
        for p in (self.pos_embed, self.cls_token):
            nn.init.trunc_normal_(p, std=0.02)
        self.apply(init_weights)

    def pos_embed_for(self, h, w):
        """Position embedding (1, 1 + h*w, D), bicubically interpolated if the grid is not h x w."""
        if h == w == self.grid:
            return self.pos_embed
        cls, grid = self.pos_embed[:, :1], self.pos_embed[:, 1:]
        grid = grid.reshape(1, self.grid, self.grid, -1).permute(0, 3, 1, 2)  # (1, D, g, g)
        grid = F.interpolate(grid, size=(h, w), mode="bicubic", align_corners=False)
        return torch.cat([cls, grid.flatten(2).transpose(1, 2)], dim=1)

    def embed(self, x):
        """Images (B, C, H, W) -> tokens (B, 1 + N, D) with CLS first and positions added."""
        B, C, H, W = x.shape
        tokens = torch.cat([self.cls_token.expand(B, -1, -1), self.patch_embed(x)], dim=1)  # (B, 1 + N, D)
        return tokens + self.pos_embed_for(H // self.patch_size, W // self.patch_size)

    def forward(self, x):
        """(B, C, H, W) -> normalised tokens (B, 1 + N, D); [:, 0] is the CLS token."""
        x = self.embed(x)
        for block in self.blocks:
            x = block(x)
        return self.norm(x)


def init_weights(m):
    """Linear layers trunc-normal (std 0.02) with zero bias; LayerNorm keeps torch's (1, 0)."""
    if isinstance(m, nn.Linear):
        nn.init.trunc_normal_(m.weight, std=0.02)
        if m.bias is not None:
            nn.init.zeros_(m.bias)


# === Heads: the light reconstruction decoder and the contrastive projection head

class Decoder(nn.Module):
    """Patch tokens (B, N, D) -> image (B, C, H, W): 3 x (Linear, GELU), then per-token Linear to P*P*C.

    The reference writes the last layer as ConvTranspose2d(D, C, P, stride=P), a per-token linear map with a bias
    per channel. Differs from the reference code: a bias per output pixel (its functions include theirs) and
    trunc-normal init like the rest of the ViT (theirs: Kaiming), the plainest way to write it, losing nothing.
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


# === SiT: student (ViT + decoder + head) and its momentum teacher (ViT + head); L_total

class SiT(nn.Module):
    """The student learns from corrupted views; the teacher, an EMA of it, embeds the clean views."""

    def __init__(self, cfg):
        super().__init__()
        self.cfg = cfg
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

    def corrupt(self, clean):
        """GMML on each of the two stacked views (2B, C, H, W) on its own, so that a block "from
        another image" never comes from the other view of the same image: (corrupted, mask)."""
        c = self.cfg
        views = [gmml_corrupt(v, c.drop_perc, c.drop_replace, c.drop_align, c.drop_type, c.max_block)
                 for v in clean.chunk(2)]
        return torch.cat([x for x, _ in views]), torch.cat([m for _, m in views])

    def forward(self, clean, corrupted, mask):
        """Two views stacked: clean, corrupted (2B, C, H, W), mask (2B, 1, H, W) (True = corrupted).

        Returns dict(loss, loss_recons, loss_contr, recon (2B, C, H, W), mask).
        """
        B2, C, H, W = clean.shape
        tokens = self.student.backbone(corrupted)                    # (2B, 1 + N, D)
        recon = self.student.decoder(tokens[:, 1:], H, W)            # (2B, C, H, W)
        loss_recons = recon_loss(recon, clean, mask)
        q1, q2 = self.project(self.student.head, tokens[:, 0])        # 2 x (B, D')
        with torch.no_grad():
            k1, k2 = self.project(self.teacher.head, self.teacher.backbone(clean)[:, 0])
        loss_contr = contrastive_loss(q1, k2, self.cfg.tau) + contrastive_loss(q2, k1, self.cfg.tau)
        loss = self.cfg.alpha * loss_recons + loss_contr             # L_total
        return dict(loss=loss, loss_recons=loss_recons, loss_contr=loss_contr, recon=recon, mask=mask)

    def project(self, head, cls):
        """Both views' CLS tokens (2B, D) through a projection head -> 2 x (B, D'). head_bn "pair": one
        call on all 2B, batch norm statistics over both views (the authors' code); "view": per view."""
        if self.cfg.head_bn == "pair":
            return head(cls).chunk(2)
        return tuple(head(c) for c in cls.chunk(2))

    @torch.no_grad()
    def update_teacher(self, m):
        """theta_t <- m theta_t + (1 - m) theta_s over the teacher's parameters; m a float or 0-dim tensor."""
        student = dict(self.student.named_parameters())              # same names, plus the decoder
        t_params, s_params = zip(*[(p, student[name]) for name, p in self.teacher.named_parameters()])
        w = torch.as_tensor(1 - m, device=t_params[0].device)          # as 0-dim tensors, never read on the host
        torch._foreach_lerp_(t_params, s_params, [w] * len(t_params))


# === Losses

def recon_loss(recon, clean, mask):
    """L_recons: L1 between reconstruction and clean view over corrupted pixels only.

    Kept from the reference code: averaged over all corrupted pixels of the batch, so images with
    more corruption weigh more than images with less. Summed and counted in float32: under bf16
    autocast a bf16 count of ~10^5 pixels would be rounded to 3 significant digits.
    """
    m = mask.float()                                                 # (B, 1, H, W), broadcast over C
    denom = (m.sum() * recon.shape[1]).clamp(min=1)
    return ((recon.float() - clean.float()).abs() * m).sum() / denom


def contrastive_loss(q, k, tau):
    """L_contr: InfoNCE of student queries q (B, D') against teacher keys k (B, D'), times 2 tau.

    Positives are the same image's other view; negatives every other key of the global batch (with
    several processes, the keys of all of them: K = B x world, this rank's positives at its offset).
    """
    q, k, offset = F.normalize(q.float(), dim=1), F.normalize(k.float(), dim=1), 0
    if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
        keys = [torch.empty_like(k) for _ in range(dist.get_world_size())]
        dist.all_gather(keys, k.contiguous())
        k, offset = torch.cat(keys), dist.get_rank() * k.shape[0]   # (K, D')
    logits = q @ k.t() / tau                                         # (B, K)
    labels = torch.arange(q.shape[0], device=q.device) + offset
    return F.cross_entropy(logits, labels) * (2 * tau)                # x 2 tau: the authors' code (as MoCo v3's)


# === Schedules, per step (as DINO): lr warm-up then cosine, weight decay and teacher momentum cosine

def cosine(start, end, step, total):
    """Half cosine from `start` (step 0) to `end` (step `total` and after)."""
    t = min(max(step, 0), total) / max(total, 1)
    return end + (start - end) * 0.5 * (1 + math.cos(math.pi * t))


def lr_at(step, cfg, steps_per_epoch, total=None):
    """Linear warm-up to lr x batch/256, then cosine to min_lr at `total` (default: all epochs' steps)."""
    total = cfg.epochs * steps_per_epoch if total is None else total
    peak, warm = cfg.lr * cfg.batch_size / 256, int(cfg.warmup_epochs * steps_per_epoch)
    return peak * step / warm if step < warm else cosine(peak, cfg.min_lr, step - warm, total - warm)


def schedules(cfg, steps_per_epoch, total=None):
    """(3, T + 1) float32 table of lr, weight decay and teacher momentum m for steps 0..T, where T =
    `total` (default: all epochs' steps); the training step reads its column: schedule[:, t]."""
    total = cfg.epochs * steps_per_epoch if total is None else total
    return torch.tensor([[lr_at(t, cfg, steps_per_epoch, total) for t in range(total + 1)],
                         [cosine(cfg.weight_decay, cfg.weight_decay_end, t, total) for t in range(total + 1)],
                         [cosine(cfg.momentum_teacher, 1.0, t, total) for t in range(total + 1)]])
