"""The benchmark command runs and writes a complete report; no timing is asserted.

It runs once, on the smallest configuration, with ``--no-inductor`` so that the
graphs run eagerly: this checks the harness (every method, the interleaved
rounds, the warm subprocess, the JSON), not the speed, in well under a minute.
"""
import csv
import json
import logging
import os
import platform
import statistics
import subprocess
import sys

import pytest
import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
METHODS = ["eager_sgd", "compiled_sgd", "compiled_sgd_bf16_autocast", "torchhalp_eager", "compiled_svrg",
           "compiled_halp8", "compiled_halp4", "compiled_halp8_int8", "compiled_halp8_int8_bf16", "optim_halp"]
HALP_LIKE = ["torchhalp_eager", "compiled_svrg", "compiled_halp8", "compiled_halp4", "compiled_halp8_int8", "optim_halp"]
IN_SUBPROCESS = ["torchhalp_eager", "compiled_halp8"]  # each subprocess costs a torch import


@pytest.fixture(scope="module")
def report(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("benchmarks")
    out = tmp / "report.json"
    command = [sys.executable, os.path.join(ROOT, "benchmarks", "run.py"), "--quick", "--no-inductor",
               "--threads", "1", "--methods", *METHODS, "--first-call-methods", *IN_SUBPROCESS, "--cache-dir", str(tmp / "cache"), "--json", str(out)]
    done = subprocess.run(command, capture_output=True, text=True, timeout=180, cwd=ROOT)
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-4000:]
    return json.loads(out.read_text()), done.stdout


def ran(report):
    return [m for m in METHODS if m not in report["skipped"]]


def test_report_records_the_machine(report):
    meta = report[0]["meta"]
    for field in ("torch", "cpu", "threads", "device", "python", "inductor", "load_average_at_start", "duration_s"):
        assert field in meta
    assert meta["threads"] == 1 and meta["device"] == "cpu" and meta["inductor"] is False


def test_quick_runs_one_model_at_one_batch_size(report):
    (group,) = report[0]["results"]
    assert (group["model"], group["batch_size"]) == ("logreg", 8)
    assert group["trainable_parameters"] == 64 * 10 + 10


def test_every_method_ran_or_says_why_not(report):
    report = report[0]
    assert set(ran(report)) >= set(METHODS) - {"optim_halp"}
    methods = report["results"][0]["methods"]
    for name in ran(report):
        assert "error" not in methods[name], methods[name]["error"]


def test_int8_method_runs_or_says_why(report):
    """compiled_halp8_int8 is in the report: timed, with the int8 pass's account of every product (int8 or float32,
    and why), or failed with the reason recorded."""
    report, stdout = report
    m = report["results"][0]["methods"]["compiled_halp8_int8"]
    assert "compiled_halp8_int8" in stdout
    if "error" in m:
        assert m["error"].strip()
        return
    assert m["inner_step_s"] > 0 and m["centered_int8"].strip()
    first_line = m["centered_int8"].splitlines()[0]
    assert "matrix products at W" in first_line
    if not first_line.endswith("; 0 stayed float32"):
        assert "float32 (" in m["centered_int8"], "products that stayed float32 must say why"
    assert report["results"][0]["ratios"]["halp8_int8_over_halp8_inner"] > 0
    assert {"cpu_flags", "int8_products_env"} <= set(report["meta"])


def multiply_adds(line):
    """The total of a matrix-work line, ``... (1.23 M in all, ...)``, in multiply-adds."""
    amount, *unit = line.split("(", 1)[1].split(" in all")[0].split()
    return float(amount) * {"k": 1e3, "M": 1e6, "G": 1e9}[unit[0]] if unit else float(amount)


def test_matrix_work_is_reported_by_precision_for_every_graph_method(report):
    """SVRG does the SGD step's products twice (at W and at the anchor), all float32; bf16 autocast SGD does the
    same products as SGD on bf16 operands; the int8 HALP step's line says what share is low precision."""
    methods = report[0]["results"][0]["methods"]
    sgd, svrg = methods["compiled_sgd"]["matrix_work"], methods["compiled_svrg"]["matrix_work"]
    assert sgd.startswith("W: ") and "float32" in sgd and "0% low precision" in sgd
    assert "anchor: " in svrg and "bf16" not in svrg and "int8" not in svrg
    assert multiply_adds(svrg) == pytest.approx(2 * multiply_adds(sgd), rel=0.01)
    autocast = methods["compiled_sgd_bf16_autocast"]["matrix_work"]
    assert "bf16" in autocast and multiply_adds(autocast) == pytest.approx(multiply_adds(sgd), rel=0.01)
    for name in ("compiled_halp8_int8", "compiled_halp8_int8_bf16"):
        assert "% low precision" in methods[name]["matrix_work"]
    assert "halp8_int8_bf16_over_bf16_autocast_sgd_inner" in report[0]["results"][0]["ratios"]


