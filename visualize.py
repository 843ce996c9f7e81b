"""Pictures of a SiT checkpoint: GMML reconstructions, the CLS token's attention, training curves.

    python visualize.py runs/cifar10/ckpt.pt                    # -> runs/cifar10/reconstructions.png
    python visualize.py runs/cifar10/ckpt.pt --images photos/   # the same on your own images
    python visualize.py runs/cifar10/ckpt.pt --attention        # -> runs/cifar10/attention.png
    python visualize.py runs/cifar10/ckpt.pt --curves           # -> runs/cifar10/curves.png (log.jsonl)

Needs only the checkpoint (it holds its Config); headless (matplotlib's Figure, not pyplot: no global state).
"""
import dataclasses
import os
import sys

import numpy as np
import torch
import torch.nn.functional as F
from matplotlib.figure import Figure
from matplotlib.ticker import MaxNLocator

import data
import rng
import runtime
import sit
from runtime import FOLDER, INT, allowed

CELL, GAP = 1.2, 0.03       # inches per image panel, and the white margin inside it
LABEL, TOP, PAD = 1.15, 0.5, 0.08   # inches: left of the grid (row labels), above (title), right/below
MIN_WIDTH = 5.6             # inches, so that the two-line title fits even for --n 1
DPI = 100
RECON_ROWS = {"original": "original", "corrupted": "corrupted", "reconstruction": "reconstruction",
              "pasted": "recon. + visible"}   # key of reconstruction_rows -> row label
LOSSES = ("loss", "loss_recons", "loss_contr")


class LogError(ValueError):
    """A training log that is missing or lacks the fields a curve needs (one-line message)."""


# === Model side: tensors only, so that tests can check them

@torch.no_grad()
def reconstruction_rows(model, cfg, x, generator):
    """Rows (B, 3, H, W), normalised, of images x: original (x), corrupted (GMML, cfg's drop settings, `generator`),
    reconstruction (the student decoder's; SiT.forward's projection heads would need two stacked views and batch
    stats), pasted (it in the corrupted pixels, x elsewhere); and mask (B, 1, H, W), True = corrupted."""
    H, W = x.shape[-2:]
    with rng.source(generator):
        corrupted, mask = sit.gmml_corrupt(x, cfg.drop_perc, cfg.drop_replace, cfg.drop_align, cfg.drop_type,
                                           cfg.max_block)
    tokens = model.student.backbone(corrupted)                      # (B, 1 + N, D)
    recon = model.student.decoder(tokens[:, 1:], H, W)              # (B, C, H, W)
    return dict(original=x, corrupted=corrupted, reconstruction=recon, pasted=torch.where(mask, recon, x), mask=mask)


