"""What the online objectives (PPO, GRPO, RAFT) share: rollouts, rewards, reference log-probs, manual optimization.

A training batch is a :class:`~lit_align.data_modules.prompts.PromptBatch`. Each ``training_step``:

1. generates ``samples_per_prompt`` completions per prompt through a generation backend (the live policy in eval
   mode under ``no_grad`` for ``hf``; LoRA active),
2. scores them: the unit-test reward of the execution layer (sandboxed, never in this process) or a trained reward
   model,
3. hands the scored :class:`Rollouts` to the objective's :meth:`OnlineModule.update`, which runs its optimizer steps
   itself (``automatic_optimization = False``): :meth:`OnlineModule.run_updates` does the epochs x minibatches loop,
   micro-batch gradient accumulation, gradient clipping (``max_grad_norm``) and a scheduler step per optimizer step,
4. logs the global (all-process) reward mean/std, status fractions and response length with the update's figures.

Under DDP each process generates for its own prompts (the DataModule shards them) and the statistics are reduced
over processes before logging. ``trainer.global_step`` counts optimizer steps, so ``max_steps`` is a number of
optimizer steps and a training batch advances it by :meth:`OnlineModule.optimizer_steps_per_batch`.

Rollout tensors use one layout: prompts left-padded to a common width P, responses right-padded to T, so the
response of every row occupies columns P..P+T-1 and per-token tensors are "response-aligned" (N, T) as
:mod:`lit_align.losses` expects.
"""

from __future__ import annotations

import math
import time
from collections import defaultdict
from collections.abc import Callable, Iterator
from contextlib import contextmanager, nullcontext
from dataclasses import dataclass, field
from typing import Any, Literal

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.nn import ModuleDict
from torchmetrics import MeanMetric

from lit_align import losses
from lit_align.data_modules.chat import turn_end_ids
from lit_align.data_modules.collate import encode_prompt
from lit_align.data_modules.prompts import PromptBatch, PromptItem
from lit_align.execution.metrics import pass_at_k
from lit_align.execution.replies import reply_completion
from lit_align.execution.rewards import ExecutionReward, UnitTestReward
from lit_align.execution.sandbox import Limits
from lit_align.execution.status import ExecutionResult, Status
from lit_align.generation import DEFAULT_STOP, Completion, GenerationBackend, SamplingParams, build_backend
from lit_align.generation.base import BackendName, check_backend_kwargs, find_stop
from lit_align.generation.hf import inference_mode
from lit_align.models import disable_dropout, gathers_weights_per_forward, load_causal_lm, pinned_model_path
from lit_align.modules.base import NO_CACHE_ERRORS, AlignmentModule
from lit_align.modules.chunked_logps import check_chunk_size
from lit_align.modules.preference import shared_prompt_forward
from lit_align.modules.packed_pairs import PackingCheck, packed_groups, packed_mask_dtype
from lit_align.modules.reward import RewardNetwork, full_rows, load_reward_model, reward_batches, reward_model_base

# checkpoints store the reward scale in their hyperparameters; let torch.load(weights_only=True) read it
torch.serialization.add_safe_globals([UnitTestReward])

RewardSource = Literal["execution", "reward_model"]
STATUSES = tuple(s.value for s in Status)


class RewardSetupError(ValueError):
    """The reward cannot be computed for this run (no tests for an execution reward, mismatched reward model)."""


@dataclass
class Rollouts:
    """Scored completions of one training batch, with the tensors every objective needs.

    Completions of one prompt are consecutive (``group_size`` of them), in the order of the batch's prompts.
    """

    items: list[PromptItem]
    """The prompt item of each completion (repeated ``group_size`` times)."""
    completions: list[Completion]
    """What the backend returned, one per row."""
    group_size: int
    """Completions per prompt."""
    input_ids: Tensor
    """(N, P + T): left-padded prompt then right-padded response (with its end-of-sequence token when it stopped)."""
    attention_mask: Tensor
    """(N, P + T): 1 on real tokens."""
    position_ids: Tensor
    """(N, P + T): positions counted from each row's first real token."""
    response_ids: Tensor
    """(N, T): the response tokens (padding where the mask is False)."""
    response_mask: Tensor
    """(N, T) bool: True on response tokens."""
    prompt_width: int
    """P, the padded prompt width."""
    rewards: Tensor | None = None
    """(N,) float32 scalar rewards, set by :meth:`OnlineModule.score_rollouts`."""
    results: list[ExecutionResult | None] = field(default_factory=list)
    """Execution results (None for rows scored by a reward model only)."""

    def __len__(self) -> int:
        return len(self.completions)

    @property
    def texts(self) -> list[str]:
        return [c.text for c in self.completions]

    def rows(self, index: Tensor) -> dict[str, Tensor]:
        """The tensors of rows ``index``, trimmed to the longest response among them."""
        mask = self.response_mask[index]
        t = max(int(mask.sum(-1).max()), 1)
        width = self.prompt_width + t
        return {"input_ids": self.input_ids[index, :width], "attention_mask": self.attention_mask[index, :width],
                "position_ids": self.position_ids[index, :width], "response_ids": self.response_ids[index, :t],
                "response_mask": mask[:, :t], "index": index,
                "prompt_index": torch.div(index, self.group_size, rounding_mode="floor")}


def response_logps(window: Tensor, response_ids: Tensor) -> Tensor:
    """Log-probabilities (N, t), in float32, of the response tokens under :meth:`OnlineModule.response_window`'s
    logits (N, t + 1, V): column k predicts response token k (padding is not masked here)."""
    logits = window[:, :-1]
    return -F.cross_entropy(logits.float().reshape(-1, logits.size(-1)), response_ids.reshape(-1),
                            reduction="none").view_as(response_ids)


def response_targets(rows: dict[str, Tensor]) -> Tensor:
    """The response tokens of ``rows`` (N, t) as targets: ``IGNORE_INDEX`` on padding."""
    return rows["response_ids"].masked_fill(~rows["response_mask"].bool(), losses.IGNORE_INDEX)


def _is_deepspeed(strategy) -> bool:
    from lightning.pytorch.strategies import DeepSpeedStrategy

    return isinstance(strategy, DeepSpeedStrategy)


@dataclass
class StepTokens:
    """What one training step of an online objective processed on this process, for throughput and MFU.

    :class:`OnlineModule` starts a new one at each ``training_step`` (its ``step_tokens``) and counts into it where the
    work happens: :meth:`add_rollouts` for the generated rollouts, :meth:`add_pass` for every forward pass over rollout
    rows (:meth:`OnlineModule.response_window`, which PPO's, GRPO's and RAFT's passes go through). Tokens are real
    (non-padding) tokens; a pass's *width* is its padded sequence length, which the attention term of the FLOP count
    uses (:class:`lit_align.callbacks.throughput.TokenThroughput` reads all of this).
    """

    backend: str = "hf"
    """The generation backend that generated the rollouts ("hf", "vllm" or "openai")."""
    rollouts: int = 0
    """Completions generated and scored."""
    prompt_tokens: int = 0
    """Prompt tokens prefilled for generation, once per completion (a prompt sampled n times counts n times, though
    the hf backend prefills it once per decoding batch: an effective count, as for the passes' prompt sharing)."""
    generated: int = 0
    """Response tokens generated (the rollouts' response mask: end-of-sequence included when it ended the response)."""
    trained: int = 0
    """Tokens through forward + backward passes, every epoch counted."""
    trained_span: int = 0
    """Sum over those passes of tokens x the pass's width; ``trained_span / trained`` is their mean sequence length."""
    forward_only: int = 0
    """Tokens through forward passes without gradient (old log-probs and values, reference log-probs)."""
    forward_only_span: int = 0
    """Sum over those passes of tokens x the pass's width."""
    scored: int = 0
    """Tokens through the reward model's forward passes (reward="reward_model"; padding filler passes not counted)."""
    scored_span: int = 0
    """Sum over those passes of tokens x the pass's width."""

    def add_rollouts(self, rollouts: Rollouts) -> None:
        """Count generated rollouts: rows, their prompt tokens and their response tokens."""
        generated = int(rollouts.response_mask.sum())
        self.rollouts += len(rollouts)
        self.generated += generated
        self.prompt_tokens += int(rollouts.attention_mask.sum()) - generated

    def add_pass(self, attention_mask: Tensor, trained: bool) -> None:
        """Count one forward pass over rows with this (N, width) attention mask, trained (a backward follows) or not."""
        tokens, width = int(attention_mask.sum()), int(attention_mask.size(-1))
        if trained:
            self.trained += tokens
            self.trained_span += tokens * width
        else:
            self.forward_only += tokens
            self.forward_only_span += tokens * width

    def add_scoring(self, attention_mask: Tensor) -> None:
        """Count one reward-model forward pass over rows with this (N, width) attention mask."""
        tokens = int(attention_mask.sum())
        self.scored += tokens
        self.scored_span += tokens * int(attention_mask.size(-1))

    @property
    def trained_seq(self) -> float:
        """Mean sequence length (pass width) of the trained tokens; 0 when nothing was trained."""
        return self.trained_span / self.trained if self.trained else 0.0

    @property
    def forward_only_seq(self) -> float:
        """Mean sequence length (pass width) of the forward-only tokens; 0 when there were none."""
        return self.forward_only_span / self.forward_only if self.forward_only else 0.0

    @property
    def scored_seq(self) -> float:
        """Mean sequence length (pass width) of the reward model's tokens; 0 when there were none."""
        return self.scored_span / self.scored if self.scored else 0.0


