"""Export a SiT encoder as a plain state dict in timm's or torchvision's ViT layout.

    python export.py runs/cifar10/ckpt.pt                          # teacher, timm layout
    python export.py runs/cifar10/ckpt.pt --format torchvision     # teacher, torchvision layout
    python export.py runs/cifar10/ckpt.pt --student                # the student instead
    python export.py runs/cifar10/finetuned.pt                     # fine-tuned encoder + its head
    python export.py runs/cifar10/ckpt.pt --format release         # our checkpoint, small: to ship a model

`--format release` writes `<name>-release.pt`: the checkpoint in float16 without the optimizer and the projection
heads, which eval.py, visualize.py and torch.hub load like any other (the model shipped in models/ is one).
Otherwise it writes `<name>.pth` (tensors, for torch.load(weights_only=True)) and `<name>.json` (architecture,
normalisation, the Python lines that rebuild the model and load it strictly) beside the checkpoint. The encoder is
the one eval.py evaluates: the momentum teacher's backbone (as in DINO and MoCo v3). Neither timm nor torchvision
is imported; the layouts are written out below. Shapes: D token width, N patches, P patch side, C channels, L depth,
K classes.
"""
import argparse
import json
import os
import re

import data
import runtime


class ExportError(ValueError):
    """A request that cannot be met (wrong checkpoint kind, layout that cannot hold the encoder)."""


# === Layouts: our names -> timm's / torchvision's names (same tensors, same shapes)
TORCHVISION_TOP = {"cls_token": "class_token", "pos_embed": "encoder.pos_embedding",
                   "patch_embed.proj.weight": "conv_proj.weight", "patch_embed.proj.bias": "conv_proj.bias",
                   "norm.weight": "encoder.ln.weight", "norm.bias": "encoder.ln.bias",
                   "head.weight": "heads.head.weight", "head.bias": "heads.head.bias"}
TORCHVISION_BLOCK = {"norm1": "ln_1", "attn.proj": "self_attention.out_proj", "norm2": "ln_2",
                     "mlp.fc1": "mlp.0", "mlp.fc2": "mlp.3"}  # mlp: Linear, GELU, Dropout, Linear
# nn.MultiheadAttention stacks W_q, W_k, W_v in one (3D, D) matrix in that order, as our qkv does.
TORCHVISION_QKV = {"weight": "self_attention.in_proj_weight", "bias": "self_attention.in_proj_bias"}


def torchvision_name(name):
    """Our name -> torchvision's: blocks.3.mlp.fc1.weight -> encoder.layers.encoder_layer_3.mlp.0.weight."""
    m = re.fullmatch(r"blocks\.(\d+)\.(.+)\.(weight|bias)", name)
    if m is None:
        return TORCHVISION_TOP[name]
    i, module, param = m.groups()
    inner = TORCHVISION_QKV[param] if module == "attn.qkv" else f"{TORCHVISION_BLOCK[module]}.{param}"
    return f"encoder.layers.encoder_layer_{i}.{inner}"


def convert(vit, head, fmt):
    """State dict of `vit` (+ the classifier `head`) under `fmt`'s names: plain CPU tensors, unshared. timm's names
    are ours: its VisionTransformer has cls_token, pos_embed, patch_embed.proj, blocks.i.{norm1, attn.qkv, attn.proj,
    norm2, mlp.fc1, mlp.fc2}, norm, the classifier on the CLS token `head` (global_pool="token": no fc_norm)."""
    ours = dict(vit.state_dict(), **{f"head.{k}": v for k, v in (head or {}).items()})
    rename = torchvision_name if fmt == "torchvision" else str
    return {rename(k): v.detach().cpu().contiguous().clone() for k, v in ours.items()}


# === The architecture and the lines of Python that rebuild the model

def architecture(cfg, num_classes, dataset, fmt):
    """The facts a model built elsewhere needs: sizes, normalisation, format."""
    mean, std = data.stats(dataset)
    return dict(format=fmt, img_size=cfg.img_size, patch_size=cfg.patch_size, in_chans=cfg.in_chans, dim=cfg.dim,
                depth=cfg.depth, heads=cfg.heads, mlp_ratio=cfg.mlp_ratio, mlp_dim=int(cfg.dim * cfg.mlp_ratio),
                num_classes=num_classes, layer_norm_eps=1e-6, mean=list(mean), std=list(std), dataset=dataset)


