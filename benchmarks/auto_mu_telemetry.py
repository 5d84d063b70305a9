"""What ``mu="auto"`` reads, recorded at every recenter of an example's HALP runs: the data a rule is built from.

    python benchmarks/auto_mu_telemetry.py char_lstm --out docs/results/auto_mu/telemetry/char_lstm_4bit.csv \
        -- --bits 4 --sweep-mu 0.5,1,2

Runs ``examples/<example>.py``'s ``main`` with the arguments after ``--`` and the
``halp_fx`` logger at DEBUG, and keeps the record each recenter writes
(:func:`halp_fx.auto_mu.log_telemetry`). One CSV row per (run, recenter,
tensor): the epoch's mu, saturation and underflow, the mu the recenter chose,
the new full-gradient norm; plus one row per (run, recenter) for all tensors
together where there are several (``tensor`` = ``all``: fractions weighted by
numel, the norm over all). A run is one HALP training: it begins at its recenter 0. The example writes its
own results (the final accuracy or perplexity of each mu) under its ``--out``,
in the order of the runs.
"""
import argparse
import importlib
import logging
import math
import os
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
for path in (ROOT, os.path.join(ROOT, "examples")):
    if path not in sys.path:
        sys.path.insert(0, path)

from common import write_csv  # noqa: E402

EXAMPLES = ("regression", "digits", "fashion_mnist", "char_lstm")


class TelemetryRows(logging.Handler):
    """Turns each recenter's DEBUG record into CSV rows; a record that ends no epoch (a first recenter) starts a run."""

    def __init__(self):
        super().__init__(logging.DEBUG)
        self.rows, self.run = [], -1

    def emit(self, record):
        telemetry = getattr(record, "halp_telemetry", None)
        if telemetry is None:
            return
        if all(t["saturated"] is None for t in telemetry["tensors"].values()):  # the first recenter: no epoch ended
            self.run += 1
        rows = [{"run": self.run, "recenter": telemetry["recenter"], "tensor": name, **values}
                for name, values in telemetry["tensors"].items()]
        self.rows += rows + ([self._all_tensors(rows)] if len(rows) > 1 else [])

    @staticmethod
    def _all_tensors(rows):
        total = sum(r["numel"] for r in rows)

        def weighted(key):
            if any(r[key] is None for r in rows):
                return None
            return sum(r[key] * r["numel"] for r in rows) / total
        return {"run": rows[0]["run"], "recenter": rows[0]["recenter"], "tensor": "all", "numel": total,
                "bits": rows[0]["bits"], "mu": None, "saturated": weighted("saturated"),
                "underflow": weighted("underflow"), "next_mu": None,
                "full_grad_norm": math.sqrt(sum(r["full_grad_norm"] ** 2 for r in rows))}


def record(example, example_args):
    """Run ``example``'s main with ``example_args``; return its telemetry rows."""
    if example not in EXAMPLES:
        raise ValueError(f"example must be one of {', '.join(EXAMPLES)}; got {example!r}")
    logger = logging.getLogger("halp_fx")
    saved = logger.level, logger.propagate
    handler = TelemetryRows()
    logger.addHandler(handler)
    # The examples print halp_fx's INFO lines through the root logger: the DEBUG records go only to the handler.
    logger.setLevel(logging.DEBUG)
    logger.propagate = False
    try:
        importlib.import_module(example).main(list(example_args))
    finally:
        logger.removeHandler(handler)
        logger.setLevel(saved[0])
        logger.propagate = saved[1]
    return handler.rows


def main(argv=None):
    argv = sys.argv[1:] if argv is None else list(argv)
    ours, example_args = (argv[:argv.index("--")], argv[argv.index("--") + 1:]) if "--" in argv else (argv, [])
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("example", choices=EXAMPLES, help="the example whose HALP runs are recorded")
    parser.add_argument("--out", required=True, help="the CSV to write")
    args = parser.parse_args(ours)
    rows = record(args.example, example_args)
    write_csv(args.out, rows)
    print(f"wrote {args.out}: {len(rows)} rows over {1 + max((r['run'] for r in rows), default=-1)} runs")
    print("the fraction of all offsets at the bounds at each recenter (weighted by numel), per run:")
    for line in saturation_lines(rows):
        print(line)
    return rows


def saturation_lines(rows):
    """One line per run: its bits, the first epoch's mu, and the saturated fraction of all its tensors' offsets
    at each recenter that ended an epoch."""
    several = any(r["tensor"] == "all" for r in rows)
    lines = []
    for run in sorted({r["run"] for r in rows}):
        first = next(r for r in rows if r["run"] == run)
        ended = [r for r in rows if r["run"] == run and (r["tensor"] == "all") == several and r["saturated"] is not None]
        lines.append(f"run {run}: {first['bits']} bits, first mu {first['next_mu']}: "
                     + " ".join(f"{r['saturated']:.3f}" for r in ended))
    return lines


if __name__ == "__main__":
    main()
