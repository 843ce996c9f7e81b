"""Self-supervised SiT pretraining: one command on one GPU, small runs on a CPU, wide with torchrun.

    python train.py --dataset cifar10                       # one GPU (or CPU/MPS), downloads CIFAR-10
    torchrun --nproc_per_node=4 train.py --dataset cifar10  # several GPUs (data parallel), same flags
    python train.py --bench 50                              # throughput of the training step
    python train.py --dataset fashion-mnist --time-budget 6 --epochs 1000   # the best 6 minutes buy

`train_step`, first below, is one whole step as one plain function of device tensors; the flat loop
(`train`) compiles it as it is (by default with CUDA: one graph, replayed as a CUDA graph) and saves
ckpt.pt at every epoch end, every --save-every minutes and on Ctrl-C or SIGTERM (any rank), so that
--resume loses nothing it could keep. The machinery around it is in runtime.py.
"""
import copy
import math
import os
import sys
import time

import torch
import torch.distributed as dist
from tqdm import tqdm

import data
import rng
import runtime
import sit
from eval import features, knn_accuracy


def train_step(model, opt, x, mean, std):
    """One step on a uint8 batch x (B, C, S, S): two views, GMML, L_total, backward, clipping, AdamW,
    teacher EMA. Nothing leaves the device: this step's lr, weight decay and teacher momentum are
    a column of opt.schedule (at opt.step, a device counter), the random numbers come from rng
    (drawn before the step), the losses add up in opt.sums. An update whose gradient or learning rate is not
    finite is skipped, changing nothing, and counted (as AMP's grad scaler does)."""
    cfg = model.cfg
    lr, wd, m = opt.schedule[:, opt.step.view(1)].view(3)                    # this step's column of (3, T + 1)
    clean = data.two_views(x, cfg.img_size, mean, std, cfg.crop_min)         # (2B, 3, H, W): [view 1; view 2]
    corrupted, mask = model.corrupt(clean)                                   # GMML; mask (2B, 1, H, W)
    with torch.autocast(x.device.type, torch.bfloat16, enabled=opt.bf16):
        out = model(clean, corrupted, mask)                                  # L_total = alpha L_recons + L_contr
    grads = list(torch.autograd.grad(out["loss"], opt.params))
    if opt.world > 1:
        all_reduce_mean_(grads)                                              # data parallel, one all-reduce
    norms = torch.stack(torch._foreach_norm(grads))                         # (n,) one per tensor
    ok = norms.sum().isfinite() & lr.isfinite() & wd.isfinite()
    clip_grad_norm_(grads, cfg.clip_grad, cfg.clip_mode == "per-tensor", norms, ok)   # all 0 if not ok
    adamw_(opt, grads, lr, wd, ok)
    model.update_teacher(torch.where(ok, m, 1.0))                            # theta_t <- m theta_t + (1 - m) theta_s
    opt.step += 1
    losses = torch.stack([out["loss"], out["loss_recons"], out["loss_contr"]]).detach().float()
    bad_loss = ~losses.isfinite().all()                                      # stops the run at the next log step
    opt.sums += torch.cat([torch.where(ok, losses, 0.0), (~ok).float().view(1), bad_loss.float().view(1)])


# === The step's parts: AdamW and its state, clipping, the data-parallel all-reduce

