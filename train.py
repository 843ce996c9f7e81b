"""Self-supervised SiT pretraining: one command on one GPU, small runs on a CPU, wide with torchrun.

    python train.py --dataset cifar10                       # one GPU (or CPU/MPS), downloads CIFAR-10
    torchrun --nproc_per_node=4 train.py --dataset cifar10  # several GPUs (DDP), same flags
    python train.py --bench 50                              # throughput on synthetic data

The dataset sits once on the device as uint8; both views and the GMML corruption are made there,
batched, from a seeded generator. Checkpoints (ckpt.pt) are written atomically at every epoch end
and when the run is interrupted (Ctrl-C, SIGTERM), so `--resume` loses nothing it could keep.
"""
import argparse
import json
import math
import os
import signal
import sys
import time

import torch
import torch.distributed as dist
from torch.nn.parallel import DistributedDataParallel as DDP
from tqdm import tqdm

import data
import sit
from eval import features, knn_accuracy


class RunError(ValueError):
    """A problem with the command line or the run folder; reported in one line."""


# ------------------------------------------------------------------------------------------------
# Set-up: command line, device, processes, data, model, optimizer
# ------------------------------------------------------------------------------------------------

def parse_args(argv=None):
    parser = argparse.ArgumentParser(description="Pretrain a ViT with SiT/GMML (arXiv 2104.03602).")
    sit.Config.add_args(parser)
    try:
        return sit.Config.from_args(parser.parse_args(argv))
    except ValueError as e:  # Config's own checks (preset, sizes, ranges)
        raise RunError(str(e)) from None


def init_distributed(cfg):
    """(rank, world, device): torchrun sets WORLD_SIZE; plain `python train.py` is one process."""
    world = int(os.environ.get("WORLD_SIZE", 1))
    local_rank = int(os.environ.get("LOCAL_RANK", 0))
    try:
        device = sit.pick_device(cfg.device, local_rank)
    except ValueError as e:
        raise RunError(str(e)) from None
    if world > 1:
        if device.type == "cuda":
            torch.cuda.set_device(device)
        dist.init_process_group("nccl" if device.type == "cuda" else "gloo")
        if cfg.batch_size % world:
            raise RunError(f"--batch-size {cfg.batch_size} is not divisible by the {world} processes")
    return (dist.get_rank() if world > 1 else 0), world, device


def check_run_folder(cfg):
    """The run folder must be new, or hold this run's checkpoint when resuming."""
    ckpt = os.path.join(cfg.out, "ckpt.pt")
    if cfg.resume and not os.path.isfile(ckpt):
        raise RunError(f"--resume: no checkpoint to resume at {ckpt}")
    if not cfg.resume and any(os.path.exists(os.path.join(cfg.out, f)) for f in ("ckpt.pt", "config.json")):
        raise RunError(f"{cfg.out} already holds a run; add --resume to continue it or choose another --out")


def load_training_data(cfg):
    """(pretraining images, k-NN bank, k-NN queries); the last two are None for unlabelled data.

    The bank is the labelled train split (the pretraining images themselves when labelled).
    """
    try:
        train = data.load(cfg.dataset, cfg.data_dir, train=True, limit=cfg.limit, pretrain=True, size=cfg.img_size)
        bank = test = None
        if train.labels is not None or cfg.dataset == "stl10":
            bank = train if train.labels is not None else data.load(cfg.dataset, cfg.data_dir, train=True,
                                                                    limit=cfg.limit, size=cfg.img_size)
            test = data.load(cfg.dataset, cfg.data_dir, train=False, size=cfg.img_size)
    except data.DataError:
        raise
    except (OSError, RuntimeError) as e:  # typically a failed download
        raise RunError(f"could not load {cfg.dataset} into {cfg.data_dir}: {str(e).splitlines()[0]}") from None
    if train.skipped:
        print(f"skipped {train.skipped} unreadable image files", file=sys.stderr)
    if len(train) < cfg.batch_size:
        raise RunError(f"--batch-size {cfg.batch_size} is larger than the dataset ({len(train)} images)")
    return train, bank, test


def build_optimizer(model, cfg, device):
    """AdamW; no weight decay on biases, norm weights, CLS token and position embedding."""
    decay, no_decay = [], []
    for name, p in model.student.named_parameters():
        (no_decay if p.ndim <= 1 or name.endswith(("cls_token", "pos_embed")) else decay).append(p)
    groups = [dict(params=decay), dict(params=no_decay, weight_decay=0.0)]
    return torch.optim.AdamW(groups, lr=cfg.lr, betas=(0.9, 0.999), fused=device.type == "cuda")


