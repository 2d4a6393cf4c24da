"""The PyTorch twin of benches/unet.rs: same network, loss, batch, tiling and threads.

Run by hand (not in CI), interleaved with the Rust benchmark on a quiet machine:

    pip install torch numpy
    TORCH_THREADS=2 python node/benches/unet_torch.py

The network is cellswarm's U-Net (depth 3, width 16: 16-32-64, bottleneck 128), with a
3-class pixel head and a 3-class cell-state head; the loss is the class-weighted
cross-entropy plus the masked cell-state cross-entropy; Adam with lr 1e-3; batch 8 of
1 x 128 x 128. Inference segments a 1024 x 1024 frame in 256 x 256 tiles overlapping by 32,
4 tiles per forward pass, blending softmax probabilities with ramps (as infer.rs does).
Prints `RESULT train_med_ms=... infer_med_ms=...`.
"""
import os
import statistics
import time

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F

torch.set_num_threads(int(os.environ.get("TORCH_THREADS", "2")))
WARMUP, STEPS = 3, int(os.environ.get("STEPS", "20"))


class Block(nn.Module):
    def __init__(self, i, o):
        super().__init__()
        self.c1 = nn.Conv2d(i, o, 3, padding=1)
        self.c2 = nn.Conv2d(o, o, 3, padding=1)

    def forward(self, x):
        return F.relu(self.c2(F.relu(self.c1(x))))


class UNet(nn.Module):
    def __init__(self, depth=3, width=16, classes=3, states=3):
        super().__init__()
        c = [width << level for level in range(depth + 1)]
        self.down = nn.ModuleList([Block(1 if l == 0 else c[l - 1], c[l]) for l in range(depth)])
        self.bottleneck = Block(c[depth - 1], c[depth])
        self.up = nn.ModuleList([nn.ConvTranspose2d(c[l + 1], c[l], 2, stride=2) for l in reversed(range(depth))])
        self.dec = nn.ModuleList([Block(2 * c[l], c[l]) for l in reversed(range(depth))])
        self.head = nn.Conv2d(c[0], classes, 1)
        self.state_head = nn.Conv2d(c[0], states, 1)

    def forward(self, x):
        skips = []
        for i, block in enumerate(self.down):
            x = block(x if i == 0 else F.max_pool2d(x, 2))
            skips.append(x)
        x = self.bottleneck(F.max_pool2d(x, 2))
        for up, block in zip(self.up, self.dec):
            x = block(torch.cat([up(x), skips.pop()], 1))
        return self.head(x), self.state_head(x)


torch.manual_seed(0)
model = UNet()
opt = torch.optim.Adam(model.parameters(), lr=1e-3)
x = torch.rand(8, 1, 128, 128)
cls = torch.randint(0, 3, (8, 128, 128))
states = torch.randint(0, 3, (8, 128, 128))
class_w = torch.tensor([0.77, 2.23, 5.72])
state_w = torch.ones(3)


def step():
    opt.zero_grad(set_to_none=True)
    logits, slogits = model(x)
    w = class_w[cls]
    ce = -(F.log_softmax(logits, 1).gather(1, cls[:, None])[:, 0] * w).sum() / w.sum()
    mask = (cls != 0).float() * state_w[states]
    sce = -(F.log_softmax(slogits, 1).gather(1, states[:, None])[:, 0] * mask).sum() / mask.sum()
    loss = ce + 0.5 * sce
    loss.backward()
    opt.step()
    return loss.item()


train_ms = []
for i in range(WARMUP + STEPS):
    t = time.perf_counter()
    step()
    if i >= WARMUP:
        train_ms.append((time.perf_counter() - t) * 1e3)


def starts(n, tile, overlap):
    if n <= tile:
        return [0]
    s = list(range(0, n - tile, tile - overlap))
    return s + [n - tile]


def ramp(n, overlap):
    i = np.arange(n) + 0.5
    return np.clip(np.minimum(i / overlap, (n - i) / overlap), 1e-3, 1.0)


model.eval()
frame = np.random.default_rng(0).random((1024, 1024), dtype=np.float32)
tile, overlap = 256, 32
pos = [(y, x) for y in starts(1024, tile, overlap) for x in starts(1024, tile, overlap)]
wt = np.outer(ramp(tile, overlap), ramp(tile, overlap)).astype(np.float32)


def infer():
    acc = np.zeros((3, 1024, 1024), np.float32)
    wsum = np.zeros((1024, 1024), np.float32)
    with torch.inference_mode():
        for k in range(0, len(pos), 4):
            group = pos[k:k + 4]
            batch = torch.from_numpy(np.stack([frame[y:y + tile, x:x + tile] for y, x in group])[:, None])
            probs = F.softmax(model(batch)[0], 1).numpy()
            for p, (y, x) in zip(probs, group):
                acc[:, y:y + tile, x:x + tile] += p * wt
                wsum[y:y + tile, x:x + tile] += wt
    return acc / wsum


infer_ms = []
for i in range(WARMUP + 5):
    t = time.perf_counter()
    infer()
    if i >= WARMUP:
        infer_ms.append((time.perf_counter() - t) * 1e3)
print(f"RESULT torch={torch.__version__} threads={torch.get_num_threads()} "
      f"train_med_ms={statistics.median(train_ms):.1f} infer_med_ms={statistics.median(infer_ms):.1f}")
