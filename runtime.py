"""What the scripts need around the method: command lines and their checks, the run's options, the device,
checkpoints, the log, signals, the ranks' agreement under torchrun, the time budget. A bad command-line value is
one line `SCRIPT: error: --flag VALUE: must be ...`, exit status 2, before anything is read or written."""
import argparse
import ctypes
import dataclasses
import json
import math
import os
import signal
import sys
import tempfile
import time

import torch
import torch.distributed as dist

import data
import sit

# === Rules and the one-line parser shared by the scripts
INT = "an integer"
ANY = (lambda v: True, "anything")
FOLDER = (lambda v: v != "", "a folder (not empty)")


def shown(v):
    """A value as a message shows it: a float as :g writes it (1e-06, 0.5), anything else in full."""
    return f"{v:g}" if isinstance(v, float) else f"{v}"


def allowed(lo, hi=math.inf, open_lo=False, open_hi=False, kind="a number"):
    """(test, description) of a finite number from lo to hi, each end closed unless open_*."""
    def ok(v):
        return math.isfinite(v) and (lo < v if open_lo else lo <= v) and (v < hi if open_hi else v <= hi)
    if hi == math.inf:
        return ok, f"{kind} {'>' if open_lo else '>='} {shown(lo)}"
    return ok, f"{kind} in {'(' if open_lo else '['}{shown(lo)}, {shown(hi)}{')' if open_hi else ']'}"


def one_of(*choices):
    return (lambda v: v in choices), f"one of {', '.join(choices)}"


def bad_value(flag, value, rule):
    """'FLAG VALUE: must be ...' when `value` breaks `rule`, else None."""
    ok, text = rule
    return None if value is None or ok(value) else f"{flag} {shown(value)}: must be {text}"


class Parser(argparse.ArgumentParser):
    """argparse for the scripts: an error is one line `prog: error: ...` and exit code 2 (no usage block)."""

    def error(self, message):
        print(f"{self.prog}: error: {message}", file=sys.stderr)
        sys.exit(2)


def check_flags(parser, args, rules):
    """parser.error for the first flag of `rules` ({"--flag": rule}) whose parsed value breaks it."""
    for flag, rule in rules.items():
        problem = bad_value(flag, getattr(args, flag[2:].replace("-", "_")), rule)
        if problem:
            parser.error(problem)


# === train.py's command line: the method's Config and the run's options, one flag per field
@dataclasses.dataclass
class Run:
    """How and where a pretraining runs (sit.Config holds the method)."""
    dataset: str = "cifar10"
    data_dir: str = "./data"
    limit: int = 0
    workers: int = 4
    out: str = ""
    device: str = "auto"
    compile: bool = None
    cuda_graphs: bool = True
    bf16: bool = None
    resume: bool = False
    save_every: float = 10.0
    time_budget: float = 0.0
    knn_every: int = 10
    log_every: int = 50
    bench: int = 0
    peak_tflops: float = 0.0
    seed: int = 0
    recipe: str = ""


# === Recipes: named sets of flag values (a flag given on the command line overrides its recipe's value)
LAPTOP = dict(dataset="fashion-mnist", device="cpu", model="tiny", dim=96, depth=4, heads=4, img_size=28,
              patch_size=7, proj_hidden=1024, batch_size=64, epochs=100, warmup_epochs=1.0, lr=4e-3, alpha=1.0,
              momentum_teacher=0.98, crop_min=1.0, knn_every=0)
RECIPES = {  # name: (what it is, its measured result in one line, its flag values)
    "cifar10-paper": ("the paper's CIFAR-10 setting (the defaults): ViT-S/4 at 32 px, alpha 5, 100 epochs",
                      "not measured yet", dict(dataset="cifar10")),
    "fmnist-20min": ("Fashion-MNIST in 20 minutes on 2 CPU cores: a 96-wide, 4-block ViT, patch 7 at 28 px",
                     "k-NN 87.21, linear probe 86.39 (RESULTS.md)", dict(LAPTOP, time_budget=20.0)),
    "fmnist-2min": ("the same in 2 minutes: enough to see it learn, not to judge it",
                    "k-NN 68.53 at init, 82.99 after (RESULTS.md)", dict(LAPTOP, time_budget=2.0, warmup_epochs=0.1)),
    "fmnist-gpu-6min": ("Fashion-MNIST in 6 minutes on one GPU: ViT-T/4 at 32 px, batch 256",
                        "not measured yet", dict(dataset="fashion-mnist", model="tiny", img_size=32, patch_size=4,
                                                 batch_size=256, epochs=1000, warmup_epochs=2.0, knn_every=10,
                                                 time_budget=6.0)),
}


