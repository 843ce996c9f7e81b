"""The stated choices of pretraining and evaluation, each pinned with its value written out here (never
read from the code under test): which parameters get weight decay, what a skipped step leaves alone,
the k-NN's k, temperature and weighting, the linear probe's grid and held-out share, the fine-tuning
recipe's defaults and where they go, and the pretraining views' augmentation parameters. Fixtures make
the things that should differ differ (teacher and student, view 1 and view 2), so that a swap shows.
CPU only, seeded, a few seconds on one thread."""
import inspect
import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F

import data
import eval as ev
import rng
import runtime
import sit
import train

TINY = dict(model="tiny", dim=32, depth=1, heads=2, img_size=16, patch_size=4, proj_hidden=64, proj_dim=16)
STEP_CFG = dict(TINY, depth=2, epochs=2, warmup_epochs=1, batch_size=16)


@pytest.fixture(autouse=True)
def one_thread():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def tiny_step(seed=1, **kw):
    """(run, model, opt): the loop's own eager step (train.stepper around train.train_step), tiny SiT."""
    cfg = sit.Config(**{**STEP_CFG, **kw})
    torch.manual_seed(0)
    model = sit.SiT(cfg)
    opt = train.AdamW(model, sit.schedules(cfg, 4), torch.device("cpu"))
    u = torch.empty(train.uniforms_per_step(cfg, (16, 3, 16, 16)))
    run = train.stepper(model, opt, u, torch.Generator().manual_seed(seed), *data.stats("synthetic"))
    return run, model, opt


def spy(monkeypatch, module, name, calls, result=None):
    """Replace module.name by a recorder of its arguments (defaults filled in, as the real function's
    signature gives them): calls gets (name, {arg: value}); returns result(bound) or calls through."""
    real = getattr(module, name)
    real = getattr(real, "__wrapped__", real)                           # spied on already: the real one
    sig = inspect.signature(real)

    def wrapper(*args, **kw):
        bound = sig.bind(*args, **kw)
        bound.apply_defaults()
        calls.append((name, dict(bound.arguments)))
        return result(bound.arguments) if result else real(*args, **kw)
    wrapper.__wrapped__ = real
    monkeypatch.setattr(module, name, wrapper)


# ------------------------------------------------------------------------------------------------
# 1. Weight decay: weight matrices only, in pretraining and in fine-tuning
# ------------------------------------------------------------------------------------------------

STUDENT_DECAY = {
    "backbone.patch_embed.proj.weight", "backbone.blocks.0.attn.qkv.weight", "backbone.blocks.0.attn.proj.weight",
    "backbone.blocks.0.mlp.fc1.weight", "backbone.blocks.0.mlp.fc2.weight",
    "head.net.0.weight", "head.net.3.weight", "head.net.6.weight",
    "decoder.mlp.0.weight", "decoder.mlp.2.weight", "decoder.mlp.4.weight", "decoder.to_pixels.weight"}
STUDENT_NO_DECAY = {
    "backbone.cls_token", "backbone.pos_embed", "backbone.patch_embed.proj.bias",
    "backbone.blocks.0.norm1.weight", "backbone.blocks.0.norm1.bias", "backbone.blocks.0.attn.qkv.bias",
    "backbone.blocks.0.attn.proj.bias", "backbone.blocks.0.norm2.weight", "backbone.blocks.0.norm2.bias",
    "backbone.blocks.0.mlp.fc1.bias", "backbone.blocks.0.mlp.fc2.bias", "backbone.norm.weight", "backbone.norm.bias",
    "head.net.0.bias", "head.net.1.weight", "head.net.1.bias", "head.net.3.bias", "head.net.4.weight",
    "head.net.4.bias", "head.net.6.bias",
    "decoder.mlp.0.bias", "decoder.mlp.2.bias", "decoder.mlp.4.bias", "decoder.to_pixels.bias"}


def test_pretraining_weight_decay_on_weight_matrices_only():
    """train.AdamW decays the student's weight matrices (linear and conv) and nothing else: no biases,
    norm weights (layer and batch norm), CLS token or position embedding; its params are the student's
    (decayed first), never the teacher's. A step with zero gradients changes exactly the decayed ones,
    by the factor 1 - lr wd, and the state dict's groups say so."""
    model = sit.SiT(sit.Config(**TINY))
    opt = train.AdamW(model, torch.zeros(3, 5), torch.device("cpu"))
    names = {id(p): n for n, p in model.student.named_parameters()}
    assert {names[id(p)] for p in opt.decay} == STUDENT_DECAY
    assert [names[id(p)] for p in opt.params[:len(opt.decay)]] == [names[id(p)] for p in opt.decay]
    assert {names[id(p)] for p in opt.params[len(opt.decay):]} == STUDENT_NO_DECAY
    assert len(opt.params) == len(STUDENT_DECAY) + len(STUDENT_NO_DECAY) == len(list(model.student.parameters()))
    assert not {id(p) for p in model.teacher.parameters()} & {id(p) for p in opt.params}
    before = {n: p.clone() for n, p in model.student.named_parameters()}
    train.adamw_(opt, [torch.zeros_like(p) for p in opt.params], torch.tensor(0.1), torch.tensor(0.5),
                 torch.tensor(True))
    for n, p in model.student.named_parameters():
        expected = before[n] * 0.95 if n in STUDENT_DECAY else before[n]
        assert torch.allclose(p, expected, rtol=1e-6, atol=0), n
    opt.schedule = torch.tensor([[1e-3, 2e-3], [0.04, 0.06], [0.996, 1.0]])
    groups = opt.state_dict()["param_groups"]
    assert [g["weight_decay"] for g in groups] == [pytest.approx(0.04), 0.0]
    assert [len(g["params"]) for g in groups] == [12, 24]


FINETUNE_GROUPS = {  # name: (weight decay, lr scale) for weight decay 0.05, layer decay 0.5, 2 blocks
    "backbone.cls_token": (0.0, 0.125), "backbone.pos_embed": (0.0, 0.125),
    "backbone.patch_embed.proj.weight": (0.05, 0.125), "backbone.patch_embed.proj.bias": (0.0, 0.125),
    "backbone.blocks.0.norm1.weight": (0.0, 0.25), "backbone.blocks.0.norm1.bias": (0.0, 0.25),
    "backbone.blocks.0.attn.qkv.weight": (0.05, 0.25), "backbone.blocks.0.attn.qkv.bias": (0.0, 0.25),
    "backbone.blocks.0.attn.proj.weight": (0.05, 0.25), "backbone.blocks.0.attn.proj.bias": (0.0, 0.25),
    "backbone.blocks.0.norm2.weight": (0.0, 0.25), "backbone.blocks.0.norm2.bias": (0.0, 0.25),
    "backbone.blocks.0.mlp.fc1.weight": (0.05, 0.25), "backbone.blocks.0.mlp.fc1.bias": (0.0, 0.25),
    "backbone.blocks.0.mlp.fc2.weight": (0.05, 0.25), "backbone.blocks.0.mlp.fc2.bias": (0.0, 0.25),
    "backbone.blocks.1.norm1.weight": (0.0, 0.5), "backbone.blocks.1.norm1.bias": (0.0, 0.5),
    "backbone.blocks.1.attn.qkv.weight": (0.05, 0.5), "backbone.blocks.1.attn.qkv.bias": (0.0, 0.5),
    "backbone.blocks.1.attn.proj.weight": (0.05, 0.5), "backbone.blocks.1.attn.proj.bias": (0.0, 0.5),
    "backbone.blocks.1.norm2.weight": (0.0, 0.5), "backbone.blocks.1.norm2.bias": (0.0, 0.5),
    "backbone.blocks.1.mlp.fc1.weight": (0.05, 0.5), "backbone.blocks.1.mlp.fc1.bias": (0.0, 0.5),
    "backbone.blocks.1.mlp.fc2.weight": (0.05, 0.5), "backbone.blocks.1.mlp.fc2.bias": (0.0, 0.5),
    "backbone.norm.weight": (0.0, 1.0), "backbone.norm.bias": (0.0, 1.0),
    "head.weight": (0.05, 1.0), "head.bias": (0.0, 1.0)}


