"""Self-supervised SiT pretraining: one command on one GPU, small runs on a CPU, wide with torchrun.

    python train.py --dataset cifar10                       # one GPU (or CPU/MPS), downloads CIFAR-10
    torchrun --nproc_per_node=4 train.py --dataset cifar10  # several GPUs (data parallel), same flags
    python train.py --bench 50                              # throughput of the training step
    python train.py --dataset fashion-mnist --time-budget 6 --epochs 1000   # the best 6 minutes buy

The dataset sits once on the device as uint8. One training step (`Step`) is one function of device
tensors: both views, GMML on both, forward, backward, clipping, AdamW and the teacher EMA, with
its random numbers drawn just before from the run's seeded generator; on CUDA it is compiled into
one graph and replayed as a CUDA graph. Checkpoints (ckpt.pt) are written atomically at every
epoch end, every --save-every minutes and when the run is interrupted (Ctrl-C, SIGTERM, on any
rank), so `--resume` loses nothing it could keep.
"""
import json
import math
import os
import signal
import sys
import time

import torch
import torch.distributed as dist
from tqdm import tqdm

import cli
import data
import sit
from eval import features, knn_accuracy


class RunError(ValueError):
    """A problem with the command line or the run folder; reported in one line."""


# ------------------------------------------------------------------------------------------------
# Set-up: command line, device, processes, data, model, optimizer
# ------------------------------------------------------------------------------------------------

def parse_args(argv=None):
    parser = cli.Parser(prog="train.py", description="Pretrain a ViT with SiT/GMML (arXiv 2104.03602).")
    sit.Config.add_args(parser)
    args = parser.parse_args(argv)                                   # a value of the wrong type: exit 2
    problem = cli.bad_value("--dataset", args.dataset, data.DATASET_RULE)  # its rule lives in data.py
    if problem:
        raise RunError(problem)
    try:
        return sit.Config.from_args(args)
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
    """A new run needs a folder without a checkpoint; --resume needs one. A folder with a config
    but no checkpoint holds a run that never saved anything: it starts afresh, with or without
    --resume (sets cfg.resume accordingly)."""
    ckpt = os.path.join(cfg.out, "ckpt.pt")
    if os.path.exists(cfg.out) and not os.path.isdir(cfg.out):
        raise RunError(f"--out {cfg.out}: must be a folder (a file of that name exists)")
    if os.path.isfile(ckpt):
        if not cfg.resume:
            raise RunError(f"{cfg.out} already holds a run; add --resume to continue it or choose another --out")
        return
    if os.path.exists(os.path.join(cfg.out, "config.json")):
        if os.environ.get("RANK", "0") == "0":                     # once under torchrun
            print(f"train.py: note: {cfg.out} holds a run that never saved a checkpoint; starting it afresh",
                  file=sys.stderr)
        cfg.resume = False
    elif cfg.resume:
        raise RunError(f"--resume: no checkpoint to resume at {ckpt}")


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


# ------------------------------------------------------------------------------------------------
# The training step: one function of device tensors, so that torch.compile takes it as one graph
# ------------------------------------------------------------------------------------------------

def make_inputs(x, cfg, mean, std, generator):
    """uint8 batch (B, C, S, S) -> clean, corrupted (2B, 3, H, W) and mask (2B, 1, H, W), on device.

    Each view is corrupted on its own, so a block replaced "from another image" never comes from
    the other view of the same image. generator: a torch.Generator or a sit.Uniforms stream.
    """
    clean = data.two_views(x, cfg.img_size, mean, std, generator)
    corrupted, masks = [], []
    for view in clean.chunk(2):
        c, m = sit.gmml_corrupt(view, cfg.drop_perc, cfg.drop_replace, cfg.drop_align, cfg.drop_type,
                                cfg.max_block, generator=generator)
        corrupted.append(c)
        masks.append(m)
    return clean, torch.cat(corrupted), torch.cat(masks)


def decay_groups(model):
    """Student parameters with weight decay, and without (biases, norm weights, CLS token, positions)."""
    decay, no_decay = [], []
    for name, p in model.student.named_parameters():
        (no_decay if p.ndim <= 1 or name.endswith(("cls_token", "pos_embed")) else decay).append(p)
    return decay, no_decay


