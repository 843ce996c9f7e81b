"""Tests of sit.py: small, seeded, CPU only, no network. Run: python -m pytest -q test_sit.py

Each test states in its docstring the property it checks. Tiny sizes throughout (D 32, depth 2,
16 x 16 images, P 4) so the whole file runs in seconds on a 2-core laptop.
"""
import math

import numpy as np
import pytest
import torch

import rng
import runtime
import sit

TINY = dict(model="tiny", dim=32, depth=2, heads=2, img_size=16, patch_size=4, proj_hidden=64,
            proj_dim=16)


def tiny_cfg(**kw):
    return sit.Config(**{**TINY, **kw})


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)
    np.random.seed(0)


def gen(seed):
    return torch.Generator().manual_seed(seed)


def corrupt(x, *args, g, **kw):
    """sit.gmml_corrupt with its draws from the generator g."""
    with rng.source(g):
        return sit.gmml_corrupt(x, *args, **kw)


def mask_of(share, *args, g, **kw):
    with rng.source(g):
        return sit.gmml_mask(share, *args, **kw)


def two_views(cfg, B=4, seed=0):
    """clean, corrupted (2B, C, H, W) and mask (2B, 1, H, W), as train.py stacks the two views."""
    g = gen(seed)
    clean = torch.randn(2 * B, cfg.in_chans, cfg.img_size, cfg.img_size, generator=g)
    with rng.source(g):
        corrupted, mask = sit.gmml_corrupt(clean, cfg.drop_perc, cfg.drop_replace, cfg.drop_align,
                                           cfg.drop_type, cfg.max_block)
    return clean, corrupted, mask


def swap_views(t):
    a, b = t.chunk(2)
    return torch.cat([b, a])


# ------------------------------------------------------------------------------------------------
# Config
# ------------------------------------------------------------------------------------------------

def test_config_presets_fill_sizes():
    """Presets fill dim/depth/heads when they are 0, and explicit values override the preset."""
    for name, (D, depth, h) in sit.MODEL_PRESETS.items():
        cfg = sit.Config(model=name)
        assert (cfg.dim, cfg.depth, cfg.heads) == (D, depth, h)
    assert (sit.Config(model="tiny").dim, sit.Config(model="base").heads) == (192, 12)
    cfg = tiny_cfg()
    assert (cfg.dim, cfg.depth, cfg.heads) == (32, 2, 2)


def test_config_drop_align_defaults_to_patch_size():
    """drop_align 0 resolves to the patch size (groups of tokens); an explicit value is kept."""
    assert sit.Config(patch_size=8, img_size=32).drop_align == 8
    assert sit.Config(patch_size=4, drop_align=1).drop_align == 1


def test_config_rejects_shapes_that_do_not_fit():
    """img_size not a multiple of patch_size, or dim not a multiple of heads, raise ValueError naming both flags
    (the range of each value is the command line's check: test_flags.py)."""
    with pytest.raises(ValueError, match="--img-size 30 is not a multiple of --patch-size 4"):
        sit.Config(img_size=30, patch_size=4)
    with pytest.raises(ValueError, match="--dim 30 is not a multiple of --heads 4"):
        sit.Config(dim=30, heads=4)


def test_config_dict_and_command_line_round_trip():
    """Config.from_dict(vars(cfg)) == cfg, keys that are not the method's are ignored, and the
    command line parses to the same Config and the run's options beside it."""
    cfg = tiny_cfg(drop_perc=0.7, alpha=1.0)
    assert sit.Config.from_dict(vars(cfg)) == cfg
    assert sit.Config.from_dict({**vars(cfg), "gone_field": 3, "dataset": "x"}) == cfg
    parsed, run, given = runtime.parse_train_args(
        ["--model", "tiny", "--dim", "32", "--depth", "2", "--heads", "2", "--img-size", "16", "--patch-size",
         "4", "--proj-hidden", "64", "--proj-dim", "16", "--drop-perc", "0.7", "--alpha", "1", "--compile",
         "--dataset=synthetic"])
    assert parsed == cfg and run.compile is True and run.dataset == "synthetic" and run.out == "runs/synthetic"
    assert given == {"model", "dim", "depth", "heads", "img_size", "patch_size", "proj_hidden", "proj_dim",
                     "drop_perc", "alpha", "compile", "dataset"}


# ------------------------------------------------------------------------------------------------
# Patches
# ------------------------------------------------------------------------------------------------

