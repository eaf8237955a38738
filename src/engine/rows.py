"""SFT rows as the fast path trains on them: tokenized as TRL's SFTTrainer prepares them (checked against TRL's)."""

from __future__ import annotations

from trl.data_utils import common_prefix_length

from src.data import DataError


def tokenize_sft(dataset, tokenizer, max_length: int, completion_only_loss: bool):
    """``input_ids`` and ``labels`` for prompt/completion rows, as TRL 1.16's SFTTrainer prepares them.

    EOS is appended to the completion; with ``completion_only_loss`` the prompt's labels are -100
    (the prompt ends where the tokenized prompt stops being a prefix of prompt + completion);
    rows are cut to ``max_length`` tokens, and rows left without a label are dropped. Rows that
    already hold ``input_ids`` get ``labels = input_ids`` where they have none.
    """
    eos = tokenizer.eos_token

    def encode(example):
        if "input_ids" in example:
            ids, labels = example["input_ids"], example.get("labels") or example["input_ids"]
        else:
            completion = example["completion"]
            completion = completion if completion.endswith(eos) else completion + eos
            ids = tokenizer(text=example["prompt"] + completion)["input_ids"]
            prompt_len = common_prefix_length(tokenizer(text=example["prompt"])["input_ids"], ids)
            labels = [-100] * prompt_len + ids[prompt_len:] if completion_only_loss else list(ids)
        return {"input_ids": ids[:max_length], "labels": labels[:max_length]}

    tokenized = dataset.map(encode, remove_columns=dataset.column_names)
    kept = tokenized.filter(lambda example: any(label != -100 for label in example["labels"]))
    if len(dataset) and not len(kept):  # else torch's sampler fails later with "num_samples=0"
        raise DataError(
            [
                f"no row keeps a response token within model.max_length={max_length}: every prompt fills it "
                f"({len(dataset)} row(s)); raise model.max_length, or shorten the prompts"
            ]
        )
    return kept
