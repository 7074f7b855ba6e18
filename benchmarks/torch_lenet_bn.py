"""The chapter's recipe in PyTorch on the same Fashion-MNIST arrays, for docs/results.md's comparison band.

LeNet-BN with the chapter's from-scratch BN placement (nn.BatchNorm2d/1d, momentum 0.1 = tinybn's 0.9),
Xavier-uniform weights, SGD lr 1.0, batch 256, 10 epochs, test accuracy in eval mode after each epoch.
PyTorch is only used here for comparison; tinybn never imports it.
"""
import argparse
import time

import torch
from torch import nn

from tinybn.app.data import load_fashion_mnist

parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
parser.add_argument("--epochs", type=int, default=10)
parser.add_argument("--lr", type=float, default=1.0)
parser.add_argument("--seed", type=int, default=0)
args = parser.parse_args()
torch.manual_seed(args.seed)
train_x, train_y, test_x, test_y = load_fashion_mnist()
train_x = torch.tensor(train_x, dtype=torch.float32) / 255
test_x = torch.tensor(test_x, dtype=torch.float32) / 255
train_y, test_y = torch.tensor(train_y), torch.tensor(test_y)
net = nn.Sequential(
    nn.Conv2d(1, 6, 5), nn.BatchNorm2d(6), nn.Sigmoid(), nn.MaxPool2d(2, 2),
    nn.Conv2d(6, 16, 5), nn.BatchNorm2d(16), nn.Sigmoid(), nn.MaxPool2d(2, 2), nn.Flatten(),
    nn.Linear(256, 120), nn.BatchNorm1d(120), nn.Sigmoid(), nn.Linear(120, 84), nn.BatchNorm1d(84), nn.Sigmoid(),
    nn.Linear(84, 10))
for m in net:
    if isinstance(m, (nn.Conv2d, nn.Linear)):
        nn.init.xavier_uniform_(m.weight)
optimizer = torch.optim.SGD(net.parameters(), lr=args.lr)
loss_fn = nn.CrossEntropyLoss()
generator = torch.Generator().manual_seed(args.seed)
for epoch in range(1, args.epochs + 1):
    net.train()
    order = torch.randperm(len(train_y), generator=generator)
    total_loss = correct = 0.0
    start = time.perf_counter()
    for i in range(0, len(order), 256):
        index = order[i:i + 256]
        logits = net(train_x[index])
        loss = loss_fn(logits, train_y[index])
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        total_loss += float(loss.detach()) * len(index)
        correct += float((logits.argmax(1) == train_y[index]).sum())
    seconds = time.perf_counter() - start
    net.eval()
    with torch.no_grad():
        test_acc = float((net(test_x).argmax(1) == test_y).float().mean())
    print(f"epoch {epoch:2d}: train loss {total_loss / len(order):.4f}, train acc {correct / len(order):.4f}, "
          f"test acc {test_acc:.4f}, {len(order) / seconds:.0f} examples/sec")
