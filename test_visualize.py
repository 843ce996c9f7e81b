"""Tests of visualize.py: what the rows show, the figures' sizes, the curves, and one-line errors.

Tiny random-init checkpoints on synthetic data; the whole file runs in seconds on a 2-core CPU.
"""
import json
import os
import subprocess
import sys

import numpy as np
import pytest
import torch
from matplotlib.image import imread
from PIL import Image

import data
import runtime
import sit
import visualize

SYNTHETIC = runtime.Run(dataset="synthetic")   # the dataset the checkpoints say they saw

TINY = dict(model="tiny", dim=32, depth=2, heads=2, img_size=16, patch_size=4, proj_hidden=64, proj_dim=16)


@pytest.fixture(scope="module")
def tiny():
    torch.manual_seed(0)
    cfg = sit.Config(**TINY)
    return cfg, sit.SiT(cfg).eval()


@pytest.fixture
def ckpt(tmp_path, tiny):
    cfg, model = tiny
    path = tmp_path / "run" / "ckpt.pt"
    runtime.save_checkpoint(str(path), cfg, model, step=40, epoch=2, run=SYNTHETIC)
    return path


def png_shape(path):
    """(height, width) in pixels of a PNG, read back."""
    return imread(str(path)).shape[:2]


def grid_pixels(rows, cols):
    W, H = visualize.grid_inches(rows, cols)
    return round(H * visualize.DPI), round(W * visualize.DPI)


def write_log(path, epochs=2, steps_per_epoch=10):
    """A log.jsonl as train.py writes it: k-NN at step 0, step lines, epoch lines, a half-written line."""
    lines = [dict(kind="epoch", step=0, epoch=0, knn=11.0)]
    for e in range(epochs):
        for s in range(e * steps_per_epoch, (e + 1) * steps_per_epoch, 2):
            lines.append(dict(kind="step", step=s, epoch=e, loss=6 - s / 10, loss_recons=0.5 - s / 100,
                              loss_contr=3.5 - s / 20, lr=1e-4 * s, wd=0.04, momentum=0.996, img_s=900.0))
        lines.append(dict(kind="epoch", step=(e + 1) * steps_per_epoch, epoch=e + 1, loss=4.0, loss_recons=0.3,
                          loss_contr=2.5, lr=1e-3, seconds=2.0, knn=20.0 + 10 * e))
    path.write_text("".join(json.dumps(r) + "\n" for r in lines) + '{"kind": "step", "st')


# ------------------------------------------------------------------------------------------------
# The tensors behind the figures
# ------------------------------------------------------------------------------------------------

def test_reconstruction_rows_recon_in_mask_original_outside(tiny):
    """Pasted = reconstruction where corrupted, original elsewhere; the reconstruction is not the
    corrupted input; the same seed gives the same corruption."""
    cfg, model = tiny
    x = torch.randn(6, 3, 16, 16, generator=torch.Generator().manual_seed(1))
    rows = visualize.reconstruction_rows(model, cfg, x, torch.Generator().manual_seed(0))
    for key in ("original", "corrupted", "reconstruction", "pasted"):
        assert rows[key].shape == (6, 3, 16, 16), key
    m = rows["mask"].expand_as(x)
    assert m.any() and (~m).any()
    assert torch.equal(rows["pasted"][~m], x[~m])
    assert torch.equal(rows["pasted"][m], rows["reconstruction"][m])
    assert (rows["reconstruction"] - rows["corrupted"])[m].abs().mean() > 0.1
    again = visualize.reconstruction_rows(model, cfg, x, torch.Generator().manual_seed(0))
    assert torch.equal(again["corrupted"], rows["corrupted"])


def test_attention_maps_are_cls_rows_on_the_patch_grid(tiny):
    """(B, h, H, W), constant over each P x P patch, non-negative, summing (per patch) to at most 1."""
    cfg, model = tiny
    x = torch.randn(3, 3, 16, 16)
    maps = visualize.attention_maps(model.teacher.backbone, x)
    assert maps.shape == (3, cfg.heads, 16, 16)
    coarse = maps[..., ::4, ::4]                                     # one value per patch
    assert torch.equal(maps, coarse.repeat_interleave(4, -2).repeat_interleave(4, -1))
    assert (maps >= 0).all() and (coarse.sum((-2, -1)) <= 1 + 1e-5).all()