@torch.no_grad()
def clip_grad_norm_(grads, max_norm, per_tensor=False):
    """Scale `grads` in place so that their L2 norm is at most `max_norm` (no host sync).

    Differs from the reference code (per_tensor: each parameter tensor clipped on its own): one
    global norm, the usual choice, keeps the update's direction.
    """
    norms = torch._foreach_norm(grads)
    if per_tensor:
        for g, n in zip(grads, norms):
            g.mul_((max_norm / (n + 1e-6)).clamp(max=1.0))
        return
    norm = torch.linalg.vector_norm(torch.stack(norms))
    torch._foreach_mul_(grads, (max_norm / (norm + 1e-6)).clamp(max=1.0))


@torch.no_grad()
def adamw_(params, grads, exp_avg, exp_avg_sq, decay, t, lr, wd, betas=(0.9, 0.999), eps=1e-8):
    """AdamW (Loshchilov and Hutter) over lists of tensors; t (steps done), lr, wd may be 0-dim tensors.

    The update of torch.optim.AdamW, written out because torch.optim's step() always breaks the
    graph. decay: the subset of params that get weight decay.
    """
    b1, b2 = betas
    torch._foreach_mul_(decay, 1 - lr * wd)                          # decoupled weight decay
    torch._foreach_lerp_(exp_avg, grads, 1 - b1)                     # m <- b1 m + (1 - b1) g
    torch._foreach_mul_(exp_avg_sq, b2)
    torch._foreach_addcmul_(exp_avg_sq, grads, grads, value=1 - b2)  # v <- b2 v + (1 - b2) g^2
    denom = torch._foreach_sqrt(exp_avg_sq)
    torch._foreach_div_(denom, (1 - b2 ** t).sqrt())                 # sqrt(v / (1 - b2^t))
    torch._foreach_add_(denom, eps)
    update = torch._foreach_div(exp_avg, denom)
    torch._foreach_mul_(update, -lr / (1 - b1 ** t))                 # - lr m / (1 - b1^t) / denom
    torch._foreach_add_(params, update)


def all_reduce_mean_(tensors):
    """Average `tensors` over all processes in place, as one flat all-reduce (what DDP does in buckets)."""
    flat = torch.cat([t.reshape(-1) for t in tensors])
    dist.all_reduce(flat)
    flat /= dist.get_world_size()
    for t, f in zip(tensors, flat.split([t.numel() for t in tensors])):
        t.copy_(f.view_as(t))


