"""Tests of train.py and data.py (CPU, seeded, no network)."""
import errno
import json
import math
import os
import re
import signal
import socket
import subprocess
import sys
import time

import pytest
import torch

import data
import rng
import runtime
import sit
import train

HERE = os.path.dirname(os.path.abspath(__file__))
TINY = ["--model", "tiny", "--dim", "32", "--depth", "2", "--heads", "2", "--img-size", "16",
        "--patch-size", "4", "--proj-hidden", "64", "--proj-dim", "16", "--device", "cpu",
        "--warmup-epochs", "1", "--knn-every", "0"]


def run_main(args, tmp_path, name="run"):
    return train.main(["--out", str(tmp_path / name)] + args)


@pytest.fixture(autouse=True)
def one_thread():
    """torch on one thread in this process, as the runs in subprocesses (OMP_NUM_THREADS=1): on 2
    cores shared with anything else, two threads wait on each other and a step takes 10-100x longer
    (the Fashion-MNIST test: 100 s on one thread, over 13 min on two, beside another training run)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def drawn(seed, fn, *args):
    """fn(*args) with its random numbers from a generator seeded with `seed`."""
    with rng.source(torch.Generator().manual_seed(seed)):
        return fn(*args)


def read_log(folder):
    with open(os.path.join(folder, "log.jsonl")) as f:
        return [json.loads(line) for line in f]


def run_cli(args, script=os.path.join(HERE, "train.py"), **kw):
    env = dict(os.environ, OMP_NUM_THREADS="1")
    kw.setdefault("stdout", subprocess.DEVNULL)
    return subprocess.Popen([sys.executable, script] + args, cwd=HERE, env=env,
                            stderr=subprocess.PIPE, text=True, start_new_session=True, **kw)


SIGNALLING = """import os, signal, sys, time
sys.path.insert(0, {here!r})
import train
stepper = train.stepper
if os.environ.get("RANK") == "0" and {slow_save}:       # rank 0 takes 2 s more to write a checkpoint
    save = train.runtime.save_checkpoint_or_exit
    train.runtime.save_checkpoint_or_exit = lambda *a: (time.sleep(2), save(*a))[1]


def signalling(*args, **kw):  # the loop's step, which sends {sig} to its own process before step {at} + 1 runs
    run, calls = stepper(*args, **kw), [0]

    def step(x):
        if calls[0] == {at} and os.environ.get("RANK", "0") == "{rank}":
            os.kill(os.getpid(), signal.{sig})
        calls[0] += 1
        return run(x)
    step.compile_seconds = None
    return step


# Outside train's own handler SIGTERM is ignored: torchrun, which stops the other rank once one ends, cannot cut
# the record below short.
signal.signal(signal.SIGTERM, signal.SIG_IGN)
train.stepper = signalling
code = train.main()
with open(__file__ + ".exit" + os.environ.get("RANK", ""), "w") as f:  # what main returned; ckpt.pt there by then?
    f.write(f"{{code}} {{os.path.exists(os.path.join(sys.argv[sys.argv.index('--out') + 1], 'ckpt.pt'))}}")
sys.exit(code)
"""


def signalling(tmp_path, sig, at, rank=0, slow_save=False):
    """A train.py that sends itself `sig` (a real signal, through the kernel) just before its step `at` + 1
    runs, on `rank` only under torchrun: the signal lands at a step the test chooses, not after a sleep.
    What train.main returns, and whether --out holds ckpt.pt by then, is written to the script's path + ".exit"
    (+ the rank under torchrun). slow_save: rank 0 takes 2 s more to write a checkpoint under torchrun."""
    path = tmp_path / f"train_{sig}_at_{at}_rank_{rank}.py"
    path.write_text(SIGNALLING.format(here=HERE, sig=sig, at=at, rank=rank, slow_save=slow_save))
    return str(path)


def free_port():
    """A TCP port that nothing listens on now (two test sessions at once must not share one)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def run_torchrun(args, script=os.path.join(HERE, "train.py"), **kw):
    """train.py (or `script`) under torchrun: 2 CPU processes (gloo) on this machine, each on its own port."""
    env = dict(os.environ, OMP_NUM_THREADS="1", **kw.pop("env", {}))
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2", f"--master_port={free_port()}",
           script] + args
    return subprocess.Popen(cmd, cwd=HERE, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
                            text=True, start_new_session=True, **kw)


def finish(proc, timeout=300):
    """(stdout, stderr) of a run (run_cli or run_torchrun) once it ends; one still running after
    `timeout` seconds is killed with its workers (its own session), and the test fails."""
    try:
        return proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.communicate()
        raise AssertionError(f"still running after {timeout} s; killed") from None


def assert_same_student(a, b):
    """Two checkpoints (dicts) hold bit-identical student weights."""
    assert a["student"].keys() == b["student"].keys()
    for k in a["student"]:
        assert torch.equal(a["student"][k], b["student"][k]), k


# 2 epochs of 8 steps, every step logged: the runs that are cut and resumed, and the one that is not
RESUMED = TINY + ["--dataset", "synthetic", "--limit", "256", "--batch-size", "32", "--epochs", "2",
                  "--log-every", "1", "--seed", "5"]


@pytest.fixture(scope="module")
def straight(tmp_path_factory):
    """The folder of the RESUMED run, uninterrupted, in a subprocess (the same threads as the cut
    runs, so that the weights can match bit for bit)."""
    out = tmp_path_factory.mktemp("straight")
    proc = run_cli(RESUMED + ["--out", str(out)])
    _, err = finish(proc)
    assert proc.returncode == 0, err
    return out


@pytest.fixture(scope="module")
def ddp_straight(tmp_path_factory):
    """The folder of the RESUMED run, uninterrupted, under torchrun (2 gloo processes)."""
    out = tmp_path_factory.mktemp("ddp_straight")
    proc = run_torchrun(RESUMED + ["--out", str(out)])
    _, err = finish(proc)
    assert proc.returncode == 0, err[-2000:]
    return out


# --- data pipeline ----------------------------------------------------------------------------

def test_two_views_shape_range_and_seed():
    """Both views are normalised (2B, 3, S, S) floats, reproducible from the generator seed."""
    x = data.synthetic(train=True, n=8).images
    mean, std = data.STATS["synthetic"]
    a = drawn(3, data.two_views, x, 16, mean, std)
    b = drawn(3, data.two_views, x, 16, mean, std)
    c = drawn(4, data.two_views, x, 16, mean, std)
    assert a.shape == (16, 3, 16, 16) and torch.isfinite(a).all()
    assert torch.equal(a, b) and not torch.equal(a, c)
    unit = data.denormalize(a, mean, std)
    assert not torch.allclose(unit[:8], unit[8:])                  # the two views differ

def test_crop_min_is_the_smallest_crop_area(tmp_path, monkeypatch):
    """Each crop's area share, read off an image that holds its own pixel coordinates, is at least
    --crop-min (3/4 of it where the aspect drawn makes a side reach the border), and a run crops every
    view with the --crop-min given."""
    S = 64
    ramp = torch.linspace(0, 1, S)
    x = torch.stack([ramp.view(1, S).expand(S, S), ramp.view(S, 1).expand(S, S), torch.zeros(S, S)])
    x = x.expand(256, 3, S, S)

    def areas(lo):
        crop = drawn(0, data.random_resized_crop, x, S, (lo, 1.0))
        span = crop.amax((2, 3)) - crop.amin((2, 3))                 # (B, 3): width and height shares
        return span[:, 0] * span[:, 1]
    assert areas(0.6).min() >= 0.75 * 0.6 * 0.95 and areas(0.2).min() < 0.3
    scales = []
    crop = data.random_resized_crop
    monkeypatch.setattr(data, "random_resized_crop", lambda *a, **kw: scales.append(kw["scale"]) or crop(*a, **kw))
    assert run_main(TINY + ["--dataset", "synthetic", "--limit", "64", "--batch-size", "32", "--epochs", "1",
                            "--crop-min", "0.6"], tmp_path) == 0
    assert len(scales) == 3 * 2 and set(scales) == {(0.6, 1.0)}   # 2 views: counting the draws, then 2 steps


def test_crop_and_flip_from_an_explicit_stream():
    """random_resized_crop draws per image its area share, log aspect, centre x, centre y, then the flip,
    each for the whole batch in turn. On an image whose channels hold each pixel's x and y coordinate
    (grid_sample's [-1, 1], pixel centres), output pixel (i, j) reads the coordinate it samples:
    x = cx + w sign t_j, y = cy + h t_i, t_k = (2k + 1) / S - 1, w = h = sqrt(area) at aspect 1,
    cx = (2u - 1)(1 - w); sign -1 (flipped) where the flip draw is below 0.5."""
    S = 16
    t = (torch.arange(S) * 2 + 1) / S - 1
    x = torch.stack([t.view(1, S).expand(S, S), t.view(S, 1).expand(S, S), torch.zeros(S, S)]).expand(2, 3, S, S)
    area, u_cx, u_cy, u_flip = [0.25, 0.36], [0.75, 0.5], [0.5, 0.25], [0.2, 0.9]
    stream = torch.tensor([(a - 0.2) / 0.8 for a in area] + [0.5, 0.5] + u_cx + u_cy + u_flip)
    with rng.source(stream):
        out = data.random_resized_crop(x, S, scale=(0.2, 1.0))
    for b in range(2):
        w = math.sqrt(area[b])
        cx, cy, sign = (2 * u_cx[b] - 1) * (1 - w), (2 * u_cy[b] - 1) * (1 - w), -1 if u_flip[b] < 0.5 else 1
        torch.testing.assert_close(out[b, 0], (cx + w * sign * t).view(1, S).expand(S, S), atol=1e-5, rtol=0)
        torch.testing.assert_close(out[b, 1], (cy + w * t).view(S, 1).expand(S, S), atol=1e-5, rtol=0)


