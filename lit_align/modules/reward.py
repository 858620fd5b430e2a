"""Bradley-Terry reward model (IotaCode Eq. 2): a scalar head on a causal-LM backbone, trained on preference pairs.

The backbone comes from any causal LM checkpoint (the paper starts from a model domain-adapted on contest code: an
SFT/LM run's exported directory or a merged model) through ``load_causal_lm(path, head="score")``; the score head is
new unless the directory was saved from a reward model. With LoRA the score head is trained fully (it is added to
``modules_to_save`` automatically). :meth:`RewardModel.score` and :func:`load_reward_model` are what online
objectives (PPO) use to score (prompt, completion) pairs.
"""

from __future__ import annotations

import copy
import inspect
import json
import logging
import pickle
from collections import defaultdict
from contextlib import contextmanager
from dataclasses import replace
from pathlib import Path
from typing import Any, Iterable, Iterator, Sequence

import torch
from torch import Tensor, nn
from torch.nn import ModuleDict
from torchmetrics import MeanMetric

from lit_align import losses
from lit_align.data_modules.collate import encode_completion, encode_prompt
from lit_align.models import apply_lora, checkpoint_hyperparameters, load_causal_lm, save_tokenizer
from lit_align.modules.base import NO_CACHE_ERRORS, AlignmentModule
from lit_align.models import disable_dropout
from lit_align.modules.packed_pairs import PackingCheck, packed_mask_dtype, packed_pairs
from lit_align.modules.preference import shared_prompt_forward

log = logging.getLogger(__name__)

STAGES = ("train", "val", "test")


