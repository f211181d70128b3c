"""Request validation: raw gRPC bytes → a ValidRequest, or InvalidArgument naming the field.

Pure functions over the request, the tokenizer and the limits: testable without workers.
"""
from __future__ import annotations

import math
import re
import uuid
from dataclasses import dataclass
from typing import Any

from google.protobuf.message import DecodeError

from engine.types import SamplingParams
from protos.pdserve.v1 import generation_pb2 as pb
from router.chat import chat_prompt_ids
from router.config import LimitsConfig
from router.errors import InvalidArgument
from router.structured import grammar_of, thinking_of

_ID_RE = re.compile(r"^[A-Za-z0-9._:\-]{1,128}$")
MAX_SALT_CHARS = 256
MAX_BAD_WORD_TOKENS = 64  # a bad word is a word or a phrase, not a document
MAX_TOP_LOGPROBS = 20  # alternatives per token a request may ask for (logprobs, prompt_logprobs), as OpenAI allows


@dataclass(frozen=True)
class ValidRequest:
    request_id: str  # the client's label, echoed in responses; never a key inside pdserve
    prompt_ids: list[int]
    sampling: SamplingParams
    stop: tuple[str, ...]
    key: str  # minted here for every request: the only id workers and the hand-off ever see
    cache_salt: str = ""  # prefix-cached KV is shared only with requests of the same salt
    include_stop_str: bool = False  # the stop string (or stop token's text) that ended it stays in the text
    skip_special_tokens: bool = True  # special tokens have no text


def parse(raw: bytes) -> pb.GenerateRequest:
    try:
        return pb.GenerateRequest.FromString(raw)
    except DecodeError as e:
        field = _find_bad_utf8(raw) or "request"
        raise InvalidArgument(field, "not valid UTF-8" if field != "request" else f"malformed: {e}") from e


