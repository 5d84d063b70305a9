"""Inductor-compiled steps agree with the same graphs run eagerly (compile=False)."""
import pytest
import torch
import torch._inductor.config
import torch.nn.functional as F

import halp_fx
from models import SmallCNN, classification_data

DEVICES = ["cpu", pytest.param("cuda", marks=pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA"))]


def train(device, compile, steps=8):
    torch.manual_seed(0)
    data = [(x.to(device), y.to(device)) for x, y in classification_data("cnn", samples=32, batch=8)]
    step = halp_fx.transform(SmallCNN(channels=32).to(device), 8, loss_fn=F.cross_entropy, data_loader=data, lr=0.1,
                             mu=0.5, momentum=0.5, compile=compile)
    losses = [float(step(*data[i % len(data)])) for i in range(steps)]
    return step, losses


@pytest.fixture(scope="module", params=DEVICES)
def eager_and_compiled(request):
    return train(request.param, False), train(request.param, True)


def test_compiled_losses_match_eager(eager_and_compiled):
    (_, eager), (_, compiled) = eager_and_compiled
    assert compiled == pytest.approx(eager, rel=1e-5, abs=1e-6)


def test_compiled_offsets_match_eager_but_for_rare_rounding_flips(eager_and_compiled):
    (eager, _), (compiled, _) = eager_and_compiled
    flips = [(eager.offset[n].int() - compiled.offset[n].int()).abs() for n in eager.offset]
    assert sum(int((f != 0).sum()) for f in flips) <= 0.001 * sum(f.numel() for f in flips)
    assert max(int(f.max()) for f in flips) <= 1
    assert {z.dtype for z in compiled.offset.values()} == {torch.int8}


def test_compiled_buffers_match_eager(eager_and_compiled):
    (eager, _), (compiled, _) = eager_and_compiled
    for name, buffer in eager.buffers.items():
        torch.testing.assert_close(compiled.buffers[name], buffer, rtol=1e-5, atol=1e-6)


def test_dump_includes_inductor_output_code_when_compiled(eager_and_compiled, tmp_path):
    _, (compiled, _) = eager_and_compiled
    names = [p.rsplit("/", 1)[1] for p in compiled.dump(tmp_path)]
    assert "inductor_step.py" in names and "inductor_full_gradient.py" in names
    assert "def call(" in (tmp_path / "inductor_step.py").read_text()


@pytest.mark.parametrize("device", DEVICES)
def test_compiled_rounding_noise_is_bit_identical_to_eager(device):
    """The int32 hash wraps modulo 2**32 in Inductor's vector loops and in their scalar tails alike."""
    from torch._inductor.compile_fx import compile_fx
    from torch.fx.experimental.proxy_tensor import make_fx

    from halp_fx import bit_centering

    like = torch.empty(4099, device=device)  # not a multiple of any vector width: the tail runs scalar code
    key = bit_centering.rounding_keys(123 << 32, 1, device)[0]
    noise = make_fx(lambda like, key: (bit_centering.uniform_noise(like, key),))(like, key)
    assert torch.equal(compile_fx(noise, [like, key])(like, key)[0], bit_centering.uniform_noise(like, key))


@pytest.mark.skipif(not hasattr(torch._inductor.config, "fx_graph_cache"),
                    reason="Inductor has no FX graph cache before torch 2.2")
def test_a_second_compile_of_the_same_step_is_served_from_inductors_cache():
    """A warm first call must not recompile: both graphs are looked up in Inductor's FX graph cache."""
    from torch._dynamo.utils import counters

    from models import mlp

    data = classification_data("mlp", samples=16, batch=8)

    def first_call():
        torch.manual_seed(0)
        step = halp_fx.transform(mlp(), 8, loss_fn=F.cross_entropy, data_loader=data, lr=0.1, mu=0.5)
        return float(step(*data[0]))

    first = first_call()
    hits, aot_hits = counters["inductor"]["fxgraph_cache_hit"], counters["aot_autograd"]["autograd_cache_hit"]
    assert first_call() == first
    assert counters["inductor"]["fxgraph_cache_hit"] - hits == 2   # the step graph and the full-gradient graph
    if hasattr(torch._inductor.config, "unsafe_marked_cacheable_functions"):  # AOTAutograd's cache, torch >= 2.6
        assert counters["aot_autograd"]["autograd_cache_hit"] - aot_hits == 2