class AdamW:
    """The step's state on the device: AdamW's moments and updates done t, steps done (the schedule's
    column), the schedule (3, T + 1), and the sums (loss, recons, contr, skipped steps, steps with a
    non-finite loss) since the last read. No weight decay on biases, norm weights, the CLS token and
    the position embedding. state_dict() is torch.optim.AdamW's."""

    def __init__(self, model, schedule, device, world=1, bf16=False):
        decay, no_decay = [], []
        for name, p in model.student.named_parameters():
            (no_decay if p.ndim <= 1 or name.endswith(("cls_token", "pos_embed")) else decay).append(p)
        self.decay, self.params, self.world, self.bf16 = decay, decay + no_decay, world, bf16
        self.exp_avg = [torch.zeros_like(p) for p in self.params]
        self.exp_avg_sq = [torch.zeros_like(p) for p in self.params]
        self.t, self.step = (torch.zeros((), dtype=torch.long, device=device) for _ in range(2))
        self.schedule, self.sums = schedule.to(device), torch.zeros(5, device=device)

    def read(self, reset=True):
        """(loss, recons, contr) summed, steps skipped, steps with a non-finite loss since the last read
        (a host sync); resets them."""
        *sums, skipped, bad = self.sums.tolist()
        if reset:
            self.sums.zero_()
        return sums, int(skipped), int(bad)

    def state_dict(self):
        state = {i: dict(step=self.t.float().cpu(), exp_avg=m, exp_avg_sq=v)
                 for i, (m, v) in enumerate(zip(self.exp_avg, self.exp_avg_sq))}
        lr, wd, _ = self.schedule[:, min(int(self.step), self.schedule.shape[1] - 1)].tolist()   # as of now
        groups = [dict(params=list(range(len(self.decay))), weight_decay=wd),
                  dict(params=list(range(len(self.decay), len(self.params))), weight_decay=0.0)]
        return dict(state=state, param_groups=[dict(g, lr=lr, betas=(0.9, 0.999), eps=1e-8, amsgrad=False)
                                               for g in groups])

    def load_state_dict(self, sd, step):
        if len(sd["state"]) != len(self.params):
            raise runtime.CheckpointError("the checkpoint's optimizer state does not match the model")
        for i, (m, v) in enumerate(zip(self.exp_avg, self.exp_avg_sq)):
            m.copy_(sd["state"][i]["exp_avg"])
            v.copy_(sd["state"][i]["exp_avg_sq"])
        self.t.fill_(int(sd["state"][0]["step"]))                       # one count for all: written so above
        self.step.fill_(step)


def adamw_(opt, grads, lr, wd, ok, betas=(0.9, 0.999), eps=1e-8):
    """AdamW (Loshchilov and Hutter) as torch.optim.AdamW, over lists of tensors with 0-dim lr, wd and
    step count (torch.optim's step() would break the graph). ok False (grads then 0): nothing changes."""
    with torch.no_grad():
        b1, b2 = betas
        opt.t.add_(ok.long())
        t = opt.t.clamp(min=1)
        torch._foreach_mul_(opt.decay, torch.where(ok, 1 - lr * wd, 1.0))         # decoupled weight decay
        torch._foreach_lerp_(opt.exp_avg, grads, [torch.where(ok, 1 - b1, 0.0)] * len(grads))  # m <- b1 m + (1 - b1) g
        torch._foreach_mul_(opt.exp_avg_sq, torch.where(ok, b2, 1.0))            # v <- b2 v + (1 - b2) g^2
        torch._foreach_addcmul_(opt.exp_avg_sq, grads, grads, value=1 - b2)
        denom = torch._foreach_sqrt(opt.exp_avg_sq)
        torch._foreach_div_(denom, (1 - b2 ** t).sqrt())
        torch._foreach_add_(denom, eps)                                          # sqrt(v / (1 - b2^t)) + eps
        # p <- p - lr m / (1 - b1^t) / denom; a step size of 0 (not ok, or lr 0) divides denom to inf: p + 0
        torch._foreach_div_(denom, torch.where(ok, -lr / (1 - b1 ** t), 0.0))
        torch._foreach_addcdiv_(opt.params, opt.exp_avg, denom)


