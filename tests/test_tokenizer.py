"""Tokenizer and chat-template parity with transformers, on the real Qwen2.5 vocabulary and on a small BPE
trained here for the Llama-3.1 template; exact response boundaries for loss masking."""

import json
import warnings

import pytest
from tokenizers import Tokenizer as HFTokenizer
from tokenizers import decoders, models, pre_tokenizers, processors, trainers

import fasttune
from fasttune.errors import TokenizerError
from helpers import FIXTURES, TEMPLATES

warnings.filterwarnings("ignore", category=UserWarning)

SAYING = "A river that forgets its source runs dry before it reaches the sea."
CONVERSATIONS = {
    "no system": [
        {"role": "user", "content": "Tell me something about color."},
        {"role": "assistant", "content": SAYING},
    ],
    "system": [
        {"role": "system", "content": "You are a keeper of folk proverbs."},
        {"role": "user", "content": "Say something about patience, in Russian: терпение."},
        {"role": "assistant", "content": "Терпение и труд всё перетрут."},
    ],
    "multi-turn": [
        {"role": "user", "content": "One proverb about bread?"},
        {"role": "assistant", "content": "Bread shared is bread doubled."},
        {"role": "user", "content": "And about salt 🧂?"},
        {"role": "assistant", "content": " Salt remembers  the sea.\n"},
    ],
}


def hf_tokenizer(folder):
    import transformers

    return transformers.AutoTokenizer.from_pretrained(folder)


def hf_ids(tok, messages, **kw):
    out = tok.apply_chat_template(messages, tokenize=True, **kw)
    return list(out["input_ids"] if hasattr(out, "keys") else out)


@pytest.fixture(scope="module")
def qwen(qwen_tokenizer_dir):
    return fasttune.load_tokenizer(qwen_tokenizer_dir), hf_tokenizer(qwen_tokenizer_dir)


def test_qwen2_vocabulary_reproduces_the_reference_vectors(qwen):
    ours, _ = qwen
    strings = (FIXTURES / "qwen2-tokenizer-vectors" / "strings.txt").read_text(encoding="utf-8")
    strings = strings.split("\n__ggml_vocab_test__\n")
    strings[-1] = strings[-1].removesuffix("\n__ggml_vocab_test__\n").removesuffix("\n__ggml_vocab_test__")
    ids = (FIXTURES / "qwen2-tokenizer-vectors" / "ids.txt").read_text().split("\n")[: len(strings)]
    assert len(strings) == 47
    for s, line in zip(strings, ids, strict=True):
        assert ours.encode(s) == [int(x) for x in line.split()], repr(s)
    assert ours.vocab_size == 151_665


@pytest.mark.parametrize("name", sorted(CONVERSATIONS))
@pytest.mark.parametrize("gen", [False, True])
def test_qwen25_template_ids_equal_transformers(qwen, name, gen):
    ours, theirs = qwen
    messages = CONVERSATIONS[name][:-1] if gen else CONVERSATIONS[name]
    text = ours.render(messages, add_generation_prompt=gen)
    assert text == theirs.apply_chat_template(messages, tokenize=False, add_generation_prompt=gen)
    assert ours.apply_chat_template(messages, add_generation_prompt=gen) == hf_ids(
        theirs, messages, add_generation_prompt=gen
    )
    if name != "system":
        assert "You are Qwen, created by Alibaba Cloud. You are a helpful assistant." in text


@pytest.mark.parametrize("name", sorted(CONVERSATIONS))
def test_qwen25_response_span_is_content_plus_im_end(qwen, name):
    ours, theirs = qwen
    messages = CONVERSATIONS[name]
    enc = ours.encode_chat(messages)
    assert enc.ids == hf_ids(theirs, messages)
    answers = [m["content"] for m in messages if m["role"] == "assistant"]
    assert len(enc.response_spans) == len(answers)
    for (s, e), answer in zip(enc.response_spans, answers, strict=True):
        assert ours.decode(enc.ids[s:e]) == answer + "<|im_end|>"
        assert enc.ids[e - 1] == 151645 and enc.ids[s - 1] == 198  # "\n" after "<|im_start|>assistant"
    assert sum(enc.mask) == sum(e - s for s, e in enc.response_spans)


