"""Reading a step's graphs: ``explain()``, ``dump()`` and ``graphs``, over the programs of its first batch layout."""
import os
from collections import OrderedDict

from . import matrix_work


def graphs(programs):
    """Stage name -> GraphModule: the captured gradient graph, then one stage per pass."""
    if programs.first is None:
        raise RuntimeError("no graph yet: the step is captured on its first call, step(*batch)")
    return OrderedDict(programs.first.stages)


def explain(step):
    stages = graphs(step.programs)
    entry = step.programs.first
    counts = {name: sum(1 for n in gm.graph.nodes if n.op == "call_function") for name, gm in stages.items()}
    mode = "full-precision SVRG (bits=None)" if step.bits is None else f"{step.bits}-bit HALP"
    lines = [f"halp_fx training step: {mode}, lr={step.lr}, T={step.T}, mu={step.mu}, "
             f"rounding={step.rounding!r}, arithmetic={step.arithmetic!r}"
             + (f", anchor_precision={step.anchor_precision!r}" if step.arithmetic == "int8" else "")
             + f", compile={step.compile}",
             f"  captured: (params, frozen, buffers, batch) -> (loss, grads, new buffers), {counts['captured']} aten ops;"
             " the recenter runs it as it is for the full gradient (buffer outputs ignored)"]
    for i, (name, summary) in enumerate(entry.summaries.items(), 1):
        lines.append(f"  {i}. {name}: {summary} ({counts[name]} ops)")
    final = list(stages)[-1]
    lines.append(f"  matrix work of the step: {matrix_work.describe(matrix_work.matrix_work(stages[final]))}")
    lines.append(f"  matrix work of plain SGD on the same batch: "
                 f"{matrix_work.describe(matrix_work.matrix_work(stages['captured']))}")
    lines += ["", f"final step graph ({final}):", readable(stages[final].code)]
    return "\n".join(lines)


def dump(step, directory):
    os.makedirs(directory, exist_ok=True)
    written = []
    for i, (name, gm) in enumerate(graphs(step.programs).items()):
        written.append(os.path.join(directory, f"{i:02d}_{name}.py"))
        with open(written[-1], "w") as f:
            f.write(readable(gm.code) + "\n")
    entry = step.programs.first
    for label, program in (("step", entry.step), ("full_gradient", entry.full_gradient)):
        if program is not None and program.output_code:
            written.append(os.path.join(directory, f"inductor_{label}.py"))
            with open(written[-1], "w") as f:
                f.write(program.output_code)
    return written


def readable(code):
    """Graph code without the ``x = None`` clean-up statements that only free memory."""
    lines = []
    for line in code.strip().splitlines():
        kept = [s for s in line.split(";") if not _is_cleanup(s)]
        if kept and "".join(kept).strip():
            lines.append(";".join(kept).rstrip())
    return "\n".join(lines)


def _is_cleanup(statement):
    statement = statement.strip()
    return statement.endswith("= None") and all(part.strip().isidentifier() for part in statement[:-len("= None")].split("="))
