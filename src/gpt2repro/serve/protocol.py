"""What the OpenAI API accepts and how it refuses: each request's fields checked by name and type into
`Params`, and every refusal an `APIError` that the app turns into OpenAI's error body,
`{"error": {"message", "type", "param", "code"}}`, with a 4xx status. Imports neither torch nor the
web framework."""

from __future__ import annotations

import json
import math
import re
from dataclasses import dataclass

from ..errors import UserError

MAX_N = 32  # choices per request: more would hold the engine's slots for one client
MAX_SEQUENCES = 64  # prompts x n per request: the work one request may queue
MAX_STOP = 4  # stop strings, as OpenAI allows
MAX_STOP_CHARS = 256  # per stop string: the held-back text is checked against each on every token
MAX_LOGPROBS = 20
MAX_DEPTH = 16  # nesting of arrays and objects in a body (the deepest valid one is 5)


class APIError(UserError):
    """A request refused, with OpenAI's error fields (a client's mistake, answered over HTTP)."""

    def __init__(self, status: int, message: str, param: str | None = None, code: str | None = None):
        super().__init__(message)
        self.status, self.message, self.param, self.code = status, message, param, code

    def body(self) -> dict:
        kind = {401: "authentication_error", 404: "not_found_error"}.get(self.status, "invalid_request_error")
        if self.status >= 500:
            kind = "server_error"
        return {"error": {"message": self.message, "type": kind, "param": self.param, "code": self.code}}


@dataclass
class Params:
    """A validated request: prompts as token ids (chat: the rendered conversation) and sampling."""

    prompts: list[list[int]]
    max_tokens: int
    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int | None = None
    n: int = 1
    stop: tuple[str, ...] = ()
    seed: int | None = None
    stream: bool = False
    include_usage: bool = False
    echo: bool = False
    logprobs: int | None = None
    logit_bias: tuple[tuple[int, float], ...] = ()
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0


def _no(value) -> bool:
    return value is None


def _empty(value) -> bool:
    return value is None or value == [] or value == {}


# Parameters of OpenAI's API (and vLLM's and llama.cpp's extensions) that would change the output and
# are not implemented: refused, unless given the value that changes nothing. Metadata (`user`,
# `metadata`, `store`, `service_tier`...) and unknown fields are ignored, as vLLM ignores them.
UNSUPPORTED = {
    "best_of": lambda v: v is None or v == 1,
    "suffix": lambda v: v is None or v == "",
    "response_format": lambda v: v is None or v == {"type": "text"},
    "tools": _empty,
    "tool_choice": lambda v: v is None or v == "none",
    "functions": _empty,
    "function_call": lambda v: v is None or v == "none",
    "audio": _no,
    "modalities": lambda v: v is None or v == ["text"],
    "web_search_options": _no,
    "repetition_penalty": lambda v: v is None or v == 1,
    "min_p": lambda v: v is None or v == 0,
    "typical_p": lambda v: v is None or v == 1,
    "min_tokens": lambda v: v is None or v == 0,
    "ignore_eos": lambda v: v is None or v is False,
    "stop_token_ids": _empty,
    "bad_words": _empty,
    "allowed_token_ids": _no,
    "guided_json": _no,
    "guided_regex": _no,
    "guided_choice": _no,
    "guided_grammar": _no,
    "structured_outputs": _no,
    "grammar": _no,
    "json_schema": _no,
    "mirostat": lambda v: v is None or v == 0,
    "include_stop_str_in_output": lambda v: v is None or v is False,
    "use_beam_search": lambda v: v is None or v is False,
    "length_penalty": lambda v: v is None or v == 1,
    "repeat_penalty": lambda v: v is None or v == 1,
    "repeat_last_n": _no,
    "penalty_last_n": _no,
    "n_predict": _no,
    "dry_multiplier": lambda v: v is None or v == 0,
    "xtc_probability": lambda v: v is None or v == 0,
    "top_n_sigma": lambda v: v is None or v == -1,
    "dynatemp_range": lambda v: v is None or v == 0,
    "tfs_z": lambda v: v is None or v == 1,
    "n_probs": lambda v: v is None or v == 0,
}
CHAT_UNSUPPORTED = {  # the chat API's log-probabilities and vLLM's echo of the last message
    "logprobs": lambda v: v is None or v is False,
    "top_logprobs": lambda v: v is None or v == 0,
    "echo": lambda v: v is None or v is False,
}


