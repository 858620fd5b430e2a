"""Chat prompts: text prompts through the tokenizer's chat template (chat_template), and conversational data files
(prompt/completion as chat messages, or a whole conversation in one column) for SFT and preference data."""

import pytest
import transformers
from data_helpers import write_jsonl

from lit_align.cli import main
from lit_align.data_modules.chat import render_chat_prompt
from lit_align.data_modules.preference import PreferenceDataModule, PreferenceSource
from lit_align.data_modules.sft import SFTDataModule
from lit_align.data_modules.sources import DataError, DataSource
from lit_align.losses import IGNORE_INDEX
from lit_align.models import materialize_preset

TEMPLATE = ("{{ bos_token }}{% for m in messages %}[{{ m['role'] }}]{{ m['content'] }}\n{% endfor %}"
            "{% if add_generation_prompt %}[assistant]{% endif %}")


@pytest.fixture(scope="module")
def chat_tokenizer(tmp_path_factory):
    """The tiny preset's tokenizer saved with a chat template: a tokenizer directory as a user's instruct model has."""
    tok = transformers.AutoTokenizer.from_pretrained(materialize_preset("preset:tiny"))
    tok.chat_template = TEMPLATE
    path = tmp_path_factory.mktemp("chat-tokenizer")
    tok.save_pretrained(path)
    return str(path)


def _ids(tokenizer_dir, text, special=True):
    tok = transformers.AutoTokenizer.from_pretrained(tokenizer_dir)
    return tok(text, add_special_tokens=special)["input_ids"], tok


def _sft(tokenizer, sources, **kw):
    dm = SFTDataModule(train_sources=sources, val_sources=[], val_fraction=0.0, tokenizer=tokenizer,
                       group_by_length=False, batch_size=2, **kw)
    dm.setup("fit")
    return dm


def test_text_prompts_through_the_chat_template(tmp_path, chat_tokenizer):
    data = write_jsonl(tmp_path / "d.jsonl", [{"prompt": "add one", "completion": "x + 1"}])
    dm = _sft(chat_tokenizer, [DataSource(path=str(data))], chat_template=True, prompt_template="Task: {prompt}")
    rendered = "<s>[user]Task: add one\n[assistant]"  # prompt_template first, then the chat template
    prompt_ids, tok = _ids(chat_tokenizer, rendered)
    completion_ids = tok("x + 1", add_special_tokens=False)["input_ids"] + [tok.eos_token_id]
    item = dm.train_items[0]
    assert item["input_ids"] == prompt_ids + completion_ids
    assert item["labels"] == [IGNORE_INDEX] * len(prompt_ids) + completion_ids
    assert tok.apply_chat_template([{"role": "user", "content": "Task: add one"}], add_generation_prompt=True,
                                   tokenize=False) == rendered


def test_conversational_columns_and_a_messages_column(tmp_path, chat_tokenizer):
    system = {"role": "system", "content": "be brief"}
    rows = [{"prompt": [system, {"role": "user", "content": "add one"}],
             "completion": [{"role": "assistant", "content": "x + 1"}]}]
    by_columns = _sft(chat_tokenizer, [DataSource(path=str(write_jsonl(tmp_path / "pc.jsonl", rows)))])
    conversation = [{"messages": [system, {"role": "user", "content": "add one"},
                                  {"role": "assistant", "content": "x + 1"}]}]
    by_messages = _sft(chat_tokenizer, [DataSource(path=str(write_jsonl(tmp_path / "m.jsonl", conversation)),
                                                   messages_column="messages")])
    prompt_ids, tok = _ids(chat_tokenizer, "<s>[system]be brief\n[user]add one\n[assistant]")
    expected = prompt_ids + tok("x + 1", add_special_tokens=False)["input_ids"] + [tok.eos_token_id]
    # message prompts are rendered without chat_template: true, and the prompt_template does not touch them
    assert by_columns.train_items[0]["input_ids"] == expected
    assert by_messages.train_items[0]["input_ids"] == expected
    assert by_messages.train_items[0]["labels"].count(IGNORE_INDEX) == len(prompt_ids)


