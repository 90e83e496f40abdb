"""Chat templates as *pieces*: runs of text or fixed ids, each trained or not, and image slots.

A template never tokenizes and never searches decoded text. The renderer tokenizes each text piece on its
own (in one batch) and concatenates, so the loss mask is exact by construction. Piece boundaries are
placed where the tokenizer's own pre-tokenizer splits anyway (at special tokens, before a space after
punctuation, after the header's "\\n\\n"), so the concatenation equals tokenizing the whole string; the tests
check this against `apply_chat_template`.

- `llama3`: `<|begin_of_text|>` then per message `<|start_header_id|>{role}<|end_header_id|>\\n\\n{content}<|eot_id|>`,
  content trimmed (as the Llama-3 chat template's `| trim`); images as the family's image token(s) where
  the Image part sits. Trained: the assistant content and its `<|eot_id|>`.
  A conversation with tool schemas is rendered in Llama-3.1's JSON tool-calling format (see `Llama3Template`).
- `vicuna_v1`: MLAN's / LLaVA-1.5's conv_vicuna_v1, `BOS + system + " USER: {q} ASSISTANT: {a}" + EOT`
  per exchange (later exchanges start "USER: " right after EOT, as LLaVA's SeparatorStyle.TWO).
  EOT is the tokenizer's `eos_token`: `<|eot_id|>` for the llama3 tokenizer (LLaVA's `</s>` does not exist
  in Llama-3; `<|eot_id|>` is what Llama-3 models stop on), `</s>` for Llama-2/Vicuna tokenizers.
  Trained: " " + the assistant content (the space is part of the answer's first BPE token) and EOT.
- `tokenizer`: the tokenizer's own `chat_template`. The mask comes from rendering prefixes: for each
  assistant message i, P = render(messages[:i], add_generation_prompt=True) and
  Q = render(messages[:i+1]); Q[len(P):] is the trained text (content + whatever the template closes the
  turn with). Every P and Q must be a prefix of the full rendering, else the template is not usable for
  training and rendering fails with a clear error.
"""
from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Literal

from mlan.errors import MlanError
from mlan.sources.records import Conversation, Image, Message, RecordError, Text, ToolCall

VICUNA_SYSTEM = (
    "A chat between a curious user and an artificial intelligence assistant. "
    "The assistant gives helpful, detailed, and polite answers to the user's questions."
)
TEMPLATES = ("llama3", "vicuna_v1", "tokenizer")

# Llama-3.1's JSON tool-calling prompt (Meta's prompt format for custom tools, schemas in the first user turn)
LLAMA31_TOOL_SYSTEM = "Environment: ipython\nCutting Knowledge Date: December 2023\nToday Date: 26 Jul 2024\n\n"
LLAMA31_TOOL_PREAMBLE = (
    "Given the following functions, please respond with a JSON for a function call with its proper arguments "
    "that best answers the given prompt.\n\n"
    'Respond in the format {"name": function name, "parameters": dictionary of argument name and its value}.'
    "Do not use variables.\n\n"
)
LLAMA31_CALL_SEPARATOR = "; "  # parallel calls, as vLLM's llama3_json parser reads them


@dataclass(frozen=True)
class Piece:
    """One run of a rendered document."""

    kind: Literal["text", "ids", "image"]
    trained: bool = False
    text: str = ""
    ids: tuple[int, ...] = ()
    image: int = -1  # index of the image in the conversation's order of appearance
    special: bool = False  # text: parse special-token strings in it (template text); False for user data
    turn_end: bool = False  # a complete assistant turn ends after this piece (a truncation point)


def _where(conv: Conversation) -> tuple[str, int | None]:
    return str(conv.meta.get("file", conv.source)), conv.meta.get("index")


def _record_error(conv: Conversation, reason: str, field: str | None = None) -> RecordError:
    file, index = _where(conv)
    return RecordError(file, index, reason, field)


def check_conversation(conv: Conversation) -> None:
    """What every template needs: a trained assistant turn, none of them empty."""
    roles = [m.role for m in conv.messages]
    if "assistant" not in roles:
        raise _record_error(conv, "no assistant turn", "messages")
    for i, m in enumerate(conv.messages):
        if m.role not in ("system", "user", "assistant", "tool"):
            raise _record_error(conv, f"unknown role {m.role!r}", f"messages[{i}].role")
        if m.role == "assistant" and not m.text.strip() and not m.images and not m.tool_calls:
            raise _record_error(conv, "empty assistant turn", f"messages[{i}]")
    if not any(m.trained for m in conv.messages if m.role == "assistant"):
        raise _record_error(conv, "no trained assistant turn (every assistant message has loss_weight 0)", "messages")


