import json
from pathlib import Path

import mlflow
import pytest
import torch
from conftest import cpu_only, cuda_only
from safetensors.torch import load_file

from sftflow.configs.training import TrainConfig
from sftflow.models import load_tokenizer
from sftflow.precision import current_card
from sftflow.records import read_jsonl
from sftflow.tasks.training import compat
from sftflow.tasks.training.setup import TrainSetupError, check_hardware, kernels, precision
from sftflow.tasks.training.train import train
from sftflow.tasks.training.trainer import build_trainer


def run_train(tmp_path, token_paths, tiny_model, **cfg):
    with mlflow.start_run(run_name="unit-train"):
        return train(token_paths, tiny_model, TrainConfig(**cfg), out_dir=tmp_path)


def test_lora_trains_only_adapters_learns_and_saves_safetensors(tmp_path, token_paths, tiny_model):
    out = run_train(tmp_path, token_paths, tiny_model, method="lora", lora={"r": 4, "alpha": 8},
                    learning_rate=5e-3, max_steps=30, batch_size=4, logging_steps=5, warmup_ratio=0.0)
    m = out["metrics"]
    assert 0 < m["train/trainable_params"] < m["train/total_params"] / 5
    assert m["train/steps"] == 30 and m["train/tokens_seen"] > 0
    history = json.loads((tmp_path / "log_history.json").read_text())
    losses = [h["loss"] for h in history if "loss" in h]
    assert losses[-1] < losses[0]  # it learns the two labels
    adapter = tmp_path / "adapter"
    assert (adapter / "adapter_model.safetensors").exists() and not list(adapter.glob("*.bin"))
    assert out["adapter_path"] == str(adapter) and out["model_path"] == tiny_model
    assert (adapter / "tokenizer_config.json").exists()
    assert (tmp_path / "training_curves.png").stat().st_size > 1000


def test_full_fine_tuning_trains_every_weight(tmp_path, token_paths, tiny_model):
    out = run_train(tmp_path, token_paths, tiny_model, method="full", learning_rate=1e-3, max_steps=4,
                    batch_size=4, logging_steps=2)
    assert out["metrics"]["train/trainable_params"] == out["metrics"]["train/total_params"]
    assert out["adapter_path"] is None
    weights = load_file(tmp_path / "model" / "model.safetensors")
    base = load_file(f"{tiny_model}/model.safetensors")
    changed = [k for k in base if not (weights[k] == base[k]).all()]
    assert changed, "full fine-tuning left every weight unchanged"


def test_step_metrics_reach_the_active_mlflow_run(tmp_path, token_paths, tiny_model):
    with mlflow.start_run(run_name="unit-curves") as run:
        train(token_paths, tiny_model, TrainConfig(max_steps=4, batch_size=4, logging_steps=2, eval_steps=2),
              out_dir=tmp_path)
    client = mlflow.tracking.MlflowClient()
    assert [m.step for m in client.get_metric_history(run.info.run_id, "train/loss")] == [2, 4]
    assert client.get_metric_history(run.info.run_id, "train/eval_loss")


def changed_weights(saved: Path, tiny_model) -> set[str]:
    weights, base = load_file(saved), load_file(f"{tiny_model}/model.safetensors")
    return {k for k in base if not torch.equal(weights[k], base[k])}


def test_frozen_first_block_and_embeddings_stay_unchanged(tmp_path, token_paths, tiny_model):
    out = run_train(tmp_path, token_paths, tiny_model, method="frozen", freeze={"first_layers": 1},
                    learning_rate=1e-3, max_steps=3, batch_size=4, logging_steps=1)
    changed = changed_weights(tmp_path / "model" / "model.safetensors", tiny_model)
    assert not any(k.startswith("model.layers.0.") or "embed_tokens" in k for k in changed)
    assert any(k.startswith("model.layers.1.") for k in changed)
    m = out["metrics"]
    assert 0 < m["train/trainable_params"] < m["train/total_params"]
    assert out["params"]["train.frozen_params"] == 1 + sum(1 for _ in load_file(
        f"{tiny_model}/model.safetensors") if _.startswith("model.layers.0."))


def test_frozen_by_name_pattern(tmp_path, token_paths, tiny_model):
    run_train(tmp_path, token_paths, tiny_model, method="frozen", freeze={"patterns": [r"\.mlp\."]},
              learning_rate=1e-3, max_steps=2, batch_size=4, logging_steps=1)
    changed = changed_weights(tmp_path / "model" / "model.safetensors", tiny_model)
    assert changed and not any(".mlp." in k for k in changed)
    assert any(".self_attn." in k for k in changed)


def test_lora_default_targets_come_from_the_architecture_registry(tmp_path, token_paths, tiny_model):
    trainer, params = build_trainer(token_paths, tiny_model, TrainConfig(max_steps=1), tmp_path)
    targets = json.loads(params["train.lora.target_modules_resolved"])
    assert targets == ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
    adapted = {n.split(".")[-4] for n, p in trainer.model.named_parameters() if p.requires_grad}
    assert adapted == set(targets)


