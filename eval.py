"""Evaluate a SiT checkpoint's encoder: k-NN, linear probe, few-shot and fine-tuning.

As in the SiT paper (arXiv 2104.03602): full fine-tuning (DeiT recipe), linear probes and few-shot accuracy on frozen
features; k-NN on CLS features (weighted vote, k = 20, T = 0.07, as in DINO) is the cheap monitor. Each run prints a
table and appends one JSON line to --results (default: results.jsonl beside the checkpoint, or in runs/NAME for a
model shipped in models/); see the README.
Shapes: N images, D token width, F feature width (n D with --last-blocks n, twice that with --mean-patch),
C classes, B batch.
"""
import argparse
import dataclasses
import json
import math
import os
import statistics
import sys
import time

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F

import data
import rng
import runtime
import sit
from runtime import INT, allowed, one_of

WEIGHT_DECAYS = (1e-6, 1e-5, 1e-4, 1e-3, 1e-2, 1e-1)  # linear probe grid: lambda of lambda/2 |W|^2
VAL_SHARE = 0.1                                        # share of train held out to choose lambda


class EvalError(ValueError):
    """A request that cannot be met (device not available, too few images per class or per batch)."""


class FlagError(EvalError):
    """A flag's value that the data cannot meet (exit status 2, as a value refused when parsed)."""


# === Frozen features and k-NN (train.py's monitor uses these two)

@torch.no_grad()
def features(backbone, images, size, mean, std, batch_size=512, mean_patch=False, last_blocks=1):
    """CLS features (N, D), float32, of uint8 images (N, C, S, S) on the backbone's device; mean_patch
    appends the mean of the patch tokens, giving (N, 2D). last_blocks n: those of each of the last n
    blocks, each through the final norm, side by side (N, nD or 2nD), as DINO's linear probes of small
    ViTs (which take the CLS tokens of the last 4 blocks, and the patch mean of the last only)."""
    was_training = backbone.training
    backbone.eval()
    device = next(backbone.parameters()).device
    out = []
    for i in range(0, len(images), batch_size):
        x = data.prepare(images[i:i + batch_size].to(device), size, mean, std)
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=device.type == "cuda"):
            blocks, x = [], backbone.embed(x)
            for block in backbone.blocks:                             # ViT.forward, keeping each block's tokens
                x = block(x)
                blocks.append(x)
            tokens = [backbone.norm(t) for t in blocks[-last_blocks:]]  # each (B, 1 + N, D)
        f = [torch.cat([t[:, 0], t[:, 1:].mean(1)], 1) if mean_patch else t[:, 0] for t in tokens]
        out.append(torch.cat(f, 1).float())
    backbone.train(was_training)
    return torch.cat(out)


def knn_accuracy(train_feats, train_labels, test_feats, test_labels, num_classes, k=20, T=0.07, chunk=1024):
    """Top-1 (%) of k-NN on L2-normalised features (as DINO): the k nearest training ones vote, weight exp(cos / T)."""
    with torch.no_grad():
        train_feats, test_feats = F.normalize(train_feats, dim=1), F.normalize(test_feats, dim=1)
        train_labels, test_labels = train_labels.to(train_feats.device), test_labels.to(train_feats.device)
        k = min(k, len(train_feats))
        correct = 0
        for i in range(0, len(test_feats), chunk):
            sim = test_feats[i:i + chunk] @ train_feats.t()               # (b, N_train) cosine
            top, idx = sim.topk(k, dim=1)                                 # (b, k)
            votes = torch.zeros(len(top), num_classes, device=sim.device)
            votes.scatter_add_(1, train_labels[idx], (top / T).exp())
            correct += (votes.argmax(1) == test_labels[i:i + chunk]).sum().item()
        return 100.0 * correct / len(test_feats)


# === Linear probe and few-shot: multinomial logistic regression on frozen, standardised features

def standardize(train, *others):
    """Shift and scale every feature to mean 0, std 1 on `train` (N, F); the same map for `others`."""
    mean, std = train.mean(0), train.std(0).clamp(min=1e-6)
    return [(x - mean) / std for x in (train, *others)]