TRAIN_FLAGS = {  # field: (help, rule); every field of sit.Config and Run
    "model": ("ViT preset: tiny | small | base (D/depth/h 192/12/3, 384/12/6, 768/12/12)", one_of(*sit.MODEL_PRESETS)),
    "dim": ("D, token width; 0 = from --model", allowed(0, kind=INT)),
    "depth": ("number of transformer blocks; 0 = from --model", allowed(0, kind=INT)),
    "heads": ("h, attention heads; 0 = from --model", allowed(0, kind=INT)),
    "mlp_ratio": ("MLP hidden width as a multiple of D", allowed(0, 64, open_lo=True)),
    "img_size": ("H = W, training image side in pixels", allowed(1, kind=INT)),
    "patch_size": ("P, patch side in pixels (H must be a multiple)", allowed(1, kind=INT)),
    "in_chans": ("C, image channels", ((lambda v: v == 3), "3 (gray images are repeated to 3 channels)")),
    "crop_min": ("smallest area share of each view's random crop (crop area ~ U(crop_min, 1))",
                 allowed(0, 1, open_lo=True)),
    "drop_path": ("student stochastic depth rate at the last block (linear in depth)", allowed(0, 1, open_hi=True)),
    "proj_hidden": ("projection head hidden width", allowed(1, kind=INT)),
    "proj_dim": ("projection head output width (contrastive embedding)", allowed(1, kind=INT)),
    "drop_perc": ("p: share of each view corrupted ~ U(min(0.5, p), p), in [0, 1]", allowed(0, 1)),
    "drop_replace": ("share replaced by another image of the batch, when that fill is drawn (p = 1/2)", allowed(0, 1)),
    "drop_align": ("block corner/side grid in pixels; 0 = patch size (groups of tokens)", allowed(0, kind=INT)),
    "drop_type": ("corrupted blocks' fill: noise (N(0,1), normalised) | zeros (mean colour)", one_of("noise", "zeros")),
    "max_block": ("largest block side as a share of the image side", allowed(0, 1, open_lo=True)),
    "alpha": ("alpha: weight of L_recons in L_total = alpha L_recons + L_contr", allowed(0)),
    "tau": ("tau: InfoNCE temperature", allowed(0, open_lo=True)),
    "epochs": ("pretraining epochs (the paper runs 800 on small datasets)", allowed(1, kind=INT)),
    "batch_size": ("images per step, summed over all GPUs", allowed(2, kind=INT)),
    "lr": ("peak learning rate per 256 images (scaled by batch/256)", allowed(0, open_lo=True)),
    "min_lr": ("learning rate at the end of the cosine", allowed(0)),
    "warmup_epochs": ("epochs of linear learning-rate warm-up", allowed(0)),
    "weight_decay": ("AdamW weight decay at the start (cosine to --weight-decay-end)", allowed(0)),
    "weight_decay_end": ("AdamW weight decay at the end", allowed(0)),
    "momentum_teacher": ("teacher EMA momentum at the start (cosine to 1)", allowed(0, 1)),
    "clip_grad": ("gradient-norm clipping threshold; 0 = off", allowed(0)),
    "clip_mode": ("one norm (global) | a norm per tensor (per-tensor, authors' code)", one_of("global", "per-tensor")),
    "head_bn": ("heads' BN: both views in one call (pair, authors' code) | per view (view)", one_of("pair", "view")),
    "dataset": ("dataset name, or a folder of images (see data.py)", data.DATASET_RULE),
    "data_dir": ("where datasets are downloaded / read", FOLDER),
    "limit": ("use only the first N training images; 0 = all", allowed(0, kind=INT)),
    "workers": ("DataLoader workers, only for datasets too large to hold on the device", allowed(0, kind=INT)),
    "out": ("run folder; empty = runs/<dataset>",
            ((lambda v: not os.path.isfile(v)), "a folder (a file of that name exists)")),
    "device": ("auto | cuda | mps | cpu (auto: cuda, then mps, then cpu)",
               ((lambda v: v.split(":")[0] in ("auto", "cuda", "mps", "cpu")), "auto, cuda, mps or cpu")),
    "compile": ("torch.compile the whole training step into one graph (default: on with CUDA, off elsewhere)", ANY),
    "cuda_graphs": ("with --compile on CUDA: replay the step as a CUDA graph (mode reduce-overhead)", ANY),
    "resume": ("continue the run in --out from its ckpt.pt (--epochs and --time-budget may change its length)", ANY),
    "save_every": ("minutes between checkpoints within an epoch (besides epoch ends); 0 = epoch ends only", allowed(0)),
    "time_budget": ("minutes of pretraining: length fitted to the measured speed to end on time; 0 = off", allowed(0)),
    "knn_every": ("k-NN monitor every N epochs (also at step 0 and the end); 0 = only the end", allowed(0, kind=INT)),
    "log_every": ("steps between progress-bar/log.jsonl updates", allowed(1, kind=INT)),
    "bench": ("if > 0: time N steps on random images, print img/s (MFU if peak known), exit", allowed(0, kind=INT)),
    "bf16": ("bf16 autocast (default: on CUDA, and on CPUs with bf16 instructions for D >= 192, where it pays)",
             ANY),
    "peak_tflops": ("peak TFLOP/s for --bench's MFU; 0 = known GPUs' bf16 dense peak, else no MFU", allowed(0)),
    "seed": ("random seed (data order, augmentation, corruption, init)", allowed(0, 2**32 - 1, kind=INT)),
    "recipe": ("a named set of flag values (listed below); flags given override it; empty = none",
               ((lambda v: v in ("", *RECIPES)), f"one of {', '.join(RECIPES)}")),
}