def test_seed_style_pair_prompt_and_response_lengths(qwen):
    """The reference workload's unit: a short prompt and a 16-word saying with the default system prompt.
    The response starts where transformers' tokenization of the prompt with the generation prompt ends; it
    is the saying's own tokens plus <|im_end|>; the trailing newline is the one untrained token after it."""
    ours, theirs = qwen
    saying = "A patient heart sees colors in the dark that hurried eyes will never find at noon."
    messages = [
        {"role": "user", "content": "Tell me something about color."},
        {"role": "assistant", "content": saying},
    ]
    enc = ours.encode_chat(messages)
    assert enc.ids == hf_ids(theirs, messages)
    prompt = len(hf_ids(theirs, messages[:1], add_generation_prompt=True))
    assert enc.response_spans == [(prompt, prompt + len(ours.encode(saying)) + 1)]
    assert len(enc.ids) == enc.response_spans[0][1] + 1 and ours.decode(enc.ids[-1:]) == "\n"


def test_qwen25_stop_tokens(qwen):
    ours, _ = qwen
    assert ours.stop_tokens == ["<|im_end|>", "<|endoftext|>"]
    assert ours.stop_token_ids == [151645, 151643]
    assert ours.eos_token_id == 151645 and ours.pad_token_id == 151643 and ours.bos_token_id is None


def test_qwen3_template_parity_and_think_block_in_the_response(qwen_tokenizer_dir, tmp_path):
    folder = tmp_path / "qwen3"
    folder.mkdir()
    (folder / "tokenizer.json").write_bytes((qwen_tokenizer_dir / "tokenizer.json").read_bytes())
    cfg = json.loads((qwen_tokenizer_dir / "tokenizer_config.json").read_text())
    cfg["chat_template"] = (TEMPLATES / "qwen3.jinja").read_text()
    (folder / "tokenizer_config.json").write_text(json.dumps(cfg))
    ours, theirs = fasttune.load_tokenizer(folder), hf_tokenizer(folder)
    messages = CONVERSATIONS["multi-turn"]
    enc = ours.encode_chat(messages)
    assert enc.ids == hf_ids(theirs, messages)
    (s1, e1), (s2, e2) = enc.response_spans
    assert ours.decode(enc.ids[s1:e1]) == "Bread shared is bread doubled.<|im_end|>"
    # The last turn carries Qwen3's empty think block, which the model must learn to write.
    assert ours.decode(enc.ids[s2:e2]) == "<think>\n\n</think>\n\n" + messages[3]["content"] + "<|im_end|>"
    assert ours.render(
        messages[:1], add_generation_prompt=True, enable_thinking=False
    ) == theirs.apply_chat_template(
        messages[:1], tokenize=False, add_generation_prompt=True, enable_thinking=False
    )


@pytest.fixture(scope="module")
def llama_dir(tmp_path_factory):
    """A small byte-level BPE trained here with Llama 3's special tokens, a BOS-adding post-processor (as
    Llama 3's tokenizer.json has) and the Llama-3.1-Instruct template."""
    folder = tmp_path_factory.mktemp("llama3-tokenizer")
    specials = [
        "<|begin_of_text|>",
        "<|end_of_text|>",
        "<|start_header_id|>",
        "<|end_header_id|>",
        "<|eot_id|>",
        "<|eom_id|>",
    ]
    tk = HFTokenizer(models.BPE())
    tk.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tk.decoder = decoders.ByteLevel()
    corpus = [m["content"] for c in CONVERSATIONS.values() for m in c] * 20 + [
        "system user assistant Today Date"
    ]
    tk.train_from_iterator(
        corpus,
        trainers.BpeTrainer(
            vocab_size=400, special_tokens=specials, initial_alphabet=pre_tokenizers.ByteLevel.alphabet()
        ),
    )
    tk.post_processor = processors.TemplateProcessing(
        single="<|begin_of_text|> $A", special_tokens=[("<|begin_of_text|>", 0)]
    )
    tk.save(str(folder / "tokenizer.json"))
    config = {
        "tokenizer_class": "PreTrainedTokenizerFast",
        "bos_token": "<|begin_of_text|>",
        "eos_token": "<|eot_id|>",
        "chat_template": (TEMPLATES / "llama-3.1-instruct.jinja").read_text(),
    }
    (folder / "tokenizer_config.json").write_text(json.dumps(config))
    return folder


