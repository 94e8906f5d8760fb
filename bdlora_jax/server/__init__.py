"""The OpenAI-compatible HTTP server (FastAPI) over the multi-adapter engine: an app factory and its routes.

Handlers validate, enqueue a request for the scheduler thread and await its tokens; the scheduler thread
is the only code that touches the device. `model` in a request names the base model or an adapter, as
in vLLM. Bad input gets a 4xx with an OpenAI error body and never disturbs other requests.
"""

from .app import create_app
from .body_limit import MAX_BODY_BYTES

__all__ = ["MAX_BODY_BYTES", "create_app"]
