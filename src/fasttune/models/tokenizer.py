"""Tokenizer and chat template: `tokenizers` for the BPE, Jinja for the template, as transformers does.

The template is rendered in a sandboxed Jinja environment set up like transformers' (trim_blocks,
lstrip_blocks, loop controls, a `tojson` that does not escape HTML, `raise_exception`, `strftime_now`),
with the named special tokens (`bos_token`, `eos_token`, ...) in scope, and the text is encoded without
adding special tokens: the template writes them itself. That is exactly `apply_chat_template`.

Where the responses are: for each assistant message i, the conversation up to i rendered with the
generation prompt is a prefix of the whole rendering; the response runs from the end of that prefix to
the end of the first turn-end token (`<|im_end|>`, `<|eot_id|>`, ...) after the message's content. It
includes whatever the template puts between the generation prompt and the content (Qwen3's empty
`<think></think>` block), because the model must learn to produce it, and stops before the newline that
the template writes after the end token, because the model never produces that. Tokens whose characters
overlap the response are the trained tokens.
"""

from __future__ import annotations

import json
import lzma
import os
from dataclasses import dataclass
from datetime import datetime
from functools import cached_property
from pathlib import Path

import jinja2
import jinja2.ext
from jinja2.sandbox import ImmutableSandboxedEnvironment
from tokenizers import Tokenizer as HFTokenizer

from fasttune.errors import TokenizerError
from fasttune.io import safe_read as safe_io

SPECIAL_TOKEN_KEYS = (
    "bos_token",
    "eos_token",
    "unk_token",
    "sep_token",
    "pad_token",
    "cls_token",
    "mask_token",
)
# Tokens that end an assistant turn in the templates of the supported families (and end-of-document tokens
# that generation must also stop on). Only those that the vocabulary has are used.
TURN_END_TOKENS = ("<|im_end|>", "<|eot_id|>", "<|eom_id|>", "<|end|>", "<end_of_turn>", "</s>")
DOCUMENT_END_TOKENS = ("<|endoftext|>", "<|end_of_text|>")


@dataclass
class ChatEncoding:
    """A tokenized conversation. `mask[t]` is True where token t is part of an assistant response (the
    tokens to train on); `response_spans` are the [start, end) token ranges of the responses."""

    ids: list[int]
    mask: list[bool]
    response_spans: list[tuple[int, int]]
    text: str


def _tojson(x, ensure_ascii=False, indent=None, separators=None, sort_keys=False):
    return json.dumps(x, ensure_ascii=ensure_ascii, indent=indent, separators=separators, sort_keys=sort_keys)


def _raise_exception(message):
    raise jinja2.exceptions.TemplateError(message)


class _GenerationTag(jinja2.ext.Extension):
    """`{% generation %}...{% endgeneration %}` (used by some templates to mark responses): rendered as is."""

    tags = {"generation"}

    def parse(self, parser):
        lineno = next(parser.stream).lineno
        body = parser.parse_statements(("name:endgeneration",), drop_needle=True)
        return jinja2.nodes.CallBlock(self.call_method("_body"), [], [], body).set_lineno(lineno)

    def _body(self, caller):
        return caller()


def compile_template(template: str, source: str = "chat template") -> jinja2.Template:
    env = ImmutableSandboxedEnvironment(
        trim_blocks=True, lstrip_blocks=True, extensions=[_GenerationTag, jinja2.ext.loopcontrols]
    )
    env.filters["tojson"] = _tojson
    env.globals["raise_exception"] = _raise_exception
    env.globals["strftime_now"] = lambda fmt: datetime.now().strftime(fmt)
    if len(template) > safe_io.TEMPLATE_CAP:
        raise TokenizerError(f"{source}: the chat template has {len(template)} characters, more than the "
                             f"{safe_io.TEMPLATE_CAP} a template may have")  # fmt: skip
    try:
        return env.from_string(template)
    except jinja2.TemplateSyntaxError as e:
        raise TokenizerError(
            f"{source}: chat template syntax error at line {e.lineno}: {e.message}"
        ) from None
    except (jinja2.TemplateError, RecursionError, MemoryError, ValueError) as e:  # e.g. 10,000 nested ifs
        raise TokenizerError(f"{source}: chat template cannot be compiled{_kind(e)}: {e}") from None


