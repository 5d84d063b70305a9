"""HALP as torchhalp (HazyResearch, PyTorch <= 0.3.1) runs it: an eager float32 simulation, the reference to beat.

Written from the algorithm (De Sa et al. 2018, Algorithm 2) in torchhalp's style,
not copied from it: every parameter keeps six float32 tensors (the weight
``W = A + Z`` the model computes with, the anchor ``A``, the offset ``Z`` held
as a float multiple of the scale, the full gradient ``G``, and the gradients at
``W`` and at ``A``), gradients come from a user closure that runs forward and
backward on the module, and the offset is quantized by Python-level tensor ops
after each SGD step on it. Stochastic rounding draws ``torch.rand``.
"""
import torch


def quantize_(z, scale, bits):
    """``z <- d * clamp(floor(z / d + U), -2**(bits-1), 2**(bits-1) - 1)`` in place; ``d == 0`` zeroes ``z``."""
    if float(scale) == 0.0:
        return z.zero_()
    bound = 2.0 ** (bits - 1)
    z.div_(scale).add_(torch.rand_like(z)).floor_().clamp_(-bound, bound - 1)
    return z.mul_(scale)


class TorchhalpStyleHALP:
    """``step(closure)`` is one inner step; every ``T`` steps it first recenters over ``data_loader``.

    ``closure(data, target)`` (defaults: the current batch) zeroes nothing, runs
    forward and backward on the module and returns the loss, as in torchhalp.
    """

    def __init__(self, params, lr, T, data_loader, mu=0.1, bits=8):
        self.params = [p for p in params if p.requires_grad]
        self.lr, self.T, self.data_loader, self.mu, self.bits = lr, T, data_loader, mu, bits
        self.weight = [p.data for p in self.params]
        self.anchor = [p.data.clone() for p in self.params]
        self.offset = [torch.zeros_like(p.data) for p in self.params]
        self.full_grad = [torch.zeros_like(p.data) for p in self.params]
        self.grad_at_weight = [torch.zeros_like(p.data) for p in self.params]
        self.grad_at_anchor = [torch.zeros_like(p.data) for p in self.params]
        self.scale = [0.0 for _ in self.params]  # Python floats, as torchhalp keeps them
        self.steps = T  # recenter on the first step
        self.recenters = 0

    def state_tensors(self):
        return self.weight + self.anchor + self.offset + self.full_grad + self.grad_at_weight + self.grad_at_anchor

    def _point(self, weights, grads):
        """Make the module compute with ``weights`` and accumulate its gradients into ``grads`` (zeroed)."""
        for p, w, g in zip(self.params, weights, grads):
            p.data = w
            g.zero_()
            p.grad = g

    def recenter(self, closure):
        for a, z in zip(self.anchor, self.offset):
            a.add_(z)
            z.zero_()
        self._point(self.anchor, self.full_grad)
        for data, target in self.data_loader:
            closure(data, target)
        bound = 2 ** (self.bits - 1) - 1
        for i, g in enumerate(self.full_grad):
            g.div_(len(self.data_loader))
            self.scale[i] = float(g.norm()) / (self.mu * bound)
        self.steps = 0
        self.recenters += 1

    def step(self, closure):
        if self.steps >= self.T:
            self.recenter(closure)
        self._point(self.anchor, self.grad_at_anchor)
        closure()
        self._point(self.weight, self.grad_at_weight)
        loss = closure()
        for i, z in enumerate(self.offset):
            corrected = self.grad_at_weight[i] - self.grad_at_anchor[i] + self.full_grad[i]
            z.add_(corrected, alpha=-self.lr)
            quantize_(z, self.scale[i], self.bits)
        # The module's weights are kept current, as the next step and evaluation read them.
        for w, a, z in zip(self.weight, self.anchor, self.offset):
            torch.add(a, z, out=w)
        self.steps += 1
        return loss