class Step:
    """One optimisation step: both views, GMML on both, forward, backward, clipping, AdamW, teacher EMA.

    `update(x, u)` is the whole step as one function of device tensors: the step counter, the
    schedules (a table indexed by that counter), the optimizer state and the running loss sums live
    on the device, and every random number comes from `u`, drawn just before from the run's seeded
    generator. So torch.compile takes it as one graph that never recompiles, the eager and the
    compiled step compute the same thing, and `--resume` continues either exactly. Calling the
    Step draws `u` (one kernel) and runs `update`, compiled or not.
    """

    def __init__(self, model, cfg, mean, std, steps_per_epoch, device, generator, world=1):
        self.model, self.cfg, self.mean, self.std = model, cfg, mean, std
        self.device, self.generator, self.world = device, generator, world
        self.decay, no_decay = decay_groups(model)
        self.params = self.decay + no_decay                          # torch AdamW's order of groups
        self.exp_avg = [torch.zeros_like(p) for p in self.params]
        self.exp_avg_sq = [torch.zeros_like(p) for p in self.params]
        self.t = torch.zeros((), dtype=torch.long, device=device)   # steps done (global step)
        self.schedule = sit.schedule_table(cfg, steps_per_epoch).to(device)  # (3, T + 1) lr, wd, m
        self.loss_sums = torch.zeros(3, device=device)               # loss, recons, contr since last read
        self.u, self.x_shape, self.compiled, self.compile_seconds = None, None, False, None
        self.graph = self.update

    def update(self, x, u):
        """The whole step on the device, for a uint8 batch x (B, C, S, S) and uniforms u (n,)."""
        cfg, rng = self.cfg, sit.Uniforms(u)
        lr, wd, m = self.schedule.index_select(1, self.t.clamp(max=self.schedule.shape[1] - 1).view(1)).view(3)
        clean, corrupted, mask = make_inputs(x, cfg, self.mean, self.std, rng)
        with torch.autocast(self.device.type, dtype=torch.bfloat16, enabled=self.device.type == "cuda"):
            out = self.model(clean, corrupted, mask, rng)
        grads = list(torch.autograd.grad(out["loss"], self.params))
        if self.world > 1:
            all_reduce_mean_(grads)
        if cfg.clip_grad > 0:
            clip_grad_norm_(grads, cfg.clip_grad, per_tensor=cfg.clip_mode == "per-tensor")
        self.t.add_(1)
        adamw_(self.params, grads, self.exp_avg, self.exp_avg_sq, self.decay, self.t, lr, wd)
        self.model.update_teacher(m)
        self.loss_sums.add_(torch.stack([out["loss"], out["loss_recons"], out["loss_contr"]]).detach().float())
        assert rng.used == u.numel(), "uniforms_per_step no longer counts what the step draws"

    def uniforms_per_step(self, x_shape):
        """How many uniforms one step draws: its random parts run once, counting, on the meta device."""
        counter = sit.Uniforms()
        with torch.device("meta"):
            x = torch.zeros(x_shape, dtype=torch.uint8)
            _, corrupted, _ = make_inputs(x, self.cfg, self.mean, self.std, counter)
            sit.SiT(self.cfg).student.backbone(corrupted, counter)  # drop path
        return counter.used

    def __call__(self, x):
        """Run one step on batch x: draw its random numbers from the run's generator, then update."""
        if x.shape != self.x_shape:                                  # first step (or a short batch)
            self.x_shape = x.shape
            self.u = torch.empty(self.uniforms_per_step(x.shape), device=self.device)
            self.mark_static()
        self.u.uniform_(generator=self.generator)
        if self.compiled and self.compile_seconds is None:
            self.compile_seconds = self.compile_first(x)
        else:
            self.graph(x, self.u)

    # --- compilation -----------------------------------------------------------------------------

    def compile(self, cuda_graphs=True, backend="inductor"):
        """torch.compile `update` as one graph (fullgraph), replayed as a CUDA graph on CUDA.

        Under torchrun the gradient all-reduce (and the gathering of teacher keys) splits the graph.
        """
        if hasattr(torch._dynamo.config, "trace_autograd_ops"):
            torch._dynamo.config.trace_autograd_ops = True          # autograd.grad inside the graph
        self.options = dict(backend=backend)
        if cuda_graphs and self.device.type == "cuda":
            self.options["mode"] = "reduce-overhead"
        self.graph = torch.compile(self.update, fullgraph=self.world == 1, **self.options)
        self.compiled = True

    def mark_static(self):
        """Tensors the step mutates keep their addresses, so that a CUDA graph can replay in place."""
        if self.compiled:
            for t in [self.t, self.schedule, self.loss_sums, self.u, *self.exp_avg, *self.exp_avg_sq,
                      *self.model.buffers()]:                        # buffers: batch norm statistics
                torch._dynamo.mark_static_address(t)

    def compile_first(self, x):
        """The first compiled step: compile (in pieces where this torch cannot take the whole step
        as one graph), run it; returns the seconds it took."""
        t0 = time.perf_counter()
        try:
            self.graph(x, self.u)
        except torch._dynamo.exc.Unsupported as e:
            print(f"train.py: note: this torch cannot compile the whole step as one graph "
                  f"({str(e).splitlines()[0]}); compiling it in pieces", file=sys.stderr)
            torch._dynamo.reset()
            self.graph = torch.compile(self.update, **self.options)
            self.graph(x, self.u)
        sync(self.device)
        return time.perf_counter() - t0

    # --- optimizer state in torch.optim.AdamW's layout (so checkpoints stay interchangeable) -----

    def optimizer_state_dict(self):
        t = self.t.float().cpu()
        state = {i: dict(step=t.clone(), exp_avg=m, exp_avg_sq=v)
                 for i, (m, v) in enumerate(zip(self.exp_avg, self.exp_avg_sq))}
        n = len(self.decay)
        groups = [dict(params=list(range(n)), weight_decay=self.cfg.weight_decay),
                  dict(params=list(range(n, len(self.params))), weight_decay=0.0)]
        for g in groups:
            g.update(lr=self.cfg.lr, betas=(0.9, 0.999), eps=1e-8, amsgrad=False)
        return dict(state=state, param_groups=groups)

    def load_optimizer_state_dict(self, sd, step):
        if len(sd["state"]) != len(self.params):
            raise sit.CheckpointError("the checkpoint's optimizer state does not match the model")
        for i, (m, v) in enumerate(zip(self.exp_avg, self.exp_avg_sq)):
            m.copy_(sd["state"][i]["exp_avg"])
            v.copy_(sd["state"][i]["exp_avg_sq"])
        self.t.fill_(step)

    def set_schedule(self, table):
        """New schedules (a shorter run): written into the same tensor, so nothing recompiles."""
        T = table.shape[1]
        if T > self.schedule.shape[1]:
            raise ValueError("a new schedule may only be shorter")
        self.schedule[:, :T] = table.to(self.device)
        self.schedule[:, T:] = table[:, -1:].to(self.device)

    def peek_loss(self):
        """The loss summed since the last read, without resetting it (a host sync)."""
        return self.loss_sums[0].item()

    def read_losses(self):
        """Sum of (loss, recons, contr) since the last read, as floats (a host sync), then reset."""
        sums = self.loss_sums.tolist()
        self.loss_sums.zero_()
        return sums