def _uses_tools(conv: Conversation) -> bool:
    return bool(conv.tools) or any(m.role == "tool" or m.tool_calls for m in conv.messages)


def llama31_call_text(calls: tuple[ToolCall, ...]) -> str:
    """`{"name": "f", "parameters": {…}}` per call (Llama-3.1's JSON format), parallel calls joined by "; "."""
    return LLAMA31_CALL_SEPARATOR.join(
        '{"name": "' + c.name + '", "parameters": ' + json.dumps(c.arguments_dict, ensure_ascii=False) + "}"
        for c in calls
    )


def _trimmed_parts(message: Message) -> list:
    """Content with surrounding whitespace removed (Llama-3 template's `trim`), empty text parts dropped."""
    parts = list(message.parts)
    if parts and isinstance(parts[0], Text):
        parts[0] = Text(parts[0].text.lstrip())
    if parts and isinstance(parts[-1], Text):
        parts[-1] = Text(parts[-1].text.rstrip())
    return [p for p in parts if not (isinstance(p, Text) and not p.text)]


class Template:
    """Conversation → pieces. Subclasses hold the token ids of their fixed structure."""

    name: str

    def pieces(self, conv: Conversation) -> list[Piece]:
        raise NotImplementedError


class TemplateError(MlanError, ValueError):
    """`model.template` names a template this tokenizer cannot render: one line naming the key and the fix."""


def _token_id(tok, token: str, template: str) -> int:
    i = tok.convert_tokens_to_ids(token)
    if i is None or i == tok.unk_token_id or tok.convert_ids_to_tokens(i) != token:
        raise TemplateError(f"model.template: {template!r} needs the token {token}, which tokenizer "
                            f"{tok.name_or_path!r} lacks; {_instead(tok, template)}")
    return int(i)


def _instead(tok, template: str) -> str:
    """What to set instead: the tokenizer's own chat template when it has one."""
    if template != "tokenizer" and getattr(tok, "chat_template", None):
        return "set `template: tokenizer` (its own chat template) or leave `template` unset"
    return "choose another tokenizer or `template` (llama3, vicuna_v1, tokenizer)"


class Llama3Template(Template):
    name = "llama3"

    def __init__(self, tok):
        self.bos = _token_id(tok, "<|begin_of_text|>", self.name)
        self.eot = _token_id(tok, "<|eot_id|>", self.name)
        start, end = _token_id(tok, "<|start_header_id|>", self.name), _token_id(tok, "<|end_header_id|>", self.name)
        newline2 = tok.encode("\n\n", add_special_tokens=False)
        # a tool output is Llama-3.1's `ipython` turn
        self.headers = {
            role: (start, *tok.encode(header, add_special_tokens=False), end, *newline2)
            for role, header in (("system", "system"), ("user", "user"), ("assistant", "assistant"), ("tool", "ipython"))
        }

    def pieces(self, conv: Conversation) -> list[Piece]:
        """Llama-3 chat; with tool schemas, Llama-3.1's tool format as the Hub's Llama-3.1 chat template writes it
        (the `Environment: ipython` system block, the schemas as JSON (indent 4) ahead of the first user message,
        calls as {"name", "parameters"} JSON, outputs as ipython turns), plus parallel calls joined by "; "."""
        tools = _uses_tools(conv)
        messages = list(conv.messages)
        out = [Piece("ids", ids=(self.bos,))]
        if tools:
            system = messages.pop(0).text.strip() if messages and messages[0].role == "system" else ""
            out += [Piece("ids", ids=self.headers["system"]), Piece("text", text=LLAMA31_TOOL_SYSTEM + system),
                    Piece("ids", ids=(self.eot,))]
        n_images = 0
        schemas_due = tools
        for i, m in enumerate(messages, start=len(conv.messages) - len(messages)):
            trained = m.role == "assistant" and m.trained
            out.append(Piece("ids", ids=self.headers[m.role]))
            parts = _trimmed_parts(m)
            if m.tool_calls:
                if m.text.strip() or m.images:
                    raise _record_error(conv, "template llama3: an assistant turn with both text and tool calls "
                                        "(Llama-3.1's tool format has no place for the text)", f"messages[{i}]")
                parts = [Text(llama31_call_text(m.tool_calls))]
            if m.role == "tool":  # as the Hub's Llama-3.1 template: the output string through tojson, untrimmed
                if m.images:
                    raise _record_error(conv, "template llama3: a tool output with images", f"messages[{i}]")
                parts = [Text(json.dumps(m.text, ensure_ascii=False))]
            if schemas_due and m.role == "user":
                schemas = "".join(json.dumps(t, indent=4, ensure_ascii=False) + "\n\n" for t in conv.tool_schemas)
                head = LLAMA31_TOOL_PREAMBLE + schemas
                if parts and isinstance(parts[0], Text):
                    parts[0] = Text(head + parts[0].text)
                else:
                    parts.insert(0, Text(head))
                schemas_due = False
            for p in parts:
                if isinstance(p, Image):
                    out.append(Piece("image", image=n_images))
                    n_images += 1
                else:
                    out.append(Piece("text", trained=trained, text=p.text))
            out.append(Piece("ids", trained=trained, ids=(self.eot,), turn_end=trained))
        return out