def test_gray_images_show_gray():
    """1-channel data, normalised with the gray stats and denormalised for display, has R = G = B."""
    gray = torch.randint(0, 256, (2, 1, 28, 28), dtype=torch.uint8)
    mean, std = data.STATS["fashion-mnist"]
    rgb = visualize.to_rgb(data.prepare(gray, 28, mean, std), mean, std)
    assert rgb.shape == (2, 28, 28, 3)
    assert np.allclose(rgb[..., 0], rgb[..., 1], atol=1e-6) and np.allclose(rgb[..., 0], rgb[..., 2], atol=1e-6)
    assert np.allclose(rgb[..., 0], gray[:, 0].numpy() / 255, atol=1e-5)


# ------------------------------------------------------------------------------------------------
# The command line and its figures
# ------------------------------------------------------------------------------------------------

def test_reconstruction_png_default_path_and_size(ckpt, capsys):
    """Written next to the checkpoint, its path printed, 4 rows x n panels of 1.2 inch each."""
    visualize.main([str(ckpt), "--n", "10"])
    out = ckpt.parent / "reconstructions.png"
    assert capsys.readouterr().out.strip() == str(out)
    h, w = png_shape(out)
    assert (h, w) == grid_pixels(4, 10)
    assert w >= 10 * visualize.CELL * visualize.DPI and h >= 4 * visualize.CELL * visualize.DPI
    assert imread(str(out))[..., :3].std() > 0.05                    # not blank


def test_title_says_how_far_the_run_got(ckpt, tiny, tmp_path):
    """The title counts steps of the run's length when the checkpoint knows it (a --time-budget run ends
    inside its --epochs bound), else epochs of --epochs."""
    cfg, model = tiny
    budgeted = tmp_path / "budget" / "ckpt.pt"
    runtime.save_checkpoint(str(budgeted), cfg, model, step=40, epoch=2, extra=dict(total_steps=55), run=SYNTHETIC)
    for path, text in [(ckpt, f"epoch 2/{cfg.epochs}"), (budgeted, "step 40/55")]:
        fig, _ = visualize.make_figure(visualize.parse_args([str(path), "--n", "2"]))
        assert any(text in t.get_text() for t in fig.texts)


def test_drop_overrides_reach_the_corruption(ckpt, tmp_path, monkeypatch):
    """--drop-perc/--drop-type replace the checkpoint's settings; the rest of the config is kept."""
    seen = {}
    rows = visualize.reconstruction_rows

    def spy(model, cfg, x, generator):
        seen.update(cfg=cfg, n=len(x))
        return rows(model, cfg, x, generator)
    monkeypatch.setattr(visualize, "reconstruction_rows", spy)
    visualize.main([str(ckpt), "--n", "3", "--drop-perc", "0.8", "--drop-type", "zeros",
                    "--out", str(tmp_path / "r.png")])
    assert (seen["cfg"].drop_perc, seen["cfg"].drop_type, seen["n"]) == (0.8, "zeros", 3)
    assert seen["cfg"].drop_align == 4 and seen["cfg"].img_size == 16


def test_own_images_folder(ckpt, tmp_path):
    """--images DIR: images of any size are resized to img_size; unreadable files are skipped."""
    folder = tmp_path / "photos"
    folder.mkdir()
    for i, (w, h) in enumerate([(40, 30), (64, 64), (20, 50)]):
        Image.fromarray(np.full((h, w, 3), 60 * i, np.uint8)).save(folder / f"{i}.png")
    (folder / "broken.jpg").write_text("not an image")
    out = tmp_path / "own.png"
    visualize.main([str(ckpt), "--images", str(folder), "--out", str(out)])
    assert png_shape(out) == grid_pixels(4, 3)


def test_attention_png(ckpt, tmp_path):
    """Rows: image, mean of heads, one per head."""
    visualize.main([str(ckpt), "--attention", "--n", "2"])
    assert png_shape(ckpt.parent / "attention.png") == grid_pixels(2 + TINY["heads"], 2)


def test_curves_png_from_a_two_epoch_log(ckpt, tmp_path):
    """Default log path next to the checkpoint; the half-written last line is skipped."""
    write_log(ckpt.parent / "log.jsonl")
    visualize.main([str(ckpt), "--curves"])
    assert png_shape(ckpt.parent / "curves.png") == (350, 1200)


