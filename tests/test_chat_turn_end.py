"""A chat reply ends the way the model's chat template ends an assistant message: in training data (SFT and
preference completions, reward-model scoring of online replies) and in generation (the turn's end token stops a
completion, a server reports it, and it is the token trained after it), also for templates whose turn end is not
the tokenizer's EOS (Gemma's <end_of_turn>, DeepSeek-Coder instruct's "\\n<|EOT|>"); and a conversation's every
reply in one sequence (assistant_turns: all)."""

import pytest
import torch
import transformers
from data_helpers import CHAT_TEMPLATE, make_turn_chat_model, write_jsonl

from lit_align.data_modules.chat import turn_end, turn_end_ids, turn_end_token_id
from lit_align.data_modules.preference import PreferenceDataModule, PreferenceSource
from lit_align.data_modules.sft import SFTDataModule
from lit_align.data_modules.sources import DataSource
from lit_align.generation import SamplingParams
from lit_align.generation.base import Completion
from lit_align.generation.hf import HFBackend
from lit_align.generation.openai import OpenAIBackend
from lit_align.generation.serve import CompletionService
from lit_align.losses import IGNORE_INDEX
from lit_align.models import load_causal_lm, load_tokenizer, materialize_preset
from lit_align.modules.grpo import GRPO
from lit_align.modules.reward import reward_batches

END_OF_TURN = 261  # make_turn_chat_model's <end_of_turn>


@pytest.fixture(scope="module")
def turn_model(tmp_path_factory):
    return make_turn_chat_model(tmp_path_factory.mktemp("turn-chat") / "model")


def _tiny_tokenizer(template):
    tok = transformers.AutoTokenizer.from_pretrained(materialize_preset("preset:tiny"))
    tok.chat_template = template
    return tok


def test_the_turn_end_is_what_the_template_writes_after_a_reply(turn_model):
    gemma = load_tokenizer(turn_model)
    assert (turn_end(gemma), turn_end_ids(gemma), turn_end_token_id(gemma)) == ("<end_of_turn>", [END_OF_TURN],
                                                                               END_OF_TURN)
    assert gemma.eos_token_id == 2 != END_OF_TURN
    # DeepSeek-Coder instruct writes "\n<|EOT|>\n" after a reply (its EOS token): the newline before it is part of
    # the turn's end, the one after it is not
    deepseek = _tiny_tokenizer("{% for m in messages %}{% if m['role'] == 'user' %}### Instruction:\n{{ m['content'] }}"
                               "\n{% else %}### Response:\n{{ m['content'] }}\n{{ eos_token }}\n{% endif %}{% endfor %}"
                               "{% if add_generation_prompt %}### Response:\n{% endif %}")
    newline = deepseek("\n", add_special_tokens=False)["input_ids"]
    assert turn_end(deepseek) == "\n</s>" and turn_end_ids(deepseek) == newline + [deepseek.eos_token_id]
    assert turn_end_token_id(deepseek) == deepseek.eos_token_id
    # a template that writes no special token after a reply: the EOS token ends it, and generation adds no end token
    plain = _tiny_tokenizer(CHAT_TEMPLATE)
    assert (turn_end(plain), turn_end_ids(plain), turn_end_token_id(plain)) == (None, [plain.eos_token_id], None)
    assert turn_end_token_id(_tiny_tokenizer(None)) is None  # no chat template at all
    # a template that cannot render a user message then an assistant message: the EOS token, with a warning
    strict = _tiny_tokenizer("{{ raise_exception('a system message is required') }}")
    assert turn_end_ids(strict) == [strict.eos_token_id]


