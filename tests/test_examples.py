"""Smoke tests of the examples: each runs its real code path (training, table, CSV, plot) at a tiny size."""
import csv
import gzip
import logging
import os
import sys
import warnings

import numpy as np
import pytest
import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
EXAMPLES = os.path.join(ROOT, "examples")
sys.path.insert(0, EXAMPLES)

import matplotlib  # noqa: E402

import halp_fx  # noqa: E402

matplotlib.use("Agg")

FASHION_MNIST = "/usr/share/datasets/fashion-mnist"


@pytest.fixture(autouse=True)
def restore_torch_threads():
    """The examples set torch's thread count for their own process; give the other tests theirs back."""
    threads = torch.get_num_threads()
    yield
    torch.set_num_threads(threads)


@pytest.fixture(autouse=True)
def restore_halp_fx_log_level():
    """The examples turn on halp_fx's INFO lines for their own process; the other tests expect the default."""
    logger = logging.getLogger("halp_fx")
    level = logger.level
    yield
    logger.setLevel(level)


def read_csv(path):
    with open(path, newline="") as f:
        reader = csv.DictReader(f)
        return reader.fieldnames, list(reader)


def assert_curves(out, columns, methods, points_per_method, plot="curves.png"):
    header, rows = read_csv(os.path.join(out, "curves.csv"))
    assert header == columns
    assert list(dict.fromkeys(r["method"] for r in rows)) == methods
    assert all(sum(r["method"] == m for r in rows) == points_per_method for m in methods)
    assert all(np.isfinite(float(r[c])) for r in rows for c in columns[2:])
    assert os.path.getsize(os.path.join(out, plot)) > 1000


CLASSIFIERS = ["SGD", "LP-SGD 8-bit", "SVRG", "HALP 8-bit", "HALP 4-bit"]
CLASSIFIER_CURVES = ["method", "epoch", "train_loss", "test_loss", "test_accuracy", "seconds"]


def test_regression_writes_distance_curves_for_four_methods(tmp_path):
    import regression
    regression.main(["--samples", "20", "--epochs", "2", "--out", str(tmp_path)])
    assert_curves(tmp_path, ["method", "iteration", "distance"], ["SGD", "LP-SGD 8-bit", "SVRG", "HALP 8-bit"], 40,
                  plot="distance.png")
    header, rows = read_csv(tmp_path / "summary.csv")
    assert header == ["method", "final_distance", "best_distance", "seconds"] and len(rows) == 4


def test_regression_mu_sweep_writes_one_row_per_mu(tmp_path):
    import regression
    regression.main(["--samples", "10", "--epochs", "1", "--sweep-mu", "1,4", "--out", str(tmp_path)])
    header, rows = read_csv(tmp_path / "mu_sweep.csv")
    assert header == ["mu", "final_distance", "iterations_to_1e-3"]
    assert [float(r["mu"]) for r in rows] == [1.0, 4.0]


def test_digits_compares_five_methods_and_dumps_the_halp_graphs(tmp_path):
    import digits
    digits.main(["--epochs", "1", "--train-size", "100", "--batch-size", "50", "--out", str(tmp_path)])
    assert_curves(tmp_path, CLASSIFIER_CURVES, CLASSIFIERS, 1)
    header, rows = read_csv(tmp_path / "summary.csv")
    assert header == ["method", "test_accuracy", "train_loss", "seconds", "first_step_seconds"]
    assert [r["method"] for r in rows] == CLASSIFIERS
    dumped = sorted(os.listdir(tmp_path / "halp8_graphs"))
    assert dumped[0] == "00_captured.py" and "04_nonfinite_guard.py" in dumped


def write_idx(path, array):
    header = bytes([0, 0, 8, array.ndim]) + b"".join(int(n).to_bytes(4, "big") for n in array.shape)
    with gzip.open(path, "wb") as f:
        f.write(header + array.astype(np.uint8).tobytes())


def random_fashion_mnist(directory, train, test):
    """Gzipped IDX files of random 28x28 images and labels, named as the Debian package names them."""
    rng = np.random.default_rng(0)
    directory.mkdir()
    for split, n in (("train", train), ("t10k", test)):
        write_idx(directory / f"{split}-images-idx3-ubyte.gz", rng.integers(0, 256, (n, 28, 28)))
        write_idx(directory / f"{split}-labels-idx1-ubyte.gz", rng.integers(0, 10, n))
    return directory