def test_finetuning_weight_decay_and_layer_decay_per_parameter():
    """eval.param_groups: weight decay on weight matrices only (not biases, norm weights, CLS token,
    position embedding); lr scale decay^(L + 1 - layer) with patch embedding, CLS and positions layer 0,
    block i layer i + 1, final norm and head layer L + 1; every parameter in one group; set_lr gives each
    group lr x its scale."""
    model = ev.Classifier(sit.ViT(16, 4, 3, 32, 2, 2), 10)
    groups = ev.param_groups(model, 0.05, 0.5)
    got = {}
    for g in groups:
        for p in g["params"]:
            assert id(p) not in got
            got[id(p)] = (g["weight_decay"], g["lr_scale"])
    named = dict(model.named_parameters())
    assert {n: got[id(p)] for n, p in named.items()} == FINETUNE_GROUPS
    assert len(got) == len(named) == len(FINETUNE_GROUPS)
    opt = torch.optim.AdamW(groups, lr=0.0)
    ev.set_lr(opt, 2e-3)
    lr_of = {id(p): g["lr"] for g in opt.param_groups for p in g["params"]}
    assert {n: lr_of[id(p)] for n, p in named.items()} == {n: 2e-3 * s for n, (_, s) in FINETUNE_GROUPS.items()}
    ev.set_lr(opt, 1e-3)                                                  # each step sets it afresh
    assert lr_of != {id(p): g["lr"] for g in opt.param_groups for p in g["params"]}
    assert {g["lr"] for g in opt.param_groups} == {1e-3 * 0.125, 1e-3 * 0.25, 1e-3 * 0.5, 1e-3}


# ------------------------------------------------------------------------------------------------
# 2. A skipped step changes nothing: student, teacher (which differs from the student), AdamW's state
# ------------------------------------------------------------------------------------------------

def snapshot(model, opt):
    params = {k: v.clone() for k, v in model.named_parameters()}
    teacher = {k: v.clone() for k, v in model.teacher.named_parameters()}
    return params, teacher, [m.clone() for m in opt.exp_avg], [v.clone() for v in opt.exp_avg_sq], int(opt.t)


def trained_step_with_distinct_teacher():
    """A tiny step after one real update (moments non-zero), its teacher moved away from the student."""
    images = data.synthetic(train=True, n=32).images
    step, model, opt = tiny_step()
    step(images[:16])
    opt.read()
    g = torch.Generator().manual_seed(3)
    with torch.no_grad():
        for p in model.teacher.parameters():
            p.add_(0.05 * torch.randn(p.shape, generator=g))
    student = dict(model.student.named_parameters())
    for name, p in model.teacher.named_parameters():
        assert not torch.equal(p, student[name]), name
    return step, model, opt, images


@pytest.mark.parametrize("how", ["gradient", "lr", "wd"])
def test_a_skipped_step_changes_nothing_with_a_teacher_unlike_the_student(how):
    """A step whose gradient, lr or weight decay is not finite changes neither the student nor the
    teacher (which differs from the student, so an EMA that copied the student would show), nor AdamW's
    exp_avg, exp_avg_sq or update count t; the schedule's step moves on; the skip is counted and its
    losses are not added."""
    step, model, opt, images = trained_step_with_distinct_teacher()
    params, teacher, m, v, t = snapshot(model, opt)
    assert t == 1 and int(opt.step) == 1 and any(x.abs().sum() > 0 for x in m + v)
    hook = None
    if how == "gradient":
        hook = model.student.backbone.pos_embed.register_hook(lambda g: torch.full_like(g, float("inf")))
    else:
        opt.schedule[0 if how == "lr" else 1, 1] = float("inf")
    step(images[16:])
    if hook:
        hook.remove()
    (loss, recons, contr), skipped, bad = opt.read()
    assert (skipped, bad) == (1, 0) and (loss, recons, contr) == (0.0, 0.0, 0.0)
    assert int(opt.t) == 1 and int(opt.step) == 2
    for k, p in model.named_parameters():
        assert torch.equal(p, params[k]), k
    for k, p in model.teacher.named_parameters():
        assert torch.equal(p, teacher[k]), k
    assert all(torch.equal(a, b) for a, b in zip(opt.exp_avg, m))
    assert all(torch.equal(a, b) for a, b in zip(opt.exp_avg_sq, v))


def test_a_non_finite_loss_is_skipped_and_counted_as_bad():
    """A loss that is not finite (a NaN in the student's decoder: NaN gradients too) skips the step as
    above and is counted apart, so that the loop stops at its next log step: read() gives (0, 0, 0),
    1 skipped, 1 bad."""
    step, model, opt, images = trained_step_with_distinct_teacher()
    with torch.no_grad():
        model.student.decoder.mlp[0].bias[0] = float("nan")
    params, teacher, m, v, t = snapshot(model, opt)
    step(images[16:])
    assert opt.read() == ([0.0, 0.0, 0.0], 1, 1)
    assert int(opt.t) == 1
    for k, p in model.teacher.named_parameters():
        assert torch.equal(p, teacher[k]), k
    for k, p in model.named_parameters():
        assert torch.allclose(p, params[k], rtol=0, atol=0, equal_nan=True), k


def test_a_step_moves_the_teacher_by_its_momentum_and_reports_its_losses():
    """A good step: the teacher becomes m teacher + (1 - m) student (the updated student, m the
    schedule's column at the step, here 0.5), AdamW counts t = 2, and read() gives the step's own
    losses, L_total = 5 L_recons + L_contr, as the model computes them from the same random numbers."""
    step, model, opt, images = trained_step_with_distinct_teacher()
    opt.schedule[2, 1] = 0.5
    _, teacher, _, _, _ = snapshot(model, opt)
    reference = sit.SiT(model.cfg)
    reference.load_state_dict(model.state_dict())
    step(images[16:])
    student = dict(model.student.named_parameters())
    for k, p in model.teacher.named_parameters():
        assert torch.allclose(p, 0.5 * teacher[k] + 0.5 * student[k], atol=1e-6), k
        assert not torch.equal(p, teacher[k]), k
    assert int(opt.t) == 2 and int(opt.step) == 2
    with rng.source(step.u.clone()):                                    # the step's numbers, replayed
        clean = data.two_views(images[16:], 16, *data.stats("synthetic"), 0.2)
        out = reference(clean, *reference.corrupt(clean))
    (loss, recons, contr), skipped, bad = opt.read()
    assert (skipped, bad) == (0, 0)
    assert loss == pytest.approx(out["loss"].item(), rel=1e-5)
    assert recons == pytest.approx(out["loss_recons"].item(), rel=1e-5)
    assert contr == pytest.approx(out["loss_contr"].item(), rel=1e-5)
    assert loss == pytest.approx(5 * recons + contr, rel=1e-5)