def _kind(e: Exception) -> str:
    """The error's type, except for a template's own `raise_exception` message, which stands alone."""
    return "" if type(e) is jinja2.TemplateError else f" ({type(e).__name__})"


def _token_text(value) -> str | None:
    """A special token as tokenizer_config.json writes it: a string, an AddedToken dict, or null."""
    if isinstance(value, dict):
        return value.get("content")
    return value


class Tokenizer:
    """A `tokenizers.Tokenizer` plus the fields of `tokenizer_config.json` that matter for training."""

    def __init__(
        self,
        tokenizer: HFTokenizer,
        config: dict | None = None,
        chat_template: str | None = None,
        source: str = "<memory>",
    ):
        self.tk = tokenizer
        self.config = dict(config or {})
        self.source = source
        if chat_template is None:
            chat_template = self.config.get("chat_template")
        if isinstance(chat_template, list):  # [{"name": ..., "template": ...}, ...]: the default one
            named = {t.get("name"): t.get("template") for t in chat_template if isinstance(t, dict)}
            chat_template = named.get("default")
        if chat_template is not None and not isinstance(chat_template, str):
            raise TokenizerError(f"{source}: chat_template must be text, got {type(chat_template).__name__}")
        self.chat_template = chat_template
        self._template = compile_template(chat_template, source) if chat_template else None
        self.special_tokens = {
            k: _token_text(self.config.get(k))
            for k in SPECIAL_TOKEN_KEYS
            if _token_text(self.config.get(k)) is not None
        }

    @classmethod
    def from_folder(cls, path: str | os.PathLike) -> Tokenizer:
        """Every file is read through safe_io: regular files only (symlinks to them are fine), each
        under its size cap."""
        folder = Path(path)
        tj = folder / "tokenizer.json"
        if not _present(tj):
            raise TokenizerError(f"{folder}: no tokenizer.json (fasttune reads tokenizers' JSON format)")
        text = safe_io.read_text(tj, safe_io.TOKENIZER_JSON_CAP, TokenizerError)
        try:
            tk = HFTokenizer.from_str(text)
        except Exception as e:  # tokenizers raises a bare Exception on bad files
            raise TokenizerError(f"{tj}: cannot be read by tokenizers: {e}") from None
        del text
        config = {}
        cfg_file = folder / "tokenizer_config.json"
        if _present(cfg_file):
            config = _json_object(cfg_file, safe_io.JSON_CAP)
        stm = folder / "special_tokens_map.json"
        if _present(stm):  # older folders keep the special tokens here; tokenizer_config.json wins
            for k, v in _json_object(stm, safe_io.CONFIG_CAP).items():
                config.setdefault(k, v)
        # transformers 5 writes the template to its own file, which takes precedence, as it does there.
        jinja_file = folder / "chat_template.jinja"
        template = None
        if _present(jinja_file):
            template = safe_io.read_text(jinja_file, safe_io.TEMPLATE_CAP, TokenizerError)
        return cls(tk, config, template, source=str(folder))

    # -- vocabulary ------------------------------------------------------------------------------------

    @property
    def vocab_size(self) -> int:
        return self.tk.get_vocab_size(with_added_tokens=True)

    def token_to_id(self, token: str | None) -> int | None:
        return None if token is None else self.tk.token_to_id(token)

    @property
    def eos_token_id(self) -> int | None:
        return self.token_to_id(self.special_tokens.get("eos_token"))

    @property
    def bos_token_id(self) -> int | None:
        return self.token_to_id(self.special_tokens.get("bos_token"))

    @property
    def pad_token_id(self) -> int | None:
        return self.token_to_id(self.special_tokens.get("pad_token"))

    @cached_property
    def stop_tokens(self) -> list[str]:
        """Tokens that end generation: the template's turn-end tokens, eos, then end-of-document tokens."""
        template = self.chat_template or ""
        found = [t for t in TURN_END_TOKENS if t in template]
        eos = self.special_tokens.get("eos_token")
        out = []
        for t in found + ([eos] if eos else []) + list(DOCUMENT_END_TOKENS):
            if t not in out and self.tk.token_to_id(t) is not None:
                out.append(t)
        return out

    @property
    def stop_token_ids(self) -> list[int]:
        return [self.tk.token_to_id(t) for t in self.stop_tokens]

    def encode(self, text: str, add_special_tokens: bool = False) -> list[int]:
        return self.tk.encode(text, add_special_tokens=add_special_tokens).ids

    def decode(self, ids, skip_special_tokens: bool = False) -> str:
        return self.tk.decode(list(ids), skip_special_tokens=skip_special_tokens)

    # -- chat template ---------------------------------------------------------------------------------

    def render(self, messages: list[dict], add_generation_prompt: bool = False, **kwargs) -> str:
        """The conversation as text, exactly as transformers' `apply_chat_template(tokenize=False)`."""
        if self._template is None:
            raise TokenizerError(
                f"{self.source}: the tokenizer has no chat template "
                "(tokenizer_config.json 'chat_template' or chat_template.jinja)"
            )
        _check_messages(messages)
        tools = kwargs.pop("tools", None)
        context = {**self.special_tokens, **kwargs}  # like transformers: kwargs override special tokens
        try:
            return self._template.render(
                messages=messages,
                add_generation_prompt=add_generation_prompt,
                tools=tools,
                documents=None,
                **context,
            )
        except Exception as e:  # the template is the user's code: whatever it raises is the template's fault
            raise TokenizerError(f"{self.source}: chat template failed{_kind(e)}: {e}") from None

    def apply_chat_template(
        self, messages: list[dict], add_generation_prompt: bool = False, tokenize: bool = True, **kwargs
    ):
        text = self.render(messages, add_generation_prompt, **kwargs)
        return self.encode(text) if tokenize else text

    def encode_chat(
        self, messages: list[dict], add_generation_prompt: bool = False, **kwargs
    ) -> ChatEncoding:
        """Token ids of the rendered conversation and which of them are assistant responses."""
        return self.encode_chats([messages], add_generation_prompt, **kwargs)[0]

    def encode_chats(
        self, conversations: list[list[dict]], add_generation_prompt: bool = False, **kwargs
    ) -> list[ChatEncoding]:
        """`encode_chat` for many conversations: the templates render in Python, then one `encode_batch`
        call tokenizes them all (in parallel, in Rust)."""
        texts, char_spans = [], []
        for messages in conversations:
            text = self.render(messages, add_generation_prompt, **kwargs)
            texts.append(text)
            char_spans.append(self._response_char_spans(messages, text, **kwargs))
        out = []
        for text, spans, enc in zip(
            texts, char_spans, self.tk.encode_batch(texts, add_special_tokens=False), strict=True
        ):
            mask = [any(s < ce and e > cs for cs, ce in spans) for s, e in enc.offsets]
            out.append(ChatEncoding(ids=enc.ids, mask=mask, response_spans=_runs(mask), text=text))
        return out

    def _response_char_spans(self, messages: list[dict], text: str, **kwargs) -> list[tuple[int, int]]:
        stops = self.stop_tokens
        char_spans = []
        for i, m in enumerate(messages):
            if m["role"] != "assistant":
                continue
            if i == 0:
                raise TokenizerError("message 0: a conversation cannot start with an assistant message")
            prefix = self.render(messages[:i], add_generation_prompt=True, **kwargs)
            if not text.startswith(prefix):
                raise TokenizerError(
                    f"{self.source}: the chat template renders messages 0..{i - 1} differently "
                    f"when message {i} follows, so the response boundary is not defined"
                )
            start = len(prefix)
            content = m["content"]
            at = text.find(content, start) if content else start
            if at < 0 and content.strip():  # templates that trim the content (Llama 3)
                content = content.strip()
                at = text.find(content, start)
            end = _first_of(text, stops, at + len(content))
            if at < 0 or end is None or _first_of(text[:at], stops, start) is not None:
                raise TokenizerError(
                    f"{self.source}: cannot find message {i}'s content followed by an end token "
                    f"({', '.join(stops) or 'none known'}) in the rendered template"
                )
            char_spans.append((start, end))
        return char_spans

    # -- saving ----------------------------------------------------------------------------------------

    def save(self, path: str | os.PathLike) -> None:
        """Write tokenizer.json, tokenizer_config.json (template included) and chat_template.jinja."""
        folder = Path(path)
        folder.mkdir(parents=True, exist_ok=True)
        self.tk.save(str(folder / "tokenizer.json"))
        config = dict(self.config)
        if self.chat_template:
            # Both places, identical: transformers 5 prefers the .jinja file, older readers the JSON field.
            config["chat_template"] = self.chat_template
            (folder / "chat_template.jinja").write_text(self.chat_template, encoding="utf-8")
        (folder / "tokenizer_config.json").write_text(
            json.dumps(config, indent=2, ensure_ascii=False) + "\n", encoding="utf-8"
        )