def test_colour_jitter_grayscale_and_solarize_written_out():
    """color_jitter draws on (p), then brightness, contrast, saturation and hue factors 1 + (2u - 1) a
    for the whole batch in turn, applied in that order with clamping to [0, 1] (contrast towards the
    image's mean luma, saturation towards each pixel's luma, luma = 0.299 R + 0.587 G + 0.114 B);
    random_grayscale puts luma in all 3 channels; solarize turns v >= 0.5 into 1 - v; each only on the
    images whose draw is below p. Hue at u = 0.5 is no rotation."""
    g = torch.Generator().manual_seed(0)
    x = torch.rand(2, 3, 8, 8, generator=g)
    luma = lambda im: 0.299 * im[:, 0:1] + 0.587 * im[:, 1:2] + 0.114 * im[:, 2:3]  # noqa: E731
    on, u = [0.3, 0.9], [[0.9, 0.1], [0.2, 0.6], [0.75, 0.3], [0.5, 0.5]]  # p 0.8: image 1 unchanged
    with rng.source(torch.tensor(on + sum(u, []))):
        out = data.color_jitter(x, p=0.8)
    f = [1 + (2 * torch.tensor(v[0]) - 1) * a for v, a in zip(u, (0.4, 0.4, 0.2))]
    want = (x[:1] * f[0]).clamp(0, 1)
    want = (luma(want).mean() + f[1] * (want - luma(want).mean())).clamp(0, 1)
    want = (luma(want) + f[2] * (want - luma(want))).clamp(0, 1)
    torch.testing.assert_close(out[0], want[0], atol=1e-5, rtol=0)
    torch.testing.assert_close(out[1], x[1], atol=1e-5, rtol=0)
    with rng.source(torch.tensor([0.1, 0.5])):
        gray = data.random_grayscale(x, p=0.2)
    assert torch.equal(gray[1], x[1])
    torch.testing.assert_close(gray[0], luma(x[:1])[0].expand(3, 8, 8), atol=1e-6, rtol=0)
    with rng.source(torch.tensor([0.5, 0.1])):
        sol = data.solarize(x, p=0.2)
    assert torch.equal(sol[0], x[0]) and torch.equal(sol[1], torch.where(x[1] >= 0.5, 1 - x[1], x[1]))


def test_gray_images_become_three_channels():
    """Gray uint8 images (C = 1) give 3 equal channels in [0, 1]."""
    x = torch.randint(0, 256, (4, 1, 28, 28), dtype=torch.uint8)
    u = data.to_unit(x)
    assert u.shape == (4, 3, 28, 28) and torch.equal(u[:, 0], u[:, 2]) and u.max() <= 1


def test_epoch_batches_order_drop_last_and_ranks():
    """Epoch order is a pure function of (epoch, seed); the last partial batch is dropped; ranks split
    each global batch into disjoint halves."""
    d = data.synthetic(train=True, n=100)
    images = torch.arange(100).view(100, 1, 1, 1)                  # image i holds its index
    one = [b.flatten() for b in data.epoch_batches(d, images, 32, epoch=1, seed=0)]
    again = [b.flatten() for b in data.epoch_batches(d, images, 32, epoch=1, seed=0)]
    other = [b.flatten() for b in data.epoch_batches(d, images, 32, epoch=2, seed=0)]
    assert len(one) == 3 and all(len(b) == 32 for b in one)
    assert all(torch.equal(a, b) for a, b in zip(one, again))
    assert not torch.equal(one[0], other[0])
    assert len(torch.cat(one).unique()) == 96
    r0 = list(data.epoch_batches(d, images, 32, epoch=1, seed=0, rank=0, world=2))
    r1 = list(data.epoch_batches(d, images, 32, epoch=1, seed=0, rank=1, world=2))
    assert torch.equal(torch.cat([r0[0], r1[0]]).flatten(), one[0])
    tail = [b.flatten() for b in data.epoch_batches(d, images, 32, epoch=1, seed=0, start=2)]
    assert len(tail) == 1 and torch.equal(tail[0], one[2])


def test_folder_dataset_skips_unreadable(tmp_path):
    """A folder of images loads recursively, unlabelled; unreadable files are skipped and counted."""
    from PIL import Image
    (tmp_path / "sub").mkdir()
    for i in range(3):
        Image.new("RGB", (40, 30), (i * 60, 10, 200)).save(tmp_path / "sub" / f"{i}.png")
    (tmp_path / "broken.jpg").write_bytes(b"not an image")
    d = data.load(str(tmp_path), size=16)
    assert d.images.shape == (3, 3, 16, 16) and d.labels is None and d.skipped == 1


# --- the training loop ------------------------------------------------------------------------

def test_few_steps_end_to_end(tmp_path):
    """Two short epochs on synthetic data write config.json, log.jsonl and a loadable checkpoint."""
    code = run_main(TINY + ["--dataset", "synthetic", "--limit", "128", "--batch-size", "32",
                            "--epochs", "2", "--log-every", "2", "--knn-every", "1"], tmp_path)
    assert code == 0
    folder = tmp_path / "run"
    cfg, model, ckpt = runtime.load_checkpoint(str(folder / "ckpt.pt"))
    assert (ckpt["step"], ckpt["epoch"]) == (8, 2) and cfg.dim == 32
    rows = read_log(folder)
    steps = [r for r in rows if r["kind"] == "step"]
    assert [r["step"] for r in steps] == [2, 4, 6, 8]
    assert all(torch.isfinite(torch.tensor(r["loss"])) for r in steps)
    knn = [r["knn"] for r in rows if "knn" in r]
    assert len(knn) == 3 and all(0 <= a <= 100 for a in knn)        # init, epoch 1, epoch 2
    assert json.load(open(folder / "config.json"))["epochs"] == 2


def test_interrupted_run_resumes_exactly(straight, tmp_path):
    """SIGTERM during step 3 saves step 3 exactly; --resume then ends with the same weights as an
    uninterrupted run (same data order, augmentation stream, optimizer and schedules)."""
    out = str(tmp_path / "cut")
    proc = run_cli(RESUMED + ["--out", out], script=signalling(tmp_path, "SIGTERM", at=2))
    _, err = finish(proc)
    assert proc.returncode == 128 + signal.SIGTERM, err
    assert torch.load(os.path.join(out, "ckpt.pt"), weights_only=True)["step"] == 3
    resumed = run_cli(RESUMED + ["--out", out, "--resume"])
    _, err = finish(resumed)
    assert resumed.returncode == 0, err
    a = torch.load(straight / "ckpt.pt", weights_only=True)
    b = torch.load(os.path.join(out, "ckpt.pt"), weights_only=True)
    assert a["step"] == b["step"] == 16
    assert_same_student(a, b)
    steps = [r["step"] for r in read_log(out) if r["kind"] == "step"]
    assert steps == list(range(1, 17))                               # no step lost or logged twice
    lr_a = [r["lr"] for r in read_log(straight) if r["kind"] == "step"]
    lr_b = [r["lr"] for r in read_log(out) if r["kind"] == "step"]
    assert lr_a == lr_b


def test_save_every_checkpoints_mid_epoch_and_resumes_exactly(straight, tmp_path):
    """--save-every (here 1e-9 min: after every step) writes checkpoints within an epoch: the run, killed
    (SIGKILL) before its step 12, keeps step 11 (inside its second epoch of 8 steps), resumes from it and
    ends with the same weights as an uninterrupted run. The resumed run also deletes the temp file of a
    save that a kill cut short."""
    out = str(tmp_path / "cut")
    args, ckpt = RESUMED + ["--out", out, "--save-every", "1e-9"], os.path.join(out, "ckpt.pt")
    proc = run_cli(args, script=signalling(tmp_path, "SIGKILL", at=11))
    finish(proc)
    assert proc.returncode == -signal.SIGKILL
    assert torch.load(ckpt, weights_only=True)["step"] == 11
    with open(os.path.join(out, ".ckpt.pt.cut-short.tmp"), "wb") as f:  # as a kill during a save leaves
        f.write(b"partial")
    resumed = run_cli(args + ["--resume"], stdout=subprocess.PIPE)
    printed, err = finish(resumed)
    assert resumed.returncode == 0, err
    assert f"resuming {out} at epoch 1, step 11\n" in printed
    a = torch.load(straight / "ckpt.pt", weights_only=True)
    b = torch.load(ckpt, weights_only=True)
    assert a["step"] == b["step"] == 16
    assert_same_student(a, b)
    assert [r["step"] for r in read_log(out) if r["kind"] == "step"] == list(range(1, 17))
    assert not [f for f in os.listdir(out) if f.endswith(".tmp")]