def fit_linear(x, y, num_classes, weight_decay, steps=500):
    """Linear classifier (F -> C) minimising CE(x W^T + b, y) + weight_decay/2 |W|^2 on x (N, F), y (N,): full-batch
    L-BFGS (a history of 20) from zero (deterministic), strong-Wolfe line search, at most `steps` iterations (fewer
    once converged)."""
    head = nn.Linear(x.shape[1], num_classes).to(x.device)
    nn.init.zeros_(head.weight)
    nn.init.zeros_(head.bias)
    opt = torch.optim.LBFGS(head.parameters(), lr=1, max_iter=steps, history_size=20, line_search_fn="strong_wolfe")

    def closure():
        opt.zero_grad()
        loss = F.cross_entropy(head(x), y) + weight_decay / 2 * head.weight.square().sum()
        loss.backward()
        return loss

    with torch.enable_grad():
        opt.step(closure)
    return head.requires_grad_(False)


def top1(head, x, y):
    """Top-1 (%) of a classifier on features x (N, F) with labels y (N,)."""
    with torch.no_grad():
        return 100.0 * (head(x).argmax(1) == y).float().mean().item()


def linear_probe(train_x, train_y, test_x, test_y, num_classes, seed=0, steps=500):
    """Top-1 (%) on test of a linear probe on standardised features (N, F), and its details: the weight decay of the
    grid with the best top-1 on a held-out VAL_SHARE of train, then the probe refitted on all of train."""
    train_x, test_x = standardize(train_x, test_x)
    head, details = probe(train_x, train_y, num_classes, seed, steps)
    return top1(head, test_x, test_y), details


def probe(train_x, train_y, num_classes, seed, steps):
    """The linear probe of features (N, F) and its details: fitted on all of train with the weight decay of the grid
    that gives the best top-1 on a held-out VAL_SHARE of train."""
    perm = torch.randperm(len(train_x), generator=torch.Generator().manual_seed(seed)).to(train_x.device)
    n_val = max(1, int(VAL_SHARE * len(train_x)))
    val, fit = perm[:n_val], perm[n_val:]
    val_acc = {wd: top1(fit_linear(train_x[fit], train_y[fit], num_classes, wd, steps), train_x[val],
                        train_y[val]) for wd in WEIGHT_DECAYS}
    best = max(WEIGHT_DECAYS, key=lambda wd: (val_acc[wd], wd))                # ties: the stronger decay
    return (fit_linear(train_x, train_y, num_classes, best, steps),
            dict(weight_decay=best, val_accuracy={f"{wd:g}": round(a, 2) for wd, a in val_acc.items()}))


def per_class(labels, num_classes, count, seed):
    """Indices of count(n_c) images of each class c (n_c: its images), drawn without replacement by `seed`, sorted."""
    perm = torch.randperm(len(labels), generator=torch.Generator().manual_seed(seed))
    shuffled = labels.cpu()[perm]
    picks = []
    for c in range(num_classes):
        mine = perm[shuffled == c]
        picks.append(mine[:count(c, len(mine))])
    return torch.cat(picks).sort().values


def fewshot_indices(labels, num_classes, shots, seed):
    """Indices (num_classes * shots,) of `shots` images per class, drawn without replacement by `seed`."""
    def count(c, n):
        if n < shots:
            raise EvalError(f"class {c} has {n} training images, fewer than {shots} shots")
        return shots
    return per_class(labels, num_classes, count, seed)


def share_indices(labels, num_classes, share, seed, flag):
    """Indices of a class-balanced `share` of the images (round(share n_c) of each class c), drawn by `seed`:
    the same for every mode and every checkpoint. EvalError (naming `flag`) if a class would get none."""
    def count(c, n):
        k = round(share * n)
        if not 0 < k <= n:
            raise FlagError(f"{flag} {share:g} leaves class {c} ({n} images) with {k}")
        return k
    return per_class(labels, num_classes, count, seed)


def take(d, idx):
    """The images and labels of ImageData `d` at indices `idx`."""
    return dataclasses.replace(d, images=d.images[idx], labels=d.labels[idx])


