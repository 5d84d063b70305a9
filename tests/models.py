"""Small models of every kind the transform must handle without per-model code."""
import torch
import torch.nn as nn
import torch.nn.functional as F


def mlp(inputs=8, hidden=16, classes=3):
    return nn.Sequential(nn.Linear(inputs, hidden), nn.ReLU(), nn.Linear(hidden, classes))


class SmallCNN(nn.Module):
    """Conv (no bias: BatchNorm follows, so a bias would get an exactly-zero gradient) + BatchNorm + linear."""

    def __init__(self, classes=3, channels=4):
        super().__init__()
        self.conv = nn.Conv2d(1, channels, 3, padding=1, bias=False)
        self.bn = nn.BatchNorm2d(channels)
        self.fc = nn.Linear(channels * 4 * 4, classes)

    def forward(self, x):
        x = F.max_pool2d(F.relu(self.bn(self.conv(x))), 2)
        return self.fc(x.flatten(1))


class StatelessLSTM(nn.Module):
    """Classifies a sequence from its last hidden state; no state is carried between batches."""

    def __init__(self, inputs=4, hidden=8, classes=3):
        super().__init__()
        self.lstm = nn.LSTM(inputs, hidden, batch_first=True)
        self.head = nn.Linear(hidden, classes)

    def forward(self, x):
        out, _ = self.lstm(x)
        return self.head(out[:, -1])


class TinyTransformerBlock(nn.Module):
    """Embedding, LayerNorm and single-head attention over a token sequence."""

    def __init__(self, vocab=11, width=8, classes=3):
        super().__init__()
        self.embed = nn.Embedding(vocab, width)
        self.norm = nn.LayerNorm(width)
        self.qkv = nn.Linear(width, 3 * width)
        self.head = nn.Linear(width, classes)

    def forward(self, tokens):
        x = self.norm(self.embed(tokens))
        q, k, v = self.qkv(x).chunk(3, dim=-1)
        attention = torch.softmax(q @ k.transpose(1, 2) / x.shape[-1] ** 0.5, dim=-1)
        return self.head((x + attention @ v).mean(1))


def classification_data(kind, samples=48, batch=8, seed=0):
    """Learnable batches for a model kind: the label is a simple function of the input."""
    g = torch.Generator().manual_seed(seed)
    if kind == "mlp":
        x = torch.randn(samples, 8, generator=g)
        y = (x[:, 0] > 0).long() + (x[:, 1] > 1).long()
    elif kind == "cnn":
        x = torch.randn(samples, 1, 8, 8, generator=g)
        y = (x[:, :, :4].mean((1, 2, 3)) > 0).long() * 2
    elif kind == "lstm":
        x = torch.randn(samples, 5, 4, generator=g)
        y = (x[:, :, 0].sum(1) > 0).long()
    else:
        x = torch.randint(0, 11, (samples, 6), generator=g)
        y = (x == 3).any(1).long()
    return [(x[i:i + batch], y[i:i + batch]) for i in range(0, samples, batch)]


MODELS = {"mlp": mlp, "cnn": SmallCNN, "lstm": StatelessLSTM, "transformer": TinyTransformerBlock}
