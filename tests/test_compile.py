"""``torch_compile``: each transformer block compiled in place for the training forward and backward; generation runs
the blocks eager; parameter names, checkpoints and the numbers stay those of the uncompiled model."""
import lightning.pytorch as L
import pytest
import torch
from torch._dynamo.utils import counters

from lit_align.data_modules.sft import SFTDataModule
from lit_align.data_modules.sources import DataSource
from lit_align.generation.base import SamplingParams
from lit_align.generation.hf import HFBackend
from lit_align.models import LoRAConfig, apply_lora, compile_blocks, load_causal_lm, load_tokenizer
from lit_align.modules.base import OptimizerConfig
from lit_align.modules.dpo import DPO
from lit_align.modules.sft import SFT


def test_compile_blocks_compiles_each_block_and_keeps_the_parameter_names():
    model = apply_lora(load_causal_lm("preset:tiny"), LoRAConfig(r=4))
    names, keys = [n for n, _ in model.named_parameters()], list(model.state_dict())
    assert compile_blocks(model) == model.config.num_hidden_layers == 4
    blocks = [m for m in model.modules() if type(m).__name__ == "LlamaDecoderLayer"]
    assert len(blocks) == 4 and all(b._compiled_call_impl is not None for b in blocks)
    assert [n for n, _ in model.named_parameters()] == names and list(model.state_dict()) == keys
    with pytest.raises(ValueError, match=r"torch_compile: found no transformer block to compile in Sequential"):
        compile_blocks(torch.nn.Sequential(torch.nn.Linear(2, 2)))


class RecordLosses(L.Callback):
    def __init__(self):
        self.losses = []

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        self.losses.append(float(outputs["loss"]))


def _fit(tmp_path, pairs_file, torch_compile: bool) -> tuple[SFT, list[float]]:
    torch.manual_seed(0)
    module = SFT(lora=LoRAConfig(r=4, dropout=0.0), torch_compile=torch_compile,
                 optimizer=OptimizerConfig(lr=1e-2, schedule="constant"))
    data = SFTDataModule(train_sources=[DataSource(path=pairs_file)], val_fraction=0.0, tokenizer="preset:tiny",
                         max_length=128, batch_size=4, seed=0)
    record = RecordLosses()
    trainer = L.Trainer(max_steps=4, accelerator="cpu", logger=False, enable_progress_bar=False,
                        enable_model_summary=False, default_root_dir=tmp_path, callbacks=[record],
                        num_sanity_val_steps=0, limit_val_batches=0)
    trainer.fit(module, datamodule=data)
    return module, record.losses


def test_a_compiled_sft_run_trains_as_the_eager_one_and_generates_eager(tmp_path, pairs_file):
    """Four SFT steps (LoRA) with compiled blocks give the eager run's losses and adapter weights to float rounding
    (inductor fuses the blocks' elementwise work, which rounds otherwise), and an adapter-only checkpoint with the
    same keys. Generating from the compiled policy compiles nothing (the blocks run eager there) and gives the
    completions the uncompiled model with the same weights gives."""
    eager, eager_losses = _fit(tmp_path / "eager", pairs_file, torch_compile=False)
    counters.clear()
    compiled, compiled_losses = _fit(tmp_path / "compiled", pairs_file, torch_compile=True)
    assert counters["stats"]["unique_graphs"] >= 1  # the blocks did run compiled
    assert compiled_losses == pytest.approx(eager_losses, rel=1e-4) and len(compiled_losses) == 4
    # LoRA's B matrices start at zero, so their norm is how far training moved them; the runs differ by a ten-
    # thousandth of that (Adam's normalised steps turn rounding in near-zero gradients into a few larger elements)
    b = {name: weight for name, weight in eager.model.named_parameters() if "lora_B" in name}
    moved = torch.sqrt(sum((w ** 2).sum() for w in b.values()))
    apart = torch.sqrt(sum(((w - b[n]) ** 2).sum() for n, w in compiled.model.named_parameters() if n in b))
    assert len(b) == 28 and moved > 0 and apart < 1e-3 * moved, (apart, moved)
    checkpoints = [torch.load(m.trainer.checkpoint_callback.last_model_path or
                              m.trainer.checkpoint_callback.best_model_path, weights_only=False)["state_dict"]
                   for m in (eager, compiled)]
    assert sorted(checkpoints[0]) == sorted(checkpoints[1]) and all("lora_" in k for k in checkpoints[1])

    tokenizer = load_tokenizer("preset:tiny", padding_side="left")
    prompts = ["def add(a, b):\n", "def square(x):\n    return"]
    greedy = SamplingParams(max_new_tokens=12, temperature=0.0)
    graphs = counters["stats"]["unique_graphs"]
    from_compiled = HFBackend(compiled.model, tokenizer).generate(prompts, greedy)
    assert counters["stats"]["unique_graphs"] == graphs  # no compilation for decoding's shapes
    plain = apply_lora(load_causal_lm("preset:tiny"), LoRAConfig(r=4, dropout=0.0))
    plain.load_state_dict(compiled.model.state_dict())
    from_plain = HFBackend(plain, tokenizer).generate(prompts, greedy)
    assert [c[0].token_ids for c in from_compiled] == [c[0].token_ids for c in from_plain]
    assert all(len(c[0].token_ids) > 0 for c in from_plain)