@pytest.mark.parametrize("clip_mode", ["global", "per-tensor"])
def test_two_steps_are_the_plain_torch_steps(clip_mode):
    """Two train_steps (crop_min 0.5, clipping at 0.5, schedule columns (lr, wd, m) = (1e-3, 0.05, 0.9), then
    (5e-4, 0.1, 0.8)) make the student and teacher that plain PyTorch makes from the same views, corruption and
    drop-path draws: autograd, torch.nn.utils.clip_grad_norm_ (over all gradients, or per tensor), torch.optim.
    AdamW (betas 0.9, 0.999, eps 1e-8; weight decay on the weight matrices only), then teacher <- m teacher +
    (1 - m) student; read() gives both steps' losses summed."""
    import copy
    images = data.synthetic(train=True, n=32).images
    step, model, opt = tiny_step(crop_min=0.5, clip_grad=0.5, clip_mode=clip_mode)
    opt.schedule[:, :2] = torch.tensor([[1e-3, 5e-4], [0.05, 0.1], [0.9, 0.8]])
    ref = copy.deepcopy(model)
    named = dict(ref.student.named_parameters())
    decay = [p for n, p in named.items() if n in {"backbone.patch_embed.proj.weight"} or (
        n.endswith("weight") and p.ndim == 2)]
    assert len(decay) == 16                                             # 4 per block, 3 head, 4 decoder, patches 1
    rest = [p for p in named.values() if all(p is not q for q in decay)]
    ref_opt = torch.optim.AdamW([dict(params=decay), dict(params=rest, weight_decay=0.0)], lr=0.0, betas=(0.9, 0.999),
                                eps=1e-8)
    losses = []
    for i, (lr, wd, m) in enumerate([(1e-3, 0.05, 0.9), (5e-4, 0.1, 0.8)]):
        x = images[16 * i:16 * (i + 1)]
        step(x)
        with rng.source(step.u.clone()):
            clean = data.two_views(x, 16, *data.stats("synthetic"), 0.5)
            out = ref(clean, *ref.corrupt(clean))
        losses.append([out[k].item() for k in ("loss", "loss_recons", "loss_contr")])
        ref_opt.zero_grad()
        out["loss"].backward()
        params = list(ref.student.parameters())
        for group in ([params] if clip_mode == "global" else [[p] for p in params]):
            torch.nn.utils.clip_grad_norm_(group, 0.5)
        for group in ref_opt.param_groups:
            group["lr"] = lr
        ref_opt.param_groups[0]["weight_decay"] = wd
        ref_opt.step()
        ref.update_teacher(m)
    # Gradients 0 but for rounding, which Adam scales up to +-lr: biases before batch norm (a shift it takes out,
    # and the final norm's, which reaches the loss through them and the decoder) and the keys' bias (a shift of
    # every logit of a softmax row); those are compared to within the 2 steps' lrs.
    noise = ("backbone.norm.bias", "head.net.0.bias", "head.net.3.bias", "head.net.6.bias")
    for (name, p), q in zip(model.named_parameters(), ref.parameters()):
        exact = torch.ones_like(p, dtype=torch.bool)
        if name.endswith(noise):
            exact[:] = False
        elif name.endswith("attn.qkv.bias"):
            exact[32:64] = False                                        # (q, k, v) x 32: the keys'
        assert torch.allclose(p[exact], q[exact], rtol=1e-4, atol=5e-6), name   # lr: 1e-3, 5e-4
        assert (p - q).abs().max() <= 3e-3, name
    (loss, recons, contr), skipped, bad = opt.read()
    assert (skipped, bad) == (0, 0) and int(opt.t) == int(opt.step) == 2
    assert [loss, recons, contr] == pytest.approx([a + b for a, b in zip(*losses)], rel=1e-5)


def test_a_step_averages_gradients_over_processes_only_when_there_are_several(monkeypatch):
    """One process: all_reduce_mean_ is not called. Two: it is called once a step, on the list of gradients
    (opt.params' order and shapes), before clipping and AdamW, which use what it leaves (zeros here: the
    moments stay 0)."""
    calls = []

    def fake(grads):
        calls.append([tuple(g.shape) for g in grads])
        for g in grads:
            g.zero_()
    monkeypatch.setattr(train, "all_reduce_mean_", fake)
    images = data.synthetic(train=True, n=16).images
    step, model, opt = tiny_step()
    step(images)
    assert calls == [] and any(m.abs().sum() > 0 for m in opt.exp_avg)
    step, model, opt = tiny_step()
    opt.world = 2
    step(images)
    assert calls == [[tuple(p.shape) for p in opt.params]]
    assert all(not m.any() for m in opt.exp_avg + opt.exp_avg_sq) and opt.read()[1] == 0


def test_all_reduce_mean_averages_each_tensor_in_place(monkeypatch):
    """all_reduce_mean_ sums one flat copy of all the tensors over the processes (one all_reduce of 7 numbers),
    divides by the world size and writes each tensor's part back in place: with 4 processes, one holding a
    and three b, each tensor becomes (a + 3 b) / 4."""
    b = [torch.tensor([[1.0, 2.0], [3.0, 4.0]]), torch.tensor([10.0, 20.0, 30.0])]
    a = [torch.tensor([[5.0, 2.0], [-3.0, 0.0]]), torch.tensor([2.0, 0.0, 6.0])]
    reduced = []

    class FakeDist:
        @staticmethod
        def all_reduce(t):
            reduced.append(t.numel())
            t += 3 * torch.cat([x.reshape(-1) for x in b])

        @staticmethod
        def get_world_size():
            return 4
    monkeypatch.setattr(train, "dist", FakeDist)
    storage = [t.data_ptr() for t in a]
    train.all_reduce_mean_(a)
    assert reduced == [7] and [t.data_ptr() for t in a] == storage
    assert torch.equal(a[0], torch.tensor([[2.0, 2.0], [1.5, 3.0]]))
    assert torch.equal(a[1], torch.tensor([8.0, 15.0, 24.0]))


def test_adamw_state_read_state_dict_and_load_written_out():
    """train.AdamW starts with t = step = 0 and zero sums (5: loss, recons, contr, skipped, bad); read() gives
    them and resets them (read(reset=False) keeps them); state_dict() is torch.optim.AdamW's: per parameter
    its update count (float) and moments, two groups (the 12 decayed first) with the schedule's lr and weight
    decay at the current step (the last column past the end), betas (0.9, 0.999), eps 1e-8, no amsgrad;
    load_state_dict restores the moments and t, takes the loop's step, and refuses a state of another size."""
    model = sit.SiT(sit.Config(**TINY))
    schedule = torch.tensor([[1e-3, 2e-3, 3e-3], [0.04, 0.05, 0.06], [0.99, 0.995, 1.0]])
    opt = train.AdamW(model, schedule, torch.device("cpu"), world=2, bf16=True)
    assert (opt.world, opt.bf16, int(opt.t), int(opt.step)) == (2, True, 0, 0) and opt.sums.tolist() == [0.0] * 5
    assert torch.equal(opt.schedule, schedule) and len(opt.exp_avg) == len(opt.exp_avg_sq) == 36
    assert all(not m.any() and m.shape == p.shape for m, p in zip(opt.exp_avg + opt.exp_avg_sq, opt.params * 2))
    opt.sums += torch.tensor([1.0, 2.0, 3.0, 4.0, 5.0])
    assert opt.read(reset=False) == ([1.0, 2.0, 3.0], 4, 5)
    assert opt.read() == ([1.0, 2.0, 3.0], 4, 5)
    assert opt.read() == ([0.0, 0.0, 0.0], 0, 0)
    opt.t.fill_(3)
    opt.step.fill_(1)
    for i, (m, v) in enumerate(zip(opt.exp_avg, opt.exp_avg_sq)):
        m.fill_(i)
        v.fill_(100 + i)
    sd = opt.state_dict()
    rest = dict(betas=(0.9, 0.999), eps=1e-8, amsgrad=False)
    assert sd["param_groups"] == [
        dict(params=list(range(12)), weight_decay=pytest.approx(0.05), lr=pytest.approx(2e-3), **rest),
        dict(params=list(range(12, 36)), weight_decay=0.0, lr=pytest.approx(2e-3), **rest)]
    assert sorted(sd["state"]) == list(range(36))
    for i, s in sd["state"].items():
        assert s["step"].dtype == torch.float32 and float(s["step"]) == 3.0
        assert torch.equal(s["exp_avg"], opt.exp_avg[i]) and torch.equal(s["exp_avg_sq"], opt.exp_avg_sq[i])
    opt.step.fill_(9)
    assert [g["lr"] for g in opt.state_dict()["param_groups"]] == [pytest.approx(3e-3)] * 2
    fresh = train.AdamW(model, schedule, torch.device("cpu"))
    fresh.load_state_dict(sd, 7)
    assert (int(fresh.t), int(fresh.step)) == (3, 7)
    assert all(torch.equal(a, b) for a, b in zip(fresh.exp_avg + fresh.exp_avg_sq, opt.exp_avg + opt.exp_avg_sq))
    short = dict(sd, state={i: s for i, s in sd["state"].items() if i < 35})
    with pytest.raises(runtime.CheckpointError, match=r"^the checkpoint's optimizer state does not match the model$"):
        fresh.load_state_dict(short, 7)