def test_curves_without_step_lines_use_epoch_lines(tmp_path):
    log = tmp_path / "epochs.jsonl"
    write_log(log)
    log.write_text("".join(l + "\n" for l in log.read_text().splitlines() if '"kind": "epoch"' in l))
    visualize.main([str(tmp_path / "no-ckpt-needed.pt"), "--curves", "--log", str(log),
                    "--out", str(tmp_path / "c.png")])
    assert (tmp_path / "c.png").exists()


def test_read_log_last_write_of_a_step_wins(tmp_path):
    """After a resume the re-logged steps replace the old ones; records come sorted by step."""
    log = tmp_path / "log.jsonl"
    rec = dict(kind="step", epoch=0, loss_recons=0.1, loss_contr=1.0, lr=1e-3)
    lines = [dict(rec, step=s, loss=1.0) for s in (0, 10, 20)] + [dict(rec, step=10, loss=2.0), "garbage"]
    log.write_text("\n".join(json.dumps(l) if isinstance(l, dict) else l for l in lines) + "\n")
    steps, epochs = visualize.read_log(str(log))
    assert [(r["step"], r["loss"]) for r in steps] == [(0, 1.0), (10, 2.0), (20, 1.0)] and epochs == []


# ------------------------------------------------------------------------------------------------
# Bad input found at run time: one line on stderr, exit status 1, no traceback (bad flag values,
# exit status 2, are test_flags.py's)
# ------------------------------------------------------------------------------------------------

