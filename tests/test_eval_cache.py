"""Fine-tuned models evaluated by content: a LoRA adapter merged in memory scores as the unmerged one, and an
unchanged model is never evaluated twice (lm-eval items and the held-out comparison both come from the cache)."""

import shutil

import pytest
from conftest import make_record

from sftflow.configs.schema import BenchmarkConfig, EvalConfig, HeldoutConfig
from sftflow.models import model_digest
from sftflow.records import write_jsonl
from sftflow.tasks.evaluation.heldout import heldout
from sftflow.tasks.evaluation.lmeval import lm_eval_model, model_items
from sftflow.tasks.evaluation.mirror import sweep_tasks


def _adapter(base: str, folder, seed: int):
    """A LoRA adapter with random (non-zero) B matrices, so it changes the base model's outputs."""
    import torch
    from peft import LoraConfig, get_peft_model

    from sftflow.models import load_causal_lm

    torch.manual_seed(seed)
    peft_model = get_peft_model(load_causal_lm(base), LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"],
                                                                 init_lora_weights=False))
    peft_model.save_pretrained(folder)
    return str(folder)


@pytest.fixture(scope="module")
def adapter(tmp_path_factory, tiny_model) -> str:
    return _adapter(tiny_model, tmp_path_factory.mktemp("adapter"), seed=0)


def _loglikelihoods(lm) -> list[float]:
    from lm_eval.api.instance import Instance

    pairs = [("Question: which of the following is true? Answer:", " A"), ("The movie was", " great"),
             ("True and False or not True is", " False")]
    requests = [Instance(request_type="loglikelihood", doc={}, arguments=pair, idx=i) for i, pair in enumerate(pairs)]
    return [ll for ll, _ in lm.loglikelihood(requests)]


def test_a_merged_lora_scores_as_the_unmerged_adapter(tiny_model, adapter):
    from lm_eval.models.huggingface import HFLM
    from peft import PeftModel

    cfg = EvalConfig(batch_size=2)
    merged = lm_eval_model({"path": tiny_model, "adapter": adapter, "tokenizer": tiny_model}, cfg, False)
    assert not isinstance(merged.model, PeftModel)  # folded into plain Linear weights
    unmerged = HFLM(pretrained=tiny_model, peft=adapter, tokenizer=tiny_model, batch_size=2, device="cpu",
                    dtype="float32")
    assert isinstance(unmerged.model, PeftModel)
    base = _loglikelihoods(lm_eval_model({"path": tiny_model}, cfg, False))
    ours, theirs = _loglikelihoods(merged), _loglikelihoods(unmerged)
    assert max(abs(a - b) for a, b in zip(ours, theirs)) < 1e-3
    assert max(abs(a - b) for a, b in zip(ours, base)) > 1e-2  # the adapter does change the scores


def test_adapter_digest_follows_the_weights_not_the_folder(tmp_path, tiny_model, adapter):
    copy = shutil.copytree(adapter, tmp_path / "copy")
    (copy / "training_args.json").write_text("{}")  # where/when it trained: not part of the model
    assert model_digest(tiny_model, str(copy)) == model_digest(tiny_model, adapter) != model_digest(tiny_model)
    other = _adapter(tiny_model, tmp_path / "other", seed=1)
    assert model_digest(tiny_model, other) != model_digest(tiny_model, adapter)
    assert model_digest("org/model") == "hub:org/model"


def test_an_unchanged_fine_tuned_model_is_evaluated_once(tmp_path, data_root, tiny_model, adapter):
    ft = {"path": tiny_model, "adapter": adapter, "tokenizer": tiny_model, "digest": model_digest(tiny_model, adapter)}
    cfg = EvalConfig(benchmark_root=str(data_root), mmlu=BenchmarkConfig(subtasks=["anatomy"], limit=2, num_fewshot=0),
                     bbh=BenchmarkConfig(enabled=False, num_fewshot=3), batch_size=2, seed=4242)
    tasks = sweep_tasks(cfg, tmp_path / "tasks")
    first, info1 = model_items(ft, tasks, tmp_path / "tasks", cfg, False)
    assert (info1["evaluated_tasks"], info1["cached_tasks"]) == (1, 0)
    second, info2 = model_items(ft, tasks, tmp_path / "tasks", cfg, False)
    assert (info2["evaluated_tasks"], info2["cached_tasks"], info2["wall_s"]) == (0, 1, 0.0)
    assert second == first


def test_an_unchanged_heldout_comparison_loads_no_model(tmp_path, tiny_model, adapter):
    # Copies, so that moving them away proves the rerun never reads the weights.
    base = str(shutil.copytree(tiny_model, tmp_path / "base"))
    lora = str(shutil.copytree(adapter, tmp_path / "lora"))
    write_jsonl(tmp_path / "test.jsonl", [make_record(i, f"heldout cache review {i}", "POS" if i % 2 else "NEG",
                                                      label="POS" if i % 2 else "NEG") for i in range(6)])
    models = {"base": {"path": base, "digest": model_digest(base)},
              "ft": {"path": base, "adapter": lora, "digest": model_digest(base, lora)}}
    cfg = HeldoutConfig(max_new_tokens=3, examples=2)
    run = lambda name: heldout(str(tmp_path / "test.jsonl"), models, cfg, tmp_path / name, bootstrap_iters=100,  # noqa: E731
                               chat_tokenizer=str(tmp_path / "tok"))
    shutil.copytree(tiny_model, tmp_path / "tok")  # the training tokenizer folder, kept in place
    first = run("run1")
    assert first["metrics"]["heldout/cache_hit"] == 0
    shutil.move(base, tmp_path / "gone-base")
    shutil.move(lora, tmp_path / "gone-lora")
    second = run("run2")
    assert second["metrics"]["heldout/cache_hit"] == 1
    work = ("cache_hit", "cached_items", "evaluated_items", "wall_s")  # what each run did, not what it measured
    assert {k: v for k, v in second["metrics"].items() if k.rsplit("/", 1)[-1] not in work} == \
        {k: v for k, v in first["metrics"].items() if k.rsplit("/", 1)[-1] not in work}
    assert second["metrics"]["heldout/ft/evaluated_items"] == 0 < second["metrics"]["heldout/ft/cached_items"]
    assert (tmp_path / "run2" / "predictions.jsonl").read_text() == (tmp_path / "run1" / "predictions.jsonl").read_text()
    # Another setting is another comparison: it needs the models again.
    with pytest.raises(OSError):
        heldout(str(tmp_path / "test.jsonl"), models, HeldoutConfig(max_new_tokens=4), tmp_path / "run3",
                bootstrap_iters=100, chat_tokenizer=str(tmp_path / "tok"))
    assert heldout(str(tmp_path / "test.jsonl"), {"base": {"path": tiny_model}}, cfg, tmp_path / "run4",
                   bootstrap_iters=100)["metrics"]["heldout/cache_hit"] == 0  # no digest: never cached


def test_handing_lm_eval_a_loaded_model_prints_no_warning_about_it(tiny_model, caplog):
    import logging

    with caplog.at_level(logging.WARNING, logger="lm_eval"):
        lm_eval_model({"path": tiny_model}, EvalConfig(), trust_remote_code=False)
    assert not [r for r in caplog.records if "pretrained" in r.getMessage() or "already-initialized" in r.getMessage()]
