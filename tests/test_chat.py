"""ChatML rendering (megatron_ext/inference/chat.py) against transformers, the chat tokens of the
bundled SentencePiece tokenizer (tools/add_chat_tokens.py) and the FILE:LINE errors of chat data.

`toy_qwen_tokenizer` (also used by tests/test_sft_data.py) is a Qwen3-style tokenizer built
offline: byte-level BPE with Qwen2's pre-tokenizer regex, trained on a few lines, with
<|endoftext|>, <|im_start|>, <|im_end|> as special tokens and CHAT_TEMPLATE."""
from __future__ import annotations

import gzip
import hashlib
import json
import sys
from pathlib import Path

import pytest

from megatron_ext.errors import DataConfigError
from megatron_ext.inference.chat import (
    CHAT_TEMPLATE,
    IM_END,
    IM_START,
    ChatTokenizer,
    read_chat_jsonl,
    render_conversation,
    render_prompt,
    validate_messages,
)

REPO = Path(__file__).resolve().parents[1]
SPM_MODEL = REPO / "data" / "tokenizer" / "marco_tiny_spm.model"
QWEN_PRETOKENIZE = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*"
                    r"|\s*[\r\n]+|\s+(?!\S)|\s+")
TRAIN_LINES = ["user\nWhat does ls do?\n\nassistant\n\nIt lists directory contents.",
               "system\nYou are helpful.\n\n", "Что делает команда ls?", "ls 列出目录内容。",
               "Show the synopsis of cp.\n\ncp [OPTION]... SOURCE DEST", "Was macht der Befehl tar?"]

CONVERSATIONS = [
    [{"role": "user", "content": "What does ls do?"},
     {"role": "assistant", "content": "It lists directory contents."}],
    [{"role": "system", "content": "You are helpful."},
     {"role": "user", "content": "What does ls do?"},
     {"role": "assistant", "content": "\n\nIt lists directory contents."},  # "\n\n" merges with the header's
     {"role": "user", "content": "Что делает команда ls?"},
     {"role": "assistant", "content": "ls 列出目录内容。"},
     {"role": "user", "content": "Show the synopsis of cp."}],
    [{"role": "system", "content": ""}, {"role": "user", "content": " leading space"},
     {"role": "assistant", "content": ""}, {"role": "user", "content": "Was macht der Befehl tar?"},
     {"role": "assistant", "content": "cp [OPTION]... SOURCE DEST\n"}],
]


def toy_qwen_tokenizer():
    """A transformers PreTrainedTokenizerFast shaped like Qwen3's (see the module docstring)."""
    from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.Sequence([
        pre_tokenizers.Split(Regex(QWEN_PRETOKENIZE), behavior="isolated"),
        pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)])
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=400, show_progress=False,
                                  special_tokens=["<|endoftext|>", IM_START, IM_END],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator(TRAIN_LINES * 20, trainer)
    return PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="<|endoftext|>",
                                   pad_token="<|endoftext|>", chat_template=CHAT_TEMPLATE)


def hf_ids(result) -> list[int]:
    return list(result["input_ids"] if hasattr(result, "keys") else result)


def expected_mask(messages, hf) -> tuple[list[int], list[int]]:
    """Ids and assistant-target mask from character spans, independently of chat.py: the
    rendered text's token offsets (transformers) against the spans of each assistant content
    and of its <|im_end|>."""
    text, content_spans, end_spans = "", [], []
    for m in messages:
        text += f"{IM_START}{m['role']}\n"
        if m["role"] == "assistant":
            content_spans.append((len(text), len(text) + len(m["content"])))
            end_spans.append((len(text) + len(m["content"]), len(text) + len(m["content"]) + len(IM_END)))
        text += f"{m['content']}{IM_END}\n"
    assert text == hf.apply_chat_template(messages, tokenize=False)
    enc = hf(text, add_special_tokens=False, return_offsets_mapping=True)
    mask = [int(any(s < ce and e > cs for cs, ce in content_spans) or (s, e) in end_spans)
            for s, e in enc["offset_mapping"]]
    return list(enc["input_ids"]), mask


@pytest.fixture(scope="module")
def hf():
    return toy_qwen_tokenizer()


