"""ChatML (Qwen3 style) in token space: the ids and the assistant-only loss mask of a conversation.

A conversation is `[{"role": "system"|"user"|"assistant", "content": str}, ...]` (the HF /
OpenAI form). `CHAT_TEMPLATE` renders each message as

    <|im_start|>{role}\\n{content}<|im_end|>\\n

and the generation prompt as `<|im_start|>assistant\\n`. It is what an exported tokenizer's
`tokenizer_config.json` carries, so `apply_chat_template` in plain `transformers` renders what
we trained on.

Token space. Hugging Face tokenizes the rendered text with the special tokens parsed: the text
between two special tokens is tokenized on its own (added tokens split the text first; a
SentencePiece user-defined piece is never merged with its neighbours). So the ids of a
conversation are, per message, `[<|im_start|>] + encode(role + "\\n" + content) +
[<|im_end|>] + encode("\\n")`, exactly `apply_chat_template(tokenize=True)`'s ids
(tests/test_chat.py checks it against transformers). The loss mask is read off these spans: in
an assistant segment every token that carries a character of the content is a target (a token
that straddles the role header and the content, e.g. a merged "\\n\\n", counts as content),
and so is the turn's `<|im_end|>`; the role header, the "\\n" after `<|im_end|>`, and system
and user turns are not. No `{% generation %}` markers are needed (Qwen3's template has none).

Special strings inside message text are not parsed: `ChatTokenizer.encode` tokenizes
"<|endoftext|>" in a message as plain text, so data cannot inject control tokens.
`validate_messages` rejects messages that contain the ChatML markers themselves (usually a
conversation rendered twice).
"""

from __future__ import annotations

import gzip
import json
import re
from typing import Iterator

from megatron_ext.data.tokenizer import build_tokenizer
from megatron_ext.errors import DataConfigError

IM_START, IM_END = "<|im_start|>", "<|im_end|>"
ROLES = ("system", "user", "assistant")
GENERATION_PROMPT = f"{IM_START}assistant\n"

CHAT_TEMPLATE = (
    "{%- for message in messages %}"
    "{{- '<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>' + '\\n' }}"
    "{%- endfor %}"
    "{%- if add_generation_prompt %}{{- '<|im_start|>assistant\\n' }}{%- endif %}"
)

_SPM_SPECIAL_RE = re.compile(r"^<\|[^|]+\|>$")  # user-defined pieces that act as special tokens


class _SentencePiece:
    """A sentencepiece.SentencePieceProcessor; user-defined "<|...|>" pieces are specials."""

    def __init__(self, sp):
        self.sp = sp
        n = sp.get_piece_size()
        self.vocab_size = n
        pieces = [sp.id_to_piece(i) for i in range(n)]
        self.map = {p: i for i, p in reversed(list(enumerate(pieces)))}
        self.control = {i for i in range(n) if sp.is_control(i) or sp.is_unknown(i)}
        self.specials = tuple(p for i, p in enumerate(pieces)
                              if _SPM_SPECIAL_RE.match(p) and sp.encode(p) == [i])
        self.eos_id = sp.eos_id()
        self.pad_id = sp.pad_id() if sp.pad_id() >= 0 else self.eos_id

    def single_id(self, piece: str) -> int | None:
        i = self.map.get(piece)
        return i if i is not None and self.sp.encode(piece) == [i] else None

    def encode(self, text: str) -> list[int]:
        out = []
        while True:  # a special string in the text: its first character is encoded apart
            hits = [i for i in (text.find(s) for s in self.specials) if i >= 0]
            if not hits:
                return out + self.sp.encode(text)
            cut = min(hits) + 1
            out += self.sp.encode(text[:cut])
            text = text[cut:]

    def decode(self, ids) -> str:
        out, run = [], []
        for i in ids:
            if i in self.control:
                out.append(self.sp.decode(run))
                out.append(self.sp.id_to_piece(i))
                run = []
            else:
                run.append(i)
        out.append(self.sp.decode(run))
        return "".join(out)


class _HuggingFace:
    """A transformers (fast) tokenizer."""

    def __init__(self, hf):
        self.hf = hf
        self.vocab_size = len(hf)
        self.map = dict(hf.get_vocab())
        self.eos_id = hf.eos_token_id
        self.pad_id = hf.pad_token_id if hf.pad_token_id is not None else hf.eos_token_id

    def single_id(self, piece: str) -> int | None:
        i = self.map.get(piece)
        return i if i is not None and self.hf.encode(piece, add_special_tokens=False) == [i] else None

    def encode(self, text: str) -> list[int]:
        return list(self.hf.encode(text, add_special_tokens=False, split_special_tokens=True))

    def decode(self, ids) -> str:
        return self.hf.decode(list(ids), skip_special_tokens=False, clean_up_tokenization_spaces=False)