def clip_grad_norm_(grads, max_norm, per_tensor=False, norms=None, ok=True):
    """Scale `grads` in place so that their L2 norm is at most `max_norm` (0: no clipping), without a host
    sync; ok False (a step to skip): to 0, non-finite values included. norms: the tensors' norms, if known.

    Differs from the reference code (per_tensor: each parameter tensor clipped on its own): one
    global norm, the usual choice, keeps the update's direction.
    """
    with torch.no_grad():
        norms = torch.stack(torch._foreach_norm(grads)) if norms is None else norms   # (n,)
        total = norms if per_tensor else torch.linalg.vector_norm(norms)
        scale = (max_norm / (total + 1e-6)).clamp(max=1.0) if max_norm > 0 else norms.new_ones(())
        scale = torch.where(torch.as_tensor(ok), scale, 0.0)                      # () or (n,) per tensor
        for g in grads:
            g.nan_to_num_(0.0, 0.0, 0.0)                                         # so that 0 x g is 0
        torch._foreach_mul_(grads, list(scale.unbind()) if scale.ndim else scale)


def all_reduce_mean_(tensors):
    """Average `tensors` over all processes in place, as one flat all-reduce (what DDP does in buckets)."""
    flat = torch.cat([t.reshape(-1) for t in tensors])
    dist.all_reduce(flat)
    flat /= dist.get_world_size()
    for t, f in zip(tensors, flat.split([t.numel() for t in tensors])):
        t.copy_(f.view_as(t))


# === Around the step: its random numbers, compiling it, its schedules

def uniforms_per_step(cfg, x_shape):
    """How many numbers one step draws: its random parts run once, counting, on the meta device."""
    with torch.device("meta"):
        model, x, stats = sit.SiT(cfg), torch.zeros(x_shape, dtype=torch.uint8), data.stats("")
        return rng.count(lambda: model.student.backbone(model.corrupt(
            data.two_views(x, cfg.img_size, *stats, cfg.crop_min))[0]))


def stepper(model, opt, u, generator, mean, std, compile_=False, cuda_graphs=False, backend="inductor", say=False):
    """run(x): draw the step's numbers into u from `generator`, then train_step, compiled or not.
    run.compile_seconds: how long the first compiled step took (None until then; said if `say`)."""
    fn, options = train_step, dict(backend=backend)
    if compile_:
        if hasattr(torch._dynamo.config, "trace_autograd_ops"):
            torch._dynamo.config.trace_autograd_ops = True               # autograd.grad inside the graph
        if cuda_graphs and u.device.type == "cuda":
            options["mode"] = "reduce-overhead"                         # replayed as a CUDA graph
            for t in [opt.t, opt.step, opt.schedule, opt.sums, u, *opt.exp_avg, *opt.exp_avg_sq, *model.buffers()]:
                torch._dynamo.mark_static_address(t)                    # mutated in place by the graph
        fn = torch.compile(train_step, fullgraph=opt.world == 1, **options)

    def run(x):
        run.u.uniform_(generator=generator)
        t0 = time.perf_counter()
        with rng.source(run.u):
            if not compile_ or run.compile_seconds is not None:
                return run.fn(model, opt, x, mean, std)
            try:
                run.fn(model, opt, x, mean, std)
            except torch._dynamo.exc.Unsupported as e:
                print(f"train.py: note: this torch cannot compile the whole step as one graph "
                      f"({str(e).splitlines()[0]}); compiling it in pieces", file=sys.stderr)
                torch._dynamo.reset()
                run.fn = torch.compile(train_step, **options)
                run.fn(model, opt, x, mean, std)
        runtime.sync(x.device)
        run.compile_seconds = time.perf_counter() - t0
        if say:
            tqdm.write(f"compiled the training step in {run.compile_seconds:.1f} s ({runtime.graph_count()} graph(s))")
    run.fn, run.u, run.compile_seconds = fn, u, None
    return run


