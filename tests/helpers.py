"""Small models for tests: a two-class linear target and a tiny class-conditioned explainer."""
import torch
import torch.nn as nn


class LinearTwoClass(nn.Module):
    """Logit difference w . x + b: the best deletion order is known in closed form."""

    def __init__(self, size=8, seed=0):
        super().__init__()
        g = torch.Generator().manual_seed(seed)
        self.w = nn.Parameter(torch.randn(3, size, size, generator=g), requires_grad=False)
        self.b = nn.Parameter(torch.tensor(0.5), requires_grad=False)

    def forward(self, x):
        z = (x * self.w).flatten(1).sum(1) + self.b
        return torch.softmax(torch.stack([torch.zeros_like(z), z], dim=1), dim=1)


class TinyExplainer(nn.Module):
    def __init__(self, num_classes=2, dim=8):
        super().__init__()
        self.embed = nn.Embedding(num_classes, dim)
        self.conv1 = nn.Conv2d(3, dim, 3, padding=1)
        self.conv2 = nn.Conv2d(dim, 1, 3, padding=1)

    def forward(self, x, targets):
        h = torch.relu(self.conv1(x) + self.embed(targets)[:, :, None, None])
        return self.conv2(h)