_TYPES = {
    int: "an integer",
    float: "a number",
    str: "a string",
    bool: "a boolean",
    list: "an array",
    dict: "an object",
}


def parse_json(raw: bytes) -> dict:
    """The body as a JSON object of at most MAX_DEPTH levels whose text is all valid Unicode."""
    try:
        body = json.loads(raw)
    except RecursionError:
        raise APIError(
            400, f"the request body nests deeper than {MAX_DEPTH} levels", code="invalid_json"
        ) from None
    except (ValueError, UnicodeDecodeError) as e:
        raise APIError(400, f"the request body is not valid JSON: {e}", code="invalid_json") from None
    if not isinstance(body, dict):
        raise APIError(400, "the request body must be a JSON object", code="invalid_json")
    _check_values(body)
    return body


def _check_values(body: dict) -> None:
    """Refuse nesting past MAX_DEPTH and text with lone surrogates (JSON's "\\ud800" escapes, which
    no tokenizer or response can encode), walking the body without recursion."""
    todo = [(body, 1)]
    while todo:
        value, depth = todo.pop()
        if isinstance(value, (dict, list)):
            if depth > MAX_DEPTH:
                raise APIError(
                    400, f"the request body nests deeper than {MAX_DEPTH} levels", code="invalid_json"
                )
            items = [*value.keys(), *value.values()] if isinstance(value, dict) else value
            todo += [(v, depth + 1) for v in items]
        elif isinstance(value, str):
            try:
                value.encode("utf-8")
            except UnicodeEncodeError:
                raise APIError(400, "the request body has text with a lone surrogate (not valid Unicode)",
                               code="invalid_json") from None  # fmt: skip


def field(body: dict, name: str, kind: type, default=None, required: bool = False):
    """body[name] if it has the right type (an int passes for a float, a bool for neither)."""
    value = body.get(name)
    if value is None:
        if required:
            raise APIError(400, f"you must provide '{name}'", name, "missing_required_parameter")
        return default
    ok = isinstance(value, kind) and not (kind is not bool and isinstance(value, bool))
    if kind is float and isinstance(value, int) and not isinstance(value, bool):
        value, ok = float(value), True
    if not ok:
        raise APIError(
            400, f"'{name}' must be {_TYPES[kind]}, got {json.dumps(value)[:40]}", name, "invalid_type"
        )
    return value


def check(ok: bool, message: str, param: str, code: str = "invalid_value") -> None:
    if not ok:
        raise APIError(400, message, param, code)


def check_model(body: dict, model_id: str) -> None:
    name = field(body, "model", str, required=True)
    if name != model_id:
        raise APIError(
            404,
            f"the model '{name}' does not exist; this server has '{model_id}'",
            "model",
            "model_not_found",
        )


def prompt_ids(prompt, encode, vocab_size: int) -> list[list[int]]:
    """Prompts as token ids: text, token ids, or a list of either (one prompt each)."""
    wrong = APIError(
        400,
        "'prompt' must be a string, an array of token ids, or an array of those",
        "prompt",
        "invalid_type",
    )
    if isinstance(prompt, str) or (isinstance(prompt, list) and prompt and _is_ids(prompt)):
        prompts = [prompt]
    elif (
        isinstance(prompt, list)
        and prompt
        and all(isinstance(p, str) or (isinstance(p, list) and _is_ids(p)) for p in prompt)
    ):
        prompts = prompt
    else:
        raise wrong
    out = [encode(p) if isinstance(p, str) else p for p in prompts]
    for ids in out:
        check(bool(ids), "a prompt is empty", "prompt")
        bad = next((t for t in ids if not 0 <= t < vocab_size), None)
        check(bad is None, f"token id {bad} is outside the vocabulary (0..{vocab_size - 1})", "prompt")
    return out