def test_patchify_round_trip_and_layout():
    """unpatchify(patchify(x)) == x, and patch 0 / patch 1 are the top-left / next-right P x P
    blocks flattened in (row, column, channel) order."""
    B, C, H, W, P = 2, 3, 8, 12, 4
    x = torch.randn(B, C, H, W)
    p = sit.patchify(x, P)
    assert p.shape == (B, (H // P) * (W // P), P * P * C)
    assert torch.equal(sit.unpatchify(p, P, H, W), x)
    assert torch.equal(p[:, 0], x[:, :, :P, :P].permute(0, 2, 3, 1).reshape(B, -1))
    assert torch.equal(p[:, 1], x[:, :, :P, P:2 * P].permute(0, 2, 3, 1).reshape(B, -1))
    assert torch.equal(p[:, W // P], x[:, :, P:2 * P, :P].permute(0, 2, 3, 1).reshape(B, -1))


# ------------------------------------------------------------------------------------------------
# GMML corruption
# ------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("align", [4, 1])
@pytest.mark.parametrize("p", [0.3, 0.5, 0.75])
def test_mask_share_within_bounds(p, align):
    """Each image's corrupted share lies in [min(0.5, p), p + one largest block's share]; the mask
    is bool (B, 1, H, W)."""
    H = W = 32
    B = 16
    x = torch.randn(B, 3, H, W)
    cells = max(1, int(H // align * 0.3))                            # largest block side, cells
    block_share = (cells * align) ** 2 / (H * W)
    for seed in range(4):
        _, mask = corrupt(x, drop_perc=p, drop_replace=p, align=align, g=gen(seed))
        assert mask.dtype == torch.bool and mask.shape == (B, 1, H, W)
        share = mask.float().mean((1, 2, 3))
        assert (share >= min(0.5, p) - 1e-6).all(), share
        assert (share <= p + block_share + 1e-6).all(), share


def test_gmml_mask_reaches_given_share():
    """gmml_mask covers at least the share asked of each image and at most one block more."""
    share = torch.tensor([0.1, 0.25, 0.5, 0.6, 0.8])
    mask = mask_of(share, 16, 16, align=4, max_block=0.5, max_share=0.8, g=gen(3))
    got = mask.float().mean((1, 2, 3))
    assert (got >= share - 1e-6).all(), got
    assert (got <= share + (2 * 4) ** 2 / 256 + 1e-6).all(), got


def test_zero_share_corrupts_nothing():
    """A target share of 0 (e.g. --drop-perc 0) gives an empty mask and leaves the images as they are."""
    mask = mask_of(torch.zeros(4), 16, 16, align=4, g=gen(0))
    assert not mask.any()
    x = torch.randn(4, 3, 16, 16)
    out, mask = corrupt(x, drop_perc=0.0, drop_replace=0.0, align=4, g=gen(0))
    assert not mask.any() and torch.equal(out, x)


@pytest.mark.parametrize("align", [4, 8])
def test_mask_aligned_to_grid(align):
    """With drop_align = a, every a x a cell of the mask is all True or all False."""
    H = W = 32
    _, mask = corrupt(torch.randn(8, 3, H, W), 0.6, 0.6, align=align, g=gen(1))
    cells = sit.patchify(mask.float(), align)                        # (B, N, a*a)
    assert ((cells == 0).all(-1) | (cells == 1).all(-1)).all()
    assert mask.any() and not mask.all()


def test_mask_not_aligned_with_align_1():
    """With drop_align 1 (the reference default) some blocks cut through patches."""
    _, mask = corrupt(torch.randn(8, 3, 32, 32), 0.5, 0.5, align=1, g=gen(1))
    cells = sit.patchify(mask.float(), 4)
    assert not ((cells == 0).all(-1) | (cells == 1).all(-1)).all()


@pytest.mark.parametrize("B", [2, 5])
def test_replacement_never_from_the_image_itself(B):
    """Replaced regions come from the same place in one *other* image; other corrupted images are
    zero-filled (drop_type zeros)."""
    H = W = 8
    pix = torch.arange(3 * H * W, dtype=torch.float64).view(1, 3, H, W)
    ids = torch.arange(B, dtype=torch.float64).view(B, 1, 1, 1)
    x = 1000 * (ids + 1) + pix                                       # image b: its own constant + position
    n_replaced = 0
    for seed in range(40):
        out, mask = corrupt(x, drop_perc=0.5, drop_replace=0.5, align=2, drop_type="zeros", g=gen(seed))
        for b in range(B):
            m = mask[b].expand(3, H, W)
            vals = out[b][m]
            assert vals.numel() > 0
            if (vals == 0).all():                                    # zero fill
                continue
            src = torch.round((vals - pix[0][m]) / 1000 - 1)         # which image each pixel came from
            assert (vals == x[src.long(), 0, 0, 0] + pix[0][m]).all()  # same region of that image
            assert (src == src[0]).all() and src[0] != b, (seed, b, src.unique())
            n_replaced += 1
    assert n_replaced > 0.3 * 40 * B                                 # about half the images


def test_corruption_reproducible_from_generator():
    """Same generator seed -> same masks and corrupted images; different seeds -> different masks."""
    x = torch.randn(6, 3, 16, 16)
    a, ma = corrupt(x, 0.5, 0.3, align=4, g=gen(7))
    b, mb = corrupt(x, 0.5, 0.3, align=4, g=gen(7))
    _, mc = corrupt(x, 0.5, 0.3, align=4, g=gen(8))
    assert torch.equal(ma, mb) and torch.equal(a, b)
    assert not torch.equal(ma, mc)


@pytest.mark.parametrize("drop_type", ["noise", "zeros"])
def test_corruption_changes_only_masked_pixels(drop_type):
    """Every corrupted pixel is changed, every other pixel is exactly the input."""
    x = torch.randn(8, 3, 16, 16) + 5                                # no zeros, far from N(0, 1) fill
    out, mask = corrupt(x, 0.5, 0.3, align=4, drop_type=drop_type, g=gen(2))
    m = mask.expand_as(x)
    assert m.any()
    assert torch.equal(out[~m], x[~m])
    assert (out[m] != x[m]).all()


# ------------------------------------------------------------------------------------------------
# Transformer
# ------------------------------------------------------------------------------------------------

def test_attention_matches_hand_computation():
    """Attention.forward == proj(softmax(q k^T / sqrt(d)) v), with q, k, v, the softmax and the head
    split written out by hand (visualize.py's attention maps are checked against the same lines)."""
    B, N, D, h = 2, 5, 8, 2
    d = D // h
    attn = sit.Attention(D, h)
    x = torch.randn(B, N, D)
    qkv = x @ attn.qkv.weight.t() + attn.qkv.bias                    # (B, N, 3D): q | k | v, heads inside
    q, k, v = (qkv[..., i * D:(i + 1) * D].reshape(B, N, h, d).transpose(1, 2) for i in range(3))
    s = q @ k.transpose(-2, -1) / math.sqrt(d)                       # (B, h, N, N)
    w = torch.exp(s - s.max(-1, keepdim=True).values)
    w = w / w.sum(-1, keepdim=True)
    o = (w @ v).transpose(1, 2).reshape(B, N, D)
    expected = o @ attn.proj.weight.t() + attn.proj.bias
    with torch.no_grad():
        torch.testing.assert_close(attn(x), expected)


def test_position_embedding_interpolation():
    """A ViT built for 16 x 16 runs on 24 x 24, returns (B, 1 + 36, D), and the interpolated grid
    keeps rows as rows (a position embedding that varies by row only still does)."""
    cfg = tiny_cfg()
    vit = sit.ViT(16, 4, 3, cfg.dim, cfg.depth, cfg.heads).eval()
    with torch.no_grad():
        out = vit(torch.randn(2, 3, 24, 24))
    assert out.shape == (2, 1 + 36, cfg.dim)
    with torch.no_grad():
        rows = torch.arange(4.0).repeat_interleave(4).view(1, 16, 1).expand(1, 16, cfg.dim)
        vit.pos_embed[:, 1:] = rows                                  # value = row index of the patch
        pe = vit.pos_embed_for(6, 6)
    assert pe.shape == (1, 37, cfg.dim)
    torch.testing.assert_close(pe[:, 0], vit.pos_embed[:, 0])        # CLS position untouched
    grid = pe[0, 1:, 0].view(6, 6)
    torch.testing.assert_close(grid, grid[:, :1].expand(6, 6))       # constant along each row
    assert (grid[1:, 0] > grid[:-1, 0]).all()                        # increasing down the rows
    assert vit.pos_embed_for(4, 4) is vit.pos_embed


# ------------------------------------------------------------------------------------------------
# Losses
# ------------------------------------------------------------------------------------------------

def test_recon_loss_only_counts_corrupted_pixels():
    """recon_loss is 0 for a perfect reconstruction, ignores pixels outside the mask, reacts to
    pixels inside it, and equals mean |recon - clean| over corrupted pixels (all channels)."""
    clean = torch.randn(3, 3, 8, 8)
    mask = torch.zeros(3, 1, 8, 8, dtype=torch.bool)
    mask[0, :, :4, :4] = True
    mask[2, :, 2:8, 6:] = True
    assert sit.recon_loss(clean.clone(), clean, mask) == 0
    recon = clean + torch.randn_like(clean)
    base = sit.recon_loss(recon, clean, mask)
    m = mask.expand_as(clean)
    outside = recon.clone()
    outside[~m] += 10
    assert torch.equal(sit.recon_loss(outside, clean, mask), base)
    inside = recon.clone()
    inside[m] += 10
    assert sit.recon_loss(inside, clean, mask) > base + 1
    r, c, mk = recon.numpy(), clean.numpy(), mask.numpy()
    hand = sum(abs(r[b, ch, i, j] - c[b, ch, i, j]) for b in range(3) for ch in range(3)
               for i in range(8) for j in range(8) if mk[b, 0, i, j]) / (mk.sum() * 3)
    assert base.item() == pytest.approx(hand, rel=1e-5)


def test_contrastive_loss_matches_hand_computation():
    """contrastive_loss == 2 tau x mean_i -log softmax_j(cos(q_i, k_j) / tau)[i], written in numpy."""
    B, Dp, tau = 5, 7, 0.2
    q, k = torch.randn(B, Dp), torch.randn(B, Dp)
    qn = q.numpy().astype(np.float64)
    kn = k.numpy().astype(np.float64)
    qn /= np.linalg.norm(qn, axis=1, keepdims=True)
    kn /= np.linalg.norm(kn, axis=1, keepdims=True)
    logits = qn @ kn.T / tau
    log_softmax = logits - np.log(np.exp(logits).sum(1, keepdims=True))
    hand = -np.mean(np.diag(log_softmax)) * 2 * tau
    got = sit.contrastive_loss(q, k, tau)
    assert got.item() == pytest.approx(hand, rel=1e-5)
    # Only the diagonal is positive: aligned keys give a lower loss than shuffled ones.
    assert sit.contrastive_loss(q, q, tau) < sit.contrastive_loss(q, q.roll(1, 0), tau)


@pytest.mark.parametrize("mode", ["eval", "train"])
def test_sit_loss_symmetric_in_views(mode):
    """Swapping view 1 and view 2 (clean, corrupted and mask together) leaves loss_contr and
    loss_recons unchanged (train mode with drop_path 0: the heads' batch norm statistics are those
    of both views together, which a swap does not change)."""
    cfg = tiny_cfg(drop_path=0.0)
    model = sit.SiT(cfg).train(mode == "train")
    clean, corrupted, mask = two_views(cfg)
    with torch.no_grad():
        a = model(clean, corrupted, mask)
        b = model(swap_views(clean), swap_views(corrupted), swap_views(mask))
    torch.testing.assert_close(a["loss_contr"], b["loss_contr"])
    torch.testing.assert_close(a["loss_recons"], b["loss_recons"])
    torch.testing.assert_close(a["loss"], cfg.alpha * a["loss_recons"] + a["loss_contr"])
    # The two InfoNCE terms differ, so the symmetry is not that of two equal numbers.
    q1, q2 = model.project(model.student.head, model.student.backbone(corrupted)[:, 0])
    k1, k2 = model.project(model.teacher.head, model.teacher.backbone(clean)[:, 0])
    assert not torch.isclose(sit.contrastive_loss(q1, k2, cfg.tau), sit.contrastive_loss(q2, k1, cfg.tau))


# ------------------------------------------------------------------------------------------------
# Teacher
# ------------------------------------------------------------------------------------------------

def test_teacher_gets_no_gradients():
    """After loss.backward() every teacher parameter has requires_grad False and .grad None, while
    the student's backbone, head and decoder all get gradients."""
    cfg = tiny_cfg()
    model = sit.SiT(cfg)
    model(*two_views(cfg))["loss"].backward()
    for name, p in model.teacher.named_parameters():
        assert not p.requires_grad and p.grad is None, name
    for part in ("backbone", "head", "decoder"):
        grads = [p.grad for p in model.student[part].parameters()]
        assert all(g is not None for g in grads) and any(g.abs().sum() > 0 for g in grads), part


def test_update_teacher_momentum_end_points():
    """update_teacher(m=1) keeps the teacher, update_teacher(m=0) copies the student's backbone and
    head; the teacher's initial weights are a copy, not shared tensors."""
    cfg = tiny_cfg()
    model = sit.SiT(cfg)
    with torch.no_grad():
        for p in model.student.parameters():
            p.add_(torch.randn_like(p))
    teacher0 = {n: p.clone() for n, p in model.teacher.named_parameters()}
    student = dict(model.student.named_parameters())
    assert any(not torch.equal(p, student[n]) for n, p in teacher0.items())
    model.update_teacher(1.0)
    for n, p in model.teacher.named_parameters():
        assert torch.equal(p, teacher0[n]), n
    model.update_teacher(0.5)
    for n, p in model.teacher.named_parameters():
        torch.testing.assert_close(p, (teacher0[n] + student[n]) / 2)
    model.update_teacher(0.0)
    for n, p in model.teacher.named_parameters():
        assert torch.equal(p, student[n]), n
    assert set(dict(model.teacher.named_parameters())) == {n for n in student if not n.startswith("decoder")}


# ------------------------------------------------------------------------------------------------
# Schedules
# ------------------------------------------------------------------------------------------------

def test_schedule_end_points():
    """lr: 0 at step 0, lr x batch/256 at the end of warm-up, min_lr at the end; weight decay and
    teacher momentum go from their start values to weight_decay_end and 1."""
    cfg = sit.Config(lr=5e-4, batch_size=64, min_lr=1e-6, epochs=10, warmup_epochs=2,
                     weight_decay=0.04, weight_decay_end=0.1, momentum_teacher=0.996)
    spe = 7
    total, warm = 10 * spe, 2 * spe
    peak = 5e-4 * 64 / 256
    assert sit.lr_at(0, cfg, spe) == 0
    assert sit.lr_at(warm // 2, cfg, spe) == pytest.approx(peak / 2)
    assert sit.lr_at(warm, cfg, spe) == pytest.approx(peak)
    assert sit.lr_at(total, cfg, spe) == pytest.approx(1e-6)
    assert 1e-6 < sit.lr_at((warm + total) // 2, cfg, spe) < peak
    table = sit.schedules(cfg, spe)                                  # (3, T + 1): lr, wd, m per step
    assert table.shape == (3, total + 1) and table.dtype == torch.float32
    assert table[0].tolist() == pytest.approx([sit.lr_at(s, cfg, spe) for s in range(total + 1)])
    assert (table[1, 0], table[1, -1]) == (pytest.approx(0.04), pytest.approx(0.1))
    assert (table[2, 0], table[2, -1]) == (pytest.approx(0.996), pytest.approx(1.0))
    assert table[1, total // 2] == pytest.approx(0.07) and table[2, total // 2] == pytest.approx(0.998)
    assert (table[2, 1:] >= table[2, :-1]).all() and (table[1, 1:] >= table[1, :-1]).all()
    short = sit.schedules(cfg, spe, total=30)                        # a run cut to 30 steps (a time budget)
    assert short.shape == (3, 31) and short[0, -1] == pytest.approx(1e-6) and short[2, -1] == 1


# ------------------------------------------------------------------------------------------------
# Checkpoints
# ------------------------------------------------------------------------------------------------

def test_checkpoint_round_trip(tmp_path):
    """save_checkpoint then load_checkpoint rebuilds a model with identical outputs (eval mode), the
    file loads with torch.load(weights_only=True), and step/epoch/optimizer come back."""
    cfg = tiny_cfg()
    model = sit.SiT(cfg)
    opt = torch.optim.AdamW(model.student.parameters(), lr=1e-3)
    model(*two_views(cfg))["loss"].backward()                        # moves BN stats, fills grads
    opt.step()
    model.update_teacher(0.5)
    path = tmp_path / "run" / "ckpt.pt"
    runtime.save_checkpoint(str(path), cfg, model, opt.state_dict(), step=12, epoch=3, extra=dict(knn=0.5))
    raw = torch.load(str(path), weights_only=True)
    assert raw["step"] == 12 and raw["epoch"] == 3 and raw["extra"] == dict(knn=0.5)
    assert [p.name for p in path.parent.iterdir()] == ["ckpt.pt"]   # no temp file left behind
    cfg2, model2, ckpt = runtime.load_checkpoint(str(path))
    assert cfg2 == cfg
    opt2 = torch.optim.AdamW(model2.student.parameters(), lr=1e-3)
    opt2.load_state_dict(ckpt["optimizer"])
    for p, p2 in zip(model.student.parameters(), model2.student.parameters()):   # the same moments and step
        for key in ("exp_avg", "exp_avg_sq", "step"):
            assert torch.equal(opt.state[p][key], opt2.state[p2][key]), key
    views = two_views(cfg, seed=1)
    model.eval(), model2.eval()
    with torch.no_grad():
        a, b = model(*views), model2(*views)
    for key in ("loss", "loss_recons", "loss_contr", "recon"):
        assert torch.equal(a[key], b[key]), key


def test_truncated_checkpoint_raises_one_line_error(tmp_path):
    """A checkpoint cut in half raises CheckpointError with a one-line message."""
    cfg = tiny_cfg()
    path = tmp_path / "ckpt.pt"
    runtime.save_checkpoint(str(path), cfg, sit.SiT(cfg))
    data = path.read_bytes()
    path.write_bytes(data[:len(data) // 2])
    with pytest.raises(runtime.CheckpointError) as e:
        runtime.load_checkpoint(str(path))
    assert str(e.value) and "\n" not in str(e.value)


def test_foreign_or_missing_file_raises_checkpoint_error(tmp_path):
    """A torch file of a plain dict, a text file, a missing file and weights that do not fit their
    config all raise CheckpointError (one line each)."""
    plain, text = tmp_path / "plain.pt", tmp_path / "notes.txt"
    torch.save({"model": {"w": torch.zeros(2)}}, str(plain))
    text.write_text("not a checkpoint\n")
    cfg = tiny_cfg()
    bad = tmp_path / "bad.pt"
    runtime.save_checkpoint(str(bad), cfg, sit.SiT(cfg))
    raw = torch.load(str(bad), weights_only=True)
    raw["config"]["dim"] = 64                                        # weights no longer fit
    torch.save(raw, str(bad))
    for path in (plain, text, tmp_path / "missing.pt", bad):
        with pytest.raises(runtime.CheckpointError) as e:
            runtime.load_checkpoint(str(path))
        assert "\n" not in str(e.value)


# ------------------------------------------------------------------------------------------------
# Optimisation
# ------------------------------------------------------------------------------------------------

def test_few_steps_lower_the_loss():
    """30 AdamW steps (lr 1e-3) on a tiny fixed batch, a fresh seeded corruption per step, lower
    the total loss (mean of the last 3 steps below the mean of the first 3)."""
    cfg = tiny_cfg()
    model = sit.SiT(cfg)
    opt = torch.optim.AdamW(model.student.parameters(), lr=1e-3)
    g = gen(0)
    img = torch.randn(8, 3, 16, 16, generator=g)
    clean = torch.cat([img, img.flip(-1)])                           # view 2 = flipped view 1
    losses = []
    for step in range(30):
        corrupted, mask = corrupt(clean, cfg.drop_perc, cfg.drop_replace, cfg.drop_align, g=g)
        loss = model(clean, corrupted, mask)["loss"]
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        model.update_teacher(0.99)
        losses.append(loss.item())
    assert all(math.isfinite(v) for v in losses)
    assert np.mean(losses[-3:]) < np.mean(losses[:3]), losses


def test_head_bn_per_view_or_pair():
    """head_bn "view" normalises each view's CLS tokens with that view's batch statistics; "pair"
    normalises all 2B at once (the authors' code): same weights, different embeddings."""
    cfg = tiny_cfg(drop_path=0.0)
    torch.manual_seed(0)
    model = sit.SiT(cfg)
    cls = torch.randn(8, cfg.dim, generator=torch.Generator().manual_seed(0))
    cls[4:] += 3.0                                                   # the views differ in their statistics
    head = model.student.head
    assert model.cfg.head_bn == "pair"                               # the default, as the authors' code
    model.cfg.head_bn = "view"
    view = model.project(head, cls)
    model.cfg.head_bn = "pair"
    pair = model.project(head, cls)
    assert torch.allclose(view[0], head(cls[:4])) and torch.allclose(view[1], head(cls[4:]))
    assert torch.allclose(torch.cat(pair), head(cls))
    assert not torch.allclose(view[0], pair[0], atol=1e-3)


def test_config_from_an_older_checkpoint_keeps_its_head_bn():
    """A config saved before --head-bn existed rebuilds with the per-view batch norm it trained with;
    a new one keeps what it saved."""
    old = {k: v for k, v in vars(tiny_cfg()).items() if k != "head_bn"}
    assert sit.Config.from_dict(old).head_bn == "view"
    assert sit.Config.from_dict(vars(tiny_cfg())).head_bn == "pair"


# ------------------------------------------------------------------------------------------------
# The method's promises, each checked against values written out here with plain torch lines
# ------------------------------------------------------------------------------------------------

def distinct_teacher(cfg, seed=3):
    """A SiT whose teacher differs from its student (as after training), in eval mode, no drop path."""
    model = sit.SiT(cfg).eval()
    g = gen(seed)
    with torch.no_grad():
        for p in model.teacher.parameters():
            p.add_(0.05 * torch.randn(p.shape, generator=g))
    return model


def test_reconstruction_target_is_the_clean_view_over_corrupted_pixels_only():
    """loss_recons = mean |decoder(student(corrupted)) - clean| over the corrupted pixels (all
    channels), written out here; it does not move when clean pixels outside the mask change, and it
    does when they change inside it."""
    cfg = tiny_cfg(drop_path=0.0)
    model = distinct_teacher(cfg)
    clean, corrupted, mask = two_views(cfg)
    with torch.no_grad():
        out = model(clean, corrupted, mask)
        tokens = model.student.backbone(corrupted)                   # the student sees the corrupted views
        pixels = model.student.decoder.to_pixels(model.student.decoder.mlp(tokens[:, 1:]))
        recon = pixels.view(8, 4, 4, 4, 4, 3).permute(0, 5, 1, 3, 2, 4).reshape(8, 3, 16, 16)
        m = mask.expand_as(clean)
        expected = (recon - clean).abs()[m].mean()
        torch.testing.assert_close(out["loss_recons"], expected)
        torch.testing.assert_close(out["recon"], recon)
        outside = torch.where(m, clean, clean + 3.0)
        inside = torch.where(m, clean + 3.0, clean)
        torch.testing.assert_close(model(outside, corrupted, mask)["loss_recons"], expected)
        assert model(inside, corrupted, mask)["loss_recons"] > expected + 1


def info_nce(q, k, tau):
    """2 tau x mean_i -log softmax_j(cos(q_i, k_j) / tau)[i], written out."""
    q = q / q.norm(dim=1, keepdim=True)
    k = k / k.norm(dim=1, keepdim=True)
    logits = q @ k.t() / tau
    return -(logits.diag() - logits.exp().sum(1).log()).mean() * 2 * tau


@pytest.mark.parametrize("head_bn", ["pair", "view"])
def test_contrastive_loss_pairs_each_student_view_with_the_teachers_other_clean_view(head_bn):
    """loss_contr = InfoNCE(student view 1, teacher view 2) + InfoNCE(student view 2, teacher view 1):
    the student embeds the corrupted views, the teacher (which differs from it) the clean ones; the
    same-view pairing gives another value."""
    cfg = tiny_cfg(drop_path=0.0, head_bn=head_bn)
    model = distinct_teacher(cfg)
    clean, corrupted, mask = two_views(cfg)
    with torch.no_grad():
        out = model(clean, corrupted, mask)

        def embed(part, x):
            cls = part.backbone(x)[:, 0]
            if head_bn == "pair":
                return part.head(cls).chunk(2)
            return part.head(cls[:4]), part.head(cls[4:])
        q1, q2 = embed(model.student, corrupted)
        k1, k2 = embed(model.teacher, clean)
        expected = info_nce(q1, k2, cfg.tau) + info_nce(q2, k1, cfg.tau)
        same_view = info_nce(q1, k1, cfg.tau) + info_nce(q2, k2, cfg.tau)
        torch.testing.assert_close(out["loss_contr"], expected)
        assert not torch.isclose(expected, same_view, rtol=1e-3)
        torch.testing.assert_close(out["loss"], cfg.alpha * out["loss_recons"] + expected)


def test_teacher_sees_the_clean_views_and_gets_no_gradient():
    """Corrupting the teacher's input would change loss_contr: with the clean views fixed, changing
    the corrupted views inside their mask leaves every teacher embedding as it was; backward gives
    no teacher parameter a gradient, while the student's get one."""
    cfg = tiny_cfg(drop_path=0.0)
    model = distinct_teacher(cfg)
    clean, corrupted, mask = two_views(cfg)
    seen = []
    model.teacher.backbone.register_forward_hook(lambda mod, args, out: seen.append(args[0]))
    out = model(clean, corrupted, mask)
    assert len(seen) == 1 and torch.equal(seen[0], clean)
    out["loss"].backward()
    assert all(p.grad is None for p in model.teacher.parameters())
    assert all(p.grad is not None for p in model.student.backbone.parameters())


# ------------------------------------------------------------------------------------------------
# Found by mutation testing (mutmut over sit.py, setup.cfg [mutmut]): promises no test above pinned
# ------------------------------------------------------------------------------------------------

def test_drop_path_drops_whole_samples_and_rescales_the_kept_ones():
    """drop_path draws one uniform per sample, keeps the samples with u >= rate, divides them by
    1 - rate; at rate 0 or in eval mode it is the identity and draws nothing."""
    x = torch.randn(4, 3, 5, generator=gen(0))
    u = torch.tensor([0.1, 0.3, 0.29, 0.9])                          # rate 0.3: keep samples 1 and 3
    with rng.source(u):
        out = sit.drop_path(x, 0.3, True)
    keep = torch.tensor([0.0, 1.0, 0.0, 1.0]).view(4, 1, 1)
    torch.testing.assert_close(out, x * keep / 0.7)
    for rate, training in ((0.0, True), (0.3, False), (0.0, False)):
        assert rng.count(lambda: sit.drop_path(x, rate, training)) == 0
        assert torch.equal(sit.drop_path(x, rate, training), x)


def test_block_applies_drop_path_to_both_residual_branches():
    """Block in train mode: x1 = x + keep1 attn(norm1(x)) / (1 - r), out = x1 + keep2 mlp(norm2(x1)) / (1 - r),
    one draw per sample for each branch in that order; in eval mode both branches are kept whole."""
    block = sit.Block(8, 2, drop_path=0.5).train()
    x = torch.randn(4, 5, 8, generator=gen(1))
    u = torch.tensor([0.7, 0.2, 0.4, 0.9, 0.1, 0.6, 0.8, 0.3])       # attn keeps 0, 3; mlp keeps 1, 2
    with torch.no_grad():
        with rng.source(u):
            out = block(x)
        k1 = torch.tensor([1.0, 0, 0, 1]).view(4, 1, 1)
        k2 = torch.tensor([0.0, 1, 1, 0]).view(4, 1, 1)
        x1 = x + block.attn(block.norm1(x)) * k1 / 0.5
        torch.testing.assert_close(out, x1 + block.mlp(block.norm2(x1)) * k2 / 0.5)
        block.eval()
        x1 = x + block.attn(block.norm1(x))
        torch.testing.assert_close(block(x), x1 + block.mlp(block.norm2(x1)))


def test_drop_path_rates_linear_in_depth_and_none_in_the_teacher():
    """The student's blocks drop with rates 0, r/(depth-1), ..., r (the last block r); the teacher's
    copies drop nothing."""
    cfg = tiny_cfg(depth=3, drop_path=0.1)
    model = sit.SiT(cfg)
    assert [b.drop_path for b in model.student.backbone.blocks] == pytest.approx([0.0, 0.05, 0.1])
    assert [b.drop_path for b in model.teacher.backbone.blocks] == [0.0, 0.0, 0.0]
    assert [b.drop_path for b in sit.ViT(16, 4, 3, 8, 1, 2, drop_path=0.2).blocks] == [0.0]
    assert [b.drop_path for b in sit.ViT(16, 4, 3, 8, 2, 2, drop_path=0.2).blocks] == [0.0, 0.2]


def test_sit_forward_returns_the_mask_it_was_given():
    """SiT.forward hands back the mask with the losses and reconstruction (visualize and train read it)."""
    cfg = tiny_cfg(drop_path=0.0)
    model = sit.SiT(cfg).eval()
    clean, corrupted, mask = two_views(cfg)
    with torch.no_grad():
        out = model(clean, corrupted, mask)
    assert out["mask"] is mask
    assert set(out) == {"loss", "loss_recons", "loss_contr", "recon", "mask"}


def test_recon_loss_of_one_corrupted_pixel_in_one_channel():
    """With one channel and one corrupted pixel the loss is that pixel's |recon - clean| (divided by
    a count of 1); with no corrupted pixel it is 0."""
    clean, recon = torch.zeros(2, 1, 4, 4), torch.zeros(2, 1, 4, 4)
    recon[1, 0, 2, 3] = 0.75
    recon[0, 0, 0, 0] = 5.0                                          # outside the mask
    mask = torch.zeros(2, 1, 4, 4, dtype=torch.bool)
    assert sit.recon_loss(recon, clean, mask) == 0
    mask[1, 0, 2, 3] = True
    assert sit.recon_loss(recon, clean, mask).item() == 0.75


def test_contrastive_loss_over_all_ranks_keys_with_positives_at_this_ranks_offset(monkeypatch):
    """With 2 processes (a stand-in for torch.distributed), rank 1's queries meet the keys of both
    ranks (rank 0's first) and its positives are its own keys, at offset B: written out here."""
    B, Dp, tau = 3, 5, 0.2
    q, k, k0 = (torch.randn(B, Dp, generator=gen(s)) for s in (1, 2, 3))
    k0 = k0 / k0.norm(dim=1, keepdim=True)                           # rank 0 sends its normalised keys

    class TwoRanks:
        @staticmethod
        def is_available():
            return True

        @staticmethod
        def is_initialized():
            return True

        @staticmethod
        def get_world_size():
            return 2

        @staticmethod
        def get_rank():
            return 1

        @staticmethod
        def all_gather(out, t):
            out[0].copy_(k0)
            out[1].copy_(t)

    monkeypatch.setattr(sit, "dist", TwoRanks)
    got = sit.contrastive_loss(q, k, tau)
    qn = q / q.norm(dim=1, keepdim=True)
    keys = torch.cat([k0, k])
    logits = qn @ (keys / keys.norm(dim=1, keepdim=True)).t() / tau  # (B, 2B)
    expected = -(logits[torch.arange(B), B + torch.arange(B)] - logits.exp().sum(1).log()).mean() * 2 * tau
    torch.testing.assert_close(got, expected)


def test_cosine_and_lr_edge_cases():
    """A one-step cosine ends at its end value at step 1; with no warm-up the lr starts at the peak
    (no division by a zero warm-up)."""
    assert sit.cosine(0.5, 0.1, 1, 1) == pytest.approx(0.1)
    assert sit.cosine(0.5, 0.1, 0, 1) == pytest.approx(0.5)
    cfg = sit.Config(lr=5e-4, batch_size=512, min_lr=1e-6, epochs=4, warmup_epochs=0)
    assert sit.lr_at(0, cfg, 5) == pytest.approx(1e-3)
    assert sit.lr_at(20, cfg, 5) == pytest.approx(1e-6)


def test_sit_corrupt_corrupts_each_view_on_its_own_with_the_configs_gmml():
    """SiT.corrupt = gmml_corrupt on view 1 then on view 2 with the config's drop_perc, drop_replace,
    drop_align, drop_type and max_block, drawn in that order; a replaced block comes from another
    image of the same view, never from the other view."""
    cfg = tiny_cfg(drop_perc=0.6, drop_replace=0.5, drop_align=2, drop_type="zeros", max_block=0.5)
    model = sit.SiT(cfg)
    B, H = 3, 16
    pix = torch.arange(3 * H * H, dtype=torch.float32).view(1, 3, H, H)
    clean = 1000 * (torch.arange(2 * B, dtype=torch.float32).view(2 * B, 1, 1, 1) + 1) + pix
    n_replaced = 0
    for seed in range(6):
        with rng.source(gen(seed)):
            corrupted, mask = model.corrupt(clean)
        with rng.source(gen(seed)):
            v1 = sit.gmml_corrupt(clean[:B], 0.6, 0.5, 2, "zeros", 0.5)
            v2 = sit.gmml_corrupt(clean[B:], 0.6, 0.5, 2, "zeros", 0.5)
        assert torch.equal(corrupted, torch.cat([v1[0], v2[0]])) and torch.equal(mask, torch.cat([v1[1], v2[1]]))
        share = mask.float().mean((1, 2, 3))
        assert (share >= 0.5 - 1e-6).all() and (share <= 0.6 + (2 * 4) ** 2 / H ** 2 + 1e-6).all()
        for b in range(2 * B):
            vals = corrupted[b][mask[b].expand(3, H, H)]
            if (vals == 0).all():
                continue
            src = (vals - pix[0][mask[b].expand(3, H, H)]) / 1000 - 1
            assert (src == src[0]).all() and src[0] != b and (src[0] < B) == (b < B)
            n_replaced += 1
    assert n_replaced > 0
    noisy = sit.SiT(tiny_cfg())                                      # drop_type "noise", the default
    with rng.source(gen(0)):
        corrupted, mask = noisy.corrupt(clean)
    with rng.source(gen(0)):
        v1, v2 = (sit.gmml_corrupt(v, 0.5, 0.3, 4, "noise", 0.3) for v in clean.chunk(2))
    assert torch.equal(corrupted, torch.cat([v1[0], v2[0]])) and (corrupted[mask.expand_as(clean)] != 0).all()


def test_position_embedding_interpolation_uses_half_pixel_centres():
    """Resizing the 4 x 4 grid to 8 x 8 samples the old grid at (i + 0.5) / 2 - 0.5 (align_corners
    False, as DINO), bicubic with torch's kernel (a = -0.75), written out: on positions that grow by
    1 per row, output rows 3 and 4 read rows 0..3 at 1.25 and 1.75."""
    def w(x, a=-0.75):                                               # cubic convolution kernel
        x = abs(x)
        return (a + 2) * x ** 3 - (a + 3) * x ** 2 + 1 if x <= 1 else a * x ** 3 - 5 * a * x ** 2 + 8 * a * x - 4 * a
    expected = [sum(w(s - j) * j for j in range(4)) for s in (1.25, 1.75)]
    vit = sit.ViT(16, 4, 3, 8, 1, 2)
    with torch.no_grad():
        vit.pos_embed[:, 1:] = torch.arange(4.0).repeat_interleave(4).view(1, 16, 1)
        grid = vit.pos_embed_for(8, 8)[0, 1:, 0].view(8, 8)
    torch.testing.assert_close(grid[3:5, 2], torch.tensor(expected))


def test_gmml_corrupt_defaults_written_out_from_an_explicit_stream():
    """gmml_corrupt with its defaults (drop_perc 0.5, drop_replace 0.3, align 4, noise, max_block 0.3) on
    8 x 8 images, fed a stream of chosen uniforms: per image (u0, u1, u2), then K = 8 blocks x 4, then
    the noise. u0 < 0.5 replaces from image (b + 1 + min(int(u2 (B - 1)), B - 2)) mod B, else N(0, 1)
    noise (sqrt(2) erfinv(2u - 1)); both shares (0.3, 0.5) take 2 of the 4 cells: blocks (0, 0), (1, 1).
    A single image is never replaced; with B = 2 the source is the other image even at u2 = 1."""
    cases = {3: ([[0.2, 0.9, 0.6], [0.5, 0.1, 0.3], [0.4, 0.5, 0.4]], [2, None, 0]),
             2: ([[0.1, 0.5, 1.0], [0.2, 0.5, 1.0]], [1, 0]),
             1: ([[0.1, 0.5, 0.5]], [None])}
    block = [[0.5, 0.5, 0.1, 0.1], [0.5, 0.5, 0.9, 0.9]] + [[0.5, 0.5, 0.1, 0.1]] * 6  # K = 8
    m = torch.zeros(1, 1, 8, 8, dtype=torch.bool)
    m[..., :4, :4] = m[..., 4:, 4:] = True
    for B, (u, src) in cases.items():
        x = torch.randn(B, 3, 8, 8, generator=gen(B)) + 5
        nu = torch.rand(B * 3 * 64, generator=gen(10 + B))
        noise = math.sqrt(2) * torch.erfinv((2 * nu - 1).clamp(-1 + 1e-6, 1 - 1e-6)).view(B, 3, 8, 8)
        stream = torch.cat([torch.tensor(u).flatten(), torch.tensor(block * B).flatten(), nu])
        with rng.source(stream):
            out, mask = sit.gmml_corrupt(x)
        assert torch.equal(mask, m.expand(B, 1, 8, 8))
        for b, s in enumerate(src):
            fill = noise[b] if s is None else x[s]
            torch.testing.assert_close(out[b], torch.where(m[0], fill, x[b]))


def test_gmml_draw_count_and_share_spread():
    """The number of uniforms drawn is B x 3 + B x K x 4 (no noise for zeros), K from max_block and
    max(drop_perc, drop_replace), written out: 16 x 16, align 4, max_block 0.5 -> 2 x 2 cell blocks
    of mean area 9/64, K = 2 ceil(log 0.5 / log(55/64)) = 10. Shares spread over U(0.5, p): at p 0.9
    the mean corrupted share is well above 0.5."""
    x = torch.randn(4, 3, 16, 16, generator=gen(0))
    K = 2 * math.ceil(math.log(0.5) / math.log(1 - 9 / 64))
    assert K == 10
    assert rng.count(sit.gmml_corrupt, x, 0.5, 0.3, 4, "zeros", 0.5) == 4 * 3 + 4 * K * 4
    _, mask = corrupt(torch.randn(64, 3, 32, 32, generator=gen(1)), 0.9, 0.9, align=1, g=gen(2))
    assert mask.float().mean() > 0.62


def _gmml_by_loop(u, share, H, W, align, mh, mw):
    """gmml_mask written as a loop: paint blocks (u[b, k] = size rows, size cols, top, left) one by one
    on the ceil(H / a) x ceil(W / a) grid until the painted share reaches share[b], then blow up cells
    to a x a pixels and crop to H x W."""
    B, K = u.shape[:2]
    gh, gw = -(-H // align), -(-W // align)
    out = torch.zeros(B, 1, H, W, dtype=torch.bool)
    for b in range(B):
        cells = torch.zeros(gh, gw, dtype=torch.bool)
        for k in range(K):
            if torch.tensor(float(cells.sum()), dtype=torch.float32) / (gh * gw) >= share[b]:
                break
            h, w = 1 + int(u[b, k, 0] * mh), 1 + int(u[b, k, 1] * mw)
            t, l = int(u[b, k, 2] * (gh - h + 1)), int(u[b, k, 3] * (gw - w + 1))
            cells[t:t + h, l:l + w] = True
        out[b, 0] = cells.repeat_interleave(align, 0).repeat_interleave(align, 1)[:H, :W]
    return out


def test_gmml_mask_default_max_block_sizes_and_crop_from_an_explicit_stream():
    """Default max_block 0.3 on 30 x 32 pixels, align 4: an 8 x 8 grid, blocks 1..2 cells high (u0) and
    wide (u1), corners from u2, u3; K = 2 ceil(log 0.5 / log(1 - 9/256)) = 40 at max_share 0.5. Equal to
    the painting loop, cropped to 30 rows; the first block of image 0 (u = .9, .1, 0, .99) is 2 x 1 cells
    at (0, 7)."""
    K = 2 * math.ceil(math.log(0.5) / math.log(1 - 9 / 256))
    assert K == 40
    u = torch.rand(3, K, 4, generator=gen(5))
    u[0, 0] = torch.tensor([0.9, 0.1, 0.0, 0.99])
    share = torch.tensor([0.5, 0.25, 1.0])
    with rng.source(u.flatten()):
        mask = sit.gmml_mask(share, 30, 32, 4, max_share=0.5)
    assert mask.shape == (3, 1, 30, 32)
    assert torch.equal(mask, _gmml_by_loop(u, share, 30, 32, 4, 2, 2))
    assert mask[0, 0, :8, 28:].all() and not mask[2].all()


def test_gmml_mask_single_cell_image():
    """An image of one grid cell (4 x 4 or 3 x 2 at align 4): the one block (mean area 1, clamped
    below 1 in K's formula) covers it all; K = 8 draws of 4."""
    for H, W in [(4, 4), (3, 2)]:
        with rng.source(torch.rand(2 * 8 * 4, generator=gen(1))):
            mask = sit.gmml_mask(torch.tensor([0.5, 0.0]), H, W, 4)
        assert mask.shape == (2, 1, H, W) and mask[0].all() and not mask[1].any()


def test_gmml_mask_block_count_bounds():
    """K = 2 ceil(log(1 - min(max_share, 0.95)) / log(1 - mean area)) capped at 250: 64 x 64 at align 1,
    max_block 0.05 (3 x 3 cells, mean area 4/4096) wants far more; 16 x 16 at align 4, max_block 0.5
    (mean area 9/64) gives 40 at max_share 0.95 and the same at 0.99 (max_share counts up to 0.95)."""
    def n_drawn(H, align, max_block, max_share):
        return rng.count(sit.gmml_mask, torch.full((2,), 0.5), H, H, align, max_block, max_share)
    assert 2 * math.ceil(math.log(0.05) / math.log(1 - 4 / 4096)) > 250
    assert n_drawn(64, 1, 0.05, 0.95) == 2 * 250 * 4
    K = 2 * math.ceil(math.log(0.05) / math.log(1 - 9 / 64))
    assert K == 40
    assert n_drawn(16, 4, 0.5, 0.95) == n_drawn(16, 4, 0.5, 0.99) == n_drawn(16, 4, 0.5, 1.0) == 2 * K * 4


def test_gmml_mask_image_short_of_its_share_keeps_all_blocks_next_to_one_that_reaches():
    """16 x 16, align 4, max_block 0.3: 1-cell blocks, K = 2 ceil(log 0.5 / log(1 - 1/16)) = 22 at
    max_share 0.5. All blocks sit on cell (0, 0) but image 1's block 1 on (3, 3): image 0 (share 1/16)
    keeps block 0; image 1 (share 1, out of reach) keeps all 22, so both cells, whatever image 0 does."""
    K = 2 * math.ceil(math.log(0.5) / math.log(1 - 1 / 16))
    assert K == 22
    u = torch.zeros(2, K, 4)
    u[1, 1, 2:] = 0.99
    with rng.source(u.flatten()):
        mask = sit.gmml_mask(torch.tensor([1 / 16, 1.0]), 16, 16, 4, max_share=0.5)
    expected = torch.zeros(2, 1, 16, 16, dtype=torch.bool)
    expected[:, :, :4, :4] = True
    expected[1, :, 12:, 12:] = True
    assert torch.equal(mask, expected)


def test_vit_decoder_and_head_written_out_by_hand():
    """The backbone, the decoder and the projection head against their layers written out in plain torch on a
    float64 toy with random weights: patches by reshaping (pixels (c, p, q) in the conv's order), CLS first,
    positions added, a pre-norm block (LayerNorm eps 1e-6, softmax attention, exact GELU), the final norm; the
    decoder's 3 x (Linear, GELU) and per-token pixels (p, q, c); the head's Linear-BN-ReLU-Linear-BN-GELU-
    Linear-BN (no affine; batch statistics), its width --proj-dim. Parameters in timm's shapes."""
    B, C, S, P, D, h = 3, 3, 16, 4, 32, 2
    g, N = S // P, (S // P) ** 2
    model = sit.SiT(tiny_cfg(depth=1, proj_dim=12)).double().train()
    with torch.no_grad():
        for p in model.parameters():
            p.normal_(0, 0.5)                                        # no zero bias, no unit LayerNorm
    vit, dec, head = model.student.backbone, model.student.decoder, model.student.head
    assert (vit.cls_token.shape, vit.pos_embed.shape) == ((1, 1, D), (1, 1 + N, D))
    x = torch.randn(B, C, S, S, dtype=torch.float64)

    def ln(t, m):
        t = (t - t.mean(-1, keepdim=True)) / (t.var(-1, unbiased=False, keepdim=True) + 1e-6).sqrt()
        return t * m.weight + m.bias

    def lin(t, m):
        return t @ m.weight.T + m.bias

    def gelu(t):
        return 0.5 * t * (1 + torch.erf(t / math.sqrt(2)))

    patches = x.reshape(B, C, g, P, g, P).permute(0, 2, 4, 1, 3, 5).reshape(B, N, C * P * P)
    emb = patches @ vit.patch_embed.proj.weight.reshape(D, -1).T + vit.patch_embed.proj.bias
    t = torch.cat([vit.cls_token.reshape(1, 1, D).expand(B, 1, D), emb], 1) + vit.pos_embed
    blk = vit.blocks[0]
    q, k, v = lin(ln(t, blk.norm1), blk.attn.qkv).reshape(B, 1 + N, 3, h, D // h).permute(2, 0, 3, 1, 4)
    att = torch.softmax(q @ k.transpose(-1, -2) / math.sqrt(D // h), -1) @ v    # (B, h, 1 + N, D/h)
    t = t + lin(att.transpose(1, 2).reshape(B, 1 + N, D), blk.attn.proj)
    t = ln(t + lin(gelu(lin(ln(t, blk.norm2), blk.mlp.fc1)), blk.mlp.fc2), vit.norm)
    torch.testing.assert_close(vit(x), t, rtol=1e-9, atol=1e-9)

    y = t[:, 1:]
    for i in range(3):
        y = gelu(lin(y, dec.mlp[2 * i]))
    pix = lin(y, dec.to_pixels)                                      # (B, N, P*P*C)
    bb, cc, yy, xx = torch.meshgrid(*(torch.arange(n) for n in (B, C, S, S)), indexing="ij")
    image = pix[bb, (yy // P) * g + xx // P, ((yy % P) * P + xx % P) * C + cc]
    torch.testing.assert_close(dec(t[:, 1:], S, S), image, rtol=1e-9, atol=1e-9)

    def bn(t, m=None):
        t = (t - t.mean(0)) / (t.var(0, unbiased=False) + 1e-5).sqrt()
        return t if m is None else t * m.weight + m.bias

    cls = torch.randn(2 * B, D, dtype=torch.float64)
    n = head.net
    z = bn(lin(gelu(bn(lin(bn(lin(cls, n[0]), n[1]).clamp(min=0), n[3]), n[4])), n[6]))
    out = head(cls)
    assert out.shape == (2 * B, 12) and len(n) == 8
    torch.testing.assert_close(out, z, rtol=1e-9, atol=1e-9)
