"""Online objectives under DDP, FSDP and DeepSpeed ZeRO-2/3: two CPU processes (gloo) generate for different prompts,
score them with a reward model (replicated under DDP, sharded under FSDP and ZeRO-3), log global statistics and stay in
sync. Under FSDP, PPO's passes over rollouts run the LM head in chunks (``logits_chunk_size``) with an entropy bonus:
the policy is its own FSDP root unit, and the chunks run inside its forward.

Half the vocabulary ends a completion, so the processes' completions end at different points: under ZeRO-3, where
every forward pass gathers the weights from both processes, the hf backend must keep their decoding loops in step
(``HFBackend(synchronize=...)``), and RAFT's process that keeps nothing must run as many backward passes as the other.

The runs are part of the launches of tests/two_process_launches.py (one pair of processes per strategy for the whole
suite), whose worker calls :func:`run_objective` for PPO and for RAFT; each process writes what it saw to
``<out>/<objective>-rank<k>.json``.
"""

import json
from pathlib import Path

import pytest
from two_process_launches import on_two_processes


STEPS_PER_BATCH = 2  # ppo_epochs x num_minibatches
BATCHES = 2


def run_objective(out: Path, objective: str, strategy: str, reward_model: str | None) -> None:
    """Train ``objective`` ("ppo" or "raft") on 2 processes under ``strategy``, PPO scoring with ``reward_model``."""
    import lightning.pytorch as L
    import torch
    from lightning.pytorch.callbacks import Callback

    from lit_align.data_modules.prompts import PromptSource, PromptsDataModule
    from lit_align.modules.base import OptimizerConfig
    from lit_align.modules.ppo import PPO
    from lit_align.modules.raft import RAFT

    torch.set_num_threads(1)

    class RecordingPPO(PPO):
        def score(self, items, texts):
            rewards, results = super().score(items, texts)
            self.scored.append({"prompts": [i.prompt for i in items], "texts": texts, "rewards": rewards.tolist(),
                                "stage": "train" if self.trainer.training else "val"})
            return rewards, results

        def update(self, rollouts):
            self.seen.append({"task_ids": [i.task_id for i in rollouts.items], "rewards": rollouts.rewards.tolist(),
                              "lengths": rollouts.response_mask.sum(-1).tolist()})
            return super().update(rollouts)

        def evaluate_step(self, batch, stage):
            self.validated.append(len(batch))
            super().evaluate_step(batch, stage)

    class Record(Callback):
        def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
            metrics = trainer.callback_metrics
            pl_module.logged.append({k: float(metrics[f"train/{k}"]) for k in ("reward_mean", "reward_std", "response_length")})

    class OneRankRAFT(RAFT):
        """Only the first process's samples reach min_reward: the second keeps nothing and must still step along."""

        def score(self, items, texts):
            return torch.full((len(texts),), float(self.global_rank == 0), device=self.device), [None] * len(texts)

        def update(self, rollouts):
            self.seen.append({"task_ids": [i.task_id for i in rollouts.items], "rewards": rollouts.rewards.tolist(),
                              "lengths": rollouts.response_mask.sum(-1).tolist(), "kept": len(self.select(rollouts))})
            return super().update(rollouts)

    early_ends = {"eos_token_ids": list(range(0, 256, 2))}  # completions end at different points on each process
    if objective == "raft":
        # where weights are sharded: the LM head in chunks on the process that trains, a whole-logits zero pass on
        # the one that keeps nothing, both gathering the head's weight in lockstep
        module = OneRankRAFT(max_new_tokens=8, samples_per_prompt=2, keep_fraction=1.0, min_reward=0.5, deduplicate=False,
                             num_minibatches=2, micro_batch_size=1, optimizer=OptimizerConfig(lr=1e-3),
                             generation_kwargs=early_ends,
                             logits_chunk_size=4 if strategy in ("fsdp", "deepspeed3") else None)
    else:
        # scoring passes of 3 pairs: 4 rollouts per batch take two; in validation the process whose batch is empty
        # makes a filler pass where the reward model is sharded
        module = RecordingPPO(max_new_tokens=8, samples_per_prompt=2, ppo_epochs=1, num_minibatches=2,
                              micro_batch_size=1, optimizer=OptimizerConfig(lr=1e-3), generation_kwargs=early_ends,
                              reward="reward_model", reward_model=reward_model, reward_model_batch_size=3,
                              reward_placement="replicate" if strategy == "ddp" else "shard",
                              # under FSDP: the LM head in chunks (the policy its own root unit) with an entropy bonus
                              **({"logits_chunk_size": 4, "entropy_coef": 0.01} if strategy == "fsdp" else {}))
    module.seen, module.logged, module.validated, module.scored = [], [], [], []
    # PPO validates 3 held-out prompts one per batch at the end: 2 on the first process, 1 on the second (which then
    # gets an empty batch, so both run as many validation steps)
    data = PromptsDataModule(train_sources=[PromptSource(split="train", limit=8)],
                             val_sources=[PromptSource(split="heldout", limit=3)] if objective == "ppo" else [],
                             tokenizer="preset:tiny", batch_size=2, eval_batch_size=1)
    if strategy.startswith("deepspeed"):
        from deepspeed_cpu import CPUDeepSpeedStrategy

        strategy = CPUDeepSpeedStrategy(stage=int(strategy[-1]))
    elif strategy == "fsdp":
        from fsdp_cpu import CPUFSDPStrategy
        from transformers.models.llama.modeling_llama import LlamaDecoderLayer

        strategy = CPUFSDPStrategy(auto_wrap_policy={LlamaDecoderLayer})
    trainer = L.Trainer(accelerator="cpu", devices=2, strategy=strategy, use_distributed_sampler=False,
                        max_steps=BATCHES * STEPS_PER_BATCH, logger=False,
                        enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False,
                        num_sanity_val_steps=0, callbacks=[Record()])
    trainer.fit(module, data)
    from test_ddp_objectives import gathered
    from lit_align.models import gathers_weights_per_forward

    with gathered(trainer, module):  # FSDP, ZeRO-3: this process's shards until gathered
        checksum = float(sum(p.double().sum() for p in module.parameters() if p.requires_grad))
    if objective == "ppo":  # the whole reward model, loaded alone in this process once the run is over
        from lit_align.modules.reward import load_reward_model

        scorer = load_reward_model(reward_model)
        for scored in module.scored:
            scored["rescored"] = scorer.score(scored["prompts"], scored["texts"]).tolist()
    (out / f"{objective}-rank{trainer.global_rank}.json").write_text(json.dumps(
        {"seen": module.seen, "logged": module.logged, "checksum": checksum, "world_size": trainer.world_size,
         "global_step": trainer.global_step, "validated": module.validated,
         "val_reward_mean": float(trainer.callback_metrics.get("val/reward_mean", float("nan"))), "scored": module.scored,
         "sharded": gathers_weights_per_forward(module), "chunked_logps": module.chunked_logps.ok,
         "reward_sharded": module.reward_network is not None and gathers_weights_per_forward(module.reward_network)}))


