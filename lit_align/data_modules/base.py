"""What every lit_align DataModule shares: tokenizer resolution, length filtering, resumable length-grouped loaders."""

from __future__ import annotations

import logging
import math
import os
from collections.abc import Callable, Sequence
from functools import partial

import lightning.pytorch as L
import torch
from torch.utils.data import DataLoader

from lit_align.data_modules.chat import Prompt, render_chat_prompt, turn_end_ids
from lit_align.data_modules.sampler import LengthGroupedBatchSampler, TaggedBatch
from lit_align.data_modules.sources import DataError, missing_local_path

log = logging.getLogger(__name__)


class ListDataset:
    """A map-style dataset over a Python list."""

    def __init__(self, items: Sequence) -> None:
        self.items = items

    def __len__(self) -> int:
        return len(self.items)

    def __getitem__(self, i: int):
        return self.items[i]

    def __getitems__(self, indices: list[int]) -> list:
        """A batch's examples; a :class:`TaggedBatch` of indices gives a TaggedBatch of examples (the tag kept)."""
        items = [self.items[i] for i in indices]
        return TaggedBatch(items, indices.window_tokens) if isinstance(indices, TaggedBatch) else items


def collate_with_window_tokens(collate: Callable, items: list):
    """``collate(items)``, plus ``window_tokens`` (a 0-d int64 tensor) when the items carry an accumulation window's
    target-token count (:class:`TaggedBatch`)."""
    batch = collate(items)
    if isinstance(items, TaggedBatch):
        batch["window_tokens"] = torch.tensor(items.window_tokens)
    return batch


