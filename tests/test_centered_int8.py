"""Centered int8 arithmetic (``transform(..., arithmetic="int8")``): exact where it must be, close where it may not."""
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
    losses = [(float(int8(x, y)), float(fp32(x, y))) for _ in range(4) for x, y in data]
    # Every step of the four epochs, not just the last (measured: within 0.31%), and the weights
    # they end at (within 1.2%): the quantized products' error does not grow into a different run.
    assert all(abs(a - b) < 5e-3 * abs(b) for a, b in losses)
    assert losses[-1][1] < 0.8 * losses[0][1]   # and the run trained
    for name, weight in fp32.weights().items():
        assert (int8.weights()[name] - weight).norm() < 2.5e-2 * weight.norm(), name



@pytest.mark.parametrize("levels", [centered_int8.FULL_RANGE, centered_int8.REDUCED_RANGE])
@pytest.mark.parametrize("dim", [0, 1])
def test_a_quantization_scale_is_the_largest_magnitude_over_the_levels_to_the_bit(dim, levels):
    g = torch.Generator().manual_seed(1)
    # Magnitudes over 60 binary orders, a zero slice and a NaN: the scale is computed inside the reduction.
    x = torch.randn(64, 48, generator=g) * torch.exp2(torch.randint(-30, 30, (64, 48), generator=g).float())
    x.select(1 - dim, 3).zero_()   # the slice the scale at index 3 is of
    x[5, 7] = float("nan")
    q, scale = centered_int8.quantize(x, dim, levels)
    largest = x.abs().amax(dim=dim, keepdim=True)
    expected = torch.where(largest > 0, largest / levels, torch.ones_like(largest))
    assert torch.equal(scale, expected)
    assert scale.flatten()[3] == 1 and (q.select(1 - dim, 3) == 0).all()


@pytest.mark.parametrize("levels", [centered_int8.FULL_RANGE, centered_int8.REDUCED_RANGE])
def test_a_centered_product_is_within_the_bound_of_its_quantization_steps(levels):
    g = torch.Generator().manual_seed(0)
    a_anchor, b_anchor = torch.randn(16, 32, generator=g), torch.randn(32, 8, generator=g)
    a = a_anchor + 0.01 * torch.randn(16, 32, generator=g)
    offset, scale = torch.randint(-128, 128, (32, 8), generator=g, dtype=torch.int8), torch.tensor(1e-4)
    b = b_anchor + scale * offset.float()   # a weight: W = A + d * Z
    qa, sa = centered_int8.quantize_rows(a - a_anchor)
    qb, sb = centered_int8.quantize_columns(b_anchor, levels=levels)
    qw, sw = centered_int8.quantize_rows(a)
    exact_within = centered_int8.second_operand_levels(torch.device("cpu"))   # this CPU's int8 kernel: 127 or 63
    centered = (a_anchor @ b_anchor + centered_int8.int8_term(qa, sa, qb, sb, wide_second=levels > exact_within)
                + centered_int8.int8_term(qw, sw, offset, scale, wide_second=exact_within < 127))
    exact = a @ b
    # |x y - x^ y^| <= |x| |y - y^| + |x - x^| |y^|, each error at most half a step; d * Z enters exactly.
    limit = ((a - a_anchor).abs() @ (sb / 2).expand_as(b_anchor) + (sa / 2).expand_as(a) @ (qb.float() * sb).abs()
             + (sw / 2).expand_as(a) @ (scale * offset.float()).abs() + 1e-5 * exact.abs() + 1e-6)
    assert ((centered - exact).abs() <= limit).all()
    assert (centered - exact).abs().max() < 0.02 * (a @ b - a_anchor @ b_anchor).abs().max()


def test_a_weights_difference_enters_as_its_offset_and_scale_not_quantized(int8_everywhere):
    step, data = make_step("int8", T=3)
    step(*data[0])
    code = step.graphs["centered_int8"].code
    assert re.search(r"int8_term\(q_\w+, s_\w+, t_offset_\w+, scale_\w+", code)
    assert "w_p0_weight" not in code and "w_p2_weight" not in code   # W = A + d*Z is not even computed