def test_sft_and_preference_replies_end_with_the_turn_end(tmp_path, turn_model):
    tok = load_tokenizer(turn_model)
    rows = [{"prompt": "add one", "completion": "x + 1"}]
    path = write_jsonl(tmp_path / "sft.jsonl", rows)
    sft = SFTDataModule(train_sources=[DataSource(path=str(path))], val_sources=[], val_fraction=0.0,
                        tokenizer=turn_model, chat_template=True, group_by_length=False)
    sft.setup("fit")
    prompt = tok("<s><start_of_turn>user\nadd one<end_of_turn>\n<start_of_turn>model\n",
                 add_special_tokens=False)["input_ids"]
    reply = tok("x + 1", add_special_tokens=False)["input_ids"] + [END_OF_TURN]
    assert sft.train_items[0]["input_ids"] == prompt + reply
    assert sft.train_items[0]["labels"] == [IGNORE_INDEX] * len(prompt) + reply
    text = SFTDataModule(train_sources=[DataSource(path=str(path))], val_sources=[], val_fraction=0.0,
                         tokenizer=turn_model, group_by_length=False)
    text.setup("fit")
    assert text.train_items[0]["input_ids"][-1] == tok.eos_token_id  # a text prompt's completion ends with EOS

    # one file of chat pairs and one of text pairs with the same completions: each ends as its prompt requires
    user = [{"role": "user", "content": "add one"}]
    chat = write_jsonl(tmp_path / "chat.jsonl", [{"prompt": user, "chosen": [{"role": "assistant", "content": "x + 1"}],
                                                  "rejected": [{"role": "assistant", "content": "x - 1"}]}])
    plain = write_jsonl(tmp_path / "text.jsonl", [{"prompt": "text prompt", "chosen": "x + 1", "rejected": "x - 1"}])
    pairs = PreferenceDataModule(train_sources=[PreferenceSource(path=str(p), kind="triplets") for p in (chat, plain)],
                                 val_sources=[], val_fraction=0.0, tokenizer=turn_model, group_by_length=False)
    pairs.setup("fit")
    ends = {tuple(item.prompt_ids) == tuple(prompt): (list(item.chosen_ids), list(item.rejected_ids))
            for item in pairs.train_items}
    body = {sign: tok(f"x {sign} 1", add_special_tokens=False)["input_ids"] for sign in "+-"}
    assert ends[True] == (body["+"] + [END_OF_TURN], body["-"] + [END_OF_TURN])
    assert ends[False] == (body["+"] + [tok.eos_token_id], body["-"] + [tok.eos_token_id])


def test_generation_stops_at_the_turn_end_and_online_training_keeps_it(turn_model):
    model, tok = load_causal_lm(turn_model), load_tokenizer(turn_model)
    backend = HFBackend(model, tok)
    assert backend.eos_token_ids == {tok.eos_token_id, END_OF_TURN}
    prompt = "<start_of_turn>user\nhi<end_of_turn>\n<start_of_turn>model\n"
    end_at = {"step": None}

    def steer(module, args, kwargs, out):  # no special token is drawn, except <end_of_turn> as the 4th when asked
        out.logits[..., tok.all_special_ids] = -1e4  # (a randomly initialised model may favour <unk> or an end token)
        step = kwargs["input_ids"].shape[1] == 1 and kwargs["attention_mask"].shape[1] - len(tok(prompt)["input_ids"])
        if end_at["step"] is not None and step == end_at["step"]:
            out.logits[..., END_OF_TURN] = 1e4
        return out

    model.register_forward_hook(steer, with_kwargs=True)
    free = backend.generate([prompt], SamplingParams(max_new_tokens=6, temperature=0))[0][0]
    assert free.finish_reason == "length" and len(free.token_ids) == 6 and free.end_token_id is None
    end_at["step"] = 3
    ended = backend.generate([prompt], SamplingParams(max_new_tokens=6, temperature=0))[0][0]
    assert (ended.token_ids, ended.finish_reason, ended.end_token_id) == (free.token_ids[:3], "stop", END_OF_TURN)
    assert ended.text == backend.decode(free.token_ids[:3])

    # lit_align's server reports it as vLLM does (stop_reason: the id of a stop token other than EOS), on both
    # endpoints, and the client reads it back
    service = CompletionService(backend, "m")
    body = {"max_tokens": 6, "temperature": 0}
    answer = service.complete({**body, "prompt": prompt, "return_token_ids": True})
    chat = service.chat({**body, "messages": [{"role": "user", "content": "hi"}]})
    assert answer["choices"][0]["stop_reason"] == chat["choices"][0]["stop_reason"] == END_OF_TURN
    end_at["step"] = None
    assert service.complete({**body, "prompt": prompt})["choices"][0]["stop_reason"] is None  # the length ended it
    client = OpenAIBackend("http://127.0.0.1:1/v1", model="m", tokenizer=tok)
    (parsed,) = client.parse_completions(answer, SamplingParams(max_new_tokens=6))
    assert (parsed.text, parsed.token_ids, parsed.end_token_id) == (ended.text, ended.token_ids, END_OF_TURN)

    # the online objectives train the token that ended a rollout: the backend's, else the tokenizer's EOS
    module = GRPO(model_name_or_path=turn_model, extract_code=True)
    module.tokenizer = tok
    assert module.response_ids(ended, []) == free.token_ids[:3] + [END_OF_TURN]
    assert module.response_ids(parsed, []) == free.token_ids[:3] + [END_OF_TURN]
    unsaid = Completion(text=ended.text, token_ids=ended.token_ids, logprobs=None, finish_reason="stop")
    assert module.response_ids(unsaid, []) == free.token_ids[:3] + [tok.eos_token_id]


