"""The server's request and response bodies: the OpenAI API's fields that a plain server honours, plus
the `align_decode` extension field.

Requests are validated here for their shape and types only (pydantic); what a method's options mean is
checked by the method's own declaration (`decoding.options`) when the request is prepared (`worker`).
Fields of the OpenAI API that would change the output and that this server cannot honour
(`frequency_penalty`, `presence_penalty`, `logit_bias`, `logprobs`, tools, ...) are refused when set to
anything but their neutral value; fields that change nothing (`user`, `metadata`, `store`, ...) are
ignored.
"""

from __future__ import annotations

from typing import Any, Literal, Union

from pydantic import BaseModel, ConfigDict, Field

# Fields an OpenAI client may send that this server cannot honour: their neutral values.
UNSUPPORTED_NEUTRAL: dict[str, tuple] = {
    "frequency_penalty": (None, 0, 0.0),
    "presence_penalty": (None, 0, 0.0),
    "logit_bias": (None, {}),
    "logprobs": (None, False),
    "top_logprobs": (None, 0),
    "echo": (None, False),
    "best_of": (None, 1),
    "suffix": (None, ""),
    "tools": (None, []),
    "tool_choice": (None, "none"),
    "functions": (None, []),
    "function_call": (None, "none"),
    "response_format": (None, {"type": "text"}),
    "prediction": (None,),
    "audio": (None,),
    "modalities": (None, ["text"]),
}


class ContentPart(BaseModel):
    model_config = ConfigDict(extra="allow")
    type: str
    text: str | None = None


class Message(BaseModel):
    model_config = ConfigDict(extra="allow")
    role: str
    content: Union[str, list[ContentPart], None] = None

    def text(self) -> str:
        """The message's text; image or audio parts are refused."""
        if self.content is None:
            return ""
        if isinstance(self.content, str):
            return self.content
        parts = []
        for part in self.content:
            if part.type != "text" or part.text is None:
                raise ValueError(f"messages: only text content parts are supported, got a {part.type!r} part")
            parts.append(part.text)
        return "".join(parts)


class StreamOptions(BaseModel):
    model_config = ConfigDict(extra="ignore")
    include_usage: bool = False


class _Sampling(BaseModel):
    """What both endpoints share: the sampling parameters and the extension field."""

    model_config = ConfigDict(extra="allow")  # extras are checked against UNSUPPORTED_NEUTRAL, else ignored

    model: str
    max_tokens: int | None = Field(None, ge=1)
    temperature: float | None = Field(None, ge=0)
    top_p: float | None = Field(None, gt=0, le=1)
    # Not in OpenAI's API; vLLM's OpenAI server takes them the same way (top-level extra body fields).
    top_k: int | None = Field(None, ge=0)
    min_p: float | None = Field(None, ge=0, le=1)
    n: int = Field(1, ge=1)
    seed: int | None = None
    stop: Union[str, list[str], None] = None
    stream: bool = False
    stream_options: StreamOptions | None = None
    user: str | None = None
    # The extension: {"method": ..., method options ..., "rewards": ..., "report": bool, "timeout": s}.
    align_decode: dict[str, Any] | None = None

    def stop_strings(self) -> list[str]:
        if self.stop is None:
            return []
        stops = [self.stop] if isinstance(self.stop, str) else list(self.stop)
        if any(not s for s in stops):
            raise ValueError("stop strings must not be empty")
        return stops

    def refused_fields(self) -> list[str]:
        """Fields set to a value this server would not honour."""
        extra = self.model_extra or {}
        return [f"{k}={v!r}" for k, v in extra.items() if k in UNSUPPORTED_NEUTRAL and v not in UNSUPPORTED_NEUTRAL[k]]


class ChatCompletionRequest(_Sampling):
    messages: list[Message] = Field(min_length=1)
    max_completion_tokens: int | None = Field(None, ge=1)


class CompletionRequest(_Sampling):
    prompt: Union[str, list[str]]


# ------------------------------------------------------------------------------------------ responses
class Usage(BaseModel):
    prompt_tokens: int
    completion_tokens: int
    total_tokens: int


class ChatMessage(BaseModel):
    role: Literal["assistant"] = "assistant"
    content: str


class ChatChoice(BaseModel):
    index: int
    message: ChatMessage
    finish_reason: Literal["stop", "length"]
    logprobs: None = None


class CompletionChoice(BaseModel):
    index: int
    text: str
    finish_reason: Literal["stop", "length"]
    logprobs: None = None


class _Answer(BaseModel):
    """What both completion responses carry besides their choices."""

    id: str
    created: int
    model: str
    usage: Usage
    # What the method did: only when the request asked for it (align_decode.report = true).
    align_decode: dict[str, Any] | None = None


class ChatCompletion(_Answer):
    object: Literal["chat.completion"] = "chat.completion"
    choices: list[ChatChoice]


class Completion(_Answer):
    object: Literal["text_completion"] = "text_completion"
    choices: list[CompletionChoice]


class ModelCard(BaseModel):
    id: str
    object: Literal["model"] = "model"
    created: int
    owned_by: str = "align-decode"


class ModelList(BaseModel):
    object: Literal["list"] = "list"
    data: list[ModelCard]