def test_clipping_keeps_small_gradients_turns_off_at_0_and_zeroes_a_skipped_step():
    """clip_grad_norm_ scales by max_norm / (norm + 1e-6) only where that is below 1 (gradients within the
    bound are left exactly as they are); max_norm 0 is no clipping; given norms are used as they are; ok
    False (a step to skip) sets every gradient to 0, NaN and inf included."""
    g = [torch.tensor([3.0, 4.0], dtype=torch.float64), torch.tensor([[0.0]], dtype=torch.float64)]
    train.clip_grad_norm_(g, 1.0)
    assert torch.allclose(g[0], torch.tensor([3.0, 4.0], dtype=torch.float64) / (5 + 1e-6), rtol=1e-12, atol=0)
    g = [torch.tensor([0.3, 0.4]), torch.tensor([[1.2]])]                # norm 1.3
    train.clip_grad_norm_(g, 2.0)
    assert torch.equal(g[0], torch.tensor([0.3, 0.4])) and torch.equal(g[1], torch.tensor([[1.2]]))
    g = [torch.tensor([30.0, 40.0])]
    train.clip_grad_norm_(g, 0.0)
    assert torch.equal(g[0], torch.tensor([30.0, 40.0]))
    g = [torch.tensor([3.0, 4.0]), torch.tensor([1.0])]
    train.clip_grad_norm_(g, 1.0, norms=torch.tensor([10.0, 0.0]))        # as if the norm were 10
    assert torch.allclose(g[0], torch.tensor([0.3, 0.4]), rtol=1e-5) and torch.allclose(g[1], torch.tensor([0.1]))
    g = [torch.tensor([float("nan"), float("inf")]), torch.tensor([1.0, -2.0])]
    train.clip_grad_norm_(g, 1.0, ok=torch.tensor(False))
    assert torch.equal(g[0], torch.zeros(2)) and torch.equal(g[1], torch.zeros(2))
    g = [torch.tensor([float("nan"), 1.0]), torch.tensor([1.0, -2.0])]
    train.clip_grad_norm_(g, 1.0, per_tensor=True, ok=torch.tensor(False))
    assert torch.equal(g[0], torch.zeros(2)) and torch.equal(g[1], torch.zeros(2))


def test_schedule_resized_keeps_the_past_and_goes_on_by_a_half_cosine():
    """schedule_for(cfg, spe, total, current, step): without a table in use, or at step 0, sit.schedules for
    `total`; else every row keeps the table's columns before its start (step; for the lr the end of the
    warm-up if later) and goes from the table's value there by a half cosine to its end value at `total`
    (lr 1e-5, weight decay 0.1, momentum 1). Written out for 10 epochs of 1 step (warm-up 2) cut to 6 at
    step 4 and at step 1."""
    cfg = sit.Config(epochs=10, warmup_epochs=2, lr=1e-3, min_lr=1e-5, batch_size=256, weight_decay=0.04,
                     weight_decay_end=0.1, momentum_teacher=0.99)
    current = sit.schedules(cfg, 1)
    assert train.schedule_for(cfg, 1, 6).tolist() == sit.schedules(cfg, 1, 6).tolist()
    assert train.schedule_for(cfg, 1, 6, current, 0).tolist() == sit.schedules(cfg, 1, 6).tolist()
    at4 = train.schedule_for(cfg, 1, 6, current, 4)
    assert at4.shape == (3, 7)
    assert at4.tolist() == [
        pytest.approx([0.0, 0.0005, 0.001, 0.00096232, 0.000855018, 0.000432509, 1e-05], rel=1e-5),
        pytest.approx([0.04, 0.0414683, 0.0457295, 0.0523664, 0.0607295, 0.0803647, 0.1], rel=1e-5),
        pytest.approx([0.99, 0.990245, 0.990955, 0.992061, 0.993455, 0.996727, 1.0], rel=1e-6)]
    at1 = train.schedule_for(cfg, 1, 6, current, 1)
    assert at1.tolist() == [
        pytest.approx([0.0, 0.0005, 0.001, 0.000855018, 0.000505, 0.000154982, 1e-05], rel=1e-5),
        pytest.approx([0.04, 0.0414683, 0.0470576, 0.0616905, 0.0797778, 0.0944107, 0.1], rel=1e-5),
        pytest.approx([0.99, 0.990245, 0.991176, 0.993615, 0.99663, 0.999068, 1.0], rel=1e-6)]
    assert train.schedule_for(cfg, 1, 6, current).tolist() == sit.schedules(cfg, 1, 6).tolist()   # step 0
    ends_at_warmup = train.schedule_for(cfg, 1, 2, current, 1)          # the lr's warm-up ends at the new end
    assert ends_at_warmup.tolist() == [pytest.approx([0.0, 0.0005, 0.001], rel=1e-6),
                                       pytest.approx([0.04, 0.0414683, 0.1], rel=1e-5),
                                       pytest.approx([0.99, 0.990245, 1.0], rel=1e-6)]
    longer = train.schedule_for(cfg, 1, 14, current, 4)
    assert longer[:, :5].tolist() == current[:, :5].tolist() and longer[:, -1].tolist() == pytest.approx(
        [1e-5, 0.1, 1.0])
    assert longer[0, 9].item() == pytest.approx(0.000432509, rel=1e-5)   # half way from 8.55e-4 to 1e-5


def test_schedule_resized_with_two_steps_an_epoch_and_from_a_table_shorter_than_the_warm_up():
    """The lr row's start is the end of the warm-up in steps (warmup epochs x steps per epoch: 1 x 2 here);
    a table in use that ends before the warm-up does (2 steps of a 4-step warm-up) is extended without
    error: its past kept, finite, ending at min_lr."""
    cfg = sit.Config(epochs=5, warmup_epochs=1, lr=1e-3, min_lr=1e-5, batch_size=256, weight_decay=0.04,
                     weight_decay_end=0.1, momentum_teacher=0.99)
    at1 = train.schedule_for(cfg, 2, 6, sit.schedules(cfg, 2), 1)
    assert at1[0].tolist() == pytest.approx([0.0, 0.0005, 0.001, 0.000855018, 0.000505, 0.000154982, 1e-05], rel=1e-5)
    cfg = sit.Config(epochs=10, warmup_epochs=4, lr=1e-3, min_lr=1e-5, batch_size=256)
    short = sit.schedules(cfg, 1, 2)                                    # lr 0, 2.5e-4, 5e-4: inside the warm-up
    longer = train.schedule_for(cfg, 1, 10, short, 2)
    assert longer.shape == (3, 11) and longer.isfinite().all()
    assert torch.equal(longer[:, :3], short) and longer[:, -1].tolist() == pytest.approx([1e-5, 0.1, 1.0])


# ------------------------------------------------------------------------------------------------
# 3. k-NN: k = 20, T = 0.07, exp(cos / T) summed per class over the k nearest, L2-normalised features
# ------------------------------------------------------------------------------------------------

def knn_problem():
    """Three queries, each alone in its own direction (its neighbours at cosines written below, every
    other training point at cosine 0), and the training features at various norms:
    query 0 (label 1): 8 of class 1 ranked first, 9 of class 0, 2 of class 2, then 1, 0, 2: the 20th
      neighbour (class 1) tips the vote to 1, the 21st (class 0) back to 0; class 0's points twice as long;
    query 1 (label 1): one class-0 point at 0.95, three of class 1 at ~0.878, 16 of class 2 at ~0.755:
      class 1 wins for T in about (0.066, 0.073) only; class 0 below, class 2 above (and by count);
    query 2 (label 3, which no training point has): always wrong."""
    blocks = [([1] * 8 + [0] * 9 + [2] * 2 + [1, 0, 2], [0.5 - 0.0001 * i for i in range(22)]),
              ([0] + [1] * 3 + [2] * 16, [0.95, 0.878, 0.8779, 0.8778] + [0.756 - 0.0001 * i for i in range(16)]),
              ([0] * 5, [0.9, 0.8, 0.7, 0.6, 0.5])]
    n = sum(len(c) for c, _ in blocks)
    feats, labels, i = torch.zeros(n, 3 + n, dtype=torch.float64), [], 0
    for b, (classes, cosines) in enumerate(blocks):
        for c, s in zip(classes, cosines):
            feats[i, b], feats[i, 3 + i] = s, math.sqrt(1 - s * s)           # cosine s with query b
            feats[i] *= 2.0 if (b == 0 and c == 0) else 0.7 + 0.1 * (i % 5)
            labels.append(c)
            i += 1
    queries = torch.zeros(3, 3 + n, dtype=torch.float64)
    queries[0, 0], queries[1, 1], queries[2, 2] = 2.5, 0.3, 1.7
    return feats.float(), torch.tensor(labels), queries.float(), torch.tensor([1, 1, 3])