def _is_ids(x: list) -> bool:
    return bool(x) and all(isinstance(t, int) and not isinstance(t, bool) for t in x)


def sampling(
    body: dict,
    prompts: list[list[int]],
    block_size: int,
    limit: int,
    default_max: int | None,
    vocab_size: int,
    chat: bool = False,
) -> Params:
    """The sampling fields shared by completions and chat; max_tokens within the context and limit
    (absent: `default_max`, or what the context has room for), at least 1 for chat."""
    refuse_unsupported(body, chat)
    least = int(chat)
    longest = max(len(p) for p in prompts)
    room = block_size - longest
    check(
        room >= least,
        f"the prompt is {longest} tokens; this model's context is {block_size}"
        + (", leaving no room for a reply" if least and room >= 0 else ""),
        "messages" if least else "prompt",
        "context_length_exceeded",
    )
    asked = field(body, "max_tokens", int, field(body, "max_completion_tokens", int))
    max_tokens = (
        min(room, limit, default_max if default_max is not None else room) if asked is None else asked
    )
    check(max_tokens >= least, f"'max_tokens' must be at least {least}, got {max_tokens}", "max_tokens")
    check(
        longest + max_tokens <= block_size,
        f"this model's context is {block_size} tokens: {longest} in the prompt leave room for {room}, "
        f"but max_tokens is {max_tokens}",
        "max_tokens",
        "context_length_exceeded",
    )
    check(
        max_tokens <= limit, f"'max_tokens' is at most {limit} on this server, got {max_tokens}", "max_tokens"
    )
    temperature = field(body, "temperature", float, 1.0)
    check(0 <= temperature <= 2, f"'temperature' must be between 0 and 2, got {temperature}", "temperature")
    top_p = field(body, "top_p", float, 1.0)
    check(0 < top_p <= 1, f"'top_p' must be above 0 and at most 1, got {top_p}", "top_p")
    top_k = field(body, "top_k", int, 0)
    check(top_k >= -1, f"'top_k' must be -1 or 0 (no limit) or a positive count, got {top_k}", "top_k")
    n = field(body, "n", int, 1)
    check(1 <= n <= MAX_N, f"'n' must be between 1 and {MAX_N}, got {n}", "n")
    check(len(prompts) * n <= MAX_SEQUENCES,
          f"{len(prompts)} prompts x n={n} is {len(prompts) * n} sequences; at most {MAX_SEQUENCES} per request",
          "n")  # fmt: skip
    seed = field(body, "seed", int)
    check(seed is None or -(2**63) <= seed < 2**64, "'seed' must fit in 64 bits", "seed")
    options = field(body, "stream_options", dict, {})
    params = Params(prompts, max_tokens, temperature, top_p, top_k if top_k > 0 else None, n, _stop(body), seed,
                    field(body, "stream", bool, False), bool(options.get("include_usage")))  # fmt: skip
    params.logit_bias = _logit_bias(body, vocab_size)
    params.presence_penalty = _penalty(body, "presence_penalty")
    params.frequency_penalty = _penalty(body, "frequency_penalty")
    return params


def refuse_unsupported(body: dict, chat: bool) -> None:
    """A 400 naming the first parameter that would change the output but is not implemented."""
    table = {**UNSUPPORTED, **(CHAT_UNSUPPORTED if chat else {})}
    for name, harmless in table.items():
        try:
            ok = harmless(body.get(name))
        except TypeError:  # (a value of no comparable kind)
            ok = False
        where = "chat completions" if chat else "this server"
        check(ok, f"'{name}' is not supported by {where} (it would change the output); leave it out",
              name, "unsupported_parameter")  # fmt: skip


