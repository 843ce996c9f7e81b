"""Tests of export.py and hubconf.py: exported encoders load strictly into torchvision's and timm's
ViT and give our CLS features; the layouts follow each library's naming rules; the fine-tuned head
travels with its encoder; torch.hub loads the teacher; bad input fails in one line, writing nothing.
CPU only, seeded, no network; timm is optional (its loading test skips without it).

Tolerance: float32 CLS features within atol 1e-5, rtol 1e-5 of sit.ViT's (measured: timm 0,
identical arithmetic; torchvision up to 1.4e-6 over 256 images, as nn.MultiheadAttention computes
attention its own way).
"""
import json
import os
import subprocess
import sys

import pytest
import torch

import eval as ev
import export
import runtime
import sit

SYNTHETIC = runtime.Run(dataset="synthetic")   # the dataset the checkpoints say they saw

HERE = os.path.dirname(os.path.abspath(__file__))
TOL = dict(atol=1e-5, rtol=1e-5)
D, DEPTH, HEADS, IMG, P, K = 32, 2, 2, 16, 4, 5


def perturbed(module, seed):
    """Every parameter moved by N(0, 0.1): norms, biases and tokens all differ from their init."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in module.parameters():
            p.add_(0.1 * torch.randn(p.shape, generator=g))
    return module


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    """A run folder with a tiny pretraining ckpt.pt (teacher != student) and a finetuned.pt (K classes)."""
    folder = tmp_path_factory.mktemp("run")
    cfg = sit.Config(model="tiny", dim=D, depth=DEPTH, heads=HEADS, img_size=IMG, patch_size=P,
                     proj_hidden=64, proj_dim=16)
    torch.manual_seed(0)
    model = sit.SiT(cfg)
    perturbed(model.student, 1)
    perturbed(model.teacher, 2)
    runtime.save_checkpoint(str(folder / "ckpt.pt"), cfg, model, epoch=3, run=SYNTHETIC)
    clf = perturbed(ev.Classifier(sit.ViT(IMG, P, 3, D, DEPTH, HEADS), K), 3)
    runtime.atomic_save(dict(format="sit-finetuned-v1", config=vars(cfg), dataset="cifar10", num_classes=K,
                         model=clf.state_dict(), epoch=1, accuracy=0.0, best=0.0), str(folder / "finetuned.pt"))
    return folder, model, clf.eval()


def images(n=6, seed=0):
    return torch.randn(n, 3, IMG, IMG, generator=torch.Generator().manual_seed(seed))


def exported(folder, *flags):
    """export.main on a file of `folder`; returns (state dict loaded weights_only, the JSON record)."""
    record = export.main([str(folder / flags[0]), *flags[1:]])
    pth = folder / record["weights"]
    with open(pth.with_suffix(".json")) as f:
        assert json.load(f) == record
    return torch.load(pth, weights_only=True), record


def build(record, folder, monkeypatch, **modules):
    """Run the record's own build and load lines, as a user would paste them, in `folder`."""
    monkeypatch.chdir(folder)
    ns = dict(torch=torch, **modules)
    exec(record["python"]["build"], ns)
    exec(record["python"]["load"], ns)
    return ns["model"]