def fewshot(train_x, train_y, test_x, test_y, num_classes, shots, seeds, weight_decay, steps=500):
    """{K: top-1 (%) per seed} of linear classifiers fitted on K labelled images per class, standardised with all
    training features (no labels); fixed weight decay: with one image per class there is nothing to hold out."""
    train_x, test_x = standardize(train_x, test_x)
    runs = {K: [] for K in shots}
    for K in shots:
        for seed in seeds:
            idx = fewshot_indices(train_y, num_classes, K, seed).to(train_x.device)
            head = fit_linear(train_x[idx], train_y[idx], num_classes, weight_decay, steps)
            runs[K].append(top1(head, test_x, test_y))
    return runs


# === Fine-tuning: the whole encoder + a linear head on CLS, MAE's / DeiT's recipe (images: data.finetune_view)

class Classifier(nn.Module):
    """ViT encoder + linear head on its CLS token: images (B, 3, H, W) -> logits (B, C)."""

    def __init__(self, backbone, num_classes):
        super().__init__()
        self.backbone = backbone
        self.head = nn.Linear(backbone.cls_token.shape[-1], num_classes)
        sit.init_weights(self.head)

    def forward(self, x):
        return self.head(self.backbone(x)[:, 0])


def probe_head(model, images, labels, stats, args):
    """LP-FT (Kumar et al., ICLR 2022): the head starts as the linear probe of the frozen encoder's features
    (--mode linear's, its standardisation folded into the weights), so that the first steps do not bend the
    pretrained features to fit a random head. Returns the probe's details."""
    with torch.no_grad():
        x = features(model.backbone, images, args.img_size, *stats)
        mean, std = x.mean(0), x.std(0).clamp(min=1e-6)                   # as standardize
        head, details = probe((x - mean) / std, labels, model.head.out_features, args.seed, args.probe_steps)
        model.head.weight.copy_(head.weight / std)                        # W (x - mean) / std + b
        model.head.bias.copy_(head.bias - model.head.weight @ mean)
        return details


def param_groups(model, weight_decay, layer_decay):
    """AdamW groups; lr scale layer_decay^(L + 1 - layer), layer 0 = embeddings, L + 1 = norm and head.
    No weight decay on biases, norm weights, the CLS token and the position embedding (as DeiT)."""
    L = len(model.backbone.blocks)
    groups = {}
    for name, p in model.named_parameters():
        if name.startswith("backbone.blocks."):
            layer = int(name.split(".")[2]) + 1
        elif name.startswith(("backbone.patch_embed", "backbone.cls_token", "backbone.pos_embed")):
            layer = 0
        else:
            layer = L + 1
        decay = p.ndim > 1 and not name.endswith(("cls_token", "pos_embed"))
        g = groups.setdefault((layer, decay), dict(params=[], weight_decay=weight_decay if decay else 0.0,
                                                   lr_scale=layer_decay ** (L + 1 - layer)))
        g["params"].append(p)
    return list(groups.values())


def set_lr(opt, lr):
    """lr for this step, times each group's layer-decay scale (param_groups' lr_scale)."""
    for g in opt.param_groups:
        g["lr"] = lr * g["lr_scale"]


def smooth_targets(labels, num_classes, smoothing):
    """Label smoothing: (B,) labels -> (B, C) targets, 1 - smoothing + smoothing/C on the label."""
    return F.one_hot(labels, num_classes).float() * (1 - smoothing) + smoothing / num_classes