# ------------------------------------------------------------------------------------------------
# Monitoring: k-NN of the teacher's CLS features, log.jsonl
# ------------------------------------------------------------------------------------------------

def knn_monitor(sit_model, bank, test, cfg):
    """Weighted k-NN top-1 (%) of the teacher's CLS features, labelled train split -> test split."""
    backbone = sit_model.teacher.backbone
    f_train = features(backbone, bank.images, cfg.img_size, bank.mean, bank.std)
    f_test = features(backbone, test.images, cfg.img_size, test.mean, test.std)
    return knn_accuracy(f_train, bank.labels, f_test, test.labels, test.num_classes)


def write_json(path, obj):
    """Write `obj` as JSON so that `path` appears whole or not at all."""
    sit.atomic_write(path, lambda f: f.write(json.dumps(obj, indent=1).encode()))


def row_of(line):
    """The JSON object on one line of log.jsonl, or None for a line cut short by a kill."""
    try:
        row = json.loads(line)
    except ValueError:
        return None
    return row if isinstance(row, dict) else None


def remove_partial_saves(folder):
    """Delete the temp files of checkpoint writes that a kill cut short (sit.atomic_write's
    .ckpt.pt.*.tmp, each as large as a checkpoint), so that preemptions do not fill the disk."""
    for name in os.listdir(folder) if os.path.isdir(folder) else ():
        if name.startswith(".ckpt.pt.") and name.endswith(".tmp"):
            os.remove(os.path.join(folder, name))


class Log:
    """log.jsonl in the run folder: one JSON object per log step and per epoch (rank 0 only)."""

    def __init__(self, path, enabled, keep_until_step=-1):
        self.path, self.enabled = path, enabled
        if enabled and os.path.exists(path):
            # Resuming: drop lines of steps the resumed run will do again (a fresh start: all).
            with open(path) as f:
                rows = [row_of(l) for l in f]
            lines = [json.dumps(r) + "\n" for r in rows if r is not None and r.get("step", 0) <= keep_until_step]
            sit.atomic_write(path, lambda f: f.write("".join(lines).encode()))

    def write(self, **row):
        if self.enabled:
            with open(self.path, "a") as f:
                f.write(json.dumps(row) + "\n")


# ------------------------------------------------------------------------------------------------
# Interruption: a signal asks the loop to save and stop at the next step boundary
# ------------------------------------------------------------------------------------------------

class StopFlag:
    """Within `with StopFlag() as stop:`, SIGINT/SIGTERM set stop.signal; a second one stops at once.

    A repeat within `repeat_s` of the first is the same request delivered twice, not a second one:
    under torchrun a terminal's Ctrl-C (or SLURM's SIGTERM) reaches each worker directly and again
    through the launcher, which forwards it.
    """
    repeat_s = 1.0

    def __init__(self, enabled=True):
        self.signal, self.enabled, self.previous, self.at = None, enabled, {}, None

    def __enter__(self):
        if self.enabled:
            self.previous = {s: signal.signal(s, self._handle) for s in (signal.SIGINT, signal.SIGTERM)}
        return self

    def __exit__(self, *exc):
        for s, handler in self.previous.items():
            signal.signal(s, handler)

    def _handle(self, signum, frame):
        if self.signal is None:
            self.signal, self.at = signum, time.monotonic()
        elif time.monotonic() - self.at > self.repeat_s:
            raise KeyboardInterrupt


# ------------------------------------------------------------------------------------------------
# The run
# ------------------------------------------------------------------------------------------------