def flag(name):
    return "--" + name.replace("_", "-")


def parse_train_args(argv=None):
    """(sit.Config, Run, the flags given on the command line); every value checked (ValueError)."""
    argv = sys.argv[1:] if argv is None else argv
    recipes = "\n".join(f"  {name:16} {text}; {result}" for name, (text, result, _) in RECIPES.items())
    p = Parser(prog="train.py", description="Pretrain a ViT with SiT/GMML (arXiv 2104.03602).", allow_abbrev=False,
               epilog=f"recipes (--recipe NAME):\n{recipes}", formatter_class=argparse.RawDescriptionHelpFormatter)
    for f in dataclasses.fields(sit.Config) + dataclasses.fields(Run):
        text = TRAIN_FLAGS[f.name][0]
        if f.type in (bool, "bool"):
            p.add_argument(flag(f.name), action=argparse.BooleanOptionalAction, default=f.default, help=text)
        else:
            typ = {"int": int, "float": float, "str": str}.get(f.type, f.type)
            p.add_argument(flag(f.name), type=typ, default=f.default, help=f"{text} (default: {f.default})")
    recipe = p.parse_known_args(argv)[0].recipe
    problem = bad_value("--recipe", recipe, TRAIN_FLAGS["recipe"][1])
    if problem:
        raise ValueError(problem)
    p.set_defaults(**(RECIPES[recipe][2] if recipe else {}))          # checked below as any flag's value
    args = p.parse_args(argv)                                       # a value of the wrong type: exit 2
    for name, (_, rule) in TRAIN_FLAGS.items():
        problem = bad_value(flag(name), getattr(args, name), rule)
        if problem:
            raise ValueError(problem)
    given = {a.dest for a in p._actions if a.option_strings and any(
        s == o or s.startswith(o + "=") for s in argv
        for o in a.option_strings + [o.replace("--", "--no-", 1) for o in a.option_strings])}
    method = {f.name for f in dataclasses.fields(sit.Config)}
    cfg = sit.Config(**{k: v for k, v in vars(args).items() if k in method})
    run = Run(**{k: v for k, v in vars(args).items() if k not in method})
    run.out = run.out or os.path.join("runs", run.recipe or os.path.basename(os.path.normpath(run.dataset)))
    return cfg, run, given