def test_killed_run_loses_at_most_one_epoch(tmp_path):
    """SIGKILL before step 20 of 24 (8 a epoch) leaves the checkpoint of the last epoch end, step 16,
    whole; --resume finishes the run."""
    out = str(tmp_path / "killed")
    args = TINY + ["--dataset", "synthetic", "--limit", "256", "--batch-size", "32", "--epochs", "3",
                   "--log-every", "1", "--out", out]
    proc = run_cli(args, script=signalling(tmp_path, "SIGKILL", at=19))
    finish(proc)
    assert proc.returncode == -signal.SIGKILL                         # killed, not finished
    saved = torch.load(os.path.join(out, "ckpt.pt"), weights_only=True)
    assert (saved["step"], saved["epoch"]) == (16, 2)
    assert [r["step"] for r in read_log(out) if r["kind"] == "step"][-1] == 19
    resumed = run_cli(args + ["--resume"])
    _, err = finish(resumed)
    assert resumed.returncode == 0, err
    assert torch.load(os.path.join(out, "ckpt.pt"), weights_only=True)["step"] == 24
    assert not [f for f in os.listdir(out) if f.endswith(".tmp")]   # none, even if the kill cut a save


def test_torchrun_two_gloo_processes_keep_replicas_identical(ddp_straight):
    """torchrun with 2 CPU processes (gloo) trains a few steps; every rank ends with the same student."""
    rows = read_log(ddp_straight)
    rep = [r for r in rows if r["kind"] == "replicas"]
    assert rep and rep[0]["world"] == 2 and rep[0]["max_abs_diff"] == 0.0
    assert runtime.load_checkpoint(os.path.join(ddp_straight, "ckpt.pt"))[2]["step"] == 16


@pytest.mark.skipif(not os.path.isdir("/proc/self/task"), reason="reads thread names from /proc (Linux)")
def test_torchrun_process_group_and_its_threads_end_at_destroy(tmp_path):
    """After init_distributed, a meta-device op (it imports torch._dynamo, which imports
    torch.distributed.nn, whose defaults bind group.WORLD at import) and destroy_process_group, no gloo
    thread is left. One left over outlives the group into the interpreter's exit, where freeing a
    finished collective's tensor takes the GIL and aborts the worker (SIGABRT, now and then)."""
    script = tmp_path / "worker.py"
    script.write_text(f"""import os, sys, time, types
sys.path.insert(0, {HERE!r})
import torch, torch.distributed as dist
import runtime
rank, world, _ = runtime.init_distributed(types.SimpleNamespace(device="cpu"), 2)
dist.all_reduce(torch.ones(()))
torch.zeros(2, device="meta").exp()
dist.destroy_process_group()
for _ in range(20):  # joined threads leave at once; a leaked group's stay for good
    names = [open(f"/proc/self/task/{{t}}/comm").read().strip() for t in os.listdir("/proc/self/task")]
    if not any(n.startswith(("pt_gloo", "gloo")) for n in names):
        break
    time.sleep(0.1)
with open(os.path.join({str(tmp_path)!r}, f"threads_left_{{rank}}_of_{{world}}"), "w") as f:
    f.write(" ".join(sorted(names)))
""")
    proc = run_torchrun([], script=str(script))
    _, err = finish(proc)
    assert proc.returncode == 0, err[-2000:]
    left = {name: (tmp_path / name).read_text() for name in os.listdir(tmp_path) if name.startswith("threads_left")}
    assert sorted(left) == ["threads_left_0_of_2", "threads_left_1_of_2"], err[-2000:]
    assert all("gloo" not in names for names in left.values()), left


def test_torchrun_sigterm_to_one_worker_stops_both_at_one_step_and_resumes_exactly(ddp_straight, tmp_path):
    """Under torchrun, SIGTERM to rank 1 alone during step 3 (mid-epoch) stops both ranks at that step:
    each returns 128 + 15, rank 0 saves step 3 with both ranks' generator states, and rank 1 returns only
    once the checkpoint is written, here 2 s late (torchrun stops the other ranks as soon as one ends,
    which must not cut rank 0's save short); --resume under torchrun then ends with the weights of an
    uninterrupted 2-process run. The exit statuses are read from the ranks, not from torchrun's summary,
    where a rank that torchrun stopped itself shows torchrun's signal instead."""
    out, script = str(tmp_path / "cut"), signalling(tmp_path, "SIGTERM", at=2, rank=1, slow_save=True)
    proc = run_torchrun(RESUMED + ["--out", out], script=script)
    _, err = finish(proc)
    assert proc.returncode != 0, err[-2000:]
    assert [open(f"{script}.exit{r}").read() for r in (0, 1)] == ["143 True", "143 True"], err[-2000:]
    saved = torch.load(os.path.join(out, "ckpt.pt"), weights_only=True)
    assert re.search(r"interrupted: saved \S+ at step 3;", err), err[-2000:]  # rank 0
    assert saved["step"] == 3 and len(saved["extra"]["generators"]) == 2
    proc = run_torchrun(RESUMED + ["--resume", "--out", out])
    _, err = finish(proc)
    assert proc.returncode == 0, err[-2000:]
    a = torch.load(os.path.join(ddp_straight, "ckpt.pt"), weights_only=True)
    b = torch.load(os.path.join(out, "ckpt.pt"), weights_only=True)
    assert a["step"] == b["step"] == 16
    assert_same_student(a, b)
    assert [r["step"] for r in read_log(out) if r["kind"] == "step"] == list(range(1, 17))


def test_a_signal_delivered_twice_at_once_is_one_request(monkeypatch):
    """A second SIGTERM within StopFlag.repeat_s of the first (under torchrun a terminal's Ctrl-C or
    SLURM signals every worker, and the launcher forwards the signal again) only asks for a stop, so
    the run still saves at the next step boundary; one that comes later stops at once. The clock is
    the test's, so how busy the machine is cannot move a signal across the line."""
    clock = [100.0]
    monkeypatch.setattr(runtime.time, "monotonic", lambda: clock[0])
    before = signal.getsignal(signal.SIGTERM)
    with runtime.StopFlag() as stop:
        try:
            signal.raise_signal(signal.SIGTERM)                      # the handler runs before it returns
            clock[0] += 0.9 * runtime.StopFlag.repeat_s
            signal.raise_signal(signal.SIGTERM)
        except KeyboardInterrupt:
            pytest.fail("the same signal delivered twice at once stopped the run without saving")
        assert stop.signal == signal.SIGTERM
        clock[0] += 0.2 * runtime.StopFlag.repeat_s                  # 1.1 x repeat_s after the first
        with pytest.raises(KeyboardInterrupt):
            signal.raise_signal(signal.SIGTERM)
    assert signal.getsignal(signal.SIGTERM) is before


STEP_CFG = dict(model="tiny", dim=32, depth=2, heads=2, img_size=16, patch_size=4, proj_hidden=64, proj_dim=16,
                epochs=2, warmup_epochs=1, batch_size=16)


def tiny_step(compile_=False, seed=1, **kw):
    """(run, model, opt): the loop's own step (train.stepper around train.train_step) for a tiny SiT."""
    cfg = sit.Config(**{**STEP_CFG, **kw})
    torch.manual_seed(0)
    model = sit.SiT(cfg)
    opt = train.AdamW(model, sit.schedules(cfg, 4), torch.device("cpu"))
    u = torch.empty(train.uniforms_per_step(cfg, (16, 3, 16, 16)))
    run = train.stepper(model, opt, u, torch.Generator().manual_seed(seed), *data.stats("synthetic"), compile_,
                        backend="aot_eager")  # the traced graph, without inductor's (slow on CPU) codegen
    return run, model, opt


@pytest.mark.parametrize("clip_mode", ["global", "per-tensor"])
def test_the_eager_step_reads_nothing_on_the_host(clip_mode):
    """An eager step (a CUDA run with --no-compile, or MPS) never waits for the device: no tensor is read
    into a Python number (aten::_local_scalar_dense, what .item() and a tensor passed as a scalar do)."""
    from torch.profiler import profile
    step, _, opt = tiny_step(clip_mode=clip_mode)
    images = data.synthetic(train=True, n=16).images
    step(images)
    with profile() as prof:
        step(images)
    ops = {e.key for e in prof.key_averages()}
    assert "aten::lerp_" in ops and "aten::_local_scalar_dense" not in ops
    assert opt.read()[1] == 0