@pytest.fixture(scope="module")
def chat_hf(hf):
    return ChatTokenizer.from_library(hf, "toy-qwen")


@pytest.fixture(scope="module")
def spm_tokenizer():
    from megatron_ext.data.tokenizer import build_tokenizer

    return build_tokenizer("SentencePieceTokenizer", str(SPM_MODEL))


def test_ids_and_mask_equal_transformers_chat_template(hf, chat_hf):
    assert (chat_hf.im_start_id, chat_hf.im_end_id) == tuple(hf.convert_tokens_to_ids([IM_START, IM_END]))
    assert chat_hf.stop_ids == (chat_hf.im_end_id, hf.eos_token_id)
    straddles = 0
    for messages in CONVERSATIONS:
        ids, mask = render_conversation(messages, chat_hf)
        assert ids == hf_ids(hf.apply_chat_template(messages, tokenize=True))
        ref_ids, ref_mask = expected_mask(messages, hf)
        assert ids == ref_ids and mask == ref_mask
        # targets: exactly the assistant contents and their <|im_end|>, in order
        want = "".join(m["content"] + IM_END for m in messages if m["role"] == "assistant")
        got = chat_hf.decode([i for i, t in zip(ids, mask) if t])
        straddles += got != want
        assert got.endswith(IM_END) and want in got and len(got) - len(want) <= 2
    assert straddles == 1  # the "\n\n" token that carries the header's "\n" counts as content


def test_prompt_equals_generation_prompt(hf, chat_hf):
    for messages in CONVERSATIONS:
        last_user = max(i for i, m in enumerate(messages) if m["role"] == "user")
        ref = hf.apply_chat_template(messages[:last_user + 1], tokenize=True, add_generation_prompt=True)
        assert render_prompt(messages, chat_hf) == hf_ids(ref)
    with pytest.raises(DataConfigError, match="no user turn"):
        render_prompt([{"role": "system", "content": "x"}], chat_hf)


def test_trailing_turns_leave_targets_unchanged(chat_hf):
    base = CONVERSATIONS[0]
    ids, mask = render_conversation(base, chat_hf)
    more = base + [{"role": "user", "content": "Und tar?"}, {"role": "system", "content": "x"}]
    ids2, mask2 = render_conversation(more, chat_hf)
    assert ids2[:len(ids)] == ids and mask2[:len(mask)] == mask and not any(mask2[len(mask):])


def test_special_strings_in_text_are_not_parsed(chat_hf, spm_tokenizer):
    chat_spm = ChatTokenizer.from_megatron(spm_tokenizer)
    for tok in (chat_hf, chat_spm):
        text = f"a{IM_END}b<|endoftext|>{IM_START}"
        ids = tok.encode(text)
        assert tok.im_end_id not in ids and tok.im_start_id not in ids and tok.eos_id not in ids
        assert tok.decode(ids) == text
        assert tok.decode([tok.im_start_id, tok.eos_id]).startswith(IM_START)


def test_bundled_sentencepiece_has_chat_tokens(spm_tokenizer, tmp_path):
    """Megatron's SentencePiece wrapper, ChatTokenizer and the HF export agree on the ChatML ids."""
    from transformers import AutoTokenizer

    from megatron_ext.convert.tokenizer_export import sentencepiece_to_hf

    text = f"{IM_START}user\nhi{IM_END}\n"
    ids = spm_tokenizer.tokenize(text)
    chat = ChatTokenizer.from_megatron(spm_tokenizer)
    assert ids[0] == chat.im_start_id and chat.im_end_id in ids
    assert spm_tokenizer.detokenize(ids) == text
    assert (chat.eos_id, chat.pad_id, chat.stop_ids, chat.vocab_size) == (2, 3, (chat.im_end_id, 2), 8192)
    sentencepiece_to_hf(str(SPM_MODEL), str(tmp_path))
    config = json.loads((tmp_path / "tokenizer_config.json").read_text())
    assert config["chat_template"] == CHAT_TEMPLATE
    hf = AutoTokenizer.from_pretrained(str(tmp_path))
    assert {IM_START, IM_END} <= set(hf.all_special_tokens) | {
        t.content for t in hf.added_tokens_decoder.values() if t.special}
    for messages in CONVERSATIONS:
        ref = hf.apply_chat_template(messages, tokenize=True)
        assert render_conversation(messages, chat)[0] == hf_ids(ref)
        assert render_prompt(messages, chat) == hf_ids(hf.apply_chat_template(
            messages[:max(i for i, m in enumerate(messages) if m["role"] == "user") + 1],
            tokenize=True, add_generation_prompt=True))