def set_schedules(opt, step, cfg, steps_per_epoch):
    """lr and weight decay for this global step (the no-decay group keeps 0)."""
    lr = sit.lr_at(step, cfg, steps_per_epoch)
    for group in opt.param_groups:
        group["lr"] = lr
    opt.param_groups[0]["weight_decay"] = sit.weight_decay_at(step, cfg, steps_per_epoch)
    return lr


# ------------------------------------------------------------------------------------------------
# One training step
# ------------------------------------------------------------------------------------------------

def make_inputs(x, cfg, mean, std, gen):
    """uint8 batch (B, C, S, S) -> clean, corrupted (2B, 3, H, W) and mask (2B, 1, H, W), on device.

    Each view is corrupted on its own, so a block replaced "from another image" never comes from
    the other view of the same image.
    """
    clean = data.two_views(x, cfg.img_size, mean, std, gen)
    corrupted, masks = [], []
    for view in clean.chunk(2):
        c, m = sit.gmml_corrupt(view, cfg.drop_perc, cfg.drop_replace, cfg.drop_align, cfg.drop_type,
                                cfg.max_block, generator=gen)
        corrupted.append(c)
        masks.append(m)
    return clean, torch.cat(corrupted), torch.cat(masks)


def forward_backward(model, clean, corrupted, mask, device):
    """Loss terms of one step (detached) after backward; bf16 autocast on CUDA, float32 elsewhere."""
    with torch.autocast(device.type, dtype=torch.bfloat16, enabled=device.type == "cuda"):
        out = model(clean, corrupted, mask)
    out["loss"].backward()
    return torch.stack([out["loss"].detach(), out["loss_recons"].detach(), out["loss_contr"].detach()]).float()


def train_step(step_fn, sit_model, opt, x, step, cfg, mean, std, gen, steps_per_epoch, device):
    """One optimisation step at global `step`; returns the (3,) loss terms, still on the device."""
    lr = set_schedules(opt, step, cfg, steps_per_epoch)
    clean, corrupted, mask = make_inputs(x, cfg, mean, std, gen)
    losses = step_fn(clean, corrupted, mask)
    if cfg.clip_grad > 0:
        # Differs from the reference code (per-parameter-tensor clipping): one global norm, the
        # usual choice, keeps the update's direction.
        torch.nn.utils.clip_grad_norm_(sit_model.student.parameters(), cfg.clip_grad)
    opt.step()
    opt.zero_grad(set_to_none=True)
    sit_model.update_teacher(sit.momentum_at(step, cfg, steps_per_epoch))
    return losses, lr


def make_step_fn(model, device, compile_):
    """forward_backward on the (optionally torch.compile'd) model."""
    model = torch.compile(model) if compile_ else model
    return lambda clean, corrupted, mask: forward_backward(model, clean, corrupted, mask, device)


# ------------------------------------------------------------------------------------------------
# Monitoring: k-NN of the teacher's CLS features, log.jsonl
# ------------------------------------------------------------------------------------------------

def knn_monitor(sit_model, bank, test, cfg):
    """Weighted k-NN top-1 (%) of the teacher's CLS features, labelled train split -> test split."""
    backbone = sit_model.teacher.backbone
    f_train = features(backbone, bank.images, cfg.img_size, bank.mean, bank.std)
    f_test = features(backbone, test.images, cfg.img_size, test.mean, test.std)
    return knn_accuracy(f_train, bank.labels, f_test, test.labels, test.num_classes)


class Log:
    """log.jsonl in the run folder: one JSON object per log step and per epoch (rank 0 only)."""

    def __init__(self, path, enabled, keep_until_step=None):
        self.path, self.enabled = path, enabled
        if enabled and keep_until_step is not None and os.path.exists(path):
            # Resuming: drop lines of steps the resumed run will do again.
            with open(path) as f:
                lines = [l for l in f if l.strip() and json.loads(l).get("step", 0) <= keep_until_step]
            with open(path + ".tmp", "w") as f:
                f.writelines(lines)
            os.replace(path + ".tmp", path)

    def write(self, **row):
        if self.enabled:
            with open(self.path, "a") as f:
                f.write(json.dumps(row) + "\n")