# On --resume the run continues its own recipe. What may change: how and where it runs, and its length.
RESUME_HONOURS = {"out", "device", "compile", "cuda_graphs", "resume", "save_every", "knn_every", "log_every",
                  "workers", "data_dir", "bench", "peak_tflops", "bf16", "epochs", "time_budget"}


def resumed_config(saved, cfg, run, given):
    """(cfg, run) resumed: `saved` config with the `given` flags in RESUME_HONOURS; others must match (ValueError)."""
    for name in sorted(given - RESUME_HONOURS):
        now = getattr(cfg, name, getattr(run, name, None))
        if name in saved and saved[name] != now:
            raise ValueError(f"{flag(name)} {shown(now)}: the run in {run.out} has {shown(saved[name])}, which "
                             f"--resume cannot change (only {', '.join(flag(n) for n in sorted(RESUME_HONOURS))}); "
                             f"start a new run with another --out")
    keep = {k: v for k, v in {**dataclasses.asdict(cfg), **dataclasses.asdict(run)}.items()
            if k in given or k in RESUME_HONOURS - {"epochs", "time_budget"}}      # how it runs: as now
    merged = {**dataclasses.asdict(Run()), **saved, **keep}
    return sit.Config.from_dict(merged), Run(**{f.name: merged[f.name] for f in dataclasses.fields(Run)})


# === Device and processes
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


def init_distributed(run, batch_size):
    """(rank, world, device): torchrun sets WORLD_SIZE; plain `python train.py` is one process."""
    world, local_rank = int(os.environ.get("WORLD_SIZE", 1)), int(os.environ.get("LOCAL_RANK", 0))
    device = pick_device(run.device, local_rank)
    if world > 1:
        if device.type == "cuda":
            torch.cuda.set_device(device)
        # Imported before the group exists: its functions' defaults (group=group.WORLD) are bound at import, and
        # imported later (torch._dynamo does, on the first meta-device op) they keep the group alive after
        # destroy_process_group, so gloo's threads outlive it and can abort the interpreter's exit (SIGABRT).
        import torch.distributed.nn  # noqa: F401
        dist.init_process_group("nccl" if device.type == "cuda" else "gloo")
        if batch_size % world:
            raise ValueError(f"--batch-size {batch_size} is not divisible by the {world} processes")
    return (dist.get_rank() if world > 1 else 0), world, device


def bf16(run, device, dim):
    """--bf16, or by default: CUDA, or a CPU with bf16 instructions and D >= 192 (1.36x for ViT-T/4 on 2 cores with
    avx512_bf16; the 128-wide laptop ViT measured no faster)."""
    cpu = device.type == "cpu" and os.path.exists("/proc/cpuinfo") and "bf16" in open("/proc/cpuinfo").read()
    return (device.type == "cuda" or cpu and dim >= 192) if run.bf16 is None else run.bf16


def keep_freed_memory():
    """Have glibc's malloc keep freed CPU memory for the next step instead of giving it back to the system.
    By default it maps large blocks afresh (over 128 KiB, a threshold that adapts up to 32 MiB) and trims the
    heap's free top, so every step's activations page-fault again: 10,000 to 28,000 faults a step for the
    laptop ViT at batch 128, whose step then took 315 to 371 ms instead of 294 to 299. Other C libraries:
    nothing changes."""
    if sys.platform.startswith("linux"):
        libc = ctypes.CDLL(None)
        if hasattr(libc, "gnu_get_libc_version"):
            libc.mallopt(-3, 32 << 20)                                   # M_MMAP_THRESHOLD: glibc's largest
            libc.mallopt(-1, 2 ** 31 - 1)                                # M_TRIM_THRESHOLD: (almost) never trim


def sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    elif device.type == "mps":
        torch.mps.synchronize()


def graph_count():
    """Graphs torch.compile has made in this process (more than expected means recompiles)."""
    return int(torch._dynamo.utils.counters["stats"]["unique_graphs"])


