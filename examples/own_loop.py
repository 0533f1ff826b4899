"""SimCLR in your own PyTorch loop, from selfsup's parts: the batched augmentation, a backbone and
projection head, the NT-Xent loss and the weighted kNN evaluator. No trainer, no config.

    python examples/own_loop.py                       # 30 steps on synthetic images, then kNN
    python examples/own_loop.py --data fashion-mnist --steps 500 --device cuda

It prints the loss as it trains and one JSON line at the end (steps, final loss, the loss at chance,
kNN top-1 of the encoder before and after training on the test split).
"""
from __future__ import annotations

import argparse
import json
import math

import torch

from selfsup.data.augment import eval_transform, simclr_augment
from selfsup.data.datasets import build_dataset
from selfsup.eval.knn import knn_accuracy
from selfsup.losses import nt_xent
from selfsup.models.backbones import build_backbone
from selfsup.models.heads import projection_head


@torch.no_grad()
def features(encoder, images: torch.Tensor, device, batch: int = 256) -> torch.Tensor:
    """Unit-norm encoder features of uint8 images (N, C, H, W), clean views, eval mode."""
    encoder.eval()
    out = [encoder(eval_transform(x.to(device))) for x in images.split(batch)]
    encoder.train()
    return torch.nn.functional.normalize(torch.cat(out).float(), dim=1)


def knn(encoder, train, test, device) -> float:
    ftr, fte = features(encoder, train.images, device), features(encoder, test.images, device)
    return knn_accuracy(ftr, train.labels.to(device), fte, test.labels.to(device), k=20, temperature=0.1)["knn_top1"]


def main(argv=None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--data", default="synthetic", help="synthetic | fashion-mnist | cifar10 | ...")
    p.add_argument("--root", default=None, help="the dataset's folder (default: its usual places)")
    p.add_argument("--steps", type=int, default=30)
    p.add_argument("--batch-size", type=int, default=64)
    p.add_argument("--device", default="cpu")
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args(argv)
    torch.manual_seed(args.seed)
    device = torch.device(args.device)

    train = build_dataset(args.data, "train", root=args.root)   # uint8 images (N, C, H, W), int64 labels
    test = build_dataset(args.data, "test", root=args.root)
    size = train.images.shape[-1]
    encoder, dim = build_backbone("resnet_small", cifar_stem=True, width=16)   # or any nn.Module: (B,3,H,W)->(B,dim)
    head = projection_head(dim, hidden_dim=dim, out_dim=64, layers=2)
    model = torch.nn.Sequential(encoder, head).to(device)
    aug = simclr_augment(size, strength=0.5)   # a random view of a whole uint8 batch, on its device
    opt = torch.optim.SGD(model.parameters(), lr=0.06 * args.batch_size / 256, momentum=0.9, weight_decay=5e-4)
    gen = torch.Generator(device=device).manual_seed(args.seed)   # the augmentation's random stream

    before = knn(encoder, train, test, device)
    images = train.images.to(device)
    for step in range(1, args.steps + 1):
        batch = images[torch.randint(len(images), (args.batch_size,), device=device, generator=gen)]
        z1, z2 = model(aug(batch, gen)), model(aug(batch, gen))   # two views of each image
        loss = nt_xent(z1, z2, temperature=0.2)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        if step % 10 == 0 or step == args.steps:
            print(f"step {step}: loss {loss.item():.4f}", flush=True)
    # loss_chance: NT-Xent of embeddings that tell the 2B views apart no better than chance, log(2B - 1)
    result = {"steps": args.steps, "loss": loss.item(), "loss_chance": math.log(2 * args.batch_size - 1),
              "knn_top1_before": before, "knn_top1": knn(encoder, train, test, device)}
    print(json.dumps(result))
    return result


if __name__ == "__main__":
    main()