def python_lines(arch, weights):
    """dict(imports, build, load, use): Python that builds an untrained `model` and loads `weights` into it strictly."""
    a, K = arch, arch["num_classes"]
    if a["format"] == "timm":   # the preset only picks defaults; every size is given explicitly
        preset = {192: "tiny", 384: "small", 768: "base"}.get(a["dim"], "small")
        build = (f'model = timm.create_model("vit_{preset}_patch16_224", pretrained=False, num_classes={K}, '
                 f'global_pool="token", img_size={a["img_size"]}, patch_size={a["patch_size"]}, '
                 f'in_chans={a["in_chans"]}, embed_dim={a["dim"]}, depth={a["depth"]}, num_heads={a["heads"]}, '
                 f'mlp_ratio={a["mlp_ratio"]})')
    else:   # without a classifier (K = 0): the CLS features
        build = (f'model = torchvision.models.VisionTransformer(image_size={a["img_size"]}, '
                 f'patch_size={a["patch_size"]}, num_layers={a["depth"]}, num_heads={a["heads"]}, '
                 f'hidden_dim={a["dim"]}, mlp_dim={a["mlp_dim"]}'
                 + (f", num_classes={K})" if K else "); model.heads = torch.nn.Identity()"))
    use = "logits = model(x)  # (B, K)" if K else "features = model(x)  # (B, D) CLS token"
    use += f" of x (B, {a['in_chans']}, {a['img_size']}, {a['img_size']}) normalised with mean, std"
    load = f"model.load_state_dict(torch.load({json.dumps(weights)}, weights_only=True), strict=True); model.eval()"
    return dict(imports="import timm, torch" if a["format"] == "timm" else "import torch, torchvision",
                build=build, load=load, use=use)


# === Command line

def export(checkpoint, fmt="timm", student=False, out=None):
    """Write the encoder's .pth and .json; returns (pth path, json path, the JSON record)."""
    vit, head, info = runtime.load_encoder(checkpoint, student)
    cfg = info["cfg"]
    if fmt == "torchvision" and cfg.in_chans != 3:
        raise ExportError(f"torchvision's VisionTransformer takes 3-channel images; this encoder has "
                          f"in_chans={cfg.in_chans} (use --format timm)")
    arch = architecture(cfg, 0 if head is None else len(head["bias"]), info["dataset"], fmt)
    stem = os.path.splitext(checkpoint)[0]   # runs/x/ckpt.pt -> runs/x/ckpt-teacher-timm.pth, finetuned-timm.pth
    pth = out or (f"{stem}-{fmt}.pth" if info["encoder"] == "finetuned" else f"{stem}-{info['encoder']}-{fmt}.pth")
    meta = os.path.splitext(pth)[0] + ".json"
    record = dict(arch, encoder=info["encoder"], epoch=info["epoch"], weights=os.path.basename(pth),
                  source=os.path.abspath(checkpoint), python=python_lines(arch, os.path.basename(pth)))
    runtime.atomic_save(convert(vit, head, fmt), pth)
    runtime.write_json(meta, record)
    return pth, meta, record


def main(argv=None):
    p = runtime.Parser(prog="export.py", description=__doc__.split("\n\n")[0],
                       formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("checkpoint", help="a ckpt.pt written by train.py, or a finetuned.pt written by eval.py")
    p.add_argument("--format", default="timm", choices=("timm", "torchvision", "release"),
                   help="key layout of the exported state dict, or release: our checkpoint, small (float16, "
                        "no optimizer, no projection heads)")
    p.add_argument("--student", action="store_true", help="export the student's backbone, not the teacher's")
    p.add_argument("--out", help="path of the .pth (the .json goes beside it); None = beside the checkpoint")
    args = p.parse_args(argv)
    if args.format == "release":
        out = args.out or os.path.splitext(args.checkpoint)[0] + "-release.pt"
        try:
            runtime.release_checkpoint(args.checkpoint, out)
        except (runtime.CheckpointError, OSError) as e:
            p.error(str(e))
        print(f"wrote {out} ({os.path.getsize(out) / 2**20:.1f} MiB)")
        return out
    try:
        pth, meta, record = export(args.checkpoint, args.format, args.student, args.out)
    except (runtime.CheckpointError, ExportError, OSError) as e:
        p.error(str(e))
    print(f"wrote {pth} ({record['encoder']} encoder, {args.format} layout) and {meta}")
    print("\n".join(python_lines(record, pth).values()))      # the same lines, with the path from here
    print(f"mean = {tuple(record['mean'])}, std = {tuple(record['std'])}")
    return record


if __name__ == "__main__":
    main()