def test_markdown_table_names_the_cpu_flags(report, tmp_path):
    out = tmp_path / "report.json"
    out.write_text(json.dumps(report[0]))
    done = subprocess.run([sys.executable, os.path.join(ROOT, "benchmarks", "run.py"), "--markdown-from", str(out)],
                          capture_output=True, text=True, timeout=60, cwd=ROOT)
    assert done.returncode == 0, done.stderr[-2000:]
    assert "| compiled_halp8_int8 |" in done.stdout and "CPU flags:" in done.stdout
    assert "compiled_halp8_int8_bf16, " in done.stdout and "matrix work" in done.stdout


def test_markdown_says_what_was_corrected_in_a_saved_run():
    saved = os.path.join(ROOT, "docs", "results", "benchmarks", "low_precision_mlp1024.json")
    done = subprocess.run([sys.executable, os.path.join(ROOT, "benchmarks", "run.py"), "--markdown-from", saved],
                          capture_output=True, text=True, timeout=60, cwd=ROOT)
    assert done.returncode == 0, done.stderr[-2000:]
    assert "Corrected after the run: the compiled fwd+bwd reference pass" in done.stdout
    assert "compiled fwd+bwd pass" not in done.stdout.split("Corrected after the run")[0]


def test_every_method_has_positive_timings(report):
    methods = report[0]["results"][0]["methods"]
    for name in ran(report[0]):
        m = methods[name]
        for figure in ("inner_step_s", "epoch_s", "first_call_in_process_s"):
            assert m[figure] > 0, (name, figure)
        assert len(m["inner_step_s_rounds"]) == len(m["epoch_s_rounds"]) == 2
        assert m["inner_step_spread"] >= 1


def test_halp_methods_time_their_full_gradient_pass(report):
    group = report[0]["results"][0]
    assert group["compiled_fwd_bwd_pass_s"] > 0
    for name in HALP_LIKE:
        if name in ran(report[0]):
            assert group["methods"][name]["full_grad_pass_s"] > 0, name


def test_the_full_gradient_pass_is_compared_with_the_float32_gradient_graph():
    """Only compiled SGD's float32 gradient graph is the reference: the bf16-autocast one (3x faster where bf16
    pays) once overwrote it and tripled the full-gradient ratio."""
    from benchmarks.methods import METHODS as BUILT
    with_reference = [name for name, method in BUILT.items() if method.forward_backward_pass is not None]
    assert with_reference == ["compiled_sgd"]


def test_state_bytes_per_parameter(report):
    methods = report[0]["results"][0]["methods"]
    assert methods["compiled_sgd"]["state_bytes_per_param"] == pytest.approx(4.0)
    assert methods["torchhalp_eager"]["state_bytes_per_param"] == pytest.approx(24.0)
    # anchor 4 + int8 offset 1 + full gradient 4, plus one float32 scale per tensor and the rounding counter
    assert 9.0 <= methods["compiled_halp8"]["state_bytes_per_param"] < 9.1
    assert methods["compiled_halp8"]["state_bytes_per_param_without_scalars"] == pytest.approx(9.0)
    # after its first step transform releases the module's own float32 parameters: its state holds the weights
    assert methods["compiled_halp8"]["model_parameter_bytes_per_param_outside_state"] == 0
    assert methods["eager_sgd"]["model_parameter_bytes_per_param_outside_state"] == 0


def test_warm_subprocess_reports_first_call_and_peak_memory(report):
    methods = report[0]["results"][0]["methods"]
    for name in ran(report[0]):
        if name not in IN_SUBPROCESS:
            assert "first_call_warm" not in methods[name]
            continue
        warm = methods[name]["first_call_warm"]
        assert "error" not in warm, warm
        assert warm["first_call_s"] > 0 and warm["peak_rss_mib"] >= warm["baseline_rss_mib"] > 0
        if sys.platform.startswith("linux"):
            assert warm["retained_rss_bytes_per_param"] == pytest.approx(
                warm["retained_rss_mib"] * 2 ** 20 / warm["trainable_parameters"])
        assert "first_call_cold" not in methods[name]


def test_ratios_and_targets_are_reported(report):
    group = report[0]["results"][0]
    for key in ("halp8_over_compiled_sgd_inner", "torchhalp_over_halp8_inner",
                "compiled_halp8_full_grad_over_compiled_fwd_bwd"):
        assert group["ratios"][key] > 0
    assert any(t["target"].startswith("state <= 9 bytes/param") for t in report[0]["targets"])


