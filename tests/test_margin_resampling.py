"""MarginResampling: softmax(-margin / T) probabilities, draws in proportion, batch-level groups, the DataModule hook."""

import math
from collections import Counter

import lightning as L
import pytest
import torch

from lit_align.callbacks.margin_resampling import (
    MarginResampling,
    draw_schedule,
    effective_sample_size,
    family_groups,
    family_of,
    group_means,
    margin_groups,
    resampling_probabilities,
)
from lit_align.data_modules.preference import PreferenceDataModule, PreferenceSource
from lit_align.models import LoRAConfig
from lit_align.modules.base import OptimizerConfig
from lit_align.modules.dpo import DPO


# ---------------------------------------------------------------- pure math
def test_probabilities_are_softmax_of_negative_margins_over_temperature():
    t = 0.5
    margins = torch.tensor([0.0, t * math.log(2), t * math.log(4)])  # exp(-m / t) = 1, 1/2, 1/4
    p = resampling_probabilities(margins, t)
    assert torch.allclose(p, torch.tensor([4 / 7, 2 / 7, 1 / 7], dtype=torch.float64), atol=1e-12)
    m = torch.tensor([1.3, -0.2, 0.7, 2.5])
    assert torch.allclose(resampling_probabilities(m, 2.0), torch.softmax(-m.double() / 2.0, 0), atol=1e-12)


@pytest.mark.parametrize("temperature", [0.0, -1.0, float("nan")])
def test_non_positive_temperature_is_refused_at_construction(temperature):
    with pytest.raises(ValueError, match=r"MarginResampling temperature must be a finite number > 0"):
        MarginResampling(temperature=temperature)
    with pytest.raises(ValueError, match="temperature must be > 0"):
        resampling_probabilities(torch.zeros(3), 0.0)


def test_effective_sample_size():
    assert effective_sample_size(torch.full((8,), 1 / 8)) == pytest.approx(8.0)
    assert effective_sample_size(torch.tensor([1.0, 0.0, 0.0])) == pytest.approx(1.0)
    assert effective_sample_size(torch.tensor([0.5, 0.25, 0.25])) == pytest.approx(1 / 0.375)


def test_hard_examples_are_drawn_more_often_in_proportion():
    margins = torch.tensor([-1.0, 0.0, 1.0, 2.0])  # the first is the hardest
    p = resampling_probabilities(margins, 1.0)
    gen = torch.Generator().manual_seed(0)
    schedule = draw_schedule(p, None, num_batches=5000, batch_size=8, generator=gen)
    counts = Counter(i for b in schedule for i in b)
    n = 40000
    assert all(len(b) == 8 for b in schedule) and sum(counts.values()) == n
    for i in range(4):  # within 4 standard deviations of n * p_i
        sd = math.sqrt(n * p[i] * (1 - p[i]))
        assert abs(counts[i] - n * float(p[i])) < 4 * sd
    assert counts[0] > counts[1] > counts[2] > counts[3]
    # ratios follow exp(-delta margin / T): e ~ 2.718 between neighbours
    assert counts[0] / counts[1] == pytest.approx(math.e, rel=0.05)


def test_batch_level_draws_whole_groups_by_mean_margin():
    margins = torch.tensor([0.0, 2.0, 1.0, 1.0, 3.0, 3.0])
    groups = [[0, 1], [2, 3], [4, 5]]
    means = group_means(margins.double(), groups)
    assert means.tolist() == [1.0, 1.0, 3.0]
    p = resampling_probabilities(means, 1.0)
    schedule = draw_schedule(p, groups, num_batches=3000, batch_size=2, generator=torch.Generator().manual_seed(1))
    assert all(b in groups for b in schedule)
    counts = Counter(tuple(b) for b in schedule)
    expected_last = 3000 * float(p[2])  # e^-2 / (2 + e^-2) = 0.063
    assert abs(counts[(4, 5)] - expected_last) < 4 * math.sqrt(expected_last)
    assert counts[(0, 1)] == pytest.approx(counts[(2, 3)], rel=0.1)


def test_family_groups_mix_topics():
    ids = [f"suite/{fam}/t/{i}" for fam in ("a", "b", "c", "d") for i in range(6)]
    groups = family_groups(ids, batch_size=4, seed=3)
    assert sorted(i for g in groups for i in g) == list(range(24))
    assert all(sorted(family_of(ids[i]) for i in g) == ["a", "b", "c", "d"] for g in groups)
    assert family_of("file:abc") == "file:abc"