class VicunaV1Template(Template):
    name = "vicuna_v1"

    def __init__(self, tok):
        if tok.eos_token is None:
            raise TemplateError(f"model.template: 'vicuna_v1' needs an eos_token, which tokenizer "
                                f"{tok.name_or_path!r} lacks; {_instead(tok, 'vicuna_v1')}")
        self.eot = int(tok.eos_token_id)
        self.bos = (int(tok.bos_token_id),) if tok.bos_token_id is not None else ()

    def pieces(self, conv: Conversation) -> list[Piece]:
        if _uses_tools(conv):
            raise _record_error(conv, "template vicuna_v1 has no tool-calling format; use template llama3 or tokenizer")
        out: list[Piece] = [Piece("ids", ids=self.bos)] if self.bos else []
        messages = list(conv.messages)
        system = VICUNA_SYSTEM
        if messages and messages[0].role == "system":
            system = messages.pop(0).text.strip()
        pending = system + " " if system else ""  # untrained text not yet emitted
        n_images = 0
        for m in messages:
            parts = _trimmed_parts(m)
            if m.role == "assistant":
                pending += "ASSISTANT:"
                first = True
                for p in parts:
                    if isinstance(p, Image):  # unusual, but never trained
                        out.append(Piece("text", text=pending))
                        pending = ""
                        out.append(Piece("image", image=n_images))
                        n_images += 1
                        continue
                    if pending:
                        out.append(Piece("text", text=pending))
                        pending = ""
                    out.append(Piece("text", trained=m.trained, text=(" " if first else "") + p.text))
                    first = False
                if pending:
                    out.append(Piece("text", text=pending))
                    pending = ""
                out.append(Piece("ids", trained=m.trained, ids=(self.eot,), turn_end=m.trained))
            else:  # user (a system message after the first is rendered as a user turn)
                pending += "USER: "
                for p in parts:
                    if isinstance(p, Image):
                        if pending:
                            out.append(Piece("text", text=pending))
                            pending = ""
                        out.append(Piece("image", image=n_images))
                        n_images += 1
                    else:
                        pending += p.text
                pending += " "
        if pending:
            out.append(Piece("text", text=pending.rstrip(" ")))
        return [p for p in out if p.kind != "text" or p.text]