def test_a_reward_model_scores_chat_replies_ended_as_in_its_training(turn_model):
    tok = load_tokenizer(turn_model)
    prompts, replies = ["<start_of_turn>user\nhi<end_of_turn>\n<start_of_turn>model\n"], ["hello"]
    (chat,) = reward_batches(tok, prompts, replies, batch_size=4, end=turn_end_ids(tok))
    (text,) = reward_batches(tok, prompts, replies, batch_size=4)
    assert chat["input_ids"][0, -1].item() == END_OF_TURN and text["input_ids"][0, -1].item() == tok.eos_token_id
    assert torch.equal(chat["input_ids"][0, :-1], text["input_ids"][0, :-1])


def test_online_rewards_score_chat_replies_with_their_turn_end(tmp_path, turn_model):
    from lit_align.data_modules.prompts import PromptItem
    from lit_align.modules.reward import RewardModel

    rm = RewardModel(model_name_or_path=turn_model)
    rm.configure_model()
    rm_dir = str(rm.save_pretrained(tmp_path / "rm"))
    items = [PromptItem("t0", "<start_of_turn>user\nhi<end_of_turn>\n<start_of_turn>model\n", None)]
    last = {}
    for extract_code in (True, False):
        module = GRPO(model_name_or_path=turn_model, reward="reward_model", reward_model=rm_dir,
                      extract_code=extract_code, share_prompt=False)
        module.configure_model()
        module.setup_reward()
        hook = module.reward_model._scorer().model.register_forward_hook(
            lambda m, a, kw, out: last.__setitem__(extract_code, kw["input_ids"][0, -1].item()), with_kwargs=True)
        module.score(items, ["hello"])
        hook.remove()
    assert last == {True: END_OF_TURN, False: 2}


def _nll_sum(model, item):
    """The summed negative log-likelihood of an example's labelled tokens under ``model``."""
    ids, labels = torch.tensor([item["input_ids"]]), torch.tensor([item["labels"]])
    with torch.no_grad():
        logp = model(input_ids=ids).logits[:, :-1].float().log_softmax(-1)
    target = labels[:, 1:]
    picked = logp.gather(-1, target.clamp(min=0).unsqueeze(-1)).squeeze(-1)
    return -(picked * (target != IGNORE_INDEX)).sum().item()