def test_margin_groups_put_each_familys_hardest_pairs_together_and_keep_topics_mixed():
    ids = [f"suite/{fam}/t/{i}" for fam in ("a", "b", "c", "d") for i in range(6)]
    # family a is easy everywhere (margins 10..15), the others span 0..5: ranks, not raw margins, form the groups
    margins = torch.tensor([10.0 + i if fam == "a" else float((i * 5) % 6) for fam in "abcd" for i in range(6)])
    groups = margin_groups(ids, margins, batch_size=4)
    assert sorted(i for g in groups for i in g) == list(range(24))
    assert all(sorted(family_of(ids[i]) for i in g) == ["a", "b", "c", "d"] for g in groups)
    # group k holds the rank-k pair of every family
    for k, g in enumerate(groups):
        for i in g:
            fam = [j for j in range(24) if ids[j].split("/")[1] == ids[i].split("/")[1]]
            assert sorted(fam, key=lambda j: (float(margins[j]), j)).index(i) == k
    means = group_means(margins, groups)
    assert torch.all(means[1:] > means[:-1])  # hardest group first; with family groups all means would be close
    probs = resampling_probabilities(means, 1.0)
    assert probs[0] > 50 * probs[-1]


# ---------------------------------------------------------------- with DPO and the DataModule
def _data(limit=12):
    return PreferenceDataModule(tokenizer="preset:tiny", train_sources=[PreferenceSource(limit=limit)], val_sources=[],
                                val_fraction=0.0, max_pairs_per_problem=2, batch_size=4, eval_batch_size=8)


class _RecordBatches(L.Callback):
    def __init__(self):
        self.seen = []  # (epoch, sorted keys)

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        self.seen.append((trainer.current_epoch, sorted(batch["index"].tolist())))


def _fit(tmp_path, callbacks, epochs=2, data=None):
    data = data or _data()
    module = DPO(lora=LoRAConfig(r=4, dropout=0.0), optimizer=OptimizerConfig(lr=1e-2, warmup_steps=0), beta=0.5)
    logger = L.pytorch.loggers.TensorBoardLogger(str(tmp_path), name="tb")
    trainer = L.Trainer(max_epochs=epochs, accelerator="cpu", logger=logger, enable_progress_bar=False,
                        enable_model_summary=False, enable_checkpointing=False, limit_val_batches=0,
                        num_sanity_val_steps=0, callbacks=callbacks, use_distributed_sampler=False, log_every_n_steps=1)
    trainer.fit(module, datamodule=data)
    return module, data, trainer


def test_epoch_end_scores_every_pair_and_next_epoch_trains_on_the_draw(tmp_path):
    resampling = MarginResampling(temperature=0.05, level="batch", grouping="family", seed=7)
    record = _RecordBatches()
    module, data, trainer = _fit(tmp_path, [resampling, record])
    n = len(data.train_items)
    assert n == 24
    # probabilities: softmax(-mean margin / T) over the fixed groups, margins recomputed here independently
    margins = torch.cat([module.example_margins(data.collate([it])) for it in data.train_items]).double()
    assert torch.allclose(resampling.margins, margins, atol=1e-4)
    expected = torch.softmax(-group_means(margins, resampling.groups) / 0.05, 0)
    assert torch.allclose(resampling.probs, expected, atol=1e-3)
    assert sorted(i for g in resampling.groups for i in g) == list(range(n))
    # epoch 1 (after the first scoring) trains on whole groups drawn from the schedule, as many batches as epoch 0
    epoch0 = [b for e, b in record.seen if e == 0]
    epoch1 = [b for e, b in record.seen if e == 1]
    assert len(epoch0) == len(epoch1) == 6
    groups = [sorted(g) for g in resampling.groups]
    assert all(b in groups for b in epoch1)
    # two scorings (end of epochs 0 and 1), each logged with its effective sample size
    assert len(resampling.history) == 2
    h = resampling.history[0]
    assert 1.0 <= h["resampling/ess"] <= len(groups)
    events = list((tmp_path / "tb").rglob("events.out.tfevents.*"))
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    acc = EventAccumulator(str(events[0].parent), size_guidance={"histograms": 0})
    acc.Reload()
    assert "resampling/margins" in acc.Tags()["histograms"]
    assert "resampling/ess" in acc.Tags()["scalars"]


