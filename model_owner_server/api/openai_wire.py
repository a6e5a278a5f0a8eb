"""OpenAI's wire format on /openai/v1: the request schemas and the error shape `{"error": {message, type,
param, code}}` (OpenAIRoute turns every error on these routes into it, and only there)."""

from __future__ import annotations

import logging
from collections.abc import Callable, Coroutine, Mapping
from http import HTTPStatus
from typing import Any, Literal

from fastapi import Request, Response
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from fastapi.routing import APIRoute
from pydantic import BaseModel as Schema
from pydantic import ConfigDict, Field, field_validator
from starlette.exceptions import HTTPException as StarletteHTTPException

from model_owner_server import crud
from model_owner_server.api.errors import ApiError

log = logging.getLogger("scaleot.openai")

_TYPES = {
    401: "authentication_error",
    403: "permission_error",
    429: "rate_limit_error",
    500: "server_error",
    503: "server_error",
}
# Harmless OpenAI parameters accepted and ignored; any other unknown one with a non-empty value is refused.
_IGNORED = frozenset(
    {
        "user",
        "metadata",
        "store",
        "service_tier",
        "frequency_penalty",
        "presence_penalty",
        "parallel_tool_calls",
    }
)


class OpenAIError(Exception):
    def __init__(
        self,
        status: int,
        message: str,
        *,
        param: str | None = None,
        code: str,
        headers: Mapping[str, str] | None = None,
    ):
        super().__init__(message)
        self.status, self.message, self.param, self.code, self.headers = status, message, param, code, headers

    def body(self) -> dict[str, Any]:
        return {
            "error": {
                "message": self.message,
                "type": _TYPES.get(self.status, "invalid_request_error"),
                "param": self.param,
                "code": self.code,
            }
        }

    def response(self) -> JSONResponse:
        return JSONResponse(self.body(), status_code=self.status, headers=self.headers)


def _from_validation(exc: RequestValidationError) -> OpenAIError:
    """Pydantic's errors as OpenAI's 400, naming the first offending top-level parameter."""
    problems, param = [], None
    for err in exc.errors()[:5]:
        loc = [str(p) for p in err.get("loc", ()) if p != "body"]
        param = param or (loc[0] if loc else None)
        msg = "the request body is not valid JSON" if err.get("type") == "json_invalid" else err.get("msg", "invalid")
        problems.append(f"{'.'.join(loc) or 'body'}: {msg}" if loc else msg)
    return OpenAIError(400, "invalid request: " + "; ".join(problems), param=param, code="invalid_value")


class OpenAIRoute(APIRoute):
    """Turns every error of these routes (auth, lookup, validation, overload) into OpenAI's error shape."""

    def get_route_handler(self) -> Callable[[Request], Coroutine[Any, Any, Response]]:
        handler = super().get_route_handler()

        async def handle(request: Request) -> Response:
            try:
                return await handler(request)
            except OpenAIError as exc:
                return exc.response()
            except ApiError as exc:
                return OpenAIError(exc.status, exc.message, code=exc.code, headers=exc.headers).response()
            except crud.NotFound as exc:
                return OpenAIError(
                    404,
                    f"{exc}; GET /openai/v1/models lists the adapters you can use",
                    param="model",
                    code="model_not_found",
                ).response()
            except RequestValidationError as exc:
                return _from_validation(exc).response()
            except StarletteHTTPException as exc:  # e.g. FastAPI's 400 for a body that is not UTF-8
                code = HTTPStatus(exc.status_code).phrase.lower().replace(" ", "_")
                return OpenAIError(exc.status_code, str(exc.detail), code=code, headers=exc.headers).response()
            except Exception:
                log.exception("unhandled error in %s", request.url.path)
                return OpenAIError(
                    500, "internal server error; the server log has details", code="internal_error"
                ).response()

        return handle


# ---------------------------------------------------------------- requests


class StreamOptions(Schema):
    include_usage: bool = False


