"""``make demo``'s comparison: rows, the "what meta-training bought" line, the curve notes, the
closing recommendation (computed from the measurements) and the PNG."""
from __future__ import annotations

import jax
import jax.numpy as jnp
import pytest

from mnemosyne_core.mnemosyne import MnemosyneConfig, init_theta
from service import demo_report

ROW_LABELS = ["fresh θ (demo config)", "demo θ (briefly meta-trained)", "shipped default, told T",
              "shipped default, not told T", "default's fresh θ, told T", "Adam(1e-3)"]


@pytest.fixture(scope="module")
def demo_results(tmp_path_factory):
    config = MnemosyneConfig(learning_rate=1e-2)
    theta = init_theta(jax.random.key(0), config)
    # A "trained" θ that differs from the fresh one: a larger learned gain bias.
    theta["head"]["b_s"] = jnp.float32(0.5)
    out = tmp_path_factory.mktemp("demo")
    results, lines = demo_report.compare(theta, config, out_dir=out, steps=20, seeds=1)
    return results, lines, out


def fake_results(**losses: float | None) -> dict:
    """A one-task, one-horizon result of the harness's shape with the given final losses."""
    final = {"demo[fresh]": 1.0, "demo": 0.8, "default+T": 0.2, "default": 0.4, "default[fresh]+T": 0.5,
             "adam(1.0e-03)": 0.9, "adam(1.0e-02)": 0.3, "adam_cos(1.0e-02)": 0.25}
    final.update(losses)
    horizon = {"final_train_loss": final, "adam_best": "adam(1.0e-02)", "adam_cos_best": "adam_cos(1.0e-02)"}
    return {"config": {"steps": 200, "horizons": [1]}, "tasks": {"digits": {"horizons": {"1": horizon}}}}


def test_rows_are_the_demo_columns(demo_results):
    results, _, _ = demo_results
    labels = [label for label, _, _ in demo_report.rows(results)]
    assert labels[:6] == ROW_LABELS
    assert labels[6].startswith("tuned Adam (") and labels[7].startswith("tuned cosine Adam (")
    [task] = results["tasks"].values()
    for _, col, per_h in demo_report.rows(results)[:6]:
        assert per_h["1"] == task["horizons"]["1"]["final_train_loss"][col]
        assert per_h["1"] is not None, col  # every row was measured


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


def test_every_curve_of_the_plot_gets_a_sentence(demo_results):
    results, lines, _ = demo_results
    notes = demo_report.curve_notes(results)
    labels = [label for label, _, _ in demo_report.rows(results)]
    assert len(notes) == len(labels) + 1  # one per curve, then the dotted lines
    for label, note in zip(labels, notes):
        assert note.startswith(f"- {label}: ") and note.endswith(".") and len(note) > len(label) + 20
    assert "steps 20, 40" in notes[-1]
    assert all(note in lines for note in notes)


def test_recommendation_follows_the_measurements():
    line = demo_report.recommendation(fake_results())
    assert line.startswith('Use mn.pretrained("default"): it had the lowest loss')
    assert "0.80x that of cosine Adam" in line  # 0.2 / 0.25
    assert "lowered the default's loss by 50%" in line  # 0.2 vs 0.4 untold
    assert "lowered its loss by 20% against its fresh θ" in line  # 0.8 vs 1.0


def test_recommendation_says_when_the_demo_meta_training_did_not_help():
    line = demo_report.recommendation(fake_results(demo=1.5))
    assert "did not help (+50% against its fresh θ)" in line and "not a better optimizer" in line


def test_recommendation_when_adam_or_the_demo_theta_wins_or_total_steps_hurts():
    assert demo_report.recommendation(fake_results(**{"adam(1.0e-03)": 0.1})).startswith("Use Adam: Adam(1e-3)")
    line = demo_report.recommendation(fake_results(demo=0.05))
    assert line.startswith("Use the shipped default") and "one task after a short run" in line
    line = demo_report.recommendation(fake_results(default=0.1))
    assert "Passing total_steps did not help on this task (loss +100%)" in line


def test_recommendation_survives_diverged_runs():
    line = demo_report.recommendation(fake_results(**{"default+T": None, "demo": float("inf")}))
    assert line.startswith("Use Adam") and "not measured here" in line and "diverged" in line


def test_table_and_png_are_written(demo_results):
    results, _, out = demo_results
    text = (out / "table.txt").read_text()
    assert "what meta-training bought" in text
    assert text.rstrip().endswith(demo_report.recommendation(results))
    assert (out / "demo.png").stat().st_size > 5000
