"""Row formats: detecting them, and adapters from a raw row to canonical rows.

Canonical rows are plain strings: preference pairs `{prompt, chosen, rejected}`, SFT rows
`{prompt, completion}`, RL prompts `{prompt}`. An adapter returns the canonical row and, for
error messages, the raw field each canonical field came from; or raises `BadRow(reason,
field, detail)`.

Preference formats (`data.format`):
  explicit        `prompt`, `chosen`, `rejected` strings.
  hh              Anthropic HH-RLHF: `chosen` and `rejected` are whole dialogues
                  (`\\n\\nHuman: ... \\n\\nAssistant: ...`) sharing everything up to and including
                  the last `\\n\\nAssistant:`; that shared part is the prompt, the rest the responses.
  conversational  `prompt` (or `messages`) as a list of {role, content} and `chosen`/`rejected`
                  as one assistant message (or a string); or `chosen`/`rejected` as whole
                  conversations that differ only in the last assistant message. The
                  prompt is rendered with the tokenizer's chat template (add_generation_prompt);
                  a response is the assistant message's content.
  tldr            OpenAI summarize-from-feedback comparisons: `info.{post,title,subreddit}`,
                  two `summaries[].text` and `choice`, the index of the preferred summary.
"""

from __future__ import annotations

from typing import Any, Callable, Optional

from rlhf.errors import DataError

PREFERENCE_FORMATS = ("explicit", "hh", "conversational", "tldr")
HH_ASSISTANT = "\n\nAssistant:"
TLDR_TEMPLATE = "SUBREDDIT: r/{subreddit}\n\nTITLE: {title}\n\nPOST: {post}\n\nTL;DR:"

# Every reason a row can be dropped for; the manifest counts rows by these names.
REASONS = {
    "not_json": "the row is not a JSON object",
    "missing_field": "a field is missing (or null)",
    "wrong_type": "a field has the wrong type",
    "malformed": "a field does not have the format's structure",
    "empty": "the prompt or a response is empty",
    "chosen_equals_rejected": "chosen and rejected are the same",
    "too_long": "prompt + response + EOS is over data.max_length tokens",
    "duplicate": "an exact duplicate of an earlier row (same prompt for prompt splits)",
    "train_eval_overlap": "a training row whose prompt is an evaluation prompt",
}

Fields = dict[str, str]  # canonical field -> the raw field it came from


class BadRow(Exception):
    """A row that cannot be used: why (one of REASONS), which raw field, and what is wrong."""

    def __init__(self, reason: str, field: Optional[str], detail: str):
        assert reason in REASONS, reason
        super().__init__(detail)
        self.reason, self.field, self.detail = reason, field, detail

    def describe(self) -> str:
        return f"field '{self.field}' {self.detail}" if self.field else self.detail


# --- detection ---------------------------------------------------------------------------

def _has(row: dict, key: str) -> bool:
    return row.get(key) is not None


def detect_format(row: dict, origin: str = "data.source") -> str:
    """The preference format of a row, from its columns (and whether they hold lists)."""
    if _has(row, "summaries") and _has(row, "choice"):
        return "tldr"
    if "chosen" in row and "rejected" in row:
        if any(isinstance(row.get(k), list) for k in ("prompt", "messages", "chosen", "rejected")):
            return "conversational"
        return "explicit" if "prompt" in row else "hh"
    raise DataError(
        f"cannot tell the preference format of {origin} from its columns "
        f"({', '.join(map(str, row)) or 'none'}): expected prompt/chosen/rejected (explicit), "
        "chosen/rejected dialogues (hh), message lists (conversational) or info/summaries/choice "
        "(tldr); set data.format or fix the columns"
    )


def detect_sft_format(row: dict, origin: str) -> str:
    """`prompt_completion`, `messages`, or a preference format (its prompt + chosen)."""
    if "completion" in row:
        return "prompt_completion"
    if "messages" in row and "chosen" not in row:
        return "messages"
    try:
        return detect_format(row, origin)
    except DataError:
        raise DataError(
            f"cannot tell the SFT format of {origin} from its columns "
            f"({', '.join(map(str, row)) or 'none'}): expected prompt/completion or messages "
            "(or preference pairs, whose chosen responses are used); fix the columns"
        ) from None