@torch.no_grad()
def attention_maps(backbone, x):
    """CLS-to-patch attention of the last block, (B, h, H, W), nearest-upsampled to the image: the
    CLS query's row of softmax(q k^T / sqrt(d)), over the N patch keys (the CLS key dropped)."""
    B, C, H, W = x.shape
    P, last = backbone.patch_size, backbone.blocks[-1]
    t = backbone.embed(x)                                           # (B, 1 + N, D)
    for block in backbone.blocks[:-1]:
        t = block(t)
    D, h = t.shape[-1], last.attn.heads
    q, k, _ = last.attn.qkv(last.norm1(t)).reshape(B, -1, 3, h, D // h).permute(2, 0, 3, 1, 4)  # 3 x (B, h, 1 + N, d)
    attn = (q[:, :, :1] @ k.transpose(-2, -1) * (D // h) ** -0.5).softmax(-1)[:, :, 0, 1:]  # (B, h, N)
    return F.interpolate(attn.reshape(B, -1, H // P, W // P), scale_factor=P, mode="nearest")  # (B, h, H, W)


def load_images(args, cfg, dataset, data_dir):
    """uint8 images (n, C, S, S), C = 1 or 3, and a name for the title. Any source is normalised later with the
    *training* statistics (data.stats of the checkpoint's dataset), which the weights expect and which give the true
    colours back; a folder's own (data.load gives ImageNet's for any folder) would feed inputs the model never saw."""
    name, data_dir = args.dataset or dataset, args.data_dir or data_dir
    folder = args.images or (name if name not in data.DATASETS and os.path.isdir(name) else None)  # or trained on one
    if folder:  # decodes only the first n images (sorted paths), where data.load(folder) would decode them all
        paths = data.find_images(folder)
        images = data.decode_files([(p, -1) for p in paths[:args.n]], cfg.img_size, 0, workers=0).images
        if not len(images):
            raise data.DataError(f"none of the first {min(args.n, len(paths))} image files under {folder} "
                                 "could be read")
        return images, folder
    try:
        d = data.load(name, data_dir, train=False, size=cfg.img_size)
    except data.DataError:
        raise
    except Exception as e:  # a download that cannot happen (no network), a damaged archive, ...
        raise data.DataError(f"cannot load the {name} test split from {data_dir} "
                             f"({type(e).__name__}: {first_line(e)}); try --data-dir or --images DIR") from None
    return d.images[:args.n], f"{name} test"


# === Figures: a grid of image panels with row labels, and the training curves

def to_rgb(x, mean, std):
    """Normalised (B, 3, H, W) -> numpy (B, H, W, 3) in [0, 1]; gray data has 3 equal channels."""
    return data.denormalize(x.float(), mean, std).permute(0, 2, 3, 1).cpu().numpy()


def grid_inches(rows, cols):
    """(width, height) in inches of a figure of rows x cols image panels, labels and title."""
    return max(MIN_WIDTH, LABEL + cols * CELL + PAD), TOP + rows * CELL + PAD


def image_grid(labels, cols, title):
    """A Figure and its len(labels) x cols axes (nested lists), row labels on the left."""
    W, H = grid_inches(len(labels), cols)
    fig = Figure(figsize=(W, H), dpi=DPI)
    x0 = LABEL + (W - LABEL - PAD - cols * CELL) / 2               # centred when the title is wider
    axes = []
    for r, label in enumerate(labels):
        row = [fig.add_axes(((x0 + c * CELL + GAP) / W, (H - TOP - (r + 1) * CELL + GAP) / H, (CELL - 2 * GAP) / W,
                             (CELL - 2 * GAP) / H), xticks=[], yticks=[], frame_on=False) for c in range(cols)]
        row[0].set_ylabel(label, fontsize=9)
        axes.append(row)
    fig.text(0.5, 1 - 0.06 / H, title, ha="center", va="top", fontsize=8, linespacing=1.4)
    return fig, axes


def reconstruction_figure(rows, mean, std, title):
    fig, axes = image_grid(list(RECON_ROWS.values()), len(rows["original"]), title)
    for ax_row, key in zip(axes, RECON_ROWS):
        for ax, img in zip(ax_row, to_rgb(rows[key], mean, std)):
            ax.imshow(img, interpolation="nearest")
    return fig


def attention_figure(x, maps, mean, std, title):
    """Images, then the mean over heads and each head overlaid; every map scaled to its min..max."""
    B, h = maps.shape[:2]
    layers = [maps.mean(1)] + [maps[:, i] for i in range(h)]        # each (B, H, W)
    labels = ["image", "mean of heads"] + [f"head {i + 1}" for i in range(h)]
    fig, axes = image_grid(labels, B, title)
    images = to_rgb(x, mean, std)
    luma = images @ np.array([0.299, 0.587, 0.114])                 # (B, H, W): gray under the maps
    for ax, img in zip(axes[0], images):
        ax.imshow(img, interpolation="nearest")
    for ax_row, layer in zip(axes[1:], layers):
        for b, ax in enumerate(ax_row):
            a = layer[b] - layer[b].min()
            ax.imshow(luma[b], cmap="gray", vmin=0, vmax=1, interpolation="nearest")
            ax.imshow((a / a.max().clamp(min=1e-12)).cpu().numpy(), cmap="inferno", alpha=0.6,
                      vmin=0, vmax=1, interpolation="nearest")
    return fig


def read_log(path):
    """The 'step' and 'epoch' records of a log.jsonl, each sorted by step (the last line of a step wins, as after
    a resume). Lines that are not JSON objects, such as one being written, are skipped."""
    if not os.path.isfile(path):
        raise LogError(f"no training log at {path} (train.py writes log.jsonl next to ckpt.pt; or --log FILE)")
    records = {"step": {}, "epoch": {}}
    with open(path, errors="replace") as f:
        for r in filter(None, map(runtime.row_of, f)):                 # JSON objects only
            if r.get("kind") in records and isinstance(r.get("step"), (int, float)):
                records[r["kind"]][r["step"]] = r
    return [sorted(records[k].values(), key=lambda r: r["step"]) for k in ("step", "epoch")]


def with_keys(records, keys):
    return [r for r in records if all(isinstance(r.get(k), (int, float)) for k in keys)]


def curves_figure(steps, epochs, path):
    """Three panels against the step: the loss and its parts, the learning rate, k-NN top-1. steps,
    epochs: the records of read_log(path); per-epoch losses stand in when no step has them."""
    train = with_keys(steps, ("step",) + LOSSES + ("lr",)) or with_keys(epochs, ("step",) + LOSSES + ("lr",))
    if not train:
        raise LogError(f"{path} has no 'step' or 'epoch' line with all of step, {', '.join(LOSSES)}, lr")
    last = max(epochs + train, key=lambda r: r["step"])              # for the title
    knn = with_keys(epochs, ("step", "knn"))
    # train.py logs epoch = step / steps per epoch: one epoch line with epoch > 0 gives the steps per epoch
    spe = [r["step"] / r["epoch"] for r in with_keys(epochs, ["epoch"]) if r["epoch"] > 0 and r["step"] > 0]
    fig = Figure(figsize=(12, 3.5), dpi=DPI, layout="constrained")
    ax_loss, ax_lr, ax_knn = fig.subplots(1, 3, sharex=True)
    x = [r["step"] for r in train]
    for key in LOSSES:
        ax_loss.plot(x, [r[key] for r in train], label=key, lw=1.2, marker="o" if len(x) < 3 else None)
    ax_loss.legend(fontsize=8, frameon=False)
    ax_lr.plot(x, [r["lr"] for r in train], color="tab:purple", lw=1.2, marker="o" if len(x) < 3 else None)
    ax_knn.plot([r["step"] for r in knn], [r["knn"] for r in knn], "o-", color="tab:green", ms=4)
    if not knn:
        ax_knn.text(0.5, 0.5, "no k-NN accuracy in the log", ha="center", va="center", transform=ax_knn.transAxes)
    for ax, name in ((ax_loss, "loss  (loss = alpha loss_recons + loss_contr)"), (ax_lr, "learning rate"),
                     (ax_knn, "k-NN top-1 (%)")):
        ax.set_title(name, fontsize=9)
        ax.set_xlabel("step", fontsize=8)
        ax.tick_params(labelsize=7)
        ax.grid(alpha=0.3)
        if spe:                                                     # a top axis in epochs
            top = ax.secondary_xaxis("top", functions=(lambda s: s / spe[0], lambda e: e * spe[0]))
            top.set_xlabel("epoch", fontsize=8)
            top.xaxis.set_major_locator(MaxNLocator(integer=True))
            top.tick_params(labelsize=7)
    epoch = last.get("epoch")
    epoch = "?" if epoch is None else f"{epoch:g}" if float(epoch).is_integer() else f"{epoch:.2f}"
    fig.suptitle(f"{path}  ·  step {last['step']}, epoch {epoch}", fontsize=9)
    return fig


# === Command line

def first_line(e):
    return (str(e).strip().splitlines() or [type(e).__name__])[0]


def make_figure(args):
    """The figure asked for: (Figure, default file name). --curves reads the log, not the checkpoint."""
    if args.curves:
        log = args.log or os.path.join(os.path.dirname(args.ckpt) or ".", "log.jsonl")
        return curves_figure(*read_log(log), log), "curves.png"
    device = runtime.pick_device(args.device)
    cfg, model, ckpt = runtime.load_checkpoint(args.ckpt)            # on the CPU, then moved
    dataset, data_dir = ckpt["config"].get("dataset", ""), ckpt["config"].get("data_dir", "./data")
    model.to(device).eval()
    cfg = dataclasses.replace(cfg, drop_perc=cfg.drop_perc if args.drop_perc is None else args.drop_perc,
                              drop_type=args.drop_type or cfg.drop_type)  # re-validated by Config
    images, source = load_images(args, cfg, dataset, data_dir)
    mean, std = data.stats(dataset)
    x = data.prepare(images.to(device), cfg.img_size, mean, std)    # (n, 3, S, S)
    run = os.path.join(os.path.basename(os.path.dirname(os.path.abspath(args.ckpt))), os.path.basename(args.ckpt))
    total = ckpt.get("extra", {}).get("total_steps")                # a --time-budget run's length is in steps
    at = f"step {ckpt['step']}/{total}" if total else f"epoch {ckpt['epoch']}/{cfg.epochs}"
    head = f"{run}  ·  {at}  ·  {source}  ·  {cfg.img_size} px"
    if args.attention:
        maps = attention_maps(model.teacher.backbone, x)
        title = f"{head}\nCLS-to-patch attention, teacher's last block, {cfg.heads} heads; each map scaled min..max"
        return attention_figure(x, maps, mean, std, title), "attention.png"
    rows = reconstruction_rows(model, cfg, x, torch.Generator(device=device).manual_seed(args.seed))
    title = (f"{head}\nGMML {cfg.drop_type}: drop_perc {cfg.drop_perc:g}, drop_replace {cfg.drop_replace:g}, "
             f"align {cfg.drop_align} px, max_block {cfg.max_block:g}, seed {args.seed}")
    return reconstruction_figure(rows, mean, std, title), "reconstructions.png"


MAX_N = 256   # images per figure: wider figures pass what matplotlib's Agg can draw (2^16 px)
FLAGS = {  # flag: (type, default, help, valid when or None, [more argparse settings]); checked once parsed
    "--n": (int, 8, f"number of images, 1..{MAX_N} (default: 8)", allowed(1, MAX_N, kind=INT)),
    "--seed": (int, 0, "seed of the GMML corruption (default: 0)", allowed(0, 2**32 - 1, kind=INT)),
    "--drop-perc": (float, None, "override the checkpoint's drop_perc (share corrupted, 0..1)", allowed(0, 1)),
    "--drop-type": (str, None, "override the checkpoint's drop_type", None, dict(choices=("noise", "zeros"))),
    "--dataset": (str, None, "test split of this dataset instead of the checkpoint's", data.DATASET_RULE),
    "--data-dir": (str, None, "where datasets are read/downloaded (default: the checkpoint's)", FOLDER),
    "--images": (str, None, "your own images (resized and centre-cropped to img_size)",
                 (os.path.isdir, "an existing folder of images"), dict(metavar="DIR")),
    "--log": (str, None, "training log for --curves (default: <ckpt folder>/log.jsonl)",
              (os.path.isfile, "an existing log.jsonl file"), dict(metavar="FILE")),
    "--device": (str, "auto", "auto | cuda | mps | cpu (default: auto: cuda, then mps, then cpu)", None,
                 dict(choices=("auto", "cuda", "mps", "cpu"))),
    "--out": (str, None, "PNG path (default: <ckpt folder>/reconstructions.png, attention.png, curves.png; "
                         "runs/NAME/ for a model shipped in models/)",
              (lambda v: v != "" and not os.path.isdir(v), "a PNG file path (not a folder)")),
}


def make_parser():
    p = runtime.Parser(prog="visualize.py", description=__doc__.split("\n\n")[0])
    p.add_argument("ckpt", help="checkpoint written by train.py (holds its Config)")
    what = p.add_mutually_exclusive_group()
    what.add_argument("--attention", action="store_true", help="CLS attention maps instead of reconstructions")
    what.add_argument("--curves", action="store_true", help="training curves from the run's log.jsonl")
    for flag, (kind, default, text, _, *more) in FLAGS.items():
        p.add_argument(flag, type=kind, default=default, help=text, **(more[0] if more else {}))
    return p


def parse_args(argv):
    p = make_parser()
    args = p.parse_args(argv)
    runtime.check_flags(p, args, {flag: rule for flag, (_, _, _, rule, *_) in FLAGS.items() if rule})
    return args


def main(argv=None):
    args = parse_args(argv)
    try:
        fig, name = make_figure(args)
        out = args.out or os.path.join(runtime.output_folder(args.ckpt), name)
        os.makedirs(os.path.dirname(os.path.abspath(out)), exist_ok=True)
        fig.savefig(out, dpi=DPI)
    except (runtime.CheckpointError, data.DataError, LogError, ValueError, OSError) as e:
        print(f"visualize.py: error: {first_line(e)}", file=sys.stderr)
        sys.exit(1)
    print(out)


if __name__ == "__main__":
    main()