def _present(path: Path) -> bool:
    """There, or a symlink (a dangling one is then reported as not found, naming its target)."""
    return path.exists() or path.is_symlink()


def _json_object(path: Path, cap: int) -> dict:
    data = safe_io.read_json(path, cap, TokenizerError)
    if not isinstance(data, dict):
        raise TokenizerError(f"{path}: expected a JSON object, got {type(data).__name__}")
    return data


def format_mask(tokenizer: Tokenizer, enc: ChatEncoding) -> str:
    """The rendered conversation with each trained span wrapped in [[...]]: what the loss sees."""
    parts, prev = [], 0
    for s, e in enc.response_spans:
        parts.append(tokenizer.decode(enc.ids[prev:s]))
        parts.append("[[" + tokenizer.decode(enc.ids[s:e]) + "]]")
        prev = e
    parts.append(tokenizer.decode(enc.ids[prev:]))
    return "".join(parts)


def _runs(mask: list[bool]) -> list[tuple[int, int]]:
    """[start, end) ranges of the True runs."""
    runs, t = [], 0
    while t < len(mask):
        if mask[t]:
            u = t
            while u < len(mask) and mask[u]:
                u += 1
            runs.append((t, u))
            t = u
        t += 1
    return runs


def _first_of(text: str, needles: list[str], start: int) -> int | None:
    """End index of the earliest occurrence of any needle at or after `start`, or None."""
    best = None
    for n in needles:
        i = text.find(n, start)
        if i >= 0 and (best is None or i < best[0]):
            best = (i, i + len(n))
    return None if best is None else best[1]


