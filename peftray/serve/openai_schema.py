"""Request bodies of the OpenAI routes (pydantic, unknown fields refused with a 400 naming them).

Supported (as vLLM's and OpenAI's servers take them): completions with a string, a list of strings, token ids
or lists of token ids, `n`, `seed`, `logprobs` (<= 5), `echo`, `stop` (<= 4), penalties; chat with `n`,
`logprobs` + `top_logprobs`, `max_completion_tokens`, `response_format` (json_object, json_schema), `tools` +
`tool_choice`, `stream_options.include_usage`. Anything else (`suffix`, `best_of`, `logit_bias`, ...) is a 400.
"""

from __future__ import annotations

import json
from typing import Any, Literal, Optional, Union

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid")


class StreamOptions(_Strict):
    include_usage: bool = False


class _Common(_Strict):
    model: str = Field(..., min_length=1)
    max_tokens: Optional[int] = Field(None, ge=1)
    temperature: float = Field(1.0, ge=0.0, le=2.0)
    top_p: float = Field(1.0, gt=0.0, le=1.0)
    stop: Optional[Union[str, list[str]]] = None
    seed: Optional[int] = None
    n: int = Field(1, ge=1, le=16, description="choices per prompt; with `seed`, choice i uses seed + i")
    stream: bool = False
    stream_options: Optional[StreamOptions] = None
    user: Optional[str] = None
    presence_penalty: float = Field(0.0, ge=-2.0, le=2.0)
    frequency_penalty: float = Field(0.0, ge=-2.0, le=2.0)

    @model_validator(mode="after")
    def _stops(self):
        if len(self.stops()) > 4:
            raise ValueError(f"stop may hold at most 4 sequences, got {len(self.stops())}")
        return self

    def stops(self) -> list[str]:
        return [self.stop] if isinstance(self.stop, str) else list(self.stop or [])

    def top_logprobs_count(self) -> Optional[int]:
        return None

    def params(self, default_max_tokens: int, choice: int) -> dict[str, Any]:
        """The engine's SamplingParams of choice `choice` (its own seed, so n choices differ reproducibly)."""
        return {"max_tokens": self.max_tokens or default_max_tokens, "temperature": self.temperature,
                "top_p": self.top_p, "stop": [s for s in self.stops() if s],
                "seed": None if self.seed is None else self.seed + choice, "presence_penalty": self.presence_penalty,
                "frequency_penalty": self.frequency_penalty, "logprobs": self.top_logprobs_count()}


class CompletionRequest(_Common):
    prompt: Union[str, list[str], list[int], list[list[int]]] = Field(
        ..., description="text, a list of texts, token ids, or a list of token-id lists (one choice each)")
    echo: bool = Field(False, description="put the prompt in front of the completion")
    logprobs: Optional[int] = Field(None, ge=0, le=5, description="logprobs of the chosen and the k likeliest tokens")
    suffix: Optional[str] = Field(None, description="not supported (refused)")

    @model_validator(mode="after")
    def _check(self):
        if self.suffix:
            raise ValueError("`suffix` (insertion) is not supported by this server; leave it unset")
        if isinstance(self.prompt, list) and not self.prompt:
            raise ValueError("`prompt` is an empty list; send at least one prompt")
        if self.echo and self.logprobs is not None:
            raise ValueError("`echo` with `logprobs` (logprobs of the prompt) is not supported; drop one of them")
        return self

    def prompts(self) -> list[Union[str, list[int]]]:
        p = self.prompt
        if isinstance(p, str) or (p and isinstance(p[0], int)):
            return [p]
        return list(p)

    def top_logprobs_count(self) -> Optional[int]:
        return self.logprobs


class FunctionDef(_Strict):
    name: str = Field(..., pattern=r"^[A-Za-z0-9_-]{1,64}$")
    description: Optional[str] = None
    parameters: Optional[dict[str, Any]] = None
    strict: Optional[bool] = None


class Tool(_Strict):
    type: Literal["function"]
    function: FunctionDef


class NamedFunction(_Strict):
    name: str


class ToolChoice(_Strict):
    type: Literal["function"]
    function: NamedFunction


class JsonSchemaFormat(_Strict):
    name: str = Field(..., pattern=r"^[A-Za-z0-9_-]{1,64}$")
    description: Optional[str] = None
    schema_: dict[str, Any] = Field(default_factory=lambda: {"type": "object"}, alias="schema")
    strict: Optional[bool] = None


class ResponseFormat(_Strict):
    type: Literal["text", "json_object", "json_schema"]
    json_schema: Optional[JsonSchemaFormat] = None

    @model_validator(mode="after")
    def _check(self):
        if self.type == "json_schema" and self.json_schema is None:
            raise ValueError('`response_format.json_schema` is required when type is "json_schema"')
        return self


