"""``make demo``'s comparison table: rows, the "what meta-training bought" line, the PNG."""
from __future__ import annotations

import jax
import jax.numpy as jnp
import pytest

from mnemosyne_core.mnemosyne import MnemosyneConfig, init_theta
from service import demo_report


@pytest.fixture(scope="module")
def demo_results(tmp_path_factory):
    config = MnemosyneConfig(learning_rate=1e-2)
    theta = init_theta(jax.random.key(0), config)
    # A "trained" θ that differs from the fresh one: a larger learned gain bias.
    theta["head"]["b_s"] = jnp.float32(0.5)
    out = tmp_path_factory.mktemp("demo")
    results, lines = demo_report.compare(theta, config, out_dir=out, steps=20, seeds=1)
    return results, lines, out


def test_rows_are_the_demo_columns(demo_results):
    results, _, _ = demo_results
    labels = [label for label, _, _ in demo_report.rows(results)]
    assert labels[:5] == ["fresh θ (demo config)", "demo θ (briefly meta-trained)", "shipped default, told T",
                          "default's fresh θ, told T", "Adam(1e-3)"]
    assert labels[5].startswith("tuned Adam (") and labels[6].startswith("tuned cosine Adam (")
    [task] = results["tasks"].values()
    for _, col, per_h in demo_report.rows(results)[:5]:
        assert per_h["1"] == task["horizons"]["1"]["final_train_loss"][col]


def test_summary_line_reports_the_change_against_each_fresh_theta(demo_results):
    results, lines, _ = demo_results
    [task] = results["tasks"].values()
    f = task["horizons"]["1"]["final_train_loss"]
    want_demo = 100.0 * (f["demo"] / f["demo[fresh]"] - 1.0)
    want_default = 100.0 * (f["default+T"] / f["default[fresh]+T"] - 1.0)
    line = demo_report.summary_line(results)
    assert f"briefly trained θ {want_demo:+.1f}% vs its fresh θ" in line
    assert f"shipped default {want_default:+.1f}% vs its fresh θ" in line
    assert abs(want_demo) > 0.1  # the two θ really differ
    assert line in lines


def test_table_and_png_are_written(demo_results):
    _, _, out = demo_results
    assert "what meta-training bought" in (out / "table.txt").read_text()
    assert (out / "demo.png").stat().st_size > 5000