def agree(values, world, device, op="max"):
    """The ranks' common view of a few numbers (max or min over ranks); `values` itself in one process."""
    if world == 1:
        return values
    t = torch.tensor(values, dtype=torch.float64, device=device)
    dist.all_reduce(t, op=dist.ReduceOp.MAX if op == "max" else dist.ReduceOp.MIN)
    return t.tolist()


# === Checkpoints: plain types only, written atomically; one loader for train, eval, visualize, export
MODELS = os.path.join(os.path.dirname(os.path.abspath(__file__)), "models")   # trained models shipped here


class CheckpointError(ValueError):
    """A checkpoint that is missing, truncated or not one of ours (message fits on one line)."""


def atomic_write(path, write):
    """write(f) to a binary temp file beside `path` (.NAME.*.tmp), fsync, rename; a failed write keeps the old file."""
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
    """torch.save `state` to `path` with `atomic_write`; a full disk (torch's RuntimeError) is raised as OSError."""
    try:
        atomic_write(path, lambda f: torch.save(state, f))
    except RuntimeError as e:
        raise OSError(f"the write failed ({str(e).splitlines()[0][:80]}...): is the disk full?") from None


def write_json(path, obj):
    atomic_write(path, lambda f: f.write(json.dumps(obj, indent=1).encode()))


def save_checkpoint(path, cfg, model, optimizer=None, step=0, epoch=0, extra=None, run=None):
    """Write both configs, student, teacher, optimizer state (torch.optim's layout), step, epoch and `extra` (plain
    data: every process's random stream) to `path`; `model` is the plain SiT module, so keys carry no prefixes."""
    config = {**dataclasses.asdict(cfg), **dataclasses.asdict(run or Run())}
    state = dict(format="sit-checkpoint-v1", config=config, torch_version=str(torch.__version__),
                 student=model.student.state_dict(), teacher=model.teacher.state_dict(), optimizer=optimizer,
                 step=int(step), epoch=int(epoch), extra=extra or {})
    atomic_save(state, path)


def save_checkpoint_or_exit(path, *args):
    """save_checkpoint, or on a failed write SystemExit, one line naming the folder and space needed (old one kept)."""
    try:
        save_checkpoint(path, *args)
    except OSError as e:
        need = sum(t.numel() * t.element_size() for t in args[1].state_dict().values()) * 2
        raise SystemExit(f"train.py: error: could not write {path} ({e.strerror or e}); the previous checkpoint is "
                         f"kept: free about {need / 2**20:,.0f} MiB in {os.path.dirname(path) or '.'} or fix the "
                         f"folder, then --resume") from None


def load_checkpoint(path, device="cpu"):
    """(sit.Config, SiT model, raw checkpoint dict) from `path` alone, loaded strictly with weights_only=True."""
    if not os.path.isfile(path):
        raise CheckpointError(f"checkpoint not found: {path}")
    try:
        ckpt = torch.load(path, map_location=device, weights_only=True)
    except Exception as e:
        raise CheckpointError(f"cannot read {path} as a checkpoint (truncated or not a torch file): "
                              f"{type(e).__name__}") from None
    if not isinstance(ckpt, dict) or ckpt.get("format") != "sit-checkpoint-v1":
        raise CheckpointError(f"{path} is not a SiT checkpoint written by this code")
    cfg = sit.Config.from_dict(ckpt["config"])
    model = sit.SiT(cfg).to(device)
    left_out = tuple(ckpt.get("left_out", ()))                          # a released model: no projection heads
    for part in ("student", "teacher"):
        module = getattr(model, part)
        try:
            missing, unexpected = module.load_state_dict(ckpt[part], strict=not left_out)
        except RuntimeError as e:
            raise CheckpointError(f"{path}: weights do not match its config ({str(e).splitlines()[0]})") from None
        if unexpected or any(not k.startswith(left_out) for k in missing):
            raise CheckpointError(f"{path}: weights do not match its config ({(unexpected + missing)[0]})")
    return cfg, model, ckpt


