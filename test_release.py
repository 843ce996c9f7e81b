"""The model shipped in models/ and the release format it is written in (export.py --format release):
it loads through the same path as any checkpoint, eval.py and visualize.py use it and write nothing
beside it, torch.hub loads its encoder by name, and a lost or cut-short file is one line naming it."""
import os
import shutil
import subprocess
import sys

import pytest
import torch

import data
import eval as ev
import export
import hubconf
import runtime
import sit
import visualize

HERE = os.path.dirname(os.path.abspath(__file__))
SHIPPED = os.path.join(runtime.MODELS, "fmnist-20min.pt")
SUBSET_KNN = 82.65   # eval.py SHIPPED --mode knn --limit 2000 (bank: the first 2,000 training images; 2,000 test)
needs_fmnist = pytest.mark.skipif(
    not os.path.exists(os.path.join(data.FASHION_MNIST_DEBIAN, "t10k-images-idx3-ubyte.gz")),
    reason="Fashion-MNIST not installed (apt-get install dataset-fashion-mnist)")


@pytest.fixture(scope="module")
def released(tmp_path_factory):
    """A tiny run's checkpoint (with an optimizer state) and its release."""
    folder = tmp_path_factory.mktemp("run")
    cfg = sit.Config(model="tiny", dim=32, depth=2, heads=2, img_size=16, patch_size=4, proj_hidden=64, proj_dim=16)
    torch.manual_seed(0)
    model = sit.SiT(cfg)
    with torch.no_grad():                                            # a teacher that differs from the student
        for p in model.teacher.parameters():
            p.add_(0.01 * torch.randn_like(p))
    optimizer = dict(state={0: dict(step=torch.tensor(3.0), exp_avg=torch.ones(2), exp_avg_sq=torch.ones(2))},
                     param_groups=[])
    runtime.save_checkpoint(str(folder / "ckpt.pt"), cfg, model, optimizer, step=24, epoch=3,
                            run=runtime.Run(dataset="synthetic", recipe="fmnist-2min"))
    assert export.main([str(folder / "ckpt.pt"), "--format", "release"]) == str(folder / "ckpt-release.pt")
    return folder / "ckpt.pt", folder / "ckpt-release.pt", model


def test_a_release_keeps_the_backbones_and_decoder_in_float16_and_drops_the_rest(released):
    """What eval, visualize and hub need, loaded by load_checkpoint: the student's backbone and decoder and
    the teacher's backbone as float16 roundings of the run's; no projection heads, no optimizer; config,
    recipe and step kept; under half the size."""
    path, release, model = released
    raw = torch.load(release, weights_only=True)
    assert raw["optimizer"] is None and raw["left_out"] == ["head."] and raw["step"] == 24
    assert not [k for part in ("student", "teacher") for k in raw[part] if k.startswith("head.")]
    assert {v.dtype for part in ("student", "teacher") for v in raw[part].values()} == {torch.float16}
    cfg, loaded, ckpt = runtime.load_checkpoint(str(release))
    assert cfg == sit.Config.from_dict(torch.load(path, weights_only=True)["config"])
    assert ckpt["config"]["recipe"] == "fmnist-2min"
    for part in ("student.backbone", "student.decoder", "teacher.backbone"):
        want = {k: v.half().float() for k, v in model.get_submodule(part).state_dict().items()}
        got = loaded.get_submodule(part).state_dict()
        assert want.keys() == got.keys() and all(torch.equal(want[k], got[k]) for k in want), part
    assert os.path.getsize(release) < 0.5 * os.path.getsize(path)


