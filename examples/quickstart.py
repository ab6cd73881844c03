"""Wrap the linear layers of a small network with torchlora LoRA layers and train a few steps:
only the adapters learn, the base stays frozen, and merging gives the same outputs."""

import torch
from torch import nn

import torchlora


def main() -> None:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(32, 64), nn.GELU(), nn.Linear(64, 64), nn.GELU(), nn.Linear(64, 4))
    for p in model.parameters():
        p.requires_grad_(False)
    for i in (0, 2):
        model[i] = torchlora.LoraLinear(model[i], r=8, lora_alpha=16, lora_dropout=0.05)

    x = torch.randn(512, 32)
    y = (x[:, :4] > 0).long().sum(1).clamp(max=3)
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=5e-3)
    print(f"trainable {sum(p.numel() for p in params)} of {sum(p.numel() for p in model.parameters())} parameters")
    for step in range(60):
        loss = nn.functional.cross_entropy(model(x), y)
        opt.zero_grad()
        loss.backward()
        opt.step()
        if step % 20 == 0 or step == 59:
            print(f"step {step:3d}  loss {loss.item():.4f}")

    model.eval()
    with torch.no_grad():
        before = model(x)
        for i in (0, 2):
            model[i].merge()
        print("merged == unmerged:", torch.allclose(before, model(x), atol=1e-5))


if __name__ == "__main__":
    main()