def release_checkpoint(path, out):
    """Write a checkpoint to ship: `path`'s config, step, backbones and decoder in float16, without the projection
    heads (only L_contr uses them) and the optimizer, so it cannot be resumed; what eval, visualize and torch.hub
    need, loaded by load_checkpoint like any other."""
    _, model, ckpt = load_checkpoint(path)
    if ckpt.get("left_out"):
        raise CheckpointError(f"{path} is already a released model")
    parts = {name: {k: v.half() if v.is_floating_point() else v for k, v in getattr(model, name).state_dict().items()
                    if not k.startswith("head.")} for name in ("student", "teacher")}
    state = dict(ckpt, **parts, optimizer=None, extra={"total_steps": ckpt["extra"].get("total_steps")},
                 left_out=["head."])
    atomic_save(state, out)


def output_folder(checkpoint):
    """Where a script writes about `checkpoint` by default: its own folder, or runs/NAME for a model shipped in
    this repository's models/ folder, so that using one writes nothing inside the repository."""
    folder = os.path.dirname(os.path.abspath(checkpoint))
    if folder == MODELS:
        return os.path.join("runs", os.path.splitext(os.path.basename(checkpoint))[0])
    return folder


def load_encoder(path, student=False, device="cpu", drop_path=0.0):
    """(ViT, head {weight (K, D), bias (K,)} or None, info) from our checkpoint: the momentum teacher's backbone (as
    DINO and MoCo v3 evaluate; `student`: the student's) or eval.py's finetuned.pt encoder and head. info: cfg, config,
    encoder (teacher | student | finetuned), dataset (whose normalisation it expects), epoch. Else CheckpointError."""
    try:
        cfg, model, ckpt = load_checkpoint(path)
        encoder = "student" if student else "teacher"
        state, head, dataset = getattr(model, encoder).backbone.state_dict(), None, ckpt["config"].get("dataset", "")
    except CheckpointError as err:
        try:
            ckpt = torch.load(path, map_location="cpu", weights_only=True)
        except Exception:
            raise err from None
        if not isinstance(ckpt, dict) or ckpt.get("format") != "sit-finetuned-v1":
            raise err from None
        if student:
            raise CheckpointError(f"{path} is a fine-tuned encoder; --student applies to train.py's checkpoints")
        cfg, encoder, dataset = sit.Config.from_dict(ckpt["config"]), "finetuned", ckpt.get("dataset", "")
        state = {k[len("backbone."):]: v for k, v in ckpt["model"].items() if k.startswith("backbone.")}
        head = dict(weight=ckpt["model"]["head.weight"], bias=ckpt["model"]["head.bias"])
    vit = sit.ViT(cfg.img_size, cfg.patch_size, cfg.in_chans, cfg.dim, cfg.depth, cfg.heads, cfg.mlp_ratio, drop_path)
    try:
        vit.load_state_dict(state)
    except RuntimeError as e:
        raise CheckpointError(f"{path}: weights do not match its config ({str(e).splitlines()[0]})") from None
    info = dict(cfg=cfg, encoder=encoder, dataset=dataset, epoch=int(ckpt.get("epoch", 0)), config=ckpt["config"])
    return vit.to(device).eval(), head, info


# === The run folder: log.jsonl, left-over temp files, and what a signal asks for
def row_of(line):
    """The JSON object on one line of log.jsonl, or None for a line cut short by a kill."""
    try:
        row = json.loads(line)
    except ValueError:
        return None
    return row if isinstance(row, dict) else None


class Log:
    """log.jsonl, rank 0 only, a JSON object a line; opening drops the lines of steps to redo (a fresh start: all)."""

    def __init__(self, path, enabled, keep_until_step=-1):
        self.path, self.enabled = path, enabled
        if enabled and os.path.exists(path):
            with open(path) as f:
                rows = [row_of(line) for line in f]
            lines = [json.dumps(r) + "\n" for r in rows if r is not None and r.get("step", 0) <= keep_until_step]
            atomic_write(path, lambda f: f.write("".join(lines).encode()))

    def write(self, **row):
        if self.enabled:
            with open(self.path, "a") as f:
                f.write(json.dumps(row) + "\n")


