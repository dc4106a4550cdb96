"""Chat templates from either place HF folders keep them, `--chat-template` as a file or inline, and the
error for a model without one."""

from __future__ import annotations

import json
import shutil

import pytest

from jaxserve.tokenizer import NO_TEMPLATE_MESSAGE, Tokenizer, load_chat_template

MESSAGES = [{"role": "user", "content": "Hi"}]


@pytest.fixture
def folder(tiny_models, tmp_path):
    target = tmp_path / "model"
    shutil.copytree(tiny_models["tiny-qwen3"], target)
    return target


def test_template_from_chat_template_jinja(folder):
    assert (folder / "chat_template.jinja").is_file()
    assert Tokenizer(folder).render_chat(MESSAGES) == "<|im_start|>user\nHi<|im_end|>\n<|im_start|>assistant\n"


def test_template_from_tokenizer_config(folder):
    template = (folder / "chat_template.jinja").read_text()
    (folder / "chat_template.jinja").unlink()
    config = json.loads((folder / "tokenizer_config.json").read_text())
    (folder / "tokenizer_config.json").write_text(json.dumps({**config, "chat_template": template}))
    assert Tokenizer(folder).render_chat(MESSAGES).endswith("<|im_start|>assistant\n")


def test_override_template_as_file_or_text(folder, tmp_path):
    path = tmp_path / "plain.jinja"
    path.write_text("{% for m in messages %}{{ m['role'] }}: {{ m['content'] }}\n{% endfor %}")
    assert Tokenizer(folder, load_chat_template(path)).render_chat(MESSAGES) == "user: Hi\n"
    inline = "{{ messages[0]['content'] }}!"
    assert Tokenizer(folder, load_chat_template(inline)).render_chat(MESSAGES) == "Hi!"
    with pytest.raises(ValueError, match="looks like a file path"):
        load_chat_template(tmp_path / "missing.jinja")


def test_no_template_is_a_clear_error(folder):
    (folder / "chat_template.jinja").unlink()
    tokenizer = Tokenizer(folder)
    with pytest.raises(ValueError, match="you must provide a chat template"):
        tokenizer.render_chat(MESSAGES)
    assert "default chat template is no longer allowed" in NO_TEMPLATE_MESSAGE


def test_generation_prompt_and_continue_final_message_exclude_each_other(folder):
    with pytest.raises(ValueError, match="Cannot set both `continue_final_message` and `add_generation_prompt`"):
        Tokenizer(folder).render_chat(MESSAGES, add_generation_prompt=True, continue_final_message=True)


def test_spaces_between_special_tokens_set_added_tokens_apart(tiny_models):
    tokenizer = Tokenizer(tiny_models["tiny-qwen2"])
    ids = tokenizer.encode("<|im_start|>user hi<|im_end|>", add_special_tokens=False)

    def stream(skip: bool, spaces: bool) -> str:
        detokenizer = tokenizer.detokenizer([1, 2, 3], skip, spaces)
        return "".join(detokenizer.step(i) for i in ids)

    assert stream(False, False) == "<|im_start|>user hi<|im_end|>"
    assert stream(False, True) == "<|im_start|> user hi <|im_end|>"
    assert stream(True, True) == stream(True, False) == "user hi"


def test_a_remote_code_sentencepiece_tokenizer_is_read_from_its_model_file(tiny_models, monkeypatch):
    """InternLM2's tokenizer exists only as remote code over a SentencePiece tokenizer.model: jaxserve runs none of
    it and never asks on standard input, and encodes token for token as the remote tokenizer does (the special
    markers apart, each span between them through SentencePiece itself, BOS first, no EOS)."""
    sentencepiece = pytest.importorskip("sentencepiece")
    from scripts.make_test_models import SPM_USER_SYMBOLS, training_corpus

    folder = tiny_models["tiny-internlm2-reward-published"]
    assert "auto_map" in json.loads((folder / "tokenizer_config.json").read_text())
    monkeypatch.setattr("builtins.input", lambda *_: pytest.fail("asked on standard input"))
    tokenizer = Tokenizer(folder)
    processor = sentencepiece.SentencePieceProcessor(model_file=str(folder / "tokenizer.model"))
    markers = {piece: processor.piece_to_id(piece) for piece in SPM_USER_SYMBOLS}

    def reference(text: str) -> list[int]:
        ids, rest = [processor.bos_id()], text
        while rest:
            found = [(rest.find(m), m) for m in markers if m in rest]
            at, marker = min(found) if found else (len(rest), None)
            ids += processor.encode(rest[:at]) if rest[:at] else []
            if marker is None:
                break
            ids.append(markers[marker])
            rest = rest[at + len(marker) :]
        return ids

    texts = training_corpus()[::3] + [
        "  two  leading spaces", "trailing ", "tabs\tand\nnewlines\n\n", "digits 1234567890", "émoji 😀 and 漢字",
        "<|im_start|>user\nHi there<|im_end|>\n<|im_start|>assistant\n", "x<|im_end|>y",
    ]  # fmt: skip
    assert [tokenizer.encode(t) for t in texts] == [reference(t) for t in texts]
    assert tokenizer.decode(reference("Hello world"), True) == "Hello world"