def test_a_release_cannot_be_resumed_or_released_again(released, tmp_path, capsys):
    path, release, _ = released
    (tmp_path / "run").mkdir()
    shutil.copy(release, tmp_path / "run" / "ckpt.pt")
    import train
    assert train.main(["--dataset", "synthetic", "--out", str(tmp_path / "run"), "--resume", "--device", "cpu"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "is a released model" in err and "not resumed" in err, err
    with pytest.raises(SystemExit) as e:
        export.main([str(release), "--format", "release", "--out", str(tmp_path / "again.pt")])
    assert e.value.code == 2 and "already a released model" in capsys.readouterr().err


def test_a_release_with_weights_missing_beyond_the_heads_is_refused(released, tmp_path):
    _, release, _ = released
    raw = torch.load(release, weights_only=True)
    del raw["teacher"]["backbone.norm.weight"]
    torch.save(raw, tmp_path / "bad.pt")
    with pytest.raises(runtime.CheckpointError, match="bad.pt: weights do not match its config"):
        runtime.load_checkpoint(str(tmp_path / "bad.pt"))


def test_the_shipped_model_is_the_laptop_recipes_and_loads_like_any_checkpoint():
    """models/fmnist-20min.pt: the fmnist-20min recipe's run (its config says so), under 5 MB, whose
    encoder load_encoder and torch.hub's entry give as a ViT with Fashion-MNIST's normalisation."""
    assert os.path.getsize(SHIPPED) < 5 * 2**20
    cfg, model, ckpt = runtime.load_checkpoint(SHIPPED)
    assert ckpt["config"]["recipe"] == "fmnist-20min" and ckpt["config"]["dataset"] == "fashion-mnist"
    assert (cfg.dim, cfg.depth, cfg.heads, cfg.img_size, cfg.patch_size) == (96, 4, 4, 28, 7)
    vit = torch.hub.load(HERE, "fmnist_20min", source="local")
    assert vit.mean == data.stats("fashion-mnist")[0] and vit.img_size == 28 and not vit.training
    for k, v in model.teacher.backbone.state_dict().items():
        assert torch.equal(vit.state_dict()[k], v), k
    assert vit(torch.zeros(2, 3, 28, 28)).shape == (2, 17, 96)


@needs_fmnist
def test_the_shipped_models_knn_on_a_subset_is_what_was_measured(tmp_path):
    """k-NN of the shipped encoder with 2,000 training and 2,000 test images, within 0.5 points of the
    value measured when it was written (SUBSET_KNN); a regression in loading, features or k-NN moves it."""
    record = ev.main([SHIPPED, "--mode", "knn", "--limit", "2000", "--device", "cpu",
                      "--results", str(tmp_path / "results.jsonl")])
    assert (record["n_train"], record["n_test"]) == (2000, 2000)
    assert abs(record["accuracy"] - SUBSET_KNN) <= 0.5, record["accuracy"]


@needs_fmnist
def test_using_the_shipped_model_writes_nothing_inside_the_repository(tmp_path, monkeypatch):
    """visualize.py and eval.py on it, with default outputs, write to runs/fmnist-20min/ under the current
    folder (here a temporary one), never into models/: a picture of Fashion-MNIST test images is drawn."""
    before = sorted(os.listdir(runtime.MODELS))
    monkeypatch.chdir(tmp_path)
    visualize.main([SHIPPED, "--n", "4", "--device", "cpu"])
    picture = tmp_path / "runs" / "fmnist-20min" / "reconstructions.png"
    assert picture.exists() and picture.stat().st_size > 10_000
    ev.main([SHIPPED, "--mode", "knn", "--limit", "256", "--device", "cpu"])
    assert (tmp_path / "runs" / "fmnist-20min" / "results.jsonl").exists()
    assert sorted(os.listdir(runtime.MODELS)) == before


@pytest.mark.parametrize("damage", ["lost", "cut short"])
def test_a_lost_or_cut_short_model_file_is_one_line_naming_it(damage, tmp_path):
    path = tmp_path / "models" / "fmnist-20min.pt"
    path.parent.mkdir()
    if damage == "cut short":
        path.write_bytes(open(SHIPPED, "rb").read()[:100_000])
    for script in ("eval.py", "visualize.py"):
        argv = [str(path), "--mode", "knn"] if script == "eval.py" else [str(path), "--out", str(tmp_path / "x.png")]
        p = subprocess.run([sys.executable, os.path.join(HERE, script), *argv], capture_output=True, text=True,
                           cwd=HERE, timeout=120)
        assert p.returncode != 0 and len(p.stderr.splitlines()) == 1 and str(path) in p.stderr, p.stderr
    with pytest.raises(runtime.CheckpointError, match=str(path)):
        hubconf.sit_vit(str(path))