@cpu_only
def test_qlora_on_cpu_fails_before_loading_anything(tmp_path, token_paths):
    cfg = TrainConfig(method="qlora")
    with pytest.raises(TrainSetupError, match="needs a CUDA GPU"):
        check_hardware(cfg)
    # A model path that does not exist: the error must come from the setup check, not from loading.
    with pytest.raises(TrainSetupError, match="qlora"):
        build_trainer(token_paths, "/nonexistent/model", cfg, tmp_path)


@cpu_only
def test_fp16_on_cpu_is_a_clear_error_and_bf16_runs_on_any_cpu():
    from sftflow.precision import CPU, cpu_card

    with pytest.raises(TrainSetupError, match="fp16.*needs a CUDA GPU"):
        check_hardware(TrainConfig(precision="fp16"))
    for cpu in (CPU, cpu_card({"avx512_bf16": True})):  # autocast: slower without the instructions, but right
        check_hardware(TrainConfig(precision="bf16"), cpu)
    assert precision(TrainConfig()) == "fp32"  # auto with SFTFLOW_CPU_BF16=0, as the suite runs


@pytest.mark.parametrize("capability", [(7, 0), (7, 5)], ids=["V100", "T4"])
def test_explicit_bf16_on_a_pre_ampere_card_is_a_clear_error_and_fp16_is_not(capability):
    from sftflow.precision import Card

    card = Card(capability, native_bf16=True, name="Tesla T4")  # torch counting emulation would say True
    with pytest.raises(TrainSetupError, match=r"bf16.*compute capability 7\.\d.*'fp16'"):
        check_hardware(TrainConfig(precision="bf16"), card)
    check_hardware(TrainConfig(precision="fp16"), card)
    check_hardware(TrainConfig(precision="bf16"), Card((8, 0), native_bf16=True, name="NVIDIA A100-SXM4-80GB"))


def test_method_and_freeze_are_validated_together():
    with pytest.raises(ValueError, match="needs freeze"):
        TrainConfig(method="frozen")
    with pytest.raises(ValueError, match="applies to method 'frozen' only"):
        TrainConfig(method="lora", freeze={"patterns": ["mlp"]})
    with pytest.raises(ValueError, match="does not apply to method 'full'"):
        TrainConfig(method="full", freeze={"first_layers": 1})


def test_lora_skips_the_first_blocks_and_backpropagation_stops_above_them(tmp_path, token_paths, tiny_model):
    cfg = TrainConfig(method="lora", freeze={"first_layers": 1}, max_steps=1, batch_size=4)
    trainer, _ = build_trainer(token_paths, tiny_model, cfg, tmp_path)
    adapted = {n.split(".layers.")[1].split(".")[0] for n, p in trainer.model.named_parameters() if p.requires_grad}
    assert adapted == {"1"}  # the tiny model has blocks 0 and 1
    needs_grad = {}  # whether a block's output is part of the autograd graph

    def record(i):
        def hook(module, args, out):
            needs_grad[i] = (out[0] if isinstance(out, tuple) else out).requires_grad
        return hook

    for i, block in enumerate(trainer.model.base_model.model.model.layers):
        block.register_forward_hook(record(i))
    batch = next(iter(trainer.get_train_dataloader()))
    trainer.model(**{k: v for k, v in batch.items() if k in ("input_ids", "labels", "position_ids")})
    assert needs_grad == {0: False, 1: True}
    with pytest.raises(TrainSetupError, match="leaves no block to adapt"):
        build_trainer(token_paths, tiny_model, TrainConfig(freeze={"first_layers": 2}), tmp_path / "all")


def test_merged_model_matches_base_plus_adapter_and_carries_the_chat_template(tmp_path, token_paths, tiny_model):
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    out = run_train(tmp_path, token_paths, tiny_model, method="lora", merge_adapter=True, learning_rate=5e-3,
                    max_steps=3, batch_size=4, logging_steps=1)
    merged_dir = tmp_path / "merged"
    assert out["model_path"] == str(merged_dir) and (merged_dir / "model.safetensors").exists()
    saved_template = (merged_dir / "chat_template.jinja").read_text()
    assert saved_template == load_tokenizer(token_paths["tokenizer"]).chat_template
    ids = torch.tensor([json.loads(open(token_paths["train"]).readline())["input_ids"]])
    merged = AutoModelForCausalLM.from_pretrained(merged_dir).eval()
    with_adapter = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(tiny_model),
                                             str(tmp_path / "adapter")).eval()
    base = AutoModelForCausalLM.from_pretrained(tiny_model).eval()
    with torch.no_grad():
        a, b, c = merged(ids).logits, with_adapter(ids).logits, base(ids).logits
    assert torch.allclose(a, b, atol=1e-4) and not torch.allclose(a, c, atol=1e-4)