class RewardModel(AlignmentModule):
    """A sequence scorer r(x, y) trained with the Bradley-Terry loss -log sigmoid(r(x, y_w) - r(x, y_l) - margin).

    The reward of a sequence is the head's output at its last non-padding token (the end-of-sequence token that
    follows every completion). Logs ``loss``, ``rewards/chosen``, ``rewards/rejected``, ``rewards/margins`` (mean
    chosen-minus-rejected reward) and ``rewards/accuracies`` (share of pairs ranked correctly), the last two through
    torchmetrics: per step and (``train/rewards/*_epoch``) per epoch in training, over the epoch in validation.
    The loss is :meth:`compute_loss`.

    Args:
        margin: optional margin the chosen reward must exceed the rejected one by (null: Eq. 2 exactly).
        share_prompt: run each prompt once for both completions of a pair (its keys/values are reused). With
            gradient or activation checkpointing, whose recomputation cannot re-run a cached pass, only passes without
            gradient share through the cache (validation); with torch_compile none.
        packed_pairs: where the cache cannot be used (training under checkpointing or torch_compile), pack each pair
            into one row, prompt | chosen | rejected (:mod:`~lit_align.modules.packed_pairs`), so the prompt still
            runs once; needs share_prompt and an attention that applies a 4D mask (sdpa, eager). Off: those passes
            run the 2B full sequences.
        disable_dropout: turn dropout off, so the two sides of a pair are scored by the same network.
    """

    data_kind = "preference"

    def __init__(self, *args, margin: float | None = None, share_prompt: bool = True, packed_pairs: bool = True,
                 disable_dropout: bool = True, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        # save_hyperparameters finds these by walking the __init__ frames, which DeepSpeed's zero.Init interrupts with
        # a wrapper of its own (an online objective loads its sharded reward model inside one): record them explicitly
        self.hparams.update(margin=margin, share_prompt=share_prompt, packed_pairs=packed_pairs,
                            disable_dropout=disable_dropout)
        self.packing = PackingCheck()  # packed rows checked against full ones on the first packed batch
        if self.lora_config is not None:  # the new head must be trained fully, not through an adapter
            keep = list(dict.fromkeys([*(self.lora_config.modules_to_save or []), "score"]))
            self.lora_config = replace(self.lora_config, modules_to_save=keep)
        # keyed "train_accuracies" etc.: a ModuleDict key may not shadow a Module method such as train
        self.reward_metrics = ModuleDict({f"{stage}_{name}": MeanMetric() for stage in STAGES
                                          for name in ("accuracies", "margins")})

    # ------------------------------------------------------------------ construction
    def build_policy(self) -> nn.Module:
        """The backbone with a one-output score head (and a LoRA adapter whose modules_to_save include the head)."""
        hp = self.hparams
        model = load_causal_lm(hp.model_name_or_path, dtype=hp.dtype, attn_implementation=hp.attn_implementation,
                               quantize_4bit=hp.quantize_4bit, gradient_checkpointing=hp.gradient_checkpointing,
                               head="score")
        if self.lora_config is not None:  # a copy: peft extends modules_to_save in place
            lora = replace(self.lora_config, modules_to_save=list(self.lora_config.modules_to_save or []))
            model = apply_lora(model, lora, task_type="SEQ_CLS")
        return model.train()

    def configure_extra_models(self) -> None:
        if self.hparams.disable_dropout:
            disable_dropout(self.model)

    def _scorer(self) -> nn.Module:
        """The sequence-classification model under the (optional) peft wrapper."""
        return sequence_classifier(self.model)

    # ------------------------------------------------------------------ rewards
    def forward(self, input_ids: Tensor, attention_mask: Tensor, position_ids: Tensor | None = None,
                model: nn.Module | None = None) -> Tensor:
        """Rewards (N,) in float32: the score head at the last token whose attention mask is 1 (left or right padding)."""
        return sequence_rewards(self._scorer() if model is None else model, input_ids, attention_mask)

    @torch.no_grad()
    def score(self, prompts: list[str], completions: list[str], batch_size: int = 16,
              end: Sequence[int] | None = None) -> Tensor:
        """Rewards of (prompt, completion) pairs, (N,) float32 on the module's device, without gradient.

        Each pair is encoded as in training (prompt tokens, completion tokens, then ``end``: the end-of-sequence token
        by default; a chat model's replies end as its template ends them,
        :func:`~lit_align.data_modules.chat.turn_end_ids`); apply any prompt or chat template yourself. Pairs are
        scored in batches of ``batch_size`` (:func:`reward_batches`), each prompt once for all of its pairs in a batch
        with ``share_prompt``; the training/eval mode is restored afterwards.
        """
        if len(prompts) != len(completions):
            raise ValueError(f"score() needs one completion per prompt, got {len(prompts)} prompts and "
                             f"{len(completions)} completions")
        if batch_size < 1:
            raise ValueError(f"score() batch_size must be >= 1, got {batch_size}")
        if self.model is None:
            self.configure_model()
        return self.score_batches(reward_batches(self.tokenizer, prompts, completions, batch_size, end), len(prompts))

    @torch.no_grad()
    def score_batches(self, batches: Iterable[dict[str, Tensor]], n: int) -> Tensor:
        """Rewards (n,) of pairs already encoded by :func:`reward_batches`, in eval mode; the training/eval mode is
        restored afterwards."""
        rewards = torch.empty(n, device=self.device)
        was_training = self.training
        self.eval()
        try:
            for batch in batches:
                batch = {k: v.to(self.device) for k, v in batch.items()}
                rewards[batch["rows"]] = self.pair_rewards(batch)
        finally:
            self.train(was_training)
        return rewards

    # ------------------------------------------------------------------ loss and steps
    def compute_loss(self, chosen_rewards: Tensor, rejected_rewards: Tensor) -> Tensor:
        """The objective: per-example losses from the pair's rewards; override this one method for a variant."""
        return losses.bradley_terry_loss(chosen_rewards, rejected_rewards, margin=self.hparams.margin)

    def pair_rewards(self, batch: dict[str, Any]) -> Tensor:
        """Rewards of a batch's rows: a preference batch's (2B,), chosen rows then rejected rows, or the pairs of a
        :func:`reward_batches` batch. With ``share_prompt`` each prompt runs once (:func:`shared_prompt_rewards`)."""
        if "prompt_input_ids" in batch and self.shares_prompts():
            try:
                return shared_prompt_rewards(self._scorer(), batch)
            except NO_CACHE_ERRORS as err:
                self.prompt_sharing_failed(err)
        elif self._use_packed_pairs(batch):
            return packed_pair_rewards(self._scorer(), batch, self.pad_token_id)
        return self(batch["input_ids"], batch["attention_mask"])

    def _use_packed_pairs(self, batch: dict[str, Any]) -> bool:
        """Score the pairs packed one row each (:func:`packed_pair_rewards`) where the cache may not be filled: a pair
        batch split at the prompt (not :func:`reward_batches`' groups), ``share_prompt`` and ``packed_pairs`` on, an
        attention that applies a 4D mask, and the first packed pass equal to full rows (checked once, without
        gradient)."""
        hp = self.hparams
        compare = lambda: (packed_pair_rewards(self._scorer(), batch, self.pad_token_id),  # noqa: E731
                           self(batch["input_ids"], batch["attention_mask"]), 1.0,
                           self.exact_pass(self.model, batch["input_ids"]))
        return bool(hp.get("share_prompt") and hp.get("packed_pairs", True) and "prompt_input_ids" in batch
                    and "prompt_rows" not in batch and self.packing.allows(self.model, compare))

    def shared_step(self, batch: dict[str, Any], stage: str) -> Tensor:
        rewards = self.pair_rewards(batch)
        b = rewards.size(0) // 2
        chosen, rejected = rewards[:b], rewards[b:]
        loss = self.compute_loss(chosen, rejected).mean()
        metrics = {"loss": loss, "rewards/chosen": chosen, "rewards/rejected": rejected}
        for name, values in (("accuracies", (chosen > rejected).float()), ("margins", chosen - rejected)):
            metric = self.reward_metrics[f"{stage}_{name}"]
            if stage == "train":
                metrics[f"rewards/{name}"] = metric(values.detach())  # this batch's value; accumulated for the epoch
                self.log(f"train/rewards/{name}_epoch", metric, on_step=False, on_epoch=True, batch_size=b)
            else:
                metric.update(values.detach())
                self.log(f"{stage}/rewards/{name}", metric, on_step=False, on_epoch=True, batch_size=b)
        self.log_metrics(stage, metrics, batch_size=b)
        return loss

    # ------------------------------------------------------------------ export
    def save_pretrained(self, directory: str | Path) -> Path:
        """Write a standard Hugging Face directory (sequence-classification model, adapter merged, and tokenizer)."""
        if self.model is None:
            self.configure_model()
        directory = Path(directory)
        directory.mkdir(parents=True, exist_ok=True)
        model = self.model
        if hasattr(model, "merge_and_unload"):
            if self.hparams.quantize_4bit:
                raise ValueError("save_pretrained cannot merge a LoRA adapter into 4-bit weights; export the merged "
                                 "model with lit_align's LoRA merge callback instead")
            model = copy.deepcopy(model).merge_and_unload()
        model.save_pretrained(directory, safe_serialization=True)
        save_tokenizer(self.tokenizer, directory)
        return directory


def sequence_classifier(model: nn.Module) -> nn.Module:
    """The sequence-classification model under an (optional) peft wrapper."""
    return model.get_base_model() if hasattr(model, "get_base_model") else model


def sequence_rewards(scorer: nn.Module, input_ids: Tensor, attention_mask: Tensor) -> Tensor:
    """Rewards (N,) in float32 of a sequence-classification model ``scorer``: its score head at the last token whose
    attention mask is 1 (left or right padding)."""
    backbone = getattr(scorer, scorer.base_model_prefix)
    hidden = backbone(input_ids=input_ids, attention_mask=attention_mask, use_cache=False).last_hidden_state
    return _last_token_rewards(scorer, hidden, attention_mask)


def _last_token_rewards(scorer: nn.Module, hidden: Tensor, attention_mask: Tensor) -> Tensor:
    """``scorer``'s score head (float32, (N,)) on ``hidden`` at each row's last position whose mask is 1."""
    positions = torch.arange(attention_mask.size(1), device=attention_mask.device)
    last = (positions * attention_mask.to(positions.dtype)).argmax(-1)
    pooled = hidden[torch.arange(attention_mask.size(0), device=attention_mask.device), last]
    return scorer.score(pooled).squeeze(-1).float()


def full_rows(batch: dict[str, Tensor]) -> dict[str, Tensor]:
    """A :func:`reward_batches` batch without its prompt split: scored over the full sequences."""
    return {k: batch[k] for k in ("rows", "input_ids", "attention_mask")}


def shared_prompt_rewards(scorer: nn.Module, batch: dict[str, Tensor]) -> Tensor:
    """Rewards (M,) in float32 of a sequence-classification model ``scorer`` for a batch split at the prompt: each
    prompt runs once and its completions on its cached keys/values (:func:`shared_prompt_forward`, with the batch's
    ``prompt_rows`` map, or the pair layout without one); the reward is the head at each completion's last token.
    Raises one of ``NO_CACHE_ERRORS`` when the model has no usable KV cache."""
    _, out, _ = shared_prompt_forward(getattr(scorer, scorer.base_model_prefix), batch, batch.get("prompt_rows"))
    return _last_token_rewards(scorer, out.last_hidden_state, batch["completion_attention_mask"])


def packed_pair_rewards(scorer: nn.Module, batch: dict[str, Tensor], pad_token_id: int) -> Tensor:
    """Rewards (2B,) in float32, chosen rows first, of a pair batch split at the prompt, each pair run as one packed
    row (:func:`~lit_align.modules.packed_pairs.packed_pairs`): the head at each completion's last token."""
    backbone = getattr(scorer, scorer.base_model_prefix)
    packed = packed_pairs(batch, pad_token_id, mask_dtype=packed_mask_dtype(scorer))
    hidden = backbone(input_ids=packed["input_ids"], attention_mask=packed["attention_mask"],
                      position_ids=packed["position_ids"], use_cache=False).last_hidden_state
    rows = torch.arange(packed["ends"].size(0), device=hidden.device) % hidden.size(0)
    return scorer.score(hidden[rows, packed["ends"]]).squeeze(-1).float()


def _padded(seqs: list[list[int]], pad_token_id: int, left: bool = False) -> tuple[Tensor, Tensor]:
    """``(ids, mask)`` of ``seqs`` padded to the longest, on the right (or the left)."""
    width = max(len(seq) for seq in seqs)
    ids = torch.full((len(seqs), width), pad_token_id, dtype=torch.long)
    mask = torch.zeros((len(seqs), width), dtype=torch.long)
    for row, seq in enumerate(seqs):
        span = slice(width - len(seq), width) if left else slice(0, len(seq))
        ids[row, span] = torch.tensor(seq, dtype=torch.long)
        mask[row, span] = 1
    return ids, mask


def reward_batches(tokenizer, prompts: list[str], completions: list[str], batch_size: int,
                   end: Sequence[int] | None = None) -> Iterator[dict[str, Tensor]]:
    """The (prompt, completion) pairs encoded as in training (prompt tokens, completion tokens, ``end``: default
    end-of-sequence), in
    batches of ``batch_size``: a prompt's pairs next to each other, the groups with the longest sequences first.

    Each batch holds ``rows`` (the pairs' positions in the input lists) and ``input_ids``/``attention_mask`` (the
    sequences, right-padded), and, where every prompt has a token, the same pairs split at the prompt for
    :func:`shared_prompt_rewards`: the batch's distinct prompts once each (``prompt_input_ids``/
    ``prompt_attention_mask``, left-padded), the completions (``completion_input_ids``/``completion_attention_mask``,
    right-padded) and ``prompt_rows``, each pair's prompt row."""
    prompt_ids = {p: encode_prompt(tokenizer, p) for p in dict.fromkeys(prompts)}  # repeated prompts: tokenized once
    completion_ids = [encode_completion(tokenizer, c, end) for c in completions]
    groups: dict[str, list[int]] = defaultdict(list)
    for i, p in enumerate(prompts):
        groups[p].append(i)
    longest = {p: len(prompt_ids[p]) + max(len(completion_ids[i]) for i in rows) for p, rows in groups.items()}
    order = [i for p in sorted(groups, key=longest.get, reverse=True)
             for i in sorted(groups[p], key=lambda i: len(completion_ids[i]), reverse=True)]
    pad = tokenizer.pad_token_id
    for s in range(0, len(order), batch_size):
        chunk = order[s:s + batch_size]
        input_ids, attention_mask = _padded([prompt_ids[prompts[i]] + completion_ids[i] for i in chunk], pad)
        batch = {"rows": torch.tensor(chunk), "input_ids": input_ids, "attention_mask": attention_mask}
        distinct = list(dict.fromkeys(prompts[i] for i in chunk))
        if all(prompt_ids[p] for p in distinct):
            batch["prompt_input_ids"], batch["prompt_attention_mask"] = _padded([prompt_ids[p] for p in distinct], pad,
                                                                                left=True)
            batch["completion_input_ids"], batch["completion_attention_mask"] = _padded(
                [completion_ids[i] for i in chunk], pad)
            index = {p: k for k, p in enumerate(distinct)}
            batch["prompt_rows"] = torch.tensor([index[prompts[i]] for i in chunk])
        yield batch


class RewardNetwork(nn.Module):
    """A reward model's network as one module whose forward pass gives the rewards (N,) in float32 (see
    :func:`sequence_rewards`): what a sharding strategy wraps when an online objective shards its reward model
    (``reward_placement: shard``). FSDP gathers a unit's weights only in that unit's own forward pass, so the whole
    scoring must happen inside one.

    Given a :func:`reward_batches` batch's prompt split as well (``prompt_input_ids`` ...), each prompt runs once
    (:func:`shared_prompt_rewards`); a model without a usable KV cache runs the full rows from then on."""

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.model = model  # the sequence-classification model (peft-wrapped for a LoRA checkpoint)
        self.share_prompt = True

    def forward(self, input_ids: Tensor, attention_mask: Tensor, **prompt_split: Tensor) -> Tensor:
        scorer = sequence_classifier(self.model)
        if prompt_split and self.share_prompt:
            try:
                return shared_prompt_rewards(scorer, prompt_split)
            except NO_CACHE_ERRORS as err:
                log.warning("lit_align: prompt sharing is not supported by the reward model (%s); running full "
                            "sequences", err)
                self.share_prompt = False
        return sequence_rewards(scorer, input_ids, attention_mask)


def _is_reward_directory(path: Path) -> bool:
    try:
        config = json.loads((path / "config.json").read_text())
    except (OSError, ValueError):
        return False
    archs = config.get("architectures") or []
    labels = config.get("num_labels", len(config.get("id2label") or {}) or None)
    return any(a.endswith("ForSequenceClassification") for a in archs) and labels == 1


def _from_checkpoint(path: Path, map_location: str | torch.device) -> RewardModel:
    """Rebuild from the checkpoint's hyperparameters, then load its (possibly trainable-only) weights.

    Lightning's ``load_from_checkpoint`` decides strictness before ``on_load_checkpoint`` runs, so it refuses
    LoRA checkpoints that hold only the adapter and head; this loader checks instead that every trainable weight
    is present (``AlignmentModule.on_load_checkpoint``) and that the head is there.
    """
    checkpoint = torch.load(path, map_location="cpu", weights_only=True)
    state = checkpoint.get("state_dict")
    if not isinstance(state, dict) or not any(".score." in k or k.startswith("score.") for k in state):
        raise ValueError(f"{path} is not a RewardModel checkpoint: its weights have no score head "
                         f"(hyperparameters: {sorted(checkpoint.get('hyper_parameters') or {})})")
    hparams = dict(checkpoint.get("hyper_parameters") or {})
    accepted = set(inspect.signature(AlignmentModule.__init__).parameters) | set(
        inspect.signature(RewardModel.__init__).parameters)
    module = RewardModel(**{k: v for k, v in hparams.items() if k in accepted and k not in ("self", "args", "kwargs")})
    module.configure_model()
    module.on_load_checkpoint(checkpoint)
    with _writable(module):
        result = module.load_state_dict(state, strict=not checkpoint.get("lit_align_trainable_only", False))
    if result.unexpected_keys:
        raise ValueError(f"{path}: weights that this RewardModel does not have (first: {result.unexpected_keys[0]}); "
                         "it was saved with a different model or LoRA configuration")
    return module.to(map_location)


def reward_model_base(path_or_ckpt: str | Path) -> str | None:
    """The model whose architecture :func:`load_reward_model` builds for ``path_or_ckpt``: a saved directory itself, or
    the ``model_name_or_path`` a checkpoint's RewardModel was trained from (read without loading its weights). None
    when neither can be read (the load itself then names the problem)."""
    path = Path(path_or_ckpt).expanduser()
    if path.is_dir():
        return str(path)
    try:
        base = checkpoint_hyperparameters(path).get("model_name_or_path")
    except (OSError, RuntimeError, ValueError, pickle.UnpicklingError):
        return None
    return base if isinstance(base, str) else None


@contextmanager
def _writable(module: nn.Module) -> Iterator[None]:
    """Whole weights to load a state dict into. Built inside DeepSpeed's ``zero.Init`` (an online objective's sharded
    reward model under ZeRO-3) each process holds a partition: gather them all for the load, and keep what the first
    process wrote (every process reads the same file)."""
    params = [p for p in module.parameters() if hasattr(p, "ds_id")]
    if not params:
        yield
        return
    import deepspeed

    with deepspeed.zero.GatheredParameters(params, modifier_rank=0):
        yield


def load_reward_model(path_or_ckpt: str | Path, map_location: str | torch.device = "cpu") -> RewardModel:
    """A trained :class:`RewardModel` in eval mode, from a Lightning checkpoint of one or an HF directory saved from one.

    Args:
        path_or_ckpt: a ``.ckpt`` file written while training a RewardModel (its base model must still be reachable
            at the ``model_name_or_path`` it was trained from when the checkpoint holds only LoRA weights), or a
            directory written by :meth:`RewardModel.save_pretrained` (a one-label sequence-classification model).
        map_location: device the weights are loaded to.
    """
    path = Path(path_or_ckpt).expanduser()
    if path.is_file():
        module = _from_checkpoint(path, map_location)
    elif path.is_dir():
        if not _is_reward_directory(path):
            raise ValueError(f"{path} is not a reward model directory: its config.json does not describe a one-label "
                             "*ForSequenceClassification model; to train a reward model from a causal LM directory use "
                             "RewardModel(model_name_or_path=...)")
        module = RewardModel(model_name_or_path=str(path))
        module.configure_model()
        module.to(map_location)
    else:
        raise FileNotFoundError(f"reward model {str(path_or_ckpt)!r} does not exist (expected a .ckpt file or a "
                                "directory saved with RewardModel.save_pretrained)")
    return module.eval()


__all__ = ["RewardModel", "RewardNetwork", "full_rows", "load_reward_model", "reward_batches", "reward_model_base", "sequence_rewards",
           "shared_prompt_rewards"]