def three_layer_mlp():
    return nn.Sequential(nn.Linear(8, 16), nn.ReLU(), nn.Linear(16, 16), nn.ReLU(), nn.Linear(16, 3))


def float32_products(gm):
    return [n.name for n in gm.graph.nodes if n.op == "call_function"
            and n.target in (torch.ops.aten.mm.default, torch.ops.aten.addmm.default)]


@pytest.mark.parametrize("arithmetic, products", [("fp32", 16), ("int8", 5)])
def test_the_anchors_weight_gradient_products_are_gone(int8_everywhere, arithmetic, products):
    """3 layers: forward 3 + grad-input 2 + weight-gradient 3 products per pass. With centered products the pass
    at W has none in float32, and the anchor's 3 weight-gradient products are dead: 5 remain."""
    torch.manual_seed(0)
    data = classification_data("mlp")
    step = halp_fx.transform(three_layer_mlp(), 8, loss_fn=F.cross_entropy, data_loader=data, compile=False,
                             arithmetic=arithmetic)
    step(*data[0])
    assert len(float32_products(list(step.graphs.values())[-1])) == products
    if arithmetic == "int8":
        assert "3 anchor products they no longer need were removed" in step.explain()


def test_a_weights_corrected_gradient_is_the_full_gradient_plus_the_centered_difference(int8_everywhere):
    step, data = make_step("int8")
    step(*data[0])
    code = step.graphs["anchor_difference"].code
    assert re.search(r"corrected_grad_p0_weight = halp_fx_bit_centering_corrected_by_difference\(", code)
    assert "corrected_grad_p0_bias = halp_fx_bit_centering_svrg_corrected(" in code   # a sum through a ReLU mask


def test_matrix_work_is_counted_by_pass_and_precision(int8_everywhere):
    from halp_fx.matrix_work import matrix_work
    torch.manual_seed(0)
    data = classification_data("mlp")
    x = data[0][0]
    steps = {arithmetic: halp_fx.transform(three_layer_mlp(), 8, loss_fn=F.cross_entropy, compile=False,
                                           arithmetic=arithmetic) for arithmetic in ("fp32", "int8")}
    for step in steps.values():
        step(*data[0])
    n = x.shape[0]
    forward = n * (8 * 16 + 16 * 16 + 16 * 3)
    sgd = forward + n * (16 * 3 + 16 * 16) + forward   # forward, grad inputs of layers 2 and 3, weight gradients
    fp32 = matrix_work(list(steps["fp32"].graphs.values())[-1])
    assert fp32 == {("anchor", "float32"): sgd, ("W", "float32"): sgd}
    assert matrix_work(steps["fp32"].graphs["captured"]) == {("W", "float32"): sgd}
    int8 = matrix_work(list(steps["int8"].graphs.values())[-1])
    assert int8[("anchor", "float32")] == forward + n * (16 * 3 + 16 * 16)
    assert set(int8) == {("anchor", "float32"), ("W", "int8")} and "low precision" in steps["int8"].explain()


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
    assert re.search(r"float32 \(convolution: int8 does not pay for a convolution "
                     r"\(benchmarks/int8_convolution.py\)\): convolution", step.explain())


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
        with pytest.MonkeyPatch.context() as patch:
            patch.setenv("HALP_FX_INT8_PRODUCTS", "always")
            torch.manual_seed(0)
            step = halp_fx.transform(nn.Linear(2, 1), 8, loss_fn=F.mse_loss, rounding="nearest", compile=False,
                                     arithmetic="int8")
            step(torch.randn(4, 2), torch.randn(4, 1))
        # The second operand's range depends on the CPU (7 bits without VNNI/AMX): the golden names it L; there,
        # offsets in all 8 bits are summed exactly (wide_second), which the golden leaves out.
        code = re.sub(r"levels = \d+", "levels = L", readable(step.graphs["centered_int8"].code))
        code = code.replace(", wide_second = True", "")
        lines = [line.strip() for line in code.splitlines()
                 if "centered" in line or "mm.default" in line or "_int8 =" in line or "_difference =" in line]
        self.assertExpectedInline("\n".join(lines), """\
quantize_batch_1 = halp_fx_centered_int8_quantize_rows(batch_0)
int8_term_1 = halp_fx_centered_int8_int8_term(q_batch_1, s_batch_1, t_offset_weight, scale_weight)
offset_value = halp_fx_centered_int8_offset_value(offset_bias, scale_bias)
addmm_difference = torch.ops.aten.add.Tensor(int8_term_1, offset_value)
addmm_1 = torch.ops.aten.addmm.default(anchor_bias, batch_0, t_4)
addmm_int8 = torch.ops.aten.add.Tensor(addmm_1, addmm_difference)
quantize_sub = halp_fx_centered_int8_quantize_rows(sub)
quantize_batch_0 = halp_fx_centered_int8_quantize_columns(batch_0, levels = L)
int8_term = halp_fx_centered_int8_int8_term(q_sub, s_sub, q_batch_0, s_batch_0)
mm_1 = torch.ops.aten.mm.default(t_5, batch_0)
mm_int8 = torch.ops.aten.add.Tensor(mm_1, int8_term)""")
        doc = halp_fx.passes.centered_int8_pass.__doc__.split("After::", 1)[1].split("\n\n")[1]
        for line in re.sub(r"levels = \d+", "levels = L", doc).splitlines():
            assert line.strip() in lines, line