def test_table_is_printed(report):
    stdout = report[1]
    assert "inner ms" in stdout and "compiled_halp8" in stdout and "Targets (reported, not asserted)" in stdout
    assert "kept B/param" in stdout


def test_float32_sums_give_the_int8_products_to_the_bit():
    from benchmarks.int8_char_lstm_seeds import float32_sums
    from halp_fx import centered_int8
    generator = torch.Generator().manual_seed(0)
    a = torch.randint(-127, 128, (64, 1024), dtype=torch.int8, generator=generator)
    b = torch.randint(-63, 64, (1024, 48), dtype=torch.int8, generator=generator)
    assert torch.equal(float32_sums(a, b), a.to(torch.int32) @ b.to(torch.int32))
    assert torch.equal(float32_sums(a, b), centered_int8.int8_mm(a, b))
    with pytest.raises(ValueError, match="inner size 1041"):
        float32_sums(torch.zeros(2, 1041, dtype=torch.int8), torch.zeros(1041, 2, dtype=torch.int8))


def test_char_lstm_seeds_write_each_arithmetic_and_their_means(tmp_path):
    from benchmarks import int8_char_lstm_seeds
    out = tmp_path / "seeds.csv"
    rows = int8_char_lstm_seeds.main(["--seeds", "0", "--float32-sums", "--out", str(out), "--example-args",
                                      "--epochs 1 --train-batches 2 --val-batches 1 --hidden 8"])
    assert [(r["arithmetic"], r["seed"], r["lr_nudge"]) for r in rows] == [
        ("fp32", 0, "0"), ("int8", 0, "0"), ("int8_bf16", 0, "0"),
        ("fp32", "mean", "0"), ("int8", "mean", "0"), ("int8_bf16", "mean", "0")]
    # the int8 products did run, and the bf16 anchor's products too
    assert len({rows[i]["val_perplexity"] for i in range(3)}) == 3
    assert out.read_text().splitlines()[0] == "arithmetic,seed,lr_nudge,val_perplexity"
    # It forces the int8 products only while it runs: later tests see this CPU's own choice again.
    from halp_fx import centered_int8
    assert "HALP_FX_INT8_PRODUCTS" not in os.environ and centered_int8.int8_mm.__module__ == "halp_fx.centered_int8"


def test_char_lstm_seeds_rerun_each_seed_with_a_nudged_step_size_and_average_every_run(tmp_path):
    from benchmarks import int8_char_lstm_seeds
    rows = int8_char_lstm_seeds.main(["--seeds", "0", "--lr-nudges", "0,0.01", "--float32-sums",
                                      "--out", str(tmp_path / "seeds.csv"), "--example-args",
                                      "--epochs 1 --train-batches 2 --val-batches 1 --hidden 8"])
    runs = {(r["arithmetic"], r["lr_nudge"]): r["val_perplexity"] for r in rows if r["seed"] == 0}
    assert set(runs) == {(a, n) for a in int8_char_lstm_seeds.ARITHMETICS for n in ("0", "0.01")}
    assert all(runs[a, "0"] != runs[a, "0.01"] for a in int8_char_lstm_seeds.ARITHMETICS)  # the step size moved
    means = {(r["arithmetic"], r["lr_nudge"]): r["val_perplexity"] for r in rows if r["seed"] == "mean"}
    for a in int8_char_lstm_seeds.ARITHMETICS:
        assert means[a, "0"] == runs[a, "0"]
        assert means[a, "all"] == pytest.approx((runs[a, "0"] + runs[a, "0.01"]) / 2)


@pytest.mark.parametrize("argv, message", [(["--lr-nudges", "1e-5"], "--lr-nudges must include 0"),
                                           (["--lr-nudges", "0,tiny"], "--lr-nudges must be comma-separated numbers"),
                                           (["--jobs", "0"], "--jobs must be at least 1")])
def test_char_lstm_seeds_reject_bad_arguments(argv, message, capsys):
    from benchmarks import int8_char_lstm_seeds
    with pytest.raises(SystemExit):
        int8_char_lstm_seeds.main(argv)
    assert message in capsys.readouterr().err