def test_trained_tokens_are_the_assistant_tokens_of_an_epoch(tmp_path, token_paths, tiny_model):
    out = run_train(tmp_path, token_paths, tiny_model, method="lora", epochs=1, batch_size=4, logging_steps=1)
    masks = [r["assistant_masks"] for r in read_jsonl(Path(token_paths["train"]))]
    assert out["metrics"]["train/trained_tokens"] == sum(map(sum, masks))
    assert out["metrics"]["train/tokens_seen"] == sum(map(len, masks))
    history = json.loads((tmp_path / "log_history.json").read_text())
    assert any("grad_norm" in h for h in history)


def test_loss_from_trained_positions_only_equals_the_models_own_loss(tiny_model):
    """The CPU loss asks the model for the logits of trained positions only; value and gradients must not change."""
    from transformers import AutoModelForCausalLM

    from sftflow.tasks.training.trainer import projected_loss, trained_positions

    torch.manual_seed(0)
    ids = torch.randint(3, 200, (3, 24))
    labels = torch.full_like(ids, -100)
    labels[0, 5:9], labels[1, 20:], labels[2, 12:14] = ids[0, 5:9], ids[1, 20:], ids[2, 12:14]
    model = AutoModelForCausalLM.from_pretrained(tiny_model)
    grads = {}
    for name in ("own", "projected"):
        model.zero_grad()
        if name == "own":
            loss = model(input_ids=ids, labels=labels, num_items_in_batch=7).loss
        else:
            out = model(input_ids=ids, logits_to_keep=trained_positions(labels))
            assert out.logits.shape[1] == len(trained_positions(labels)) < ids.shape[1] - 1
            loss = projected_loss(out, labels, num_items_in_batch=7)
        loss.backward()
        grads[name] = (loss.item(), model.lm_head.weight.grad.clone(), model.model.layers[0].mlp.up_proj.weight.grad)
    assert grads["projected"][0] == pytest.approx(grads["own"][0], rel=1e-5)
    for own, projected in zip(grads["own"][1:], grads["projected"][1:]):
        assert torch.allclose(own, projected, atol=1e-6)


@pytest.mark.parametrize("on", [False, True])
def test_gradient_checkpointing_follows_the_config_not_trls_default(tmp_path, token_paths, tiny_model, on):
    trainer, _ = build_trainer(token_paths, tiny_model, TrainConfig(method="full", gradient_checkpointing=on,
                                                                    max_steps=1), tmp_path)
    # Under the name this transformers release has (compat.checkpointing_arg), never TRL's default.
    (field,) = compat.checkpointing_arg(on)
    assert getattr(trainer.args, field) is on and trainer.args.gradient_checkpointing is on
    trainer.train()
    assert trainer.model.is_gradient_checkpointing is on


@cpu_only
def test_liger_kernels_on_cpu_are_a_clear_error_and_auto_turns_them_off():
    with pytest.raises(TrainSetupError, match="kernels 'liger' needs a CUDA GPU"):
        check_hardware(TrainConfig(kernels="liger"))
    assert kernels(TrainConfig()) == "none"


@cuda_only
def test_on_cuda_auto_trains_in_half_precision_with_every_parameter_on_the_gpu(tmp_path, token_paths, tiny_model):
    card = current_card()
    assert precision(TrainConfig()) == ("bf16" if torch.cuda.get_device_capability() >= (8, 0) else "fp16")
    trainer, params = build_trainer(token_paths, tiny_model, TrainConfig(max_steps=2, batch_size=4), tmp_path)
    assert all(p.device.type == "cuda" for p in trainer.model.parameters())
    assert params["train.kernels_resolved"] == ("liger" if compat.liger_available() else "none")
    assert trainer.args.use_liger_kernel is (params["train.kernels_resolved"] == "liger")
    # From 8.0 a fused varlen kernel, not a Python loop; older cards take the per-record path.
    assert ("per-record" in params["train.attention"]) == (not card.ampere)
    trainer.train()


@cuda_only
def test_qlora_trains_4bit_layers_and_saves_an_adapter(tmp_path, token_paths, tiny_model):
    pytest.importorskip("bitsandbytes")
    out = run_train(tmp_path, token_paths, tiny_model, method="qlora", lora={"r": 4, "alpha": 8},
                    max_steps=4, batch_size=4, logging_steps=2)
    assert (tmp_path / "adapter" / "adapter_model.safetensors").exists() and out["adapter_path"]
    trainer, _ = build_trainer(token_paths, tiny_model, TrainConfig(method="qlora", max_steps=1), tmp_path / "q")
    assert sum(type(m).__name__ == "Linear4bit" for m in trainer.model.modules()) > 0


def test_a_4bit_parameter_counts_the_weights_it_packs():
    """bitsandbytes stores two 4-bit weights per byte; QLoRA's parameter count (and gpu_check's MFU) must not halve."""
    from types import SimpleNamespace

    from sftflow.tasks.training.trainer import weights

    packed = torch.nn.Parameter(torch.zeros(16, 1, dtype=torch.uint8), requires_grad=False)
    packed.quant_state = SimpleNamespace(shape=torch.Size([4, 8]))  # what Params4bit keeps of the unpacked shape
    assert weights(packed) == 32 and weights(torch.nn.Parameter(torch.zeros(3, 5))) == 15
