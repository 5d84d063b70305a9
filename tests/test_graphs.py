"""Golden graphs: a tiny linear regression's training step after capture and after every pass.

The later passes change a few lines of a long graph: their goldens pin the lines
each one removed and added.

Update with ``EXPECTTEST_ACCEPT=1 python -m pytest tests/test_graphs.py`` and review the diff.
The code is normalized (clean-up ``x = None`` statements and comments dropped) so
one string holds across torch versions.
"""
import difflib
import re

import expecttest
import torch
import torch.nn as nn
import torch.nn.functional as F

import halp_fx
from halp_fx.training_step import _readable


def changes(before, after):
    """The lines a pass removed (``-``) and added (``+``): what it did, without the lines it kept."""
    diff = difflib.unified_diff(graph_code(before).splitlines(), graph_code(after).splitlines(), lineterm="", n=0)
    return "\n".join(line for line in diff if line[:1] in "+-" and not line.startswith(("+++", "---")))


def graph_code(gm):
    code = _readable(gm.code)
    return "\n".join(re.sub(r"\s+#.*$", "", line) for line in code.splitlines() if line.strip())


class TestGoldenGraphs(expecttest.TestCase):
    def setUp(self):
        torch.manual_seed(0)
        model = nn.Linear(2, 1)
        batch = (torch.randn(4, 2), torch.randn(4, 1))
        step = halp_fx.transform(model, 8, loss_fn=F.mse_loss, lr=0.1, rounding="nearest", compile=False)
        step(*batch)
        self.graphs = step.graphs

    def test_captured_plain_sgd_step(self):
        self.assertExpectedInline(graph_code(self.graphs["captured"]), """\
def forward(self, weight, bias, batch_0, batch_1, lr):
    t = torch.ops.aten.t.default(weight)
    addmm = torch.ops.aten.addmm.default(bias, batch_0, t)
    mse_loss = torch.ops.aten.mse_loss.default(addmm, batch_1)
    view = torch.ops.aten.view.default(mse_loss, [])
    ones_like = torch.ops.aten.ones_like.default(view, pin_memory = False, memory_format = torch.preserve_format)
    view_1 = torch.ops.aten.view.default(ones_like, [])
    mse_loss_backward = torch.ops.aten.mse_loss_backward.default(view_1, addmm, batch_1, 1)
    t_1 = torch.ops.aten.t.default(mse_loss_backward)
    mm = torch.ops.aten.mm.default(t_1, batch_0)
    t_2 = torch.ops.aten.t.default(mm)
    sum_1 = torch.ops.aten.sum.dim_IntList(mse_loss_backward, [0], True)
    view_2 = torch.ops.aten.view.default(sum_1, [1])
    t_3 = torch.ops.aten.t.default(t_2)
    mul = torch.ops.aten.mul.Tensor(lr, t_3)
    sub = torch.ops.aten.sub.Tensor(weight, mul)
    mul_1 = torch.ops.aten.mul.Tensor(lr, view_2)
    sub_1 = torch.ops.aten.sub.Tensor(bias, mul_1)
    return (view, sub, sub_1)""")

    def test_dequantize_weights_turns_each_parameter_into_anchor_offset_and_scale(self):
        self.assertExpectedInline(changes(self.graphs["captured"], self.graphs["dequantize_weights"]), """\
-def forward(self, weight, bias, batch_0, batch_1, lr):
-    t = torch.ops.aten.t.default(weight)
-    addmm = torch.ops.aten.addmm.default(bias, batch_0, t)
+def forward(self, anchor_weight, offset_weight, scale_weight, anchor_bias, offset_bias, scale_bias, batch_0, batch_1, lr):
+    w_weight = halp_fx_bit_centering_dequantize(anchor_weight, offset_weight, scale_weight)
+    w_bias = halp_fx_bit_centering_dequantize(anchor_bias, offset_bias, scale_bias)
+    t = torch.ops.aten.t.default(w_weight)
+    addmm = torch.ops.aten.addmm.default(w_bias, batch_0, t)
-    sub = torch.ops.aten.sub.Tensor(weight, mul)
+    sub = torch.ops.aten.sub.Tensor(w_weight, mul)
-    sub_1 = torch.ops.aten.sub.Tensor(bias, mul_1)
+    sub_1 = torch.ops.aten.sub.Tensor(w_bias, mul_1)""")

    def test_after_svrg_correction(self):
        self.assertExpectedInline(graph_code(self.graphs["svrg_correction"]), """\
def forward(self, anchor_weight, offset_weight, scale_weight, anchor_bias, offset_bias, scale_bias, batch_0, batch_1, lr, full_grad_weight, full_grad_bias):
    w_weight = halp_fx_bit_centering_dequantize(anchor_weight, offset_weight, scale_weight)
    w_bias = halp_fx_bit_centering_dequantize(anchor_bias, offset_bias, scale_bias)
    t = torch.ops.aten.t.default(w_weight)
    addmm = torch.ops.aten.addmm.default(w_bias, batch_0, t)
    mse_loss = torch.ops.aten.mse_loss.default(addmm, batch_1)
    view = torch.ops.aten.view.default(mse_loss, [])
    ones_like = torch.ops.aten.ones_like.default(view, pin_memory = False, memory_format = torch.preserve_format)
    view_1 = torch.ops.aten.view.default(ones_like, [])
    mse_loss_backward = torch.ops.aten.mse_loss_backward.default(view_1, addmm, batch_1, 1)
    t_1 = torch.ops.aten.t.default(mse_loss_backward)
    mm = torch.ops.aten.mm.default(t_1, batch_0)
    t_2 = torch.ops.aten.t.default(mm)
    sum_1 = torch.ops.aten.sum.dim_IntList(mse_loss_backward, [0], True)
    view_2 = torch.ops.aten.view.default(sum_1, [1])
    t_3 = torch.ops.aten.t.default(t_2)
    t_4 = torch.ops.aten.t.default(anchor_weight)
    addmm_1 = torch.ops.aten.addmm.default(anchor_bias, batch_0, t_4)
    mse_loss_1 = torch.ops.aten.mse_loss.default(addmm_1, batch_1)
    view_3 = torch.ops.aten.view.default(mse_loss_1, [])
    ones_like_1 = torch.ops.aten.ones_like.default(view_3, pin_memory = False, memory_format = torch.preserve_format)
    view_4 = torch.ops.aten.view.default(ones_like_1, [])
    mse_loss_backward_1 = torch.ops.aten.mse_loss_backward.default(view_4, addmm_1, batch_1, 1)
    t_5 = torch.ops.aten.t.default(mse_loss_backward_1)
    mm_1 = torch.ops.aten.mm.default(t_5, batch_0)
    t_6 = torch.ops.aten.t.default(mm_1)
    sum_2 = torch.ops.aten.sum.dim_IntList(mse_loss_backward_1, [0], True)
    view_5 = torch.ops.aten.view.default(sum_2, [1])
    t_7 = torch.ops.aten.t.default(t_6)
    corrected_grad_weight = halp_fx_bit_centering_svrg_corrected(t_3, t_7, full_grad_weight)
    mul = torch.ops.aten.mul.Tensor(lr, corrected_grad_weight)
    sub = torch.ops.aten.sub.Tensor(w_weight, mul)
    corrected_grad_bias = halp_fx_bit_centering_svrg_corrected(view_2, view_5, full_grad_bias)
    mul_1 = torch.ops.aten.mul.Tensor(lr, corrected_grad_bias)
    sub_1 = torch.ops.aten.sub.Tensor(w_bias, mul_1)
    return (view, sub, sub_1)""")

    def test_offset_update_replaces_each_sgd_update_by_an_offset_step(self):
        self.assertExpectedInline(changes(self.graphs["svrg_correction"], self.graphs["offset_update"]), """\
-    mul = torch.ops.aten.mul.Tensor(lr, corrected_grad_weight)
-    sub = torch.ops.aten.sub.Tensor(w_weight, mul)
+    new_offset_weight = halp_fx_bit_centering_offset_step(offset_weight, scale_weight, corrected_grad_weight, lr, bits = 8, rounding = 'nearest')
-    mul_1 = torch.ops.aten.mul.Tensor(lr, corrected_grad_bias)
-    sub_1 = torch.ops.aten.sub.Tensor(w_bias, mul_1)
-    return (view, sub, sub_1)
+    new_offset_bias = halp_fx_bit_centering_offset_step(offset_bias, scale_bias, corrected_grad_bias, lr, bits = 8, rounding = 'nearest')
+    return (view, new_offset_weight, new_offset_bias)""")

    def test_nonfinite_guard_adds_one_flag_output(self):
        self.assertExpectedInline(changes(self.graphs["offset_update"], self.graphs["nonfinite_guard"]), """\
-    return (view, new_offset_weight, new_offset_bias)
+    all_finite = halp_fx_passes_nonfinite_guard_pass_all_finite(view, corrected_grad_weight, corrected_grad_bias)
+    return (view, new_offset_weight, new_offset_bias, all_finite)""")

    def test_full_gradient(self):
        self.assertExpectedInline(graph_code(self.graphs["full_gradient"]), """\
def forward(self, weight, bias, batch_0, batch_1):
    t = torch.ops.aten.t.default(weight)
    addmm = torch.ops.aten.addmm.default(bias, batch_0, t)
    mse_loss = torch.ops.aten.mse_loss.default(addmm, batch_1)
    view = torch.ops.aten.view.default(mse_loss, [])
    ones_like = torch.ops.aten.ones_like.default(view, pin_memory = False, memory_format = torch.preserve_format)
    view_1 = torch.ops.aten.view.default(ones_like, [])
    mse_loss_backward = torch.ops.aten.mse_loss_backward.default(view_1, addmm, batch_1, 1)
    t_1 = torch.ops.aten.t.default(mse_loss_backward)
    mm = torch.ops.aten.mm.default(t_1, batch_0)
    t_2 = torch.ops.aten.t.default(mm)
    sum_1 = torch.ops.aten.sum.dim_IntList(mse_loss_backward, [0], True)
    view_2 = torch.ops.aten.view.default(sum_1, [1])
    t_3 = torch.ops.aten.t.default(t_2)
    return (view, t_3, view_2)""")