def truncated(ckpt):
    raw = ckpt.read_bytes()
    ckpt.write_bytes(raw[:len(raw) // 2])
    return [str(ckpt)]


def empty_folder(ckpt):
    (ckpt.parent / "empty").mkdir()
    return [str(ckpt), "--images", str(ckpt.parent / "empty")]


def log_without_fields(ckpt):
    (ckpt.parent / "log.jsonl").write_text(json.dumps(dict(kind="step", step=1, epoch=0)) + "\n")
    return [str(ckpt), "--curves"]


BAD = {
    "missing checkpoint": (lambda ckpt: [str(ckpt.parent / "nope.pt")], "checkpoint not found"),
    "truncated checkpoint": (truncated, "truncated"),
    "empty image folder": (empty_folder, "no images"),
    "missing log": (lambda ckpt: [str(ckpt), "--curves"], "no training log"),
    "log without fields": (log_without_fields, "loss_recons"),
}


@pytest.mark.parametrize("case", BAD)
def test_bad_input_is_one_line_error(case, ckpt, capsys):
    make_argv, words = BAD[case]
    with pytest.raises(SystemExit) as e:
        visualize.main(make_argv(ckpt))
    err = capsys.readouterr().err
    assert e.value.code == 1
    assert err.startswith("visualize.py: error: ") and words in err and err.count("\n") == 1


def test_cli_error_has_no_traceback(tmp_path):
    """The script itself, as a user runs it: a missing checkpoint is one line, non-zero exit."""
    here = os.path.dirname(os.path.abspath(__file__))
    r = subprocess.run([sys.executable, os.path.join(here, "visualize.py"), str(tmp_path / "ckpt.pt")],
                       capture_output=True, text=True, timeout=120)
    assert r.returncode != 0
    assert r.stderr.startswith("visualize.py: error: checkpoint not found") and r.stderr.count("\n") == 1
    assert "Traceback" not in r.stderr


def test_attention_maps_are_the_cls_query_row_written_out(tiny):
    """attention_maps = softmax(q_CLS k^T / sqrt(d)) of the last block over the N patch keys (the
    CLS key dropped), per head, each patch's weight spread over its P x P pixels: computed here from
    the blocks' weights with plain torch lines."""
    cfg, model = tiny
    vit = model.teacher.backbone
    x = torch.randn(2, 3, 16, 16, generator=torch.Generator().manual_seed(4))
    with torch.no_grad():
        t = vit.patch_embed.proj(x).flatten(2).transpose(1, 2)         # (B, N, D)
        t = torch.cat([vit.cls_token.expand(2, -1, -1), t], 1) + vit.pos_embed
        for block in vit.blocks[:-1]:
            t = block(t)
        last = vit.blocks[-1]
        y = torch.nn.functional.layer_norm(t, (cfg.dim,), last.norm1.weight, last.norm1.bias, 1e-6)
        qkv = y @ last.attn.qkv.weight.t() + last.attn.qkv.bias         # (B, 1 + N, 3D)
        d = cfg.dim // cfg.heads
        q = qkv[:, 0, :cfg.dim].reshape(2, cfg.heads, 1, d)             # the CLS query only
        k = qkv[:, :, cfg.dim:2 * cfg.dim].reshape(2, 17, cfg.heads, d).transpose(1, 2)
        w = torch.softmax(q @ k.transpose(-2, -1) / d ** 0.5, -1)[:, :, 0, 1:]   # (B, h, N)
    maps = visualize.attention_maps(vit, x)
    torch.testing.assert_close(maps[..., ::4, ::4], w.reshape(2, cfg.heads, 4, 4))


def test_pictures_use_the_teacher_for_attention_and_the_student_for_reconstructions(tmp_path, monkeypatch):
    """In a checkpoint whose teacher differs from its student, --attention draws the teacher's
    backbone and the reconstructions come from the student (the decoder is the student's)."""
    cfg = sit.Config(**TINY)
    model = sit.SiT(cfg).eval()
    with torch.no_grad():
        for p in model.teacher.parameters():
            p.add_(0.1)
    path = tmp_path / "run" / "ckpt.pt"
    runtime.save_checkpoint(str(path), cfg, model, step=4, epoch=1, run=SYNTHETIC)
    seen = {}
    maps, rows = visualize.attention_maps, visualize.reconstruction_rows
    monkeypatch.setattr(visualize, "attention_maps", lambda b, x: seen.setdefault("attn", b) and maps(b, x))
    monkeypatch.setattr(visualize, "reconstruction_rows",
                        lambda m, c, x, g: seen.setdefault("recon", m) and rows(m, c, x, g))
    visualize.main([str(path), "--n", "2", "--attention", "--out", str(tmp_path / "a.png")])
    visualize.main([str(path), "--n", "2", "--out", str(tmp_path / "r.png")])
    assert torch.equal(seen["attn"].pos_embed, model.teacher.backbone.pos_embed)
    assert not torch.equal(seen["attn"].pos_embed, model.student.backbone.pos_embed)
    assert torch.equal(seen["recon"].student.backbone.pos_embed, model.student.backbone.pos_embed)


def test_each_panel_shows_its_row_and_image(tiny):
    """The reconstruction figure puts rows original, corrupted, reconstruction, pasted top to bottom,
    image b in column b, each shown in true colours (denormalised, clipped to [0, 1]); the attention
    figure shows each image, then the mean of the heads, then each head's map scaled to 0..1."""
    cfg, model = tiny
    x = torch.randn(3, 3, 16, 16, generator=torch.Generator().manual_seed(2))
    rows = visualize.reconstruction_rows(model, cfg, x, torch.Generator().manual_seed(0))
    mean, std = data.STATS["synthetic"]
    fig = visualize.reconstruction_figure(rows, mean, std, "title")
    axes = sorted(fig.axes, key=lambda ax: (-round(ax.get_position().y0, 6), ax.get_position().x0))  # reading order
    for i, key in enumerate(["original", "corrupted", "reconstruction", "pasted"]):
        expected = (rows[key] * torch.tensor(std).view(1, 3, 1, 1) + torch.tensor(mean).view(1, 3, 1, 1)).clamp(0, 1)
        for b in range(3):
            shown = np.asarray(axes[i * 3 + b].images[0].get_array())
            np.testing.assert_allclose(shown, expected[b].permute(1, 2, 0).numpy(), atol=1e-6)
    maps = visualize.attention_maps(model.teacher.backbone, x)
    fig = visualize.attention_figure(x, maps, mean, std, "title")
    axes = sorted(fig.axes, key=lambda ax: (-round(ax.get_position().y0, 6), ax.get_position().x0))
    assert len(axes) == 3 * (2 + cfg.heads)
    for r, layer in enumerate([maps.mean(1)] + [maps[:, h] for h in range(cfg.heads)]):
        for b in range(3):
            a = layer[b] - layer[b].min()
            overlay = np.asarray(axes[(r + 1) * 3 + b].images[1].get_array())
            np.testing.assert_allclose(overlay, (a / a.max()).numpy(), atol=1e-6)