class Trainer:
    """The state of one run (model, step, generator, data, progress) and its epoch loop."""

    def __init__(self, cfg, rank, world, device):
        self.cfg, self.rank, self.world, self.device = cfg, rank, world, device
        self.train_set, self.bank, self.test_set = load_training_data(cfg)
        torch.manual_seed(cfg.seed)
        self.model = sit.SiT(cfg).to(device)                       # the plain module (checkpoints)
        if world > 1:
            for t in self.model.state_dict().values():              # the same start on every rank
                dist.broadcast(t, src=0)
            if device.type == "cuda":  # heads' batch norm over the global batch (CUDA only in torch)
                for part in (self.model.student, self.model.teacher):
                    part.head = torch.nn.SyncBatchNorm.convert_sync_batchnorm(part.head)
        self.steps_per_epoch = len(self.train_set) // cfg.batch_size
        self.gen = torch.Generator(device=device).manual_seed(cfg.seed + rank)
        self.train_step = Step(self.model, cfg, self.train_set.mean, self.train_set.std, self.steps_per_epoch,
                               device, self.gen, world)
        self.step, self.epoch = 0, 0
        self.budget_pending, self.budget_mark = bool(cfg.time_budget), None  # epochs still to fit?
        self.saved_at, self.monitor_seconds, self.started = time.time(), 0.0, time.time()
        if cfg.resume:
            self.restore(os.path.join(cfg.out, "ckpt.pt"))
        if cfg.compile:  # CUDA graphs for one process only: the collectives of torchrun stay outside
            self.train_step.compile(cfg.cuda_graphs and world == 1)
        self.images = self.train_set.images.to(device) if self.train_set.images is not None else None
        if rank == 0:
            remove_partial_saves(cfg.out)
            write_json(os.path.join(cfg.out, "config.json"), cfg.to_dict())
        self.log = Log(os.path.join(cfg.out, "log.jsonl"), rank == 0, self.step if cfg.resume else -1)

    def restore(self, path):
        _, loaded, ckpt = sit.load_checkpoint(path, self.device)
        self.model.load_state_dict(loaded.state_dict())
        self.step, self.epoch = ckpt["step"], ckpt["epoch"]
        self.budget_pending &= ckpt["extra"].get("budget_pending", False)  # stopped before it was fitted
        self.train_step.load_optimizer_state_dict(ckpt["optimizer"], self.step)
        states = ckpt["extra"].get("generators") or [ckpt["extra"]["generator"]]
        if len(states) == self.world:  # every rank's augmentation/corruption/drop-path stream
            self.gen.set_state(states[self.rank].cpu())
        else:  # another number of processes: a fresh, still seeded, stream per rank
            self.gen.manual_seed(self.cfg.seed + self.rank + 1_000_003 * self.step)
            print(f"resuming with {self.world} processes a run saved by {len(states)}: the random streams "
                  f"start afresh (seeded), so the run is not an exact continuation", file=sys.stderr)
        print(f"resuming {self.cfg.out} at epoch {self.epoch}, step {self.step}")

    def save(self):
        """Write ckpt.pt (rank 0) with every rank's generator state (a collective under torchrun).

        A write that fails (disk full, no permission) stops the run with one line; the previous
        checkpoint stays whole (the new one is written beside it, then renamed over it).
        """
        states = [self.gen.get_state()]
        if self.world > 1:
            states = [None] * self.world
            dist.all_gather_object(states, self.gen.get_state())
        path = os.path.join(self.cfg.out, "ckpt.pt")
        if self.rank == 0:
            if self.step:
                check_finite(self.train_step.peek_loss(), self.step)    # never save weights gone bad
            try:
                extra = dict(generator=states[0], generators=states, budget_pending=self.budget_pending)
                sit.save_checkpoint(path, self.cfg, self.model, self.train_step.optimizer_state_dict(), self.step,
                                    self.epoch, extra=extra)
            except OSError as e:
                raise SystemExit(f"train.py: error: could not write {path} ({e.strerror or e}); the previous "
                                 f"checkpoint is kept: free space or fix the folder, then --resume") from None
        self.saved_at = time.time()

    def knn(self):
        """k-NN monitor (rank 0, labelled data only): print and log the teacher's k-NN top-1."""
        if self.test_set is None or self.rank != 0:
            return
        t = time.time()
        acc = knn_monitor(self.model, self.bank, self.test_set, self.cfg)
        tqdm.write(f"epoch {self.epoch}: k-NN {acc:.2f}%")
        self.log.write(kind="epoch", step=self.step, epoch=self.epoch, knn=acc)
        self.monitor_seconds += time.time() - t

    def run(self):
        """Epochs until the end or a stop signal; returns the exit code."""
        cfg = self.cfg
        self.saved_at, self.monitor_seconds, self.started = time.time(), 0.0, time.time()
        if self.step == 0:
            self.knn()                                             # random init
        with StopFlag() as stop:
            while self.epoch < cfg.epochs:
                signum = self.run_epoch(stop)
                if signum:
                    self.save()
                    if self.rank == 0:
                        print(f"interrupted: saved {os.path.join(cfg.out, 'ckpt.pt')} at step {self.step}; "
                              f"continue with --resume", file=sys.stderr)
                    return 128 + signum
                self.epoch += 1
                self.save()
                if self.epoch == cfg.epochs or (cfg.knn_every and self.epoch % cfg.knn_every == 0):
                    self.knn()
        if self.world > 1:
            check_replicas(self.model, self.log)
        return 0

    def advance(self, x):
        """One training step on the uint8 batch x; the first compiled one says how long compiling took."""
        first = self.train_step.compile_seconds is None
        self.train_step(x)
        self.step += 1
        if first and self.train_step.compile_seconds is not None and self.rank == 0:
            tqdm.write(f"compiled the training step in {self.train_step.compile_seconds:.1f} s "
                       f"({graph_count()} graph(s))")

    def at_boundary(self, stop):
        """(signal number or 0, save now?) at this step boundary. Under torchrun the ranks agree on
        both at log steps only, with one all-reduce of two numbers where the loop syncs anyway: a
        signal to any rank stops all of them at the same step."""
        signum = stop.signal or 0
        save = self.cfg.save_every > 0 and time.time() - self.saved_at >= 60 * self.cfg.save_every
        if self.world > 1:
            if self.step % self.cfg.log_every:
                return 0, False
            flags = torch.tensor([signum, int(save)], device=self.device)
            dist.all_reduce(flags, op=dist.ReduceOp.MAX)
            signum, save = flags.tolist()
        return signum, bool(save)

    def run_epoch(self, stop):
        """Train from self.step to the epoch's end; returns the signal that stopped it, else 0."""
        cfg, n = self.cfg, self.steps_per_epoch
        start = self.step - self.epoch * n
        batches = data.epoch_batches(self.train_set, self.images, cfg.batch_size, self.epoch, cfg.seed,
                                     start, self.rank, self.world, cfg.workers)
        totals, lr = torch.zeros(3, dtype=torch.float64), sit.lr_at(self.step, cfg, n)
        t_epoch, t0, n_window = time.time(), time.time(), 0
        with tqdm(total=n, initial=start, desc=f"epoch {self.epoch + 1}/{cfg.epochs}", disable=self.rank != 0,
                  dynamic_ncols=True, leave=False) as bar:            # closed, and cleared, however it ends
            for x in batches:
                self.advance(x.to(self.device, non_blocking=True))
                n_window += 1
                bar.update(1)
                if self.step % cfg.log_every == 0 or self.step % n == 0:
                    sums = torch.tensor(self.train_step.read_losses(), dtype=torch.float64)  # the only host sync
                    totals += sums
                    loss, recons, contr = (sums / n_window).tolist()
                    check_finite(loss, self.step)
                    img_s = n_window * cfg.batch_size / (time.time() - t0)
                    lr = sit.lr_at(self.step - 1, cfg, n)
                    bar.set_postfix_str(f"loss {loss:.4f} rec {recons:.4f} con {contr:.4f} lr {lr:.2e} "
                                        f"{img_s:,.0f} img/s")
                    self.log.write(kind="step", step=self.step, epoch=self.step / n, loss=loss, loss_recons=recons,
                                   loss_contr=contr, lr=lr, wd=sit.weight_decay_at(self.step - 1, cfg, n),
                                   momentum=sit.momentum_at(self.step - 1, cfg, n), img_s=img_s)
                    t0, n_window = time.time(), 0
                if cfg.time_budget and self.budget_pending:
                    self.fit_budget()
                signum, save = self.at_boundary(stop)
                if signum:
                    return signum
                if save and self.step % n:                           # mid-epoch (epoch ends save anyway)
                    self.save()
        loss, recons, contr = (totals / max(n - start, 1)).tolist()
        seconds = time.time() - t_epoch
        img_s = (n - start) * cfg.batch_size / seconds
        if self.rank == 0:
            tqdm.write(f"epoch {self.epoch + 1:4d}/{cfg.epochs}  loss {loss:.4f}  recons {recons:.4f}  "
                       f"contr {contr:.4f}  lr {lr:.2e}  {seconds:6.1f} s  {img_s:8,.0f} img/s")
        self.log.write(kind="epoch", step=self.step, epoch=self.epoch + 1, loss=loss, loss_recons=recons,
                       loss_contr=contr, lr=lr, seconds=seconds, img_s=img_s, graphs=graph_count())
        return 0

    # --- --time-budget: the epochs that the budget buys, from the measured speed ------------------

    def fit_budget(self):
        """Once the step time is known (after compiling, over >= 10 steps and >= 5 s or 5% of the
        budget), set cfg.epochs to what fits and rewrite the schedules for it (in place: no
        recompile). --epochs is the upper bound. Time spent in the k-NN monitor is not counted."""
        if self.budget_mark is None:
            if self.train_step.compiled and self.train_step.compile_seconds is None:
                return
            self.budget_mark = (self.step, time.time(), self.monitor_seconds)
            return
        step0, t0, mon0 = self.budget_mark
        spent = time.time() - t0 - (self.monitor_seconds - mon0)
        ready = self.step - step0 >= 10 and spent >= min(5.0, 0.05 * 60 * self.cfg.time_budget)
        if self.world > 1:  # each rank has its own clock: they decide together, at log steps (as at_boundary)
            if self.step % self.cfg.log_every:
                return
            ready = torch.tensor(int(ready), device=self.device)
            dist.all_reduce(ready, op=dist.ReduceOp.MAX)
        if not ready:
            return
        sync(self.device)
        spent = time.time() - t0 - (self.monitor_seconds - mon0)
        step_s = spent / (self.step - step0)
        left = 60 * self.cfg.time_budget - (time.time() - self.started - self.monitor_seconds)
        epochs = torch.tensor((self.step + left / step_s) // self.steps_per_epoch, device=self.device)
        if self.world > 1:
            dist.all_reduce(epochs, op=dist.ReduceOp.MIN)
        epochs = int(min(max(epochs.item(), self.epoch + 1), self.cfg.epochs))
        self.cfg.epochs = epochs
        self.train_step.set_schedule(sit.schedule_table(self.cfg, self.steps_per_epoch))
        self.budget_pending = False
        if self.rank == 0:
            write_json(os.path.join(self.cfg.out, "config.json"), self.cfg.to_dict())
            tqdm.write(f"time budget {self.cfg.time_budget:g} min at {self.cfg.batch_size / step_s:,.0f} img/s "
                       f"({step_s * 1e3:.1f} ms/step) buys {epochs} epochs")
        self.log.write(kind="budget", step=self.step, epochs=epochs, img_s=self.cfg.batch_size / step_s)


def graph_count():
    """Graphs torch.compile has made in this process (more than expected means recompiles)."""
    return int(torch._dynamo.utils.counters["stats"]["unique_graphs"])


def check_finite(loss, step):
    if not math.isfinite(loss):
        raise SystemExit(f"train.py: error: loss is {loss} at step {step}; stopped. The last good "
                         f"checkpoint is kept; try a lower --lr or --clip-grad")


def check_replicas(sit_model, log):
    """After data-parallel training every rank must hold the same student; log the largest difference."""
    flat = torch.cat([p.detach().float().flatten() for p in sit_model.student.parameters()])
    ref = flat.clone()
    dist.broadcast(ref, src=0)
    diff = (flat - ref).abs().max()
    dist.all_reduce(diff, op=dist.ReduceOp.MAX)
    log.write(kind="replicas", max_abs_diff=diff.item(), world=dist.get_world_size())


# ------------------------------------------------------------------------------------------------
# Benchmark: the real loop's step on synthetic data of the configured size
# ------------------------------------------------------------------------------------------------

def count_flops(cfg, device, x, mean, std):
    """FLOPs of one forward + backward of the model (torch.utils.flop_counter), inputs excluded."""
    from torch.utils.flop_counter import FlopCounterMode
    model = sit.SiT(cfg).to(device)
    clean, corrupted, mask = make_inputs(x, cfg, mean, std, torch.Generator(device=device).manual_seed(0))
    with FlopCounterMode(display=False) as counter:
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=device.type == "cuda"):
            loss = model(clean, corrupted, mask)["loss"]
        loss.backward()
    return counter.get_total_flops()


def sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    elif device.type == "mps":
        torch.mps.synchronize()


def bench(cfg, device):
    """Time cfg.bench steps of the training loop's own step (Trainer.advance) on random images."""
    torch.manual_seed(cfg.seed)
    gen = torch.Generator(device=device).manual_seed(cfg.seed)
    images = torch.randint(0, 256, (cfg.batch_size, 3, cfg.img_size, cfg.img_size), dtype=torch.uint8,
                           device=device, generator=gen)
    mean, std = data.IMAGENET_STATS
    flops = count_flops(cfg, device, images, mean, std)
    step = Step(sit.SiT(cfg).to(device), cfg, mean, std, 100, device, gen)  # the loop's own step
    if cfg.compile:
        step.compile(cfg.cuda_graphs)
    t = time.perf_counter()
    for _ in range(3 if not cfg.compile else 10):                    # warm-up (and compilation)
        step(images)
    sync(device)
    warm_s = time.perf_counter() - t
    cuda = device.type == "cuda"
    if cuda:
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
    host, t = 0.0, time.perf_counter()
    for _ in range(cfg.bench):
        h = time.perf_counter()
        step(images)
        host += time.perf_counter() - h
    if cuda:
        end.record()
    sync(device)
    step_s = (time.perf_counter() - t) / cfg.bench
    device_ms = start.elapsed_time(end) / cfg.bench if cuda else float("nan")
    check_finite(step.read_losses()[0], cfg.bench)
    name = torch.cuda.get_device_name(device) if cuda else device.type
    tflops = flops / step_s / 1e12
    print(f"bench {cfg.model} ({cfg.dim}/{cfg.depth}/{cfg.heads}) P{cfg.patch_size} {cfg.img_size}px "
          f"batch {cfg.batch_size} {'compiled' if cfg.compile else 'eager'} on {name}: "
          f"{cfg.batch_size / step_s:,.0f} img/s, {step_s * 1e3:.1f} ms/step, {tflops:.3g} TFLOP/s, "
          f"MFU {100 * tflops / cfg.peak_tflops:.3g}% of {cfg.peak_tflops:g}; host {host / cfg.bench * 1e3:.2f} "
          f"ms/step, device {device_ms:.2f} ms/step (CUDA events), {graph_count()} compiled graph(s), "
          f"warm-up{' and compilation' if cfg.compile else ''} {warm_s:.1f} s")