def detect_prompt_format(row: dict, origin: str) -> str:
    """`prompt` (a string or messages), `messages`, or a preference format (its prompt)."""
    if "prompt" in row and "chosen" not in row:
        return "prompt"
    if "messages" in row and "chosen" not in row:
        return "messages"
    try:
        return detect_format(row, origin)
    except DataError:
        raise DataError(
            f"cannot tell the prompt format of {origin} from its columns "
            f"({', '.join(map(str, row)) or 'none'}): expected prompt or messages "
            "(or preference pairs, whose prompts are used); fix the columns"
        ) from None


# --- field helpers -----------------------------------------------------------------------

def _kind(value: Any) -> str:
    if isinstance(value, bool):
        return "a boolean"
    if isinstance(value, (int, float)):
        return "a number"
    if isinstance(value, list):
        return "a list"
    if isinstance(value, dict):
        return "an object"
    return f"a {type(value).__name__}"


def get(row: dict, key: str, field: Optional[str] = None) -> Any:
    value = row.get(key) if isinstance(row, dict) else None
    if value is None:
        raise BadRow("missing_field", field or key, "is missing")
    return value


def get_str(row: dict, key: str, field: Optional[str] = None, hint: str = "") -> str:
    value = get(row, key, field)
    if not isinstance(value, str):
        raise BadRow("wrong_type", field or key, f"should be a string, not {_kind(value)}{hint}")
    return value


def _content(message: Any, field: str) -> str:
    """A message's text: a string, or a list of {type: text, text} parts joined."""
    if not isinstance(message, dict):
        raise BadRow("wrong_type", field, f"should be a {{role, content}} object, not {_kind(message)}")
    role = get(message, "role", f"{field}.role")
    if not isinstance(role, str):
        raise BadRow("wrong_type", f"{field}.role", f"should be a string, not {_kind(role)}")
    content = get(message, "content", f"{field}.content")
    if isinstance(content, list):
        parts = []
        for j, part in enumerate(content):
            if not (isinstance(part, dict) and isinstance(part.get("text"), str)):
                raise BadRow("wrong_type", f"{field}.content[{j}]",
                             "should be a {type: text, text} part")
            parts.append(part["text"])
        content = "".join(parts)
    if not isinstance(content, str):
        raise BadRow("wrong_type", f"{field}.content", f"should be a string, not {_kind(content)}")
    if role != "system" and not content.strip():
        raise BadRow("empty", f"{field}.content", "is empty")
    return content


def get_messages(row: dict, key: str) -> list[dict]:
    """A non-empty list of {role, content} messages, content flattened to strings."""
    value = get(row, key)
    if not isinstance(value, list):
        raise BadRow("wrong_type", key, f"should be a list of messages, not {_kind(value)}")
    if not value:
        raise BadRow("empty", key, "is empty")
    out = []
    for i, message in enumerate(value):
        content = _content(message, f"{key}[{i}]")
        out.append({**message, "content": content})
    return out


class ChatRenderer:
    """Renders prompt messages with a tokenizer's chat template (add_generation_prompt)."""

    def __init__(self, tokenizer: Any, model_name: str):
        self.tokenizer, self.model_name = tokenizer, model_name

    def __call__(self, messages: list[dict], field: str) -> str:
        if self.tokenizer is None or not getattr(self.tokenizer, "chat_template", None):
            raise DataError(
                f"conversational data needs a chat template, and the tokenizer of "
                f"model.name_or_path ({self.model_name}) has none; use a chat model's tokenizer "
                "or convert the data to the explicit format"
            )
        try:
            text = self.tokenizer.apply_chat_template(
                messages, tokenize=False, add_generation_prompt=True)
        except Exception as exc:  # the template's own raise_exception (e.g. role order)
            raise BadRow("malformed", field,
                         f"is rejected by the chat template ({str(exc).splitlines()[0]})") from None
        return text