def _ranks(two_process_runs, strategy: str, objective: str) -> tuple[list[dict], str]:
    """What each process saw training ``objective`` under ``strategy`` (the run ``online-<objective>`` of that
    strategy's launch in tests/two_process_launches.py), and the reward model PPO scored with."""
    from two_process_launches import reward_model_of

    out = two_process_runs(strategy, f"online-{objective}")
    ranks = [json.loads((out / f"{objective}-rank{r}.json").read_text()) for r in (0, 1)]
    return ranks, reward_model_of(out.parent, strategy)


def write_reward_model(path: Path) -> None:
    """A reward model whose weights differ from a freshly built one (so a load that silently kept the built weights
    would score differently), at ``path``: a saved directory on the tiny preset, or, when ``path`` ends in ``.ckpt``,
    a Lightning checkpoint of the module on a Qwen2 twin of the preset (the policy is Llama: under ZeRO-3 the reward
    model's own classes must be imported before DeepSpeed's ``zero.Init``, see ``OnlineModule.setup``)."""
    import torch

    from lit_align.modules.reward import RewardModel

    base = "preset:tiny" if path.suffix != ".ckpt" else str(write_qwen2_twin(path.parent / "qwen2-tiny"))
    torch.manual_seed(0)
    rm = RewardModel(model_name_or_path=base)
    rm.configure_model()
    with torch.no_grad():
        for p in rm.parameters():
            p.add_(0.05 * torch.randn_like(p))
    if path.suffix != ".ckpt":
        rm.save_pretrained(path)
        return
    torch.save({"state_dict": rm.state_dict(), "hyper_parameters": dict(rm.hparams)}, path)


def write_qwen2_twin(path: Path) -> Path:
    """A causal LM directory of the Qwen2 architecture with the tiny preset's sizes and tokenizer."""
    import torch
    from transformers import Qwen2Config, Qwen2ForCausalLM

    from lit_align.models import PRESETS, build_byte_tokenizer

    tokenizer = build_byte_tokenizer()
    config = Qwen2Config(vocab_size=len(tokenizer), max_position_embeddings=2048, tie_word_embeddings=False,
                         pad_token_id=tokenizer.pad_token_id, bos_token_id=tokenizer.bos_token_id,
                         eos_token_id=tokenizer.eos_token_id, **PRESETS["tiny"])
    torch.manual_seed(1)
    Qwen2ForCausalLM(config).save_pretrained(path)
    tokenizer.save_pretrained(path)
    return path