def _check_messages(messages) -> None:
    if not isinstance(messages, list) or not messages:
        raise TokenizerError("messages must be a non-empty list of {'role', 'content'} objects")
    for i, m in enumerate(messages):
        if not isinstance(m, dict):
            raise TokenizerError(
                f"message {i}: expected an object with 'role' and 'content', got {type(m).__name__}"
            )
        for key in ("role", "content"):
            if not isinstance(m.get(key), str):
                raise TokenizerError(f"message {i}: '{key}' must be a string, got {m.get(key)!r}")


def load_tokenizer(path: str | os.PathLike) -> Tokenizer:
    """Load `tokenizer.json` (+ `tokenizer_config.json`, chat template) from a model folder."""
    return Tokenizer.from_folder(path)


BUILTIN_DIR = Path(__file__).parents[1] / "assets" / "qwen2.5"


def builtin_tokenizer() -> Tokenizer:
    """Qwen2.5-Instruct's tokenizer and chat template, bundled with fasttune (assets/README.md)."""
    tk = HFTokenizer.from_str(lzma.decompress((BUILTIN_DIR / "tokenizer.json.xz").read_bytes()).decode())
    config = json.loads((BUILTIN_DIR / "tokenizer_config.json").read_text(encoding="utf-8"))
    return Tokenizer(tk, config, source="builtin Qwen2.5 tokenizer")


def write_builtin_tokenizer(folder: str | os.PathLike) -> Path:
    """Write the bundled tokenizer into `folder` as tokenizer.json and tokenizer_config.json."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "tokenizer.json").write_bytes(lzma.decompress((BUILTIN_DIR / "tokenizer.json.xz").read_bytes()))
    (folder / "tokenizer_config.json").write_bytes((BUILTIN_DIR / "tokenizer_config.json").read_bytes())
    return folder