def test_fashion_mnist_reads_gzipped_idx_files(tmp_path):
    import fashion_mnist
    data = random_fashion_mnist(tmp_path / "data", 200, 100)
    out = tmp_path / "out"
    fashion_mnist.main(["--data", str(data), "--train-size", "200", "--epochs", "1", "--out", str(out)])
    assert_curves(out, CLASSIFIER_CURVES, CLASSIFIERS, 1)


def test_fashion_mnist_full_sets_the_long_run_and_keeps_what_is_given():
    import fashion_mnist
    full = fashion_mnist.parse_args(["--full"])
    assert (full.train_size, full.batch_size, full.mu, full.mu4, full.compile) == (60000, 128, "auto", "auto", True)
    assert full.out == "results/fashion_mnist_full"
    given = fashion_mnist.parse_args(["--full", "--epochs", "1", "--batch-size=64"])
    assert (given.epochs, given.batch_size, given.train_size) == (1, 64, 60000)
    assert fashion_mnist.parse_args([]).train_size == 10000


def test_a_sweep_over_one_width_writes_its_rows_after_every_run(tmp_path, monkeypatch):
    import common
    import fashion_mnist
    data = random_fashion_mnist(tmp_path / "data", 100, 50)
    written = []
    real_write = common.write_csv
    monkeypatch.setattr(common, "write_csv", lambda path, rows: written.append(len(rows)) or real_write(path, rows))
    fashion_mnist.main(["--data", str(data), "--train-size", "100", "--batch-size", "50", "--epochs", "1",
                        "--sweep-mu", "1,auto", "--sweep-bits", "4", "--out", str(tmp_path / "out")])
    header, rows = read_csv(tmp_path / "out" / "mu_sweep.csv")
    assert [(r["bits"], r["mu"]) for r in rows] == [("4", "1"), ("4", "auto")]
    assert written == [1, 2] and "seconds" in header


@pytest.mark.skipif(not os.path.isdir(FASHION_MNIST), reason="apt-get install dataset-fashion-mnist to run it")
def test_fashion_mnist_trains_on_the_installed_dataset(tmp_path):
    import fashion_mnist
    fashion_mnist.main(["--train-size", "200", "--test-size", "500", "--epochs", "1", "--out", str(tmp_path)])
    assert_curves(tmp_path, CLASSIFIER_CURVES, CLASSIFIERS, 1)


def test_fashion_mnist_without_data_says_how_to_get_it_in_one_line(tmp_path):
    import fashion_mnist
    with pytest.raises(SystemExit) as exit_info:
        fashion_mnist.main(["--data", str(tmp_path), "--out", str(tmp_path / "out")])
    message = str(exit_info.value.code)
    assert "apt-get install dataset-fashion-mnist" in message and "--data" in message and "\n" not in message
    assert not (tmp_path / "out").exists()


def test_char_lstm_reports_perplexity_per_method(tmp_path):
    import char_lstm
    char_lstm.main(["--seq-len", "4", "--batch-size", "4", "--train-batches", "2", "--val-batches", "1",
                    "--hidden", "8", "--epochs", "2", "--out", str(tmp_path)])
    assert_curves(tmp_path, ["method", "epoch", "train_perplexity", "val_perplexity", "seconds"],
                  ["SGD", "LP-SGD 8-bit", "SVRG", "HALP 8-bit"], 2)


def test_cifar10_resnet18_trains_and_logs_on_synthetic_data(tmp_path):
    import cifar10_resnet18
    rows = cifar10_resnet18.main(["--synthetic", "--synthetic-size", "32", "--batch-size", "16", "--epochs", "1",
                                  "--width", "4", "--T", "2", "--no-compile", "--out", str(tmp_path),
                                  "--checkpoint", str(tmp_path / "checkpoint.pt")])
    assert_curves(tmp_path, ["method", "epoch", "train_loss", "test_accuracy", "seconds"], ["HALP 8-bit"], 1)
    assert rows[-1]["epoch"] == 1 and (tmp_path / "checkpoint.pt").exists()


def test_quickstart_runs_on_one_torch_thread_by_default(capsys):
    import quickstart
    torch.set_num_threads(3)
    quickstart.main(["--epochs", "1", "--no-compile"])
    assert torch.get_num_threads() == 1
    assert "8-bit HALP: test accuracy" in capsys.readouterr().out


def test_digits_never_feeds_batch_norm_a_short_last_batch(tmp_path):
    import digits
    assert any(isinstance(m, torch.nn.BatchNorm2d) for m in digits.SmallCNN().modules())
    with warnings.catch_warnings():
        warnings.simplefilter("error", halp_fx.SmallBatchWarning)
        # 110 = 2 x 50 + 10: a last batch of 10 would reach the full gradient, a fifth of the first batch.
        digits.main(["--epochs", "1", "--train-size", "110", "--batch-size", "50", "--out", str(tmp_path)])