# ------------------------------------------------------------------------------------------------
# Interruption: a signal asks the loop to save and stop at the next step boundary
# ------------------------------------------------------------------------------------------------

class StopFlag:
    """Within `with StopFlag() as stop:`, SIGINT/SIGTERM set stop.signal; a second one stops at once."""

    def __init__(self, enabled=True):
        self.signal, self.enabled, self.previous = None, enabled, {}

    def __enter__(self):
        if self.enabled:
            self.previous = {s: signal.signal(s, self._handle) for s in (signal.SIGINT, signal.SIGTERM)}
        return self

    def __exit__(self, *exc):
        for s, handler in self.previous.items():
            signal.signal(s, handler)

    def _handle(self, signum, frame):
        if self.signal is not None:
            raise KeyboardInterrupt
        self.signal = signum


# ------------------------------------------------------------------------------------------------
# The run
# ------------------------------------------------------------------------------------------------

class Trainer:
    """The state of one run (model, optimizer, generator, data, step) and its epoch loop."""

    def __init__(self, cfg, rank, world, device):
        self.cfg, self.rank, self.world, self.device = cfg, rank, world, device
        self.train_set, self.bank, self.test_set = load_training_data(cfg)
        torch.manual_seed(cfg.seed)
        self.model = sit.SiT(cfg).to(device)                       # the plain module (checkpoints)
        self.opt = build_optimizer(self.model, cfg, device)
        self.gen = torch.Generator(device=device).manual_seed(cfg.seed + rank)
        self.step, self.epoch = 0, 0
        if cfg.resume:
            self.restore(os.path.join(cfg.out, "ckpt.pt"))
        wrapped = self.model
        if world > 1:
            if device.type == "cuda":  # heads' batch norm over the global batch (CUDA only in torch)
                for part in (self.model.student, self.model.teacher):
                    part.head = torch.nn.SyncBatchNorm.convert_sync_batchnorm(part.head)
            wrapped = DDP(self.model, device_ids=[device.index] if device.type == "cuda" else None)
        self.step_fn = make_step_fn(wrapped, device, cfg.compile)
        self.images = self.train_set.images.to(device) if self.train_set.images is not None else None
        self.steps_per_epoch = len(self.train_set) // cfg.batch_size
        if rank == 0:
            os.makedirs(cfg.out, exist_ok=True)
            with open(os.path.join(cfg.out, "config.json"), "w") as f:
                json.dump(cfg.to_dict(), f, indent=1)
        self.log = Log(os.path.join(cfg.out, "log.jsonl"), rank == 0, self.step if cfg.resume else None)

    def restore(self, path):
        _, loaded, ckpt = sit.load_checkpoint(path, self.device)
        self.model.load_state_dict(loaded.state_dict())
        self.opt.load_state_dict(ckpt["optimizer"])
        self.step, self.epoch = ckpt["step"], ckpt["epoch"]
        if self.world == 1:  # augmentation/corruption stream, and the global one (drop path)
            self.gen.set_state(ckpt["extra"]["generator"].cpu())
            torch.set_rng_state(ckpt["extra"]["cpu_rng"].cpu())
            if self.device.type == "cuda":
                torch.cuda.set_rng_state(ckpt["extra"]["cuda_rng"].cpu(), self.device)
        else:  # one state per rank is not kept: a fresh, still seeded, stream per rank
            self.gen.manual_seed(self.cfg.seed + self.rank + 1_000_003 * self.step)
        print(f"resuming {self.cfg.out} at epoch {self.epoch}, step {self.step}")

    def save(self):
        if self.rank == 0:
            rng = dict(generator=self.gen.get_state(), cpu_rng=torch.get_rng_state())
            if self.device.type == "cuda":
                rng["cuda_rng"] = torch.cuda.get_rng_state(self.device)
            sit.save_checkpoint(os.path.join(self.cfg.out, "ckpt.pt"), self.cfg, self.model, self.opt,
                                self.step, self.epoch, extra=rng)

    def knn(self):
        """k-NN monitor (rank 0, labelled data only): print and log the teacher's k-NN top-1."""
        if self.test_set is None or self.rank != 0:
            return
        acc = knn_monitor(self.model, self.bank, self.test_set, self.cfg)
        tqdm.write(f"epoch {self.epoch}: k-NN {acc:.2f}%")
        self.log.write(kind="epoch", step=self.step, epoch=self.epoch, knn=acc)

    def run(self):
        """Epochs until the end or a stop signal; returns the exit code."""
        cfg = self.cfg
        if self.step == 0:
            self.knn()                                             # random init
        # One process: a signal saves the exact step. Under torchrun the ranks could see it at
        # different steps, so they stop as usual and resume from the last epoch end.
        with StopFlag(enabled=self.world == 1) as stop:
            while self.epoch < cfg.epochs:
                if not self.run_epoch(stop):
                    self.save()
                    print(f"interrupted: saved {os.path.join(cfg.out, 'ckpt.pt')} at step {self.step}; "
                          f"continue with --resume", file=sys.stderr)
                    return 128 + stop.signal
                self.epoch += 1
                self.save()
                if self.epoch == cfg.epochs or (cfg.knn_every and self.epoch % cfg.knn_every == 0):
                    self.knn()
        if self.world > 1:
            check_replicas(self.model, self.log)
        return 0

    def run_epoch(self, stop):
        """Train from self.step to the epoch's end; False if a signal stopped it. Syncs only to log."""
        cfg, n = self.cfg, self.steps_per_epoch
        start = self.step - self.epoch * n
        batches = data.epoch_batches(self.train_set, self.images, cfg.batch_size, self.epoch, cfg.seed,
                                     start, self.rank, self.world, cfg.workers)
        bar = tqdm(total=n, initial=start, desc=f"epoch {self.epoch + 1}/{cfg.epochs}",
                   disable=self.rank != 0, dynamic_ncols=True, leave=False)
        totals, window = torch.zeros(3, device=self.device), torch.zeros(3, device=self.device)
        t_epoch, t0, n_window = time.time(), time.time(), 0
        for x in batches:
            if stop.signal is not None:
                bar.close()
                return False
            losses, lr = train_step(self.step_fn, self.model, self.opt, x.to(self.device, non_blocking=True),
                                    self.step, cfg, self.train_set.mean, self.train_set.std, self.gen, n,
                                    self.device)
            totals += losses
            window += losses
            self.step, n_window = self.step + 1, n_window + 1
            bar.update(1)
            if self.step % cfg.log_every == 0 or self.step % n == 0:
                loss, recons, contr = (window / n_window).tolist()    # the only host sync
                check_finite(loss, self.step)
                img_s = n_window * cfg.batch_size / (time.time() - t0)
                bar.set_postfix_str(f"loss {loss:.4f} rec {recons:.4f} con {contr:.4f} lr {lr:.2e} {img_s:,.0f} img/s")
                self.log.write(kind="step", step=self.step, epoch=self.step / n, loss=loss, loss_recons=recons,
                               loss_contr=contr, lr=lr, wd=self.opt.param_groups[0]["weight_decay"],
                               momentum=sit.momentum_at(self.step, cfg, n), img_s=img_s)
                window.zero_()
                t0, n_window = time.time(), 0
        bar.close()
        loss, recons, contr = (totals / max(n - start, 1)).tolist()
        check_finite(loss, self.step)
        seconds = time.time() - t_epoch
        if self.rank == 0:
            tqdm.write(f"epoch {self.epoch + 1:4d}/{cfg.epochs}  loss {loss:.4f}  recons {recons:.4f}  "
                       f"contr {contr:.4f}  lr {lr:.2e}  {seconds:6.1f} s")
        self.log.write(kind="epoch", step=self.step, epoch=self.epoch + 1, loss=loss, loss_recons=recons,
                       loss_contr=contr, lr=lr, seconds=seconds)
        return True


