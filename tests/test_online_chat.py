"""Online objectives with a chat model: prompts through the chat template (the data's chat_template), the execution
reward on the code in each reply (extract_code), replies ended by the model's EOS, and the mismatch refused."""

import lightning.pytorch as L
import pytest
import transformers
from data_helpers import make_chat_model

from lit_align.data_modules.chat import render_chat_prompt
from lit_align.data_modules.prompts import PromptSource, PromptsDataModule, load_prompt_items
from lit_align.generation.base import DEFAULT_STOP
from lit_align.modules.grpo import GRPO


@pytest.fixture(scope="module")
def chat_model(tmp_path_factory):
    return make_chat_model(tmp_path_factory.mktemp("chat") / "model")


def _fenced(code: str) -> str:
    return f"Here you go:\n```python\n{code}```\nThis works."


def test_the_execution_reward_runs_the_code_in_each_reply():
    items = load_prompt_items(PromptSource(split="train", limit=2))
    whole = [_fenced(item.prompt + item.problem.canonical_solution) for item in items]  # the function written again
    wrong = [_fenced(item.prompt + "    return -12345\n") for item in items]
    bare = [_fenced(item.prompt + "    pass\n") for item in items]
    chat = GRPO(extract_code=True)
    rewards, results = chat.execute(items * 3, whole + wrong + bare)
    # passed; failed; failed with a trivial body (the reply's own definition is the one judged): the tests decide
    assert rewards == [4.0, 4.0, -0.3, -0.3, -1.0, -1.0]
    assert [r.status.value for r in results] == ["passed"] * 2 + ["failed"] * 4
    plain = GRPO()
    rewards, _ = plain.execute(items, whole)
    assert rewards == [-1.0, -1.0]  # appended to the prompt as they are, the replies are not Python
    assert chat.sampling_params().stop == [] and plain.sampling_params().stop == list(DEFAULT_STOP)
    assert GRPO(extract_code=True, stop=["\n\n\n"]).sampling_params().stop == ["\n\n\n"]


def test_chat_prompts_without_extract_code_are_refused(chat_model):
    data = PromptsDataModule(chat_template=True, tokenizer=chat_model)
    with pytest.raises(ValueError, match="set model.init_args.extract_code: true"):
        GRPO().refuse_incompatible_data(data)
    GRPO(extract_code=True).refuse_incompatible_data(data)


def test_a_chat_model_trains_on_templated_prompts(chat_model):
    data = PromptsDataModule(train_sources=[PromptSource(split="train", limit=2)], val_sources=[], batch_size=2,
                             chat_template=True)
    module = GRPO(model_name_or_path=chat_model, extract_code=True, samples_per_prompt=2, max_new_tokens=8)
    seen = []
    generate = module.generate_rollouts

    def recording(batch, train=True):
        seen.extend(batch.prompts)
        return generate(batch, train)

    module.generate_rollouts = recording
    trainer = L.Trainer(max_steps=1, accelerator="cpu", logger=False, enable_checkpointing=False,
                        enable_progress_bar=False, enable_model_summary=False, num_sanity_val_steps=0,
                        limit_val_batches=0)
    trainer.fit(module, datamodule=data)
    tokenizer = transformers.AutoTokenizer.from_pretrained(chat_model)
    raw = {item.prompt for item in load_prompt_items(PromptSource(split="train", limit=2))}
    assert sorted(seen) == sorted(render_chat_prompt(tokenizer, (("user", p),)) for p in raw)
    assert all(p.startswith("<user>") and p.endswith("<assistant>") for p in seen)
    assert trainer.global_step == 1


def test_a_chat_endpoint_is_refused_for_rollouts():
    with pytest.raises(ValueError, match="generation_kwargs.chat: an online objective trains on the sampled tokens"):
        GRPO(generation_backend="openai", generation_kwargs={"chat": True})