def test_on_a_cpu_where_nothing_pays_the_int8_step_is_the_float32_step(monkeypatch):
    """An AVX2-only CPU: every product falls back, and the final graph is float32 HALP's, op for op, so the
    fallback costs nothing (the bf16 anchor falls back with it)."""
    from halp_fx import bf16_anchor
    monkeypatch.delenv("HALP_FX_INT8_PRODUCTS", raising=False)
    monkeypatch.setattr(centered_int8, "cpu_flags", lambda: frozenset({"avx2", "fma"}))
    fp32, data = make_step("fp32", T=3)
    int8, _ = make_step("int8", T=3, anchor_precision="bf16")
    fp32(*data[0])
    int8(*data[0])
    assert list(int8.graphs.values())[-1].code == list(fp32.graphs.values())[-1].code
    for x, y in data:
        assert torch.equal(int8(x, y), fp32(x, y))
    assert "0 matrix products at W became" in int8.explain() and "no AVX512-VNNI/AMX" in int8.explain()


def wide_step(route, monkeypatch, compile=False):
    """An MLP whose middle weight's gradient (512 x batch 32 x 512) is shaped for the bf16 kernel; ``route``:
    whether that kernel is used."""
    if not route:
        monkeypatch.setattr(centered_int8, "bf16_kernel_pays", lambda *args, **kwargs: False)
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(8, 512), nn.ReLU(), nn.Linear(512, 512), nn.ReLU(), nn.Linear(512, 3))
    g = torch.Generator().manual_seed(1)
    data = [(torch.randn(32, 8, generator=g), torch.randint(0, 3, (32,), generator=g)) for _ in range(3)]
    step = halp_fx.transform(model, 8, loss_fn=F.cross_entropy, data_loader=data, lr=0.1, mu=0.5, compile=compile,
                             arithmetic="int8")
    return step, data


@pytest.mark.skipif(not centered_int8.INTEGER_MM_VIA_BF16, reason="needs torch.backends.mkldnn.matmul.fp32_precision")
def test_a_weight_gradient_through_the_bf16_kernel_is_the_int8_result_bit_for_bit(int8_everywhere, monkeypatch):
    via, data = wide_step(True, monkeypatch)
    losses = [via(*batch) for batch in data * 2]
    with monkeypatch.context() as patch:
        int8, _ = wide_step(False, patch)
        assert all(torch.equal(loss, int8(*batch)) for loss, batch in zip(losses, data * 2))
        assert "bf16 kernel" not in int8.explain()
    assert all(torch.equal(via.offset[n], int8.offset[n]) for n in int8.offset)
    assert re.search(r"through a bf16 kernel with float32 sums \(exact.*\): int8_term", via.explain())
    assert torch.backends.mkldnn.matmul.fp32_precision == "none"   # the user's setting is restored