def test_cifar10_resnet18_never_feeds_batch_norm_a_short_last_batch(tmp_path):
    import cifar10_resnet18
    with warnings.catch_warnings():
        warnings.simplefilter("error", halp_fx.SmallBatchWarning)
        # 34 = 2 x 16 + 2: a last batch of 2 would reach both the steps and the full gradient.
        cifar10_resnet18.main(["--synthetic", "--synthetic-size", "34", "--batch-size", "16", "--epochs", "1",
                               "--width", "4", "--T", "2", "--no-compile", "--out", str(tmp_path)])


DIGITS_RESULTS = os.path.join(ROOT, "docs", "results", "digits", "summary.csv")
# The README names the methods in words; summary.csv by the names the script prints.
README_DIGITS_METHODS = {"SGD": "SGD", "low-precision SGD, 8-bit fixed grid": "LP-SGD 8-bit",
                         "SVRG (`bits=None`)": "SVRG", "HALP 8-bit": "HALP 8-bit", "HALP 4-bit": "HALP 4-bit"}


def markdown_table_after(path, marker):
    """The body rows, as lists of cells, of the first markdown table after the first line starting with ``marker``."""
    with open(path) as f:
        lines = [line.strip() for line in f]
    start = next(i for i, line in enumerate(lines) if line.startswith(marker))
    first = next(i for i in range(start, len(lines)) if lines[i].startswith("|"))
    table = []
    for line in lines[first + 2:]:
        if not line.startswith("|"):
            break
        table.append([cell.strip() for cell in line.strip("|").split("|")])
    return table


def digits_summary():
    return {r["method"]: r for r in read_csv(DIGITS_RESULTS)[1]}


def test_the_readme_digits_table_quotes_the_saved_digits_run():
    quoted = {README_DIGITS_METHODS[method]: (accuracy, seconds)
              for method, accuracy, seconds in markdown_table_after(os.path.join(ROOT, "README.md"), "**Digits**")}
    assert quoted == {method: (f"{float(r['test_accuracy']):.2f}", f"{float(r['seconds']):.1f}")
                      for method, r in digits_summary().items()}


def test_the_digits_table_in_docs_examples_quotes_the_saved_digits_run():
    rows = markdown_table_after(os.path.join(ROOT, "docs", "examples.md"), "Default run (seed 0)")
    quoted = {method.split(",")[0]: (accuracy, loss, seconds) for method, accuracy, loss, seconds, _ in rows}
    assert quoted == {method: (f"{float(r['test_accuracy']):.2f} %", f"{float(r['train_loss']):.3g}",
                               f"{float(r['seconds']):.1f} s") for method, r in digits_summary().items()}


def test_the_examples_built_on_common_turn_on_halp_fx_info_lines(tmp_path):
    import regression
    regression.main(["--samples", "4", "--epochs", "1", "--out", str(tmp_path)])
    assert logging.getLogger("halp_fx").isEnabledFor(logging.INFO)


def test_the_examples_keep_a_debug_level_set_before_them(tmp_path):
    import regression
    logging.getLogger("halp_fx").setLevel(logging.DEBUG)
    regression.main(["--samples", "4", "--epochs", "1", "--out", str(tmp_path)])
    assert logging.getLogger("halp_fx").isEnabledFor(logging.DEBUG)


FASHION_INT8_METHODS = ["HALP 8-bit", "HALP 8-bit int8", "HALP 8-bit int8 bf16-anchor"]


def _seed_accuracies(folder):
    """method -> test accuracy by seed, from ``folder/summary.csv`` (seed 0) and ``folder/seed<N>/summary.csv``."""
    runs = {0: os.path.join(folder, "summary.csv")}
    runs.update({int(name[4:]): os.path.join(folder, name, "summary.csv")
                 for name in os.listdir(folder) if name.startswith("seed")})
    found = {m: {} for m in FASHION_INT8_METHODS}
    for seed, path in runs.items():
        for row in csv.DictReader(open(path)):
            if row["method"] in found:
                found[row["method"]][seed] = float(row["test_accuracy"])
    return found


@pytest.mark.parametrize("folder, label", [("fashion_mnist", "Fashion-MNIST 10k subset"),
                                           ("fashion_mnist_full", "full Fashion-MNIST")])