def test_margin_grouping_reforms_groups_from_the_current_margins(tmp_path):
    class Spy(MarginResampling):
        snapshots: list = []

        def update(self, trainer, pl_module):
            super().update(trainer, pl_module)
            self.snapshots.append([sorted(g) for g in self.groups])

    resampling = Spy(temperature=0.5, level="batch", grouping="margin", seed=1)
    record = _RecordBatches()
    module, data, trainer = _fit(tmp_path, [resampling, record])
    ids = [it.source_id for it in data.train_items]
    margins = torch.cat([module.example_margins(data.collate([it])) for it in data.train_items]).double()
    # the last scoring's groups are cut from the final margins, and its probabilities are softmax over their means
    assert torch.allclose(resampling.margins, margins, atol=1e-4)
    assert resampling.groups == margin_groups(ids, resampling.margins, 4)
    expected = torch.softmax(-group_means(margins, resampling.groups) / 0.5, 0)
    assert torch.allclose(resampling.probs, expected, atol=1e-3)
    # epoch 1 trained on whole groups of the first scoring (end of epoch 0)
    assert len(resampling.snapshots) == 2
    epoch1 = [b for e, b in record.seen if e == 1]
    assert len(epoch1) == 6 and all(b in resampling.snapshots[0] for b in epoch1)


def test_schedule_is_seeded_by_epoch_so_a_restored_callback_draws_the_same(tmp_path):
    data = _data()
    data.setup()
    a = MarginResampling(temperature=1.0, seed=3)
    a.groups = family_groups([it.source_id for it in data.train_items], 4, seed=3)
    a.probs = resampling_probabilities(torch.linspace(-1, 1, len(a.groups)), 1.0)

    class _T:  # the two trainer attributes apply() reads
        datamodule = data
        world_size = 1

    a.apply(_T, epoch=5)
    first = data.train_schedule
    b = MarginResampling(temperature=1.0, seed=3)
    b.load_state_dict(a.state_dict())
    b.apply(_T, epoch=5)
    assert data.train_schedule == first and len(first) == 6
    b.apply(_T, epoch=6)
    assert data.train_schedule != first


def test_datamodule_without_schedule_hook_and_module_without_margins_are_refused():
    cb = MarginResampling()

    class _Plain:
        pass

    with pytest.raises(TypeError, match="needs a module with example_margins"):
        cb.score(_Plain(), _data())

    class _T:
        datamodule = L.LightningDataModule()

    with pytest.raises(TypeError, match="needs a DataModule with set_train_schedule"):
        cb.setup(_T, None, "fit")


def test_scheduled_batches_carry_the_chosen_tokens_of_their_accumulation_window_as_trained():
    """Under accumulation the tags follow the batches actually trained: a schedule shorter than the epoch fills its
    first batches and the rest come from the sampler's order, and each batch's window_tokens (both ranks equal) sums
    the chosen tokens of its window of 2 global batches, the window mixing scheduled and own batches included."""
    from types import SimpleNamespace

    from lit_align.data_modules.sampler import TaggedBatch

    data = _data(limit=24)
    data.setup()
    targets = [len(it.chosen_ids) for it in data.train_items]
    assert targets == [data.target_tokens(it) for it in data.train_items] and len(set(targets)) > 1

    def ranks(schedule):
        data.set_train_schedule(schedule)
        out = []
        for rank in (0, 1):
            data.trainer = SimpleNamespace(world_size=2, global_rank=rank, accumulate_grad_batches=2,
                                           num_training_batches=math.inf)
            out.append(list(data._batch_sampler(data.train_items, 2, shuffle=True)))
        return out

    own = ranks(None)
    n = len(own[0])
    assert n >= 5 and all(isinstance(b, TaggedBatch) for b in own[0] + own[1])
    shortest = sorted(range(len(targets)), key=lambda i: targets[i])  # 3 global batches of 4 of the shortest pairs
    schedule = [shortest[4 * s:4 * s + 4] for s in range(3)]  # windows: [0, 1], [2, 3], ...
    r0, r1 = ranks(schedule)
    assert [list(b) for b in r0[:3]] == [g[:2] for g in schedule] and [list(b) for b in r1[:3]] == [g[2:] for g in schedule]
    assert [list(b) for b in r0[3:]] == [list(b) for b in own[0][3:]]
    trained = [a + b for a, b in zip(r0, r1)]  # the global batches as trained
    expected = [sum(targets[i] for g in trained[s - s % 2:s - s % 2 + 2] for i in g) for s in range(n)]
    assert [b.window_tokens for b in r0] == [b.window_tokens for b in r1] == expected
    assert expected[0] < own[0][0].window_tokens and expected[4:] == [b.window_tokens for b in own[0][4:]]
    data.trainer = None