def check_finite(loss, step):
    if not math.isfinite(loss):
        raise SystemExit(f"train.py: error: loss is {loss} at step {step}; stopped. The last good "
                         f"checkpoint is kept; try a lower --lr or --clip-grad")


def check_replicas(sit_model, log):
    """After DDP training every rank must hold the same student; log the largest difference."""
    flat = torch.cat([p.detach().float().flatten() for p in sit_model.student.parameters()])
    ref = flat.clone()
    dist.broadcast(ref, src=0)
    diff = (flat - ref).abs().max()
    dist.all_reduce(diff, op=dist.ReduceOp.MAX)
    log.write(kind="replicas", max_abs_diff=diff.item(), world=dist.get_world_size())


# ------------------------------------------------------------------------------------------------
# Benchmark: img/s, ms/step and MFU on synthetic data of the configured size
# ------------------------------------------------------------------------------------------------

def count_flops(sit_model, device, cfg, x, mean, std):
    """FLOPs of one forward + backward of the model (torch.utils.flop_counter), inputs excluded."""
    from torch.utils.flop_counter import FlopCounterMode
    clean, corrupted, mask = make_inputs(x, cfg, mean, std, torch.Generator(device=device).manual_seed(0))
    with FlopCounterMode(display=False) as counter:
        forward_backward(sit_model, clean, corrupted, mask, device)
    sit_model.zero_grad(set_to_none=True)
    return counter.get_total_flops()


def sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    elif device.type == "mps":
        torch.mps.synchronize()


def bench(cfg, device):
    torch.manual_seed(cfg.seed)
    sit_model = sit.SiT(cfg).to(device)
    opt = build_optimizer(sit_model, cfg, device)
    gen = torch.Generator(device=device).manual_seed(cfg.seed)
    images = torch.randint(0, 256, (cfg.batch_size, 3, cfg.img_size, cfg.img_size), dtype=torch.uint8,
                           device=device, generator=gen)
    mean, std = data.IMAGENET_STATS
    flops = count_flops(sit_model, device, cfg, images, mean, std)
    step_fn = make_step_fn(sit_model, device, cfg.compile)
    def steps(n):
        for i in range(n):
            train_step(step_fn, sit_model, opt, images, 1000 + i, cfg, mean, std, gen, 10_000, device)
    steps(3 if not cfg.compile else 10)                              # warm-up (and compilation)
    sync(device)
    t = time.perf_counter()
    steps(cfg.bench)
    sync(device)
    step_s = (time.perf_counter() - t) / cfg.bench
    t = time.perf_counter()
    for _ in range(cfg.bench):
        make_inputs(images, cfg, mean, std, gen)
    sync(device)
    data_s = (time.perf_counter() - t) / cfg.bench
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else device.type
    tflops = flops / step_s / 1e12
    print(f"bench {cfg.model} ({cfg.dim}/{cfg.depth}/{cfg.heads}) P{cfg.patch_size} {cfg.img_size}px "
          f"batch {cfg.batch_size} {'compiled ' if cfg.compile else ''}on {name}: "
          f"{cfg.batch_size / step_s:,.0f} img/s, {step_s * 1e3:.1f} ms/step, {tflops:.3g} TFLOP/s, "
          f"MFU {100 * tflops / cfg.peak_tflops:.3g}% of {cfg.peak_tflops:g}; "
          f"augmentation + corruption {data_s * 1e3:.1f} ms ({100 * data_s / step_s:.2g}% of a step)")


def setup(argv):
    """Checked configuration, processes and run folder; every problem here is a RunError-like ValueError."""
    cfg = parse_args(argv)
    cfg.out = cfg.out or os.path.join("runs", os.path.basename(os.path.normpath(cfg.dataset)))
    if cfg.epochs <= 0:
        raise RunError(f"--epochs must be positive, got {cfg.epochs}")
    if cfg.batch_size <= 0:
        raise RunError(f"--batch-size must be positive, got {cfg.batch_size}")
    if cfg.warmup_epochs >= cfg.epochs:
        print(f"train.py: note: --warmup-epochs {cfg.warmup_epochs:g} >= --epochs {cfg.epochs}: the learning "
              f"rate never reaches its peak (try --warmup-epochs {max(cfg.epochs / 10, 0.5):g})", file=sys.stderr)
    if cfg.resume:
        check_run_folder(cfg)
        saved = sit.load_checkpoint(os.path.join(cfg.out, "ckpt.pt"))[0]
        # The run's own recipe; only where and how it runs may change.
        keep = ("device", "compile", "resume", "knn_every", "log_every", "workers", "data_dir", "out")
        cfg = sit.Config.from_dict({**saved.to_dict(), **{k: getattr(cfg, k) for k in keep}})
    return cfg


def main(argv=None):
    try:
        try:  # set-up: a mistake in the input is one line on stderr and exit code 2
            cfg = setup(argv)
            if cfg.bench:
                return bench(cfg, sit.pick_device(cfg.device))
            rank, world, device = init_distributed(cfg)
            if rank == 0:
                check_run_folder(cfg)
            torch.set_float32_matmul_precision("high")
            trainer = Trainer(cfg, rank, world, device)
        except ValueError as e:  # RunError, DataError, CheckpointError, Config's and device checks
            print(f"train.py: error: {e}", file=sys.stderr)
            return 2
        return trainer.run()
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()


if __name__ == "__main__":
    sys.exit(main())