class OnlineModule(AlignmentModule):
    """Base of PPO, GRPO and RAFT: generation, rewards, reference log-probs, the update loop and validation pass@1.

    Subclasses implement :meth:`update` (their optimizer steps on scored rollouts) and
    :meth:`optimizer_steps_per_batch`, and may set ``needs_reference``/``needs_values``.

    Args:
        reward: "execution" runs each completion against its problem's tests (unit-test reward scale);
            "reward_model" scores (prompt, completion) with a trained reward model.
        reward_model: the reward model for reward="reward_model": a RewardModel checkpoint (.ckpt) or a directory
            saved with RewardModel.save_pretrained; its tokenizer must be the policy's.
        reward_model_batch_size: pairs scored per reward-model forward pass.
        reward_placement: where the reward model (reward="reward_model") lives on several devices. replicate: a whole
            copy on every process, outside the module tree, which the strategy never touches (no gathering; it runs in
            its load dtype). shard: a submodule (:class:`~lit_align.modules.reward.RewardNetwork`) that FSDP and
            DeepSpeed ZeRO-3 shard like the policy and gather for each scoring pass (least memory; every process then
            makes as many scoring passes as the busiest one). Frozen either way, and never in a checkpoint that keeps
            only trainable weights. DDP and ZeRO-2 keep a whole copy per process either way.
        reward_scale: the unit-test reward scale (timeout -2, syntax -1, runtime -0.6, failed -0.3, pass +4,
            optional partial credit and trivial-body penalty).
        execution_timeout_s: wall-clock seconds each program may run (per test for stdin/stdout problems), not
            counting time it waits for a CPU (``Limits.timeout_s``).
        execution_workers: programs run in parallel; null: one per CPU.
        samples_per_prompt: completions generated for each prompt per training batch.
        max_new_tokens: longest completion, in tokens.
        temperature: sampling temperature for rollouts (1.0 keeps the sampler and the trained policy the same).
        top_p: nucleus sampling for rollouts (1.0 disables it).
        stop: stop strings ending a completion; null: function-completion defaults ("\\ndef ", "\\nclass ", ...),
            none with ``extract_code``; use [] for whole programs (CodeContests).
        extract_code: the completions are a chat model's replies (the data's ``chat_template: true``): the execution
            reward and validation run the code taken out of each (its first fenced block; a reply that defines the
            problem's function replaces the prompt's, :mod:`lit_align.execution.replies`), a reply ends at the
            model's end-of-sequence or end-of-turn token, not at the function-completion stop strings, and a reward
            model scores it ended as its chat template ends a reply.
        generation_backend: "hf" (the live policy), "vllm" or "openai" (see lit_align.generation).
        generation_kwargs: extra arguments of the backend (hf: share_prompt, drop_ended_rows, reserve_cache,
            synchronize; vllm: gpu_memory_utilization...; openai: base_url...).
        generation_batch_size: sequences decoded together by the hf backend.
        micro_batch_size: rollouts per forward/backward pass; gradients of a minibatch are accumulated over these.
        val_temperature: sampling temperature on held-out prompts (0: greedy, the usual pass@1).
        val_samples_per_prompt: completions per held-out prompt (pass@1 is the unbiased estimate from them).
        val_max_new_tokens: longest validation completion; null: max_new_tokens.
        max_grad_norm: clip the gradient norm to this before each optimizer step; null disables clipping.
        disable_dropout: zero every dropout probability of the policy (and reference), so the PPO ratio starts at 1.
        share_prompt: in a forward pass over rollouts whose micro-batch holds several completions of one prompt
            (``samples_per_prompt`` > 1), run that prompt once and its completions on its cached keys/values (needs a
            model with a KV cache; the numbers equal full-sequence passes up to float rounding). As in DPO, a pass
            with gradient shares only without activation checkpointing, and none through a ``torch_compile``d
            policy; old log-probs, values and reference log-probs always may. Not through a network that FSDP or
            ZeRO-3 shards over several processes (each forward pass gathers weights, so all processes must make the
            same passes); DDP and ZeRO-1/2 share. The reward model (``reward: reward_model``) scores each prompt
            once for its completions in a batch of ``reward_model_batch_size`` pairs under the same conditions (off
            here turns that off too; a replicated reward model also follows its own ``share_prompt``).
        packed_groups: where a pass over rollouts cannot reuse a prompt's keys/values (with gradient under
            activation checkpointing, or through a ``torch_compile``d policy), still run each prompt once by packing
            it and its completions in the micro-batch into one row, each completion seeing the prompt and itself
            (:func:`~lit_align.modules.packed_pairs.packed_groups`; with share_prompt, an attention that applies a
            4D mask (sdpa, eager), and not under FSDP or ZeRO-3 over several processes). The first packed pass of a
            run is checked against full rows once. Off: those passes run the full rows.
        logits_chunk_size: in the passes over rollouts (the policy's, the reference's), run the LM head and the
            log-softmax over this many response tokens at a time, on the backbone's last hidden states, so no
            (tokens x vocabulary) logits are held (lit_align/modules/chunked_logps.py); the entropy comes from the same
            chunks, and the losses receive it as ``out["entropy"]`` instead of ``out["logits"]``. Checked once against
            the model's own logits. null: the logits of every response position at once.
        reference_placement: where the frozen reference copy of full fine-tuning (lora: null, with a KL reference)
            lives on several devices. shard: a submodule, which FSDP and DeepSpeed ZeRO-3 shard like the policy and
            gather for its forward passes (least memory); replicate: kept outside the module tree, a whole copy on every
            process that the sharding strategy never touches (no gathering; it runs in its load dtype, outside FSDP's
            mixed precision; not available under ZeRO-3). DDP keeps a whole copy per process either way.
    """

    needs_reference: bool = False
    """Whether :meth:`configure_extra_models` must provide a reference policy (a frozen copy unless LoRA)."""

    data_kind = "prompts"

    def __init__(
        self,
        *args: Any,
        reward: RewardSource = "execution",
        reward_model: str | None = None,
        reward_model_batch_size: int = 16,
        reward_placement: Literal["replicate", "shard"] = "replicate",
        reward_scale: UnitTestReward | None = None,
        execution_timeout_s: float = 3.0,
        execution_workers: int | None = None,
        samples_per_prompt: int = 1,
        max_new_tokens: int = 128,
        temperature: float = 1.0,
        top_p: float = 1.0,
        stop: list[str] | None = None,
        extract_code: bool = False,
        generation_backend: BackendName = "hf",
        generation_kwargs: dict[str, Any] | None = None,
        generation_batch_size: int = 64,
        micro_batch_size: int = 16,
        val_temperature: float = 0.0,
        val_samples_per_prompt: int = 1,
        val_max_new_tokens: int | None = None,
        max_grad_norm: float | None = 1.0,
        disable_dropout: bool = True,
        reference_placement: Literal["shard", "replicate"] = "shard",
        share_prompt: bool = True,
        packed_groups: bool = True,
        logits_chunk_size: int | None = None,
        **kwargs: Any,
    ) -> None:
        check_chunk_size(logits_chunk_size)
        super().__init__(*args, **kwargs)
        self.packing = PackingCheck()  # packed rows checked against full ones on the first packed pass
        reward_model = pinned_model_path(reward_model)  # a link's model now, as model_name_or_path (AlignmentModule)
        self.hparams["reward_model"] = reward_model
        if reference_placement not in ("shard", "replicate"):
            raise ValueError(f"reference_placement must be shard or replicate, got {reference_placement!r}")
        if reference_placement == "replicate" and not (self.needs_reference and self.lora_config is None):
            raise ValueError(f"reference_placement='replicate' places the frozen reference copy of full fine-tuning, but "
                             f"{type(self).__name__} here has none ("
                             + ("it uses the LoRA policy with its adapter disabled" if self.needs_reference
                                else "it has no KL reference") + "); keep reference_placement: shard")
        self.automatic_optimization = False
        if reward not in ("execution", "reward_model"):
            raise ValueError(f"reward must be 'execution' or 'reward_model', got {reward!r}")
        if reward == "reward_model" and not reward_model:
            raise ValueError("reward='reward_model' needs `reward_model`: a RewardModel checkpoint or saved directory")
        if reward == "execution" and reward_model:
            raise ValueError(f"reward_model={reward_model!r} is given but reward='execution'; set reward='reward_model'")
        if reward_placement not in ("replicate", "shard"):
            raise ValueError(f"reward_placement must be replicate or shard, got {reward_placement!r}")
        if reward_placement == "shard" and reward != "reward_model":
            raise ValueError("reward_placement='shard' places a reward model, but reward='execution' runs unit tests; "
                             "set reward='reward_model' or keep reward_placement: replicate")
        for name, value in (("samples_per_prompt", samples_per_prompt), ("max_new_tokens", max_new_tokens),
                            ("micro_batch_size", micro_batch_size), ("generation_batch_size", generation_batch_size),
                            ("val_samples_per_prompt", val_samples_per_prompt), ("reward_model_batch_size", reward_model_batch_size)):
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"{name} must be a positive integer, got {value!r}")
        if max_grad_norm is not None and max_grad_norm <= 0:
            raise ValueError(f"max_grad_norm must be > 0 or null, got {max_grad_norm}")
        if execution_timeout_s <= 0:
            raise ValueError(f"execution_timeout_s must be > 0, got {execution_timeout_s}")
        check_backend_kwargs(generation_backend, generation_kwargs or {}, "generation_kwargs",
                             supplied=("model", "tokenizer") if generation_backend == "hf" else ())
        if (generation_kwargs or {}).get("chat"):
            raise ValueError("generation_kwargs.chat: an online objective trains on the sampled tokens, which a chat "
                             "completions endpoint does not return; keep the completions endpoint and render the "
                             "prompts with the data's chat_template: true (and extract_code: true here)")
        self.reward_scale = UnitTestReward(**reward_scale) if isinstance(reward_scale, dict) else (reward_scale or UnitTestReward())
        self.eval_metrics = ModuleDict({f"{stage}_{name}": MeanMetric() for stage in ("val", "test")
                                        for name in ("pass_at_1", "pass_at_n", "reward_mean", "compile_rate")})
        self._backend: GenerationBackend | None = None
        self._execution: ExecutionReward | None = None
        self.ref_model: nn.Module | None = None
        self.reward_network: nn.Module | None = None
        """The reward model's network when ``reward_placement`` is shard (a submodule the strategy shards)."""
        self.step_tokens = StepTokens(backend=generation_backend)
        """What the current (or last) training step processed on this process; see :class:`StepTokens`."""
        self.generated_tokens = 0
        """Response tokens generated for training on this process so far (validation and test not counted)."""

    # ------------------------------------------------------------------ construction
    def configure_model(self) -> None:
        """Build the networks; under FSDP wrap them in FSDP units here (see :meth:`shard_with_fsdp`)."""
        built = self.model is None
        super().configure_model()
        if built:
            self.shard_with_fsdp()

    def shard_with_fsdp(self) -> None:
        """Under FSDP: wrap the policy, the frozen reference copy and any other trained head in FSDP units of their own.

        Lightning wraps a module it finds without FSDP units in one root FSDP unit, and runs ``training_step`` inside
        that root's forward, where FSDP can neither clip nor step. Wrapped here (Lightning calls ``configure_model``
        with its FSDP settings active: ``auto_wrap_policy``, mixed precision, sharding strategy, device), each network
        is its own root, so the training step runs outside any FSDP forward and steps the optimizer like under DDP."""
        from lightning.pytorch.strategies import FSDPStrategy
        from torch.distributed.fsdp.wrap import wrap

        if not isinstance(getattr(self._trainer, "strategy", None), FSDPStrategy):
            return
        self.model = wrap(self.model)
        if self.ref_model is not None:
            self.ref_model = wrap(self.ref_model)
        if self.reward_network is not None:
            self.reward_network = wrap(self.reward_network)
        for name, child in list(self.named_children()):
            if (child is self.model or child is self.ref_model or child is self.reward_network
                    or not any(p.requires_grad for p in child.parameters())):
                continue
            setattr(self, name, wrap(child))  # PPO's value head

    def configure_extra_models(self) -> None:
        """A frozen reference copy for full fine-tuning (LoRA uses the adapter-disabled policy instead), and the
        reward model when it is sharded (``reward_placement: shard``; a replicated one is loaded by
        :meth:`setup_reward`)."""
        if self.needs_reference and self.lora_config is None:
            hp = self.hparams
            ref = load_causal_lm(hp.model_name_or_path, dtype=hp.dtype, attn_implementation=hp.attn_implementation,
                                 quantize_4bit=False)
            ref.requires_grad_(False)
            if hp.reference_placement == "replicate":
                if gathers_weights_per_forward(ref):  # built inside DeepSpeed's zero.Init: already partitioned
                    raise ValueError("reference_placement='replicate' is not available under DeepSpeed ZeRO-3 (every "
                                     "model built during setup is partitioned there); use reference_placement: shard")
                self.keep_replicated(ref.eval())
            else:
                self.ref_model = ref.train()  # frozen; rollout_statistics runs it in eval mode (train() only keeps Lightning quiet)
        if self.hparams.disable_dropout:
            disable_dropout(self.model)
            if self.reference_network is not None:
                disable_dropout(self.reference_network)
        if self.hparams.reward_placement == "shard":
            # built where the policy is: inside DeepSpeed's zero.Init under ZeRO-3, so it is partitioned as it loads
            self.reward_network = RewardNetwork(self._load_reward_model().model).train()  # frozen; scored in eval mode

    @property
    def reference_network(self) -> nn.Module | None:
        """The frozen reference copy (a submodule, or the replicated copy moved to this process's device), if any."""
        replica = self.replicated_network
        return replica if replica is not None else self.ref_model

    @property
    def reward_model(self):
        """The replicated reward model (reward="reward_model", reward_placement="replicate"), kept outside the module
        tree: never trained, sharded or saved."""
        return self.__dict__.get("_reward_model_instance")

    def reward_model_config(self) -> Any:
        """The Hugging Face config of the reward model scoring the rollouts (reward="reward_model", once loaded), else
        None; :class:`~lit_align.callbacks.throughput.TokenThroughput` reads its shapes to count the scoring FLOPs."""
        if self.reward_network is not None:
            return getattr(self.reward_network.model, "config", None)
        return getattr(self.reward_model.model, "config", None) if self.reward_model is not None else None

    def _load_reward_model(self):
        """The trained reward model (frozen), once its tokenizer is checked to be the policy's."""
        rm = load_reward_model(self.hparams.reward_model, map_location=self.device)
        check_same_tokenizer(rm.tokenizer, self.tokenizer, self.hparams.reward_model, self.tokenizer_source)
        return rm.requires_grad_(False)

    def model_sources(self) -> list[str]:
        """The policy's, and the sharded reward model's base (built in ``configure_model`` too; its architecture may
        differ from the policy's)."""
        sources = super().model_sources()
        if self.hparams.reward == "reward_model" and self.hparams.reward_placement == "shard":
            base = reward_model_base(self.hparams.reward_model)
            if base is not None:
                sources.append(base)
        return sources

    def setup_reward(self) -> None:
        """Load and check the replicated reward model; fail before training when the run cannot be scored."""
        if (self.hparams.reward != "reward_model" or self.hparams.reward_placement != "replicate"
                or self.reward_model is not None):
            return
        self.__dict__["_reward_model_instance"] = self._load_reward_model()

    def check_prompts_have_tests(self, items: list[PromptItem], what: str) -> None:
        """An execution reward needs tests for every prompt: name the first prompt without them."""
        missing = [i for i in items if not i.has_tests]
        if self.hparams.reward == "execution" and missing:
            raise RewardSetupError(
                f"reward='execution' needs tests for every prompt, but {len(missing)} of {len(items)} {what} prompts have "
                f"none (first: {missing[0].task_id!r}); give a source with tests (task_suite, HumanEval-format rows with "
                "test/entry_point, CodeContests) or use reward='reward_model'")

    def refuse_incompatible_data(self, datamodule) -> None:
        """Also refused: prompts through a chat template (the data's ``chat_template``) without ``extract_code``, whose
        replies the execution reward would run as code appended to the prompt."""
        super().refuse_incompatible_data(datamodule)
        if getattr(datamodule, "chat_template", False) is True and not self.hparams.extract_code:
            raise ValueError("chat_template: true asks a chat model, whose replies are messages, not code that "
                             "continues the prompt; set model.init_args.extract_code: true so that the execution "
                             "reward runs the code in each reply")

    def setup(self, stage: str) -> None:
        """Give DeepSpeed this module's clip before the model is built (see docs/scaling.md, "Online objectives")."""
        super().setup(stage)
        if stage == "fit" and self._trainer is not None and _is_deepspeed(self.trainer.strategy):
            self._configure_deepspeed(self.trainer.strategy)

    def _configure_deepspeed(self, strategy) -> None:
        """DeepSpeed clips at its own step, with its config's ``gradient_clipping``, which must be this module's
        ``max_grad_norm``. (Under ZeRO-3 every forward pass gathers the weights from all processes: the hf backend
        then keeps the processes' generation loops in step, see ``HFBackend(synchronize=...)``, and
        :meth:`run_updates` gives every process as many backward passes as the busiest one.)"""
        clip = float(self.hparams.max_grad_norm or 0.0)
        configured = strategy.config.get("gradient_clipping")
        if configured is not None and float(configured) != clip:
            raise ValueError(
                f"the DeepSpeed config sets gradient_clipping={configured}, but {type(self).__name__} clips at "
                f"model.max_grad_norm={self.hparams.max_grad_norm}: DeepSpeed does the clipping, so set one value "
                "(drop gradient_clipping from the DeepSpeed config to use max_grad_norm)")
        strategy.config["gradient_clipping"] = clip

    def on_fit_start(self) -> None:
        super().on_fit_start()
        dm = getattr(self.trainer, "datamodule", None)
        if dm is not None:
            self.check_prompts_have_tests(list(getattr(dm, "train_items", []) or []), "training")
            self.check_prompts_have_tests(list(getattr(dm, "val_items", []) or []), "validation")
        self.setup_reward()

    def on_validation_start(self) -> None:
        self.setup_reward()

    def on_test_start(self) -> None:
        self.setup_reward()

    @property
    def generator(self) -> GenerationBackend:
        """The generation backend, built on first use (hf wraps the live policy, so it follows every update)."""
        if self._backend is None:
            hp = self.hparams
            kwargs = dict(hp.generation_kwargs or {})
            if hp.generation_backend == "hf":
                kwargs.setdefault("batch_size", hp.generation_batch_size)
                self._backend = build_backend("hf", model=self.model, tokenizer=self.tokenizer, **kwargs)
            else:
                if hp.generation_backend == "vllm":
                    kwargs.setdefault("model", hp.model_name_or_path)
                self._backend = build_backend(hp.generation_backend, **kwargs)
        return self._backend

    @property
    def execution_reward(self) -> ExecutionReward:
        if self._execution is None:
            hp = self.hparams
            self._execution = ExecutionReward(scale=self.reward_scale, limits=Limits(timeout_s=hp.execution_timeout_s),
                                              max_workers=hp.execution_workers)
        return self._execution

    # ------------------------------------------------------------------ rollouts
    def sampling_params(self, train: bool = True) -> SamplingParams:
        hp = self.hparams
        stop = ([] if hp.extract_code else list(DEFAULT_STOP)) if hp.stop is None else list(hp.stop)
        if train:
            return SamplingParams(max_new_tokens=hp.max_new_tokens, temperature=hp.temperature, top_p=hp.top_p,
                                  n=hp.samples_per_prompt, stop=stop)
        return SamplingParams(max_new_tokens=hp.val_max_new_tokens or hp.max_new_tokens, temperature=hp.val_temperature,
                              top_p=hp.top_p if hp.val_temperature > 0 else 1.0, n=hp.val_samples_per_prompt, stop=stop)

    def prompt_ids(self, prompt: str) -> list[int]:
        """The prompt's tokens exactly as the backend fed them (BOS included when the tokenizer adds one)."""
        backend = self._backend
        if backend is not None and hasattr(backend, "encode_prompt"):
            return list(backend.encode_prompt(prompt))
        return encode_prompt(self.tokenizer, prompt)

    def response_ids(self, completion: Completion, stop: list[str]) -> list[int]:
        """The completion's tokens plus the end-of-sequence token when that is what ended it.

        A completion that stopped without a stop string in its text ended on end-of-sequence: that token was an
        action of the policy and is trained like the others. It is the one the backend reports
        (``Completion.end_token_id``: the generation config's or the chat template's end of turn may differ from the
        tokenizer's EOS), else the tokenizer's EOS (a server does not say). Completions cut by a stop string or by
        ``max_new_tokens`` get no extra token.
        """
        ids = list(completion.token_ids)
        if completion.end_token_id is not None:
            return ids + [completion.end_token_id]
        decoded = self.tokenizer.decode(ids, skip_special_tokens=True, clean_up_tokenization_spaces=False)
        if completion.finish_reason == "stop" and find_stop(decoded, stop) is None:
            ids.append(self.tokenizer.eos_token_id)
        return ids or [self.tokenizer.eos_token_id]

    def build_rollouts(self, items: list[PromptItem], completions: list[list[Completion]], params: SamplingParams) -> Rollouts:
        """Pack prompts (left-padded) and responses (right-padded) into the rollout tensors."""
        rows_items = [item for item, group in zip(items, completions) for _ in group]
        flat = [c for group in completions for c in group]
        cache: dict[str, list[int]] = {}
        prompts = []
        for item in rows_items:
            if item.prompt not in cache:
                cache[item.prompt] = self.prompt_ids(item.prompt)
            prompts.append(cache[item.prompt])
        responses = [self.response_ids(c, params.stop) for c in flat]
        n, width_p, width_t = len(flat), max(map(len, prompts)), max(map(len, responses))
        pad = self.tokenizer.pad_token_id if self.tokenizer.pad_token_id is not None else self.tokenizer.eos_token_id
        input_ids = torch.full((n, width_p + width_t), pad, dtype=torch.long)
        attention_mask = torch.zeros((n, width_p + width_t), dtype=torch.long)
        response_mask = torch.zeros((n, width_t), dtype=torch.bool)
        for i, (p, r) in enumerate(zip(prompts, responses)):
            input_ids[i, width_p - len(p):width_p] = torch.tensor(p)
            input_ids[i, width_p:width_p + len(r)] = torch.tensor(r)
            attention_mask[i, width_p - len(p):width_p + len(r)] = 1
            response_mask[i, :len(r)] = True
        position_ids = (attention_mask.cumsum(-1) - 1).clamp(min=0)
        dev = self.device
        return Rollouts(items=rows_items, completions=flat, group_size=params.n, input_ids=input_ids.to(dev),
                        attention_mask=attention_mask.to(dev), position_ids=position_ids.to(dev),
                        response_ids=input_ids[:, width_p:].to(dev), response_mask=response_mask.to(dev),
                        prompt_width=width_p)

    def generate_rollouts(self, batch: PromptBatch, train: bool = True) -> Rollouts:
        """Sample completions for the batch's prompts with the current policy (eval mode, no gradient)."""
        params = self.sampling_params(train)
        completions = self.generator.generate(batch.prompts, params)
        return self.build_rollouts(list(batch), completions, params)

    # ------------------------------------------------------------------ rewards
    def execute(self, items: list[PromptItem], texts: list[str]) -> tuple[list[float], list[ExecutionResult | None]]:
        """Unit-test rewards and results of ``texts[i]`` on ``items[i]``'s problem (rows without tests: nan, None)."""
        rewards: list[float] = [math.nan] * len(items)
        results: list[ExecutionResult | None] = [None] * len(items)
        by_language: dict[str, list[int]] = defaultdict(list)
        for i, item in enumerate(items):
            if item.has_tests:
                by_language[item.language or "python3"].append(i)
        for language, rows in by_language.items():
            problems = [items[i].problem for i in rows]
            programs = [texts[i] for i in rows]
            if self.hparams.extract_code:  # chat replies: the code in each
                programs = [reply_completion(problem, text, language) for problem, text in zip(problems, programs)]
            r, res = self.execution_reward.score(problems, programs, language)
            for i, value, result in zip(rows, r, res):
                rewards[i], results[i] = value, result
        return rewards, results

    def score(self, items: list[PromptItem], texts: list[str]) -> tuple[Tensor, list[ExecutionResult | None]]:
        """Scalar rewards (N,) float32 of the completions and, when executed, their results."""
        if self.hparams.reward == "execution":
            self.check_prompts_have_tests(items, "batch")
            rewards, results = self.execute(items, texts)
            return torch.tensor(rewards, dtype=torch.float32, device=self.device), results
        chat = self.hparams.extract_code and getattr(self.tokenizer, "chat_template", None)
        batches = list(reward_batches(self.tokenizer, [i.prompt for i in items], texts,
                                      self.hparams.reward_model_batch_size,
                                      end=turn_end_ids(self.tokenizer) if chat else None))
        for batch in batches:
            self.step_tokens.add_scoring(batch["attention_mask"])
        if not self.hparams.share_prompt:
            batches = [full_rows(batch) for batch in batches]
        if self.reward_network is not None:
            return self.score_with_network(batches, len(items)), [None] * len(items)
        self.setup_reward()
        rewards = self.reward_model.score_batches(batches, len(items))
        return rewards.float().to(self.device), [None] * len(items)

    def score_with_network(self, batches: list[dict[str, Tensor]], n: int) -> Tensor:
        """Rewards (n,) of the sharded reward model (``reward_placement: shard``) for :func:`reward_batches`' batches,
        in eval mode without gradient; with ``share_prompt`` each prompt runs once for its pairs in a batch.

        Where its forward passes gather the weights from every process (FSDP, ZeRO-3), every process makes as many as
        the busiest one: the missing ones score a single padding token and are thrown away; the full rows run there
        (a shared pass is two passes of the backbone, which the other processes' would not match)."""
        rewards = torch.empty(n, device=self.device)
        passes = len(batches)
        if self._world_size() > 1 and gathers_weights_per_forward(self.reward_network):
            passes = int(self.trainer.strategy.reduce(torch.tensor(passes, device=self.device), reduce_op="max"))
            batches = [full_rows(batch) for batch in batches]
        filler = torch.full((1, 1), self.tokenizer.pad_token_id, dtype=torch.long, device=self.device)
        with inference_mode(self.reward_network):
            for batch in batches:
                batch = {k: v.to(self.device) for k, v in batch.items()}
                rows = batch.pop("rows")
                rewards[rows] = self.reward_network(**batch)
            for _ in range(passes - len(batches)):
                self.reward_network(filler, torch.ones_like(filler))
        return rewards

    def score_rollouts(self, rollouts: Rollouts) -> Rollouts:
        rollouts.rewards, rollouts.results = self.score(rollouts.items, rollouts.texts)
        return rollouts

    # ------------------------------------------------------------------ forward passes
    def rollout_forward(self, rows: dict[str, Tensor], model: nn.Module | None = None,
                        with_values: bool = False) -> dict[str, Tensor]:
        """Per-response-token log-probs (N, t) of ``model`` (default the policy), its logits there (with
        ``logits_chunk_size`` its entropy there instead, ``entropy``), optionally values.

        ``logps[:, k]`` is log pi(response token k | prompt, response tokens < k) at temperature 1, computed in float32
        and zero on padding; ``logits[:, k]`` the logits that predicted it; ``values[:, k]`` come from
        :meth:`value_head_outputs` at that same position (the state before token k).
        """
        net = model if model is not None else self.model
        mask = rows["response_mask"]
        if self.uses_chunked_logps(net, rows["input_ids"]):  # logits_chunk_size: entropy instead of logits
            out, hidden = self.response_window(rows, model, with_values, targets=response_targets(rows), entropy=True)
            result = {"logps": out[..., 0], "entropy": out[..., 1]}
        else:
            logits, hidden = self.response_window(rows, model, with_values)
            result = {"logps": response_logps(logits, rows["response_ids"]) * mask, "logits": logits[:, :-1]}
        if with_values:
            result["values"] = self.value_head_outputs(hidden[:, :-1]) * mask
        return result

    @staticmethod
    def token_entropy(out: dict[str, Tensor]) -> Tensor:
        """The entropy (N, t) of the policy at each response position of :meth:`rollout_forward`'s ``out``: computed
        with the log-probabilities under ``logits_chunk_size``, else from its logits."""
        return out["entropy"] if "entropy" in out else losses.entropy_from_logits(out["logits"])

    def response_window(self, rows: dict[str, Tensor], model: nn.Module | None = None, with_values: bool = False,
                        targets: Tensor | None = None, entropy: bool = False) -> tuple[Tensor, Tensor | None]:
        """Logits (N, t + 1, V) of ``model`` (default the policy) at the last prompt column and the t response columns
        of ``rows`` (column k predicts response token k; the last predicts nothing), and with ``with_values`` the last
        hidden states there (else None); the pass is counted in :attr:`step_tokens`.

        Logits are computed only there (``logits_to_keep``), and with ``share_prompt`` each distinct prompt of ``rows``
        runs once and its rows' responses on its cached keys/values (see :meth:`_use_prompt_sharing`). With
        ``targets`` (N, t; :func:`response_targets`): no logits, the LM head in chunks of ``logits_chunk_size``
        instead, giving the log-probabilities of ``targets`` (N, t, 1), with ``entropy`` (N, t, 2), entropy second
        (:meth:`chunked_head`).
        """
        net = model if model is not None else self.model
        self.count_pass(rows)
        if self._use_prompt_sharing(rows, net):
            shared = self._shared_prompt_outputs(rows, net, with_values, targets, entropy)
            if shared is not None:
                return shared
        elif self._use_packed_groups(rows, net):
            return self._packed_outputs(rows, net, with_values, targets, entropy)
        return self._full_outputs(rows, net, with_values, targets, entropy)

    def _use_prompt_sharing(self, rows: dict[str, Tensor], net: nn.Module) -> bool:
        """Whether :meth:`response_window` runs ``rows`` with their prompts shared through a KV cache:
        :meth:`shares_prompts` and :meth:`_repeats_prompts`."""
        return self.shares_prompts(net) and self._repeats_prompts(rows, net)

    def _repeats_prompts(self, rows: dict[str, Tensor], net: nn.Module) -> bool:
        """Whether ``rows`` hold a prompt more than once, on a network whose forward passes gather no weights from
        other processes (under FSDP and ZeRO-3 every process makes the same passes, and a shared pass, or the one-time
        check of packed rows, is more passes where another process's rows may need one)."""
        if "prompt_index" not in rows:
            return False
        if self._world_size() > 1 and gathers_weights_per_forward(net):
            return False  # FSDP, ZeRO-3: every process must make the same forward passes, whatever its rows hold
        prompts = rows["prompt_index"]
        return prompts.unique().numel() < prompts.numel()

    def _use_packed_groups(self, rows: dict[str, Tensor], net: nn.Module) -> bool:
        """Whether :meth:`response_window` packs each prompt of ``rows`` with its rows' responses into one row
        (``packed_groups``): where the cache may not be used but ``share_prompt`` is on, :meth:`_repeats_prompts`, a
        prompt of more than one column, an attention that applies a 4D mask, and the run's one comparison of packed
        with full rows passed."""
        hp = self.hparams
        p = rows["input_ids"].size(1) - rows["response_ids"].size(1)
        return bool(hp.get("share_prompt") and hp.get("packed_groups", True) and p >= 2
                    and self._repeats_prompts(rows, net)
                    and self.packing.allows(net, lambda: self._compare_packing(rows, net)))

    def _compare_packing(self, rows: dict[str, Tensor], net: nn.Module) -> tuple[Tensor, Tensor, Tensor, bool]:
        """Each row's response log-probability from packed rows and from full rows, for the run's one check."""
        mask = rows["response_mask"]
        if self.uses_chunked_logps(net, rows["input_ids"]):  # no logits held whole here either
            targets = response_targets(rows)
            packed, full = (outputs(rows, net, False, targets)[0][..., 0]
                            for outputs in (self._packed_outputs, self._full_outputs))
        else:
            packed = response_logps(self._packed_outputs(rows, net, False)[0], rows["response_ids"]) * mask
            full = response_logps(self._full_outputs(rows, net, False)[0], rows["response_ids"]) * mask
        return packed.sum(-1), full.sum(-1), mask.sum(-1), self.exact_pass(net, rows["input_ids"])

    def _split_at_prompt(self, rows: dict[str, Tensor]) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor]:
        """``rows`` split for a pass that runs each distinct prompt once: each row's prompt (``of_row``), each
        prompt's head (all of the prompt but its last column: ids and mask, from a row holding it) and each row's
        window (the last prompt column and the response: ids and mask), whose outputs are :meth:`response_window`'s."""
        p = rows["input_ids"].size(1) - rows["response_ids"].size(1)  # the padded prompt width
        prompts, of_row = rows["prompt_index"].unique(return_inverse=True)
        n = of_row.numel()
        first = torch.full((prompts.numel(),), n, dtype=torch.long, device=of_row.device).scatter_reduce(
            0, of_row, torch.arange(n, device=of_row.device), reduce="amin")  # a row holding each prompt
        ids, mask = rows["input_ids"], rows["attention_mask"]
        return of_row, ids[first, :p - 1], mask[first, :p - 1], ids[:, p - 1:], mask[:, p - 1:]

    def _packed_outputs(self, rows: dict[str, Tensor], net: nn.Module, with_values: bool,
                        targets: Tensor | None = None, entropy: bool = False) -> tuple[Tensor, Tensor | None]:
        """:meth:`response_window`'s (logits or chunked log-probabilities, last hidden states or None) with each
        distinct prompt of ``rows`` packed with its rows' windows into one row
        (:func:`~lit_align.modules.packed_pairs.packed_groups`). Logits are computed from the first window on and
        gathered per row; the chunked head gathers the hidden states it is given."""
        of_row, *split = self._split_at_prompt(rows)
        packed = packed_groups(*split, of_row, self.pad_token_id, packed_mask_dtype(net))
        index = packed["index"]
        inputs = {"input_ids": packed["input_ids"], "attention_mask": packed["attention_mask"],
                  "position_ids": packed["position_ids"], "use_cache": False}
        if targets is not None:
            with self.chunked_head(net, [(lambda hidden: hidden[of_row.unsqueeze(-1), index[:, :-1]], targets)],
                                   entropy):
                out = net(**inputs, output_hidden_states=with_values)
            return out.logits, out.hidden_states[-1][of_row.unsqueeze(-1), index] if with_values else None
        length = packed["input_ids"].size(1)
        out = self.forward_keeping_logits(net, length - int(index[:, 0].min()), **inputs,
                                          output_hidden_states=with_values)
        at = (index - (length - out.logits.size(1))).clamp(min=0)
        logits = out.logits[of_row.unsqueeze(-1), at]
        hidden = out.hidden_states[-1][of_row.unsqueeze(-1), index] if with_values else None
        return logits, hidden

    def _full_outputs(self, rows: dict[str, Tensor], net: nn.Module, with_values: bool,
                      targets: Tensor | None = None, entropy: bool = False) -> tuple[Tensor, Tensor | None]:
        """:meth:`response_window`'s (logits or chunked log-probabilities, last hidden states or None) from a pass
        over the full rows."""
        t = rows["response_ids"].size(1)
        inputs = {"input_ids": rows["input_ids"], "attention_mask": rows["attention_mask"],
                  "position_ids": rows["position_ids"], "use_cache": False}
        chunked = targets is not None
        with self.chunked_head(net, [(lambda hidden: hidden[:, -(t + 1):-1], targets)], entropy) if chunked \
                else nullcontext():
            out = self.forward_keeping_logits(net, t + 1, **inputs, output_hidden_states=with_values)
        return (out.logits if chunked else out.logits[:, -(t + 1):],
                out.hidden_states[-1][:, -(t + 1):] if with_values else None)

    def _shared_prompt_outputs(self, rows: dict[str, Tensor], net: nn.Module, with_values: bool,
                               targets: Tensor | None = None,
                               entropy: bool = False) -> tuple[Tensor, Tensor | None] | None:
        """:meth:`response_window`'s (logits or chunked log-probabilities, last hidden states or None) with each
        distinct prompt of ``rows`` run once: all of the prompt but its last column, whose token then runs with each
        row's response, so that the second pass's outputs are the window itself (nothing concatenated, no second copy
        of the logits). None where a prompt is a single token (nothing to share: the full pass runs), and None with
        sharing off from then on when the model returns no usable cache."""
        of_row, head_ids, head, window_ids, window_mask = self._split_at_prompt(rows)
        if head.size(1) == 0 or not bool((head.sum(-1) > 0).all()):
            return None
        batch = {"prompt_input_ids": head_ids, "prompt_attention_mask": head,
                 "completion_input_ids": window_ids, "completion_attention_mask": window_mask}
        # chunked: the prompt pass's one position of logits as they are, the window's through the chunked head
        chunked = self.chunked_head(net, [None, (lambda hidden: hidden[:, :-1], targets)], entropy) \
            if targets is not None else nullcontext()
        try:
            with chunked:
                _, out, _ = shared_prompt_forward(net, batch, of_row, output_hidden_states=with_values,
                                                  logits_to_keep=1)
        except NO_CACHE_ERRORS as err:
            self.prompt_sharing_failed(err)
            return None
        return out.logits, out.hidden_states[-1] if with_values else None

    def count_pass(self, rows: dict[str, Tensor]) -> None:
        """Count a pass over ``rows`` in :attr:`step_tokens`: trained when autograd records it, else forward-only."""
        self.step_tokens.add_pass(rows["attention_mask"], trained=torch.is_grad_enabled())

    def value_head_outputs(self, hidden: Tensor) -> Tensor:
        raise NotImplementedError(f"{type(self).__name__} has no value head")

    @contextmanager
    def reference_model(self) -> Iterator[nn.Module]:
        """The reference policy: the frozen copy (full fine-tuning) or the policy with its LoRA adapter disabled."""
        if self.reference_network is not None:
            yield self.reference_network
        elif self.lora_config is not None:
            with self.model.disable_adapter():
                yield self.model
        else:
            raise RuntimeError(f"{type(self).__name__} has no reference model (needs_reference is False)")

    @torch.no_grad()
    def rollout_statistics(self, rollouts: Rollouts, with_values: bool = False, with_reference: bool = False,
                           with_policy: bool = True) -> dict[str, Tensor]:
        """Old log-probs (and values, reference log-probs) of every rollout, in eval mode without gradient;
        ``with_policy=False`` skips the policy's pass (no old log-probs or values: only the reference's)."""
        n = len(rollouts)
        out: dict[str, list[Tensor]] = defaultdict(list)
        t_all = rollouts.response_ids.size(1)
        reference = self.reference_network
        with inference_mode(self.model), inference_mode(reference) if reference is not None else nullcontext():
            for idx in torch.arange(n, device=self.device).split(self.hparams.micro_batch_size):
                rows = rollouts.rows(idx)
                pad = t_all - rows["response_ids"].size(1)
                if with_policy:
                    policy = self.rollout_forward(rows, with_values=with_values)
                    out["old_logps"].append(F.pad(policy["logps"], (0, pad)))
                    if with_values:
                        out["old_values"].append(F.pad(policy["values"], (0, pad)))
                if with_reference:
                    with self.reference_model() as ref:
                        out["ref_logps"].append(F.pad(self.rollout_forward(rows, model=ref)["logps"], (0, pad)))
        return {k: torch.cat(v) for k, v in out.items()}

    # ------------------------------------------------------------------ optimization
    def optimizer_steps_per_batch(self) -> int:
        """Optimizer steps one training batch (one rollout round) performs."""
        raise NotImplementedError

    def total_optimizer_steps(self) -> int:
        """``max_steps`` (already counted in optimizer steps), or epochs x batches x optimizer_steps_per_batch."""
        if self.trainer.max_steps is not None and self.trainer.max_steps > 0:
            return int(self.trainer.max_steps)
        return super().total_optimizer_steps() * self.optimizer_steps_per_batch()

    def optimizer_step_now(self) -> None:
        """Clip the gradient norm, step the optimizer and the learning-rate schedule, clear the gradients."""
        opt = self.optimizers()
        if self.hparams.max_grad_norm is not None:
            self.clip_gradient_norm(opt, self.hparams.max_grad_norm)
        opt.step()
        opt.zero_grad(set_to_none=True)
        scheduler = self.lr_schedulers()
        if scheduler is not None:
            scheduler.step()

    @contextmanager
    def _accumulating(self):
        """A backward pass whose gradient is added to the next ones before the optimizer steps. DDP: skip its
        all-reduce (only a minibatch's last backward synchronises). DeepSpeed ZeRO refuses ``no_sync`` (it reduces its
        gradient partitions at every backward) and must be told the backward is not an accumulation boundary."""
        strategy = self.trainer.strategy
        if _is_deepspeed(strategy):
            engine = strategy.deepspeed_engine
            engine.set_gradient_accumulation_boundary(False)
            try:
                yield
            finally:
                engine.set_gradient_accumulation_boundary(True)
        elif hasattr(strategy, "block_backward_sync"):
            with strategy.block_backward_sync():
                yield
        else:
            yield

    def _deepspeed_micro_step(self) -> None:
        """Start a new accumulation micro-step in DeepSpeed's ZeRO optimizer before a forward/backward pass.

        DeepSpeed expects one forward of its engine per backward and starts each micro-step there; its engine's
        forward is the whole ``training_step`` here, which runs several backward passes. Without this, ZeRO-3 would
        overwrite the accumulated gradient partitions at every backward instead of adding to them (the minibatch's
        step would use its last micro-batch's gradient only). Older DeepSpeed versions count micro-steps in the
        backward pass and have no such method: nothing to do there."""
        strategy = self.trainer.strategy
        if _is_deepspeed(strategy):
            new_micro_step = getattr(strategy.deepspeed_engine.optimizer, "clear_backward_seen_flag", None)
            if new_micro_step is not None:
                new_micro_step()

    def _backward_passes(self, micro_batches: int) -> int:
        """Backward passes this process runs for a minibatch of ``micro_batches`` micro-batches (the missing ones with
        a zero loss). DDP synchronises only the last one, so one suffices for an empty minibatch; DeepSpeed ZeRO and
        FSDP reduce gradients at every backward (and FSDP gathers weights at every forward), so every process runs as
        many as the busiest one."""
        every_pass = _is_deepspeed(self.trainer.strategy) or gathers_weights_per_forward(self.model)
        if not every_pass or self._world_size() <= 1:
            return max(micro_batches, 1)
        return max(int(self.trainer.strategy.reduce(torch.tensor(float(micro_batches), device=self.device),
                                                      reduce_op="max")), 1)

    def run_updates(
        self,
        n: int,
        loss_fn: Callable[[Tensor], tuple[Tensor, dict[str, Tensor]]],
        epochs: int,
        num_minibatches: int,
        weight_fn: Callable[[Tensor], Tensor] | None = None,
    ) -> dict[str, float]:
        """``epochs`` passes over ``n`` rollouts in ``num_minibatches`` shuffled minibatches, one optimizer step each.

        A minibatch's rows are drawn at random and split into micro-batches in rollout order, so that the completions
        of one prompt run together (their prompt once, with ``share_prompt``); the minibatch's gradient is the same in
        any order.

        ``loss_fn(index)`` returns the loss of the rows ``index`` (a micro-batch) reduced over those rows, and
        detached figures to log. Micro-batch losses are weighted by ``weight_fn(index)`` (default: rows) over the
        minibatch's total, so the accumulated gradient is that of the whole minibatch. Under DDP the total is the
        minibatch's over every process (the mean of the processes' totals, since DDP averages gradients), so the
        step equals one process's step on the concatenated minibatch even when processes hold different numbers of
        rows or tokens; only the last backward of a minibatch synchronises gradients (DDP), and a process with an
        empty minibatch still takes part (with a zero loss), so every process steps together. Returns the mean of each
        figure over this process's micro-batches, except ``loss``: the mean over minibatches of this process's
        minibatch loss (its micro-batch losses weighted as in the gradient).
        """
        weight_fn = weight_fn or (lambda idx: torch.tensor(float(len(idx))))
        sums: dict[str, float] = defaultdict(float)
        count = 0
        loss_sum = 0.0
        for _ in range(epochs):
            order = torch.randperm(n, device=self.device) if n else torch.zeros(0, dtype=torch.long, device=self.device)
            for minibatch in order.tensor_split(num_minibatches):
                # rows in rollout order within the (random) minibatch: a prompt's completions share micro-batches
                minibatch = minibatch.sort().values
                micro = list(minibatch.split(self.hparams.micro_batch_size)) if len(minibatch) else []
                weights = [float(weight_fn(m)) for m in micro]
                local = sum(weights)
                total = float(self.global_mean(local))
                passes = self._backward_passes(len(micro))
                for j in range(passes):
                    self._deepspeed_micro_step()
                    with self._accumulating() if j < passes - 1 else nullcontext():
                        if j >= len(micro):  # no rows left here: a zero gradient, so every process steps together
                            self.manual_backward(self.zero_loss())
                            continue
                        loss, figures = loss_fn(micro[j])
                        self.manual_backward(loss * (weights[j] / total) if total > 0 else loss * 0.0)
                    for k, v in figures.items():
                        sums[k] += float(v)
                    loss_sum += float(loss.detach()) * weights[j] / max(local, 1e-12)
                    count += 1
                self.optimizer_step_now()
        return {k: v / max(count, 1) for k, v in sums.items()} | {"loss": loss_sum / (epochs * num_minibatches)}

    def zero_loss(self) -> Tensor:
        """A loss of zero whose backward reaches the trainable weights: the backward pass of a process that has no
        rows left in a minibatch the others are still training on (RAFT's processes keep different numbers of rows).

        Under ZeRO-3 and FSDP this process holds only shards of the weights, and their gradients are reduced by hooks
        that a forward pass sets up, so the zero goes through the policy network's forward (its logits on one token),
        as the other processes' passes over rollouts do (:meth:`response_window`): that gathers the weights and
        reduces their gradients exactly as theirs. Both call the network itself, not this module: under ZeRO-3 the
        module's own forward starts a new step of DeepSpeed's parameter trace, a collective that processes calling
        the network would not join. (PPO's and GRPO's processes always hold equal numbers of rollouts, so they never
        need this pass.)"""
        if not gathers_weights_per_forward(self.model):
            return sum(p.sum() for p in self.trainable_parameters()) * 0.0
        ids = torch.full((1, 1), self.tokenizer.pad_token_id or 0, dtype=torch.long, device=self.device)
        return self.model(input_ids=ids, attention_mask=torch.ones_like(ids), use_cache=False).logits.float().sum() * 0.0

    def update(self, rollouts: Rollouts) -> dict[str, float | Tensor]:
        """The objective's optimizer steps on scored rollouts; returns figures to log (local to this process)."""
        raise NotImplementedError

    # ------------------------------------------------------------------ distributed statistics
    # global_sum and global_mean: AlignmentModule
    def global_mean_figures(self, figures: dict[str, float | Tensor]) -> dict[str, Tensor]:
        """Mean over the processes that report each figure (a process with no data for a figure leaves it out)."""
        local = {k: torch.as_tensor(v, dtype=torch.float32, device=self.device).float().mean() for k, v in figures.items()}
        if self.trainer.world_size <= 1:
            return local
        import torch.distributed as dist

        names: list[list[str] | None] = [None] * self.trainer.world_size
        dist.all_gather_object(names, sorted(local))
        keys = sorted(set().union(*names))
        zero = torch.zeros((), device=self.device)
        values = torch.stack([local.get(k, zero) for k in keys])
        present = torch.tensor([float(k in local) for k in keys], device=self.device)
        totals = self.global_sum(torch.stack([values * present, present]))
        return {k: totals[0, i] / totals[1, i].clamp(min=1) for i, k in enumerate(keys)}

    def rollout_metrics(self, rollouts: Rollouts) -> dict[str, Tensor]:
        """Reward mean/std, status fractions and response length over every process's rollouts."""
        rewards = rollouts.rewards.float()
        n = self.global_sum(float(len(rollouts)))
        total = self.global_sum(rewards.sum())
        squares = self.global_sum((rewards ** 2).sum())
        mean = total / n
        metrics = {"reward_mean": mean, "reward_std": (squares / n - mean ** 2).clamp(min=0).sqrt(),
                   "response_length": self.global_sum(rollouts.response_mask.sum().float()) / n}
        executed = [r for r in rollouts.results if r is not None]
        n_exec = self.global_sum(float(len(executed)))
        if float(n_exec) > 0:
            counts = torch.tensor([sum(r.status.value == s for r in executed) for s in STATUSES], dtype=torch.float32,
                                  device=self.device)
            counts = self.global_sum(counts)
            for s, c in zip(STATUSES, counts):
                metrics[f"status/{s}"] = c / n_exec
        return metrics

    # ------------------------------------------------------------------ steps
    def training_step(self, batch: PromptBatch, batch_idx: int) -> None:
        self.step_tokens = StepTokens(backend=self.hparams.generation_backend)
        t0 = time.perf_counter()
        rollouts = self.generate_rollouts(batch, train=True)
        t1 = time.perf_counter()
        self.step_tokens.add_rollouts(rollouts)
        self.generated_tokens += self.step_tokens.generated
        self.score_rollouts(rollouts)
        t2 = time.perf_counter()
        self.check_chunked_head_together(rollouts)
        figures = self.update(rollouts)
        t3 = time.perf_counter()
        self.generator.sync_weights(self.model)
        metrics: dict[str, Tensor | float] = dict(self.rollout_metrics(rollouts))
        metrics.update(self.global_mean_figures(figures))
        metrics.update({"time/generate_s": t1 - t0, "time/score_s": t2 - t1, "time/update_s": t3 - t2})
        self.log_metrics("train", metrics, batch_size=len(batch), prog_bar=("reward_mean", "loss"))

    def check_chunked_head_together(self, rollouts: Rollouts) -> None:
        """Make the run's one check of the chunked LM head (:meth:`uses_chunked_logps`, two passes of the policy) on
        every process at once where the weights are sharded (FSDP, ZeRO-3), before the update: each of its passes
        gathers weights from all processes, and a process that trains on none of its rollouts (RAFT keeping nothing)
        would otherwise never make them, leaving the others waiting in theirs."""
        if (self.hparams.get("logits_chunk_size") and self.chunked_logps.ok is None and self._world_size() > 1
                and gathers_weights_per_forward(self.model)):
            probe = rollouts.input_ids if len(rollouts) else torch.full(
                (1, 2), self.tokenizer.pad_token_id or 0, dtype=torch.long, device=self.device)
            self.uses_chunked_logps(self.model, probe)

    def evaluate_step(self, batch: PromptBatch, stage: str) -> None:
        """Sample on held-out prompts; accumulate pass@1 (per problem, from the executed samples), reward, compile rate.

        A process whose held-out share has run out gets an empty batch: it generates nothing, but the hf backend still
        keeps the other processes' decoding company where the weights are sharded."""
        if not len(batch):
            self.generator.generate([], self.sampling_params(train=False))
            if self.reward_network is not None:
                self.score_with_network([], 0)  # the other processes' scoring passes may gather its weights
            return
        rollouts = self.generate_rollouts(batch, train=False)
        texts = rollouts.texts
        if self.hparams.reward == "execution":
            rewards, results = self.score(rollouts.items, texts)
        else:
            rewards, _ = self.score(rollouts.items, texts)
            _, results = self.execute(rollouts.items, texts)
        metrics = {name: self.eval_metrics[f"{stage}_{name}"] for name in ("pass_at_1", "pass_at_n", "reward_mean", "compile_rate")}
        metrics["reward_mean"].update(rewards)
        n = rollouts.group_size
        for start in range(0, len(results), n):
            group = results[start:start + n]
            if any(r is None for r in group):
                continue
            c = sum(r.passed for r in group)
            metrics["pass_at_1"].update(pass_at_k(n, c, 1))
            metrics["pass_at_n"].update(pass_at_k(n, c, n))
            metrics["compile_rate"].update(torch.tensor([float(r.compiled) for r in group]))

    def log_evaluation(self, stage: str) -> None:
        """Log ``{stage}/pass@1``, ``{stage}/reward_mean``, ``{stage}/compile_rate`` (and pass@n for n samples)."""
        n = self.hparams.val_samples_per_prompt
        names = {"reward_mean": "reward_mean", "pass_at_1": "pass@1", "compile_rate": "compile_rate"}
        if n > 1:
            names["pass_at_n"] = f"pass@{n}"
        for key, name in names.items():
            metric = self.eval_metrics[f"{stage}_{key}"]
            if metric.update_count:
                self.log(f"{stage}/{name}", metric.compute(), prog_bar=name == "pass@1", sync_dist=False)
            metric.reset()

    def validation_step(self, batch: PromptBatch, batch_idx: int) -> None:
        self.evaluate_step(batch, "val")

    def test_step(self, batch: PromptBatch, batch_idx: int) -> None:
        self.evaluate_step(batch, "test")

    def on_validation_epoch_end(self) -> None:
        self.log_evaluation("val")

    def on_test_epoch_end(self) -> None:
        self.log_evaluation("test")


def check_same_tokenizer(reward_tokenizer, policy_tokenizer, reward_source: str, policy_source: str) -> None:
    """Raise unless the reward model tokenizes text exactly as the policy does (same vocabulary and special tokens)."""
    rv, pv = reward_tokenizer.get_vocab(), policy_tokenizer.get_vocab()
    problems = []
    if len(rv) != len(pv):
        problems.append(f"vocabulary sizes {len(rv)} vs {len(pv)}")
    else:
        diff = sorted(t for t in rv if pv.get(t) != rv[t])
        if diff:
            problems.append(f"{len(diff)} tokens with different ids (first: {diff[0]!r})")
    for name in ("eos_token", "bos_token", "pad_token"):
        a, b = getattr(reward_tokenizer, name, None), getattr(policy_tokenizer, name, None)
        if a != b:
            problems.append(f"{name} {a!r} vs {b!r}")
    if problems:
        raise RewardSetupError(f"the reward model {reward_source!r} uses a different tokenizer from the policy "
                               f"{policy_source!r}: {'; '.join(problems)}. Train the reward model from the policy's "
                               "base model (or give tokenizer_name_or_path) so both read the same tokens")
