"""Tests of eval.py: every mode end to end on a tiny synthetic checkpoint, the pure pieces
(k-NN, linear probe, few-shot draws, mixing, layer decay) on hand-made problems, and the one-line
errors. CPU only, seeded, no network; the whole file runs in about a minute on 2 cores."""
import json
import os
import subprocess
import sys

import numpy as np
import pytest
import torch

import eval as ev
import sit

HERE = os.path.dirname(os.path.abspath(__file__))
FIELDS = {"mode", "dataset", "accuracy", "epochs", "seeds", "device", "seconds", "checkpoint", "random_init"}


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory):
    """A tiny SiT checkpoint on the synthetic dataset (16 x 16 images, patch 4, D 32, depth 2)."""
    path = str(tmp_path_factory.mktemp("run") / "ckpt.pt")
    cfg = sit.Config(model="tiny", dim=32, depth=2, heads=2, img_size=16, patch_size=4, proj_hidden=64,
                     proj_dim=16, dataset="synthetic")
    torch.manual_seed(1)                            # not eval's --seed 0, so --random-init differs
    sit.save_checkpoint(path, cfg, sit.SiT(cfg), epoch=3)
    return path


def run(ckpt, *flags):
    """main() on the checkpoint; returns (returned record, the last line of results.jsonl)."""
    results = os.path.join(os.path.dirname(ckpt), "results.jsonl")
    record = ev.main([ckpt, "--device", "cpu", *flags])
    with open(results) as f:
        line = json.loads(f.read().splitlines()[-1])
    assert FIELDS <= set(line), f"missing fields {FIELDS - set(line)}"
    assert line["device"] == "cpu" and line["checkpoint"] == os.path.abspath(ckpt)
    return record, line


# ------------------------------------------------------------------------------------------------
# Every mode, end to end
# ------------------------------------------------------------------------------------------------

def test_knn_mode_writes_a_results_line(ckpt):
    """k-NN on the synthetic gratings: the line names the mode, k and the pretraining epoch."""
    _, line = run(ckpt, "--mode", "knn", "--k", "10", "--limit", "512")
    assert line["mode"] == "knn" and line["dataset"] == "synthetic" and line["k"] == 10
    assert line["epochs"] == 3 and line["random_init"] is False and line["n_train"] == 512
    assert 10 < line["accuracy"] <= 100            # even a random ViT beats chance on gratings


def test_random_init_is_a_different_encoder(ckpt):
    """--random-init ignores the weights: another encoder, recorded as epoch 0."""
    args = ev.parse_args([ckpt, "--mode", "knn", "--random-init"])
    _, fresh, epochs = ev.load_encoder(args, torch.device("cpu"))
    _, model, _ = sit.load_checkpoint(ckpt)
    assert epochs == 0
    assert not torch.equal(fresh.pos_embed, model.teacher.backbone.pos_embed)
    _, line = run(ckpt, "--mode", "knn", "--random-init", "--limit", "256")
    assert line["random_init"] is True and line["epochs"] == 0


def test_linear_mode_chooses_a_weight_decay(ckpt):
    _, line = run(ckpt, "--mode", "linear", "--limit", "256", "--mean-patch", "--probe-steps", "50")
    assert line["mode"] == "linear" and line["mean_patch"] is True
    assert line["weight_decay"] in ev.WEIGHT_DECAYS and len(line["val_accuracy"]) == len(ev.WEIGHT_DECAYS)
    assert 10 < line["accuracy"] <= 100


def test_fewshot_mode_reports_mean_and_std_per_k(ckpt):
    _, line = run(ckpt, "--mode", "fewshot", "--shots", "1,5", "--seeds", "2", "--seed", "7", "--limit", "256", "--probe-steps", "50")
    assert set(line["accuracy"]) == {"1", "5"} and set(line["std"]) == {"1", "5"}
    assert line["seeds"] == [7, 8] and all(len(r) == 2 for r in line["runs"].values())
    assert line["accuracy"]["1"] == pytest.approx(np.mean(line["runs"]["1"]))


def test_finetune_mode_trains_and_saves_a_loadable_model(ckpt):
    """One epoch with every option on; finetuned.pt loads with weights_only and strictly."""
    _, line = run(ckpt, "--mode", "finetune", "--epochs", "2", "--batch-size", "64", "--limit", "256",
                  "--mixup", "0.8", "--cutmix", "1.0", "--layer-decay", "0.5", "--warmup-epochs", "1")
    assert line["finetune_epochs"] == 2 and len(line["per_epoch"]) == 2
    assert line["best"] == max(line["per_epoch"]) and line["layer_decay"] == 0.5
    saved = torch.load(line["finetuned"], weights_only=True)
    assert os.path.dirname(line["finetuned"]) == os.path.dirname(ckpt)
    cfg = sit.Config.from_dict(saved["config"])
    backbone = sit.ViT(cfg.img_size, cfg.patch_size, cfg.in_chans, cfg.dim, cfg.depth, cfg.heads)
    ev.Classifier(backbone, saved["num_classes"]).load_state_dict(saved["model"])


# ------------------------------------------------------------------------------------------------
# The pieces, on problems whose answer is known
# ------------------------------------------------------------------------------------------------

def blobs(n, classes=10, dim=16, spread=0.1, seed=0):
    """n points (n, dim) around `classes` random unit centres, labels (n,)."""
    g = torch.Generator().manual_seed(seed)
    centres = torch.nn.functional.normalize(torch.randn(classes, dim, generator=g), dim=1)
    y = torch.arange(n) % classes
    return centres[y] + spread * torch.randn(n, dim, generator=g), y


