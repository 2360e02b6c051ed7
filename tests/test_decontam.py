import pytest
from conftest import make_record

from sftflow.configs.schema import DecontamConfig, EvalConfig, Source
from sftflow.tasks.data.decontam import NgramIndex, benchmark_items, contaminated, targets
from sftflow.tasks.data.dedup.minhash import words
from sftflow.tasks.data.load import load_source
from sftflow.tasks.evaluation.catalog import BENCHMARKS

BENCH = {"mmlu": ["anatomy", "virology"], "bbh": ["navigate", "boolean_expressions"]}


@pytest.fixture(scope="module")
def index(data_root):
    return NgramIndex(benchmark_items(BENCH, data_root), DecontamConfig())


@pytest.fixture(scope="module")
def clean(data_root):
    recs = []
    for task in ("task888_reviews_classification", "task1312_amazonreview_polarity_classification",
                 "task363_sst2_polarity_classification"):
        recs += load_source(Source(path=f"natural-instructions/tasks/{task}.json", max_records=300), data_root)[0]
    return recs


def test_pasted_mmlu_question_and_bbh_input_are_caught(index, data_root, clean):
    q = BENCHMARKS["mmlu"].rows(data_root / "mmlu", "anatomy", "test")[7]
    nav = BENCHMARKS["bbh"].rows(data_root / "bbh", "navigate", "test")[3]
    planted = [
        make_record(900, f"Answer this.\n{q['question']}\nA. {q['choices'][0]}\nB. {q['choices'][1]}", "A"),
        make_record(901, f"Q: {nav['input']}\nA: Let's think.", nav["target"]),
    ]
    hits = contaminated(clean + planted, index)
    assert hits == {"r0900": {"item": "mmlu/anatomy/test/7", "ngram": hits["r0900"]["ngram"]},
                    "r0901": {"item": "bbh/navigate/test/3", "ngram": hits["r0901"]["ngram"]}}
    assert hits["r0900"]["ngram"] in " ".join(words(q["question"])) and hits["r0901"]["ngram"] in " ".join(words(nav["input"]))


def test_clean_instruction_data_is_untouched(index, clean):
    assert contaminated(clean, index) == {}


def test_short_items_must_appear_whole_and_tiny_ones_are_skipped(data_root):
    cfg = DecontamConfig(ngram=13, min_words=4)
    idx = NgramIndex([("item/short", ["Is the sky blue today"]), ("item/tiny", ["yes or no"])], cfg)
    assert idx.skipped == 1 and idx.sizes == [5]
    assert contaminated([make_record(0, "Q: is the sky blue today? A:", "yes")], idx) == \
        {"r0000": {"item": "item/short", "ngram": "is the sky blue today"}}
    assert contaminated([make_record(1, "is the sky blue", "yes or no")], idx) == {}


def test_template_text_shared_by_many_items_is_not_evidence():
    stem = "Read the following passage carefully and then answer the question that follows it"
    items = [(f"b/{i}", [f"{stem}. Passage number {i} talks about topic {i * 13} in some depth"]) for i in range(10)]
    idx = NgramIndex(items, DecontamConfig(ngram=8, min_words=5, boilerplate_df=5))
    assert contaminated([make_record(0, stem + ". My own passage is new.", "x")], idx) == {}
    assert contaminated([make_record(1, "passage number 4 talks about topic 52 in some depth", "x")], idx) == \
        {"r0001": {"item": "b/4", "ngram": "4 talks about topic 52 in some depth"}}  # "passage number" is stem


def test_targets_follow_the_eval_config():
    cfg = EvalConfig()
    cfg.bbh.enabled = False
    assert targets(cfg) == {"mmlu": "all"}


def test_each_registry_entry_names_the_texts_decontamination_indexes(data_root):
    for name, bench in BENCHMARKS.items():
        for split in bench.splits:
            texts = bench.items(data_root, BENCH[name][0], split)
            assert texts and all(t and all(isinstance(x, str) and x.strip() for x in t) for t in texts), (name, split)
    assert set(targets(EvalConfig())) == set(BENCHMARKS)  # every registered benchmark is decontaminated against


def test_a_short_prompt_shared_by_every_record_is_template_not_a_leak():
    """A system prompt under `ngram` words in every record must not make every train record a test-split leak."""
    prompt = "Classify the movie review as POS or NEG."  # 8 words: shorter than the 13-word n-gram
    test = [(f"t{i}", [prompt, f"an utterly unique test review number {i} about a film called {i}x", "POS"])
            for i in range(10)]
    train = [[prompt, f"a different train review {i} entirely", "NEG"] for i in range(30)]
    index = NgramIndex(test, DecontamConfig(), corpus=train)
    assert index.hit([prompt, "a fresh train review that shares nothing with the test split", "POS"]) is None
    # A real leak is still caught: a train record holding a test review.
    assert index.hit([prompt, "an utterly unique test review number 3 about a film called 3x", "POS"]) == \
        "an utterly unique test review number 3 about a film called 3x"
