"""The JSON bodies the server accepts, as OpenAI and vLLM define them; pydantic refuses wrongly typed fields."""

from collections.abc import Callable
from typing import Annotated

from pydantic import AfterValidator, BaseModel, ConfigDict, StrictBool, StrictFloat, StrictInt
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


class CompletionBody(BaseModel):
    """POST /v1/completions, as OpenAI and vLLM accept it (top_k, seed and stop_token_ids are vLLM's)."""

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


class LoadBody(BaseModel):
    """POST /v1/load_lora_adapter (vLLM's body); the name and the path text are checked before the filesystem."""

    lora_name: AdapterName
    lora_path: AdapterPath


class UnloadBody(BaseModel):
    """POST /v1/unload_lora_adapter (vLLM's body)."""

    lora_name: AdapterName
