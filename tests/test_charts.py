"""The forgetting chart: benchmarks and categories in the main chart, subtasks in a second one."""

from sftflow.charts import plot_deltas, subtask_chart


def row(scope: str, name: str, n: int, delta: float) -> dict:
    return {"scope": scope, "benchmark": name.split("/")[0].split("_")[0], "name": name, "n": n, "delta": delta,
            "ci_low": delta - 0.05, "ci_high": delta + 0.05, "significant_drop": delta < -0.1}


def image_rows(path) -> int:
    import matplotlib.image

    return matplotlib.image.imread(path).shape[0]


def test_subtasks_get_their_own_chart_and_the_main_chart_only_the_totals(tmp_path):
    rows = [row("benchmark", "mmlu", 120, -0.02), row("category", "mmlu_stem", 60, -0.03),
            row("category", "mmlu_other", 60, 0.01), row("benchmark", "bbh", 90, -0.2)]
    rows += [row("subtask", f"mmlu/subject{i}", 4, 0.1 - 0.02 * i) for i in range(40)]
    written = plot_deltas(rows, tmp_path / "forgetting_ft.png", "ft minus base")
    assert written == [tmp_path / "forgetting_ft.png", tmp_path / "forgetting_ft_subtasks.png"]
    assert subtask_chart(written[0]) == written[1]
    # A bar per row: 4 totals against 40 subtasks.
    assert image_rows(written[0]) < 300 < 900 < image_rows(written[1])


def test_without_subtasks_one_chart(tmp_path):
    written = plot_deltas([row("benchmark", "mmlu", 10, 0.0)], tmp_path / "f.png", "t")
    assert written == [tmp_path / "f.png"] and not subtask_chart(tmp_path / "f.png").exists()
