"""The `server:` and `limits:` sections of the YAML (owned by the router)."""
from __future__ import annotations

from typing import Literal

from pydantic import Field, model_validator

from engine.config import Frozen


class TLSConfig(Frozen):
    cert_file: str = Field(description="PEM certificate (chain) of the server, for gRPC and HTTP.")
    key_file: str = Field(description="PEM private key of that certificate.")
    client_ca_file: str | None = Field(
        None, description="PEM CA bundle: set, clients must present a certificate it signed (mTLS)."
    )


class AuthConfig(Frozen):
    tokens_file: str = Field(
        description="Accepted bearer tokens, one per line; a line 'sha256:<hex>' holds a token's SHA-256 "
        "instead of the token. Empty lines and lines starting with # are skipped."
    )
    open_health: bool = Field(
        True, description="gRPC health, reflection, GET /health and the HTTP front's /metrics answer without a "
        "token (false: they need one too)."
    )


class ServerConfig(Frozen):
    host: str = Field("127.0.0.1", description="Listen address of the gRPC and HTTP fronts.")
    port: int = Field(50051, ge=0, le=65535, description="gRPC port (0 = pick a free one).")
    http_port: int | None = Field(
        8000, ge=0, le=65535, description="OpenAI-compatible HTTP port (0 = pick a free one, null = off)."
    )
    served_model_name: str | None = Field(
        None, description="The `model` the HTTP API answers to (default: the model.path's last part)."
    )
    metrics_port: int = Field(0, ge=0, le=65535, description="Prometheus /metrics port (0 = off; no TLS, no auth: "
                              "bind it where only your scraper reaches; the HTTP front serves /metrics too).")
    max_body_bytes: int = Field(
        1 << 20, ge=1024, description="Largest request: HTTP body and gRPC message (bytes)."
    )
    max_streams_per_connection: int = Field(
        128, ge=1, description="Most concurrent gRPC streams on one connection (HTTP/1.1 has one per connection)."
    )
    tool_call_parser: Literal["hermes", "llama3_json", "mistral", "granite", "pythonic", "qwen3_coder", "glm45",
                              "deepseek_v3", "kimi_k2", "harmony"] | None = Field(
        None, description="How both fronts read tool calls out of a chat answer when tool_choice is \"auto\" "
        "(the default when a request has tools; gRPC answers carry them in parsed.tool_calls): hermes = <tool_call>{\"name\", \"arguments\"}</tool_call> blocks "
        "(Hermes 2 Pro / 3, Qwen 2.5 / 3); llama3_json = an answer that is {\"name\", \"parameters\"} objects, "
        "maybe after <|python_tag|> (Llama 3.1 and later); mistral = [TOOL_CALLS] then the calls (Mistral, Devstral); "
        "granite = <|tool_call|> then a JSON list of calls (Granite 3.x); "
        "pythonic = an answer that is a Python list of calls, [f(a=1)] (Llama 3.2, Llama 4); qwen3_coder = "
        "<tool_call> blocks of <function=f><parameter=a>1</parameter></function> (Qwen3-Coder); glm45 = "
        "<tool_call>f<arg_key>a</arg_key><arg_value>1</arg_value></tool_call> (GLM-4.5, 4.6); deepseek_v3 = "
        "<｜tool▁calls▁begin｜> sections (DeepSeek V3, R1, V3.1); kimi_k2 = <|tool_calls_section_begin|> sections "
        "(Kimi K2); harmony = gpt-oss's commentary messages to=functions.NAME (needs reasoning_parser: harmony; "
        "\"required\" and a named function are refused with it). null: \"auto\" is refused (HTTP 400, gRPC INVALID_ARGUMENT; unset on gRPC means \"none\"); "
        "a named function, \"required\" and \"none\" need no parser."
    )
    reasoning_parser: Literal["think", "harmony"] | None = Field(
        None, description="Split a reasoning model's thinking out of chat answers: think = the <think> ... </think> "
        "block DeepSeek R1 and Qwen 3 write (or their template opens in the prompt) goes to the message's reasoning "
        "(and reasoning_content; gRPC: parsed.reasoning), the rest to content; harmony = gpt-oss's channels: "
        "analysis is reasoning, final (and commentary preambles) content. null: answers are content as written."
    )
    tls: TLSConfig | None = Field(None, description="Serve both fronts over TLS (and mTLS with client_ca_file).")
    auth: AuthConfig | None = Field(None, description="Require a bearer token on both fronts.")
    grace_period_s: float = Field(
        5.0, ge=0, description="On SIGTERM/SIGINT: health turns NOT_SERVING and new requests get UNAVAILABLE at "
        "once; requests in flight may finish for this long, then end with UNAVAILABLE."
    )

    @model_validator(mode="after")
    def _harmony_both(self) -> ServerConfig:
        if self.tool_call_parser == "harmony" and self.reasoning_parser != "harmony":
            raise ValueError("server.tool_call_parser: harmony reads gpt-oss's channels, so it needs "
                             "server.reasoning_parser: harmony")
        return self


class LimitsConfig(Frozen):
    max_prompt_tokens: int = Field(1536, ge=1, description="Longest accepted prompt (tokens).")
    max_new_tokens: int = Field(1024, ge=1, description="Largest accepted max_tokens.")
    default_max_tokens: int = Field(128, ge=1, description="max_tokens when the request omits it.")
    max_concurrent_requests: int = Field(
        256, ge=1, description="Requests in flight at once; beyond it RESOURCE_EXHAUSTED."
    )
    max_queued_requests: int = Field(
        64, ge=0, description="Requests waiting for KV room (FIFO); beyond it RESOURCE_EXHAUSTED at once."
    )
    queue_timeout_s: float = Field(
        30.0, ge=0, description="Longest wait for KV room before RESOURCE_EXHAUSTED."
    )
    request_timeout_s: float = Field(300.0, gt=0, description="Deadline of one request inside pdserve.")
    max_migrations: int = Field(
        1, ge=0, description="Times one request may move to another decode worker (or the same one, restarted) "
        "when its decode worker is lost mid-stream: its KV is recomputed there from the prompt and the tokens "
        "streamed so far and the stream goes on; it waits up to queue_timeout_s for one. 0: the request fails "
        "(UNAVAILABLE)."
    )
    max_stop_strings: int = Field(16, ge=0, description="Most stop strings per request.")
    max_logit_bias: int = Field(300, ge=0, description="Most logit_bias entries (token ids) per request.")
    max_bad_words: int = Field(64, ge=0, description="Most bad_words per request.")
    max_choices: int = Field(
        64, ge=1, description="Most choices one OpenAI request may ask for (n × the prompts of a /v1/completions "
        "batch); each choice is a request of its own (its own KV, counted in max_concurrent_requests)."
    )