def setup(argv):
    """Checked configuration and run folder; every problem here is a RunError-like ValueError."""
    cfg = parse_args(argv)
    cfg.out = cfg.out or os.path.join("runs", os.path.basename(os.path.normpath(cfg.dataset)))
    if cfg.warmup_epochs >= cfg.epochs and not cfg.time_budget:
        print(f"train.py: note: --warmup-epochs {cfg.warmup_epochs:g} >= --epochs {cfg.epochs}: the learning "
              f"rate never reaches its peak (try --warmup-epochs {max(cfg.epochs / 10, 0.5):g})", file=sys.stderr)
    if not cfg.bench:
        check_run_folder(cfg)                                        # a run that never saved: afresh
    if cfg.resume and not cfg.bench:                                 # the run's own recipe; only where
        saved = sit.load_checkpoint(os.path.join(cfg.out, "ckpt.pt"))[0]  # and how it runs may change
        keep = ("device", "compile", "cuda_graphs", "resume", "knn_every", "log_every", "workers", "data_dir",
                "out", "save_every")
        cfg = sit.Config.from_dict({**saved.to_dict(), **{k: getattr(cfg, k) for k in keep}})
    return cfg


def out_of_memory(cfg):
    return (f"train.py: error: out of GPU memory with --batch-size {cfg.batch_size} ({cfg.model}, "
            f"{cfg.img_size} px, patch {cfg.patch_size}); lower --batch-size (the lr scales with it), or use "
            f"a smaller --model or --img-size; the last checkpoint is kept")


def main(argv=None):
    cfg = None
    try:
        try:  # set-up: a mistake in the input is one line on stderr and exit code 2
            cfg = setup(argv)
            if cfg.bench:
                device = sit.pick_device(cfg.device)
                cfg.compile = device.type == "cuda" if cfg.compile is None else cfg.compile
                torch.set_float32_matmul_precision("high")
                return bench(cfg, device)
            rank, world, device = init_distributed(cfg)
            cfg.compile = device.type == "cuda" if cfg.compile is None else cfg.compile
            torch.set_float32_matmul_precision("high")
            trainer = Trainer(cfg, rank, world, device)
        except ValueError as e:  # RunError, DataError, CheckpointError, Config's and device checks
            print(f"train.py: error: {e}", file=sys.stderr)
            return 2
        return trainer.run()
    except torch.cuda.OutOfMemoryError:
        print(out_of_memory(cfg), file=sys.stderr)
        return 1
    except OSError as e:  # log.jsonl or config.json on a full or read-only disk
        print(f"train.py: error: could not write {e.filename or 'to the run folder'} ({e.strerror or e}); "
              f"the last checkpoint is kept", file=sys.stderr)
        return 1
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()


if __name__ == "__main__":
    sys.exit(main())
