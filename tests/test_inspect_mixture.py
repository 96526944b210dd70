"""inspect_mixture: per-task shares, over-long counts and fill rates of a tiny registered mixture."""

import os
import subprocess
import sys
import textwrap

import pytest
from data_fakes import register_fake_tasks, tiny_tokenizer, unregister_all

from flan_jax.data import mixture_report
from flan_jax.data.features import FeatureConfig, featurize
from flan_jax import data


@pytest.fixture
def tiny_mixture():
    names = register_fake_tasks("inspect_", {"short": 30, "long": 20}, long_every={"long": 2})
    yield "inspect_mix"
    unregister_all(names)


def test_report_shares_counts_and_fill(tiny_mixture):
    report = mixture_report.inspect(
        tiny_mixture, seq_len=96, tokenizer=tiny_tokenizer(), num_examples_per_task=20, num_mixed_examples=100,
        num_packing_bins=8,
    )
    by_name = {t.name: t for t in report.tasks}
    assert set(by_name) == {"inspect_short", "inspect_long"}
    assert (by_name["inspect_short"].available, by_name["inspect_long"].available) == (30, 20)
    assert by_name["inspect_short"].rate == pytest.approx(0.6)  # examples-proportional: 30 / 50
    assert sum(t.token_share for t in report.tasks) == pytest.approx(1.0)
    # The long task has a smaller example share but a larger token share.
    assert by_name["inspect_long"].token_share > by_name["inspect_long"].rate
    # Over-long counts equal a direct count on the same sample (every 2nd record is long).
    sample = list(data.get_task("inspect_long").get_dataset("train", seed=0, shuffle=True))
    outcomes = [featurize(e, tiny_tokenizer(), FeatureConfig(seq_len=96))[1].value for e in sample]
    assert by_name["inspect_long"].truncated == sum(o != "kept" for o in outcomes) == 10
    assert by_name["inspect_short"].truncated == 0
    assert report.mixed_examples == 100
    assert 0 < report.padded_fill_rate < report.fill_rate <= 1
    table = report.table()
    assert "| inspect_long | 20 | 0.4000 |" in table and "packing fill" in table


def test_render_and_plot(tiny_mixture, tmp_path):
    text = mixture_report.render_examples("inspect_short", 2)
    assert text.count("[inputs]") == 2
    assert text.startswith("----- inspect_short example 0 -----\n[inputs]\n#")
    few = mixture_report.render_examples("inspect_short", 1, num_shots=3, template_set="eval")
    assert few.count("\n\n#") == 3 and "(3-shot, eval templates)" in few
    report = mixture_report.inspect(tiny_mixture, seq_len=96, tokenizer=tiny_tokenizer(), num_examples_per_task=5,
                                     num_mixed_examples=20)
    mixture_report.plot_token_shares(report, tmp_path / "shares.png")
    assert (tmp_path / "shares.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_command_line(tmp_path):
    """The CLI end to end, on a mixture of a user's task module it imports (no tokenizer: trains one), 2-shot."""
    (tmp_path / "cli_user_tasks.py").write_text(textwrap.dedent("""
        from data_fakes import register_fake_tasks
        register_fake_tasks("cli_", {"a": 40, "b": 10}, long_every={"b": 5})
    """))
    script = textwrap.dedent(
        f"""
        import runpy, sys
        sys.path[:0] = [{os.path.dirname(__file__)!r}, {str(tmp_path)!r}]
        sys.argv = ["inspect_mixture", "--task_modules=cli_user_tasks", "--mixture=cli_mix", "--seq_len=128",
                    "--num_examples_per_task=40", "--num_mixed_examples=50", "--render=cli_b", "--n=2",
                    "--num_shots=2", "--plot={tmp_path / 'p.png'}"]
        runpy.run_module("flan_jax.inspect_mixture", run_name="__main__")
        """
    )
    env = dict(os.environ, PYTHONPATH=os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, env=env, timeout=120)
    assert result.returncode == 0, result.stderr[-3000:]
    assert "----- cli_b example 1 -----" in result.stdout
    first = result.stdout.split("----- cli_b example 0 -----")[1].split("----- cli_b example 1")[0]
    assert first.count("\n\n#") == 2 and "(2-shot, train templates)" in first  # two exemplars before the query
    assert "| cli_a | 40 | 0.8000 |" in result.stdout
    assert "Saved the token-share chart" in result.stdout
    assert (tmp_path / "p.png").is_file()


def test_chart_groups_many_tasks_by_cluster_and_sums_the_smallest():
    tasks = [
        mixture_report.TaskReport(name=f"t{i}", available=10, rate=0.1, token_share=0.01 * i, cluster=f"c{i % 5}")
        for i in range(10)
    ]
    report = mixture_report.MixtureReport("m", "train", 64, "tok", tasks)
    assert mixture_report.chart_rows(report, max_bars=10) == sorted(tasks, key=lambda t: t.token_share)
    clusters = mixture_report.chart_rows(report, max_bars=5)  # 10 tasks > 5 bars: one bar per cluster
    assert [(c.name, c.tasks) for c in clusters] == [("c0", 2), ("c1", 2), ("c2", 2), ("c3", 2), ("c4", 2)]
    assert clusters[-1].token_share == pytest.approx(0.04 + 0.09)
    rows = mixture_report.chart_rows(report, max_bars=3)  # 5 clusters > 3 bars: the 3 smallest summed
    assert [r.name for r in rows] == ["(3 others)", "c3", "c4"]
    assert rows[0].tasks == 6 and rows[0].available == 60
    assert "| c4 | 2 | 20 | 20.00% | 13.00% | 0/0 |" in report.table()
