"""The JSON bodies the server accepts, as OpenAI and vLLM define them; pydantic refuses wrongly typed fields.

A field the server does not implement (best_of, suffix, tools, ...) is refused by name rather than ignored, so a
client never believes it got what it asked for; `user`, OpenAI's metadata about the caller, is accepted and unused.
"""

from typing import Any

from pydantic import BaseModel, ConfigDict, StrictBool, StrictFloat, StrictInt, StrictStr


class StreamOptions(BaseModel):
    """`stream_options` of a streamed request: include_usage ends the stream with a usage chunk (choices: [])."""

    model_config = ConfigDict(extra="forbid")
    include_usage: StrictBool = False


class GenerationBody(BaseModel):
    """What completions and chat completions share: the model, sampling, stop conditions, n choices and streaming
    (top_k, seed and stop_token_ids are vLLM's)."""

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
    user: StrictStr | None = None


class CompletionBody(GenerationBody):
    """POST /v1/completions, as OpenAI and vLLM accept it; echo puts the prompt text before each completion."""

    prompt: str | list[StrictInt] | list[str] | list[list[StrictInt]]
    max_tokens: StrictInt = 16
    echo: StrictBool = False


class ChatBody(GenerationBody):
    """POST /v1/chat/completions, as OpenAI and vLLM accept it: messages rendered with the model's chat template.

    max_completion_tokens is OpenAI's newer name for max_tokens; without either, a reply may fill the context.
    add_generation_prompt (vLLM's) opens the assistant's turn at the end of the prompt.
    """

    messages: list[dict[str, Any]]
    max_tokens: StrictInt | None = None
    max_completion_tokens: StrictInt | None = None
    add_generation_prompt: StrictBool = True


class LoadBody(BaseModel):
    """POST /v1/load_lora_adapter (vLLM's body)."""

    lora_name: str
    lora_path: str


class UnloadBody(BaseModel):
    """POST /v1/unload_lora_adapter (vLLM's body)."""

    lora_name: str