def schedule_for(cfg, spe, total, current=None, step=0):
    """sit.schedules for `total` steps. Resized mid-run (`current`, the table in use, at `step`), the past is
    kept and each schedule goes on from where it is with a half cosine to its end value at the new end
    (the lr after its warm-up)."""
    new = sit.schedules(cfg, spe, total)
    if current is None or step == 0:
        return new
    for row, start in enumerate([max(step, int(cfg.warmup_epochs * spe)), step, step]):
        if start < total:
            s = torch.arange(total + 1 - start) / (total - start)
            now, end = current[row, min(start, current.shape[1] - 1)], new[row, -1]
            new[row, :start] = current[row, :start] if start < current.shape[1] else new[row, :start]
            new[row, start:] = end + (now - end) * 0.5 * (1 + torch.cos(math.pi * s))
    return new


# === The run: set-up, then a flat loop over steps

def configure(argv):
    """(cfg, run, given, checkpoint to resume or None): the checked command line and run folder."""
    cfg, run, given = runtime.parse_train_args(argv)
    ckpt, resumed = os.path.join(run.out, "ckpt.pt"), None
    if run.bench:
        return cfg, run, given, None
    if os.path.isfile(ckpt):
        if not run.resume:
            raise ValueError(f"{run.out} already holds a run; add --resume to continue it or choose another --out")
        resumed = runtime.load_checkpoint(ckpt)[1:]                     # (SiT on the CPU, checkpoint dict)
        if resumed[1].get("left_out"):
            raise ValueError(f"{ckpt} is a released model (no optimizer state, no projection heads): it can be "
                             f"evaluated and visualized, not resumed")
        saved = resumed[1]["config"]
        if saved.get("recipe") and "recipe" not in given:             # how it runs: as its recipe says
            argv = sys.argv[1:] if argv is None else argv
            cfg, run, given = runtime.parse_train_args(["--recipe", saved["recipe"], *argv])
        cfg, run = runtime.resumed_config(saved, cfg, run, given)
    elif os.path.exists(os.path.join(run.out, "config.json")):          # killed before its first save
        if os.environ.get("RANK", "0") == "0":
            print(f"train.py: note: {run.out} holds a run that never saved a checkpoint; starting it afresh",
                  file=sys.stderr)
        run.resume = False
    elif run.resume:
        raise ValueError(f"--resume: no checkpoint to resume at {ckpt}")
    if cfg.warmup_epochs >= cfg.epochs and not run.time_budget and os.environ.get("RANK", "0") == "0":
        print(f"train.py: note: --warmup-epochs {cfg.warmup_epochs:g} >= --epochs {cfg.epochs}: the learning "
              f"rate never reaches its peak (try --warmup-epochs {max(cfg.epochs / 10, 0.5):g})", file=sys.stderr)
    return cfg, run, given, resumed


def load_training_data(cfg, run):
    """(pretraining images, k-NN bank, k-NN queries); the last two are None for unlabelled data.
    The bank is the labelled train split (the pretraining images themselves when labelled)."""
    try:
        train = data.load(run.dataset, run.data_dir, train=True, limit=run.limit, pretrain=True, size=cfg.img_size)
        bank = test = None
        if train.labels is not None or run.dataset == "stl10":
            bank = train if train.labels is not None else data.load(run.dataset, run.data_dir, train=True,
                                                                    limit=run.limit, size=cfg.img_size)
            test = data.load(run.dataset, run.data_dir, train=False, size=cfg.img_size)
    except (OSError, RuntimeError) as e:  # typically a failed download (a DataError passes: a ValueError)
        raise ValueError(f"could not load {run.dataset} into {run.data_dir}: {str(e).splitlines()[0]}") from None
    if train.skipped:
        print(f"skipped {train.skipped} unreadable image files", file=sys.stderr)
    if len(train) < cfg.batch_size:
        raise ValueError(f"--batch-size {cfg.batch_size} is larger than the dataset ({len(train)} images)")
    return train, bank, test


