"""Chat templates: which template a run uses, rendering a conversation, and which tokens are the assistant's.

Assistant spans are found by rendering the conversation prefix by prefix: the text an assistant turn adds is
`render(messages[:i+1]) - render(messages[:i], add_generation_prompt=True)`. This works with any template
(no `{% generation %}` markers needed). Each piece is tokenized on its own and the ids concatenated, so a
training row splits exactly where generation does: the prompt is `chat_prompt_ids(...)` and the model's
tokens follow it. The byte-fallback tokenizer has no `apply_chat_template`; it renders through the same
Jinja renderer transformers uses.
"""
from __future__ import annotations

from pathlib import Path

from bigadapt.errors import DataError


def chat_template(tokenizer, data_cfg) -> str:
    """`data.chat_template` (a Jinja string or a .jinja file), else the tokenizer's own; else one DataError line."""
    given = getattr(data_cfg, "chat_template", None)
    if given:
        path = Path(given)
        if given.endswith(".jinja") or ("{" not in given and path.suffix):
            if not path.is_file():
                raise DataError(f"data.chat_template={given!r}: no such file; give a .jinja file or a Jinja string")
            return path.read_text()
        return given
    own = getattr(tokenizer, "chat_template", None)
    if isinstance(own, dict):  # some tokenizers ship several named templates
        own = own.get("default")
    if not own:
        raise DataError("the model's tokenizer has no chat template; set data.chat_template=<Jinja string or "
                        "path to a .jinja file>, or use prompt/completion columns")
    return own


def render(tokenizer, template: str, messages: list[dict], add_generation_prompt: bool, where: str = "") -> str:
    """The conversation as text; a template error (a role it rejects, a bad layout) is one DataError line."""
    try:
        if hasattr(tokenizer, "apply_chat_template"):
            return tokenizer.apply_chat_template(messages, chat_template=template, tokenize=False,
                                                 add_generation_prompt=add_generation_prompt)
        from transformers.utils.chat_template_utils import render_jinja_template
        texts, _ = render_jinja_template([messages], chat_template=template,
                                         add_generation_prompt=add_generation_prompt, bos_token="", eos_token="")
        return texts[0]
    except Exception as e:  # noqa: BLE001 - jinja's TemplateError, raise_exception(...), KeyError in the template
        reason = (str(e).splitlines() or [type(e).__name__])[0][:160]
        raise DataError(f"{where}the chat template rejects this conversation ({reason})") from None


def encode_text(tokenizer, text: str) -> list[int]:
    """Ids of a rendered piece; the template already holds the special tokens it wants."""
    if not text:
        return []
    if getattr(tokenizer, "is_fallback", False):
        return tokenizer.encode(text, add_special_tokens=False)
    return list(tokenizer(text, add_special_tokens=False)["input_ids"])


def chat_prompt_ids(tokenizer, data_cfg, messages: list[dict]) -> list[int]:
    """The conversation rendered with the generation prompt, as ids: what the model continues from."""
    text = render(tokenizer, chat_template(tokenizer, data_cfg), messages, add_generation_prompt=True)
    return encode_text(tokenizer, text)


def end_of_turn_ids(tokenizer, data_cfg) -> list[int]:
    """The token that closes an assistant turn under this template, when it is a special token of its own
    (`<|eot_id|>`, `<|im_end|>`, `<|end|>`): generation stops there, not only at eos. Found by rendering a probe
    turn and reading what the template writes right after the assistant's text; [] when that is plain text."""
    probe = "zq"  # any text a template copies verbatim
    messages = [{"role": "user", "content": "hi"}, {"role": "assistant", "content": probe}]
    try:
        pieces = assistant_pieces(tokenizer, chat_template(tokenizer, data_cfg), messages)
    except DataError:
        return []
    turn = next((text for text, is_assistant in pieces if is_assistant), "")
    tail = turn[turn.rfind(probe) + len(probe):] if probe in turn else ""
    ids = encode_text(tokenizer, tail) if tail.strip() else []
    specials = set(getattr(tokenizer, "all_special_ids", [])) | set(getattr(tokenizer, "added_tokens_decoder", {}))
    return ids[:1] if ids and ids[0] in specials else []


def stop_ids(tokenizer, data_cfg, model_eos) -> int | list[int] | None:
    """Where generation stops: the tokenizer's eos (else the model config's), and for a chat run (task sft) also
    the template's end-of-turn marker. One id stays an int, as transformers' generation config writes it."""
    eos = tokenizer.eos_token_id if tokenizer.eos_token_id is not None else model_eos
    if data_cfg.task != "sft":
        return eos
    base = [eos] if isinstance(eos, int) else list(eos or [])
    stops = list(dict.fromkeys(base + end_of_turn_ids(tokenizer, data_cfg)))
    return stops[0] if len(stops) == 1 else (stops or None)


def assistant_pieces(tokenizer, template: str, messages: list[dict], where: str = "") -> list[tuple[str, bool]]:
    """The rendered conversation as consecutive (text, is_assistant) pieces, concatenating to the full render."""
    pieces: list[tuple[str, bool]] = []
    done = ""  # the text covered by pieces so far
    for i, message in enumerate(messages):
        if message.get("role") != "assistant":
            continue
        before = render(tokenizer, template, messages[:i], True, where) if i else ""
        after = render(tokenizer, template, messages[:i + 1], False, where)
        if not (before.startswith(done) and after.startswith(before)):
            raise DataError(f"{where}the chat template does not render turn {i} as an extension of the turns "
                            f"before it, so its assistant tokens cannot be located; use another data.chat_template")
        pieces += [(before[len(done):], False), (after[len(before):], True)]
        done = after
    full = render(tokenizer, template, messages, False, where)
    if not full.startswith(done):
        raise DataError(f"{where}the chat template renders the whole conversation differently from its prefixes; "
                        f"use another data.chat_template")
    pieces.append((full[len(done):], False))
    return [(text, flag) for text, flag in pieces if text]


def encode_chat(tokenizer, template: str, messages: list[dict], where: str = "") -> tuple[list[int], list[int]]:
    """(input_ids, loss_mask): 1 on the tokens each assistant turn adds (its end-of-turn marker included)."""
    ids: list[int] = []
    mask: list[int] = []
    for text, is_assistant in assistant_pieces(tokenizer, template, messages, where):
        piece = encode_text(tokenizer, text)
        ids += piece
        mask += [int(is_assistant)] * len(piece)
    return ids, mask