def test_the_low_precision_fashion_mnist_accuracies_quote_every_saved_seed_and_their_mean(folder, label):
    found = _seed_accuracies(os.path.join(ROOT, "docs", "results", "int8", folder))
    seeds = sorted(found["HALP 8-bit"])
    assert len(seeds) >= 3 and all(sorted(by_seed) == seeds for by_seed in found.values())
    page = open(os.path.join(ROOT, "docs", "low_precision.md")).read()
    row = next(line for line in page.splitlines() if line.startswith(f"| {label} ("))
    cells = [cell.strip() for cell in row.strip("|").split("|")]
    for method, cell in zip(FASHION_INT8_METHODS, cells[1:4]):
        values = [found[method][s] for s in seeds]
        mean = sum(values) / len(values)
        assert cell == " / ".join(f"{v:.2f}" for v in values) + f" ({mean:.2f})"


def test_the_low_precision_char_lstm_perplexities_quote_the_saved_seeds_and_nudged_runs():
    """Both char LSTM rows of docs/low_precision.md are means of the saved runs: the plain seeds 0-4 (nudge 0)
    and every seed at every nudge of the step size, each with its change against float32 HALP."""
    rows = list(csv.DictReader(open(os.path.join(ROOT, "docs", "results", "int8", "char_lstm_seeds.csv"))))
    runs = [r for r in rows if r["seed"] != "mean"]
    nudges = sorted({r["lr_nudge"] for r in runs})
    assert len(nudges) == 5 and "0" in nudges
    assert {(r["seed"], r["lr_nudge"]) for r in runs if r["arithmetic"] == "fp32"} == {
        (str(s), n) for s in range(5) for n in nudges}

    def mean(arithmetic, nudge):
        values = [float(r["val_perplexity"]) for r in runs if r["arithmetic"] == arithmetic
                  and (nudge is None or r["lr_nudge"] == nudge)]
        return sum(values) / len(values)

    page = open(os.path.join(ROOT, "docs", "low_precision.md")).read().splitlines()
    for prefix, nudge in [("| char LSTM (`python benchmarks/int8_char_lstm_seeds.py`)", "0"),
                          ("| char LSTM, the same five seeds each also at lr", None)]:
        cells = [cell.strip() for cell in next(line for line in page if line.startswith(prefix)).split("|")[2:5]]
        fp32 = mean("fp32", nudge)
        assert cells[0] == f"{fp32:.2f}"
        for arithmetic, cell in zip(["int8", "int8_bf16"], cells[1:]):
            value = mean(arithmetic, nudge)
            assert cell == f"{value:.2f} ({100 * (value / fp32 - 1):+.1f}%)"


def test_the_char_lstm_auto_mu_seeds_are_quoted_from_their_csvs():
    folder = os.path.join(ROOT, "docs", "results", "auto_mu")
    seeds = {(r["bits"], r["seed"], r["mu"]): float(r["val_perplexity"])
             for r in csv.DictReader(open(os.path.join(folder, "char_lstm_seeds.csv")))}
    auto4 = [float(r["val_perplexity"]) for r in csv.DictReader(open(os.path.join(folder,
             "char_lstm_4bit_auto.csv"))) if r["seed"] != "mean"]
    assert len(auto4) == 10
    auto8 = sum(seeds["8", str(s), "auto"] for s in range(5)) / 5
    mu1_8 = sum(seeds["8", str(s), "1"] for s in range(5)) / 5
    mu1_4 = sum(seeds["4", str(s), "1"] for s in range(10)) / 10
    mean4 = sum(auto4) / 10
    quoted = [f"auto {auto8:.2f} against mu=1's {mu1_8:.2f} ({100 * (auto8 / mu1_8 - 1):+.1f}%",
              f"auto {mean4:.2f} against mu=1's {mu1_4:.2f} ({100 * (mean4 / mu1_4 - 1):+.1f}%"]
    page = " ".join(open(os.path.join(ROOT, "docs", "examples.md")).read().split())
    assert all(text in page for text in quoted)
    results = " ".join(open(os.path.join(ROOT, "docs", "results.md")).read().split())
    assert f"auto averages {auto8:.2f} against μ=1's {mu1_8:.2f}, {100 * (auto8 / mu1_8 - 1):+.1f}%" in results
    assert f"it averages {mean4:.2f} against μ=1's {mu1_4:.2f} ({100 * (mean4 / mu1_4 - 1):+.1f}%)" in results