def plain_knn(train_x, train_y, test_x, test_y, k=20, T=0.07, weighted=True, norm_train=True, norm_test=True,
              summed=True):
    """The k-NN vote in a few plain lines, with switches for the choices a bug could change."""
    a = F.normalize(train_x, dim=1) if norm_train else train_x
    b = F.normalize(test_x, dim=1) if norm_test else test_x
    top, idx = (b @ a.t()).topk(k, dim=1)
    w = (top / T).exp() if weighted else torch.ones_like(top)
    votes = torch.zeros(len(b), 4)
    if summed:
        votes.scatter_add_(1, train_y[idx], w)
    else:
        votes.scatter_reduce_(1, train_y[idx], w, reduce="amax")
    return 100.0 * (votes.argmax(1) == test_y).float().mean().item()


def test_knn_k_temperature_and_weighting():
    """knn_accuracy's defaults are k = 20, T = 0.07 with weights exp(cos / T) summed per class on
    L2-normalised features: on knn_problem, 2 of 3 right (66.67%). The problem is built so that each other
    choice gives 33.33% or less: k 19 or 21, T 0.05, 0.065, 0.075, 0.1 or 1.07, a plain majority vote,
    features not normalised (either side), the largest weight per class instead of the sum."""
    problem = knn_problem()
    assert ev.knn_accuracy(*problem, 4) == pytest.approx(200 / 3)
    assert plain_knn(*problem) == pytest.approx(200 / 3)
    for change in (dict(k=19), dict(k=21), dict(T=0.05), dict(T=0.065), dict(T=0.075), dict(T=0.1), dict(T=1.07),
                   dict(weighted=False), dict(norm_train=False), dict(norm_test=False), dict(summed=False)):
        assert plain_knn(*problem, **change) <= 100 / 3 + 1e-4, change
    assert ev.knn_accuracy(*problem, 4, k=19) == pytest.approx(100 / 3)
    assert ev.knn_accuracy(*problem, 4, T=0.1) == pytest.approx(100 / 3)


def test_knn_in_chunks_and_with_fewer_training_points_than_k():
    """Queries in chunks give what one chunk does; with fewer than k training points all of them vote."""
    problem = knn_problem()
    order = torch.tensor([2, 0, 1, 1, 2, 0, 0])                         # 5 of 7 right
    assert ev.knn_accuracy(problem[0], problem[1], problem[2][order], problem[3][order], 4, chunk=2) == \
        pytest.approx(500 / 7)
    x = torch.tensor([[1.0, 0.0], [0.9, 0.1], [0.0, 1.0]])
    y = torch.tensor([0, 0, 1])
    assert ev.knn_accuracy(x, y, torch.tensor([[1.0, 0.2], [0.1, 1.0]]), torch.tensor([0, 1]), 2) == 100.0
    assert ev.knn_accuracy(x, y, torch.tensor([[0.1, 1.0]]), torch.tensor([1]), 2) == 100.0   # 2 x 0 vs 1 x 1


def frozen_task(n_train=40, n_test=10):
    train_set = data.synthetic(train=True, n=n_train, size=16)
    test_set = data.synthetic(train=False, n=n_test, size=16)
    return sit.ViT(16, 4, 3, 32, 1, 2), train_set, test_set


def test_knn_mode_default_k_20_and_its_record(monkeypatch):
    """eval.py --mode knn: --k defaults to 20, knn_accuracy is called with k 20 and T 0.07, and the
    results record says k 20, T 0.07; --k 7 reaches knn_accuracy and the record."""
    args = ev.parse_args(["x.pt", "--mode", "knn"])
    assert args.k == 20
    args.img_size = 16
    calls = []
    spy(monkeypatch, ev, "knn_accuracy", calls)
    record = ev.run_frozen(args, *frozen_task())
    assert len(calls) == 1 and (calls[0][1]["k"], calls[0][1]["T"]) == (20, 0.07)
    assert (record["k"], record["T"]) == (20, 0.07) and 0 <= record["accuracy"] <= 100
    args = ev.parse_args(["x.pt", "--mode", "knn", "--k", "7"])
    args.img_size = 16
    record = ev.run_frozen(args, *frozen_task())
    assert calls[1][1]["k"] == 7 and record["k"] == 7


# ------------------------------------------------------------------------------------------------
# 4. Linear probe: the weight-decay grid, 10% of train held out to choose, the final fit on all of train
# ------------------------------------------------------------------------------------------------

def probe_with_scripted_accuracies(monkeypatch, val_accs, n=57, **kw):
    """linear_probe(**kw) on n training rows (column 0: the row's index) with fit_linear and top1 replaced:
    fit_linear records (rows, weight decay, steps, x), top1 records its rows and gives val_accs in turn,
    then 42.0 for the test."""
    fits, tops, accs = [], [], iter(list(val_accs) + [42.0])

    def fake_fit(x, y, num_classes, weight_decay, steps):
        fits.append((len(x), weight_decay, steps, x.clone()))
        return len(fits)

    def fake_top1(head, x, y):
        tops.append((head, len(x), x.clone()))
        return next(accs)

    monkeypatch.setattr(ev, "fit_linear", fake_fit)
    monkeypatch.setattr(ev, "top1", fake_top1)
    g = torch.Generator().manual_seed(0)
    x = torch.cat([torch.arange(n, dtype=torch.float32)[:, None], torch.randn(n, 3, generator=g)], 1)
    test_x = torch.randn(8, 4, generator=g)
    acc, details = ev.linear_probe(x, torch.arange(n) % 3, test_x, torch.arange(8) % 3, 3, **kw)
    return acc, details, fits, tops, x, test_x


def test_linear_probe_grid_held_out_share_and_final_fit(monkeypatch):
    """The grid is 1e-6, 1e-5, 1e-4, 1e-3, 1e-2, 1e-1, each fitted (500 L-BFGS steps unless told) on the 52
    rows of 57 not held out (int(0.1 x 57) = 5 held out, drawn by the seed, 0 unless told), scored on those
    5; the best by held-out top-1 is refitted on all 57 rows and scored on the test set; details name it and
    every held-out score (to 2 decimals)."""
    acc, details, fits, tops, x, test_x = probe_with_scripted_accuracies(
        monkeypatch, [10.004, 20.0, 30.0, 80.126, 50.0, 40.0])
    assert [(n, wd, steps) for n, wd, steps, _ in fits] == [
        (52, 1e-6, 500), (52, 1e-5, 500), (52, 1e-4, 500), (52, 1e-3, 500), (52, 1e-2, 500), (52, 1e-1, 500),
        (57, 1e-3, 500)]
    assert [(head, n) for head, n, _ in tops] == [(1, 5), (2, 5), (3, 5), (4, 5), (5, 5), (6, 5), (7, 8)]
    assert acc == 42.0
    assert details == dict(weight_decay=1e-3, val_accuracy={"1e-06": 10.0, "1e-05": 20.0, "0.0001": 30.0,
                                                            "0.001": 80.13, "0.01": 50.0, "0.1": 40.0})
    fit_rows, val_rows = fits[0][3][:, 0], tops[0][2][:, 0]            # standardised row indices
    assert all(torch.equal(f[3], fits[0][3]) for f in fits[:6])         # the same split for every lambda
    assert len(set(fit_rows.tolist()) | set(val_rows.tolist())) == 57    # disjoint, and all of train
    all_rows = fits[6][3]
    assert torch.allclose(all_rows.mean(0), torch.zeros(4), atol=1e-5)  # standardised on all of train
    assert torch.allclose(all_rows.std(0), torch.ones(4), atol=1e-5)
    assert torch.allclose(tops[6][2], (test_x - x.mean(0)) / x.std(0), atol=1e-5)   # the test, train's map
    rows = ((val_rows * x[:, 0].std() + x[:, 0].mean()).round().long().tolist())   # back to row indices
    assert rows == [53, 32, 25, 27, 49]                                 # seed 0's draw, pinned
    _, _, fits0, tops0, _, _ = probe_with_scripted_accuracies(monkeypatch, [10] * 6, seed=0, steps=7)
    assert torch.equal(tops0[0][2], tops[0][2]) and [f[2] for f in fits0] == [7] * 7   # seed 0 is the default
    _, _, fits2, tops2, _, _ = probe_with_scripted_accuracies(monkeypatch, [10] * 6, seed=1)
    rows = ((tops2[0][2][:, 0] * x[:, 0].std() + x[:, 0].mean()).round().long().tolist())
    assert rows == [7, 4, 51, 35, 10]                                   # another seed, another split


