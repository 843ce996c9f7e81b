"""Tests of train.py and data.py (CPU, seeded, no network)."""
import json
import os
import signal
import subprocess
import sys
import time

import pytest
import torch

import data
import sit
import train

HERE = os.path.dirname(os.path.abspath(__file__))
TINY = ["--model", "tiny", "--dim", "32", "--depth", "2", "--heads", "2", "--img-size", "16",
        "--patch-size", "4", "--proj-hidden", "64", "--proj-dim", "16", "--device", "cpu",
        "--warmup-epochs", "1", "--knn-every", "0"]


def run_main(args, tmp_path, name="run"):
    return train.main(["--out", str(tmp_path / name)] + args)


def read_log(folder):
    with open(os.path.join(folder, "log.jsonl")) as f:
        return [json.loads(line) for line in f]


def run_cli(args, **kw):
    env = dict(os.environ, OMP_NUM_THREADS="1")
    return subprocess.Popen([sys.executable, os.path.join(HERE, "train.py")] + args, cwd=HERE, env=env,
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True, **kw)


# --- data pipeline ----------------------------------------------------------------------------

def test_two_views_shape_range_and_seed():
    """Both views are normalised (2B, 3, S, S) floats, reproducible from the generator seed."""
    x = data.synthetic(train=True, n=8).images
    mean, std = data.STATS["synthetic"]
    a = data.two_views(x, 16, mean, std, torch.Generator().manual_seed(3))
    b = data.two_views(x, 16, mean, std, torch.Generator().manual_seed(3))
    c = data.two_views(x, 16, mean, std, torch.Generator().manual_seed(4))
    assert a.shape == (16, 3, 16, 16) and torch.isfinite(a).all()
    assert torch.equal(a, b) and not torch.equal(a, c)
    unit = data.denormalize(a, mean, std)
    assert not torch.allclose(unit[:8], unit[8:])                  # the two views differ


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
    cfg, model, ckpt = sit.load_checkpoint(str(folder / "ckpt.pt"))
    assert (ckpt["step"], ckpt["epoch"]) == (8, 2) and cfg.dim == 32
    rows = read_log(folder)
    steps = [r for r in rows if r["kind"] == "step"]
    assert [r["step"] for r in steps] == [2, 4, 6, 8]
    assert all(torch.isfinite(torch.tensor(r["loss"])) for r in steps)
    knn = [r["knn"] for r in rows if "knn" in r]
    assert len(knn) == 3 and all(0 <= a <= 100 for a in knn)        # init, epoch 1, epoch 2
    assert json.load(open(folder / "config.json"))["epochs"] == 2


def test_interrupted_run_resumes_exactly(tmp_path):
    """SIGTERM mid-epoch saves the exact step; --resume then ends with the same weights as an
    uninterrupted run (same data order, augmentation stream, optimizer and schedules)."""
    args = TINY + ["--dataset", "synthetic", "--limit", "256", "--batch-size", "32", "--epochs", "2",
                   "--log-every", "1", "--seed", "5"]
    straight = run_cli(args + ["--out", str(tmp_path / "straight")])  # same threads as the cut run
    assert straight.wait(timeout=300) == 0
    out = str(tmp_path / "cut")
    proc = run_cli(args + ["--out", out])
    log = os.path.join(out, "log.jsonl")
    deadline = time.time() + 120
    while time.time() < deadline and not (os.path.exists(log) and sum(1 for _ in open(log)) >= 3):
        time.sleep(0.05)
    proc.send_signal(signal.SIGTERM)
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == 128 + signal.SIGTERM, err
    cut_step = torch.load(os.path.join(out, "ckpt.pt"), weights_only=True)["step"]
    assert 0 < cut_step < 16
    assert run_cli(args + ["--out", out, "--resume"]).wait(timeout=300) == 0
    a = torch.load(tmp_path / "straight" / "ckpt.pt", weights_only=True)
    b = torch.load(os.path.join(out, "ckpt.pt"), weights_only=True)
    assert a["step"] == b["step"] == 16
    for k in a["student"]:
        assert torch.equal(a["student"][k], b["student"][k]), k
    steps = [r["step"] for r in read_log(out) if r["kind"] == "step"]
    assert steps == list(range(1, 17))                               # no step lost or logged twice
    lr_a = [r["lr"] for r in read_log(tmp_path / "straight") if r["kind"] == "step"]
    lr_b = [r["lr"] for r in read_log(out) if r["kind"] == "step"]
    assert lr_a == lr_b