class TokenizerTemplate(Template):
    """The tokenizer's own chat_template; the mask is found by rendering prefixes (see module docstring)."""

    name = "tokenizer"

    def __init__(self, tok, image_token: str | None):
        if not tok.chat_template:
            raise TemplateError(f"model.template: 'tokenizer' needs a chat_template, which tokenizer "
                                f"{tok.name_or_path!r} lacks; {_instead(tok, 'tokenizer')}")
        self.tok = tok
        self.image_token = image_token

    def _messages(self, conv: Conversation) -> list[dict]:
        """OpenAI-style messages, as `apply_chat_template` takes them (tool calls with dict arguments)."""
        msgs = []
        for m in conv.messages:
            if m.images:
                content: object = [
                    {"type": "image"} if isinstance(p, Image) else {"type": "text", "text": p.text}
                    for p in m.parts if isinstance(p, (Image, Text))
                ]
            else:
                content = m.text
            msg: dict = {"role": m.role, "content": content}
            if m.tool_calls:
                msg["tool_calls"] = [
                    {"type": "function", "function": {"name": c.name, "arguments": c.arguments_dict},
                     **({"id": c.id} if c.id else {})}
                    for c in m.tool_calls
                ]
            msgs.append(msg)
        return msgs

    def _render(self, conv: Conversation, msgs: list[dict], generation_prompt: bool, tools: list[dict] | None) -> str:
        try:
            return self.tok.apply_chat_template(msgs, tools=tools, tokenize=False, add_generation_prompt=generation_prompt)
        except Exception as err:  # noqa: BLE001 -- jinja raises many types (TemplateError, TypeError on list content, ...)
            raise _record_error(conv, f"the tokenizer's chat_template failed: {type(err).__name__}: {err}") from None

    def pieces(self, conv: Conversation) -> list[Piece]:
        msgs = self._messages(conv)
        tools = conv.tool_schemas or None
        full = self._render(conv, msgs, False, tools)
        if tools and full == self._render(conv, msgs, False, None):
            raise _record_error(conv, "the tokenizer's chat_template ignores `tools`: the tool schemas would not "
                                "reach the prompt; use template llama3 or a chat_template that renders tools")
        spans: list[tuple[int, int]] = []  # trained char ranges
        for i, m in enumerate(msgs):
            if m["role"] != "assistant":
                continue
            prompt = self._render(conv, msgs[:i], True, tools)
            closed = self._render(conv, msgs[: i + 1], False, tools)
            if not (closed.startswith(prompt) and full.startswith(closed)):
                raise ValueError(
                    "template 'tokenizer': the chat_template is not prefix-stable (rendering a conversation's "
                    "prefix is not a prefix of rendering the whole), so trained spans cannot be located; "
                    "use template llama3 or vicuna_v1"
                )
            answer = closed[len(prompt):]
            missing = [c.name for c in conv.messages[i].tool_calls if c.name not in answer]
            if missing:
                raise _record_error(conv, f"the tokenizer's chat_template does not render the tool call {missing[0]!r}",
                                    f"messages[{i}]")
            if conv.messages[i].trained:
                spans.append((len(prompt), len(closed)))
        out: list[Piece] = []
        pos = 0
        for start, end in spans:
            out += self._text(full[pos:start], False, False)
            out += self._text(full[start:end], True, True)
            pos = end
        out += self._text(full[pos:], False, False)
        n_images = 0
        numbered = []
        for p in out:
            if p.kind == "image":
                p = Piece("image", image=n_images)
                n_images += 1
            numbered.append(p)
        if n_images != len(conv.images):
            raise _record_error(
                conv, f"the chat_template emitted {n_images} image token(s) for {len(conv.images)} image(s)"
            )
        return numbered

    def _text(self, text: str, trained: bool, turn_end: bool) -> list[Piece]:
        if not text:
            return []
        chunks = text.split(self.image_token) if self.image_token else [text]
        out: list[Piece] = []
        for k, chunk in enumerate(chunks):
            if k:
                out.append(Piece("image"))
            if chunk:
                out.append(Piece("text", trained=trained, text=chunk, special=True))
        if turn_end:
            last = out[-1]
            out[-1] = Piece(last.kind, last.trained, last.text, last.ids, last.image, last.special, turn_end=True)
        return out


LLAMA3_TOKENS = ("<|begin_of_text|>", "<|start_header_id|>", "<|end_header_id|>", "<|eot_id|>")


def is_llama3_tokenizer(tok) -> bool:
    """Llama-3's tokenizer (offline `llama3` or a Llama-3.x hub folder): it has the Llama-3 header tokens."""
    vocab = tok.get_vocab()
    return all(t in vocab for t in LLAMA3_TOKENS)


def default_template(tok, family_default: str) -> str:
    """The template for a recipe that sets no `model.template`: the family's (llama3) for Llama-3's tokenizer,
    else the tokenizer's own chat template when it has one (SmolLM2's ChatML), else the family's."""
    if is_llama3_tokenizer(tok) or not getattr(tok, "chat_template", None):
        return family_default
    return "tokenizer"


def get_template(name: str, tok, image_token: str | None = None) -> Template:
    """A template by recipe name (`model.template`)."""
    if name == "llama3":
        return Llama3Template(tok)
    if name == "vicuna_v1":
        return VicunaV1Template(tok)
    if name == "tokenizer":
        return TokenizerTemplate(tok, image_token)
    raise ValueError(f"unknown template {name!r}; allowed: {', '.join(TEMPLATES)}")