def test_whole_step_is_one_graph_and_matches_eager():
    """torch.compile(fullgraph=True) takes the whole step (views, GMML on both, forward, backward,
    clipping, AdamW, teacher EMA) as one graph, and compiled steps compute what eager ones do: the
    same random numbers, losses and weights (to float32 rounding)."""
    torch._dynamo.reset()
    images = data.synthetic(train=True, n=64).images
    (eager, m_eager, o_eager), (compiled, m_compiled, o_compiled) = tiny_step(), tiny_step(compile_=True)
    before = runtime.graph_count()
    for i in range(4):
        x = images[16 * i:16 * (i + 1)]
        eager(x)
        compiled(x)
        a, b = o_eager.read(), o_compiled.read()
        assert torch.allclose(torch.tensor(a[0]), torch.tensor(b[0]), rtol=1e-5, atol=1e-6), (i, a, b)
        assert a[1:] == b[1:] == (0, 0)
    assert runtime.graph_count() - before == 1                       # one graph, no break, no recompile
    assert int(o_compiled.t) == 4 and compiled.compile_seconds > 0
    # A tensor whose true gradient is (near) zero (a bias just before a batch norm, which removes it; the final
    # norm's bias at init) gets Adam steps of rounding noise, each as large as the lr and signed by the kernels'
    # summation order (it differs between eager and compiled on a CPU with AVX-512): such tensors, and the
    # running means of the batch norms they feed, are held to twice the total lr (each run may step either way);
    # every other one to float32 rounding.
    noise = {name for name, g in first_gradients(tiny_step()[1], images[:16]).items() if g < 1e-4} | \
        {name.replace("bias", "running_mean") for name in noise_fed_norms(m_eager)}
    total_lr = 2 * o_eager.schedule[0, :4].sum().item()
    for (name, p), q in zip(m_eager.state_dict().items(), m_compiled.state_dict().values()):
        loose = name in noise or name.replace("student.", "").replace("teacher.", "") in noise
        assert torch.allclose(p.float(), q.float(), rtol=1e-4, atol=total_lr if loose else 1e-6), name
    assert len(noise) <= 12, noise                                   # a few, not the model
    assert not torch.equal(m_eager.teacher.head.net[0].weight, tiny_step()[1].teacher.head.net[0].weight)


def first_gradients(model, images):
    """{name: largest |gradient|} of the student's parameters for one eager L_total on `images` (names
    without the student. prefix)."""
    with rng.source(torch.Generator().manual_seed(0)):
        clean = data.two_views(images, model.cfg.img_size, *data.stats("synthetic"), model.cfg.crop_min)
        out = model(clean, *model.corrupt(clean))
    params = dict(model.student.named_parameters())
    return {n: g.abs().max().item() for n, g in zip(params, torch.autograd.grad(out["loss"], list(params.values())))}


def noise_fed_norms(model):
    """Names of the batch norms (as NAME.bias) right after a Linear in the student's projection head."""
    net = model.student.head.net
    return {f"head.net.{i + 1}.bias" for i, m in enumerate(net[:-1]) if isinstance(m, torch.nn.Linear)
            and isinstance(net[i + 1], torch.nn.BatchNorm1d)}


def test_the_step_draws_exactly_what_was_counted_from_its_generator():
    """uniforms_per_step counts what one step draws (rng.source refuses a stream not used up, so a
    step that drew more or fewer would fail), noise fill included; the same generator seed gives
    the same numbers and step, another seed others."""
    images = data.synthetic(train=True, n=16).images
    (a, _, oa), (b, _, ob), (c, _, oc) = tiny_step(seed=1), tiny_step(seed=1), tiny_step(seed=2)
    for s in (a, b, c):
        s(images)
    n = train.uniforms_per_step(sit.Config(**STEP_CFG), images.shape)
    assert a.u.numel() == n > 16 * 2 * 3 * 16 * 16                    # the noise fill of both views, and more
    assert torch.equal(a.u, b.u) and not torch.equal(a.u, c.u)
    assert oa.read() == ob.read() != oc.read()
    with pytest.raises(RuntimeError, match="drew"):                  # a count one short would be caught
        step, _, _ = tiny_step()
        step.u = torch.empty(n - 1)
        step(images)


def test_a_step_with_a_non_finite_gradient_changes_nothing_and_is_counted():
    """An infinite gradient (which global clipping would turn into NaN) skips the update: weights,
    teacher, AdamW's moments and step count stay as they were, the skip is counted, and the next
    step trains as usual."""
    images = data.synthetic(train=True, n=32).images
    step, model, opt = tiny_step()
    step(images[:16])
    opt.read()
    before = {k: v.clone() for k, v in model.state_dict().items() if "running" not in k and "num_batches" not in k}
    moments = [m.clone() for m in opt.exp_avg + opt.exp_avg_sq]
    hook = model.student.backbone.pos_embed.register_hook(lambda g: torch.full_like(g, float("inf")))
    step(images[16:])
    hook.remove()
    assert opt.read()[1:] == (1, 0) and int(opt.t) == 1
    for k, v in before.items():
        assert torch.equal(model.state_dict()[k], v), k
    assert all(torch.equal(a, b) for a, b in zip(opt.exp_avg + opt.exp_avg_sq, moments))
    step(images[:16])
    assert opt.read()[1:] == (0, 0) and int(opt.t) == 2
    assert not torch.equal(model.student.backbone.pos_embed, before["student.backbone.pos_embed"])


def test_an_infinite_learning_rate_is_skipped_too():
    """A non-finite lr in the schedule (the update, not the gradient, would be non-finite) skips the
    step the same way: weights, teacher and AdamW's moments as they were."""
    images = data.synthetic(train=True, n=16).images
    step, model, opt = tiny_step()
    opt.schedule[0, 0] = float("inf")
    before = {k: v.clone() for k, v in model.state_dict().items() if "running" not in k and "num_batches" not in k}
    step(images)
    assert opt.read()[1] == 1 and all(torch.equal(model.state_dict()[k], v) for k, v in before.items())
    assert all(not m.any() for m in opt.exp_avg + opt.exp_avg_sq)
    assert (int(opt.t), int(opt.step)) == (0, 1)      # no update done; the schedule moves on


def test_adamw_state_round_trip_through_a_checkpoint(tmp_path):
    """AdamW.state_dict() is torch.optim.AdamW's layout: saved in a checkpoint and loaded into a fresh
    step's state it gives back the same moments, update count and step, and the next step then makes
    the same update as the state never saved; torch.optim.AdamW accepts the same state."""
    images = data.synthetic(train=True, n=48).images
    step, model, opt = tiny_step()
    step(images[:16])
    step(images[16:32])
    path = str(tmp_path / "ckpt.pt")
    runtime.save_checkpoint(path, model.cfg, model, opt.state_dict(), step=2, epoch=0)
    _, model2, opt2 = tiny_step(seed=5)
    _, loaded, ckpt = runtime.load_checkpoint(path)
    model2.load_state_dict(loaded.state_dict())
    opt2.load_state_dict(ckpt["optimizer"], ckpt["step"])
    assert (int(opt2.t), int(opt2.step)) == (int(opt.t), int(opt.step)) == (2, 2)
    for a, b in zip(opt.exp_avg + opt.exp_avg_sq, opt2.exp_avg + opt2.exp_avg_sq):
        assert torch.equal(a, b)
    groups = [dict(params=opt2.decay), dict(params=opt2.params[len(opt2.decay):])]
    torch.optim.AdamW(groups).load_state_dict(ckpt["optimizer"])          # torch's own layout
    u = torch.rand(step.u.numel(), generator=torch.Generator().manual_seed(9))
    for m, o in ((model, opt), (model2, opt2)):
        with rng.source(u.clone()):
            train.train_step(m, o, images[32:], *data.stats("synthetic"))
    for (name, a), b in zip(model.state_dict().items(), model2.state_dict().values()):
        assert torch.equal(a, b), name


def test_adamw_matches_torch():
    """The written-out AdamW (tensor lr, wd and step) makes the same updates as torch.optim.AdamW."""
    from types import SimpleNamespace
    g = torch.Generator().manual_seed(0)
    p1 = [torch.randn(5, 3, generator=g), torch.randn(4, generator=g)]
    p2 = [p.clone().requires_grad_() for p in p1]
    opt = torch.optim.AdamW([dict(params=[p2[0]]), dict(params=[p2[1]], weight_decay=0.0)], lr=0.01,
                            weight_decay=0.05)
    ours = SimpleNamespace(params=p1, decay=[p1[0]], exp_avg=[torch.zeros_like(p) for p in p1],
                           exp_avg_sq=[torch.zeros_like(p) for p in p1], t=torch.tensor(0))
    for t in range(1, 4):
        grads = [torch.randn(p.shape, generator=g) for p in p1]
        train.adamw_(ours, grads, torch.tensor(0.01), torch.tensor(0.05), torch.tensor(True))
        for p, gr in zip(p2, grads):
            p.grad = gr.clone()
        opt.step()
    assert int(ours.t) == 3
    for a, b in zip(p1, p2):
        assert torch.allclose(a, b.detach(), atol=1e-6)
    for a, b in zip(ours.exp_avg + ours.exp_avg_sq, [opt.state[p][k] for k in ("exp_avg", "exp_avg_sq") for p in p2]):
        assert torch.allclose(a, b, atol=1e-7)