def test_auto_mu_telemetry_records_every_recenter_of_every_run(tmp_path):
    from benchmarks import auto_mu_telemetry
    out = tmp_path / "telemetry.csv"
    rows = auto_mu_telemetry.main(["regression", "--out", str(out), "--", "--bits", "4", "--samples", "10",
                                   "--epochs", "3", "--sweep-mu", "2,auto", "--out", str(tmp_path / "example")])
    # mu="auto" at 4 bits recenters three more times, early in the first epoch.
    assert [(r["run"], r["recenter"]) for r in rows] == [(0, k) for k in range(3)] + [(1, k) for k in range(6)]
    fixed, auto = rows[:3], rows[3:]
    assert fixed[0]["mu"] is None and fixed[0]["saturated"] is None  # the first recenter ends no epoch
    assert all(r["mu"] == r["next_mu"] == 2.0 and 0 <= r["saturated"] <= 1 and 0 <= r["underflow"] <= 1
               for r in fixed[1:])
    assert auto[0]["next_mu"] == 4.0 and [r["mu"] for r in auto[1:]] == [r["next_mu"] for r in auto[:-1]]
    assert out.read_text().splitlines()[0].split(",") == [
        "run", "recenter", "tensor", "numel", "bits", "mu", "saturated", "underflow", "next_mu", "full_grad_norm"]
    # It collects the records only while it runs: the logger is as it found it.
    logger = logging.getLogger("halp_fx")
    assert not logger.isEnabledFor(logging.DEBUG) and logger.propagate


def test_auto_mu_seeds_writes_one_row_per_seed_and_their_mean(tmp_path):
    from benchmarks import auto_mu_seeds
    out = tmp_path / "regression.csv"
    rows = auto_mu_seeds.main(["--example", "regression", "--bits", "4", "--seeds", "0,1", "--out", str(out),
                               "--example-args", "--samples 16 --epochs 2"])
    assert [(r["example"], r["bits"], r["seed"]) for r in rows] == [("regression", 4, 0), ("regression", 4, 1),
                                                                    ("regression", 4, "mean")]
    assert all(r["mu"] == "auto" for r in rows[:2])
    distances = [float(r["final_distance"]) for r in rows]
    assert distances[0] != distances[1] and distances[2] == pytest.approx(sum(distances[:2]) / 2, rel=1e-5)
    lines = out.read_text().splitlines()
    assert lines[0].split(",")[:4] == ["example", "bits", "seed", "mu"] and len(lines) == 4


README_INT8_COLUMNS = ["compiled_sgd", "compiled_svrg", "compiled_halp8", "compiled_halp8_int8",
                       "compiled_halp8_int8_bf16", "compiled_sgd_bf16_autocast"]


@pytest.mark.parametrize("model, digits", [("mlp1024", 1), ("transformer", 0)])
def test_the_readme_int8_table_quotes_the_saved_benchmark_runs(model, digits):
    """The step times and ratios in the README's int8 section are those of the runs saved beside the docs."""
    saved = json.load(open(os.path.join(ROOT, "docs", "results", "benchmarks", f"low_precision_{model}.json")))
    group = saved["results"][0]
    lines = open(os.path.join(ROOT, "README.md")).read().split("## int8 arithmetic", 1)[1].splitlines()
    start = next(i for i, line in enumerate(lines) if line.startswith(f"| {model.replace('transformer', 'transformer layer')} |"))
    row = lines[start + 1]
    ms = [cell.strip() for cell in row.strip("|").split("|")][2:]
    assert ms == [f"{group['methods'][m]['inner_step_s'] * 1e3:.{digits}f}" for m in README_INT8_COLUMNS]
    ratios = [cell.strip().strip("*") for cell in lines[start + 2].strip("|").split("|")][2:]
    sgd = group["methods"]["compiled_sgd"]["inner_step_s_rounds"]
    assert ratios[1:] == [f"{statistics.median(a / b for a, b in zip(group['methods'][m]['inner_step_s_rounds'], sgd)):.2f}"
                          for m in README_INT8_COLUMNS[1:]]
    assert "avx512_vnni" in saved["meta"]["cpu_flags"] and saved["meta"]["torch"].startswith("2.13")