@pytest.mark.skipif(not centered_int8.INTEGER_MM_VIA_BF16, reason="needs torch.backends.mkldnn.matmul.fp32_precision")
def test_the_bf16_kernel_gives_the_int32_sum_up_to_its_bound_and_is_not_used_beyond_it():
    g = torch.Generator().manual_seed(0)
    k = centered_int8.BF16_KERNEL_MAX_K
    a = torch.full((64, k), -128, dtype=torch.int8)
    b = torch.full((k, 64), -128, dtype=torch.int8)   # the largest sum there is: k * 2**14 = 2**24
    b[:, 1:] = torch.randint(-128, 128, (k, 63), generator=g, dtype=torch.int8)
    assert torch.equal(torch.ops.halp_fx.integer_mm_via_bf16(a, b).to(torch.int32), a.int() @ b.int())
    cpu = torch.device("cpu")
    assert centered_int8.bf16_kernel_pays(4 * k, k, 4 * k, cpu, forced=True)
    assert not centered_int8.bf16_kernel_pays(8 * k, k + 1, 8 * k, cpu, forced=True)
    assert not centered_int8.bf16_kernel_pays(128, 1024, 1024, cpu, forced=True)   # a forward product's shape
    assert centered_int8.bf16_kernel_pays(1024, 128, 1024, cpu) == ("amx_bf16" in centered_int8.usable_cpu_flags())


def test_the_bf16_kernel_can_be_turned_off_for_a_process_with_threads_of_its_own(monkeypatch):
    """Its precision switch is process-wide (a float32 product on another thread meanwhile would run in bf16)."""
    monkeypatch.setenv("HALP_FX_BF16_KERNEL", "off")
    assert not centered_int8.bf16_kernel_pays(1024, 128, 1024, torch.device("cpu"), forced=True)


@pytest.mark.skipif(not centered_int8.INTEGER_MM_VIA_BF16, reason="needs torch.backends.mkldnn.matmul.fp32_precision")
def test_the_bf16_kernel_compiles_and_matches_the_eager_step(int8_everywhere, monkeypatch):
    eager, data = wide_step(True, monkeypatch)
    compiled, _ = wide_step(True, monkeypatch, compile=True)
    for batch in data * 2:
        torch.testing.assert_close(compiled(*batch), eager(*batch), rtol=1e-5, atol=1e-6)
    flips = sum(int((compiled.offset[n] != eager.offset[n]).sum()) for n in eager.offset)
    assert flips <= 0.001 * sum(z.numel() for z in eager.offset.values())


@pytest.mark.parametrize("cap, int8, bf16, levels", [("AVX2", False, False, 63), ("avx512_core_vnni", True, False, 127),
                                                     ("AVX512_CORE_BF16", True, True, 127),
                                                     ("AVX512_CORE_AMX", True, True, 127), ("", True, True, 127)])
def test_a_cap_on_onednns_isa_is_honoured_like_the_cpu_it_emulates(monkeypatch, cap, int8, bf16, levels):
    """ONEDNN_MAX_CPU_ISA=AVX2 makes oneDNN's int8 products inexact beyond 7 bits on any CPU: the choices follow it."""
    from halp_fx import bf16_anchor
    monkeypatch.setattr(centered_int8, "cpu_flags", lambda: frozenset({"avx2", "avx512_vnni", "avx_vnni", "amx_int8",
                                                                      "avx512_bf16", "amx_bf16"}))
    monkeypatch.setenv("ONEDNN_MAX_CPU_ISA", cap)
    cpu = torch.device("cpu")
    assert centered_int8.products_pay(cpu)[0] == (int8 and centered_int8._cpu_int_mm_available())
    assert centered_int8.second_operand_levels(cpu) == levels
    assert bf16_anchor.products_pay(cpu)[0] == bf16
    assert centered_int8.bf16_kernel_pays(1024, 128, 1024, cpu) == (centered_int8.INTEGER_MM_VIA_BF16 and
                                                                    cap in ("AVX512_CORE_AMX", ""))