def test_clip_grad_norm_matches_torch():
    """Global-norm clipping scales all gradients by one factor, as torch.nn.utils.clip_grad_norm_."""
    g = torch.Generator().manual_seed(0)
    grads = [torch.randn(7, generator=g) * 3, torch.randn(2, 2, generator=g)]
    ref = [x.clone().requires_grad_() for x in grads]
    for r, x in zip(ref, grads):
        r.grad = x.clone()
    torch.nn.utils.clip_grad_norm_(ref, 1.0)
    train.clip_grad_norm_(grads, 1.0)
    for a, r in zip(grads, ref):
        assert torch.allclose(a, r.grad, atol=1e-6)
    assert torch.linalg.vector_norm(torch.cat([a.flatten() for a in grads])) == pytest.approx(1.0, abs=1e-4)


def test_clip_per_tensor_clips_each_tensor_on_its_own():
    """--clip-mode per-tensor (the authors' choice) brings each gradient tensor over the threshold to
    it and leaves smaller ones alone, so the update's direction changes; global keeps it."""
    grads = [torch.full((4,), 3.0), torch.full((4,), 0.1)]          # norms 6 and 0.2
    train.clip_grad_norm_(grads, 1.0, per_tensor=True)
    assert torch.linalg.vector_norm(grads[0]) == pytest.approx(1.0, abs=1e-4)
    assert torch.equal(grads[1], torch.full((4,), 0.1))
    whole = [torch.full((4,), 3.0), torch.full((4,), 0.1)]
    train.clip_grad_norm_(whole, 1.0)
    assert whole[0][0] / whole[1][0] == pytest.approx(30.0)         # direction kept


def test_bench_prints_one_line_of_consistent_numbers(capsys):
    """--bench times the loop's own step on random images, alternated 3 times with a plain eager step:
    lines whose img/s is batch / (ms/step), with host time, graphs, and no MFU on a CPU unless
    --peak-tflops gives the peak (then TFLOP/s over that peak); the last line is the median ratio."""
    assert train.main(TINY + ["--bench", "2", "--batch-size", "16"]) == 0
    lines = capsys.readouterr().out.strip().splitlines()
    number = lambda pattern, text=None: float(re.search(pattern, text or line).group(1).replace(",", ""))  # noqa
    ms_of = [number(r"([\d,.]+) ms/step", text) for text in lines[-7:-1]]
    ratios = [plain / ours for ours, plain in zip(ms_of[::2], ms_of[1::2])]     # alternated: ours, plain, ...
    assert all(" plain " in text for text in lines[-6:-1:2]) and not any(" plain " in t for t in lines[-7:-1:2])
    assert number(r"runs ([\d.]+)x as fast", lines[-1]) == pytest.approx(sorted(ratios)[1], rel=0.02)
    line = lines[-7]
    img_s, ms = number(r"([\d,.]+) img/s"), number(r"([\d,.]+) ms/step")
    assert img_s == pytest.approx(16 / (ms / 1e3), rel=0.01) and ms > 0
    assert "MFU not known" in line and "host" in line and "compiled graph(s)" in line and "eager on cpu" in line
    train.main(TINY + ["--bench", "2", "--batch-size", "16", "--peak-tflops", "0.001"])
    line = capsys.readouterr().out.strip().splitlines()[-7]
    tflops, mfu = number(r"([\d.e+-]+) TFLOP/s"), number(r"MFU ([\d.e+-]+)%")
    assert mfu == pytest.approx(100 * tflops / 0.001, rel=0.01)


FAULTS = """
import resource, sys, torch
import runtime
if sys.argv[1] == "keep":
    runtime.keep_freed_memory()
def step():                                 # a step's activations: 24 x 8 MiB made, written and freed
    return [torch.ones(2 << 20) for _ in range(24)]
step()
before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
for _ in range(5):
    step()
print(resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before)
"""


@pytest.mark.skipif("glibc" not in (os.confstr("CS_GNU_LIBC_VERSION") or "" if hasattr(os, "confstr") else ""),
                    reason="glibc's malloc only")
def test_freed_cpu_memory_is_reused_not_faulted_in_again(monkeypatch):
    """After runtime.keep_freed_memory, 5 steps that each make and free 192 MiB of tensors page-fault
    at most one tensor's worth (2,048 pages of 4 KiB) in all, where glibc's defaults fault in some or
    all of it again at every step; train.py and eval.py set it first thing."""
    pages = {}
    for mode in ("default", "keep"):
        out = subprocess.run([sys.executable, "-c", FAULTS, mode], capture_output=True, text=True, cwd=HERE,
                             env=dict(os.environ, OMP_NUM_THREADS="1"))
        pages[mode] = int(out.stdout)
    assert pages["keep"] <= 2048 < pages["default"], pages
    import eval
    for main in (train.main, eval.main):
        calls = []
        monkeypatch.setattr(runtime, "keep_freed_memory", lambda: calls.append(1))
        try:
            main(["--no-such-flag"])
        except SystemExit:
            pass
        assert calls == [1], main.__module__


def test_bench_yardstick_is_a_whole_step():
    """The plain step that --bench compares against trains the student and moves the teacher, so the
    ratio compares two whole steps."""
    cfg = sit.Config(dim=32, depth=2, heads=2, img_size=16, patch_size=4, proj_hidden=64, proj_dim=16)
    model = sit.SiT(cfg)
    clean = torch.randn(8, 3, 16, 16)
    inputs = (clean, *model.corrupt(clean))
    before = {k: v.clone() for k, v in model.state_dict().items()}
    train.plain_step(model, inputs, bf16=False)()
    after = model.state_dict()
    for part in ("student", "teacher"):
        key = f"{part}.backbone.blocks.0.attn.qkv.weight"
        assert not torch.equal(before[key], after[key]), part


# --- bad input: one line on stderr, non-zero exit, nothing overwritten --------------------------

@pytest.mark.parametrize("args, message", [
    (["--dataset", "nosuchset"], "--dataset nosuchset: must be one of cifar10"),
    (["--dataset", "/nonexistent/folder/x"], "--dataset /nonexistent/folder/x: must be one of"),
    (["--dataset", "synthetic", "--img-size", "18"], "not a multiple"),
    (["--dataset", "synthetic", "--batch-size", "4096"], "larger than the dataset"),
    (["--dataset", "synthetic", "--epochs", "0"], "--epochs 0: must be an integer >= 1"),
    (["--dataset", "synthetic", "--resume"], "no checkpoint to resume"),
])
def test_bad_input_one_line_error(args, message, tmp_path, capsys):
    """Each mistake gives one line on stderr and a non-zero exit code."""
    assert run_main(TINY + args, tmp_path) != 0
    err = capsys.readouterr().err.strip()
    assert message in err and len(err.splitlines()) == 1 and err.startswith("train.py: error:")


def test_folder_without_images_is_an_error(tmp_path, capsys):
    """A folder with no image files is a one-line error."""
    (tmp_path / "empty").mkdir()
    assert run_main(TINY + ["--dataset", str(tmp_path / "empty")], tmp_path) != 0
    assert "no images" in capsys.readouterr().err


def test_existing_run_is_not_overwritten(tmp_path, capsys):
    """Starting a new run in a folder that holds one, without --resume, fails and changes nothing."""
    args = TINY + ["--dataset", "synthetic", "--limit", "64", "--batch-size", "32", "--epochs", "1"]
    assert run_main(args, tmp_path) == 0
    before = (tmp_path / "run" / "ckpt.pt").read_bytes()
    capsys.readouterr()
    assert run_main(args, tmp_path) != 0
    assert "already holds a run" in capsys.readouterr().err
    assert (tmp_path / "run" / "ckpt.pt").read_bytes() == before


@pytest.mark.parametrize("resume", [[], ["--resume"]], ids=["new", "resume"])
def test_run_that_never_saved_starts_afresh(resume, tmp_path, capsys):
    """A folder with config.json and a log ending in a line cut short, but no ckpt.pt (a kill -9
    before the first save), is started afresh with or without --resume: exit 0, one note saying so,
    and the log holds the new run's rows only."""
    folder = tmp_path / "run"
    folder.mkdir()
    (folder / "config.json").write_text(json.dumps({"epochs": 99}))
    (folder / "log.jsonl").write_text('{"kind": "step", "step": 1, "loss": -1.0}\n{"kind": "step", "st')
    args = TINY + ["--dataset", "synthetic", "--limit", "64", "--batch-size", "32", "--epochs", "2",
                   "--log-every", "1"]
    assert run_main(args + resume, tmp_path) == 0
    notes = [line for line in capsys.readouterr().err.splitlines() if "note:" in line]
    assert len(notes) == 1 and "never saved a checkpoint; starting it afresh" in notes[0], notes
    rows = read_log(folder)
    assert [r["step"] for r in rows if r["kind"] == "step"] == [1, 2, 3, 4]
    assert all(r.get("loss") != -1.0 for r in rows)
    assert runtime.load_checkpoint(str(folder / "ckpt.pt"))[2]["step"] == 4