def test_the_small_mlp_table_in_docs_performance_quotes_the_saved_run():
    saved = json.load(open(os.path.join(ROOT, "docs", "results", "benchmarks", "small_mlp.json")))
    group = saved["results"][0]
    page = open(os.path.join(ROOT, "docs", "performance.md")).read().split("## The paper's model size", 1)[1]
    rows = {"compiled SGD": "compiled_sgd", "torchhalp-style eager": "torchhalp_eager", "compiled SVRG": "compiled_svrg",
            "compiled HALP 8-bit": "compiled_halp8", "compiled HALP 4-bit": "compiled_halp4",
            "`halp_fx.optim.HALP`": "optim_halp"}
    for label, method in rows.items():
        row = next(line for line in page.splitlines() if line.startswith(f"| {label}"))
        cells = [cell.strip() for cell in row.strip("|").split("|")]
        timing = group["methods"][method]
        assert cells[1:3] == [f"{timing['inner_step_s'] * 1e3:.3f}", f"{timing['epoch_s'] * 1e3:.1f}"], label
    ratios = group["ratios"]
    assert f"| {ratios['halp8_over_svrg_inner']:.2f} (epoch {ratios['halp8_over_svrg_epoch']:.2f}) |" in page
    assert f"| {ratios['halp4_over_svrg_inner']:.2f} |" in page
    assert f"is {ratios['torchhalp_over_halp8_inner']:.2f}× compiled HALP's" in page
    assert "avx512_vnni" in saved["meta"]["cpu_flags"] and saved["meta"]["torch"].startswith("2.13")
    readme = " ".join(open(os.path.join(ROOT, "README.md")).read().split("**Step time at the paper's model size**")[1]
                      .split("**Regression**")[0].split())
    methods = group["methods"]
    assert (f"compiled SGD {methods['compiled_sgd']['inner_step_s'] * 1e3:.2f} ms, compiled SVRG "
            f"{methods['compiled_svrg']['inner_step_s'] * 1e3:.2f} ms, compiled HALP 8-bit "
            f"{methods['compiled_halp8']['inner_step_s'] * 1e3:.2f} ms ({ratios['halp8_over_svrg_inner']:.2f}× SVRG") in readme
    assert f"simulation {methods['torchhalp_eager']['inner_step_s'] * 1e3:.2f} ms" in readme


def _header_flags(saved):
    """The words of a saved Markdown table's first line, where the benchmark names the CPU flags."""
    return set(saved.splitlines()[0].replace(",", " ").replace(";", " ").split())


def _row_cells(page, prefix):
    """The cells after the first of the Markdown table row of ``page`` that starts with ``prefix``."""
    row = next(line for line in page.splitlines() if line.startswith(prefix))
    return [cell.strip() for cell in row.strip("|").split("|")][1:]


def _avx_vnni_section(joined=False):
    """docs/low_precision.md's section on the AVX-VNNI EPYC (``joined``: its words joined by single spaces)."""
    page = open(os.path.join(ROOT, "docs", "low_precision.md")).read()
    section = page.split("### On a newer EPYC with AVX-VNNI", 1)[1].split("### On a CPU with AMX", 1)[0]
    return " ".join(section.split()) if joined else section


def _avx_vnni_kept_run(saved_as):
    """The saved ``run.py --keep-freed-memory`` report of the AVX-VNNI EPYC for ``saved_as``."""
    return json.load(open(os.path.join(ROOT, "docs", "results", "benchmarks",
                                       f"low_precision_{saved_as}_epyc_avx_vnni_kept.json")))


AMX_ROWS = {"mlp1024": ("mlp1024", "mlp1024", 2), "transformer": ("transformer", "transformer layer", 0),
            "cnn": ("cnn", "CNN", 2), "lenet5": ("cnn", "LeNet-5", 2)}
AMX_COLUMNS = ["compiled_sgd", "compiled_sgd_bf16_autocast", "compiled_svrg", "compiled_halp8", "compiled_halp8_int8",
               "compiled_halp8_int8_bf16"]


@pytest.mark.parametrize("model", AMX_ROWS)
def test_the_amx_step_times_in_docs_low_precision_quote_the_saved_runs(model):
    """docs/low_precision.md's AMX table is the saved AMX runs, to the digit, and those ran on a CPU with AMX."""
    saved_as, label, digits = AMX_ROWS[model]
    saved = json.load(open(os.path.join(ROOT, "docs", "results", "benchmarks", f"low_precision_{saved_as}_amx.json")))
    group = next(g for g in saved["results"] if g["model"] == model)
    page = open(os.path.join(ROOT, "docs", "low_precision.md")).read().split("### On a CPU with AMX", 1)[1]
    cells = _row_cells(page, f"| {label}, ms per inner step |")
    assert cells == [f"{group['methods'][m]['inner_step_s'] * 1e3:.{digits}f}" for m in AMX_COLUMNS]
    assert {"amx_int8", "amx_bf16"} <= set(saved["meta"]["cpu_flags"]) and saved["meta"]["torch"].startswith("2.13")


def test_the_product_shapes_script_times_each_shape_in_each_precision(capsys):
    from benchmarks import product_shapes
    product_shapes.main(["--shapes", "32x16x8", "40x8x24", "--calls", "1"])
    rows = [line for line in capsys.readouterr().out.splitlines() if line.startswith("| 32×16×8 |")
            or line.startswith("| 40×8×24 |")]
    assert len(rows) == 2
    for row in rows:
        cells = [c.strip() for c in row.strip("|").split("|")]
        assert len(cells) == 9 and all(float(c) > 0 for c in cells[1:4]) and cells[8] in ("yes", "no")