def test_every_reply_of_a_conversation_in_one_sequence(tmp_path, turn_model, caplog):
    """assistant_turns: all writes a conversation once with each reply a target: the tokens before each reply are those
    of its own example, so the summed loss equals that of one example per reply, for one pass over the context."""
    tok = load_tokenizer(turn_model)
    turns = [{"role": "system", "content": "be brief"}, {"role": "user", "content": "q1"},
             {"role": "assistant", "content": "a1"}, {"role": "user", "content": "q2"},
             {"role": "assistant", "content": "the second"}, {"role": "user", "content": "q3"},
             {"role": "assistant", "content": "3"}]
    path = str(write_jsonl(tmp_path / "multi.jsonl", [{"messages": turns}]))

    def sft(max_length=1024):
        dm = SFTDataModule(train_sources=[DataSource(path=path, messages_column="messages", assistant_turns="all")],
                           val_sources=[], val_fraction=0.0, tokenizer=turn_model, group_by_length=False,
                           max_length=max_length)
        dm.setup("fit")
        return dm.train_items

    (item,) = sft()
    replies = [tok(text, add_special_tokens=False)["input_ids"] + [END_OF_TURN] for text in ("a1", "the second", "3")]
    spans, run = [], []
    for token, label in zip(item["input_ids"], item["labels"]):
        if label != IGNORE_INDEX:
            assert label == token
            run.append(token)
        elif run:
            spans, run = spans + [run], []
    assert spans + [run] == replies
    from lit_align.data_modules.chat import render_chat_prompt

    model = load_causal_lm(turn_model).eval()
    per_reply = []
    for k, i in enumerate((2, 4, 6)):  # each reply as its own example: the same tokens before it
        context = tuple((m["role"], m["content"]) for m in turns[:i])
        prompt = tok(render_chat_prompt(tok, context))["input_ids"]
        assert item["input_ids"][:len(prompt) + len(replies[k])] == prompt + replies[k]
        per_reply.append({"input_ids": prompt + replies[k], "labels": [IGNORE_INDEX] * len(prompt) + replies[k]})
    assert _nll_sum(model, item) == pytest.approx(sum(_nll_sum(model, e) for e in per_reply), rel=1e-5)
    # a max_length between the second reply's end and the third's keeps the first two replies, as one example per
    # reply would (the third's example would be dropped)
    second_end = len(per_reply[1]["input_ids"])
    (short,) = sft(max_length=second_end + 1)
    assert short["input_ids"] == item["input_ids"][:second_end]
    assert f"1 replies past max_length={second_end + 1} tokens left out of 1 conversations" in caplog.text


def test_a_template_that_rewrites_earlier_turns_gets_one_example_per_reply(tmp_path, turn_model):
    """A template that shows earlier replies otherwise than it asked for them (here: only their first word, as
    reasoning models drop their thinking) cannot hold the replies in one sequence: each is its own example."""
    from data_helpers import TURN_TEMPLATE

    tok = load_tokenizer(turn_model)
    tok.chat_template = TURN_TEMPLATE.replace("{{ m['content'] }}", "{{ m['content'] if loop.last or m['role'] != "
                                              "'assistant' else m['content'].split()[0] }}")
    tok_dir = tmp_path / "rewriting"
    tok.save_pretrained(tok_dir)
    turns = [{"role": "user", "content": "q1"}, {"role": "assistant", "content": "a1 because"},
             {"role": "user", "content": "q2"}, {"role": "assistant", "content": "a2"}]
    path = str(write_jsonl(tmp_path / "multi.jsonl", [{"messages": turns}]))
    dm = SFTDataModule(train_sources=[DataSource(path=path, messages_column="messages", assistant_turns="all")],
                       val_sources=[], val_fraction=0.0, tokenizer=str(tok_dir), group_by_length=False)
    dm.setup("fit")
    second = tok("<s><start_of_turn>user\nq1<end_of_turn>\n<start_of_turn>model\na1<end_of_turn>\n"
                 "<start_of_turn>user\nq2<end_of_turn>\n<start_of_turn>model\n")["input_ids"]
    assert sorted(len(item["input_ids"]) for item in dm.train_items) == sorted(
        [len(tok("<s><start_of_turn>user\nq1<end_of_turn>\n<start_of_turn>model\n")["input_ids"]) + 11,
         len(second) + 3])
    assert any(item["input_ids"][:len(second)] == second for item in dm.train_items)