def test_the_auto_mu_summary_follows_from_its_runs_and_the_results_page_quotes_it():
    folder = os.path.join(ROOT, "docs", "results", "auto_mu")
    summary = {(r["example"], r["bits"]): r for r in csv.DictReader(open(os.path.join(folder, "summary.csv")))}
    digits = {(r["seed"], r["bits"], r["mu"]): float(r["test_accuracy"])
              for r in csv.DictReader(open(os.path.join(folder, "digits_seeds.csv")))}
    subset4 = {(r["seed"], r["mu"]): float(r["test_accuracy"])
               for r in csv.DictReader(open(os.path.join(folder, "fashion_mnist_subset_4bit_auto.csv")))}
    full = list(csv.DictReader(open(os.path.join(ROOT, "docs", "results", "fashion_mnist_full", "mu_sweep.csv"))))
    full_main = {r["method"]: float(r["test_accuracy"])
                 for r in csv.DictReader(open(os.path.join(ROOT, "docs", "results", "fashion_mnist_full", "summary.csv")))}

    def mean(values):
        return sum(values) / len(values)
    expected = {}
    for bits in ("8", "4"):
        means = {mu: mean([digits[str(s), bits, mu] for s in range(5)]) for mu in ("auto", "0.5", "4", "8", "16")}
        expected["digits", bits] = (means["auto"], max(v for mu, v in means.items() if mu != "auto"))
        swept = [float(r["test_accuracy"]) for r in full if r["bits"] == bits]
        expected["fashion_mnist_full", bits] = (full_main[f"HALP {bits}-bit"], max(swept))
    means = {mu: mean([subset4[str(s), mu] for s in range(3)]) for mu in ("auto", "4", "8")}
    expected["fashion_mnist_10k", "4"] = (means["auto"], max(means["4"], means["8"]))
    results = open(os.path.join(ROOT, "docs", "results.md")).read()
    for key, (auto, best) in expected.items():
        row = summary[key]
        assert float(row["auto"]) == pytest.approx(auto, abs=1e-3) and float(row["best_swept"]) == pytest.approx(best, abs=1e-3)
        assert row["met"] == f"{'yes' if auto - best >= -0.3 else 'no'} ({auto - best:+.2f})"
        # the results page's row for this example and width gives both figures and the difference
        label = {"digits": "| digits |", "fashion_mnist_10k": "| Fashion-MNIST, 10k subset |",
                 "fashion_mnist_full": "| Fashion-MNIST, full 60k"}[key[0]]
        line = next(line for line in results.splitlines() if line.startswith(label) and f"| {key[1]} |" in line)
        line = line.replace("\u2212", "-")  # the page's minus signs
        assert f"{auto:.2f}" in line and f"{best:.2f}" in line and f"({auto - best:+.2f})" in line


MAIN_JOB_TABLES = {  # folder: (section heading, method -> its row's label, (column, format) of the quoted cells)
    "char_lstm": ("## Character-level LSTM",
                  {"SGD": "SGD", "LP-SGD 8-bit": "LP-SGD 8-bit", "SVRG": "SVRG", "HALP 8-bit": "HALP 8-bit, mu=auto"},
                  [("val_perplexity", "{:.2f}"), ("train_perplexity", "{:.2f}")]),
    "fashion_mnist": ("## Fashion-MNIST, LeNet-5",
                      {"SGD": "SGD", "LP-SGD 8-bit": "LP-SGD 8-bit", "SVRG": "SVRG", "HALP 8-bit": "HALP 8-bit, mu=auto",
                       "HALP 4-bit": "HALP 4-bit, mu=8"},
                      [("test_accuracy", "{:.2f} %"), ("train_loss", "{:.3f}")]),
    "fashion_mnist_full": ("### The full training set (`--full`)",
                           {"SGD": "SGD", "LP-SGD 8-bit": "LP-SGD 8-bit", "SVRG": "SVRG",
                            "HALP 8-bit": "HALP 8-bit, mu=auto", "HALP 4-bit": "HALP 4-bit, mu=auto"},
                           [("test_accuracy", "{:.2f} %"), ("train_loss", "{:.3f}")])}


@pytest.mark.parametrize("folder", MAIN_JOB_TABLES)
def test_each_example_section_quotes_its_saved_main_job(folder):
    heading, labels, columns = MAIN_JOB_TABLES[folder]
    rows = {r["method"]: r for r in csv.DictReader(open(os.path.join(ROOT, "docs", "results", folder, "summary.csv")))}
    page = open(os.path.join(ROOT, "docs", "examples.md")).read().split(heading, 1)[1]
    for method, label in labels.items():
        row = next(line for line in page.splitlines() if line.startswith(f"| {label} |"))
        cells = [cell.strip() for cell in row.strip("|").split("|")]
        assert cells[1:3] == [form.format(float(rows[method][column])) for column, form in columns]