class _Common(Schema):
    model_config = ConfigDict(extra="allow")
    model: str = Field(max_length=200, description="an adapter id (GET /openai/v1/models)")
    max_tokens: int | None = Field(
        default=None,
        ge=0,
        description="default: the server's cap or the room left in the context, whichever is smaller; "
        "0 only with echo (the prompt's log-probabilities, nothing generated)",
    )
    temperature: float | None = Field(default=None, ge=0, le=2, allow_inf_nan=False, description="0: greedy; default 1")
    top_p: float | None = Field(default=None, gt=0, le=1, allow_inf_nan=False, description="default 1")
    stop: str | list[str] | None = Field(default=None, description="up to 4 strings that end the text")
    seed: int | None = Field(default=None, ge=-(2**63), le=2**64 - 1, description="same seed, same request: same text")
    n: int = Field(default=1, description="only 1")
    stream: bool = False
    stream_options: StreamOptions | None = None

    @field_validator("n")
    @classmethod
    def _one_choice(cls, v: int) -> int:
        if v != 1:
            raise ValueError("only n=1 is supported here; send n requests (with different seeds) for n choices")
        return v

    @field_validator("stop")
    @classmethod
    def _stops(cls, v: str | list[str] | None) -> list[str] | None:
        stops = [v] if isinstance(v, str) else v
        if stops is not None and (len(stops) > 4 or not all(0 < len(s) <= 200 for s in stops)):
            raise ValueError("stop takes up to 4 non-empty strings of at most 200 characters")
        return stops

    def unsupported(self) -> OpenAIError | None:
        for key, value in (self.model_extra or {}).items():
            if key not in _IGNORED and value not in (None, False, 0, "", [], {}):
                return OpenAIError(
                    400,
                    f"parameter {key!r} is not supported by this server; leave it out",
                    param=key,
                    code="unsupported_parameter",
                )
        return None


class TextPart(Schema):
    type: Literal["text"]
    text: str


class ChatMessage(Schema):
    model_config = ConfigDict(extra="allow")
    role: Literal["system", "developer", "user", "assistant"]
    content: str | list[TextPart] | None = None

    def as_template_input(self) -> dict[str, str]:
        text = self.content if isinstance(self.content, str) else "".join(p.text for p in self.content or [])
        return {"role": "system" if self.role == "developer" else self.role, "content": text}


MAX_LOGPROBS = 5  # completions' `logprobs`, as OpenAI's legacy API caps it
MAX_TOP_LOGPROBS = 20  # chat's `top_logprobs`, as OpenAI caps it
MAX_PROMPTS = 64  # prompts in one completion request (each is a choice; together they hold one engine slot)


class ChatRequest(_Common):
    messages: list[ChatMessage] = Field(min_length=1, max_length=1000)
    max_completion_tokens: int | None = Field(default=None, ge=1, description="the newer name of max_tokens")
    logprobs: bool = Field(default=False, description="each generated token's log-probability in choice.logprobs")
    top_logprobs: int | None = Field(
        default=None, ge=0, le=MAX_TOP_LOGPROBS, description="with logprobs: the k most likely tokens at each position"
    )

    def logprobs_k(self) -> int | None:
        """Top-k to score, or None when no log-probabilities are asked for."""
        if self.top_logprobs is not None and not self.logprobs:
            raise OpenAIError(400, "top_logprobs needs logprobs: true", param="top_logprobs", code="invalid_value")
        return (self.top_logprobs or 0) if self.logprobs else None


Prompt = str | list[int]


class CompletionRequest(_Common):
    prompt: str | list[str] | list[int] | list[list[int]] = Field(
        description=f"a string, a list of strings, a list of token ids or a list of token-id lists (at most "
        f"{MAX_PROMPTS} prompts; each is one choice, in order)"
    )
    logprobs: int | None = Field(
        default=None,
        ge=0,
        le=MAX_LOGPROBS,
        description="the log-probability of each token and of the k most likely tokens at each position",
    )
    echo: bool = Field(
        default=False,
        description="return the prompt before the completion (and, with "
        "logprobs, the prompt tokens' log-probabilities)",
    )

    @field_validator("prompt")
    @classmethod
    def _prompts(cls, v: str | list[str] | list[int] | list[list[int]]) -> list[Prompt]:
        if isinstance(v, str) or (v and isinstance(v[0], int)):
            prompts: list[Prompt] = [v]  # one string or one token-id list
        else:
            prompts = list(v)  # type: ignore[arg-type]
        if not 1 <= len(prompts) <= MAX_PROMPTS:
            raise ValueError(f"send 1 to {MAX_PROMPTS} prompts per request")
        if any(isinstance(p, list) and (not p or min(p) < 0) for p in prompts):
            raise ValueError("a token-id prompt is a non-empty list of token ids (integers from 0)")
        return prompts

    def prompts(self) -> list[Prompt]:
        return self.prompt  # type: ignore[return-value]  # normalized by _prompts