class TrainLoader(DataLoader):
    """The training DataLoader, resumable in Lightning's sense (``state_dict``/``load_state_dict``): its state, saved
    with the fit loop's in every checkpoint, is the number of batches of the current epoch already trained on
    (``batches_done``, read when the checkpoint is written); loading it makes the batch sampler start after them, so a
    mid-epoch resume takes the batch an uninterrupted run would have taken next."""

    def __init__(self, *args, batches_done: Callable[[], int], **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self.batches_done = batches_done

    def state_dict(self) -> dict:
        return {"batches_done": int(self.batches_done())}

    def load_state_dict(self, state_dict: dict) -> None:
        done = int(state_dict.get("batches_done", 0))
        if 0 < done < len(self.batch_sampler):  # an end-of-epoch checkpoint resumes at the next epoch's start
            self.batch_sampler.skip_batches(done)


class TokenizedDataModule(L.LightningDataModule):
    """Base DataModule: subclasses build ``self.train_items``/``self.val_items`` and define ``collate`` and ``length``.

    Args:
        tokenizer: tokenizer id/path; null uses the model's (``model_name_or_path`` of the LightningModule).
        max_length: examples longer than this many tokens are dropped, with a logged count.
        batch_size: examples per micro-batch (per process).
        eval_batch_size: examples per validation batch (defaults to batch_size).
        group_by_length: batch examples of similar length together so padding stays small.
        num_workers: DataLoader worker processes.
        seed: seed for shuffling, splitting and mixing; null (the default) takes the run's seed
            (``seed_everything``, 0 without one), so ``--seed_everything N`` also changes the data order.
        prompt_template: Python format string applied to every text prompt; must contain "{prompt}".
        chat_template: render every prompt with the tokenizer's chat template, as one user message (after
            ``prompt_template``) followed by the assistant's generation prompt. Prompts given as chat messages in the
            data (:mod:`lit_align.data_modules.chat`) are always rendered with it.
    """

    batch_kind: str | None = None
    """What a batch holds, for the objectives to check before training (``AlignmentModule.data_kind``): "sft" (prompt
    + completion rows), "preference" (the chosen, then the rejected row of each pair), "prompts" (prompts with tests,
    for online rollouts). None: not said (not checked)."""

    def __init__(self, tokenizer: str | None = None, max_length: int = 1024, batch_size: int = 8,
                 eval_batch_size: int | None = None, group_by_length: bool = True, num_workers: int = 0, seed: int | None = None,
                 prompt_template: str = "{prompt}", chat_template: bool = False) -> None:
        super().__init__()
        if "{prompt}" not in prompt_template:
            raise DataError(f"prompt_template must contain '{{prompt}}', got {prompt_template!r}")
        if max_length < 2:
            raise ValueError(f"max_length must be >= 2 tokens, got {max_length}")
        if batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {batch_size}")
        self.tokenizer_name = tokenizer
        self.max_length = max_length
        self.batch_size = batch_size
        self.eval_batch_size = eval_batch_size or batch_size
        self.group_by_length = group_by_length
        self.num_workers = num_workers
        if seed is not None and (isinstance(seed, bool) or not isinstance(seed, int)):
            raise DataError(f"data seed must be an integer or null, got {seed!r}")
        self._seed = seed
        self.prompt_template = prompt_template
        self.chat_template = chat_template
        self.tokenizer = None
        self._turn_end: list[int] | None = None
        self.train_items: list = []
        self.val_items: list = []
        self.dropped: dict[str, int] = {}

    @property
    def seed(self) -> int:
        """The data seed: ``seed`` if given, else the run's (``PL_GLOBAL_SEED``, set by ``seed_everything``), else 0."""
        if self._seed is not None:
            return self._seed
        return int(os.environ.get("PL_GLOBAL_SEED", 0))

    # -- checkpoint state: a resumed run keeps the data seed it started with ----------------------------------------
    def state_dict(self) -> dict:
        return {"seed": self.seed}

    def load_state_dict(self, state_dict: dict) -> None:
        saved = state_dict.get("seed")
        if saved is None or saved == self.seed:
            return
        log.warning("lit_align: resuming with the checkpoint's data seed %d instead of %d, so the run continues in the "
                    "data order it started with", saved, self.seed)
        built = bool(self.train_items or self.val_items)
        self._seed = saved
        if built:  # Lightning restores state after setup(): rebuild the splits and mixture with the saved seed
            self.train_items, self.val_items = [], []
            self.setup("fit")

    def check_source_paths(self) -> None:
        """Refuse, before anything is read, a ``train_sources``/``val_sources`` entry whose ``path`` names a local file
        or directory that does not exist (called by ``read_before_trainer``)."""
        for name in ("train_sources", "val_sources"):
            for i, source in enumerate(getattr(self, name, None) or []):
                path = source.get("path") if isinstance(source, dict) else getattr(source, "path", None)
                if isinstance(path, str) and missing_local_path(path):
                    raise DataError(f"data.init_args.{name}[{i}].path: {path!r} does not exist")

    def read_before_trainer(self, module, stage: str) -> None:
        """Read, tokenize and filter the data before the trainer starts (the command line calls this), so data that
        cannot be trained on (a missing column, every example over ``max_length``) is refused before Lightning's setup
        hook starts the logger and makes a run directory. The tokenizer is the module's unless one is set; the
        trainer's own ``setup`` call then finds the data built."""
        self.check_source_paths()
        self.resolve_tokenizer(module)
        self.setup(stage)

    def format_prompt(self, prompt: Prompt) -> str:
        """The prompt as the model sees it: ``prompt_template`` applied to text, and the chat template to chat messages
        (and to text with ``chat_template``)."""
        if not isinstance(prompt, str):
            return render_chat_prompt(self.resolve_tokenizer(), prompt)
        text = self.prompt_template.format(prompt=prompt)
        return render_chat_prompt(self.resolve_tokenizer(), (("user", text),)) if self.chat_template else text

    def completion_end(self, prompt: Prompt) -> list[int]:
        """The token ids that end a completion of ``prompt``: where the prompt goes through the chat template, the
        ones the template ends an assistant message with (:func:`~lit_align.data_modules.chat.turn_end_ids`), else the
        EOS token."""
        tokenizer = self.resolve_tokenizer()
        if isinstance(prompt, str) and not self.chat_template:
            return [] if tokenizer.eos_token_id is None else [tokenizer.eos_token_id]
        if self._turn_end is None:
            self._turn_end = turn_end_ids(tokenizer)
        return self._turn_end

    # -- tokenizer ------------------------------------------------------------------------------------------------
    def resolve_tokenizer(self, module=None):
        """The tokenizer: ``tokenizer`` if set, else the module's (``module``, or the attached trainer's)."""
        if self.tokenizer is not None:
            return self.tokenizer
        from lit_align.models import load_tokenizer

        name = self.tokenizer_name
        if module is None and self.trainer is not None:
            module = self.trainer.lightning_module
        if name is None and module is not None:
            name = getattr(module, "tokenizer_source", None)
        if name is None:
            raise DataError("no tokenizer: set data.init_args.tokenizer, or attach the DataModule to a Trainer with a lit_align module")
        self.tokenizer = load_tokenizer(name)
        return self.tokenizer

    # -- filtering ------------------------------------------------------------------------------------------------
    def filter_by_length(self, items: list, split: str) -> list:
        kept = [x for x in items if self.length(x) <= self.max_length]
        dropped = len(items) - len(kept)
        self.dropped[split] = dropped
        if dropped:
            log.warning("lit_align: dropped %d of %d %s examples longer than max_length=%d tokens",
                        dropped, len(items), split, self.max_length)
        if items and not kept:
            raise DataError(f"the {split} set is empty after length filtering: all {len(items)} examples are longer "
                            f"than max_length={self.max_length} tokens; raise data.init_args.max_length")
        return kept

    def length(self, item) -> int:
        raise NotImplementedError

    def target_tokens(self, item) -> int | None:
        """The number of tokens a token-mean loss averages over in ``item``; None (the default) when the module's
        loss is not a token mean. Given, training batches carry ``window_tokens`` (see ``_batch_sampler``)."""
        return None

    def collate(self, items: list):
        raise NotImplementedError

    # -- loaders --------------------------------------------------------------------------------------------------
    def _batch_sampler(self, items: list, batch_size: int, shuffle: bool) -> LengthGroupedBatchSampler:
        """Training batches (``shuffle``) of a DataModule with ``target_tokens`` are tagged with their accumulation
        window's token count over every process, the window being the trainer's ``accumulate_grad_batches`` (when it
        is above 1; the examples' target tokens are counted then, once)."""
        trainer = self.trainer
        replicas, rank = (trainer.world_size, trainer.global_rank) if trainer is not None else (1, 0)
        tagged = shuffle and bool(items) and self.target_tokens(items[0]) is not None
        return LengthGroupedBatchSampler([self.length(x) for x in items], batch_size, shuffle=shuffle, seed=self.seed,
                                         group_by_length=self.group_by_length, num_replicas=replicas, rank=rank,
                                         target_tokens=partial(self._all_target_tokens, items) if tagged else None,
                                         accumulation=self._accumulation if tagged else None)

    def _all_target_tokens(self, items: list) -> list[int]:
        return [self.target_tokens(x) for x in items]

    def _accumulation(self) -> tuple[int, int | None]:
        """(micro-batches per optimizer step, batches the epoch trains on, None for all) from the attached trainer."""
        trainer = self.trainer
        if trainer is None:
            return 1, None
        limit = getattr(trainer, "num_training_batches", math.inf)  # limit_train_batches applied (set before iterating)
        return int(trainer.accumulate_grad_batches), None if not math.isfinite(limit) else int(limit)

    def _loader(self, items: list, batch_size: int, shuffle: bool, collate: Callable) -> DataLoader:
        """A training loader (``shuffle``: a :class:`TrainLoader`) or an evaluation one over ``items``."""
        kwargs = dict(batch_sampler=self._batch_sampler(items, batch_size, shuffle), num_workers=self.num_workers,
                      collate_fn=partial(collate_with_window_tokens, collate), persistent_workers=self.num_workers > 0)
        if shuffle:
            return TrainLoader(ListDataset(items), batches_done=self._batches_done, **kwargs)
        return DataLoader(ListDataset(items), **kwargs)

    def train_dataloader(self) -> DataLoader:
        if not self.train_items:
            raise DataError("the training set is empty")
        loader = self._loader(self.train_items, self.batch_size, True, self.collate)
        trainer = self.trainer
        if trainer is not None and trainer.fit_loop.restarting:
            # a checkpoint written before loaders had a state: the restored loop progress (not yet reset for the
            # restart) gives the same position; a checkpoint's loader state, loaded after this, says the same
            loader.load_state_dict({"batches_done": self._batches_done()})
        return loader

    def val_dataloader(self) -> DataLoader | list:
        if not self.val_items:
            return []
        return self._loader(self.val_items, self.eval_batch_size, False, self.collate)

    def test_dataloader(self) -> DataLoader | list:
        """The validation data: ``lit_align test`` is a validation pass whose metrics are named ``test/*`` (give
        held-out data as ``val_sources``; no DataModule here holds a third split)."""
        return self.val_dataloader()

    def _batches_done(self) -> int:
        """Batches of the current epoch trained on (a checkpoint is written in on_train_batch_end, before the loop's
        ``completed`` count moves: ``processed`` counts that batch)."""
        trainer = self.trainer
        return 0 if trainer is None else trainer.fit_loop.epoch_loop.batch_progress.current.processed