def test_torch_compile_is_refused_under_fsdp_and_zero3_not_ddp_or_zero2():
    """Tried and failing, so refused by name before the model is built (the CLI asks before the run directory is made):
    FSDP (the compiler fails on its flat parameters) and DeepSpeed ZeRO-3 (it recompiles at every layer for ZeRO-3's
    gather hooks). One device, DDP and ZeRO-2 compile (ZeRO-2's run: tests/test_deepspeed.py)."""
    from lightning.pytorch.strategies import DDPStrategy, DeepSpeedStrategy, FSDPStrategy, SingleDeviceStrategy

    def deepspeed(stage: int) -> DeepSpeedStrategy:  # (its config alone: no deepspeed import needed)
        strategy = DeepSpeedStrategy.__new__(DeepSpeedStrategy)
        strategy.config = {"zero_optimization": {"stage": stage}}
        return strategy

    module = SFT(torch_compile=True)
    with pytest.raises(ValueError, match=r"torch_compile is not supported with trainer.strategy FSDPStrategy "
                                         r"\(torch's compiler fails on FSDP's flat parameters"):
        module.refuse_unsupported_compile(FSDPStrategy())
    with pytest.raises(ValueError, match=r"torch_compile is not supported with DeepSpeed ZeRO stage 3 .*; use "
                                         r"deepspeed_stage_2"):
        module.refuse_unsupported_compile(deepspeed(3))
    for strategy in (DDPStrategy(), SingleDeviceStrategy(torch.device("cpu")), deepspeed(2), deepspeed(1), None):
        module.refuse_unsupported_compile(strategy)
    SFT(torch_compile=False).refuse_unsupported_compile(FSDPStrategy())
    SFT(torch_compile=False).refuse_unsupported_compile(deepspeed(3))


def test_compiled_dpo_runs_full_sequences_with_one_graph_per_mode_and_the_eager_loss():
    """A prompt-sharing pass fills a KV cache layer by layer, which compiled blocks would see differently at each layer
    (a recompilation each, up to dynamo's limit): with torch_compile DPO runs the 2B full sequences instead. Two
    training steps compile a handful of graphs (policy; adapter-disabled reference), not one per layer, and the loss
    is the eager shared-prompt module's."""
    from lit_align.data_modules.preference import PreferenceDataModule

    data = PreferenceDataModule(tokenizer="preset:tiny", max_pairs_per_problem=2, batch_size=4)
    data.setup()
    batch = data.collate(data.train_items[::97][:5])
    modules = {}
    for compiled in (False, True):
        torch.manual_seed(0)
        module = DPO(lora=LoRAConfig(r=4, dropout=0.0), torch_compile=compiled)
        module.configure_model()
        gen = torch.Generator().manual_seed(0)
        with torch.no_grad():
            for name, weight in module.model.named_parameters():
                if "lora_B" in name:
                    weight.copy_(torch.randn(weight.shape, generator=gen) * 0.05)
        module.log_metrics = lambda *a, **k: None
        modules[compiled] = module.train()
    assert modules[False]._use_prompt_sharing(batch) and not modules[True]._use_prompt_sharing(batch)
    counters.clear()
    losses = {compiled: [float(m.training_step(batch, i).detach()) for i in range(2)] for compiled, m in modules.items()}
    assert losses[True] == pytest.approx(losses[False], rel=1e-5)
    assert 1 <= counters["stats"]["unique_graphs"] <= 4, dict(counters["stats"])


def test_a_compiled_grpo_run_updates_as_the_eager_one():
    """An online objective: rollouts generated eager, their log-probs and the updates through the compiled blocks.
    Three GRPO steps on scripted completions (tests/test_grpo.py) move log pi(canonical) - log pi(bare pass) as the
    eager run does, to float rounding."""
    from test_grpo import ScriptedGRPO, _data, _trainer

    margins = {}
    for compiled in (False, True):
        torch.manual_seed(0)
        module = ScriptedGRPO(samples_per_prompt=2, beta=0.0, optimizer=OptimizerConfig(lr=1e-3),
                              execution_timeout_s=2.0, torch_compile=compiled)
        seen = margins[compiled] = []

        class Record(L.Callback):
            def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
                logps = pl_module.rollout_statistics(pl_module.scripted)["old_logps"].sum(-1)
                seen.extend((logps[0::2] - logps[1::2]).tolist())

        torch._dynamo.reset()  # graphs compiled by earlier tests (dynamic shapes) would be reused, not counted
        counters.clear()
        _trainer(3, [Record()]).fit(module, _data())
        assert (counters["stats"]["unique_graphs"] >= 1) is compiled  # the compiled run's blocks did run compiled
    assert len(margins[True]) == 6 and margins[True][-1] > margins[True][0]  # the updates moved the margins
    assert margins[True] == pytest.approx(margins[False], rel=1e-4, abs=1e-3)
