"""torch.hub entry point: a SiT encoder from a checkpoint, ready for features.

    model = torch.hub.load("path/to/sit", "sit_vit", checkpoint="runs/cifar10/ckpt.pt", source="local")
    x = (images - torch.tensor(model.mean).view(1, 3, 1, 1)) / torch.tensor(model.std).view(1, 3, 1, 1)
    features = model(x)[:, 0]        # (B, D) CLS token; model(x) is (B, 1 + N, D), CLS first
    model = torch.hub.load("path/to/sit", "fmnist_20min", source="local")   # the model shipped in models/
"""
dependencies = ["torch", "numpy"]   # numpy: data.py, which holds each dataset's normalisation

import os

from data import stats
from runtime import MODELS, load_encoder


def sit_vit(checkpoint, student=False, device="cpu"):
    """The encoder that eval.py evaluates (the momentum teacher's backbone; `student=True` for the
    student's, or the fine-tuned encoder of eval.py's finetuned.pt), a sit.ViT in eval mode.

    model(x): images x (B, C, H, W), normalised with model.mean and model.std (per channel, for
    pixels in [0, 1]), at model.img_size (other sizes interpolate the position embedding) -> tokens
    (B, 1 + N, D); model(x)[:, 0] is the CLS feature eval.py uses.
    """
    vit, _, info = load_encoder(checkpoint, student, device)
    vit.mean, vit.std = stats(info["dataset"])
    vit.img_size = info["cfg"].img_size
    return vit


def fmnist_20min(student=False, device="cpu"):
    """The encoder of models/fmnist-20min.pt, shipped with this repository: the fmnist-20min recipe's
    run (Fashion-MNIST, 20 minutes on 2 CPU cores; its k-NN and linear probe are in the README)."""
    return sit_vit(os.path.join(MODELS, "fmnist-20min.pt"), student, device)