def validate(req: pb.GenerateRequest, tokenizer, limits: LimitsConfig, max_model_len: int,  # type: ignore[no-untyped-def]
             adapters: tuple[str, ...] = ()) -> ValidRequest:
    """`adapters`: the LoRA adapters served (model.lora_adapters) that lora_adapter may name."""
    key = uuid.uuid4().hex
    rid = req.request_id or key
    if not _ID_RE.match(rid):
        raise InvalidArgument("request_id", "must be 1-128 characters of [A-Za-z0-9._:-]")
    prompt_ids = _truncate(req, _tokenize(req, tokenizer), limits, max_model_len)
    n = len(prompt_ids)
    if n > limits.max_prompt_tokens:
        raise InvalidArgument("prompt", f"{n} tokens exceeds limits.max_prompt_tokens={limits.max_prompt_tokens}")
    if n >= max_model_len:
        raise InvalidArgument("prompt", f"{n} tokens leaves no room in the model context of {max_model_len}")
    if req.HasField("max_tokens"):
        max_tokens = req.max_tokens
        if max_tokens <= 0:
            raise InvalidArgument("max_tokens", f"must be > 0, got {max_tokens}")
        if max_tokens > limits.max_new_tokens:
            raise InvalidArgument("max_tokens", f"{max_tokens} exceeds limits.max_new_tokens={limits.max_new_tokens}")
        if n + max_tokens > max_model_len:
            raise InvalidArgument(
                "max_tokens", f"prompt ({n}) + max_tokens ({max_tokens}) exceeds the model context of {max_model_len}"
            )
    else:
        max_tokens = min(limits.default_max_tokens, max_model_len - n)
    temperature = req.temperature if req.HasField("temperature") else 0.0
    if not math.isfinite(temperature) or temperature < 0:
        raise InvalidArgument("temperature", f"must be >= 0, got {temperature}")
    top_p = req.top_p if req.HasField("top_p") else 1.0
    if not math.isfinite(top_p) or not 0 < top_p <= 1:
        raise InvalidArgument("top_p", f"must be in (0, 1], got {top_p}")
    top_k = req.top_k if req.HasField("top_k") else 0
    if top_k < 0:
        raise InvalidArgument("top_k", f"must be >= 0 (0 = off), got {top_k}")
    if len(req.stop) > limits.max_stop_strings:
        raise InvalidArgument("stop", f"at most {limits.max_stop_strings} stop strings, got {len(req.stop)}")
    for i, s in enumerate(req.stop):
        if not s:
            raise InvalidArgument(f"stop[{i}]", "must not be empty")
    min_p = _opt(req, "min_p", 0.0)
    if not 0 <= min_p <= 1:
        raise InvalidArgument("min_p", f"must be in [0, 1], got {min_p}")
    rep = _opt(req, "repetition_penalty", 1.0)
    if not 0 < rep <= 10:
        raise InvalidArgument("repetition_penalty", f"must be in (0, 10] (1 = off), got {rep}")
    for name in ("presence_penalty", "frequency_penalty"):
        v = _opt(req, name, 0.0)
        if not -2 <= v <= 2:
            raise InvalidArgument(name, f"must be in [-2, 2], got {v}")
    logprobs = req.logprobs if req.HasField("logprobs") else None
    if logprobs is not None and not 0 <= logprobs <= MAX_TOP_LOGPROBS:
        raise InvalidArgument("logprobs", f"must be in [0, {MAX_TOP_LOGPROBS}] (top alternatives per token), got {logprobs}")
    prompt_logprobs = req.prompt_logprobs if req.HasField("prompt_logprobs") else None
    if prompt_logprobs is not None and not 0 <= prompt_logprobs <= MAX_TOP_LOGPROBS:
        raise InvalidArgument("prompt_logprobs", f"must be in [0, {MAX_TOP_LOGPROBS}] (top alternatives per prompt "
                                                 f"token), got {prompt_logprobs}")
    vocab = len(tokenizer)
    for i, t in enumerate(req.stop_token_ids):
        if t >= vocab:
            raise InvalidArgument(f"stop_token_ids[{i}]", f"{t} is outside the vocabulary (size {vocab})")
    for i, t in enumerate(req.allowed_token_ids):
        if t >= vocab:
            raise InvalidArgument(f"allowed_token_ids[{i}]", f"{t} is outside the vocabulary (size {vocab})")
    min_tokens = req.min_tokens if req.HasField("min_tokens") else 0
    if not 0 <= min_tokens <= max_tokens:
        raise InvalidArgument("min_tokens", f"must be in [0, max_tokens={max_tokens}], got {min_tokens}")
    if len(req.logit_bias) > limits.max_logit_bias:
        raise InvalidArgument("logit_bias", f"at most {limits.max_logit_bias} entries, got {len(req.logit_bias)}")
    for t, b in req.logit_bias.items():
        if t >= vocab:
            raise InvalidArgument(f"logit_bias[{t}]", f"{t} is outside the vocabulary (size {vocab})")
        if not -100 <= b <= 100:  # NaN fails this too
            raise InvalidArgument(f"logit_bias[{t}]", f"must be in [-100, 100], got {b}")
    after, opener = thinking_of(req, tokenizer)
    budget = req.thinking_token_budget if req.HasField("thinking_token_budget") else None
    if budget is not None and budget < 0:
        raise InvalidArgument("thinking_token_budget", f"must be >= 0, got {budget}")
    bad_words = _bad_words(req, tokenizer, limits)
    sampling = SamplingParams(
        temperature=temperature,
        top_p=top_p,
        top_k=top_k,
        seed=req.seed if req.HasField("seed") else None,
        max_tokens=max_tokens,
        ignore_eos=req.ignore_eos,
        stop_token_ids=tuple(req.stop_token_ids),
        min_p=min_p,
        repetition_penalty=rep,
        presence_penalty=_opt(req, "presence_penalty", 0.0),
        frequency_penalty=_opt(req, "frequency_penalty", 0.0),
        logprobs=logprobs,
        logit_bias=tuple(sorted(req.logit_bias.items())),
        min_tokens=min_tokens,
        prompt_logprobs=prompt_logprobs,
        allowed_token_ids=tuple(sorted(set(req.allowed_token_ids))),
        grammar=grammar_of(req, tokenizer),
        grammar_after=after,
        grammar_free_opener=opener,
        priority=req.priority,
        bad_words=bad_words,
        thinking_budget=budget,
        adapter=_adapter(req.lora_adapter, adapters),
    )
    if len(req.cache_salt) > MAX_SALT_CHARS:
        raise InvalidArgument("cache_salt", f"must be at most {MAX_SALT_CHARS} characters, got {len(req.cache_salt)}")
    skip = req.skip_special_tokens if req.HasField("skip_special_tokens") else True
    salt = f"lora:{req.lora_adapter}\n{req.cache_salt}" if req.lora_adapter else req.cache_salt  # KV of its own
    return ValidRequest(rid, prompt_ids, sampling, tuple(req.stop), key, salt, req.include_stop_str_in_output, skip)


def _adapter(name: str, adapters: tuple[str, ...]) -> str:
    if name and name not in adapters:
        served = ", ".join(adapters) or "none: model.lora_adapters is empty"
        raise InvalidArgument("lora_adapter", f"{name!r} is not a LoRA adapter served here ({served})")
    return name


def _opt(req: pb.GenerateRequest, name: str, default: float) -> float:
    v = float(getattr(req, name)) if req.HasField(name) else default
    if not math.isfinite(v):
        raise InvalidArgument(name, f"must be a finite number, got {v}")
    return v