def test_the_amx_product_and_kernel_tables_in_docs_low_precision_quote_the_saved_runs():
    saved = open(os.path.join(ROOT, "docs", "results", "benchmarks", "product_shapes_amx.md")).read()
    assert {"amx_int8", "amx_bf16"} <= _header_flags(saved)
    page = open(os.path.join(ROOT, "docs", "low_precision.md")).read().split("### On a CPU with AMX", 1)[1]
    rows = [line for line in page.splitlines() if line.startswith("| 128×") or line.startswith("| 1024×")]
    assert len(rows) == 4 and all(row in saved.splitlines() for row in rows)
    ab = open(os.path.join(ROOT, "docs", "results", "benchmarks", "weight_gradient_kernel_amx.md")).read()
    assert {"amx_int8", "amx_bf16"} <= _header_flags(ab)
    rows = [line for line in page.splitlines() if line.startswith("| compiled_")]
    assert len(rows) == 6 and all(row in ab.splitlines() for row in rows)


def _interleaved_rows(path):
    """method -> its row of a saved ``weight_gradient_kernel.py`` table: median, fastest, ratios."""
    return _interleaved_rows_of(open(path).read().splitlines())


def _interleaved_rows_of(lines):
    rows = {}
    for line in lines:
        if line.startswith("| compiled_"):
            cells = [cell.strip() for cell in line.strip("|").split("|")]
            rows[cells[0]] = cells[3:]
    return rows


@pytest.mark.parametrize("saved_as, label", [
    ("weight_gradient_kernel_epyc.md", "mlp1024"),
    ("weight_gradient_kernel_epyc_transformer.md", "transformer layer"),
    ("weight_gradient_kernel_epyc_kept.md", "mlp1024, freed memory kept"),
    ("weight_gradient_kernel_epyc_transformer_kept.md", "transformer layer, freed memory kept"),
    ("weight_gradient_kernel_epyc_avx_vnni.md", "mlp1024 on the AVX-VNNI EPYC"),
    ("weight_gradient_kernel_epyc_avx_vnni_transformer.md", "transformer layer on the AVX-VNNI EPYC"),
    ("weight_gradient_kernel_epyc_avx_vnni_kept.md", "mlp1024 on the AVX-VNNI EPYC, freed memory kept"),
    ("weight_gradient_kernel_epyc_avx_vnni_transformer_kept.md",
     "transformer layer on the AVX-VNNI EPYC, freed memory kept")])
def test_the_epyc_interleaved_step_times_in_docs_low_precision_quote_the_saved_runs(saved_as, label):
    """The EPYC's interleaved tables are the saved runs to the digit, which ran with VNNI and BF16 and no AMX,
    with glibc malloc's defaults or with freed memory kept, as each table's label says."""
    path = os.path.join(ROOT, "docs", "results", "benchmarks", saved_as)
    header = open(path).read().splitlines()[0]
    flags = _header_flags(header)
    assert {"avx512_vnni", "avx512_bf16"} <= flags and not flags & {"amx_int8", "amx_bf16"}
    assert ("avx_vnni" in flags) == ("AVX-VNNI EPYC" in label)
    assert ("freed memory kept for reuse" in header) == ("kept" in label)
    assert ("glibc malloc's defaults" in header) == ("kept" not in label)
    saved = _interleaved_rows(path)
    columns = ["compiled_sgd", "compiled_sgd_bf16_autocast", "compiled_svrg", "compiled_halp8_int8",
               "compiled_halp8_int8_bf16"]
    page = open(os.path.join(ROOT, "docs", "low_precision.md")).read().split("## Step time", 1)[1]
    lines = page.split("### On a CPU with AMX", 1)[0].splitlines()
    start = lines.index(next(line for line in lines if line.startswith(f"| {label}, median round |")))
    cells = [[cell.strip().strip("*") for cell in line.strip("|").split("|")][1:] for line in lines[start:start + 5]]
    assert cells[0] == [saved[m][0] for m in columns]          # median round
    assert cells[1] == [saved[m][1] for m in columns]          # fastest round
    assert cells[2] == [saved[m][2] for m in columns]          # / float32 SGD
    assert cells[3][2:] == [saved[m][4] for m in columns[2:]]  # / SVRG
    assert cells[4] == [saved[m][5] for m in columns]          # page faults per step


@pytest.mark.parametrize("saved_as, model, label", [("mlp1024", "mlp1024", "mlp1024"),
                                                     ("transformer", "transformer", "transformer layer"),
                                                     ("cnn", "cnn", "CNN"), ("cnn", "lenet5", "LeNet-5")])