@pytest.mark.parametrize("strategy", on_two_processes("ddp", "fsdp", "deepspeed3"))  # ZeRO-2's updates: GRPO in tests/test_deepspeed.py
def test_two_processes_generate_for_different_prompts_and_log_global_statistics(two_process_runs, strategy):
    import torch

    from lit_align.modules.reward import load_reward_model

    ranks, reward_model = _ranks(two_process_runs, strategy, "ppo")
    assert [r["world_size"] for r in ranks] == [2, 2]
    assert ranks[0]["sharded"] == ranks[0]["reward_sharded"] == (strategy in ("deepspeed3", "fsdp"))
    if strategy == "fsdp":  # PPO's passes over rollouts through the chunked head, with the entropy bonus, on both
        assert ranks[0]["chunked_logps"] is ranks[1]["chunked_logps"] is True
    # every process's rewards are the whole reward model's for its prompts and completions: loaded alone, after the run,
    # in the same process (under ZeRO-3 on another architecture than the policy's, whose classes outlive zero.Init)
    # and here
    scorer = load_reward_model(reward_model)
    for r in ranks:
        for scored in r["scored"]:
            torch.testing.assert_close(torch.tensor(scored["rewards"]), torch.tensor(scored["rescored"]),
                                       atol=1e-5, rtol=1e-4)
            torch.testing.assert_close(torch.tensor(scored["rewards"]), scorer.score(scored["prompts"], scored["texts"]),
                                       atol=1e-5, rtol=1e-4)
    # validation: the same number of steps on both processes, the second's last one empty; one global reward mean
    assert ranks[0]["validated"] == [1, 1] and ranks[1]["validated"] == [1, 0]
    val_rewards = [x for r in ranks for scored in r["scored"] if scored["stage"] == "val" for x in scored["rewards"]]
    assert len(val_rewards) == 3
    assert ranks[0]["val_reward_mean"] == ranks[1]["val_reward_mean"] == pytest.approx(sum(val_rewards) / 3, abs=1e-5)
    lengths = [s["lengths"] for r in ranks for s in r["seen"]]
    assert any(a != b for a, b in zip(lengths[0::2], lengths[1::2]))  # the processes' completions end differently
    assert [r["global_step"] for r in ranks] == [BATCHES * STEPS_PER_BATCH] * 2
    for b in range(BATCHES):
        seen = [r["seen"][b] for r in ranks]
        # each process generated for its own prompts (2 prompts x 2 samples)
        assert all(len(s["task_ids"]) == 4 for s in seen)
        assert not set(seen[0]["task_ids"]) & set(seen[1]["task_ids"])
        rewards = seen[0]["rewards"] + seen[1]["rewards"]
        mean = sum(rewards) / len(rewards)
        std = (sum((x - mean) ** 2 for x in rewards) / len(rewards)) ** 0.5
        lengths = seen[0]["lengths"] + seen[1]["lengths"]
        for r in ranks:  # the logged figures are the global ones, on both processes
            assert r["logged"][b]["reward_mean"] == pytest.approx(mean, abs=1e-4)
            assert r["logged"][b]["reward_std"] == pytest.approx(std, abs=1e-3)
            assert r["logged"][b]["response_length"] == pytest.approx(sum(lengths) / len(lengths), abs=1e-4)
    # gradients were averaged over processes: the trained weights are identical
    assert ranks[0]["checksum"] == pytest.approx(ranks[1]["checksum"], abs=1e-9)


@pytest.mark.parametrize("strategy", on_two_processes("ddp", "fsdp", "deepspeed2", "deepspeed3"))
def test_raft_process_that_keeps_nothing_still_steps_with_the_other(two_process_runs, strategy):
    """Under FSDP and ZeRO-3 with the LM head in chunks: the run's one check of the chunked head runs on both processes
    before the update (its passes gather the sharded weights; the process keeping nothing would never make them, and
    the other waited for it forever), then one trains through the chunked head while the other makes zero passes."""
    ranks, _ = _ranks(two_process_runs, strategy, "raft")
    assert [r["global_step"] for r in ranks] == [BATCHES * STEPS_PER_BATCH] * 2
    assert [s["kept"] for s in ranks[0]["seen"]] == [4, 4] and [s["kept"] for s in ranks[1]["seen"]] == [0, 0]
    assert ranks[0]["checksum"] == pytest.approx(ranks[1]["checksum"], abs=1e-9)
    if strategy in ("fsdp", "deepspeed3"):
        assert ranks[0]["chunked_logps"] is ranks[1]["chunked_logps"] is True