def test_killed_run_loses_at_most_one_epoch(tmp_path):
    """SIGKILL mid-run leaves the last epoch-end checkpoint whole; --resume finishes the run."""
    out = str(tmp_path / "killed")
    args = TINY + ["--dataset", "synthetic", "--limit", "256", "--batch-size", "32", "--epochs", "3",
                   "--log-every", "1", "--out", out]
    proc = run_cli(args)
    ckpt = os.path.join(out, "ckpt.pt")
    deadline = time.time() + 120
    while time.time() < deadline and not os.path.exists(ckpt):
        time.sleep(0.05)
    time.sleep(0.3)
    proc.kill()
    proc.communicate(timeout=60)
    saved = torch.load(ckpt, weights_only=True)
    assert saved["step"] % 8 == 0 and saved["epoch"] >= 1
    assert not [f for f in os.listdir(out) if f.endswith(".tmp")]
    resumed = run_cli(args + ["--resume"])
    _, err = resumed.communicate(timeout=300)
    assert resumed.returncode == 0, err
    assert torch.load(ckpt, weights_only=True)["step"] == 24


def test_torchrun_two_gloo_processes_keep_replicas_identical(tmp_path):
    """torchrun with 2 CPU processes (gloo) trains a few steps; every rank ends with the same student."""
    out = str(tmp_path / "ddp")
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2", "--master_port=29517",
           os.path.join(HERE, "train.py")] + TINY + ["--dataset", "synthetic", "--limit", "128",
                                                   "--batch-size", "32", "--epochs", "1", "--out", out]
    env = dict(os.environ, OMP_NUM_THREADS="1")
    res = subprocess.run(cmd, cwd=HERE, env=env, capture_output=True, text=True, timeout=300)
    assert res.returncode == 0, res.stderr[-2000:]
    rows = read_log(out)
    rep = [r for r in rows if r["kind"] == "replicas"]
    assert rep and rep[0]["world"] == 2 and rep[0]["max_abs_diff"] == 0.0
    assert sit.load_checkpoint(os.path.join(out, "ckpt.pt"))[2]["step"] == 4


def test_bench_prints_one_line(capsys):
    """--bench times training steps on synthetic data and reports img/s, ms/step and MFU."""
    train.main(TINY + ["--bench", "2", "--batch-size", "16"])
    line = capsys.readouterr().out.strip().splitlines()[-1]
    assert "img/s" in line and "ms/step" in line and "MFU" in line


# --- bad input: one line on stderr, non-zero exit, nothing overwritten --------------------------

@pytest.mark.parametrize("args, message", [
    (["--dataset", "nosuchset"], "unknown dataset"),
    (["--dataset", "/nonexistent/folder/x"], "no such folder"),
    (["--dataset", "synthetic", "--img-size", "18"], "not a multiple"),
    (["--dataset", "synthetic", "--batch-size", "4096"], "larger than the dataset"),
    (["--dataset", "synthetic", "--epochs", "0"], "must be positive"),
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


# --- learning on real data --------------------------------------------------------------------

@pytest.mark.skipif(not os.path.exists(os.path.join(data.FASHION_MNIST_DEBIAN, "train-images-idx3-ubyte.gz")),
                    reason="Fashion-MNIST not installed (apt-get install dataset-fashion-mnist; .ci/run does)")
def test_pretraining_on_fashion_mnist_beats_random_init(tmp_path):
    """A seeded CPU pretraining of under 2 minutes on Fashion-MNIST raises the teacher's k-NN accuracy
    at least 5 points above the same encoder at random init."""
    t = time.time()
    code = run_main(["--dataset", "fashion-mnist", "--device", "cpu", "--model", "tiny", "--dim", "96",
                     "--depth", "3", "--heads", "3", "--img-size", "28", "--patch-size", "7",
                     "--proj-hidden", "512", "--proj-dim", "128", "--limit", "4096", "--batch-size", "128",
                     "--epochs", "12", "--warmup-epochs", "0.5", "--lr", "5e-3", "--alpha", "1",
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


def test_non_finite_loss_stops_and_keeps_last_good_checkpoint(tmp_path, monkeypatch, capsys):
    """A loss that turns non-finite (here: an absurd lr from epoch 2 on) stops the run with one clear
    line and leaves the epoch-1 checkpoint as it was."""
    lr_at = sit.lr_at
    monkeypatch.setattr(sit, "lr_at", lambda step, cfg, n: 1e30 if step >= n else lr_at(step, cfg, n))
    args = TINY + ["--dataset", "synthetic", "--limit", "128", "--batch-size", "32", "--epochs", "3",
                   "--clip-grad", "0", "--log-every", "1"]
    with pytest.raises(SystemExit) as stop:
        run_main(args, tmp_path)
    assert "loss is nan" in str(stop.value) or "loss is inf" in str(stop.value)
    saved = torch.load(tmp_path / "run" / "ckpt.pt", weights_only=True)
    assert (saved["epoch"], saved["step"]) == (1, 4)
    assert all(torch.isfinite(v).all() for v in saved["student"].values() if v.is_floating_point())
