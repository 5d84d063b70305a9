"""The matrix work of a graph: multiply-adds by pass and precision, counted from shapes."""
import torch
import torch.nn.functional as F
from torch.fx.experimental.proxy_tensor import make_fx

from halp_fx.matrix_work import describe, matrix_work


def traced(fn, *args):
    return make_fx(fn, tracing_mode="fake")(*args)


def test_a_linear_layer_forward_and_backward_is_three_products_of_batch_by_in_by_out():
    def step(x, weight, bias):
        return torch.autograd.grad(F.linear(x, weight, bias).sum(), [x, weight, bias])
    gm = traced(step, *(torch.randn(*shape, requires_grad=True) for shape in ((4, 6), (5, 6), (5,))))
    assert matrix_work(gm) == {("W", "float32"): 3 * 4 * 6 * 5}


def test_fused_attention_counts_two_products_forward_and_five_backward():
    q, k, v = (torch.randn(2, 3, 8, 4, requires_grad=True) for _ in range(3))

    def step(q, k, v):
        return torch.autograd.grad(F.scaled_dot_product_attention(q, k, v).sum(), [q, k, v])
    gm = traced(step, q, k, v)
    per_product = 2 * 3 * 8 * 8 * 4
    names = [getattr(n.target, "__name__", "") for n in gm.graph.nodes if n.op == "call_function"]
    if any("scaled_dot_product" in name for name in names):   # fused (CPU flash attention)
        assert matrix_work(gm) == {("W", "float32"): 7 * per_product}
    else:   # decomposed into batched products: QK^T, PV forward, four backward
        assert matrix_work(gm)[("W", "float32")] == 6 * per_product


def test_a_convolution_counts_output_size_times_its_filter():
    gm = traced(lambda x, weight: F.conv2d(x, weight, padding=1), torch.randn(1, 2, 5, 5), torch.randn(4, 2, 3, 3))
    assert matrix_work(gm) == {("W", "float32"): (4 * 5 * 5) * (2 * 3 * 3)}


def test_the_description_gives_each_pass_and_the_low_precision_share():
    work = {("anchor", "bf16"): 3e6, ("W", "int8"): 6e6, ("W", "float32"): 1e6}
    assert describe(work) == ("anchor: 3 M bf16; W: 1 M float32 + 6 M int8 multiply-adds per step "
                              "(10 M in all, 90% low precision)")
    assert describe({}) == "no matrix products"
    assert describe({("W", "float32"): 640}) == "W: 640 float32 multiply-adds per step (640 in all, 0% low precision)"
    assert describe({("W", "int8"): 2.5e4}).startswith("W: 25 k int8")