class ChatTokenizer:
    """ChatML view of the trainer's tokenizer (megatron_ext.data.build_tokenizer's Megatron
    tokenizer: SentencePiece or HF). Raises DataConfigError (one line naming the tokenizer)
    if <|im_start|>/<|im_end|> are not single tokens."""

    def __init__(self, backend, name: str):
        self._b = backend
        self._digest = None
        self.name = name
        self.vocab_size = backend.vocab_size
        ids = {}
        for piece in (IM_START, IM_END):
            ids[piece] = backend.single_id(piece)
            if ids[piece] is None:
                raise DataConfigError(
                    f"--tokenizer-model {name}: '{piece}' is not a single token; chat data needs "
                    f"{IM_START} and {IM_END} as special tokens (SentencePiece: "
                    "tools/add_chat_tokens.py adds them)")
        self.im_start_id, self.im_end_id = ids[IM_START], ids[IM_END]
        if backend.eos_id is None:
            raise DataConfigError(f"--tokenizer-model {name}: no EOS token")
        self.eos_id = int(backend.eos_id)
        self.pad_id = int(backend.pad_id)
        self.stop_ids = tuple(dict.fromkeys((self.im_end_id, self.eos_id)))
        self._newline = tuple(self.encode("\n"))
        self._headers = {role: tuple(self.encode(f"{role}\n")) for role in ROLES}
        self.generation_prompt = (self.im_start_id, *self._headers["assistant"])

    # ---------------------------------------------------------------- constructors
    @classmethod
    def from_megatron(cls, tokenizer) -> "ChatTokenizer":
        """From a megatron.core.tokenizers text tokenizer (build_tokenizer's result)."""
        library = getattr(tokenizer, "_tokenizer", None)
        inner = getattr(library, "tokenizer", None)
        name = str(getattr(tokenizer, "path", "tokenizer"))
        if inner is None:
            raise DataConfigError(f"--tokenizer-model {name}: not a SentencePiece or Hugging Face tokenizer")
        return cls.from_library(inner, name)

    @classmethod
    def from_library(cls, inner, name: str) -> "ChatTokenizer":
        """From a sentencepiece.SentencePieceProcessor or a transformers tokenizer."""
        import sentencepiece

        if isinstance(inner, sentencepiece.SentencePieceProcessor):
            return cls(_SentencePiece(inner), name)
        if hasattr(inner, "get_vocab") and hasattr(inner, "encode"):
            return cls(_HuggingFace(inner), name)
        raise DataConfigError(f"--tokenizer-model {name}: not a SentencePiece or Hugging Face tokenizer")

    @classmethod
    def from_args(cls, tokenizer_type: str, tokenizer_model: str | None) -> "ChatTokenizer":
        """The trainer's tokenizer (--tokenizer-type / --tokenizer-model) as a ChatTokenizer."""

        return cls.from_megatron(build_tokenizer(tokenizer_type, tokenizer_model))

    # ---------------------------------------------------------------- text
    def encode(self, text: str) -> list[int]:
        """Plain text to ids; special strings in the text are NOT parsed."""
        return self._b.encode(text)

    def decode(self, ids) -> str:
        """Ids to text; special tokens rendered as their strings."""
        return self._b.decode([int(i) for i in ids])

    def token_map(self) -> dict[str, int]:
        """piece -> id, special tokens included (to compare teacher and student vocabularies)."""
        return dict(self._b.map)

    def vocab_digest(self) -> str:
        """sha256 of the piece -> id map: the vocabulary, whatever file it was loaded from."""
        if self._digest is None:
            import hashlib

            items = json.dumps(sorted(self.token_map().items()), ensure_ascii=False).encode()
            self._digest = hashlib.sha256(items).hexdigest()
        return self._digest

    def header_ids(self, role: str) -> tuple[int, ...]:
        """Ids of "{role}\\n" on its own (the role header after <|im_start|>)."""
        return self._headers[role] if role in self._headers else tuple(self.encode(f"{role}\n"))

    def content_start(self, segment: list[int], role: str) -> int:
        """Index of the first token of `segment` = encode(role + "\\n" + content) that carries a
        character of the content (the header's own tokens come first)."""
        header = self.header_ids(role)
        if tuple(segment[:len(header)]) == header:
            return len(header)
        text = f"{role}\n"
        k = 0
        while k < len(segment) and k < len(header) and segment[k] == header[k]:
            k += 1
        while k > 0 and not text.startswith(self.decode(segment[:k])):
            k -= 1
        return k


