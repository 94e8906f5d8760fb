"""The user-facing Engine: a base model on a mesh, a strategy, an adapter pool, and jitted scoring."""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from functools import partial
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np

from ..adapters.adapter import LoraAdapter
from ..adapters.bank import BankLayout
from ..adapters.compressed import CompressedServing
from ..adapters.linear import resolve_lora_impl
from ..adapters.peft_io import read_adapter
from ..adapters.sources import check_adapter_name
from ..chat_template import ChatTemplate, load_chat_template
from ..checkpoint import load_hf_params, load_model_config, load_tokenizer
from ..config import EngineConfig, ModelConfig
from ..demo import DEMO_MODEL, is_demo_model, resolve_model_path
from ..distributed import to_host
from ..errors import (
    AdapterConflictError,
    AdapterNotFoundError,
    AdapterNotRemovableError,
    ContextLengthError,
    InvalidRequestError,
)
from ..mesh import make_mesh
from ..model.llama import forward
from ..sharding import make_plan
from .adapter_pool import AdapterPool
from .generator import Completion, Generator, Request, adapter_batch
from .paged_generator import PagedGenerator
from .sampler import SamplingParams


class Engine:
    """Serve one base model with many adapters; rows of a batch may each use a different adapter.

    Adapters come from the pool (registered PEFT adapters, `max_loras` of them in device slots) or from a
    compressed bank placed once at start-up (never in a pool slot); both are named alike and mix in a batch.
    chat_template: the model's chat template (tokenizer_config.json), which chat requests are rendered with.
    """

    def __init__(self, model_config: ModelConfig, params, engine_config: EngineConfig, tokenizer=None, plan=None,
                 compressed: CompressedServing | None = None, chat_template: ChatTemplate | None = None):
        self.model_config = model_config
        self.config = engine_config
        self.plan = plan or make_plan(make_mesh(engine_config.mesh), engine_config.strategy, model_config,
                                      engine_config.max_lora_rank)
        self.graphdef, self.state = params
        self.tokenizer = tokenizer
        self.chat_template = chat_template
        layout = BankLayout.for_plan(model_config, self.plan, engine_config.max_loras, engine_config.max_lora_rank,
                                     engine_config.dtype)
        self.pool = AdapterPool(layout, self.plan)
        self.compressed = compressed
        self._forward = jax.jit(partial(forward, self.graphdef))
        self._generator: Generator | None = None

    @classmethod
    def from_pretrained(
        cls,
        path: str | Path,
        mesh: str = "1x1",
        strategy: str = "bdlora",
        max_loras: int = 8,
        max_lora_rank: int = 16,
        max_batch: int = 16,
        max_seq_len: int = 512,
        dtype: str = "float32",
        lora_impl: str = "auto",
        compressed_bank: str | Path | None = None,
        **paging,
    ) -> Engine:
        """Load a HF Llama directory (or "demo": the small Llama shipped in the package) onto a "DxM" mesh.

        compressed_bank: a compressed-bank directory (bdlora_jax.compress) whose adapters are served by name;
        paging: EngineConfig's kv_cache, page_size, num_pages and max_num_batched_tokens.
        """
        config = EngineConfig(mesh=mesh, strategy=strategy, max_loras=max_loras, max_lora_rank=max_lora_rank,
                              max_batch=max_batch, max_seq_len=max_seq_len, dtype=dtype, lora_impl=lora_impl,
                              **paging)
        demo = is_demo_model(path)
        path = resolve_model_path(path)
        model_config, tokenizer = load_model_config(path), load_tokenizer(path)
        if demo:
            model_config = dataclasses.replace(model_config, name=DEMO_MODEL)
        plan = make_plan(make_mesh(mesh), strategy, model_config, max_lora_rank)
        compressed = None
        if compressed_bank is not None:
            compressed = CompressedServing.from_directory(compressed_bank, model_config, plan, dtype)
        model_lora_impl = resolve_lora_impl(lora_impl, plan.mesh.devices.flat[0].platform)
        params = load_hf_params(path, model_config, plan, jnp.dtype(dtype), lora_impl=model_lora_impl)
        return cls(model_config, params, config, tokenizer, plan, compressed, load_chat_template(path))

    @property
    def adapters(self) -> list[str]:
        """Every adapter name served: registered ones and those of the compressed bank."""
        return sorted([*self.pool.adapters, *(self.compressed.names if self.compressed is not None else ())])

    def has_adapter(self, name: str) -> bool:
        """Whether requests may name this adapter (registered, or in the compressed bank)."""
        return name in self.pool.adapters or (self.compressed is not None and name in self.compressed)

    def add_adapter(self, name: str, path_or_adapter: str | Path | LoraAdapter) -> None:
        """Register a PEFT LoRA / BD-LoRA adapter; a bad one raises and leaves the engine as it was.

        The name must be 1..256 characters of printable UTF-8 (InvalidRequestError otherwise).
        """
        check_adapter_name(name)
        if self.compressed is not None and name in self.compressed:
            source = path_or_adapter.name if isinstance(path_or_adapter, LoraAdapter) else str(path_or_adapter)
            raise AdapterConflictError(name, f"adapter name {name!r} (from {source}) clashes with the adapter "
                                             f"{name!r} of the compressed bank {self.compressed.where}; "
                                             "choose another name")
        if isinstance(path_or_adapter, LoraAdapter):
            self.pool.register(name, path_or_adapter)
        else:
            self.pool.register(name, read_adapter(path_or_adapter, self.model_config, name=name), source=path_or_adapter)

    def remove_adapter(self, name: str) -> None:
        """Unregister a pool adapter; compressed-bank adapters are served for the engine's lifetime."""
        if self.compressed is not None and name in self.compressed:
            raise AdapterNotRemovableError(name, f"adapter {name!r} belongs to the compressed bank "
                                                 f"{self.compressed.where}, which is placed once at start-up; "
                                                 "its adapters cannot be removed")
        self.pool.unregister(name)

    def adapter_identity(self, name: str | None) -> str:
        """What makes an adapter's KV its own: its name and registration (a re-registered name is another adapter);
        the compressed bank's adapters never change; None is the base model."""
        if name is None:
            return "base"
        if name in self.pool.adapters:
            return f"lora:{self.pool.registration[name]}:{name}"
        return f"compressed:{name}"

    def resolve(self, names: Sequence[str | None]) -> tuple[list[int], list[int], list[int]]:
        """(bank slot, cluster, Σ id) of each row's adapter: pool adapters take a slot (loaded if needed),
        compressed ones a (cluster, Σ id) pair; None and the other kind get 0."""
        names = list(names)
        for name in names:
            if name is not None and not self.has_adapter(name):
                raise AdapterNotFoundError(name)
        if self.compressed is None:
            return self.pool.slots_for(names), [0] * len(names), [0] * len(names)
        slots = self.pool.slots_for([None if name in self.compressed else name for name in names])
        return (slots, *self.compressed.rows(names))

    @property
    def compressed_arrays(self) -> dict | None:
        """The compressed bank's device arrays (None without one), passed to every jitted step."""
        return self.compressed.arrays if self.compressed is not None else None

    def batch_logits(self, sequences: Sequence[Sequence[int]], adapters: Sequence[str | None]) -> list[np.ndarray]:
        """Float32 logits (len, vocab) for each sequence, all rows in one batch, each with its own adapter."""
        if len(sequences) != len(adapters):
            raise InvalidRequestError("adapters", f"{len(sequences)} sequences but {len(adapters)} adapters")
        lengths = [len(s) for s in sequences]
        if min(lengths, default=0) < 1:
            raise InvalidRequestError("sequences", "every sequence needs at least one token")
        if max(lengths) > self.config.max_seq_len:
            raise InvalidRequestError("sequences", f"sequence of {max(lengths)} tokens exceeds "
                                                   f"max_seq_len={self.config.max_seq_len}")
        for seq in sequences:
            bad = [t for t in seq if not 0 <= int(t) < self.model_config.vocab_size]
            if bad:
                raise InvalidRequestError("sequences", f"token id {bad[0]} is outside the vocabulary "
                                                       f"[0, {self.model_config.vocab_size})")
        ids = self.resolve(adapters)
        rows = -(-len(sequences) // self.plan.data_size) * self.plan.data_size
        tokens = np.zeros((rows, max(lengths)), np.int32)
        for i, seq in enumerate(sequences):
            tokens[i, :len(seq)] = seq
        slot_ids, clusters, sigma_ids = (np.zeros((rows,), np.int32) for _ in range(3))
        for array, values in zip((slot_ids, clusters, sigma_ids), ids):
            array[:len(values)] = values
        logits, _ = self._forward(
            self.state, jnp.asarray(tokens), jnp.zeros((rows,), jnp.int32), None,
            adapter_batch(self.pool.bank, self.compressed_arrays, jnp.asarray(slot_ids), jnp.asarray(clusters),
                          jnp.asarray(sigma_ids)),
        )
        logits = to_host(logits).astype(np.float32)
        return [logits[i, :n] for i, n in enumerate(lengths)]

    def logits(self, token_ids: Sequence[int], adapter: str | None = None) -> np.ndarray:
        """Float32 logits (len(token_ids), vocab) of one sequence under one adapter (None = base model)."""
        return self.batch_logits([list(token_ids)], [adapter])[0]

    @property
    def generator(self) -> Generator:
        """The decode state of max_batch rows (allocated on first use); Engine.generate and the Scheduler drive it."""
        if self._generator is None:
            self._generator = PagedGenerator(self) if self.config.kv_cache == "paged" else Generator(self)
        return self._generator

    def _prompt_ids(self, prompt: str | Sequence[int]) -> list[int]:
        """Token ids of a prompt given as text (needs a tokenizer) or as ids (checked against the vocabulary)."""
        if isinstance(prompt, str):
            if self.tokenizer is None:
                raise InvalidRequestError("prompt", "this model has no tokenizer.json: pass prompts as token ids")
            ids = self.tokenizer.encode(prompt).ids
        else:
            ids = [int(t) for t in prompt]
        if not ids:
            raise InvalidRequestError("prompt", "empty prompt")
        bad = [t for t in ids if not 0 <= t < self.model_config.vocab_size]
        if bad:
            raise InvalidRequestError("prompt", f"token id {bad[0]} is outside the vocabulary "
                                                f"[0, {self.model_config.vocab_size})")
        return ids

    def generate(
        self,
        prompts: Sequence[str | Sequence[int]],
        adapters: Sequence[str | None] | None = None,
        max_tokens: int = 16,
        temperature: float = 0.0,
        top_p: float = 1.0,
        top_k: int = 0,
        seed: int | None = None,
        stop: Sequence[str] = (),
        stop_token_ids: Sequence[int] = (),
        logit_bias: dict[int, float] | None = None,
        presence_penalty: float = 0.0,
        frequency_penalty: float = 0.0,
        repetition_penalty: float = 1.0,
        logprobs: int | None = None,
        ignore_eos: bool = False,
        min_tokens: int = 0,
    ) -> list[Completion]:
        """Complete every prompt (continuous batching over max_batch rows), each under its own adapter; a completion
        ends at the model's EOS unless ignore_eos (see SamplingParams for the sampling arguments).

        For offline use: it drives the generator itself, so do not call it while a Scheduler is serving.
        """
        adapters = list(adapters) if adapters is not None else [None] * len(prompts)
        if len(adapters) != len(prompts):
            raise InvalidRequestError("adapters", f"{len(prompts)} prompts but {len(adapters)} adapters")
        params = SamplingParams(temperature=temperature, top_p=top_p, top_k=top_k, seed=seed, max_tokens=max_tokens,
                                stop=tuple(stop), stop_token_ids=tuple(stop_token_ids),
                                logit_bias=tuple((logit_bias or {}).items()), presence_penalty=presence_penalty,
                                frequency_penalty=frequency_penalty, repetition_penalty=repetition_penalty,
                                logprobs=logprobs, ignore_eos=ignore_eos, min_tokens=min_tokens)
        params.validate(self.model_config.vocab_size)
        requests = []
        for prompt, adapter in zip(prompts, adapters):
            ids = self._prompt_ids(prompt)
            if len(ids) + max_tokens > self.config.max_seq_len:
                raise ContextLengthError(len(ids), max_tokens, self.config.max_seq_len,
                                         f"prompt of {len(ids)} tokens + max_tokens={max_tokens} exceeds "
                                         f"max_seq_len={self.config.max_seq_len}")
            if adapter is not None and not self.has_adapter(adapter):
                raise AdapterNotFoundError(adapter)
            requests.append(Request(ids, adapter, params))
        done = self.generator.run(requests)
        decode = self.tokenizer.decode if self.tokenizer is not None else None
        return [Completion(r.output, decode(r.output) if decode else None, r.finish_reason,
                           r.logprobs if logprobs is not None else None) for r in done]