def test_the_avx_vnni_epyc_benchmark_tables_quote_the_saved_runs_with_freed_memory_kept(saved_as, model, label):
    saved = _avx_vnni_kept_run(saved_as)
    assert saved["meta"]["freed_memory_kept"] is True
    assert {"avx_vnni", "avx512_vnni", "avx512_bf16"} <= set(saved["meta"]["cpu_flags"])
    methods = next(group for group in saved["results"] if group["model"] == model)["methods"]
    page = _avx_vnni_section()
    for quantity, key, digits in [("ms per inner step", "inner_step_s", 2), ("ms per epoch", "epoch_s", 1)]:
        cells = _row_cells(page, f"| {label} on the AVX-VNNI EPYC, {quantity} |")
        assert cells == [f"{methods[m][key] * 1e3:.{digits}f}" for m in AMX_COLUMNS]


def test_the_avx_vnni_epyc_epoch_and_full_gradient_ratios_quote_the_saved_runs():
    def ratios(saved_as, model):
        return next(group for group in _avx_vnni_kept_run(saved_as)["results"] if group["model"] == model)["ratios"]
    mlp, transformer = ratios("mlp1024", "mlp1024"), ratios("transformer", "transformer")
    page = _avx_vnni_section(joined=True)
    assert (f"with the bf16 anchor takes {mlp['halp8_int8_bf16_over_svrg_epoch']:.2f}× (mlp1024) and "
            f"{transformer['halp8_int8_bf16_over_svrg_epoch']:.2f}× (transformer) of SVRG's, with the float32 anchor "
            f"{mlp['halp8_int8_over_svrg_epoch']:.2f}× and {transformer['halp8_int8_over_svrg_epoch']:.2f}×") in page
    full = [ratios(saved_as, model)["compiled_halp8_full_grad_over_compiled_fwd_bwd"]
            for saved_as, model in [("mlp1024", "mlp1024"), ("transformer", "transformer"), ("cnn", "cnn"),
                                    ("cnn", "lenet5")]]
    assert ("The full gradient (float32 at every arithmetic) takes {:.2f}× (mlp1024), {:.2f}× (transformer), {:.2f}× "
            "(CNN) and {:.2f}× (LeNet-5) of compiled SGD's float32 forward and backward".format(*full)) in page


def test_the_mlp_width_sweep_times_both_arithmetics_on_the_same_model(tmp_path):
    out = tmp_path / "widths.csv"
    done = subprocess.run([sys.executable, os.path.join(ROOT, "benchmarks", "int8_mlp_widths.py"), "--widths", "16",
                           "--rounds", "2", "--steps", "1", "--no-inductor", "--csv", str(out)],
                          capture_output=True, text=True, timeout=120, cwd=ROOT)
    assert done.returncode == 0, done.stderr[-2000:]
    (row,) = list(csv.DictReader(open(out)))
    assert row["multiply_adds_per_hidden_product"] == str(128 * 16 * 16)
    assert float(row["fp32_halp_ms"]) > 0 and float(row["int8_halp_ms"]) > 0
    expected = "8" if row["int8_pays_here"] == "True" else "0"   # 3 layers: 8 products at W (the first has 2)
    assert row["int8_products"] == expected


def test_the_mlp_width_table_in_docs_low_precision_quotes_the_saved_run():
    rows = list(csv.DictReader(open(os.path.join(ROOT, "docs", "results", "benchmarks",
                                                 "int8_mlp_widths_epyc_avx_vnni.csv"))))
    assert {row["int8_products"] for row in rows} == {"8"}   # every product in int8, on a CPU where it pays
    page = _avx_vnni_section()
    for row in rows:
        cells = _row_cells(page, f"| {row['width']} |")
        assert cells[1:] == [f"{float(row['fp32_halp_ms']):.3f}", f"{float(row['int8_halp_ms']):.3f}",
                             f"{float(row['int8_over_fp32']):.2f}"]


def test_the_avx_vnni_epyc_convolution_ratios_in_docs_low_precision_quote_the_saved_run():
    rows = list(csv.DictReader(open(os.path.join(ROOT, "docs", "results", "benchmarks",
                                                 "int8_convolution_epyc_avx_vnni.csv"))))
    assert len(rows) == 4

    def span(column):
        values = sorted(float(row[column]) for row in rows)
        return f"{values[0]:.2f}–{values[-1]:.2f}×"
    page = _avx_vnni_section(joined=True)
    assert (f"convolution costs {span('onednn_int8_over_fp32')} the float32 one with its weight packed once and "
            f"{span('onednn_int8_packed_per_call_over_fp32')} packed per call") in page
    assert f"`im2col` with `_int_mm` {span('im2col_int8_over_fp32')}" in page
    assert min(float(row["onednn_int8_over_fp32"]) for row in rows) > 0.5   # two corrections cannot pay