def _assistant(value: Any, field: str) -> str:
    """A response given as a string, or as a list holding one assistant message."""
    if isinstance(value, str):
        return value
    if not isinstance(value, list):
        raise BadRow("wrong_type", field,
                     f"should be a string or one assistant message, not {_kind(value)}")
    if len(value) != 1:
        raise BadRow("malformed", field, f"should hold one assistant message, not {len(value)}")
    content = _content(value[0], f"{field}[0]")
    if value[0]["role"] != "assistant":
        raise BadRow("malformed", f"{field}[0].role",
                     f"should be 'assistant', not {value[0]['role']!r}")
    return content


def _prompt_messages(row: dict, key: str, render: ChatRenderer) -> str:
    value = get(row, key)
    if isinstance(value, str):
        return render([{"role": "user", "content": value}], key)
    return render(get_messages(row, key), key)


# --- preference adapters -----------------------------------------------------------------

def explicit(row: dict, render: ChatRenderer) -> tuple[dict, Fields]:
    hint = " (message lists are data.format=conversational)"
    out = {key: get_str(row, key, hint=hint) for key in ("prompt", "chosen", "rejected")}
    return out, {}


def _split_hh(text: str, field: str) -> tuple[str, str]:
    cut = text.rfind(HH_ASSISTANT)
    if cut < 0:
        raise BadRow("malformed", field, "has no '\\n\\nAssistant:' turn")
    cut += len(HH_ASSISTANT)
    return text[:cut], text[cut:]


def hh(row: dict, render: ChatRenderer) -> tuple[dict, Fields]:
    chosen, rejected = get_str(row, "chosen"), get_str(row, "rejected")
    prompt, chosen_response = _split_hh(chosen, "chosen")
    prompt_rejected, rejected_response = _split_hh(rejected, "rejected")
    if prompt != prompt_rejected:
        raise BadRow("malformed", "rejected", "does not share the dialogue before the last "
                     "'\\n\\nAssistant:' turn with 'chosen'")
    return ({"prompt": prompt, "chosen": chosen_response, "rejected": rejected_response},
            {"prompt": "chosen"})


def conversational(row: dict, render: ChatRenderer) -> tuple[dict, Fields]:
    key = "prompt" if "prompt" in row else "messages" if "messages" in row else None
    whole = any(isinstance(row.get(k), list) and len(row[k]) > 1 for k in ("chosen", "rejected"))
    if key is not None and not whole:
        prompt = _prompt_messages(row, key, render)
        chosen = _assistant(get(row, "chosen"), "chosen")
        rejected = _assistant(get(row, "rejected"), "rejected")
        return ({"prompt": prompt, "chosen": chosen, "rejected": rejected}, {"prompt": key})
    # Two whole conversations that differ only in the last assistant turn: the shared
    # messages are the prompt (a `prompt` column beside them, as in UltraFeedback, repeats it).
    chosen, rejected = get_messages(row, "chosen"), get_messages(row, "rejected")
    for name, messages in (("chosen", chosen), ("rejected", rejected)):
        if messages[-1]["role"] != "assistant":
            raise BadRow("malformed", f"{name}[{len(messages) - 1}].role",
                         "should be 'assistant' (the last message is the response)")
        if len(messages) < 2:
            raise BadRow("malformed", name, "has no prompt messages before the assistant turn")
    if chosen[:-1] != rejected[:-1]:
        raise BadRow("malformed", "rejected",
                     "does not share the messages before the last assistant turn with 'chosen'")
    return ({"prompt": render(chosen[:-1], "chosen"), "chosen": chosen[-1]["content"],
             "rejected": rejected[-1]["content"]},
            {"prompt": "chosen", "chosen": f"chosen[{len(chosen) - 1}].content",
             "rejected": f"rejected[{len(rejected) - 1}].content"})


