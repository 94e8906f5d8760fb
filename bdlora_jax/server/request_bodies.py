"""The JSON bodies the server accepts, as OpenAI and vLLM define them; pydantic refuses wrongly typed fields."""

from pydantic import BaseModel, ConfigDict, StrictBool, StrictFloat, StrictInt


class CompletionBody(BaseModel):
    """POST /v1/completions, as OpenAI and vLLM accept it (top_k, seed, stop_token_ids, repetition_penalty,
    ignore_eos and min_tokens are vLLM's)."""

    model_config = ConfigDict(extra="ignore")
    model: str
    prompt: str | list[StrictInt] | list[str] | list[list[StrictInt]]
    max_tokens: StrictInt = 16
    temperature: StrictFloat | StrictInt = 1.0
    top_p: StrictFloat | StrictInt = 1.0
    top_k: StrictInt = 0
    seed: StrictInt | None = None
    stop: str | list[str] | None = None
    stop_token_ids: list[StrictInt] | None = None
    stream: StrictBool = False
    n: StrictInt = 1
    logit_bias: dict[str, StrictFloat | StrictInt] | None = None
    presence_penalty: StrictFloat | StrictInt = 0.0
    frequency_penalty: StrictFloat | StrictInt = 0.0
    repetition_penalty: StrictFloat | StrictInt = 1.0
    logprobs: StrictInt | None = None
    ignore_eos: StrictBool = False
    min_tokens: StrictInt = 0


class LoadBody(BaseModel):
    """POST /v1/load_lora_adapter (vLLM's body)."""

    lora_name: str
    lora_path: str


class UnloadBody(BaseModel):
    """POST /v1/unload_lora_adapter (vLLM's body)."""

    lora_name: str