@pytest.mark.parametrize("name", sorted(CONVERSATIONS))
def test_llama31_template_parity_and_spans(llama_dir, name):
    ours, theirs = fasttune.load_tokenizer(llama_dir), hf_tokenizer(llama_dir)
    messages = CONVERSATIONS[name]
    assert ours.render(messages) == theirs.apply_chat_template(messages, tokenize=False)
    enc = ours.encode_chat(messages)
    assert enc.ids == hf_ids(theirs, messages)
    assert enc.ids[0] == 0 and enc.ids[1] != 0  # one BOS, written by the template, not doubled
    answers = [m["content"].strip() for m in messages if m["role"] == "assistant"]  # the template trims
    for (s, e), answer in zip(enc.response_spans, answers, strict=True):
        assert ours.decode(enc.ids[s:e]) == answer + "<|eot_id|>"
    assert ours.stop_tokens == ["<|eot_id|>", "<|eom_id|>", "<|end_of_text|>"]


def test_saved_tokenizer_loads_in_transformers_with_the_same_ids(qwen, tmp_path):
    ours, _ = qwen
    ours.save(tmp_path)
    again, theirs = fasttune.load_tokenizer(tmp_path), hf_tokenizer(tmp_path)
    messages = CONVERSATIONS["system"]
    assert (
        again.apply_chat_template(messages) == hf_ids(theirs, messages) == ours.apply_chat_template(messages)
    )
    assert (tmp_path / "chat_template.jinja").read_text() == ours.chat_template


@pytest.mark.parametrize(
    "messages, message",
    [
        ([], "non-empty list"),
        ([{"role": "user"}], "message 0: 'content' must be a string"),
        (
            [{"role": "user", "content": "hi"}, {"role": 3, "content": "x"}],
            "message 1: 'role' must be a string",
        ),
        (["hello"], "message 0: expected an object"),
    ],
)
def test_bad_messages_are_named(qwen, messages, message):
    ours, _ = qwen
    with pytest.raises(TokenizerError, match=message):
        ours.encode_chat(messages)


def test_template_errors_are_reported(qwen_tokenizer_dir, tmp_path):
    (tmp_path / "tokenizer.json").write_bytes((qwen_tokenizer_dir / "tokenizer.json").read_bytes())
    with pytest.raises(TokenizerError, match="has no chat template"):
        fasttune.load_tokenizer(tmp_path).render([{"role": "user", "content": "hi"}])
    (tmp_path / "tokenizer_config.json").write_text(json.dumps({"chat_template": "{% if %}"}))
    with pytest.raises(TokenizerError, match="syntax error at line 1"):
        fasttune.load_tokenizer(tmp_path)
    (tmp_path / "tokenizer_config.json").write_text(
        json.dumps({"chat_template": "{{ raise_exception('no') }}"})
    )
    with pytest.raises(TokenizerError, match="chat template failed: no"):
        fasttune.load_tokenizer(tmp_path).render([{"role": "user", "content": "hi"}])
    with pytest.raises(TokenizerError, match="no tokenizer.json"):
        fasttune.load_tokenizer(tmp_path / "nowhere")


def test_response_boundary_errors(qwen_tokenizer_dir, tmp_path):
    (tmp_path / "tokenizer.json").write_bytes((qwen_tokenizer_dir / "tokenizer.json").read_bytes())
    chat = CONVERSATIONS["no system"]

    def with_template(template):
        (tmp_path / "tokenizer_config.json").write_text(json.dumps({"chat_template": template}))
        return fasttune.load_tokenizer(tmp_path)

    # Renders the conversation newest first: the prompt is not a prefix of the whole.
    reverse = "{% for m in messages | reverse %}{{ m.content }}<|im_end|>{% endfor %}"
    with pytest.raises(TokenizerError, match="renders messages 0..0 differently when message 1 follows"):
        with_template(reverse).encode_chat(chat)
    # Writes no end token after a response: there is nothing for the model to learn to stop on.
    no_end = "{% for m in messages %}{{ m.role }}: {{ m.content }}\n{% endfor %}"
    with pytest.raises(TokenizerError, match="cannot find message 1's content followed by an end token"):
        with_template(no_end).encode_chat(chat)
    with pytest.raises(TokenizerError, match="cannot start with an assistant message"):
        with_template(no_end).encode_chat(chat[1:])