def test_linear_probe_ties_go_to_the_stronger_decay_and_a_tiny_train_set_holds_out_one(monkeypatch):
    """Equal held-out scores choose the larger weight decay; with 5 rows int(0.5) = 0 would hold out
    nothing, so one is held out (4 fitted)."""
    assert probe_with_scripted_accuracies(monkeypatch, [50] * 6)[1]["weight_decay"] == 1e-1
    assert probe_with_scripted_accuracies(monkeypatch, [90, 90, 10, 10, 10, 10])[1]["weight_decay"] == 1e-5
    _, _, fits, tops, _, _ = probe_with_scripted_accuracies(monkeypatch, [1] * 6, n=5)
    assert [f[0] for f in fits] == [4] * 6 + [5] and [t[1] for t in tops] == [1] * 6 + [8]


def test_fit_linear_minimises_cross_entropy_plus_half_lambda_w_squared():
    """fit_linear finds the minimum of CE(x W^T + b, y) + lambda/2 |W|^2 (the bias not penalised): its
    gradient there is ~0, while that of CE + lambda |W|^2 is not; from zero, so two fits are identical."""
    g = torch.Generator().manual_seed(0)
    x, y = torch.randn(40, 5, generator=g), torch.randint(0, 3, (40,), generator=g)
    head = ev.fit_linear(x, y, 3, 0.5)
    assert head.weight.shape == (3, 5) and not head.weight.requires_grad
    W, b = head.weight.clone().requires_grad_(), head.bias.clone().requires_grad_()
    for factor, small in ((0.25, True), (0.5, False)):
        loss = F.cross_entropy(x @ W.t() + b, y) + factor * W.square().sum()
        gw, gb = torch.autograd.grad(loss, (W, b))
        assert (gw.norm() < 1e-4) == small and gb.norm() < 1e-4
    again = ev.fit_linear(x, y, 3, 0.5)
    assert torch.equal(again.weight, head.weight) and torch.equal(again.bias, head.bias)
    few = ev.fit_linear(x, y, 3, 0.5, steps=1)                          # the steps bound the iterations
    assert not torch.allclose(few.weight, head.weight, atol=1e-3)


def test_fit_linear_is_full_batch_lbfgs_with_strong_wolfe_line_search(monkeypatch):
    """fit_linear's optimiser: torch's L-BFGS with the strong-Wolfe line search, at most `steps` iterations
    (500 unless told), a history of 20 and lr 1, one step over the whole batch."""
    made, steps_taken = [], []
    real = torch.optim.LBFGS

    class Spy(real):
        def __init__(self, params, **kw):
            made.append(kw)
            super().__init__(params, **kw)

        def step(self, closure):
            steps_taken.append(1)
            return super().step(closure)
    monkeypatch.setattr(torch.optim, "LBFGS", Spy)
    g = torch.Generator().manual_seed(0)
    x, y = torch.randn(20, 3, generator=g), torch.randint(0, 2, (20,), generator=g)
    ev.fit_linear(x, y, 2, 0.1)
    ev.fit_linear(x, y, 2, 0.1, steps=9)
    assert [(kw["line_search_fn"], kw["max_iter"], kw.get("history_size", 100), kw.get("lr", 1)) for kw in made] == [
        ("strong_wolfe", 500, 20, 1), ("strong_wolfe", 9, 20, 1)]                  # torch's defaults: 100 and 1
    assert steps_taken == [1, 1]


def test_top1_and_standardize_written_out():
    """top1: the share (%) of rows whose largest logit is the label; standardize: train's mean and std
    (at least 1e-6) map train and the others."""
    head = torch.nn.Linear(2, 2)
    with torch.no_grad():
        head.weight.copy_(torch.eye(2))
        head.bias.zero_()
    x = torch.tensor([[1.0, 0.0], [0.0, 1.0], [1.0, 0.0], [0.0, 2.0]])
    assert ev.top1(head, x, torch.tensor([0, 1, 1, 1])) == 75.0
    train_x = torch.tensor([[1.0, 5.0], [3.0, 5.0], [5.0, 5.0]])         # column 1 constant
    a, b = ev.standardize(train_x, torch.tensor([[7.0, 6.0]]))
    assert torch.allclose(a, torch.tensor([[-1.0, 0.0], [0.0, 0.0], [1.0, 0.0]]))
    assert torch.allclose(b, torch.tensor([[2.0, 1e6]]))


def test_fewshot_fits_k_per_class_on_features_standardised_over_all_of_train(monkeypatch):
    """fewshot: for each K and seed, a classifier fitted with the given weight decay and steps on exactly
    fewshot_indices(labels, C, K, seed) of the training features standardised with all training rows,
    scored on the test features standardised the same way; {K: [top-1 per seed]}."""
    g = torch.Generator().manual_seed(0)
    train_x, train_y = torch.randn(30, 4, generator=g) * 3 + 1, torch.arange(30) % 3
    test_x, test_y = torch.randn(9, 4, generator=g), torch.arange(9) % 3
    calls, tops = [], []
    spy(monkeypatch, ev, "fit_linear", calls)
    spy(monkeypatch, ev, "top1", tops)
    runs = ev.fewshot(train_x, train_y, test_x, test_y, 3, [1, 2], [3, 4], 0.02, steps=7)
    mean, std = train_x.mean(0), train_x.std(0)
    expected = [(K, s) for K in (1, 2) for s in (3, 4)]
    assert len(calls) == 4 and len(tops) == 4
    for (K, s), (_, a), (_, t) in zip(expected, calls, tops):
        idx = ev.fewshot_indices(train_y, 3, K, s)
        assert torch.allclose(a["x"], (train_x[idx] - mean) / std, atol=1e-5) and torch.equal(a["y"], train_y[idx])
        assert (a["num_classes"], a["weight_decay"], a["steps"]) == (3, 0.02, 7)
        assert torch.allclose(t["x"], (test_x - mean) / std, atol=1e-5) and torch.equal(t["y"], test_y)
    assert list(runs) == [1, 2] and all(len(r) == 2 for r in runs.values())
    assert runs[1][0] == ev.top1(ev.fit_linear(calls[0][1]["x"], train_y[ev.fewshot_indices(train_y, 3, 1, 3)], 3,
                                               0.02, 7), (test_x - mean) / std, test_y)
    ev.fewshot(train_x, train_y, test_x, test_y, 3, [1], [3], 0.02)
    assert calls[-1][1]["steps"] == 500                                 # unless told: 500 L-BFGS iterations


def test_fewshot_indices_take_exactly_k_of_each_class_and_say_which_class_is_short():
    """K images of each class, also when a class has exactly K; a class with fewer is refused, naming it."""
    labels = torch.tensor([0, 1, 2, 0, 1, 2, 0, 1, 1])                  # class 0: 3, 1: 4, 2: 2 images
    idx = ev.fewshot_indices(labels, 3, 2, seed=0)
    assert torch.equal(torch.bincount(labels[idx], minlength=3), torch.tensor([2, 2, 2]))
    assert len(ev.fewshot_indices(labels, 3, 2, seed=5)) == 6
    with pytest.raises(ev.EvalError, match=r"^class 2 has 2 training images, fewer than 3 shots$"):
        ev.fewshot_indices(labels, 3, 3, seed=0)


# ------------------------------------------------------------------------------------------------
# 5. Fine-tuning: the recipe's defaults, and that they reach what they configure
# ------------------------------------------------------------------------------------------------

FINETUNE_DEFAULTS = dict(layer_decay=0.75, drop_path=0.1, mixup=0.8, cutmix=1.0, mixup_prob=1.0, mixup_switch_prob=0.5,
                         smoothing=0.1, randaug_n=2, randaug_m=9.0, randaug_mstd=0.5, reprob=0.25, crop_min=0.08,
                         lr=5e-4, weight_decay=0.05, warmup_epochs=5.0, epochs=100, batch_size=256, min_lr=1e-6)


def test_finetune_defaults():
    """eval.py --mode finetune defaults to MAE's/DeiT's recipe: layer decay 0.75 (1.0 with --random-init),
    drop path 0.1, mixup 0.8, CutMix 1.0, mixing prob 1.0, switch prob 0.5, smoothing 0.1, RandAugment
    n 2 m 9 mstd 0.5, erasing 0.25, crop area from 0.08, lr 5e-4, weight decay 0.05, warm-up 5, 100 epochs,
    batch 256, min lr 1e-6."""
    args = ev.parse_args(["x.pt", "--mode", "finetune"])
    assert {k: getattr(args, k) for k in FINETUNE_DEFAULTS} == FINETUNE_DEFAULTS
    assert ev.parse_args(["x.pt", "--mode", "finetune", "--random-init"]).layer_decay == 1.0
    assert ev.parse_args(["x.pt", "--mode", "finetune", "--random-init", "--layer-decay", "0.6"]).layer_decay == 0.6