class TestGoldenStochasticMomentumGraph(expecttest.TestCase):
    def test_offset_update_with_momentum_weight_decay_and_stochastic_rounding(self):
        torch.manual_seed(0)
        step = halp_fx.transform(nn.Linear(2, 1), 4, loss_fn=F.mse_loss, momentum=0.9, weight_decay=1e-4,
                                 compile=False)
        step(torch.randn(4, 2), torch.randn(4, 1))
        update = [line for line in graph_code(step.graphs["offset_update"]).splitlines()
                  if "halp_fx" in line or "rounding_keys" in line or "return" in line]
        self.assertExpectedInline("\n".join(update), """\
def forward(self, anchor_weight, offset_weight, scale_weight, anchor_bias, offset_bias, scale_bias, batch_0, batch_1, lr, full_grad_weight, full_grad_bias, rounding_keys, momentum_weight, momentum_bias):
    w_weight = halp_fx_bit_centering_dequantize(anchor_weight, offset_weight, scale_weight)
    w_bias = halp_fx_bit_centering_dequantize(anchor_bias, offset_bias, scale_bias)
    corrected_grad_weight = halp_fx_bit_centering_svrg_corrected(t_3, t_7, full_grad_weight)
    decayed_grad_weight = halp_fx_bit_centering_with_weight_decay(corrected_grad_weight, w_weight, weight_decay = 0.0001)
    new_momentum_weight = halp_fx_bit_centering_momentum_step(momentum_weight, decayed_grad_weight, momentum = 0.9)
    key_weight = torch.ops.aten.select.int(rounding_keys, 0, 0)
    new_offset_weight = halp_fx_bit_centering_offset_step(offset_weight, scale_weight, new_momentum_weight, lr, bits = 4, rounding = 'stochastic', key = key_weight)
    corrected_grad_bias = halp_fx_bit_centering_svrg_corrected(view_2, view_5, full_grad_bias)
    decayed_grad_bias = halp_fx_bit_centering_with_weight_decay(corrected_grad_bias, w_bias, weight_decay = 0.0001)
    new_momentum_bias = halp_fx_bit_centering_momentum_step(momentum_bias, decayed_grad_bias, momentum = 0.9)
    key_bias = torch.ops.aten.select.int(rounding_keys, 0, 1)
    new_offset_bias = halp_fx_bit_centering_offset_step(offset_bias, scale_bias, new_momentum_bias, lr, bits = 4, rounding = 'stochastic', key = key_bias)
    return (view, new_offset_weight, new_offset_bias, new_momentum_weight, new_momentum_bias)""")