# --- failures on the way: a full disk, out of memory -----------------------------------------

def test_failed_checkpoint_write_stops_and_keeps_the_previous_one(tmp_path, monkeypatch):
    """A checkpoint write that fails (disk full at the second save) ends the run at once with one
    line naming the path and saying that the previous checkpoint is kept, a non-zero exit status,
    and that previous checkpoint (epoch 1) still loads whole."""
    real, calls = runtime.atomic_save, []

    def disk_full_the_second_time(state, path):
        calls.append(path)
        if len(calls) == 2:
            raise OSError(errno.ENOSPC, "No space left on device")
        real(state, path)

    monkeypatch.setattr(runtime, "atomic_save", disk_full_the_second_time)
    args = TINY + ["--dataset", "synthetic", "--limit", "64", "--batch-size", "32", "--epochs", "3"]
    with pytest.raises(SystemExit) as stop:
        run_main(args, tmp_path)
    message, path = stop.value.code, str(tmp_path / "run" / "ckpt.pt")
    assert isinstance(message, str) and "\n" not in message                 # exit status 1, one line
    assert message.startswith(f"train.py: error: could not write {path} (No space left on device)")
    assert "previous checkpoint is kept" in message and len(calls) == 2
    saved = runtime.load_checkpoint(path)[2]
    assert (saved["step"], saved["epoch"]) == (2, 1)


def test_atomic_save_cut_short_leaves_no_temp_file(tmp_path, monkeypatch):
    """torch.save failing mid-write (disk full after some bytes) leaves no temp file beside the
    checkpoint, and the checkpoint already there unchanged."""
    path = tmp_path / "ckpt.pt"
    runtime.atomic_save({"step": 1}, str(path))

    def half_written(obj, f):
        f.write(b"\0" * 1000)
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(torch, "save", half_written)
    with pytest.raises(OSError):
        runtime.atomic_save({"step": 2}, str(path))
    monkeypatch.undo()
    assert os.listdir(tmp_path) == ["ckpt.pt"]
    assert torch.load(path, weights_only=True) == {"step": 1}


def test_out_of_memory_is_one_line_naming_batch_size(tmp_path, monkeypatch, capsys):
    """CUDA running out of memory in a training step ends the run with a non-zero exit status and
    one line on stderr, on a line of its own (the progress bar cleared), that names --batch-size and
    what to lower."""
    calls, step = [0], train.train_step

    def out_of_memory(model, opt, x, mean, std):                     # in epoch 2, after the first save
        calls[0] += 1
        if calls[0] == 3:
            raise torch.cuda.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB")
        step(model, opt, x, mean, std)

    monkeypatch.setattr(train, "train_step", out_of_memory)
    args = TINY + ["--dataset", "synthetic", "--limit", "64", "--batch-size", "32", "--epochs", "2"]
    assert run_main(args, tmp_path) == 1
    assert torch.load(tmp_path / "run" / "ckpt.pt", weights_only=True)["step"] == 2    # epoch 1's, kept
    err = capsys.readouterr().err
    shown = err.split("\r")[-1]                      # what a terminal shows: tqdm redraws with \r
    assert err.count("\n") == 1 and shown.startswith("train.py: error: out of GPU memory"), repr(err)
    assert "--batch-size 32" in shown and "lower --batch-size" in shown


# --- --time-budget ----------------------------------------------------------------------------