def test_knn_is_perfect_on_separable_features_and_chance_on_shuffled_labels():
    x, y = blobs(2500)
    x, y, xt, yt = x[:2000], y[:2000], x[2000:], y[2000:]
    assert ev.knn_accuracy(x, y, xt, yt, 10) == 100.0
    shuffled = y[torch.randperm(len(y), generator=torch.Generator().manual_seed(0))]
    assert abs(ev.knn_accuracy(x, shuffled, xt, yt, 10) - 10) < 6


def test_linear_probe_separates_a_separable_problem():
    x, y = blobs(600, spread=0.1)
    acc, details = ev.linear_probe(x[:500], y[:500], x[500:], y[500:], 10, steps=100)
    assert acc > 95 and details["weight_decay"] in ev.WEIGHT_DECAYS


def test_fewshot_draws_exactly_k_per_class_and_differ_per_seed():
    labels = torch.arange(300) % 10
    a = ev.fewshot_indices(labels, 10, 5, seed=0)
    assert len(a) == 50 and len(set(a.tolist())) == 50
    assert torch.equal(torch.bincount(labels[a], minlength=10), torch.full((10,), 5))
    assert torch.equal(a, ev.fewshot_indices(labels, 10, 5, seed=0))           # pure in the seed
    assert not torch.equal(a.sort().values, ev.fewshot_indices(labels, 10, 5, seed=1).sort().values)
    with pytest.raises(ev.EvalError):
        ev.fewshot_indices(labels, 10, 31, seed=0)                             # 30 per class only


def test_mix_keeps_targets_distributions_and_cutmix_area():
    x = torch.zeros(4, 3, 8, 8)
    x[0] = 1.0                                          # image 0, whose partner (reversed) is image 3
    t = torch.eye(4)
    for mixup, cutmix in ((0.8, 0.0), (0.0, 1.0), (0.8, 1.0)):
        xm, tm = ev.mix(x, t, mixup, cutmix, np.random.default_rng(0))
        assert torch.allclose(tm.sum(1), torch.ones(4))
        assert xm[3].mean().item() == pytest.approx(tm[3, 0].item())            # pixel share = label share
    assert ev.mix(x, t, 0.0, 0.0, np.random.default_rng(0))[0] is x             # off = untouched


def test_layer_decay_scales_and_no_decay_groups():
    model = ev.Classifier(sit.ViT(16, 4, 3, 32, 3, 2), 10)
    scale, decay = {}, {}
    for g in ev.param_groups(model, 0.05, 0.5):
        for p in g["params"]:
            scale[id(p)], decay[id(p)] = g["lr_scale"], g["weight_decay"]
    named = dict(model.named_parameters())
    assert scale[id(named["head.weight"])] == 1.0 and scale[id(named["backbone.blocks.2.mlp.fc1.weight"])] == 0.5
    assert scale[id(named["backbone.patch_embed.proj.weight"])] == 0.5 ** 4
    assert decay[id(named["backbone.blocks.0.attn.qkv.weight"])] == 0.05
    for n in ("backbone.cls_token", "backbone.pos_embed", "head.bias", "backbone.norm.weight"):
        assert decay[id(named[n])] == 0.0
    assert len(scale) == len(named)                      # every parameter in exactly one group


# ------------------------------------------------------------------------------------------------
# Bad input: one line on stderr, non-zero exit, no traceback
# ------------------------------------------------------------------------------------------------

def one_line_error(argv):
    with pytest.raises(SystemExit) as e:
        ev.main(argv)
    msg = e.value.code
    assert isinstance(msg, str) and msg.startswith("eval.py: error: ") and "\n" not in msg
    return msg


def test_bad_input_gives_one_line_errors(ckpt, tmp_path):
    truncated, foreign = tmp_path / "truncated.pt", tmp_path / "foreign.pt"
    truncated.write_bytes(open(ckpt, "rb").read()[:1000])
    torch.save({"weights": torch.zeros(2)}, foreign)
    assert "not found" in one_line_error([str(tmp_path / "missing.pt"), "--mode", "knn"])
    assert "truncated" in one_line_error([str(truncated), "--mode", "knn"])
    assert "not a SiT checkpoint" in one_line_error([str(foreign), "--mode", "knn"])
    assert "invalid choice" in one_line_error([ckpt, "--mode", "nope"])
    assert "unknown dataset" in one_line_error([ckpt, "--mode", "knn", "--dataset", "nope"])


def test_unlabelled_dataset_is_refused(ckpt, tmp_path):
    from PIL import Image
    for i in range(3):
        Image.fromarray(np.full((20, 20, 3), 40 * i, np.uint8)).save(tmp_path / f"{i}.png")
    assert "no labels" in one_line_error([ckpt, "--mode", "linear", "--dataset", str(tmp_path)])


def test_command_line_error_exits_nonzero_without_traceback(tmp_path):
    p = subprocess.run([sys.executable, os.path.join(HERE, "eval.py"), str(tmp_path / "none.pt"), "--mode", "knn"],
                       capture_output=True, text=True, cwd=HERE)
    assert p.returncode != 0 and "Traceback" not in p.stderr
    assert p.stderr.strip().splitlines() == [f"eval.py: error: checkpoint not found: {tmp_path / 'none.pt'}"]


def test_raw_pixel_knn_baseline(ckpt):
    """--raw-pixels: the encoder-free baseline; a random encoder's features differ from pixels'."""
    _, line = run(ckpt, "--mode", "knn", "--raw-pixels", "--limit", "400")
    _, encoded = run(ckpt, "--mode", "knn", "--limit", "400")
    assert line["raw_pixels"] is True and encoded["raw_pixels"] is False
    assert 10 < line["accuracy"] <= 100 and line["accuracy"] != encoded["accuracy"]