def mix(x, targets, mixup, cutmix, host, prob=1.0, switch_prob=0.5):
    """Mixup or CutMix of images x (B, 3, H, W) and soft targets (B, C) with the reversed batch: with probability
    `prob`, by one lambda ~ Beta(alpha, alpha); CutMix with probability `switch_prob` when both are on; alpha 0 turns a
    kind off. The CutMix box is clipped to the image, lambda corrected to its area. host: numpy's random generator
    (no device sync)."""
    if (mixup <= 0 and cutmix <= 0) or host.random() >= prob:
        return x, targets
    use_cutmix = cutmix > 0 and (mixup <= 0 or host.random() < switch_prob)
    alpha = cutmix if use_cutmix else mixup
    lam = float(host.beta(alpha, alpha))
    if use_cutmix:                                                    # a box of area share 1 - lam
        H, W = x.shape[-2:]
        h, w = int(H * math.sqrt(1 - lam)), int(W * math.sqrt(1 - lam))
        cy, cx = int(host.integers(H)), int(host.integers(W))
        top, bottom = max(cy - h // 2, 0), min(cy + h - h // 2, H)
        left, right = max(cx - w // 2, 0), min(cx + w - w // 2, W)
        x = x.clone()
        x[:, :, top:bottom, left:right] = x.flip(0)[:, :, top:bottom, left:right]
        lam = 1 - (bottom - top) * (right - left) / (H * W)           # the box as clipped
    else:
        x = lam * x + (1 - lam) * x.flip(0)
    return x, lam * targets + (1 - lam) * targets.flip(0)


def finetune_step(model, opt, x, y, stats, args, lr, generator, host):
    """One step on uint8 images x (B, C, S, S) with labels y (B,), on the device; returns the loss (a tensor)."""
    set_lr(opt, lr)
    with rng.source(generator):
        x = data.finetune_view(x, args.img_size, *stats, args.crop_min, args.randaug_n, args.randaug_m,
                               args.randaug_mstd, args.reprob)
    t = smooth_targets(y, model.head.out_features, args.smoothing)
    x, t = mix(x, t, args.mixup, args.cutmix, host, args.mixup_prob, args.mixup_switch_prob)
    with torch.autocast(x.device.type, dtype=torch.bfloat16, enabled=x.device.type == "cuda"):
        logits = model(x)
    loss = F.cross_entropy(logits.float(), t)                         # soft targets
    opt.zero_grad(set_to_none=True)
    loss.backward()
    opt.step()
    return loss.detach()


# === The four modes: each returns dict(accuracy=..., **details)

def run_frozen(args, backbone, train, test):
    """knn, linear or fewshot on frozen features, computed once: train_x (N, F), train_y (N,), test_x, test_y, C."""
    if args.raw_pixels:  # the baseline without any encoder: normalised pixels, flattened
        device = next(backbone.parameters()).device
        xs = [torch.cat([data.prepare(d.images[i:i + 1024].to(device), args.img_size, train.mean, train.std)
                         .flatten(1) for i in range(0, len(d), 1024)]) for d in (train, test)]
    else:
        if args.last_blocks > len(backbone.blocks):
            raise EvalError(f"--last-blocks {args.last_blocks}: the encoder has {len(backbone.blocks)} blocks")
        xs = [features(backbone, d.images, args.img_size, train.mean, train.std, mean_patch=args.mean_patch,
                       last_blocks=args.last_blocks) for d in (train, test)]
    task = xs[0], train.labels.to(xs[0].device), xs[1], test.labels.to(xs[0].device), train.num_classes
    chosen = dict(mean_patch=args.mean_patch, last_blocks=args.last_blocks)   # which features
    if args.mode == "knn":
        return dict(accuracy=knn_accuracy(*task, k=args.k), k=args.k, T=0.07, **chosen)
    if args.mode == "linear":
        acc, details = linear_probe(*task, args.seed, steps=args.probe_steps)
        return dict(accuracy=acc, probe_steps=args.probe_steps, **chosen, **details)
    seeds = list(range(args.seed, args.seed + args.seeds))
    runs = fewshot(*task, args.shots, seeds, args.fewshot_wd, args.probe_steps)
    return dict(accuracy={str(K): statistics.mean(r) for K, r in runs.items()},
                std={str(K): statistics.stdev(r) if len(r) > 1 else 0.0 for K, r in runs.items()},
                runs={str(K): r for K, r in runs.items()}, seeds=seeds, weight_decay=args.fewshot_wd,
                probe_steps=args.probe_steps, **chosen)


def run_finetune(args, backbone, train, test):
    """Fine-tune for --epochs, or for --time-budget minutes (the length fitted to the measured speed, --epochs its
    bound; time spent evaluating not counted); top-1 on `test` at the end and at most about 10 epoch ends before.
    Saves finetuned.pt (state dict + config, plain types) beside the results file."""
    torch.manual_seed(args.seed)                                      # the head's initialisation
    model = Classifier(backbone, train.num_classes).to(next(backbone.parameters()).device)
    opt = torch.optim.AdamW(param_groups(model, args.weight_decay, args.layer_decay), lr=0.0)
    images, labels = train.images.to(model.head.weight.device), train.labels.to(model.head.weight.device)
    if len(images) < args.batch_size:
        raise EvalError(f"--batch-size {args.batch_size} exceeds the {len(images)} training images")
    generator = torch.Generator(images.device).manual_seed(args.seed)
    host, accs, stats = np.random.default_rng(args.seed), [], (train.mean, train.std)
    spe = len(images) // args.batch_size                              # steps per epoch
    step, total, loss, done = 0, args.epochs * spe, torch.zeros((), device=images.device), [0]   # done: evaluated at
    budget, start = runtime.Budget(args.time_budget) if args.time_budget else None, time.time()
    probed = probe_head(model, images, labels, stats, args) if args.head_init == "probe" else None   # in the budget
    print(f"{'epoch':>7} {'loss':>7} {'top-1':>7} {'seconds':>8}")
    model.train()
    while step < total:
        if step % spe == 0:
            order = data.epoch_order(len(images), step // spe, args.seed).to(images.device)
        idx = order[step % spe * args.batch_size:(step % spe + 1) * args.batch_size]
        loss += finetune_step(model, opt, images[idx], labels[idx], stats, args, sit.lr_at(step, args, spe, total),
                              generator, host)                        # warm-up, then cosine to step `total`
        step += 1
        if budget is not None and budget.ready(step):                 # the schedule's end moves with the fit
            total = min(step + max(budget.steps_left(step)[0], 1), args.epochs * spe)
        if step == total or step % spe == 0 and step - done[-1] >= total / 10:   # ~10 evaluations at epoch ends
            t = time.time()
            accs.append(top1(model.head, features(model.backbone, test.images, args.img_size, *stats),
                             test.labels.to(images.device)))
            if budget is not None:
                budget.paused += time.time() - t
            print(f"{step / spe:>7.2f} {loss.item() / (step - done[-1]):>7.4f} {accs[-1]:>7.2f} "
                  f"{time.time() - start:>8.1f}")
            loss.zero_()
            done.append(step)
    name = "finetuned-random-init.pt" if args.random_init else "finetuned.pt"
    path = os.path.join(os.path.dirname(os.path.abspath(args.results)), name)
    runtime.atomic_save(dict(format="sit-finetuned-v1", config=vars(args.cfg), dataset=args.dataset,
                             num_classes=train.num_classes, model={k: v.cpu() for k, v in model.state_dict().items()},
                             epoch=step / spe, accuracy=accs[-1], torch_version=str(torch.__version__)), path)
    recipe = ("lr batch_size min_lr warmup_epochs weight_decay layer_decay drop_path crop_min randaug_n randaug_m "
              "randaug_mstd reprob mixup cutmix mixup_prob mixup_switch_prob smoothing time_budget head_init").split()
    # The headline is the last epoch: the best epoch is picked by looking at the evaluation split.
    return dict(accuracy=accs[-1], best_epoch_picked_on_test=max(accs), per_epoch=accs,
                evaluated_at_epoch=[d / spe for d in done[1:]], finetune_epochs=step / spe, finetune_steps=step,
                **{name: getattr(args, name) for name in recipe}, probe=probed, finetuned=path)


# === Command line

def encoder(args, device):
    """(ViT, info, pretraining epochs): runtime.load_encoder's (the momentum teacher's backbone, an EMA of the student,
    as DINO and MoCo evaluate), or a fresh one of its shape (--random-init); fine-tuning adds --drop-path."""
    drop = args.drop_path if args.mode == "finetune" else 0.0
    vit, _, info = runtime.load_encoder(args.checkpoint, device=device, drop_path=drop)
    if args.random_init:
        torch.manual_seed(args.seed)
        cfg = info["cfg"]
        vit = sit.ViT(cfg.img_size, cfg.patch_size, cfg.in_chans, cfg.dim, cfg.depth, cfg.heads, cfg.mlp_ratio,
                      drop).to(device)
    return vit.train(), info, 0 if args.random_init else info["epoch"]


def load_labelled(args, train):
    """The labelled train or test split of args.dataset; DataError if it has no labels."""
    d = data.load(args.dataset, args.data_dir, train=train, limit=args.limit, size=args.img_size)
    if d.labels is None or not d.num_classes:
        raise data.DataError(f"dataset {args.dataset!r} has no labels ({'train' if train else 'test'} "
                             f"split); --mode {args.mode} needs a labelled dataset")
    return d


# flag: (type, default, help, valid when), each checked once parsed. Fine-tuning defaults: MAE's (arXiv 2111.06377).
FLAGS = {
    "--dataset": (str, None, "evaluate on this dataset; None = the checkpoint's", data.DATASET_RULE),
    "--data-dir": (str, None, "where datasets live; None = the checkpoint's", runtime.FOLDER),
    "--limit": (int, 0, "first N images of each split; 0 = all", allowed(0, kind=INT)),
    "--seed": (int, 0, "random seed (first seed of few-shot draws)", allowed(0, 2**32 - 1, kind=INT)),
    "--results": (str, None, "JSON-lines file to append to; None = results.jsonl beside the checkpoint (runs/NAME "
                  "for a model shipped in models/)",
                  (lambda v: v != "" and not os.path.isdir(v), "a file to append to (not a folder)")),
    "--k": (int, 20, "k-NN: neighbours", allowed(1, kind=INT)),
    "--last-blocks": (int, 1, "knn/linear/fewshot: features of each of the last N blocks, side by side",
                      allowed(1, kind=INT)),
    "--probe-steps": (int, 500, "linear/fewshot: most L-BFGS iterations per fit", allowed(1, kind=INT)),
    "--shots": (str, "1,5,10,25", "fewshot: K labelled images per class, comma-separated",
                (lambda v: all(s.strip().isascii() and s.strip().isdigit() and int(s) >= 1 for s in v.split(",")),
                 "comma-separated integers >= 1")),
    "--seeds": (int, 5, "fewshot: draws per K", allowed(1, kind=INT)),
    "--fewshot-wd": (float, 1e-2, "fewshot: L2 weight on the classifier", allowed(0)),
    "--epochs": (int, 100, "finetune: epochs (MAE, ViT-B: 100)", allowed(1, kind=INT)),
    "--batch-size": (int, 256, "finetune: images per step", allowed(1, kind=INT)),
    "--lr": (float, 5e-4, "finetune: base lr per 256 images; peak lr = lr x batch/256 (MAE's FINETUNE.md: blr "
             "5e-4 for ViT-B, lr = blr x batch/256)", allowed(0, open_lo=True)),
    "--min-lr": (float, 1e-6, "finetune: lr at the end of the cosine (MAE)", allowed(0)),
    "--warmup-epochs": (float, 5, "finetune: linear warm-up epochs (MAE)", allowed(0)),
    "--weight-decay": (float, 0.05, "finetune: AdamW weight decay (MAE, DeiT)", allowed(0)),
    "--layer-decay": (float, None, "finetune: lr x decay^(depth from the top), 1 = off; None = 0.75 (iBOT's ViT-S/16 "
                      "and MAE's ViT-L; MAE's ViT-B: 0.65), or 1 with --random-init", allowed(0, 1, open_lo=True)),
    "--drop-path": (float, 0.1, "finetune: stochastic depth at the last block (MAE)", allowed(0, 1, open_hi=True)),
    "--crop-min": (float, 0.08, "finetune: smallest area share of the random-resized crop (DeiT: 0.08)",
                   allowed(0, 1, open_lo=True)),
    "--randaug-n": (int, 2, "finetune: RandAugment ops per image; 0 = off (DeiT: rand-m9-mstd0.5-inc1)",
                    allowed(0, kind=INT)),
    "--randaug-m": (float, 9, "finetune: RandAugment magnitude, 0..10", allowed(0, 10)),
    "--randaug-mstd": (float, 0.5, "finetune: std of the RandAugment magnitude", allowed(0)),
    "--reprob": (float, 0.25, "finetune: random erasing probability; 0 = off", allowed(0, 1)),
    "--mixup": (float, 0.8, "finetune: mixup Beta alpha; 0 = off", allowed(0)),
    "--cutmix": (float, 1.0, "finetune: CutMix Beta alpha; 0 = off", allowed(0)),
    "--mixup-prob": (float, 1.0, "finetune: probability that a batch is mixed", allowed(0, 1)),
    "--mixup-switch-prob": (float, 0.5, "finetune: probability of CutMix when both are on", allowed(0, 1)),
    "--smoothing": (float, 0.1, "finetune: label smoothing", allowed(0, 1)),
    "--head-init": (str, "random", "finetune: the head's start: random (MAE), or probe: the linear probe of the "
                    "frozen features, as LP-FT (Kumar et al., ICLR 2022)", one_of("random", "probe")),
    "--time-budget": (float, 0.0, "finetune: minutes of fine-tuning, the length fitted to the measured speed "
                      "(--epochs its bound); 0 = --epochs", allowed(0)),
    "--label-fraction": (float, 1.0, "share of the labelled training images used, class-balanced, drawn by --seed: "
                         "the same images for every mode and checkpoint", allowed(0, 1, open_lo=True)),
    "--val-share": (float, 0.0, "hold out this class-balanced share of the (used) training images and evaluate on "
                    "it instead of the test split, which is then not read (to choose a recipe); 0 = off",
                    allowed(0, 1, open_hi=True)),
    "--recipe": (str, "mae", "", None),
}
FINETUNE_RECIPES = {  # name: (what it is, its flag values)
    "mae": ("MAE's and DeiT's ImageNet recipe for 100 epochs (the defaults above)", {}),
    "short": ("for runs of minutes: the head starts as the linear probe; crops of the whole image and flips, no "
              "RandAugment, erasing or mixing",
              dict(batch_size=64, crop_min=1.0, randaug_n=0, reprob=0.0, mixup=0.0, cutmix=0.0, warmup_epochs=1.0,
                   lr=3e-3, head_init="probe")),   # chosen on held-out training images: RESULTS.md
}
FLAGS["--recipe"] = FLAGS["--recipe"][:2] + (
    "finetune: a named set of flag values, which flags given override: "
    + "; ".join(f"{k}: {text}" for k, (text, _) in FINETUNE_RECIPES.items()), one_of(*FINETUNE_RECIPES))


def make_parser():
    p = runtime.Parser(prog="eval.py", description=__doc__.split("\n\n")[0],
                       formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("checkpoint", help="a ckpt.pt written by train.py")
    p.add_argument("--mode", required=True, choices=("knn", "linear", "fewshot", "finetune"), help="which evaluation")
    p.add_argument("--device", default="auto", choices=("auto", "cuda", "mps", "cpu"),
                   help="auto: cuda, then mps, then cpu")
    p.add_argument("--random-init", action="store_true", help="a fresh encoder of the same config (baseline)")
    p.add_argument("--mean-patch", action="store_true", help="frozen features: CLS + mean patch token")
    p.add_argument("--raw-pixels", action="store_true", help="knn/linear/fewshot on normalised pixels, no encoder")
    for flag, (kind, default, text, _) in FLAGS.items():
        p.add_argument(flag, type=kind, default=default, help=text)
    return p


def parse_args(argv):
    p = make_parser()
    recipe = p.parse_known_args(argv)[0].recipe
    if recipe in FINETUNE_RECIPES:                                     # else refused below, in one line
        p.set_defaults(**FINETUNE_RECIPES[recipe][1])                 # checked as any flag's value
    args = p.parse_args(argv)
    runtime.check_flags(p, args, {flag: rule for flag, (*_, rule) in FLAGS.items()})
    args.shots = [int(s) for s in args.shots.split(",")]
    if args.mode != "finetune":                                       # fine-tuning only: never dropped
        for flag in ("--recipe", "--time-budget", "--head-init"):
            if any(a == flag or a.startswith(flag + "=") for a in (argv if argv is not None else sys.argv[1:])):
                p.error(f"{flag}: for --mode finetune, not for --mode {args.mode}")
    for flag, given in (("--raw-pixels", args.raw_pixels), ("--mean-patch", args.mean_patch),
                        ("--last-blocks", args.last_blocks != 1)):   # frozen features only: never dropped
        if given and args.mode == "finetune":
            p.error(f"{flag}: for frozen features (knn, linear, fewshot), not for --mode finetune")
        if given and args.raw_pixels and flag != "--raw-pixels":
            p.error(f"{flag}: chooses encoder features, not for --raw-pixels")
    if args.layer_decay is None:   # a random encoder has no pretrained lower layers to protect
        args.layer_decay = 1.0 if args.random_init else 0.75
    args.results = args.results or os.path.join(runtime.output_folder(args.checkpoint), "results.jsonl")
    return args


def evaluate(args):
    """Run one mode and return its results record (the JSON line): `epochs` there is the encoder's pretraining
    epochs (0 with --random-init); fine-tuning's own count is `finetune_epochs`."""
    start, device = time.time(), runtime.pick_device(args.device)         # ValueError: not here
    backbone, info, epochs = encoder(args, device)
    args.cfg, args.img_size = info["cfg"], info["cfg"].img_size
    args.dataset = args.dataset or info["dataset"]
    args.data_dir = args.data_dir or info["config"].get("data_dir", "./data")
    train = load_labelled(args, True)
    if args.label_fraction < 1:
        train = take(train, share_indices(train.labels, train.num_classes, args.label_fraction, args.seed,
                                          "--label-fraction"))
    if args.val_share:                                                # the test split is not read
        val = share_indices(train.labels, train.num_classes, args.val_share, args.seed + 1, "--val-share")
        rest = torch.ones(len(train), dtype=torch.bool)
        rest[val] = False
        train, test = take(train, rest.nonzero()[:, 0]), take(train, val)
    else:
        test = load_labelled(args, False)
    out = (run_finetune if args.mode == "finetune" else run_frozen)(args, backbone, train, test)
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else device.type
    return dict(dict(mode=args.mode, dataset=args.dataset, epochs=epochs, seeds=[args.seed]), **out,
                device=name, seconds=round(time.time() - start, 2), checkpoint=os.path.abspath(args.checkpoint),
                random_init=args.random_init, raw_pixels=args.raw_pixels, limit=args.limit,
                label_fraction=args.label_fraction, val_share=args.val_share,
                evaluated_on="held-out training images" if args.val_share else "test", n_train=len(train),
                n_test=len(test), recipe=args.recipe if args.mode == "finetune" else None)


def main(argv=None):
    runtime.keep_freed_memory()
    args = parse_args(argv)
    try:
        r = evaluate(args)
    except FlagError as e:   # as a value refused when parsed
        print(f"eval.py: error: {e}", file=sys.stderr)
        sys.exit(2)
    except ValueError as e:  # CheckpointError, DataError, EvalError, a device not here: one line, exit status 1
        sys.exit(f"eval.py: error: {e}")
    source = ("raw pixels (no encoder)" if r["raw_pixels"] else "random init encoder" if r["random_init"]
              else f"pretrained encoder (epoch {r['epochs']})")
    share = f", {100 * r['label_fraction']:g}% of the labels" if r["label_fraction"] < 1 else ""
    print(f"\n{r['mode']} on {r['dataset']}{share}, {source}, {r['device']}, {r['seconds']:.1f} s, "
          f"evaluated on {r['evaluated_on']} ({r['n_test']} images)")
    if r["mode"] == "fewshot":
        print(f"{'K':>4}  top-1 (mean +- std over {len(r['seeds'])} seeds)")
        for K, acc in r["accuracy"].items():
            print(f"{K:>4}  {acc:6.2f} +- {r['std'][K]:.2f}")
    elif r["mode"] == "finetune":
        print(f"top-1 after the last epoch  {r['accuracy']:.2f}")
        print(f"(highest epoch {r['best_epoch_picked_on_test']:.2f}: picked on the evaluation split, not a result)")
    else:
        print(f"top-1  {r['accuracy']:.2f}")
    os.makedirs(os.path.dirname(os.path.abspath(args.results)), exist_ok=True)
    with open(args.results, "a") as f:
        f.write(json.dumps(r) + "\n")
    return r


if __name__ == "__main__":
    main()