def render_conversation(messages: list[dict], tok: ChatTokenizer) -> tuple[list[int], list[int]]:
    """Token ids of the whole ChatML conversation and its 0/1 loss mask over those ids: 1 on each
    assistant turn's content tokens and its <|im_end|>, 0 elsewhere (system/user turns, role
    headers, the '\\n' after <|im_end|>). Tokenised the way HF apply_chat_template(tokenize=True)
    tokenises the rendered text (same ids for an HF Qwen3 tokenizer); masks come from scanning
    token spans, never from {% generation %} markers."""
    ids: list[int] = []
    loss_mask: list[int] = []
    for m in messages:
        role = m["role"]
        segment = tok.encode(f"{role}\n{m['content']}")
        target = int(role == "assistant")
        start = tok.content_start(segment, role) if target else len(segment)
        ids += [tok.im_start_id, *segment, tok.im_end_id, *tok._newline]
        loss_mask += [0] * (1 + start) + [target] * (len(segment) - start + 1) + [0] * len(tok._newline)
    return ids, loss_mask


def render_prompt(messages: list[dict], tok: ChatTokenizer) -> list[int]:
    """The conversation up to and including its last user turn, then the generation prompt
    '<|im_start|>assistant\\n' (later assistant turns dropped). Equals HF
    apply_chat_template(messages[:last_user+1], add_generation_prompt=True)."""
    users = [i for i, m in enumerate(messages) if m.get("role") == "user"]
    if not users:
        raise DataConfigError("render_prompt: the conversation has no user turn to answer")
    ids, _ = render_conversation(messages[:users[-1] + 1], tok)
    return ids + list(tok.generation_prompt)


def require_unicode(text: str, what: str) -> None:
    """`text` must be encodable Unicode: JSON's "\\ud800" escapes decode to lone surrogates,
    which no tokenizer (and no UTF-8 output) takes. DataConfigError "WHAT: ..." otherwise."""
    try:
        text.encode("utf-8")
    except UnicodeEncodeError as e:
        raise DataConfigError(f"{what} has a lone surrogate {text[e.start]!r} at character "
                              f"{e.start}; expected valid Unicode text") from None


def validate_messages(messages, where: str, *, require_assistant: bool = True) -> None:
    """Check one conversation; DataConfigError "WHERE: ..." (WHERE is usually FILE:LINE)."""
    if not isinstance(messages, list) or not messages:
        raise DataConfigError(f"{where}: 'messages' must be a non-empty list of "
                              "{\"role\": ..., \"content\": ...} objects")
    for i, m in enumerate(messages):
        if not isinstance(m, dict):
            raise DataConfigError(f"{where}: message {i} is not a JSON object")
        if "role" not in m:
            raise DataConfigError(f"{where}: message {i} has no 'role' (expected one of {', '.join(ROLES)})")
        if m["role"] not in ROLES:
            raise DataConfigError(f"{where}: message {i} has role {m['role']!r}; expected one of "
                                  f"{', '.join(ROLES)}")
        if "content" not in m:
            raise DataConfigError(f"{where}: message {i} ({m['role']}) has no 'content'")
        if not isinstance(m["content"], str):
            raise DataConfigError(f"{where}: message {i} ({m['role']}) content is not a string")
        require_unicode(m["content"], f"{where}: message {i} ({m['role']}) content")
        for marker in (IM_START, IM_END):
            if marker in m["content"]:
                raise DataConfigError(f"{where}: message {i} ({m['role']}) contains '{marker}': "
                                      "pass plain messages, not rendered ChatML")
    if require_assistant and not any(m["role"] == "assistant" for m in messages):
        raise DataConfigError(f"{where}: no assistant turn (nothing to train on)")


def parse_chat_line(line: str | bytes, where: str, *, require_assistant: bool = True) -> list[dict]:
    """One JSON line {"messages": [...]} -> its checked messages."""
    try:
        obj = json.loads(line)
    except ValueError as e:
        raise DataConfigError(f"{where}: invalid JSON ({getattr(e, 'msg', e)})") from None
    if not isinstance(obj, dict) or "messages" not in obj:
        raise DataConfigError(f"{where}: expected a JSON object with a 'messages' list")
    validate_messages(obj["messages"], where, require_assistant=require_assistant)
    return obj["messages"]


def read_chat_jsonl(path: str, *, require_assistant: bool = True) -> Iterator[tuple[int, list[dict]]]:
    """(line number, messages) of each non-blank line of a .jsonl or .jsonl.gz file; invalid JSON,
    missing or unknown roles, non-string content, no assistant turn -> DataConfigError
    "FILE:LINE: ..."."""
    path = str(path)
    try:
        fh = gzip.open(path, "rt", encoding="utf-8") if path.endswith(".gz") else open(path, encoding="utf-8")
    except OSError as e:
        raise DataConfigError(f"{path}: cannot open ({e.strerror or e})") from None
    with fh:
        try:
            for n, line in enumerate(fh, 1):
                if line.strip():
                    yield n, parse_chat_line(line, f"{path}:{n}", require_assistant=require_assistant)
        except (OSError, EOFError, UnicodeDecodeError) as e:
            raise DataConfigError(f"{path}: cannot read ({e})") from None