def timm_layout(num_classes=0):
    """{name: shape} of timm's VisionTransformer(global_pool="token") by its rules: a pre-norm block
    is norm1, attn (qkv 3D x D, proj), norm2, mlp (fc1 4D x D, fc2); final norm; head if K > 0."""
    N, hidden = (IMG // P) ** 2, 4 * D
    layout = {"cls_token": (1, 1, D), "pos_embed": (1, 1 + N, D),
              "patch_embed.proj.weight": (D, 3, P, P), "patch_embed.proj.bias": (D,)}
    for i in range(DEPTH):
        for name, shape in [("norm1", (D,)), ("attn.qkv", (3 * D, D)), ("attn.proj", (D, D)),
                            ("norm2", (D,)), ("mlp.fc1", (hidden, D)), ("mlp.fc2", (D, hidden))]:
            layout[f"blocks.{i}.{name}.weight"] = shape
            layout[f"blocks.{i}.{name}.bias"] = shape[:1]
    layout.update({"norm.weight": (D,), "norm.bias": (D,)})
    if num_classes:
        layout.update({"head.weight": (num_classes, D), "head.bias": (num_classes,)})
    return layout


def shapes(state):
    return {k: tuple(v.shape) for k, v in state.items()}


# ------------------------------------------------------------------------------------------------
# torchvision
# ------------------------------------------------------------------------------------------------

def test_torchvision_export_gives_our_cls_features(run, monkeypatch):
    """The printed lines build torchvision's ViT, load the teacher strictly, and give its CLS features."""
    torchvision = pytest.importorskip("torchvision")
    folder, model, _ = run
    state, record = exported(folder, "ckpt.pt", "--format", "torchvision")
    assert record["weights"] == "ckpt-teacher-torchvision.pth" and record["encoder"] == "teacher"
    tv = build(record, folder, monkeypatch, torchvision=torchvision)
    x = images()
    with torch.no_grad():
        ours = model.teacher.backbone.eval()(x)[:, 0]
        theirs = tv(x)
        torch.testing.assert_close(theirs, ours, **TOL)
        assert not torch.allclose(theirs, model.student.backbone.eval()(x)[:, 0], **TOL)


def test_torchvision_export_of_the_student(run, monkeypatch):
    """--student exports the student's backbone, under its own name."""
    torchvision = pytest.importorskip("torchvision")
    folder, model, _ = run
    _, record = exported(folder, "ckpt.pt", "--format", "torchvision", "--student")
    assert record["weights"] == "ckpt-student-torchvision.pth" and record["encoder"] == "student"
    tv = build(record, folder, monkeypatch, torchvision=torchvision)
    with torch.no_grad():
        torch.testing.assert_close(tv(images()), model.student.backbone.eval()(images())[:, 0], **TOL)


def test_finetuned_torchvision_export_carries_the_head(run, monkeypatch):
    """finetuned.pt exports encoder + heads.head; torchvision's logits equal eval.Classifier's."""
    torchvision = pytest.importorskip("torchvision")
    folder, _, clf = run
    state, record = exported(folder, "finetuned.pt", "--format", "torchvision")
    assert record["num_classes"] == K and tuple(state["heads.head.weight"].shape) == (K, D)
    assert record["mean"] == list(export.data.STATS["cifar10"][0])   # the fine-tuning dataset's
    tv = build(record, folder, monkeypatch, torchvision=torchvision)
    with torch.no_grad():
        torch.testing.assert_close(tv(images()), clf(images()), **TOL)


# ------------------------------------------------------------------------------------------------
# timm: the layout without timm, the model with it
# ------------------------------------------------------------------------------------------------

def test_timm_layout_follows_timms_rules(run):
    """Default --format timm: the names and shapes timm's ViT has, for the encoder and the fine-tuned one."""
    folder, model, _ = run
    state, record = exported(folder, "ckpt.pt")
    assert record["format"] == "timm" and record["weights"] == "ckpt-teacher-timm.pth"
    assert shapes(state) == timm_layout()
    assert torch.equal(state["blocks.1.attn.qkv.weight"], model.teacher.backbone.blocks[1].attn.qkv.weight)
    state, _ = exported(folder, "finetuned.pt")
    assert shapes(state) == timm_layout(num_classes=K)


def test_timm_loads_strictly_and_gives_our_cls_features(run, monkeypatch):
    """With timm installed: the printed lines build timm's ViT; forward and forward_features agree."""
    timm = pytest.importorskip("timm")
    folder, model, clf = run
    _, record = exported(folder, "ckpt.pt")
    tm = build(record, folder, monkeypatch, timm=timm)
    assert shapes(tm.state_dict()) == timm_layout()           # our rules are timm's
    x = images()
    with torch.no_grad():
        ours = model.teacher.backbone.eval()(x)[:, 0]
        torch.testing.assert_close(tm(x), ours, **TOL)
        torch.testing.assert_close(tm.forward_features(x)[:, 0], ours, **TOL)
        _, record = exported(folder, "finetuned.pt")
        torch.testing.assert_close(build(record, folder, monkeypatch, timm=timm)(x), clf(x), **TOL)


# ------------------------------------------------------------------------------------------------
# torch.hub
# ------------------------------------------------------------------------------------------------

def test_hub_load_gives_the_teacher_in_eval_mode(run):
    """torch.hub.load(repo, "sit_vit", checkpoint=...) is the teacher ViT, eval mode, with its normalisation."""
    folder, model, _ = run
    hub = torch.hub.load(HERE, "sit_vit", checkpoint=str(folder / "ckpt.pt"), source="local")
    assert not hub.training and hub.mean == export.data.STATS["synthetic"][0] and hub.img_size == IMG
    x = images()
    with torch.no_grad():
        torch.testing.assert_close(hub(x)[:, 0], model.teacher.backbone.eval()(x)[:, 0], atol=0, rtol=0)
    student = torch.hub.load(HERE, "sit_vit", checkpoint=str(folder / "ckpt.pt"), student=True, source="local")
    assert torch.equal(student.pos_embed, model.student.backbone.pos_embed)


# ------------------------------------------------------------------------------------------------
# Bad input: one line on stderr, exit code 2, nothing written
# ------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("case", ["missing", "not ours", "text", "format", "student of finetuned"])
def test_bad_input_is_one_line_exit_2_and_writes_nothing(run, tmp_path, capsys, case):
    folder, _, _ = run
    torch.save({"weights": torch.zeros(2)}, tmp_path / "other.pt")
    (tmp_path / "notes.txt").write_text("not a checkpoint\n")
    argv = {"missing": [str(tmp_path / "nope.pt")], "not ours": [str(tmp_path / "other.pt")],
            "text": [str(tmp_path / "notes.txt")], "format": [str(folder / "ckpt.pt"), "--format", "onnx"],
            "student of finetuned": [str(folder / "finetuned.pt"), "--student", "--out", str(tmp_path / "x.pth")]}[case]
    before = sorted(os.listdir(tmp_path)), sorted(os.listdir(folder))
    with pytest.raises(SystemExit) as exit_:
        export.main(argv)
    err = capsys.readouterr().err
    assert exit_.value.code == 2
    assert err.startswith("export.py: error: ") and err.count("\n") == 1, err
    assert (sorted(os.listdir(tmp_path)), sorted(os.listdir(folder))) == before


def test_command_line_exit_code(tmp_path):
    """The script itself, as a user runs it: exit code 2 and one line for a file that is not ours."""
    (tmp_path / "notes.txt").write_text("not a checkpoint\n")
    r = subprocess.run([sys.executable, os.path.join(HERE, "export.py"), str(tmp_path / "notes.txt")],
                       capture_output=True, text=True, timeout=120)
    assert r.returncode == 2 and r.stdout == ""
    assert r.stderr.startswith("export.py: error: ") and r.stderr.count("\n") == 1, r.stderr
