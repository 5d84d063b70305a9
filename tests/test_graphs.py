"""Golden graphs: a tiny linear regression's training step after capture and after every pass.

The later passes change a few lines of a long graph: their goldens pin the lines
each one removed and added.

Update with ``EXPECTTEST_ACCEPT=1 python -m pytest tests/test_graphs.py`` and review the diff.
The code is normalized (clean-up ``x = None`` statements and comments dropped) so
one string holds across torch versions.
"""
import difflib
import inspect
import re

import expecttest
import torch
import torch.nn as nn
import torch.nn.functional as F

import halp_fx
import halp_fx.passes
from halp_fx.introspection import readable


def changes(before, after):
    """The lines a pass removed (``-``) and added (``+``): what it did, without the lines it kept."""
    diff = difflib.unified_diff(graph_code(before).splitlines(), graph_code(after).splitlines(), lineterm="", n=0)
    return "\n".join(line for line in diff if line[:1] in "+-" and not line.startswith(("+++", "---")))


def graph_code(gm):
    code = readable(gm.code)
    return "\n".join(re.sub(r"\s+#.*$", "", line) for line in code.splitlines() if line.strip())


class TestGoldenGraphs(expecttest.TestCase):
    def setUp(self):
        torch.manual_seed(0)
        model = nn.Linear(2, 1)
        batch = (torch.randn(4, 2), torch.randn(4, 1))
        step = halp_fx.transform(model, 8, loss_fn=F.mse_loss, lr=0.1, rounding="nearest", compile=False)
        step(*batch)
        self.graphs = step.graphs

    def test_captured_gradient_graph(self):
        self.assertExpectedInline(graph_code(self.graphs["captured"]), """\
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

    def test_dequantize_weights_turns_each_parameter_into_anchor_offset_and_scale(self):
        self.assertExpectedInline(changes(self.graphs["captured"], self.graphs["dequantize_weights"]), """\
-def forward(self, weight, bias, batch_0, batch_1):
-    t = torch.ops.aten.t.default(weight)
-    addmm = torch.ops.aten.addmm.default(bias, batch_0, t)
+def forward(self, anchor_weight, offset_weight, scale_weight, anchor_bias, offset_bias, scale_bias, batch_0, batch_1):
+    w_weight = halp_fx_bit_centering_dequantize(anchor_weight, offset_weight, scale_weight)
+    w_bias = halp_fx_bit_centering_dequantize(anchor_bias, offset_bias, scale_bias)
+    t = torch.ops.aten.t.default(w_weight)
+    addmm = torch.ops.aten.addmm.default(w_bias, batch_0, t)""")

    def test_after_svrg_correction(self):
        self.assertExpectedInline(graph_code(self.graphs["svrg_correction"]), """\
def forward(self, anchor_weight, offset_weight, scale_weight, anchor_bias, offset_bias, scale_bias, batch_0, batch_1, full_grad_weight, full_grad_bias):
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
    corrected_grad_bias = halp_fx_bit_centering_svrg_corrected(view_2, view_5, full_grad_bias)
    return (view, corrected_grad_weight, corrected_grad_bias)""")

    def test_offset_update_replaces_each_corrected_gradient_by_the_new_offset(self):
        self.assertExpectedInline(changes(self.graphs["svrg_correction"], self.graphs["offset_update"]), """\
-def forward(self, anchor_weight, offset_weight, scale_weight, anchor_bias, offset_bias, scale_bias, batch_0, batch_1, full_grad_weight, full_grad_bias):
+def forward(self, anchor_weight, offset_weight, scale_weight, anchor_bias, offset_bias, scale_bias, batch_0, batch_1, full_grad_weight, full_grad_bias, lr, underflow_weight, underflow_bias):
-    return (view, corrected_grad_weight, corrected_grad_bias)
+    update_weight = halp_fx_bit_centering_offset_update(offset_weight, scale_weight, None, corrected_grad_weight, None, lr, weight_decay = 0.0, momentum = 0.0, bits = 8, rounding = 'nearest')
+    new_offset_weight = update_weight[0]
+    step_underflow_weight = update_weight[3]
+    new_underflow_weight = torch.ops.aten.add.Tensor(underflow_weight, step_underflow_weight)
+    update_bias = halp_fx_bit_centering_offset_update(offset_bias, scale_bias, None, corrected_grad_bias, None, lr, weight_decay = 0.0, momentum = 0.0, bits = 8, rounding = 'nearest')
+    new_offset_bias = update_bias[0]
+    step_underflow_bias = update_bias[3]
+    new_underflow_bias = torch.ops.aten.add.Tensor(underflow_bias, step_underflow_bias)
+    return (view, new_offset_weight, new_offset_bias, new_underflow_weight, new_underflow_bias)""")

    def test_nonfinite_guard_adds_one_flag_output(self):
        self.assertExpectedInline(changes(self.graphs["offset_update"], self.graphs["nonfinite_guard"]), """\
-    return (view, new_offset_weight, new_offset_bias, new_underflow_weight, new_underflow_bias)
+    moved_offset_weight = update_weight[2]
+    moved_offset_bias = update_bias[2]
+    all_finite = halp_fx_bit_centering_all_finite(view, moved_offset_weight, moved_offset_bias, new_underflow_weight, new_underflow_bias)
+    return (view, new_offset_weight, new_offset_bias, new_underflow_weight, new_underflow_bias, all_finite)""")

    def test_each_pass_docstring_shows_lines_of_its_real_after_graph(self):
        for name, graph_pass in zip(list(self.graphs)[1:], halp_fx.passes.halp_passes(8, "nearest", 0.0, 0.0)):
            code = graph_code(self.graphs[name])
            after = inspect.getmodule(graph_pass).__doc__.split("After", 1)[1].split("::", 1)[1]
            shown = [line.strip() for line in after.split("\n\n")[1].splitlines()
                     if line.strip() and "..." not in line and not line.strip().startswith("#")]
            shown = [re.sub(r"\s+#.*$", "", line) for line in shown]
            assert shown, name
            for line in shown:
                assert line in code, f"{name}'s docstring shows {line!r}, which its graph does not have"


class TestGoldenStochasticMomentumGraph(expecttest.TestCase):
    def test_offset_update_with_momentum_weight_decay_and_stochastic_rounding(self):
        torch.manual_seed(0)
        step = halp_fx.transform(nn.Linear(2, 1), 4, loss_fn=F.mse_loss, momentum=0.9, weight_decay=1e-4,
                                 compile=False)
        step(torch.randn(4, 2), torch.randn(4, 1))
        update = [line for line in graph_code(step.graphs["offset_update"]).splitlines()
                  if "halp_fx" in line or "rounding_keys" in line or "update_" in line or "return" in line]
        self.assertExpectedInline("\n".join(update), """\
def forward(self, anchor_weight, offset_weight, scale_weight, anchor_bias, offset_bias, scale_bias, batch_0, batch_1, full_grad_weight, full_grad_bias, lr, rounding_keys, momentum_weight, underflow_weight, momentum_bias, underflow_bias):
    w_weight = halp_fx_bit_centering_dequantize(anchor_weight, offset_weight, scale_weight)
    w_bias = halp_fx_bit_centering_dequantize(anchor_bias, offset_bias, scale_bias)
    corrected_grad_weight = halp_fx_bit_centering_svrg_corrected(t_3, t_7, full_grad_weight)
    corrected_grad_bias = halp_fx_bit_centering_svrg_corrected(view_2, view_5, full_grad_bias)
    key_weight = torch.ops.aten.select.int(rounding_keys, 0, 0)
    update_weight = halp_fx_bit_centering_offset_update(offset_weight, scale_weight, w_weight, corrected_grad_weight, momentum_weight, lr, weight_decay = 0.0001, momentum = 0.9, bits = 4, rounding = 'stochastic', key = key_weight)
    new_offset_weight = update_weight[0]
    step_underflow_weight = update_weight[3]
    new_momentum_weight = update_weight[1]
    key_bias = torch.ops.aten.select.int(rounding_keys, 0, 1)
    update_bias = halp_fx_bit_centering_offset_update(offset_bias, scale_bias, w_bias, corrected_grad_bias, momentum_bias, lr, weight_decay = 0.0001, momentum = 0.9, bits = 4, rounding = 'stochastic', key = key_bias)
    new_offset_bias = update_bias[0]
    step_underflow_bias = update_bias[3]
    new_momentum_bias = update_bias[1]
    return (view, new_offset_weight, new_offset_bias, new_underflow_weight, new_momentum_weight, new_underflow_bias, new_momentum_bias)""")