def test_chat_token_edit_keeps_every_corpus_id(tmp_path, capsys):
    """tools/add_chat_tokens.py: the shipped model minus the recorded edit is the trained model
    (sha256), the whole corpus (train and valid) encodes to the same ids with both, and a rerun
    changes nothing."""
    import sentencepiece as spm

    sys.path.insert(0, str(REPO / "tools"))
    import add_chat_tokens as act

    meta = json.loads((SPM_MODEL.parent / "tokenizer_metadata.json").read_text())
    record = meta["chat_tokens"]
    assert meta["chat_template"] == CHAT_TEMPLATE
    new = SPM_MODEL.read_bytes()
    old = act.original_model(new, record)
    assert hashlib.sha256(old).hexdigest() == record["sha256_before"]
    assert hashlib.sha256(new).hexdigest() == record["sha256_after"]
    texts = act.read_texts(act.corpus_files())
    assert len(act.corpus_files()) == 38 and len(texts) == record["corpus_documents"]
    before = spm.SentencePieceProcessor(model_proto=old).encode(texts)
    after = spm.SentencePieceProcessor(model_proto=new).encode(texts)
    assert before == after and sum(map(len, after)) == record["corpus_tokens"]
    sp_old = spm.SentencePieceProcessor(model_proto=old)
    assert len(sp_old.encode(IM_START)) > 1  # the tokens are new
    with pytest.raises(DataConfigError, match="is not a single token"):
        ChatTokenizer.from_library(sp_old, "old.model")
    copy = tmp_path / "m.model"
    copy.write_bytes(new)
    assert act.main(["--model", str(copy)]) == 0
    assert copy.read_bytes() == new and "unchanged" in capsys.readouterr().out


BAD_LINES = [
    ('{"messages": [{"role": "user", "content": "hi"}, {"role": "assistant"', "invalid JSON"),
    ('{"messages": [{"content": "hi"}, {"role": "assistant", "content": "ho"}]}', "message 0 has no 'role'"),
    ('{"messages": [{"role": "user", "content": "hi"}]}', "no assistant turn"),
    ('{"messages": [{"role": "tool", "content": "x"}, {"role": "assistant", "content": "y"}]}',
     "role 'tool'; expected one of system, user, assistant"),
    ('{"messages": [{"role": "assistant", "content": 3}]}', "content is not a string"),
    ('{"messages": [{"role": "assistant"}]}', "has no 'content'"),
    ('{"text": "hi"}', "expected a JSON object with a 'messages' list"),
    ('{"messages": [{"role": "assistant", "content": "a<|im_end|>"}]}', "contains '<|im_end|>'"),
]


@pytest.mark.parametrize("line,reason", BAD_LINES)
def test_bad_chat_lines_name_file_and_line(tmp_path, line, reason):
    path = tmp_path / "chat.jsonl.gz"
    good = json.dumps({"messages": [{"role": "user", "content": "q"}, {"role": "assistant", "content": "a"}]})
    with gzip.open(path, "wt", encoding="utf-8") as f:
        f.write(f"{good}\n\n{line}\n")
    with pytest.raises(DataConfigError) as e:
        list(read_chat_jsonl(str(path)))
    msg = str(e.value)
    assert msg.startswith(f"{path}:3: ") and reason in msg and "\n" not in msg


def test_valid_chat_lines_read_with_line_numbers(tmp_path):
    path = tmp_path / "chat.jsonl"
    lines = [json.dumps({"messages": m}) for m in CONVERSATIONS]
    path.write_text(f"{lines[0]}\n\n{lines[1]}\n{lines[2]}\n")
    assert [n for n, _ in read_chat_jsonl(str(path))] == [1, 3, 4]
    validate_messages([{"role": "user", "content": "q"}], "x", require_assistant=False)
