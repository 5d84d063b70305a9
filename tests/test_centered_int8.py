"""Centered int8 arithmetic (``transform(..., arithmetic="int8")``): exact where it must be, close where it may not."""
import os
import re

import expecttest
import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

import halp_fx
import halp_fx.passes
from halp_fx import centered_int8
from halp_fx.introspection import readable
from models import classification_data, mlp


@pytest.fixture
def int8_everywhere(monkeypatch):
    """Products in int8 even where they do not pay (this CPU may lack VNNI): the arithmetic under test."""
    monkeypatch.setenv("HALP_FX_INT8_PRODUCTS", "always")


def make_step(arithmetic, **options):
    torch.manual_seed(0)
    data = classification_data("mlp")
    options = {"loss_fn": F.cross_entropy, "data_loader": data, "lr": 0.1, "mu": 0.5, "compile": False,
               "rounding": "nearest", **options}
    return halp_fx.transform(mlp(), 8, arithmetic=arithmetic, **options), data


def test_right_after_a_recenter_an_int8_step_is_the_float32_step_bit_for_bit(int8_everywhere):
    int8, data = make_step("int8", T=1)   # every step starts at a recenter: W = A, every difference is zero
    fp32, _ = make_step("fp32", T=1)
    for x, y in data:
        assert torch.equal(int8(x, y), fp32(x, y))
        assert all(torch.equal(int8.offset[n], fp32.offset[n]) for n in fp32.offset)
    assert "int8: " in int8.explain()


def test_int8_training_follows_float32_halp(int8_everywhere):
    int8, data = make_step("int8", T=6)
    fp32, _ = make_step("fp32", T=6)
    for _ in range(4):
        losses = [(float(int8(x, y)), float(fp32(x, y))) for x, y in data]
    assert all(abs(a - b) < 5e-3 * abs(b) for a, b in losses)


@pytest.mark.parametrize("levels", [centered_int8.FULL_RANGE, centered_int8.REDUCED_RANGE])
def test_a_centered_product_is_within_the_bound_of_its_quantization_steps(levels):
    g = torch.Generator().manual_seed(0)
    a_anchor, b_anchor = torch.randn(16, 32, generator=g), torch.randn(32, 8, generator=g)
    a, b = a_anchor + 0.01 * torch.randn(16, 32, generator=g), b_anchor + 0.01 * torch.randn(32, 8, generator=g)
    centered = centered_int8.centered_mm(a_anchor @ b_anchor, a, a_anchor, b, b_anchor, second_levels=levels)
    exact = a @ b

    def bound(x, y):   # |x y - x^ y^| <= |x| |y - y^| + |x - x^| |y^|, each error at most half a step
        _, sx = centered_int8.quantize(x, 1, centered_int8.FULL_RANGE)
        qy, sy = centered_int8.quantize(y, 0, levels)
        return x.abs() @ (sy / 2).expand_as(y) + (sx / 2).expand_as(x) @ (qy.float() * sy).abs()
    limit = bound(a - a_anchor, b_anchor) + bound(a, b - b_anchor) + 1e-5 * exact.abs() + 1e-6
    assert ((centered - exact).abs() <= limit).all()
    assert (centered - exact).abs().max() < 0.02 * (a @ b - a_anchor @ b_anchor).abs().max()


def test_int8_products_on_this_cpu_equal_the_int32_reference():
    g = torch.Generator().manual_seed(0)
    levels = centered_int8.second_operand_levels(torch.device("cpu"))
    a = torch.randint(-127, 128, (64, 1024), generator=g, dtype=torch.int8)
    b = torch.randint(-levels, levels + 1, (1024, 48), generator=g, dtype=torch.int8)
    assert torch.equal(centered_int8.int8_mm(a, b), a.to(torch.int32) @ b.to(torch.int32))


def test_without_forcing_each_product_runs_in_int8_only_where_it_pays():
    step, data = make_step("int8")
    step(*data[0])
    pays, why = centered_int8.products_pay(torch.device("cpu"))
    text = step.explain()
    if pays:
        assert "int8: " in text
    else:
        assert "0 matrix products at W became" in text and why in text


def test_convolutions_are_named_as_float32(int8_everywhere):
    from models import SmallCNN
    torch.manual_seed(0)
    data = classification_data("cnn")
    step = halp_fx.transform(SmallCNN(), 8, loss_fn=F.cross_entropy, data_loader=data, compile=False,
                             arithmetic="int8")
    step(*data[0])
    assert re.search(r"float32 \(convolution: no int8 kernel here\): convolution", step.explain())


def test_compiled_int8_step_matches_the_same_graph_run_eagerly(int8_everywhere):
    eager, data = make_step("int8", T=3)
    compiled, _ = make_step("int8", T=3, compile=True)
    for x, y in data:
        torch.testing.assert_close(compiled(x, y), eager(x, y), rtol=1e-5, atol=1e-6)
    flips = sum(int((compiled.offset[n] != eager.offset[n]).sum()) for n in eager.offset)
    assert flips <= 2


@pytest.mark.parametrize("arithmetic, bits, words", [("int4", 8, "arithmetic must be one of 'fp32', 'int8'"),
                                                     ("int8", None, "arithmetic='int8' needs a bits value")])
def test_bad_arithmetic_is_refused_naming_the_allowed_values(arithmetic, bits, words):
    with pytest.raises(ValueError, match=re.escape(words)):
        halp_fx.transform(mlp(), bits, arithmetic=arithmetic)


class TestGoldenCenteredInt8(expecttest.TestCase):
    def test_each_product_at_w_reads_the_anchors_product_plus_int8_corrections(self):
        os.environ["HALP_FX_INT8_PRODUCTS"] = "always"
        try:
            torch.manual_seed(0)
            step = halp_fx.transform(nn.Linear(2, 1), 8, loss_fn=F.mse_loss, rounding="nearest", compile=False,
                                     arithmetic="int8")
            step(torch.randn(4, 2), torch.randn(4, 1))
        finally:
            del os.environ["HALP_FX_INT8_PRODUCTS"]
        # The second operand's range depends on the CPU (7 bits without VNNI/AMX): the golden names it L.
        code = re.sub(r"second_levels = \d+", "second_levels = L", readable(step.graphs["centered_int8"].code))
        lines = [line.strip() for line in code.splitlines() if "centered" in line or "mm.default" in line]
        self.assertExpectedInline("\n".join(lines), """\
addmm_1 = torch.ops.aten.addmm.default(anchor_bias, batch_0, t_4)
addmm_int8 = halp_fx_centered_int8_centered_addmm(addmm_1, w_bias, anchor_bias, batch_0, None, t, t_4, second_levels = L)
mm_1 = torch.ops.aten.mm.default(t_5, batch_0)
mm_int8 = halp_fx_centered_int8_centered_mm(mm_1, t_1, t_5, batch_0, None, second_levels = L)""")
        doc = halp_fx.passes.centered_int8_pass.__doc__.split("After::", 1)[1].split("\n\n")[1]
        for line in re.sub(r"second_levels = \d+", "second_levels = L", doc).splitlines():
            assert line.strip() in lines, line