def tldr(row: dict, render: ChatRenderer) -> tuple[dict, Fields]:
    info = get(row, "info")
    if not isinstance(info, dict):
        raise BadRow("wrong_type", "info", f"should be an object, not {_kind(info)}")
    parts = {key: get_str(info, key, f"info.{key}") for key in ("subreddit", "title", "post")}
    summaries = get(row, "summaries")
    if not isinstance(summaries, list):
        raise BadRow("wrong_type", "summaries", f"should be a list, not {_kind(summaries)}")
    if len(summaries) != 2:
        raise BadRow("malformed", "summaries", f"should hold 2 summaries, not {len(summaries)}")
    texts = [get_str(s if isinstance(s, dict) else {}, "text", f"summaries[{i}].text")
             for i, s in enumerate(summaries)]
    choice = get(row, "choice")
    if isinstance(choice, bool) or not isinstance(choice, int):
        raise BadRow("wrong_type", "choice", f"should be 0 or 1, not {_kind(choice)}")
    if choice not in (0, 1):
        raise BadRow("malformed", "choice", f"should be 0 or 1, not {choice}")
    return ({"prompt": TLDR_TEMPLATE.format(**parts), "chosen": texts[choice],
             "rejected": texts[1 - choice]},
            {"prompt": "info.post", "chosen": f"summaries[{choice}].text",
             "rejected": f"summaries[{1 - choice}].text"})


PREFERENCE_ADAPTERS: dict[str, Callable[[dict, ChatRenderer], tuple[dict, Fields]]] = {
    "explicit": explicit, "hh": hh, "conversational": conversational, "tldr": tldr,
}


# --- SFT and prompt adapters -------------------------------------------------------------

def sft_prompt_completion(row: dict, render: ChatRenderer) -> tuple[dict, Fields]:
    prompt = get(row, "prompt")
    if isinstance(prompt, list):
        prompt = _prompt_messages(row, "prompt", render)
    elif not isinstance(prompt, str):
        raise BadRow("wrong_type", "prompt", f"should be a string or messages, not {_kind(prompt)}")
    return {"prompt": prompt, "completion": _assistant(get(row, "completion"), "completion")}, {}


def sft_messages(row: dict, render: ChatRenderer) -> tuple[dict, Fields]:
    """All messages before the last (an assistant message) are the prompt."""
    messages = get_messages(row, "messages")
    last = len(messages) - 1
    if messages[-1]["role"] != "assistant":
        raise BadRow("malformed", f"messages[{last}].role",
                     "should be 'assistant' (the last message is the completion)")
    if last == 0:
        raise BadRow("malformed", "messages", "has no prompt messages before the assistant turn")
    return ({"prompt": render(messages[:-1], "messages"), "completion": messages[-1]["content"]},
            {"prompt": "messages", "completion": f"messages[{last}].content"})


def prompt_only(row: dict, render: ChatRenderer) -> tuple[dict, Fields]:
    value = get(row, "prompt")
    if isinstance(value, list):
        return {"prompt": _prompt_messages(row, "prompt", render)}, {}
    if not isinstance(value, str):
        raise BadRow("wrong_type", "prompt", f"should be a string or messages, not {_kind(value)}")
    return {"prompt": value}, {}


def prompt_messages(row: dict, render: ChatRenderer) -> tuple[dict, Fields]:
    """The messages are the prompt; a trailing assistant message (an answer) is left out."""
    messages = get_messages(row, "messages")
    if messages[-1]["role"] == "assistant":
        messages = messages[:-1]
    if not messages:
        raise BadRow("malformed", "messages", "has no messages before the assistant turn")
    return {"prompt": render(messages, "messages")}, {"prompt": "messages"}


def sft_adapter(fmt: str) -> Callable[[dict, ChatRenderer], tuple[dict, Fields]]:
    if fmt == "prompt_completion":
        return sft_prompt_completion
    if fmt == "messages":
        return sft_messages
    pair = PREFERENCE_ADAPTERS[fmt]

    def from_pair(row: dict, render: ChatRenderer) -> tuple[dict, Fields]:
        out, fields = pair(row, render)
        return ({"prompt": out["prompt"], "completion": out["chosen"]},
                {"prompt": fields.get("prompt", "prompt"),
                 "completion": fields.get("chosen", "chosen")})

    return from_pair


def prompt_adapter(fmt: str) -> Callable[[dict, ChatRenderer], tuple[dict, Fields]]:
    if fmt == "prompt":
        return prompt_only
    if fmt == "messages":
        return prompt_messages
    pair = PREFERENCE_ADAPTERS[fmt]

    def from_pair(row: dict, render: ChatRenderer) -> tuple[dict, Fields]:
        out, fields = pair(row, render)
        return {"prompt": out["prompt"]}, {"prompt": fields.get("prompt", "prompt")}

    return from_pair