def test_finetune_step_passes_the_recipe_on(monkeypatch):
    """finetune_step with the default recipe: the lr it is given goes to set_lr; the images go through
    data.finetune_view at the encoder's size with the training statistics, crop 0.08, RandAugment 2 / 9 / 0.5
    and erasing 0.25; the targets through smooth_targets with 0.1 over the head's 10 classes, then mix with
    mixup 0.8, CutMix 1.0, prob 1.0, switch 0.5; the step trains the model. Other values of the flags go
    through alike."""
    args = ev.parse_args(["x.pt", "--mode", "finetune"])
    args.img_size = 16
    torch.manual_seed(0)
    model = ev.Classifier(sit.ViT(16, 4, 3, 32, 1, 2), 10)
    opt = torch.optim.AdamW(ev.param_groups(model, args.weight_decay, args.layer_decay), lr=0.0)
    images = data.synthetic(train=True, n=8, size=16)
    calls = []
    for module, name in ((data, "finetune_view"), (ev, "smooth_targets"), (ev, "mix"), (ev, "set_lr")):
        spy(monkeypatch, module, name, calls)
    stats = ((0.4, 0.5, 0.6), (0.2, 0.25, 0.3))
    before = model.head.weight.clone()
    loss = ev.finetune_step(model, opt, images.images, images.labels, stats, args, 3e-3,
                            torch.Generator().manual_seed(0), np.random.default_rng(0))
    assert loss.ndim == 0 and loss.isfinite() and not torch.equal(model.head.weight, before)
    assert [n for n, _ in calls] == ["set_lr", "finetune_view", "smooth_targets", "mix"]
    (_, lr), (_, view), (_, smooth), (_, mixed) = calls
    assert lr["lr"] == 3e-3 and {g["lr"] for g in opt.param_groups} == {3e-3, 3e-3 * 0.75, 3e-3 * 0.75 ** 2}
    assert len(view["x"]) == 8 and view["size"] == 16 and (view["mean"], view["std"]) == stats
    assert (view["crop_min"], view["randaug_n"], view["randaug_m"], view["randaug_mstd"], view["reprob"]) == (
        0.08, 2, 9, 0.5, 0.25)
    assert torch.equal(smooth["labels"], images.labels) and (smooth["num_classes"], smooth["smoothing"]) == (10, 0.1)
    assert (mixed["mixup"], mixed["cutmix"], mixed["prob"], mixed["switch_prob"]) == (0.8, 1.0, 1.0, 0.5)
    args = ev.parse_args(["x.pt", "--mode", "finetune", "--crop-min", "0.5", "--randaug-n", "1", "--randaug-m", "5",
                          "--randaug-mstd", "0.2", "--reprob", "0.4", "--smoothing", "0.2", "--mixup", "0.3",
                          "--cutmix", "0.6", "--mixup-prob", "0.7", "--mixup-switch-prob", "0.2"])
    args.img_size = 16
    calls.clear()
    ev.finetune_step(model, opt, images.images, images.labels, stats, args, 1e-3, torch.Generator().manual_seed(0),
                     np.random.default_rng(0))                          # other values than the defaults go too
    (_, lr), (_, view), (_, smooth), (_, mixed) = calls
    assert (view["crop_min"], view["randaug_n"], view["randaug_m"], view["randaug_mstd"], view["reprob"]) == (
        0.5, 1, 5, 0.2, 0.4)
    assert smooth["smoothing"] == 0.2
    assert (mixed["mixup"], mixed["cutmix"], mixed["prob"], mixed["switch_prob"]) == (0.3, 0.6, 0.7, 0.2)


def test_two_finetune_steps_are_the_plain_steps():
    """Two finetune_steps (lr 1e-3, then 5e-4) make the model plain PyTorch makes from the same draws:
    lr x each group's scale, data.finetune_view (torch generator), smoothed one-hot targets, mix (numpy
    generator), cross-entropy on the soft targets, gradients zeroed each step, AdamW; each returns its loss."""
    import copy
    args = ev.parse_args(["x.pt", "--mode", "finetune"])
    args.img_size = 16
    torch.manual_seed(0)
    model = ev.Classifier(sit.ViT(16, 4, 3, 32, 2, 2), 10)
    ref = copy.deepcopy(model)
    opt = torch.optim.AdamW(ev.param_groups(model, 0.05, 0.75), lr=0.0)
    ref_opt = torch.optim.AdamW(ev.param_groups(ref, 0.05, 0.75), lr=0.0)
    images = data.synthetic(train=True, n=8, size=16)
    stats = ((0.4, 0.5, 0.6), (0.2, 0.25, 0.3))
    gen, ref_gen = torch.Generator().manual_seed(0), torch.Generator().manual_seed(0)
    host, ref_host = np.random.default_rng(0), np.random.default_rng(0)
    for lr in (1e-3, 5e-4):
        loss = ev.finetune_step(model, opt, images.images, images.labels, stats, args, lr, gen, host)
        for g, scale in zip(ref_opt.param_groups, [g["lr_scale"] for g in ref_opt.param_groups]):
            g["lr"] = lr * scale
        with rng.source(ref_gen):
            x = data.finetune_view(images.images, 16, *stats, 0.08, 2, 9.0, 0.5, 0.25)
        t = F.one_hot(images.labels, 10).float() * 0.9 + 0.01
        x, t = ev.mix(x, t, 0.8, 1.0, ref_host, 1.0, 0.5)
        ref_loss = F.cross_entropy(ref(x), t)
        ref_opt.zero_grad()
        ref_loss.backward()
        ref_opt.step()
        assert loss.item() == pytest.approx(ref_loss.item(), rel=1e-5)
    for (name, p), q in zip(model.named_parameters(), ref.parameters()):
        assert torch.allclose(p, q, rtol=1e-4, atol=5e-6), name


def test_run_finetune_uses_the_schedule_weight_decay_layer_decay_epochs_and_batch(monkeypatch, tmp_path):
    """run_finetune with the defaults on 512 images: AdamW groups from param_groups(weight decay 0.05, layer
    decay 0.75); 100 epochs of 2 steps of 256 images; the lr warms up over 5 epochs to 5e-4 (batch 256)
    and falls by a cosine to 1e-6 at step 200: 0 and 5e-5 at the first two steps, 1.136e-6 and 1.034e-6
    at the last two; the record lists the recipe."""
    args = ev.parse_args([str(tmp_path / "x.pt"), "--mode", "finetune"])
    args.img_size, args.cfg, args.dataset = 16, sit.Config(**TINY), "synthetic"
    groups, steps = [], []
    spy(monkeypatch, ev, "param_groups", groups)
    monkeypatch.setattr(ev, "finetune_step", lambda model, opt, x, y, stats, a, lr, *rest:
                        steps.append((len(x), a.batch_size, lr)) or torch.zeros(()))
    train_set, test_set = data.synthetic(train=True, n=512, size=16), data.synthetic(train=False, n=4, size=16)
    record = ev.run_finetune(args, sit.ViT(16, 4, 3, 32, 1, 2), train_set, test_set)
    assert len(groups) == 1 and (groups[0][1]["weight_decay"], groups[0][1]["layer_decay"]) == (0.05, 0.75)
    assert len(steps) == 200 and all(n == b == 256 for n, b, _ in steps)
    lrs = [lr for _, _, lr in steps]
    assert lrs[:2] + lrs[-2:] == [0.0, pytest.approx(5e-5), pytest.approx(1.1364122934389507e-06),
                                  pytest.approx(1.0341054043789834e-06)]
    assert max(lrs) == pytest.approx(5e-4) and lrs.index(max(lrs)) == 10
    assert record["finetune_epochs"] == 100
    assert {k: record[k] for k in FINETUNE_DEFAULTS if k != "epochs"} == {
        k: v for k, v in FINETUNE_DEFAULTS.items() if k != "epochs"}