def _penalty(body: dict, name: str) -> float:
    value = field(body, name, float, 0.0)
    check(-2 <= value <= 2, f"'{name}' must be between -2 and 2, got {value}", name)
    return value


def _logit_bias(body: dict, vocab_size: int) -> tuple[tuple[int, float], ...]:
    """OpenAI's logit_bias: token ids (as strings) to numbers from -100 to 100."""
    bias = field(body, "logit_bias", dict, {})
    out = []
    for key, value in bias.items():
        shown = json.dumps(key)[:40]
        check(re.fullmatch(r"0|[1-9][0-9]{0,11}", key) is not None,
              f"'logit_bias' keys must be token ids (no leading zeros), got {shown}", "logit_bias")  # fmt: skip
        token = int(key)
        check(token < vocab_size, f"'logit_bias' token id {token} is outside the vocabulary (0..{vocab_size - 1})",
              "logit_bias")  # fmt: skip
        number = isinstance(value, (int, float)) and not isinstance(value, bool)
        check(number and math.isfinite(value) and -100 <= value <= 100,
              f"'logit_bias' values must be numbers from -100 to 100, got {json.dumps(value)[:40]} for token {token}",
              "logit_bias")  # fmt: skip
        out.append((token, float(value)))
    return tuple(out)


def _stop(body: dict) -> tuple[str, ...]:
    stop = body.get("stop")
    stop = [stop] if isinstance(stop, str) else stop
    ok = stop is None or (
        isinstance(stop, list)
        and len(stop) <= MAX_STOP
        and all(isinstance(s, str) and 0 < len(s) <= MAX_STOP_CHARS for s in stop)
    )
    message = f"'stop' must be a string or up to {MAX_STOP} strings, each of 1 to {MAX_STOP_CHARS} characters"
    check(ok, message, "stop", "invalid_type")
    return tuple(stop or ())


def completion_params(
    body: dict, model_id: str, encode, vocab_size: int, block_size: int, limit: int
) -> Params:
    check_model(body, model_id)
    if "prompt" not in body:
        raise APIError(400, "you must provide 'prompt'", "prompt", "missing_required_parameter")
    prompts = prompt_ids(body["prompt"], encode, vocab_size)
    params = sampling(
        body, prompts, block_size, limit, 16, vocab_size
    )  # 16: OpenAI's default for completions
    params.echo = field(body, "echo", bool, False)
    params.logprobs = field(body, "logprobs", int)
    check(
        params.logprobs is None or 0 <= params.logprobs <= MAX_LOGPROBS,
        f"'logprobs' must be between 0 and {MAX_LOGPROBS}",
        "logprobs",
    )
    check(
        params.max_tokens > 0 or params.echo,
        "'max_tokens' must be at least 1 unless 'echo' is set",
        "max_tokens",
    )
    return params


def chat_messages(body: dict) -> list[dict]:
    """The messages as role and text (content given as text parts is joined)."""
    messages = field(body, "messages", list, required=True)
    out = []
    for i, m in enumerate(messages):
        check(isinstance(m, dict), f"messages[{i}] must be an object", f"messages[{i}]", "invalid_type")
        content = m.get("content")
        if isinstance(content, list):
            parts = [p.get("text") for p in content if isinstance(p, dict) and p.get("type") == "text"]
            check(
                len(parts) == len(content) and all(isinstance(p, str) for p in parts),
                "only text content parts are supported",
                f"messages[{i}].content",
            )
            content = "".join(parts)
        check(
            isinstance(content, str),
            f"messages[{i}].content must be a string",
            f"messages[{i}].content",
            "invalid_type",
        )
        check(
            isinstance(m.get("role"), str),
            f"messages[{i}].role must be a string",
            f"messages[{i}].role",
            "invalid_type",
        )
        out.append({"role": m["role"], "content": content})
    check(bool(out), "'messages' is empty", "messages")
    return out