def remove_partial_saves(folder):
    """Delete the .ckpt.pt.*.tmp files of checkpoint writes a kill cut short, lest preemptions fill the disk."""
    for name in os.listdir(folder) if os.path.isdir(folder) else ():
        if name.startswith(".ckpt.pt.") and name.endswith(".tmp"):
            os.remove(os.path.join(folder, name))


class StopFlag:
    """Within `with StopFlag() as stop:`, SIGINT/SIGTERM set stop.signal; a second one stops at once, but a repeat
    within `repeat_s` is the same one (torchrun delivers Ctrl-C or SLURM's SIGTERM directly and via the launcher)."""
    repeat_s = 1.0

    def __init__(self):
        self.signal, self.previous, self.at = None, {}, None

    def __enter__(self):
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


# === --time-budget: how many steps the budget buys, from the measured speed
class Budget:
    """Measures the step time once compiled (over >= 10 steps and >= 5 s, or 5% of the budget), then says how many
    steps fit in what is left of `minutes`; measured again, over the steps since, at a quarter, half and three
    quarters of the budget, since a machine's speed drifts. Time in the k-NN monitor is not counted (`paused`)."""

    def __init__(self, minutes):
        self.minutes, self.started, self.paused, self.mark, self.fits = minutes, time.time(), 0.0, None, 0

    def elapsed(self):
        return time.time() - self.started - self.paused

    def ready(self, step):
        """Whether to fit the length now; the first call (after compiling) starts the clock."""
        if self.mark is None:
            self.mark = (step, self.elapsed())
            return False
        if self.fits:
            return self.fits < 4 and self.elapsed() >= 15 * self.minutes * self.fits and step > self.mark[0]
        return step - self.mark[0] >= 10 and self.elapsed() - self.mark[1] >= min(5.0, 3.0 * self.minutes)

    def steps_left(self, step):
        """(steps that fit in the rest of the budget, seconds per step since the last fit)."""
        now = self.elapsed()
        step_s = (now - self.mark[1]) / (step - self.mark[0])
        self.mark, self.fits = (step, now), self.fits + 1
        return int((60 * self.minutes - now) / step_s), step_s


# === Benchmark: the training loop's own step on random images
PEAK_TFLOPS = {"H100": 989.0, "H200": 989.0, "A100": 312.0, "L40S": 362.0, "A10": 125.0, "4090": 165.0}  # bf16


def bench(steps, run_step, flops, batch_size, device, label, compiled, given_peak, warmup):
    """Time `steps` calls of run_step() (the loop's own step) after `warmup` calls; print one line."""
    t = time.perf_counter()
    for _ in range(warmup):
        run_step()
    sync(device)
    warm_s = time.perf_counter() - t
    cuda = device.type == "cuda"
    if cuda:
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
    host, t = 0.0, time.perf_counter()
    for _ in range(steps):
        h = time.perf_counter()
        run_step()
        host += time.perf_counter() - h
    if cuda:
        end.record()
    sync(device)
    step_s = (time.perf_counter() - t) / steps
    device_ms = f"{start.elapsed_time(end) / steps:.2f} ms/step (CUDA events)" if cuda else "not timed (no CUDA)"
    name = torch.cuda.get_device_name(device) if cuda else device.type
    # the peak for MFU: --peak-tflops when given, else a known GPU's bf16 dense peak, else none
    tflops, peak = flops / step_s / 1e12, given_peak or next((v for k, v in PEAK_TFLOPS.items() if k in name), None)
    mfu = f"MFU {100 * tflops / peak:.3g}% of {peak:g}" if peak else "MFU not known (no --peak-tflops)"
    print(f"bench {label} batch {batch_size} {'compiled' if compiled else 'eager'} on {name}: "
          f"{batch_size / step_s:,.0f} img/s, {step_s * 1e3:.1f} ms/step, {tflops:.3g} TFLOP/s, {mfu}; "
          f"host {host / steps * 1e3:.2f} ms/step, device {device_ms}, {graph_count()} compiled graph(s), "
          f"warm-up{' and compilation' if compiled else ''} {warm_s:.1f} s")
    return dict(img_s=batch_size / step_s, ms_step=step_s * 1e3, tflops=tflops)