def test_encoder_gets_the_finetuning_drop_path(tmp_path):
    """encoder() builds the ViT with drop path 0.1 for fine-tuning (0 and 0.1 over 2 blocks, linear in
    depth), whatever the checkpoint's pretraining drop path (0.3 here), also with --random-init, and
    none for the frozen modes."""
    path = str(tmp_path / "ckpt.pt")
    runtime.save_checkpoint(path, sit.Config(**dict(TINY, depth=2, drop_path=0.3)), sit.SiT(sit.Config(
        **dict(TINY, depth=2, drop_path=0.3))), epoch=3, run=runtime.Run(dataset="synthetic"))
    for flags, rates in ((["--mode", "finetune"], [0.0, 0.1]), (["--mode", "finetune", "--random-init"], [0.0, 0.1]),
                         (["--mode", "knn"], [0.0, 0.0]), (["--mode", "linear"], [0.0, 0.0])):
        vit, _, _ = ev.encoder(ev.parse_args([path] + flags), torch.device("cpu"))
        assert [pytest.approx(b.drop_path) for b in vit.blocks] == rates, flags


def test_mix_written_out_with_the_same_draws():
    """mix, replayed with the numbers it draws from the host generator, in order (applied if u < prob; CutMix
    if u < switch_prob when both are on; lambda ~ Beta(alpha, alpha); the box centre (row, column) uniform over
    the pixels): mixup blends each image with the reversed batch, x lam + x.flip(0) (1 - lam); CutMix pastes the
    reversed batch's pixels into a box of sides int(H sqrt(1 - lam)) x int(W sqrt(1 - lam)) around the centre,
    clipped to the image, and lam becomes 1 - the clipped box's area share; the targets mix by lam alike."""
    g = torch.Generator().manual_seed(0)
    x, t = torch.rand(4, 3, 12, 10, generator=g), ev.smooth_targets(torch.tensor([2, 0, 3, 3]), 5, 0.1)
    seen = set()
    for seed in range(12):
        host, replay = np.random.default_rng(seed), np.random.default_rng(seed)
        xm, tm = ev.mix(x, t, 0.8, 1.0, host)
        assert replay.random() < 1.0                                    # prob 1: always mixed
        cut = replay.random() < 0.5
        lam = float(replay.beta(1.0, 1.0) if cut else replay.beta(0.8, 0.8))
        want = x * lam + x.flip(0) * (1 - lam)
        if cut:
            h, w = int(12 * math.sqrt(1 - lam)), int(10 * math.sqrt(1 - lam))
            cy, cx = int(replay.integers(12)), int(replay.integers(10))
            top, bottom, left, right = max(cy - h // 2, 0), min(cy + h - h // 2, 12), max(cx - w // 2, 0), min(
                cx + w - w // 2, 10)
            want = x.clone()
            want[:, :, top:bottom, left:right] = x.flip(0)[:, :, top:bottom, left:right]
            lam = 1 - (bottom - top) * (right - left) / 120
        seen.add(cut)
        assert torch.allclose(xm, want, atol=1e-6) and torch.allclose(tm, t * lam + t.flip(0) * (1 - lam), atol=1e-6)
        assert host.random() == replay.random()                         # nothing else drawn
    assert seen == {True, False}


def test_mix_defaults_and_one_kind_alone():
    """Defaults: every batch mixed (prob 1; only a CutMix box that rounds to nothing leaves one as it was),
    CutMix half the time when both are on (switch 0.5: 40 to 60 of 100 here); mixup alone (CutMix 0) and
    CutMix alone (mixup 0) each mix; both 0, or prob 0: untouched."""
    x, t = torch.zeros(4, 3, 8, 8), torch.eye(4)
    x[0] = 1.0
    host = np.random.default_rng(0)
    kinds, unchanged = [], 0
    for _ in range(100):
        xm, tm = ev.mix(x, t, 0.8, 1.0, host)
        unchanged += torch.equal(tm, t)
        kinds.append(set(xm.unique().tolist()) <= {0.0, 1.0})        # CutMix copies pixels, mixup blends
    assert 40 <= sum(kinds) <= 60 and unchanged <= 5
    for _ in range(5):
        xm, tm = ev.mix(x, t, 0.8, 0.0, host)                           # mixup alone
        assert not torch.equal(tm, t) and not set(xm.unique().tolist()) <= {0.0, 1.0}
    cut = [ev.mix(x, t, 0.0, 1.0, host) for _ in range(10)]             # CutMix alone
    assert all(set(xm.unique().tolist()) <= {0.0, 1.0} for xm, _ in cut)
    assert sum(not torch.equal(tm, t) for _, tm in cut) >= 8
    assert ev.mix(x, t, 0.0, 0.0, host)[1] is t and ev.mix(x, t, 0.8, 1.0, host, prob=0.0)[1] is t


def test_smooth_targets_written_out():
    """Label smoothing 0.1 over 4 classes: 0.925 on the label, 0.025 elsewhere."""
    t = ev.smooth_targets(torch.tensor([0, 2]), 4, 0.1)
    assert torch.allclose(t, torch.tensor([[0.925, 0.025, 0.025, 0.025], [0.025, 0.025, 0.925, 0.025]]))


# ------------------------------------------------------------------------------------------------
# 6. The pretraining views: crop, flip, colour jitter, grayscale, blur, solarize parameters
# ------------------------------------------------------------------------------------------------

def view_calls(monkeypatch, size, **kw):
    """two_views on 2 images with every augmentation replaced by a recorder: blur returns its p
    everywhere, solarize adds its p, so the output says which view is where."""
    calls = []
    for name in ("random_resized_crop", "color_jitter", "random_grayscale"):
        spy(monkeypatch, data, name, calls, result=lambda a: a["x"])
    spy(monkeypatch, data, "gaussian_blur", calls, result=lambda a: torch.full_like(a["x"], a["p"]))
    spy(monkeypatch, data, "solarize", calls, result=lambda a: a["x"] + a["p"])
    x = torch.randint(0, 256, (2, 3, 8, 8), dtype=torch.uint8, generator=torch.Generator().manual_seed(0))
    out = data.two_views(x, size, (0.0, 0.0, 0.0), (1.0, 1.0, 1.0), **kw)
    return [(name, {k: v for k, v in a.items() if k != "x"}) for name, a in calls], out


def test_two_views_augmentation_parameters(monkeypatch):
    """Each view: crop of area (crop_min, 1) (default 0.2), aspect (3/4, 4/3), flip 0.5, resized to the
    training size; colour jitter p 0.8 (brightness 0.4, contrast 0.4, saturation 0.2, hue 0.1); grayscale
    p 0.2; blur sigma (0.1, 2.0) at 224 px (scaled with the size: (1/70, 2/7) at 32 px). View 1 (first in
    the batch): blur p 1.0, no solarize; view 2: blur p 0.1, solarize p 0.2."""
    def expected(crop_min, sigma):
        def view(blur, sol):
            return [("random_resized_crop", dict(size=size, scale=(crop_min, 1.0), ratio=(3 / 4, 4 / 3), flip=0.5)),
                    ("color_jitter", dict(p=0.8, brightness=0.4, contrast=0.4, saturation=0.2, hue=0.1)),
                    ("random_grayscale", dict(p=0.2)),
                    ("gaussian_blur", dict(p=blur, sigma=sigma)),
                    ("solarize", dict(p=sol))]
        return view(1.0, 0.0) + view(0.1, 0.2)
    for size, kw, crop_min, sigma in ((224, {}, 0.2, (0.1, 2.0)), (32, dict(crop_min=0.3), 0.3, (1 / 70, 2 / 7))):
        calls, out = view_calls(monkeypatch, size, **kw)
        want = expected(crop_min, sigma)
        assert [n for n, _ in calls] == [n for n, _ in want]
        for (name, got), (_, exp) in zip(calls, want):
            assert set(got) == set(exp), name
            for k, v in exp.items():
                assert got[k] == (pytest.approx(v, rel=1e-12) if isinstance(v, (float, tuple)) else v), (name, k)
        assert out.shape == (4, 3, 8, 8)
        assert torch.allclose(out[:2], torch.full((2, 3, 8, 8), 1.0))      # view 1: blur 1.0 + solarize 0
        assert torch.allclose(out[2:], torch.full((2, 3, 8, 8), 0.3))      # view 2: blur 0.1 + solarize 0.2