def test_time_budget_sets_the_length_and_uses_the_whole_budget(tmp_path):
    """--time-budget 0.1 (6 s) with --epochs 1000: the run measures its speed, logs a budget row (and
    one more at each quarter of the budget where it measures again), the last with the N steps that
    fit (fewer than 1000 epochs' worth, ending inside an epoch if that is where the time ends), writes
    N into config.json, trains exactly N steps (the checkpoint says so), logs each epoch end and the
    last step, exits 0, and takes most of the budget, not a whole epoch less."""
    budget_s = 6
    t = time.time()
    code = run_main(TINY + ["--dataset", "synthetic", "--limit", "256", "--batch-size", "32",
                            "--epochs", "1000", "--time-budget", str(budget_s / 60)], tmp_path)
    seconds = time.time() - t
    assert code == 0
    folder = tmp_path / "run"
    rows = read_log(folder)
    budget = [r for r in rows if r["kind"] == "budget"]
    assert 1 <= len(budget) <= 4 and 8 <= budget[-1]["steps"] < 8 * 1000, budget
    n = budget[-1]["steps"]
    assert json.load(open(folder / "config.json"))["total_steps"] == n
    ckpt = torch.load(folder / "ckpt.pt", weights_only=True)
    assert (ckpt["step"], ckpt["epoch"], ckpt["extra"]["total_steps"]) == (n, n // 8, n)
    ends = [r["step"] for r in rows if r["kind"] == "epoch" and "loss" in r]
    assert ends == list(range(8, n + 1, 8)) + ([n] if n % 8 else [])
    assert 0.7 * budget_s < seconds < budget_s + 20, f"{seconds:.1f} s for a {budget_s} s budget"


def test_time_budget_of_a_run_stopped_before_fitting_it_is_fitted_on_resume(tmp_path, monkeypatch):
    """A --time-budget run stopped (SIGTERM) before it has measured its speed still has its epochs to
    fit when resumed: budget rows, and N < 1000 epochs trained, not the 1000 of --epochs."""
    def sigterm_instead(self, step):                  # as a SIGTERM in the run's first seconds
        signal.raise_signal(signal.SIGTERM)
        return False

    args = TINY + ["--dataset", "synthetic", "--limit", "256", "--batch-size", "32", "--epochs", "1000",
                   "--time-budget", "0.05", "--log-every", "1"]
    with monkeypatch.context() as patch:
        patch.setattr(runtime.Budget, "ready", sigterm_instead)
        assert run_main(args, tmp_path) == 128 + signal.SIGTERM
    assert torch.load(tmp_path / "run" / "ckpt.pt", weights_only=True)["step"] == 1
    assert run_main(args + ["--resume"], tmp_path) == 0
    budget = [r for r in read_log(tmp_path / "run") if r["kind"] == "budget"]
    assert 1 <= len(budget) <= 4 and budget[-1]["steps"] < 8 * 1000, budget
    assert torch.load(tmp_path / "run" / "ckpt.pt", weights_only=True)["step"] == budget[-1]["steps"]


def test_time_budget_measures_again_as_the_speed_drifts(monkeypatch):
    """A machine that speeds up after the first steps (as a CPU does) would end a budget early if the
    length were fitted once: the budget measures again at each quarter, from the steps since the
    last fit, so the last fit ends the run on time."""
    clock = [0.0]
    monkeypatch.setattr(runtime.time, "time", lambda: clock[0])
    budget, step, fits = runtime.Budget(1.0), 0, []                      # 60 s
    total = None
    while total is None or step < total:
        if budget.ready(step):
            left, _ = budget.steps_left(step)
            total = step + left
            fits.append(total)
        clock[0] += 1.0 if step < 10 else 0.5                           # 1 s a step, then 0.5 s
        step += 1
    assert len(fits) == 4 and fits[0] < fits[-1]
    assert fits[0] == 10 + 50 and 59 <= clock[0] <= 61                  # first fit: 50 more s at 1 s a step


def test_schedules_resized_twice_continue_from_the_table_in_use():
    """Fitting a budget more than once resizes the schedule from the table in use (not from the formula
    for the old length): the steps done are kept, and every row goes on from its current value."""
    cfg, spe = sit.Config(epochs=10, warmup_epochs=1, lr=1e-3, batch_size=256), 10
    first = train.schedule_for(cfg, spe, 60, sit.schedules(cfg, spe), step=20)
    second = train.schedule_for(cfg, spe, 40, first, step=30)
    assert torch.equal(second[:, :30], first[:, :30])
    assert torch.allclose(second[:, 30], first[:, 30]) and torch.allclose(second[:, 40], sit.schedules(cfg, spe)[:, -1])
    diff = second[:, 1:] - second[:, :-1]
    assert (diff[0, 10:] <= 0).all() and (diff[1:] >= 0).all()          # lr falls after warm-up; wd, m rise


CLOCK_SKEW = """import os, time
if os.environ.get("RANK") == "1":                    # this process's clock runs 3x slow
    _time, _t0 = time.time, time.time()
    time.time = lambda: _t0 + (_time() - _t0) / 3
"""


def test_time_budget_under_torchrun_with_clocks_that_differ(tmp_path):
    """Under torchrun the ranks fit the budget at the same step even when their clocks disagree
    (here rank 1's runs 3x slow, as a host running ahead of its GPU would measure): budget rows,
    the run ends after those epochs on both ranks with identical replicas, instead of one rank
    all-reducing alone (a hang, or gloo aborting)."""
    (tmp_path / "skew").mkdir()
    (tmp_path / "skew" / "sitecustomize.py").write_text(CLOCK_SKEW)
    out = str(tmp_path / "run")
    path = [str(tmp_path / "skew")] + [p for p in [os.environ.get("PYTHONPATH")] if p]
    proc = run_torchrun(TINY + ["--dataset", "synthetic", "--limit", "256", "--batch-size", "32", "--epochs",
                                "1000", "--log-every", "1", "--time-budget", "0.05", "--out", out],
                        env=dict(PYTHONPATH=os.pathsep.join(path)))
    _, err = finish(proc)
    assert proc.returncode == 0, err[-2000:]
    rows = read_log(out)
    budget = [r for r in rows if r["kind"] == "budget"]
    assert 1 <= len(budget) <= 4 and budget[-1]["steps"] < 8 * 1000
    assert torch.load(os.path.join(out, "ckpt.pt"), weights_only=True)["step"] == budget[-1]["steps"]
    assert [r["max_abs_diff"] for r in rows if r["kind"] == "replicas"] == [0.0]


# --- learning on real data --------------------------------------------------------------------

@pytest.mark.skipif(not os.path.exists(os.path.join(data.FASHION_MNIST_DEBIAN, "train-images-idx3-ubyte.gz")),
                    reason="Fashion-MNIST not installed (apt-get install dataset-fashion-mnist; .ci/run does)")
def test_pretraining_on_fashion_mnist_beats_random_init(tmp_path):
    """A seeded CPU pretraining on Fashion-MNIST (a 64-wide, 2-block ViT, 128 steps, crops of at least
    half the image, which learn faster than the paper's 0.2 at this length) raises the teacher's k-NN
    accuracy at least 5 points above the same encoder at random init (measured: 59.5 -> 66.9)."""
    t = time.time()
    code = run_main(["--dataset", "fashion-mnist", "--device", "cpu", "--model", "tiny", "--dim", "64",
                     "--depth", "2", "--heads", "2", "--img-size", "28", "--patch-size", "7",
                     "--proj-hidden", "256", "--proj-dim", "128", "--limit", "4096", "--batch-size", "128",
                     "--epochs", "4", "--warmup-epochs", "0.5", "--lr", "5e-3", "--alpha", "1", "--crop-min", "0.5",
                     "--momentum-teacher", "0.9", "--knn-every", "0", "--log-every", "1000", "--seed", "0"],
                    tmp_path)
    seconds = time.time() - t
    assert code == 0
    knn = [r["knn"] for r in read_log(tmp_path / "run") if "knn" in r]
    print(f"k-NN {knn[0]:.2f}% at init -> {knn[-1]:.2f}% after pretraining, {seconds:.0f} s")
    assert knn[-1] >= knn[0] + 5


def test_folder_streamed_through_dataloader(tmp_path, monkeypatch):
    """A folder too large to hold is streamed each epoch by a DataLoader; training still runs."""
    from PIL import Image
    for i in range(40):
        Image.new("RGB", (24, 20), (i * 6, 100, 255 - i * 6)).save(tmp_path / f"{i}.png")
    monkeypatch.setattr(data, "MEMORY_BUDGET", 0)
    streamed = data.load(str(tmp_path), size=16)
    assert streamed.images is None and len(streamed) == 40
    code = run_main(TINY + ["--dataset", str(tmp_path), "--batch-size", "16", "--epochs", "1",
                            "--workers", "0", "--log-every", "1"], tmp_path)
    assert code == 0
    steps = [r["step"] for r in read_log(tmp_path / "run") if r["kind"] == "step"]
    assert steps == [1, 2]


def test_weights_gone_bad_stop_the_run_and_keep_the_last_good_checkpoint(tmp_path, monkeypatch, capsys):
    """An absurd but finite lr from epoch 2 on (1e30: the update is finite, the weights then huge,
    and the next loss NaN) stops the run with one line; the epoch-1 checkpoint stays as it was,
    with finite weights."""
    lr_at = sit.lr_at
    monkeypatch.setattr(sit, "lr_at", lambda s, cfg, n, total=None: 1e30 if s >= n else lr_at(s, cfg, n, total))
    args = TINY + ["--dataset", "synthetic", "--limit", "128", "--batch-size", "32", "--epochs", "3",
                   "--clip-grad", "0", "--log-every", "1"]
    with pytest.raises(SystemExit) as stop:
        run_main(args, tmp_path)
    assert "the loss is not finite" in str(stop.value) and "last good checkpoint is kept" in str(stop.value)
    saved = torch.load(tmp_path / "run" / "ckpt.pt", weights_only=True)
    assert (saved["epoch"], saved["step"]) == (1, 4)
    assert all(torch.isfinite(v).all() for v in saved["student"].values() if v.is_floating_point())


def test_a_bad_update_on_the_last_step_before_a_save_is_skipped_not_saved(tmp_path, monkeypatch):
    """An infinite lr on step 4, the last of epoch 1 (a save follows it): the update is skipped and
    counted in the log, the checkpoint written after it holds finite weights, and the run goes on to
    its end."""
    lr_at = sit.lr_at
    monkeypatch.setattr(sit, "lr_at", lambda s, cfg, n, total=None: math.inf if s == 3 else lr_at(s, cfg, n, total))
    args = TINY + ["--dataset", "synthetic", "--limit", "128", "--batch-size", "32", "--epochs", "2",
                   "--log-every", "1"]
    assert run_main(args, tmp_path) == 0
    rows = [r for r in read_log(tmp_path / "run") if r["kind"] == "step"]
    assert [r["skipped"] for r in rows] == [0, 0, 0, 1, 0, 0, 0, 0]
    saved = torch.load(tmp_path / "run" / "ckpt.pt", weights_only=True)
    assert saved["step"] == 8 and saved["optimizer"]["state"][0]["step"] == 7   # 8 steps, 7 updates
    assert all(torch.isfinite(v).all() for v in saved["student"].values() if v.is_floating_point())


def test_non_finite_weights_are_never_saved(tmp_path, monkeypatch):
    """Whatever made the weights non-finite (here: the teacher EMA poisoned on the last step before
    the epoch-2 save), the save refuses them: one line, and the epoch-1 checkpoint is kept."""
    calls, update = [0], sit.SiT.update_teacher

    def poisoned(self, m):
        calls[0] += 1
        update(self, m)
        if calls[0] == 8:
            with torch.no_grad():
                self.teacher.head.net[0].weight.fill_(math.nan)
    monkeypatch.setattr(sit.SiT, "update_teacher", poisoned)
    args = TINY + ["--dataset", "synthetic", "--limit", "128", "--batch-size", "32", "--epochs", "3"]
    with pytest.raises(SystemExit) as stop:
        run_main(args, tmp_path)
    assert str(stop.value).startswith("train.py: error: the weights are not finite at step 8")
    assert "last good checkpoint is kept" in str(stop.value) and "\n" not in str(stop.value)
    assert torch.load(tmp_path / "run" / "ckpt.pt", weights_only=True)["step"] == 4


def test_failed_log_write_is_one_line(tmp_path, monkeypatch, capsys):
    """A log.jsonl that cannot be written (disk full) ends the run with one line, not a traceback."""
    def full(self, **row):
        raise OSError(28, "No space left on device", str(tmp_path / "run" / "log.jsonl"))
    monkeypatch.setattr(runtime.Log, "write", full)
    code = run_main(TINY + ["--dataset", "synthetic", "--limit", "64", "--batch-size", "32", "--epochs", "2"],
                    tmp_path)
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 1 and len(err) == 1 and "No space left on device" in err[0] and "log.jsonl" in err[0]


# --- --resume: every flag given is honoured or refused in one line --------------------------------

# a value other than the run's for every flag (the run: TINY + FINISHED below)
RESUME_CHANGED = {
    "model": "small", "dim": "64", "depth": "3", "heads": "4", "mlp_ratio": "2", "img_size": "32", "patch_size": "8",
    "in_chans": None, "crop_min": "0.5", "drop_path": "0.2", "proj_hidden": "128", "proj_dim": "32", "drop_perc": "0.7",
    "drop_replace": "0.5", "drop_align": "2", "drop_type": "zeros", "max_block": "0.5", "alpha": "1", "tau": "0.1",
    "epochs": "5", "batch_size": "16", "lr": "1e-3", "min_lr": "1e-5", "warmup_epochs": "2", "weight_decay": "0.05",
    "weight_decay_end": "0.2", "momentum_teacher": "0.99", "clip_grad": "1", "clip_mode": "per-tensor",
    "head_bn": "view", "dataset": "fashion-mnist", "data_dir": "{tmp}", "limit": "96", "workers": "0",
    "out": None, "device": "cpu", "compile": None, "cuda_graphs": None, "bf16": None, "resume": None,
    "save_every": "5",
    "time_budget": "1", "knn_every": "2", "log_every": "3", "bench": None, "peak_tflops": "100", "seed": "7",
    "recipe": "fmnist-2min",
}
FINISHED = ["--dataset", "synthetic", "--limit", "128", "--batch-size", "32", "--epochs", "2", "--log-every", "1"]


@pytest.fixture(scope="module")
def finished(tmp_path_factory):
    """A finished 2-epoch run (4 steps an epoch)."""
    out = tmp_path_factory.mktemp("finished") / "run"
    assert train.main(TINY + FINISHED + ["--out", str(out)]) == 0
    return out


def test_every_flag_given_with_resume_is_honoured_or_refused(finished, tmp_path):
    """Each flag of train.py given with --resume and a value other than the run's is either used (how
    and where the run goes on, and its length: runtime.RESUME_HONOURS) or refused with one line naming
    the flag, both values and what may change; given with the run's own value it is accepted."""
    assert set(RESUME_CHANGED) == set(runtime.TRAIN_FLAGS)
    for name, value in RESUME_CHANGED.items():
        if value is None:                                            # no value to change (switches, --out)
            continue
        value = value.format(tmp=tmp_path)
        argv = TINY + FINISHED + ["--out", str(finished), "--resume", f"--{name.replace('_', '-')}={value}"]
        if name in runtime.RESUME_HONOURS:
            cfg, run, given, _ = train.configure(argv)
            now = getattr(cfg, name, getattr(run, name, None))
            assert name in given and str(now) in (value, str(float(value)) if value[0].isdigit() else value), name
        else:
            with pytest.raises(ValueError) as e:
                train.configure(argv)
            msg = str(e.value)
            assert msg.startswith(f"--{name.replace('_', '-')} ") and "--resume cannot change" in msg, msg
            assert "\n" not in msg
    cfg, run, _, _ = train.configure(TINY + FINISHED + ["--out", str(finished), "--resume", "--lr", "5e-4"])
    assert cfg.lr == 5e-4 and cfg.epochs == 2 and run.limit == 128           # the run's own lr: accepted


def test_resume_with_more_epochs_extends_the_run_smoothly(finished, tmp_path, capsys):
    """A finished 2-epoch run resumed with --epochs 3 trains the third epoch: its schedules are
    rebuilt for the new length from the current step and go on without a jump; the warm-up note is
    computed from the recipe that runs (its own warm-up of 1, not the default 10); resumed without
    --epochs it refuses in one line and says how to extend it."""
    import shutil
    out = tmp_path / "run"
    shutil.copytree(finished, out)
    assert train.main(TINY + FINISHED + ["--out", str(out), "--resume"]) == 2
    assert "--resume with --epochs N (N > 2" in capsys.readouterr().err
    argv = ["--model", "tiny", "--dim", "32", "--depth", "2", "--heads", "2", "--img-size", "16", "--patch-size", "4",
            "--proj-hidden", "64", "--proj-dim", "16", "--device", "cpu", "--knn-every", "0", "--out", str(out),
            "--resume", "--epochs", "3", "--log-every", "1"]        # --warmup-epochs not given: the run's 1
    assert train.main(argv) == 0
    captured = capsys.readouterr()
    assert "note:" not in captured.err and "schedules now end at step 12 instead of 8" in captured.out
    saved = torch.load(out / "ckpt.pt", weights_only=True)
    assert (saved["step"], saved["extra"]["total_steps"], saved["config"]["epochs"]) == (12, 12, 3)
    lrs = [r["lr"] for r in read_log(out) if r["kind"] == "step"]
    assert len(lrs) == 12 and abs(lrs[8] - lrs[7]) <= abs(lrs[7] - lrs[6]) + 1e-9     # no jump at the resume


# --- a real full disk --------------------------------------------------------------------------

DISK_RUN = TINY + ["--dataset", "synthetic", "--limit", "128", "--batch-size", "32", "--epochs", "2"]


def test_a_file_size_limit_on_the_checkpoint_is_one_line(tmp_path):
    """A real failed write (a file-size limit below the checkpoint's size, so torch's zip writer
    fails inside torch.save, as on a full disk): one line naming the checkpoint and the space it
    needs, exit status 1, no traceback, no temp file left."""
    import resource

    def limit():                                                      # in the child, before train.py starts
        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)                 # the write fails instead of killing
        resource.setrlimit(resource.RLIMIT_FSIZE, (100_000, 100_000))   # bytes; a checkpoint is ~700 kB
    out = tmp_path / "run"
    proc = subprocess.run([sys.executable, os.path.join(HERE, "train.py"), *DISK_RUN, "--out", str(out)], cwd=HERE,
                          env=dict(os.environ, OMP_NUM_THREADS="1"), capture_output=True, text=True, timeout=300,
                          preexec_fn=limit)
    lines = [line for line in proc.stderr.replace("\r", "\n").splitlines() if line.strip()]
    assert proc.returncode == 1 and "Traceback" not in proc.stderr, proc.stderr[-2000:]
    assert lines[-1].startswith(f"train.py: error: could not write {out / 'ckpt.pt'} ("), lines[-1]
    assert "MiB in" in lines[-1] and str(out) in lines[-1]
    assert not [f for f in os.listdir(out) if f.endswith(".tmp")] and not (out / "ckpt.pt").exists()


