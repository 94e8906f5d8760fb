"""The JSON bodies the server accepts, as OpenAI and vLLM define them; pydantic refuses wrongly typed fields.

A field the server does not implement (best_of, suffix, tools, ...) is refused by name rather than ignored, so a
client never believes it got what it asked for; `user`, OpenAI's metadata about the caller, is accepted and unused.
"""

from collections.abc import Callable
from typing import Annotated, Any

from pydantic import AfterValidator, BaseModel, ConfigDict, StrictBool, StrictFloat, StrictInt, StrictStr
from pydantic_core import PydanticCustomError

from ..adapters.sources import check_adapter_name, check_path_text
from ..errors import InvalidRequestError


def _validator(check: Callable[[str], str]) -> AfterValidator:
    """A pydantic validator running check, whose refusal becomes the field's error with check's message alone."""

    def validate(value: str) -> str:
        try:
            return check(value)
        except InvalidRequestError as e:
            raise PydanticCustomError("invalid_value", e.message) from None

    return AfterValidator(validate)


# refused with a 400 naming the field before anything else happens: see bdlora_jax.adapters.sources
AdapterName = Annotated[str, _validator(check_adapter_name)]
AdapterPath = Annotated[str, _validator(check_path_text)]


class StreamOptions(BaseModel):
    """`stream_options` of a streamed request: include_usage ends the stream with a usage chunk (choices: [])."""

    model_config = ConfigDict(extra="forbid")
    include_usage: StrictBool = False


class GenerationBody(BaseModel):
    """What completions and chat completions share: the model, sampling, stop conditions, n choices and streaming
    (top_k, seed, stop_token_ids, repetition_penalty, ignore_eos and min_tokens are vLLM's)."""

    model_config = ConfigDict(extra="forbid")
    model: str
    temperature: StrictFloat | StrictInt = 1.0
    top_p: StrictFloat | StrictInt = 1.0
    top_k: StrictInt = 0
    seed: StrictInt | None = None
    stop: str | list[str] | None = None
    stop_token_ids: list[StrictInt] | None = None
    stream: StrictBool = False
    stream_options: StreamOptions | None = None
    n: StrictInt = 1
    logit_bias: dict[str, StrictFloat | StrictInt] | None = None
    presence_penalty: StrictFloat | StrictInt = 0.0
    frequency_penalty: StrictFloat | StrictInt = 0.0
    repetition_penalty: StrictFloat | StrictInt = 1.0
    ignore_eos: StrictBool = False
    min_tokens: StrictInt = 0
    user: StrictStr | None = None


class CompletionBody(GenerationBody):
    """POST /v1/completions, as OpenAI and vLLM accept it; echo puts the prompt text before each completion."""

    prompt: str | list[StrictInt] | list[str] | list[list[StrictInt]]
    max_tokens: StrictInt = 16
    echo: StrictBool = False
    logprobs: StrictInt | None = None


class ChatBody(GenerationBody):
    """POST /v1/chat/completions, as OpenAI and vLLM accept it: messages rendered with the model's chat template.

    max_completion_tokens is OpenAI's newer name for max_tokens; without either, a reply may fill the context.
    add_generation_prompt (vLLM's) opens the assistant's turn at the end of the prompt. logprobs=true reports each
    token's log-probability, with the top_logprobs most likely tokens at its position.
    """

    messages: list[dict[str, Any]]
    max_tokens: StrictInt | None = None
    max_completion_tokens: StrictInt | None = None
    add_generation_prompt: StrictBool = True
    logprobs: StrictBool = False
    top_logprobs: StrictInt | None = None


class LoadBody(BaseModel):
    """POST /v1/load_lora_adapter (vLLM's body); the name and the path text are checked before the filesystem."""

    lora_name: AdapterName
    lora_path: AdapterPath


class UnloadBody(BaseModel):
    """POST /v1/unload_lora_adapter (vLLM's body)."""

    lora_name: AdapterName
