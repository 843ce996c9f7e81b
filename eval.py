"""Evaluate a SiT checkpoint's encoder: k-NN, linear probe, few-shot and fine-tuning.

Usage: python eval.py runs/cifar10/ckpt.pt --mode knn|linear|fewshot|finetune
"""
import torch
import torch.nn.functional as F

import data


@torch.no_grad()
def features(backbone, images, size, mean, std, batch_size=512):
    """CLS features (N, D), float32, of uint8 images (N, C, S, S) on the backbone's device."""
    was_training = backbone.training
    backbone.eval()
    device = next(backbone.parameters()).device
    out = []
    for i in range(0, len(images), batch_size):
        x = data.prepare(images[i:i + batch_size].to(device), size, mean, std)
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=device.type == "cuda"):
            out.append(backbone(x)[:, 0].float())
    backbone.train(was_training)
    return torch.cat(out)


@torch.no_grad()
def knn_accuracy(train_feats, train_labels, test_feats, test_labels, num_classes, k=20, T=0.07,
                 chunk=1024):
    """Top-1 (%) of a weighted k-NN vote over L2-normalised features (k = 20, T = 0.07, as in DINO).

    Each of the k nearest training features votes for its label with weight exp(cos / T).
    """
    train_feats = F.normalize(train_feats, dim=1)
    test_feats = F.normalize(test_feats, dim=1)
    train_labels, test_labels = train_labels.to(train_feats.device), test_labels.to(train_feats.device)
    k = min(k, len(train_feats))
    correct = 0
    for i in range(0, len(test_feats), chunk):
        sim = test_feats[i:i + chunk] @ train_feats.t()               # (b, N_train) cosine
        top, idx = sim.topk(k, dim=1)                                 # (b, k)
        votes = torch.zeros(len(top), num_classes, device=sim.device)
        votes.scatter_add_(1, train_labels[idx], (top / T).exp())
        correct += (votes.argmax(1) == test_labels[i:i + chunk]).sum().item()
    return 100.0 * correct / len(test_feats)