@pytest.fixture
def small_disk(tmp_path):
    """A 1 MiB filesystem (tmpfs, mounted for the test: needs root), room for one tiny checkpoint only."""
    folder = tmp_path / "small"
    folder.mkdir()
    if subprocess.run(["mount", "-t", "tmpfs", "-o", "size=1m", "tmpfs", str(folder)], capture_output=True).returncode:
        pytest.skip("cannot mount a small tmpfs here (needs root)")
    yield folder
    subprocess.run(["umount", "-l", str(folder)], check=False)


def test_a_full_disk_keeps_the_previous_checkpoint(small_disk, capsys):
    """On a real full filesystem the second checkpoint (written beside the first before it replaces
    it) does not fit: the run stops with one line naming the checkpoint and what to free, and the
    first checkpoint (epoch 1) is whole."""
    out = small_disk / "run"
    with pytest.raises(SystemExit) as stop:
        train.main(DISK_RUN + ["--out", str(out)])
    message = stop.value.code
    assert isinstance(message, str) and "\n" not in message
    assert message.startswith(f"train.py: error: could not write {out / 'ckpt.pt'} (") and "MiB in" in message
    saved = runtime.load_checkpoint(str(out / "ckpt.pt"))[2]
    assert (saved["step"], saved["epoch"]) == (4, 1)
    assert not [f for f in os.listdir(out) if f.endswith(".tmp")]


def test_bf16_autocast_where_it_pays_and_on_request(tmp_path, capsys):
    """bf16 autocast: by default on CUDA, and on a CPU with bf16 instructions only for D >= 192 (where
    it measured faster); --bf16 / --no-bf16 decide; a --bf16 run on the CPU trains with finite losses
    and says bf16 in its benchmark line."""
    cpu, run = torch.device("cpu"), runtime.Run()
    native = os.path.exists("/proc/cpuinfo") and "bf16" in open("/proc/cpuinfo").read()
    assert runtime.bf16(run, cpu, 128) is False and runtime.bf16(run, cpu, 192) is native
    assert runtime.bf16(runtime.Run(bf16=False), cpu, 384) is False and runtime.bf16(runtime.Run(bf16=True), cpu, 32)
    assert runtime.bf16(run, torch.device("cuda"), 32) is True
    assert run_main(TINY + ["--dataset", "synthetic", "--limit", "64", "--batch-size", "32", "--epochs", "1",
                            "--bf16", "--log-every", "1"], tmp_path) == 0
    rows = [r for r in read_log(tmp_path / "run") if r["kind"] == "step"]
    assert len(rows) == 2 and all(math.isfinite(r["loss"]) and r["skipped"] == 0 for r in rows)
    train.main(TINY + ["--bench", "1", "--batch-size", "16", "--bf16"])
    assert " bf16 batch 16 eager on cpu" in capsys.readouterr().out


def test_a_checkpoint_written_before_the_restructuring_resumes_and_evaluates(finished, tmp_path):
    """A checkpoint in the layout older code wrote (one config dict with the run's options mixed in,
    no total_steps, a single `generator`) still loads for evaluation and resumes with --epochs."""
    import shutil
    import eval as ev
    out = tmp_path / "old"
    shutil.copytree(finished, out)
    ckpt = torch.load(out / "ckpt.pt", weights_only=True)
    ckpt["config"].update(peak_tflops=989.0, compile=False)               # as the older Config held them
    ckpt["extra"] = dict(generator=ckpt["extra"]["generators"][0], generators=ckpt["extra"]["generators"],
                         budget_pending=False)
    torch.save(ckpt, out / "ckpt.pt")
    vit, _, epochs = ev.encoder(ev.parse_args([str(out / "ckpt.pt"), "--mode", "knn"]), torch.device("cpu"))
    assert epochs == 2 and torch.equal(vit.pos_embed, ckpt["teacher"]["backbone.pos_embed"])
    assert train.main(["--out", str(out), "--resume", "--epochs", "3", "--device", "cpu", "--knn-every", "0"]) == 0
    assert torch.load(out / "ckpt.pt", weights_only=True)["step"] == 12