def test_every_assistant_turn_of_a_conversation(tmp_path, chat_tokenizer):
    """assistant_turns: all makes one example per reply, the conversation up to it as the prompt; last (the default)
    trains the final reply only."""
    turns = [{"role": "user", "content": "q1"}, {"role": "assistant", "content": "a1"},
             {"role": "user", "content": "q2"}, {"role": "assistant", "content": "a2"}]
    path = str(write_jsonl(tmp_path / "multi.jsonl", [{"messages": turns}]))
    every = _sft(chat_tokenizer, [DataSource(path=path, messages_column="messages", assistant_turns="all")])
    last = _sft(chat_tokenizer, [DataSource(path=path, messages_column="messages")])
    tok = transformers.AutoTokenizer.from_pretrained(chat_tokenizer)
    eos = [tok.eos_token_id]

    def example(prompt, reply):
        p = tok(prompt)["input_ids"]
        return p + tok(reply, add_special_tokens=False)["input_ids"] + eos

    first = example("<s>[user]q1\n[assistant]", "a1")
    second = example("<s>[user]q1\n[assistant]a1\n[user]q2\n[assistant]", "a2")
    assert sorted(item["input_ids"] for item in every.train_items) == sorted([first, second])
    assert [item["input_ids"] for item in last.train_items] == [second]
    with pytest.raises(DataError, match="assistant_turns must be 'last' or 'all'"):
        _sft(chat_tokenizer, [DataSource(path=path, messages_column="messages", assistant_turns="every")])


def test_conversational_preference_rows(tmp_path, chat_tokenizer):
    user = [{"role": "user", "content": "add one"}]
    chat = write_jsonl(tmp_path / "chat.jsonl", [{"prompt": user, "chosen": [{"role": "assistant", "content": "x + 1"}],
                                                  "rejected": [{"role": "assistant", "content": "x - 1"}]}])
    text = write_jsonl(tmp_path / "text.jsonl", [{"prompt": "text prompt", "chosen": "a", "rejected": "b"}])
    dm = PreferenceDataModule(train_sources=[PreferenceSource(path=str(p), kind="triplets") for p in (chat, text)],
                              val_sources=[], val_fraction=0.0, tokenizer=chat_tokenizer, group_by_length=False)
    dm.setup("fit")
    prompt_ids, tok = _ids(chat_tokenizer, "<s>[user]add one\n[assistant]")
    text_ids, _ = _ids(chat_tokenizer, "text prompt")
    items = sorted(dm.train_items, key=lambda it: len(it.prompt_ids), reverse=True)
    assert list(items[0].prompt_ids) == prompt_ids
    assert list(items[0].chosen_ids) == tok("x + 1", add_special_tokens=False)["input_ids"] + [tok.eos_token_id]
    assert list(items[0].rejected_ids) == tok("x - 1", add_special_tokens=False)["input_ids"] + [tok.eos_token_id]
    assert list(items[1].prompt_ids) == text_ids  # a text prompt without chat_template stays text


def test_preference_pairs_as_whole_conversations_without_a_prompt_column(tmp_path, chat_tokenizer):
    """The "implicit prompt" format: chosen and rejected hold whole conversations; the messages they share before
    their final replies are the prompt."""
    from lit_align.data_modules.pairing import triplets_from_file

    user = {"role": "user", "content": "add one"}
    row = {"chosen": [user, {"role": "assistant", "content": "x + 1"}],
           "rejected": [user, {"role": "assistant", "content": "x - 1"}]}
    path = write_jsonl(tmp_path / "implicit.jsonl", [row])
    (triplet,), counts = triplets_from_file(str(path))
    assert (triplet.prompt, triplet.chosen, triplet.rejected) == ((("user", "add one"),), "x + 1", "x - 1")
    assert counts["given"] == 1
    row["rejected"] = [{"role": "user", "content": "add two"}, {"role": "assistant", "content": "x - 1"}]
    bad = write_jsonl(tmp_path / "differ.jsonl", [row])
    with pytest.raises(DataError, match="row 0: the chosen and rejected conversations differ before their final"):
        triplets_from_file(str(bad))
    text = write_jsonl(tmp_path / "text.jsonl", [{"chosen": "a", "rejected": "b"}])  # text pairs still need a prompt
    with pytest.raises(ValueError, match="has no column 'prompt'"):
        triplets_from_file(str(text))


