"""The offline mirrors render exactly what lm-eval's stock `mmlu` and `bbh_fewshot` tasks render.

The stock tasks are built by lm-eval's own TaskManager from its own YAMLs; only the hub download is
replaced (the hub is unreachable here) by a Dataset of the same rows. Both sides then render every
document: prompt text, choices, target, the full few-shot context and the request arguments.
"""

import datasets
import pytest

from sftflow.configs.schema import BenchmarkConfig
from sftflow.records import read_jsonl
from sftflow.tasks.evaluation.mirror import build_mirror

CASES = [  # benchmark, subtask, stock task, hub dataset, shots, splits the stock task reads
    ("mmlu", "anatomy", "mmlu_anatomy", ("cais/mmlu", "anatomy"), 5, ("test", "dev")),
    ("mmlu", "college_physics", "mmlu_college_physics", ("cais/mmlu", "college_physics"), 0, ("test", "dev")),
    ("bbh", "navigate", "bbh_fewshot_navigate", ("SaylorTwift/bbh", "navigate"), 3, ("test",)),
    ("bbh", "date_understanding", "bbh_fewshot_date_understanding", ("SaylorTwift/bbh", "date_understanding"), 3,
     ("test",)),
]


@pytest.fixture(scope="module")
def stock_manager():
    from lm_eval.tasks import TaskManager

    return TaskManager()  # lm-eval's own task index (its YAMLs), no include path


def _mirror_task(tmp_path, bench, sub, shots, data_root):
    from lm_eval.tasks import TaskManager

    [task] = build_mirror(bench, BenchmarkConfig(subtasks=[sub], limit=4, num_fewshot=shots), data_root, 0, tmp_path)
    loaded = TaskManager(include_path=str(tmp_path), include_defaults=False).load([task.name])["tasks"][task.name]
    return loaded


def _stock_task(manager, name, hub, rows, monkeypatch):
    asked = []

    def from_local_rows(path, name=None, **kwargs):  # stands in for the hub download only
        asked.append((path, name))
        return datasets.DatasetDict({split: datasets.Dataset.from_list(r) for split, r in rows.items()})

    monkeypatch.setattr(datasets, "load_dataset", from_local_rows)
    task = manager.load([name])["tasks"][name]
    monkeypatch.undo()
    assert asked == [hub]  # the stock YAML asked for the original hub dataset and got the same rows
    return task


def _requests(task, shots, **chat):
    task.set_config(key="num_fewshot", value=shots)
    task.set_fewshot_seed(seed=1234)
    task.build_all_requests(rank=0, world_size=1, **chat)
    return [(inst.doc_id, inst.idx, inst.args) for inst in task.instances]


@pytest.mark.slow  # the stock task index alone takes about 20 s to build
@pytest.mark.parametrize("bench,sub,stock_name,hub,shots,splits", CASES, ids=[c[2] for c in CASES])
def test_mirror_renders_what_the_stock_task_renders(tmp_path, data_root, stock_manager, monkeypatch,
                                                    tiny_tokenizer, bench, sub, stock_name, hub, shots, splits):
    mirror = _mirror_task(tmp_path, bench, sub, shots, data_root)
    rows = {split: list(read_jsonl(tmp_path / bench / f"{sub}.{split}.jsonl")) for split in splits}
    stock = _stock_task(stock_manager, stock_name, hub, rows, monkeypatch)

    docs = list(mirror.test_docs())
    assert docs == list(stock.test_docs()) and len(docs) == 4
    assert mirror.config.description == stock.config.description
    assert mirror.config.generation_kwargs == stock.config.generation_kwargs
    mirror.set_fewshot_seed(seed=1234), stock.set_fewshot_seed(seed=1234)
    for doc in docs:
        assert mirror.doc_to_text(doc) == stock.doc_to_text(doc)
        assert mirror.doc_to_target(doc) == stock.doc_to_target(doc)
        if mirror.OUTPUT_TYPE == "multiple_choice":
            assert mirror.doc_to_choice(doc) == stock.doc_to_choice(doc) == ["A", "B", "C", "D"]
        context = mirror.fewshot_context(doc, shots)
        assert context == stock.fewshot_context(doc, shots)
        assert context.count(mirror.doc_to_text(doc)) >= 1 and (shots == 0 or context.count("A:") + context.count(
            "Answer:") == shots + 1)

    # What the model is actually sent: every request, plain and through a chat template.
    assert _requests(mirror, shots) == _requests(stock, shots)

    def chat(messages, add_generation_prompt=True):
        return tiny_tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=add_generation_prompt)

    as_chat = {"apply_chat_template": True, "fewshot_as_multiturn": shots > 0, "chat_template": chat}
    assert _requests(mirror, shots, **as_chat) == _requests(stock, shots, **as_chat)