class ChatMessage(_Strict):
    role: Literal["system", "user", "assistant", "developer", "tool"]
    content: Optional[Union[str, list[dict[str, Any]]]] = None
    name: Optional[str] = None
    tool_calls: Optional[list[dict[str, Any]]] = None
    tool_call_id: Optional[str] = None

    def plain(self) -> dict[str, Any]:
        """The message for the chat template: text content; an assistant's tool calls also as JSON text, so a
        template that knows nothing of tools still shows the model what it called."""
        c = self.content
        text = c if isinstance(c, str) else "".join(p.get("text", "") for p in c or [] if p.get("type") == "text")
        out: dict[str, Any] = {"role": "system" if self.role == "developer" else self.role, "content": text}
        if self.tool_calls:
            out["tool_calls"] = self.tool_calls
            out["content"] = text or json.dumps([tc.get("function", tc) for tc in self.tool_calls])
        if self.tool_call_id:
            out["tool_call_id"] = self.tool_call_id
        return out


class ChatRequest(_Common):
    messages: list[ChatMessage] = Field(..., min_length=1)
    max_completion_tokens: Optional[int] = Field(None, ge=1)
    logprobs: bool = False
    top_logprobs: Optional[int] = Field(None, ge=0, le=20)
    response_format: Optional[ResponseFormat] = None
    tools: Optional[list[Tool]] = Field(None, min_length=1)
    tool_choice: Optional[Union[Literal["none", "auto", "required"], ToolChoice]] = None
    parallel_tool_calls: Optional[bool] = Field(None, description="at most one call is made per choice")

    @model_validator(mode="after")
    def _check(self):
        if self.top_logprobs is not None and not self.logprobs:
            raise ValueError("`top_logprobs` needs `logprobs: true`")
        if self.tool_choice not in (None, "none") and not self.tools:
            raise ValueError("`tool_choice` needs `tools`")
        if self.schema() is not None and self.tool_schema() is not None:
            raise ValueError("`response_format` and a forced `tool_choice` cannot be combined; choose one")
        return self

    def top_logprobs_count(self) -> Optional[int]:
        return (self.top_logprobs or 0) if self.logprobs else None

    def params(self, default_max_tokens: int, choice: int) -> dict[str, Any]:
        out = super().params(default_max_tokens, choice)
        out["max_tokens"] = self.max_completion_tokens or self.max_tokens or default_max_tokens
        return out

    def schema(self) -> Optional[dict[str, Any]]:
        """The JSON schema of `response_format` (json_object: any object), or None for text."""
        rf = self.response_format
        if rf is None or rf.type == "text":
            return None
        return {"type": "object"} if rf.type == "json_object" else rf.json_schema.schema_

    def tool_schema(self) -> Optional[dict[str, Any]]:
        from peftray.serve.grammar import tool_schema

        tools = [t.model_dump() for t in self.tools or []]
        choice = self.tool_choice.model_dump() if isinstance(self.tool_choice, ToolChoice) else self.tool_choice
        return tool_schema(tools, choice)

    def template_tools(self) -> Optional[list[dict[str, Any]]]:
        if not self.tools or self.tool_choice == "none":
            return None
        return [t.model_dump(exclude_none=True) for t in self.tools]


class ImageRequest(_Strict):
    """`POST /v1/images/generations` (OpenAI's Images API) plus the diffusers fields a client sends in `extra_body`."""

    model: str = Field(..., min_length=1)
    prompt: str = Field(..., min_length=1)
    n: int = Field(1, ge=1, le=10, description="images; with `seed`, all from one generator, as diffusers' "
                                               "num_images_per_prompt")
    size: Optional[str] = Field(None, description='"WxH"; one of the deployment\'s image_sizes (default: the first)')
    response_format: Literal["b64_json", "url"] = Field("b64_json", description="url is refused: nothing is stored")
    user: Optional[str] = None
    seed: Optional[int] = Field(None, ge=0, description="the same seed gives the same images")
    num_inference_steps: int = Field(50, ge=1, le=500)
    guidance_scale: float = Field(7.5, ge=0.0, le=100.0, description="classifier-free guidance; <= 1 turns it off")
    negative_prompt: Optional[str] = None

    def params(self) -> dict[str, Any]:
        """The engine's ImageParams fields (size still as text: the replica checks it against its pipeline)."""
        return {"prompt": self.prompt, "n": self.n, "size": self.size, "steps": self.num_inference_steps,
                "guidance_scale": self.guidance_scale, "negative_prompt": self.negative_prompt, "seed": self.seed}


class ClassifyRequest(_Strict):
    """`POST /v1/classify`: texts on a seq_cls deployment, base64 images (or data: URIs) on an image_cls one."""

    model: str = Field(..., min_length=1)
    input: Union[str, list[str]] = Field(..., description="a text or image, or a list of them (one result each)")
    top_k: Optional[int] = Field(None, ge=1, description="labels per input in `scores`, best first (default: all)")
    user: Optional[str] = None

    @field_validator("input")
    @classmethod
    def _some_input(cls, value):
        if isinstance(value, list) and not value:
            raise ValueError("`input` is an empty list; send at least one text or image")
        return value

    def inputs(self) -> list[str]:
        return [self.input] if isinstance(self.input, str) else list(self.input)
