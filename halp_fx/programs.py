"""Programs: the captured graph and its HALP rewrite for one batch layout, compiled once, cached.

For each batch shape one trace (:func:`halp_fx.capture.capture_gradient`) gives
two programs: the *full gradient* runs the captured graph as it is, the *step*
runs it after :func:`halp_fx.passes.halp_passes`. Each is compiled by Inductor
the first time it is needed. A program's input list is a list of roles fixed
when it is built; a call reads them from ``sources[role][name]``.
"""
import logging
import time
import warnings
from collections import OrderedDict

import torch

from . import passes
from .capture import READS_VALUES, capture_gradient, data_dependent_nodes
from .errors import CaptureError, ShapeWarning
from .inductor import compile_graph
from .roles import OUTPUT_ROLES, ROLE, Role

log = logging.getLogger("halp_fx")

# Inductor's C++ kernels load int8 through a slow partial-vector path on AVX2 (about 1.7 ns per element, more
# than the rest of the update): on a CPU without AVX-512 the compiled step reads the offsets of tensors this large
# widened to float32 by one ATen conversion each (about 7 us per call, so small tensors stay int8), made just
# before the call and freed after. The stored offsets stay integers; the arithmetic is the same to the bit.
WIDEN_OFFSETS_FROM = 4096


def _fast_int8_loads():
    """Whether Inductor's C++ kernels load int8 at full vector speed here: with AVX-512 they do, and the widening
    costs more than it saves (the small MLP's HALP step, AVX512-VNNI EPYC, torch 2.13: 1.18x SVRG's int8 against
    1.26x widened)."""
    capability = getattr(torch.backends.cpu, "get_cpu_capability", lambda: "")()
    return capability.startswith("AVX512")


# Distinct batch shapes after which a step warns that each new one costs a capture (and a compile), and how
# many shapes' programs are kept (least recently used dropped first).
MANY_SHAPES = 4
KEPT_SHAPES = 8


class Program:
    """One graph, compiled or not, with the roles of its inputs and outputs."""

    def __init__(self, gm, label, compile, sources=None, widen=False):
        self.gm, self.label = gm, label
        self.input_roles = [n.meta[ROLE] for n in gm.graph.nodes if n.op == "placeholder"]
        self.output_roles = next(n for n in reversed(gm.graph.nodes) if n.op == "output").meta[OUTPUT_ROLES]
        self.output_code = None
        self._widened = [i for i, (role, _) in enumerate(self.input_roles) if role is Role.OFFSET] if widen else []
        self.fn = gm
        if compile:
            self._widened = [i for i in self._widened
                             if sources[Role.OFFSET][self.input_roles[i][1]].numel() >= WIDEN_OFFSETS_FROM]
            started = time.perf_counter()
            log.info("halp_fx: compiling the %s program with Inductor (seconds to minutes; once per batch shape)",
                     label)
            self.fn, self.output_code = compile_graph(gm, self.inputs(sources))
            log.info("halp_fx: compiled the %s program in %.1f s", label, time.perf_counter() - started)
        else:
            self._widened = []

    def inputs(self, sources):
        values = [sources[role][name] for role, name in self.input_roles]
        for i in self._widened:
            values[i] = values[i].to(torch.float32)
        return values

    def __call__(self, sources):
        """The outputs, in the order of ``output_roles``."""
        return self.fn(*self.inputs(sources))

    def position(self, role):
        return self.output_roles.index(role)

    def positions(self, kind):
        return [i for i, (r, _) in enumerate(self.output_roles) if r is kind]


class ShapeEntry:
    """What one batch layout has: the captured graph, the pass stages, and the two programs once built."""

    def __init__(self, captured, stages, summaries):
        self.captured, self.stages, self.summaries = captured, stages, summaries
        self.step = self.full_gradient = self.constants = None


class Programs:
    """The programs of a step, per batch layout: one trace each, each program compiled on first use."""

    def __init__(self, model, loss_fn, hyper, compile, on_cpu):
        self.model, self.loss_fn, self.hyper = model, loss_fn, hyper
        # Centered int8 products read the offsets as int8 operands: those stay as they are.
        self.compile = compile
        self.widen = (compile and on_cpu and hyper["bits"] is not None and hyper.get("arithmetic", "fp32") == "fp32"
                      and not _fast_int8_loads())
        self.entries = OrderedDict()
        self.first = None  # the first layout's entry, for explain() and graphs
        self.shapes_seen = 0
        self._warned_shapes = False
        self._constants = None  # (entry, anchor version, {name: value}): the anchor constants of the last step

    @staticmethod
    def key(batch):
        return tuple((tuple(t.shape), t.dtype, t.device) for t in batch)

    def entry(self, signature, batch, example):
        key = self.key(batch)
        if key in self.entries:
            self.entries.move_to_end(key)
            return self.entries[key]
        captured = capture_gradient(self.model, self.loss_fn, signature, example)
        if self.compile and data_dependent_nodes(captured):
            raise CaptureError(f"the training step reads a tensor's value into Python ({READS_VALUES}), which "
                               "Inductor cannot compile. Rewrite that part with tensor ops (torch.where, masking), "
                               "or pass compile=False: the same graph then runs eagerly")
        h = self.hyper
        stages, summaries = passes.run_passes(
            captured, passes.halp_passes(h["bits"], h["rounding"], h["momentum"], h["weight_decay"], h["arithmetic"],
                                         h.get("anchor_precision", "fp32"), h.get("group"), h.get("world_size", 1),
                                         force_low_precision=h.get("force_low_precision", False)))
        entry = ShapeEntry(captured, stages, summaries)
        self.entries[key] = entry
        self.shapes_seen += 1
        if self.first is None:
            self.first = entry
        if len(self.entries) > KEPT_SHAPES:
            self.entries.popitem(last=False)
        if self.shapes_seen >= MANY_SHAPES and not self._warned_shapes:
            self._warned_shapes = True
            warnings.warn(f"batches of {self.shapes_seen} different shapes so far: each new shape captures (and with "
                          "compile=True compiles, seconds each) a program of its own. Pad batches to a few sizes or pass "
                          f"drop_last=True to the DataLoader; the {KEPT_SHAPES} most recent shapes stay compiled",
                          ShapeWarning, stacklevel=4)
        return entry

    def step_program(self, entry, sources):
        if entry.step is None:
            entry.step = Program(list(entry.stages.values())[-1], "step", self.compile, sources, self.widen)
        return entry.step

    def anchor_constants(self, entry, sources, version):
        """``{name: value}`` of the step's inputs computed from the anchors alone
        (:mod:`halp_fx.passes.anchor_constants_pass`), computed again only when the anchors changed (``version``)
        or the batch layout did. Run eagerly: once per recenter, a few elementwise ops."""
        graph = getattr(list(entry.stages.values())[-1], "anchor_constants", None)
        if graph is None:
            return {}
        cached = self._constants
        if cached is not None and cached[0] is entry and cached[1] == version:
            return cached[2]
        self._constants = None  # the old values are freed before the new ones are made
        if entry.constants is None:
            entry.constants = Program(graph, "anchor-constants", False)
        values = dict(zip((name for _, name in entry.constants.output_roles), entry.constants(sources)))
        self._constants = (entry, version, values)
        return values

    def full_gradient_program(self, entry, sources):
        if entry.full_gradient is None:
            entry.full_gradient = Program(entry.captured, "full-gradient", self.compile, sources)
        return entry.full_gradient
