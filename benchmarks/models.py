"""The benchmarked models and the synthetic data they train on.

Each entry of ``MODELS`` is ``(build, input_shape)``: ``build()`` returns a fresh
module (seeded, so every method starts from the same weights) and a batch is
``(x, y)`` with ``x`` of shape ``(batch_size, *input_shape)`` and ``y`` class
labels in ``range(CLASSES)``.
"""
import torch
import torch.nn as nn
import torch.nn.functional as F

CLASSES = 10


def logistic_regression():
    return nn.Linear(64, CLASSES)


def mlp():
    return nn.Sequential(nn.Linear(64, 256), nn.ReLU(), nn.Linear(256, 256), nn.ReLU(), nn.Linear(256, CLASSES))


def wide_mlp():
    """784-2048-2048-2048-10: 10.0M parameters, enough that a step's per-parameter memory shows in the
    resident set (benchmarks/resident_memory.py)."""
    return nn.Sequential(nn.Linear(784, 2048), nn.ReLU(), nn.Linear(2048, 2048), nn.ReLU(), nn.Linear(2048, 2048),
                         nn.ReLU(), nn.Linear(2048, CLASSES))


def mlp1024():
    """784-1024-1024-10 (1.86M parameters, batch 128 in the int8 benchmark): the matrix products dominate."""
    return nn.Sequential(nn.Linear(784, 1024), nn.ReLU(), nn.Linear(1024, 1024), nn.ReLU(), nn.Linear(1024, CLASSES))


class TransformerClassifier(nn.Module):
    """One ``nn.TransformerEncoderLayer(d_model=512, nhead=8, dim_feedforward=2048, batch_first=True)`` over 64
    tokens given as float embeddings ``(batch, 64, 512)``, then a linear head on the mean over tokens. Dropout is
    0: a step at W and its twin at the anchor must see the same function of the weights (3.2M parameters)."""

    def __init__(self):
        super().__init__()
        self.encoder = nn.TransformerEncoderLayer(d_model=512, nhead=8, dim_feedforward=2048, dropout=0.0,
                                                  batch_first=True)
        self.head = nn.Linear(512, CLASSES)

    def forward(self, x):
        return self.head(self.encoder(x).mean(dim=1))


class CNN(nn.Module):
    """Two 3x3 convolutions with BatchNorm on 8x8 single-channel images (sklearn-digits sized)."""

    def __init__(self):
        super().__init__()
        self.conv1, self.bn1 = nn.Conv2d(1, 16, 3, padding=1), nn.BatchNorm2d(16)
        self.conv2, self.bn2 = nn.Conv2d(16, 32, 3, padding=1), nn.BatchNorm2d(32)
        self.fc = nn.Linear(32 * 2 * 2, CLASSES)

    def forward(self, x):
        x = F.max_pool2d(F.relu(self.bn1(self.conv1(x))), 2)
        x = F.max_pool2d(F.relu(self.bn2(self.conv2(x))), 2)
        return self.fc(x.flatten(1))


class LeNet5(nn.Module):
    """LeCun et al. 1998 on 28x28 images, with ReLU and max pooling."""

    def __init__(self):
        super().__init__()
        self.conv1 = nn.Conv2d(1, 6, 5, padding=2)
        self.conv2 = nn.Conv2d(6, 16, 5)
        self.fc1, self.fc2, self.fc3 = nn.Linear(16 * 5 * 5, 120), nn.Linear(120, 84), nn.Linear(84, CLASSES)

    def forward(self, x):
        x = F.max_pool2d(F.relu(self.conv1(x)), 2)
        x = F.max_pool2d(F.relu(self.conv2(x)), 2)
        x = F.relu(self.fc1(x.flatten(1)))
        return self.fc3(F.relu(self.fc2(x)))


class LSTMClassifier(nn.Module):
    """A one-layer LSTM read to the end; the last hidden state is classified. Stateless between batches."""

    def __init__(self):
        super().__init__()
        self.lstm = nn.LSTM(16, 64, batch_first=True)
        self.head = nn.Linear(64, CLASSES)

    def forward(self, x):
        out, _ = self.lstm(x)
        return self.head(out[:, -1])


MODELS = {
    "logreg": (logistic_regression, (64,)),
    "mlp": (mlp, (64,)),
    "mlp10m": (wide_mlp, (784,)),
    "cnn": (CNN, (1, 8, 8)),
    "lenet5": (LeNet5, (1, 28, 28)),
    "lstm": (LSTMClassifier, (20, 16)),
    "mlp1024": (mlp1024, (784,)),
    "transformer": (TransformerClassifier, (64, 512)),
}


def build(name, device, seed=0):
    torch.manual_seed(seed)
    return MODELS[name][0]().to(device)


def batches(name, batch_size, count, device, seed=0):
    """``count`` batches of random inputs and labels; random data costs what real data costs."""
    g = torch.Generator().manual_seed(seed)
    shape = MODELS[name][1]
    return [(torch.randn(batch_size, *shape, generator=g).to(device),
             torch.randint(0, CLASSES, (batch_size,), generator=g).to(device)) for _ in range(count)]


def trainable_parameters(model):
    return sum(p.numel() for p in model.parameters() if p.requires_grad)