def _truncate(req: pb.GenerateRequest, ids: list[int], limits: LimitsConfig, max_model_len: int) -> list[int]:
    """truncate_prompt_tokens: the prompt's last N tokens; -1: as many as fit beside max_tokens (or
    limits.default_max_tokens) in the context and limits.max_prompt_tokens."""
    if not req.HasField("truncate_prompt_tokens"):
        return ids
    keep = req.truncate_prompt_tokens
    if keep == -1:
        room = req.max_tokens if req.HasField("max_tokens") and req.max_tokens > 0 else limits.default_max_tokens
        keep = max(1, min(limits.max_prompt_tokens, max_model_len - room))
    elif keep < 1:
        raise InvalidArgument("truncate_prompt_tokens", f"must be >= 1 (the prompt's last N tokens) or -1 "
                                                        f"(as many as fit), got {keep}")
    return ids[-keep:]


def _tokenize(req: pb.GenerateRequest, tokenizer) -> list[int]:  # type: ignore[no-untyped-def]
    if sum(map(bool, (req.prompt, req.messages, req.prompt_token_ids))) > 1:
        raise InvalidArgument("prompt", "give one of prompt, messages or prompt_token_ids")
    if req.prompt_token_ids:
        vocab = len(tokenizer)
        for i, t in enumerate(req.prompt_token_ids):
            if t >= vocab:
                raise InvalidArgument(f"prompt_token_ids[{i}]", f"{t} is outside the vocabulary (size {vocab})")
        return list(req.prompt_token_ids)
    if req.tools and not req.messages:
        raise InvalidArgument("tools", "need messages (a chat template renders them)")
    if req.messages:
        return chat_prompt_ids(req, tokenizer)
    if not req.prompt:
        raise InvalidArgument("prompt", "must not be empty (or give messages)")
    ids = tokenizer(req.prompt)["input_ids"]
    if not ids:
        raise InvalidArgument("prompt", "tokenizes to zero tokens")
    return list(ids)


def _bad_words(req: pb.GenerateRequest, tokenizer: Any, limits: LimitsConfig) -> tuple[tuple[int, ...], ...]:
    """`req.bad_words` as token sequences: each word as given and with one leading space (how it
    reads mid-sentence), as vLLM tokenizes them."""
    if len(req.bad_words) > limits.max_bad_words:
        raise InvalidArgument("bad_words", f"at most {limits.max_bad_words} words, got {len(req.bad_words)}")
    seqs: list[tuple[int, ...]] = []
    for i, word in enumerate(req.bad_words):
        if not word.strip():
            raise InvalidArgument(f"bad_words[{i}]", "must not be empty or only whitespace")
        for text in (word, " " + word.lstrip()):
            ids = tuple(tokenizer.encode(text, add_special_tokens=False))
            if len(ids) > MAX_BAD_WORD_TOKENS:
                raise InvalidArgument(f"bad_words[{i}]", f"must be at most {MAX_BAD_WORD_TOKENS} tokens, got {len(ids)}")
            if ids and ids not in seqs:
                seqs.append(ids)
    return tuple(seqs)


# -- locating bad UTF-8 in the raw wire bytes (protobuf only says "bad UTF-8") -------------------
_STRING_FIELDS = {1: "request_id", 2: "prompt", 9: "stop", 18: "cache_salt", 32: "bad_words"}
_LISTS = (9, 32)  # repeated: named with their index
_MESSAGE_FIELDS = {3: "messages"}
_CHAT_FIELDS = {1: "role", 2: "content"}


def _find_bad_utf8(raw: bytes) -> str | None:
    counts: dict[int, int] = {}
    for num, payload in _length_delimited(raw):
        idx = counts.get(num, 0)
        counts[num] = idx + 1
        if num in _STRING_FIELDS and not _is_utf8(payload):
            name = _STRING_FIELDS[num]
            return f"{name}[{idx}]" if num in _LISTS else name
        if num in _MESSAGE_FIELDS:
            for sub, sub_payload in _length_delimited(payload):
                if sub in _CHAT_FIELDS and not _is_utf8(sub_payload):
                    return f"messages[{idx}].{_CHAT_FIELDS[sub]}"
    return None


def _is_utf8(b: bytes) -> bool:
    try:
        b.decode("utf-8")
        return True
    except UnicodeDecodeError:
        return False


def _length_delimited(buf: bytes):  # type: ignore[no-untyped-def]
    """Yield (field number, payload) of every length-delimited field; stop at anything malformed."""
    i = 0
    while i < len(buf):
        key, i = _varint(buf, i)
        if key is None:
            return
        num, wire = key >> 3, key & 7
        if wire == 0:
            _, i = _varint(buf, i)
        elif wire == 1:
            i += 8
        elif wire == 5:
            i += 4
        elif wire == 2:
            length, i = _varint(buf, i)
            if length is None or i + length > len(buf):
                return
            yield num, buf[i : i + length]
            i += length
        else:
            return
        if i is None:
            return


def _varint(buf: bytes, i: int) -> tuple[int | None, int]:
    shift = result = 0
    while i < len(buf):
        b = buf[i]
        i += 1
        result |= (b & 0x7F) << shift
        if not b & 0x80:
            return result, i
        shift += 7
    return None, i