README_INTERLEAVED_ROWS = {
    "AMD EPYC, AVX512-VNNI and AVX512-BF16": ("weight_gradient_kernel_epyc.md",
                                              "weight_gradient_kernel_epyc_transformer.md"),
    "a newer AMD EPYC, AVX-VNNI too": ("weight_gradient_kernel_epyc_avx_vnni.md",
                                       "weight_gradient_kernel_epyc_avx_vnni_transformer.md")}


def test_the_readme_step_time_ratios_by_cpu_quote_the_saved_interleaved_runs():
    lines = open(os.path.join(ROOT, "README.md")).read().splitlines()
    checked = 0
    for i, line in enumerate(lines):
        cells = [cell.strip().strip("*") for cell in line.strip("|").split("|")]
        if cells[0] not in README_INTERLEAVED_ROWS:
            continue
        kept = [cell.strip().strip("*") for cell in lines[i + 1].strip("|").split("|")]
        assert kept[0] == "the same, freed memory kept"
        for row, suffix in [(cells, ".md"), (kept, "_kept.md")]:
            saved = [_interleaved_rows(os.path.join(ROOT, "docs", "results", "benchmarks", name[:-3] + suffix))
                     for name in README_INTERLEAVED_ROWS[cells[0]]]
            assert row[1:] == [" / ".join(model[method][column] for model in saved)
                               for method in ("compiled_halp8_int8_bf16", "compiled_halp8_int8") for column in (2, 4)]
            checked += 1
    assert checked == 4


@pytest.mark.parametrize("model, label", [("cnn", "CNN"), ("lenet5", "LeNet-5")])
def test_the_epyc_convolutional_step_times_in_docs_low_precision_quote_the_saved_run(model, label):
    saved = json.load(open(os.path.join(ROOT, "docs", "results", "benchmarks", "low_precision_cnn.json")))
    group = next(g for g in saved["results"] if g["model"] == model)
    page = open(os.path.join(ROOT, "docs", "low_precision.md")).read().split("### On a CPU with AMX", 1)[0]
    cells = _row_cells(page, f"| {label}, ms per inner step |")
    assert cells == [f"{group['methods'][m]['inner_step_s'] * 1e3:.2f}" for m in AMX_COLUMNS]
    assert "avx512_vnni" in saved["meta"]["cpu_flags"] and "amx_int8" not in saved["meta"]["cpu_flags"]


def test_the_low_precision_profile_names_the_costliest_kernels_that_are_not_products(capsys):
    from benchmarks import profile_low_precision
    import torch._inductor.config
    before = torch._inductor.config.cpp.enable_kernel_profile
    profile_low_precision.main(["--model", "logreg", "--steps", "2", "--rest-by-kernel", "3",
                                "--methods", "compiled_sgd"])
    assert torch._inductor.config.cpp.enable_kernel_profile == before   # the kernel profile was on for the run only
    out = capsys.readouterr().out.splitlines()
    summary = next(line for line in out if line.startswith("  compiled_sgd:"))
    assert "everything else" in summary and "float32 products" in summary
    named = [line for line in out if line.startswith("    everything else: ")]
    assert 1 <= len(named) <= 3 and all(float(line.rsplit(": ", 1)[1].split(" ms")[0]) >= 0 for line in named)


@pytest.mark.skipif(platform.libc_ver()[0] != "glibc", reason="--keep-freed-memory is glibc's mallopt")
def test_the_interleaved_script_counts_page_faults_and_keeps_freed_memory_when_asked():
    """Run in its own process: keeping freed memory is process-wide and lasting."""
    out = subprocess.run([sys.executable, os.path.join(ROOT, "benchmarks", "weight_gradient_kernel.py"),
                          "--model", "logreg", "--steps", "1", "--rounds", "2", "--baselines", "compiled_sgd",
                          "--methods", "compiled_halp8_int8", "--keep-freed-memory"],
                         capture_output=True, text=True, check=True).stdout.splitlines()
    assert "freed memory kept for reuse" in out[0]
    header = next(line for line in out if line.startswith("| method |"))
    assert header.rstrip().endswith("| page faults per step |")
    rows = _interleaved_rows_of(out)
    assert set(rows) == {"compiled_sgd", "compiled_halp8_int8"}
    assert all(float(cells[-1]) >= 0 and float(cells[0]) > 0 for cells in rows.values())