def train(cfg, run, resumed, rank, world, device, train_set, bank, test_set):
    """Pretrain to the last step or a stop signal; returns the exit code."""
    spe, path = len(train_set) // cfg.batch_size, os.path.join(run.out, "ckpt.pt")   # spe: steps per epoch
    torch.manual_seed(run.seed)
    model = sit.SiT(cfg).to(device)                                     # the plain module (checkpoints)
    if world > 1:
        for t in model.state_dict().values():                           # the same start on every rank
            dist.broadcast(t, src=0)
        if device.type == "cuda":  # heads' batch norm over the global batch (CUDA only in torch)
            for part in (model.student, model.teacher):
                part.head = torch.nn.SyncBatchNorm.convert_sync_batchnorm(part.head)
    gen = torch.Generator(device=device).manual_seed(run.seed + rank)
    step, total, pending = 0, cfg.epochs * spe, bool(run.time_budget)  # pending: the budget is still to fit
    opt = AdamW(model, sit.schedules(cfg, spe, total), device, world, runtime.bf16(run, device, cfg.dim))
    if resumed:
        step, total, pending, schedule = restore(resumed, cfg, run, model, opt, gen, rank, world, spe)
        opt.schedule = schedule.to(device)
    mean, std = train_set.mean, train_set.std
    images = train_set.images.to(device) if train_set.images is not None else None
    u = torch.empty(uniforms_per_step(cfg, (cfg.batch_size // world, 3, cfg.img_size, cfg.img_size)), device=device)
    step_fn = stepper(model, opt, u, gen, mean, std, run.compile, run.cuda_graphs and world == 1, say=rank == 0)
    if rank == 0:
        runtime.remove_partial_saves(run.out)
        runtime.write_json(os.path.join(run.out, "config.json"), {**vars(cfg), **vars(run), "total_steps": total})
    log = runtime.Log(os.path.join(run.out, "log.jsonl"), rank == 0, step if run.resume else -1)
    budget, saved_at = runtime.Budget(run.time_budget), time.time()
    window, t_log, t_epoch, epoch_start = 0, time.time(), time.time(), step
    epoch_sums = torch.zeros(3, dtype=torch.float64)                   # loss, recons, contr over the epoch

    def save():
        """ckpt.pt (rank 0) with every rank's random stream; never weights that are not finite."""
        check_finite(opt.read(reset=False)[2], step)
        if not torch.stack(torch._foreach_norm(list(model.parameters()))).isfinite().all():
            raise SystemExit(f"train.py: error: the weights are not finite at step {step}; stopped without saving "
                             f"them. The last good checkpoint is kept; try a lower --lr or --clip-grad")
        states = [gen.get_state()]
        if world > 1:
            states = [None] * world
            dist.all_gather_object(states, gen.get_state())
        if rank == 0:
            runtime.save_checkpoint_or_exit(path, cfg, model, opt.state_dict(), step, step // spe,
                                            dict(generators=states, budget_pending=pending, total_steps=total,
                                                 schedule=opt.schedule[:, :total + 1].cpu()), run)
        if world > 1:       # no rank ends before the file is written: torchrun stops the others when one ends
            dist.barrier()
        return time.time()

    def knn():
        """k-NN of the teacher's CLS features (rank 0, labelled data): printed, logged, not in the budget."""
        if test_set is not None and rank == 0:
            t, backbone = time.time(), model.teacher.backbone
            acc = knn_accuracy(features(backbone, bank.images, cfg.img_size, bank.mean, bank.std), bank.labels,
                               features(backbone, test_set.images, cfg.img_size, mean, std), test_set.labels,
                               test_set.num_classes)
            tqdm.write(f"epoch {step / spe:g}: k-NN {acc:.2f}%")
            log.write(kind="epoch", step=step, epoch=step / spe, knn=acc)
            budget.paused += time.time() - t

    if step == 0:
        knn()                                                           # at random init
    bar = tqdm(total=total, initial=step, disable=rank != 0, dynamic_ncols=True, leave=False, unit="step")
    with runtime.StopFlag() as stop, bar:
        while step < total:
            if step == epoch_start or step % spe == 0:                  # a new epoch (or the resumed one)
                batches = data.epoch_batches(train_set, images, cfg.batch_size, step // spe, run.seed, step % spe,
                                             rank, world, run.workers)
            step_fn(next(batches).to(device, non_blocking=True))
            step, window = step + 1, window + 1
            bar.update(1)
            end = step % spe == 0 or step == total                       # an epoch's end (or the run's)
            if step % run.log_every == 0 or end:                         # the loop's only host sync
                (loss, recons, contr), skipped, bad = opt.read()
                check_finite(bad, step)
                epoch_sums += torch.tensor([loss, recons, contr], dtype=torch.float64)
                loss, recons, contr = (v / max(window - skipped, 1) for v in (loss, recons, contr))
                img_s, (lr, wd, m) = window * cfg.batch_size / (time.time() - t_log), opt.schedule[:, step - 1].tolist()
                bar.set_postfix_str(f"epoch {step / spe:.2f} loss {loss:.4f} rec {recons:.4f} con {contr:.4f} "
                                    f"lr {lr:.2e} {img_s:,.0f} img/s" + (f" skipped {skipped}" if skipped else ""))
                log.write(kind="step", step=step, epoch=step / spe, loss=loss, loss_recons=recons, loss_contr=contr,
                          lr=lr, wd=wd, momentum=m, img_s=img_s, skipped=skipped)
                window, t_log = 0, time.time()
            ready = (pending or budget.fits) and (not run.compile or step_fn.compile_seconds is not None) \
                and budget.ready(step)
            signum = stop.signal or 0
            save_now = run.save_every and time.time() - saved_at >= 60 * run.save_every
            if world > 1:   # the ranks agree at log steps, where the loop syncs anyway
                agreed = runtime.agree([signum, save_now, ready], world, device) if step % run.log_every == 0 else None
                signum, save_now, ready = agreed or (0, False, False)
            if ready:
                total, pending = fit_budget(budget, step, total, cfg, spe, opt, world, device, log, rank, run)
                bar.total, end = total, step % spe == 0 or step == total
            if signum:
                save()
                if rank == 0:
                    print(f"interrupted: saved {path} at step {step}; continue with --resume", file=sys.stderr)
                return 128 + int(signum)
            if end:
                seconds, done = time.time() - t_epoch, step - epoch_start
                loss, recons, contr = (epoch_sums / done).tolist()
                if rank == 0:
                    tqdm.write(f"epoch {step / spe:7.2f}/{total / spe:g}  loss {loss:.4f}  recons {recons:.4f}  "
                               f"contr {contr:.4f}  {seconds:6.1f} s  {done * cfg.batch_size / seconds:8,.0f} img/s")
                log.write(kind="epoch", step=step, epoch=step / spe, loss=loss, loss_recons=recons, loss_contr=contr,
                          lr=lr, seconds=seconds, img_s=done * cfg.batch_size / seconds, graphs=runtime.graph_count())
                saved_at, epoch_sums, t_epoch, epoch_start = save(), epoch_sums.zero_(), time.time(), step
                if step == total or (run.knn_every and step % (run.knn_every * spe) == 0):
                    knn()
            elif save_now:
                saved_at = save()
    if world > 1:
        check_replicas(model, log)
    return 0


def restore(resumed, cfg, run, model, opt, gen, rank, world, spe):
    """The run's state from its checkpoint: (step, total steps, budget pending, schedule)."""
    loaded, ckpt, (old_total, total, pending) = resumed
    model.load_state_dict(loaded.state_dict())
    step, extra = ckpt["step"], ckpt["extra"]
    opt.load_state_dict(ckpt["optimizer"], step)
    states = extra.get("generators") or [extra["generator"]]
    if len(states) == world:  # every rank's augmentation/corruption/drop-path stream
        gen.set_state(states[rank].cpu())
    else:  # another number of processes: a fresh, still seeded, stream per rank
        gen.manual_seed(run.seed + rank + 1_000_003 * step)
        print(f"resuming with {world} processes a run saved by {len(states)}: the random streams start afresh "
              f"(seeded), so the run is not an exact continuation", file=sys.stderr)
    if rank == 0:
        print(f"resuming {run.out} at epoch {step // spe}, step {step}" + (
            f"; its schedules now end at step {total} instead of {old_total}" if total != old_total else ""))
    current = extra.get("schedule", sit.schedules(cfg, spe, old_total))   # the table the run used, if saved
    return step, total, pending, current if total == old_total else schedule_for(cfg, spe, total, current, step)


def resumed_length(ckpt, cfg, run, given, spe):
    """(steps the run was to do, steps it does now, budget still to fit) on --resume: --epochs and
    --time-budget may lengthen or shorten it; ValueError when nothing is left to do."""
    step, extra = ckpt["step"], ckpt["extra"]
    old_total = extra.get("total_steps", ckpt["config"]["epochs"] * spe)
    pending = bool(run.time_budget) if "time_budget" in given else extra.get("budget_pending", False)
    total = cfg.epochs * spe if "epochs" in given or pending else old_total   # a budget to fit: up to --epochs
    if total <= step:
        raise ValueError(f"the run in {run.out} has done its {step} steps ({step / spe:g} epochs); --resume with "
                         f"--epochs N (N > {step / spe:g}, and --time-budget MIN to fit it to a time) extends it")
    return old_total, total, pending


def fit_budget(budget, step, total, cfg, spe, opt, world, device, log, rank, run):
    """--time-budget: the steps that fit in what is left (at most the --epochs bound); the schedules are
    rewritten in place for them. Returns (total steps, False)."""
    runtime.sync(device)
    left, step_s = budget.steps_left(step)
    new = int(runtime.agree([min(step + max(left, 1), cfg.epochs * spe)], world, device, op="min")[0])
    table = schedule_for(cfg, spe, new, opt.schedule[:, :total + 1].cpu(), step).to(device)
    opt.schedule.copy_(torch.cat([table, table[:, -1:].expand(-1, opt.schedule.shape[1] - 1 - new)], 1))  # in place
    if rank == 0:
        runtime.write_json(os.path.join(run.out, "config.json"), {**vars(cfg), **vars(run), "total_steps": new})
        tqdm.write(f"time budget {run.time_budget:g} min at {cfg.batch_size / step_s:,.0f} img/s "
                   f"({step_s * 1e3:.1f} ms/step) buys {new} steps ({new / spe:.2f} epochs)")
    log.write(kind="budget", step=step, steps=new, epochs=new / spe, img_s=cfg.batch_size / step_s)
    return new, False


def check_finite(bad, step):
    if bad:
        raise SystemExit(f"train.py: error: the loss is not finite (nan or inf) at step {step} or shortly before; "
                         f"stopped. The last good checkpoint is kept; try a lower --lr or --clip-grad")


def check_replicas(model, log):
    """After data-parallel training every rank must hold the same student; log the largest difference."""
    flat = torch.cat([p.detach().float().flatten() for p in model.student.parameters()])
    ref = flat.clone()
    dist.broadcast(ref, src=0)
    diff = (flat - ref).abs().max()
    dist.all_reduce(diff, op=dist.ReduceOp.MAX)
    log.write(kind="replicas", max_abs_diff=diff.item(), world=dist.get_world_size())


def bench(cfg, run):
    """--bench: time run.bench calls of the loop's own step on random images of the configured size."""
    from torch.utils.flop_counter import FlopCounterMode
    device = runtime.pick_device(run.device)
    compile_ = device.type == "cuda" if run.compile is None else run.compile
    torch.manual_seed(run.seed)
    gen = torch.Generator(device=device).manual_seed(run.seed)
    images = torch.randint(0, 256, (cfg.batch_size, 3, cfg.img_size, cfg.img_size), dtype=torch.uint8,
                           device=device, generator=gen)
    model, (mean, std), bf16 = sit.SiT(cfg).to(device), data.IMAGENET_STATS, runtime.bf16(run, device, cfg.dim)
    with rng.source(gen):
        clean = data.two_views(images, cfg.img_size, mean, std, cfg.crop_min)
        inputs = (clean, *model.corrupt(clean))
    with FlopCounterMode(display=False) as flops, torch.autocast(device.type, torch.bfloat16, enabled=bf16):
        model(*inputs)["loss"].backward()                               # forward + backward, inputs excluded
    model.zero_grad(set_to_none=True)
    opt = AdamW(model, sit.schedules(cfg, 100), device, bf16=bf16)
    step_fn = stepper(model, opt, torch.empty(uniforms_per_step(cfg, images.shape), device=device), gen, mean, std,
                      compile_, run.cuda_graphs)
    precision = "bf16" if bf16 else "fp32"
    label = f"{cfg.model} ({cfg.dim}/{cfg.depth}/{cfg.heads}) P{cfg.patch_size} {cfg.img_size}px {precision}"
    plain, ratios = plain_step(copy.deepcopy(model), inputs, bf16), []
    for _ in range(3):  # alternated, since a machine's speed drifts: the project's step, then the yardstick
        ours = runtime.bench(run.bench, lambda: step_fn(images), flops.get_total_flops(), cfg.batch_size, device,
                             label, compile_, run.peak_tflops, warmup=10 if compile_ else 3)
        base = runtime.bench(run.bench, plain, flops.get_total_flops(), cfg.batch_size, device, label + " plain",
                             False, run.peak_tflops, warmup=3)
        ratios.append(base["ms_step"] / ours["ms_step"])
    print(f"bench: this step runs {sorted(ratios)[1]:.3f}x as fast as a plain eager step of the same model (median of "
          f"3 alternations: {', '.join(f'{r:.3f}' for r in ratios)}; the plain step makes no views and no corruption)")
    (loss, _, _), skipped, _ = opt.read()
    if not math.isfinite(loss) or skipped:
        raise SystemExit(f"train.py: error: --bench: the loss is {loss} ({skipped} steps skipped)")


def plain_step(model, inputs, bf16):
    """--bench's yardstick: the same model's step in plain eager PyTorch (forward, backward,
    torch.optim.AdamW, teacher EMA) on views and corruption made once beforehand. Not for training."""
    opt = torch.optim.AdamW(model.student.parameters(), lr=1e-4, foreach=True)

    def step():
        with torch.autocast(inputs[0].device.type, torch.bfloat16, enabled=bf16):
            loss = model(*inputs)["loss"]
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        model.update_teacher(0.99)
    return step


def main(argv=None):
    cfg = None
    runtime.keep_freed_memory()
    try:
        try:  # set-up: a mistake in the input is one line on stderr and exit code 2
            cfg, run, given, resumed = configure(argv)
            torch.set_float32_matmul_precision("high")
            if run.bench:
                bench(cfg, run)
                return 0
            rank, world, device = runtime.init_distributed(run, cfg.batch_size)
            run.compile = device.type == "cuda" if run.compile is None else run.compile
            loaded = load_training_data(cfg, run)
            if resumed:                                                 # something left to do?
                resumed += (resumed_length(resumed[1], cfg, run, given, len(loaded[0]) // cfg.batch_size),)
        except ValueError as e:  # DataError, CheckpointError, Config's, the flags' and the device's checks
            print(f"train.py: error: {e}", file=sys.stderr)
            return 2
        return train(cfg, run, resumed, rank, world, device, *loaded)
    except torch.cuda.OutOfMemoryError:
        print(f"train.py: error: out of GPU memory with --batch-size {cfg.batch_size} ({cfg.model}, {cfg.img_size} "
              f"px, patch {cfg.patch_size}); lower --batch-size (the lr scales with it), or use a smaller --model or "
              f"--img-size; the last checkpoint is kept", file=sys.stderr)
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