class _BosTokenizer:
    """A Llama-style tokenizer (adds BOS when encoding) whose chat template also writes the BOS token."""

    bos_token, bos_token_id, chat_template = "<s>", 1, "set"

    def __call__(self, text, add_special_tokens=True):
        return {"input_ids": ([1] if add_special_tokens else []) + [ord(c) for c in text]}

    def apply_chat_template(self, messages, tokenize, add_generation_prompt):
        return "<s>" + "".join(m["content"] for m in messages) + ("|" if add_generation_prompt else "")


def test_a_template_bos_is_not_doubled_by_a_tokenizer_that_adds_one(chat_tokenizer):
    assert render_chat_prompt(_BosTokenizer(), (("user", "hi"),)) == "hi|"  # encoded: [BOS] hi| , one BOS
    tiny = transformers.AutoTokenizer.from_pretrained(chat_tokenizer)  # adds no BOS itself: the template's is kept
    assert render_chat_prompt(tiny, (("user", "hi"),)) == "<s>[user]hi\n[assistant]"


def test_bad_chat_data_names_the_file_row_and_column(tmp_path, chat_tokenizer):
    cases = [
        ({"prompt": [{"role": "user"}], "completion": "x"}, {}, "row 0 column 'prompt': message 0 needs a text 'role'"),
        ({"prompt": "p", "completion": [{"role": "user", "content": "x"}]}, {},
         "row 0 column 'completion': a completion given as chat messages must be one assistant message, got roles "
         "['user']"),
        ({"messages": [{"role": "user", "content": "q"}, {"role": "user", "content": "q2"}]},
         {"messages_column": "messages"}, "row 0 column 'messages': a conversation needs at least one message before "
                                          "a final assistant message, got roles ['user', 'user']"),
    ]
    for i, (row, source_kw, message) in enumerate(cases):
        path = write_jsonl(tmp_path / f"bad{i}.jsonl", [row])
        with pytest.raises(DataError, match=message.replace("[", r"\[").replace("]", r"\]")) as err:
            _sft(chat_tokenizer, [DataSource(path=str(path), **source_kw)])
        assert str(path) in str(err.value)


def test_chat_template_without_one_in_the_tokenizer_is_refused_before_training(tmp_path):
    data = write_jsonl(tmp_path / "d.jsonl", [{"prompt": f"p{i}", "completion": "c"} for i in range(8)])
    with pytest.raises(DataError, match="the tokenizer '.*' has no chat template, so chat prompts cannot be rendered"):
        main(["fit", "--config", "configs/quickstart/sft.yaml", "--trainer.logger.init_args.save_dir",
              str(tmp_path / "runs"), "--data.init_args.train_sources", f"[{{path: {data}}}]",
              "--data.init_args.val_sources", "[]", "--data.init_args.chat_template", "true",
              "--trainer.callbacks.init_args.link", str(tmp_path / "model")])
    assert not (tmp_path / "runs").exists()  # refused before the logger made a run directory


def test_chat_prompts_are_refused_for_online_objectives(tmp_path):
    from lit_align.data_modules.prompts import PromptSource, load_prompt_items

    path = write_jsonl(tmp_path / "prompts.jsonl", [{"prompt": [{"role": "user", "content": "add one"}]}])
    with pytest.raises(DataError, match=r"row 0 column 'prompt': chat messages are not read as prompts of online"):
        load_prompt_items(PromptSource(path=str(path)))
