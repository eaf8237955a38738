"""data.format=messages: conversations checked row by row, rendered with the chat template, loss on the last reply."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import mlflow
import pytest

from src import chat, fit, modeling
from src.config import ConfigError, validate
from src.data import DataError, load_data
from src.runs import predict
from src.tiny import resolve_builtin
from tests.conftest import compose_config, train_run

SYSTEM = {"role": "system", "content": "Be brief."}
MULTI_TURN = [
    SYSTEM,
    {"role": "user", "content": "Name the topic of this sentence.\nthe chef baked a dessert"},
    {"role": "assistant", "content": "food"},
    {"role": "user", "content": "Give the plural of the word.\nguitar"},
    {"role": "assistant", "content": "guitars"},
]


@pytest.fixture(scope="module")
def tokenizer():
    return modeling.load_tokenizer(validate(compose_config(["data=chat"])).model)


def _write(path: Path, rows: list) -> Path:
    path.write_text("".join(json.dumps({"id": i, "messages": m}) + "\n" for i, m in enumerate(rows)))
    return path


def _chat_data(tmp_path: Path, rows: list, **extra: str):
    path = _write(tmp_path / "chat.jsonl", rows)
    overrides = [
        "data=chat",
        f"data.path={path}",
        f"data.eval_path={path}",
        *(f"data.{k}={v}" for k, v in extra.items()),
    ]
    return validate(compose_config(overrides))


def test_the_tiny_tokenizer_has_a_chat_template(tokenizer):
    text = tokenizer.apply_chat_template(MULTI_TURN[:2], tokenize=False, add_generation_prompt=True)
    assert text == (
        "<|system|>\nBe brief.\n<|user|>\nName the topic of this sentence.\nthe chef baked a dessert\n<|assistant|>\n"
    )
    reply = tokenizer.apply_chat_template(MULTI_TURN[:3], tokenize=False)
    assert reply == text + "food</s>\n"


@pytest.mark.parametrize("turns", [MULTI_TURN, MULTI_TURN[1:3], [*MULTI_TURN, {"role": "user", "content": "and?"}]])
def test_prompt_and_completion_are_the_chat_template_byte_for_byte(tokenizer, turns):
    prompt, completion = chat.prompt_completion(tokenizer, turns)
    last = max(i for i, t in enumerate(turns) if t["role"] == "assistant")
    assert prompt == tokenizer.apply_chat_template(turns[:last], tokenize=False, add_generation_prompt=True)
    full = tokenizer.apply_chat_template(turns[: last + 1], tokenize=False)
    assert prompt + completion == full.rstrip("\n")  # the template's newline after EOS is no part of the reply
    assert completion == turns[last]["content"] + tokenizer.eos_token


def test_a_template_that_writes_the_bos_does_not_get_a_second_one(tokenizer):
    tokenizer = tokenizer.__class__.from_pretrained(resolve_builtin("builtin:tiny-llama"))
    tokenizer.chat_template = "{{ bos_token }}" + tokenizer.chat_template
    prompt, completion = chat.prompt_completion(tokenizer, MULTI_TURN[1:3])
    assert not prompt.startswith(tokenizer.bos_token)
    assert tokenizer(prompt + completion)["input_ids"].count(tokenizer.bos_token_id) == 1


def test_load_data_renders_each_conversation(tmp_path, tokenizer, caplog):
    cfg = _chat_data(tmp_path, [MULTI_TURN, MULTI_TURN[1:3]])
    with caplog.at_level("WARNING", logger="src"):
        data = load_data(cfg.data, tokenizer, cfg.model.max_length)
    (note,) = [r.getMessage() for r in caplog.records if "assistant turn" in r.getMessage()]
    assert note.startswith("note: 1 of 2 conversations have more than one assistant turn")
    assert data.task == "sft" and data.labels is None
    assert data.train["prompt"][1] == tokenizer.apply_chat_template(
        MULTI_TURN[1:2], tokenize=False, add_generation_prompt=True
    )
    assert data.train["completion"] == ["guitars</s>", "food</s>"]


BAD_ROWS = [
    ("not a list", "text, not a list of turns (a CSV cell cannot hold them"),
    (None, "not a list of turns (empty)"),
    ({"role": "user", "content": "hi"}, "not a list of turns (a dict)"),
    ([["user", "hi"]], "a turn that is not a {role, content} object"),
    ([{"role": "user"}, {"role": "assistant", "content": "x"}], "a turn without a 'role' and 'content' string"),
    ([{"role": "user", "content": 3}, {"role": "assistant", "content": "x"}], "without a 'role' and 'content'"),
    ([{"role": "bot", "content": "hi"}, {"role": "assistant", "content": "x"}], "unknown role(s) 'bot'"),
    ([SYSTEM, {"role": "user", "content": "hi"}], "no assistant turn to train on"),
    ([], "no assistant turn to train on"),
    ([{"role": "user", "content": "hi"}, {"role": "assistant", "content": "  "}], "an empty last assistant turn"),
]


def test_every_faulty_conversation_is_named_by_row_before_the_model_loads(tmp_path, tokenizer):
    rows = [MULTI_TURN] + [cell for cell, _ in BAD_ROWS] + [MULTI_TURN[1:3]]
    cfg = _chat_data(tmp_path, rows)
    with pytest.raises(DataError) as err:
        load_data(cfg.data, tokenizer, cfg.model.max_length)
    train = [f for f in err.value.faults if f.startswith("train: column 'messages': ")]
    assert len(train) == len(err.value.faults) // 2  # the eval split is the same file, reported the same
    named = {f.split(" at id ")[0]: f.split(" at id ")[1].split(", ") for f in train}
    for i, (_, fault) in enumerate(BAD_ROWS, start=1):
        rows_at_fault = next(ids for what, ids in named.items() if fault in what)
        assert str(i) in rows_at_fault, (fault, named)
    assert {i for ids in named.values() for i in ids} == {str(i) for i in range(1, len(BAD_ROWS) + 1)}


def test_a_missing_messages_column_is_named(tmp_path, tokenizer):
    cfg = _chat_data(tmp_path, [MULTI_TURN], messages_column="turns")
    with pytest.raises(DataError, match="column 'turns' \\(from data.messages_column\\) not found"):
        load_data(cfg.data, tokenizer, cfg.model.max_length)


def test_a_tokenizer_without_a_chat_template_is_refused_before_the_data_is_read(tmp_path, tokenizer):
    plain = tokenizer.__class__.from_pretrained(resolve_builtin("builtin:tiny-llama"))
    plain.chat_template = None
    cfg = _chat_data(tmp_path, [MULTI_TURN])
    with pytest.raises(DataError, match="has no chat template"):
        load_data(cfg.data, plain, cfg.model.max_length)
    with pytest.raises(DataError, match="no tokenizer was given"):
        load_data(cfg.data)


def test_a_template_that_refuses_a_conversation_names_the_rows(tmp_path, tokenizer):
    strict = tokenizer.__class__.from_pretrained(resolve_builtin("builtin:tiny-llama"))
    strict.chat_template = (
        "{% if messages[0]['role'] == 'system' %}{{ raise_exception('no system turns') }}{% endif %}"
        + strict.chat_template
    )
    cfg = _chat_data(tmp_path, [MULTI_TURN[1:3], MULTI_TURN, MULTI_TURN])
    with pytest.raises(DataError) as err:
        load_data(cfg.data, strict, cfg.model.max_length)
    assert any("cannot render the conversation (no system turns) at id 1, 2" in f for f in err.value.faults)


def test_predict_prompts_a_finished_conversation_as_training_did_and_an_open_one_for_the_next_turn(tokenizer):
    import pandas as pd

    d = validate(compose_config(["data=chat"])).data
    open_turns = [*MULTI_TURN, {"role": "user", "content": "and?"}]
    df = pd.DataFrame({"messages": [MULTI_TURN, open_turns]})
    contexts, references, prompts = predict.chat_prompts(df, d, tokenizer, None)
    assert prompts[0] == chat.prompt_completion(tokenizer, MULTI_TURN)[0]  # training's prompt, byte for byte
    assert (contexts[0], references[0]) == (MULTI_TURN[:-1], "guitars")
    assert (contexts[1], references[1]) == (open_turns, None)
    assert prompts[1] == tokenizer.apply_chat_template(open_turns, tokenize=False, add_generation_prompt=True)
    contexts, _, _ = predict.chat_prompts(pd.DataFrame({"q": ["hi"]}), d, tokenizer, "q")
    assert contexts == [[{"role": "user", "content": "hi"}]]


def test_messages_is_a_format_of_sft_only():
    with pytest.raises(ConfigError, match="data.format=messages: only for task 'sft'"):
        validate(compose_config(["data=topics", "data.format=messages"]))
    with pytest.raises(ConfigError, match="data.format: expected one of 'columns' | 'messages'"):
        validate(compose_config(["data=chat", "data.format=chat"]))


def _expected_label_mask(tokenizer, prompt: str, completion: str) -> list[bool]:
    """True on the tokens whose characters lie in the completion (the last reply and its EOS)."""
    enc = tokenizer(prompt + completion, return_offsets_mapping=True)
    return [start >= len(prompt) and end > start for start, end in enc["offset_mapping"]]


@pytest.mark.parametrize("fast_path", [True, False])
def test_the_loss_covers_exactly_the_last_assistant_reply(tmp_path, mlflow_store, tokenizer, fast_path):
    """A row through the SFT path's own tokenization and collator (the fast path's, or TRL's SFTTrainer)."""
    path = _write(tmp_path / "chat.jsonl", [MULTI_TURN, MULTI_TURN[1:3]])
    raw = compose_config(["data=chat", f"data.path={path}", f"data.eval_path={path}", f"train.fast_path={fast_path}"])
    raw["output_dir"] = str(tmp_path / "out")
    cfg = validate(raw)
    data = load_data(cfg.data, tokenizer, cfg.model.max_length)
    model = modeling.load_model(cfg.model, cfg.quant, "sft", None, tokenizer.pad_token_id)
    model = modeling.apply_lora(model, cfg.lora, "sft")
    trainer, _, _ = fit.build_trainer(cfg, model, tokenizer, data, raw["output_dir"])
    for i, row in enumerate(trainer.train_dataset):
        batch = trainer.data_collator([row])
        ids, labels = batch["input_ids"][0].tolist(), batch["labels"][0].tolist()
        prompt, completion = data.train["prompt"][i], data.train["completion"][i]
        assert ids == tokenizer(prompt + completion)["input_ids"]
        expected = _expected_label_mask(tokenizer, prompt, completion)
        assert [label != -100 for label in labels] == expected
        trained = tokenizer.decode([t for t, label in zip(ids, labels) if label != -100])
        assert trained == MULTI_TURN[-1 if i == 0 else 2]["content"] + tokenizer.eos_token
        assert [label for label in labels if label != -100] == [t for t, e in zip(ids, expected) if e]


def test_a_model_without_a_chat_template_fails_the_run_before_it_loads(tmp_path, mlflow_store, monkeypatch):
    plain = tmp_path / "plain-model"
    shutil.copytree(resolve_builtin("builtin:tiny-llama"), plain)
    (plain / "chat_template.jinja").unlink()
    monkeypatch.setattr(modeling, "load_model", lambda *a, **k: pytest.fail("the model loaded"))
    raw = compose_config(["data=chat", f"model.name_or_path={plain}"])
    raw["output_dir"] = str(tmp_path / "out")
    with pytest.raises(DataError, match=f"the tokenizer of {plain} has no chat template"):
        train_run(raw)
    (run_,) = mlflow.search_runs(search_all_experiments=True, output_format="list")
    assert run_.info.status == "FAILED"


def test_a_config_stored_before_data_format_reads_as_columns():
    raw = compose_config(["data=instructions"])
    del raw["data"]["format"], raw["data"]["messages_column"]
    data = validate(raw).data
    assert (data.format, data.messages_column) == ("columns", "messages")
