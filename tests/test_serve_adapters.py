"""Adapter loading through the HTTP server, hardened: paths confined to --lora-root (symlinks resolved), name and
path-text rules, total validation of adapter_config.json and the tensors, an adapter broken on disk after
start-up failing alone, and no compilation after warm-up for any load, accepted or refused.

Every refusal is checked for its status and OpenAI error body (naming the field, tensor or file), for leaving
/v1/models as it was, and for a good load and request that still succeed with their usual output afterwards.
One module-scoped Engine (demo model, mesh 1x2, bdlora, the options of test_serve_api so that the persistent
compilation cache serves its warm-up) is driven by its Scheduler thread as the server runs it,
with an API key and --lora-root; nothing in this module compiles after its warm-up.
"""

from __future__ import annotations

import asyncio
import json
import shutil
import threading
import time
from pathlib import Path

import httpx
import numpy as np
import pytest
from helpers import running_scheduler
from prometheus_client.parser import text_string_to_metric_families
from safetensors.numpy import load_file, save_file

from bdlora_jax import Engine
from bdlora_jax.adapters.peft_config import MAX_CONFIG_BYTES
from bdlora_jax.adapters.peft_io import CONFIG_FILE, WEIGHTS_FILE, tensor_key, write_adapter
from bdlora_jax.adapters.synthetic import random_adapter
from bdlora_jax.demo import demo_adapters
from bdlora_jax.engine.scheduler import Scheduler
from bdlora_jax.server import create_app

pytestmark = pytest.mark.xdist_group("serve_adapters")  # one worker builds the module's served engine once

ENGINE_OPTS = dict(mesh="1x2", strategy="bdlora", max_loras=2, max_lora_rank=16, max_batch=4, max_seq_len=128)
MAX_RANK = ENGINE_OPTS["max_lora_rank"]
SERVED = "demo"
API_KEY = "adapters-key"
AUTH = {"authorization": f"Bearer {API_KEY}"}
NEIGHBOUR = min(demo_adapters())
PROMPT = "Hello adapters"


# ---------------------------------------------------------------------------------------------- fixtures


@pytest.fixture(scope="module")
def dirs(tmp_path_factory) -> dict[str, Path]:
    """The --lora-root, a directory outside it, and the start-up adapter that tests break on disk."""
    return {"root": tmp_path_factory.mktemp("lora_root"), "outside": tmp_path_factory.mktemp("outside"),
            "startup": tmp_path_factory.mktemp("startup")}


@pytest.fixture(scope="module")
def served(dirs):
    """Engine + Scheduler with a demo adapter and a path-registered start-up adapter ("victim"), warmed up."""
    engine = Engine.from_pretrained("demo", **ENGINE_OPTS)
    engine.add_adapter(NEIGHBOUR, demo_adapters()[NEIGHBOUR])
    victim = write_adapter(random_adapter(engine.model_config, "victim", rank=4, seed=5), dirs["startup"] / "victim")
    engine.add_adapter("victim", victim)
    with running_scheduler(engine) as served:
        yield served


@pytest.fixture(scope="module")
def app(served, dirs):
    return create_app(*served, SERVED, api_key=API_KEY, lora_root=dirs["root"])


@pytest.fixture(scope="module")
def good_dir(engine, dirs) -> Path:
    """A dense rank-4 adapter inside the root, loaded as "good" after every refusal."""
    return write_adapter(random_adapter(engine.model_config, "good", rank=4, seed=1), dirs["root"] / "good")


@pytest.fixture(scope="module")
def usual(app, good_dir) -> dict[str, str]:
    """Greedy text of the base model, the start-up adapters and "good", before any test disturbs the server."""
    assert load(app, "good", good_dir).status_code == 200
    texts = {model: greedy_text(app, model) for model in (SERVED, NEIGHBOUR, "victim", "good")}
    assert unload(app, "good").status_code == 200
    return texts


# ---------------------------------------------------------------------------------------------- helpers


def client(app) -> httpx.AsyncClient:
    return httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://serve.test", timeout=120,
                             headers=AUTH)


def call(app, method: str, path: str, **kwargs) -> httpx.Response:
    async def go():
        async with client(app) as c:
            return await c.request(method, path, **kwargs)

    return asyncio.run(go())


def post_raw(app, path: str, text: str) -> httpx.Response:
    """POST a JSON body written by hand (for escapes such as a lone surrogate that json.dumps cannot produce)."""
    return call(app, "POST", path, content=text.encode(), headers={"content-type": "application/json"})


def load(app, name: str, path) -> httpx.Response:
    return call(app, "POST", "/v1/load_lora_adapter", json={"lora_name": name, "lora_path": str(path)})


def unload(app, name: str) -> httpx.Response:
    return call(app, "POST", "/v1/unload_lora_adapter", json={"lora_name": name})


def completion_body(model: str) -> dict:
    return {"model": model, "prompt": PROMPT, "max_tokens": 4, "temperature": 0}


def greedy_text(app, model: str) -> str:
    response = call(app, "POST", "/v1/completions", json=completion_body(model))
    assert response.status_code == 200, response.text
    return response.json()["choices"][0]["text"]


def model_ids(app) -> list[str]:
    response = call(app, "GET", "/v1/models")
    assert response.status_code == 200, response.text
    return [card["id"] for card in response.json()["data"]]


def assert_error(response: httpx.Response, status: int, *needles: str, code: str | None = None) -> dict:
    """The status, and an OpenAI error body {"error": {"message", "type", "code"}} whose message has every needle."""
    assert response.status_code == status, response.text
    body = response.json()
    assert set(body) == {"error"} and set(body["error"]) == {"message", "type", "code"}, body
    error = body["error"]
    assert isinstance(error["message"], str) and isinstance(error["type"], str) and error["type"], body
    for needle in needles:
        assert needle in error["message"], f"{needle!r} not in {error['message']!r}"
    if code is not None:
        assert error["code"] == code, body
    return error


def assert_still_serving(app, usual: dict[str, str], good_dir: Path, models_before: list[str]) -> None:
    """Nothing was registered, and a good load and requests still succeed with their usual output."""
    assert model_ids(app) == models_before
    assert load(app, "good", good_dir).status_code == 200
    assert greedy_text(app, "good") == usual["good"]
    assert greedy_text(app, SERVED) == usual[SERVED]
    assert unload(app, "good").status_code == 200


def copy_good(good_dir: Path, where: Path) -> Path:
    """A fresh copy of the good adapter to break."""
    shutil.rmtree(where, ignore_errors=True)
    return Path(shutil.copytree(good_dir, where))


def compilations_after_warmup(app) -> float:
    response = call(app, "GET", "/metrics")
    assert response.status_code == 200
    samples = {s.name: s.value for family in text_string_to_metric_families(response.text) for s in family.samples}
    return samples["bdlora_compilations_after_warmup"]


# ---------------------------------------------------------------------------------------------- paths


@pytest.mark.parametrize("linked", [CONFIG_FILE, WEIGHTS_FILE])
def test_symlinked_file_outside_root_is_forbidden(app, dirs, good_dir, usual, linked):
    outside = copy_good(good_dir, dirs["outside"] / f"real-{linked}")
    inside = dirs["root"] / f"links-{linked}"
    inside.mkdir()
    for file in (CONFIG_FILE, WEIGHTS_FILE):
        if file == linked:
            (inside / file).symlink_to(outside / file)
        else:
            shutil.copy(outside / file, inside / file)
    before = model_ids(app)
    error = assert_error(load(app, "escape", inside), 403, str(inside / linked), str(outside / linked),
                         str(dirs["root"]), code="forbidden_path")
    assert error["type"] == "permission_error"
    assert_still_serving(app, usual, good_dir, before)


def test_symlink_inside_root_is_followed(app, dirs, good_dir, usual):
    """A symlink whose target stays under the root is fine."""
    inside = dirs["root"] / "inner-links"
    inside.mkdir()
    for file in (CONFIG_FILE, WEIGHTS_FILE):
        (inside / file).symlink_to(good_dir / file)
    assert load(app, "inner", inside).status_code == 200
    assert greedy_text(app, "inner") == usual["good"]
    assert unload(app, "inner").status_code == 200


@pytest.mark.parametrize(
    "path, needles",
    [
        ("{root}/good\\u0000x", ["lora_path", "NUL"]),
        ("/" + "a/" * 2100, ["lora_path", "4096"]),
        ("{root}/" + "b" * 300, ["lora_path", "255"]),
        ("", ["lora_path", "empty"]),
        ("{root}/\\ud800", ["lora_path", "surrogate"]),
    ],
    ids=["nul", "long_path", "long_component", "empty", "surrogate"],
)
def test_bad_path_text_is_refused_before_the_filesystem(app, dirs, good_dir, usual, monkeypatch, path, needles):
    import bdlora_jax.server.adapters as route

    def untouchable(*args, **kwargs):
        raise AssertionError("the filesystem was touched")

    before = model_ids(app)
    monkeypatch.setattr(route, "Path", untouchable)
    monkeypatch.setattr(route, "read_adapter", untouchable)
    body = '{"lora_name": "pathy", "lora_path": "' + path.replace("{root}", str(dirs["root"])) + '"}'
    assert_error(post_raw(app, "/v1/load_lora_adapter", body), 400, *needles)
    monkeypatch.undo()
    assert_still_serving(app, usual, good_dir, before)


# ---------------------------------------------------------------------------------------------- names


@pytest.mark.parametrize(
    "name, needles",
    [
        ("", ["lora_name", "empty"]),
        ("n" * 257, ["lora_name", "257", "256"]),
        ("\\ud800", ["lora_name", "surrogate"]),
        ("a\\udc00b", ["lora_name", "surrogate"]),
        ("bell\\u0007", ["lora_name", "control"]),
        ("line\\nbreak", ["lora_name", "control"]),
    ],
    ids=["empty", "too_long", "lone_high_surrogate", "lone_low_surrogate", "bell", "newline"],
)
def test_bad_names_are_refused(app, good_dir, usual, name, needles):
    before = model_ids(app)
    body = '{"lora_name": "' + name + '", "lora_path": ' + json.dumps(str(good_dir)) + "}"
    assert_error(post_raw(app, "/v1/load_lora_adapter", body), 400, *needles)
    assert_still_serving(app, usual, good_dir, before)


def test_longest_name_is_accepted(app, good_dir, usual):
    name = "é" * 256
    assert load(app, name, good_dir).status_code == 200
    assert name in model_ids(app)
    assert greedy_text(app, name) == usual["good"]
    assert unload(app, name).status_code == 200


def test_empty_model_names_nothing(app):
    assert_error(call(app, "POST", "/v1/completions", json=completion_body("")), 404, code="model_not_found")


# ---------------------------------------------------------------------------------------------- validation


def _edit_config(path: Path, **changes) -> None:
    config = json.loads((path / CONFIG_FILE).read_text())
    config.update(changes)
    (path / CONFIG_FILE).write_text(json.dumps(config))


def _replace_in_config(path: Path, old: str, new: str) -> None:
    text = (path / CONFIG_FILE).read_text()
    assert old in text
    (path / CONFIG_FILE).write_text(text.replace(old, new, 1))


def _int8_tensor(path: Path) -> None:
    tensors = load_file(str(path / WEIGHTS_FILE))
    name = tensor_key(1, "v_proj", "A")
    tensors[name] = np.ones_like(tensors[name], dtype=np.int8)
    save_file(tensors, str(path / WEIGHTS_FILE))


def _extra_tensor(path: Path) -> None:
    tensors = load_file(str(path / WEIGHTS_FILE))
    tensors["base_model.model.lm_head.weight"] = np.zeros((4, 4), np.float32)
    save_file(tensors, str(path / WEIGHTS_FILE))


ALPHA_FIELD = '"lora_alpha": 8.0'  # as write_adapter writes the good adapter's alpha (2 · rank 4)
BREAKAGES = {
    "nested_100000": (lambda p: _replace_in_config(p, ALPHA_FIELD, '"deep": ' + "[" * 100_000 + "]" * 100_000 + ", "
                                                   + ALPHA_FIELD), [CONFIG_FILE, "nested too deeply"]),
    "oversized": (lambda p: _edit_config(p, padding="x" * MAX_CONFIG_BYTES), [CONFIG_FILE, str(MAX_CONFIG_BYTES)]),
    "alpha_400_digits": (lambda p: _replace_in_config(p, ALPHA_FIELD, '"lora_alpha": ' + "9" * 400),
                         [CONFIG_FILE, "lora_alpha"]),
    "alpha_nan": (lambda p: _replace_in_config(p, ALPHA_FIELD, '"lora_alpha": NaN'), [CONFIG_FILE, "lora_alpha"]),
    "alpha_infinity": (lambda p: _replace_in_config(p, ALPHA_FIELD, '"lora_alpha": Infinity'),
                       [CONFIG_FILE, "lora_alpha"]),
    "alpha_1e308": (lambda p: _edit_config(p, lora_alpha=1e308), [CONFIG_FILE, "lora_alpha"]),
    "alpha_string": (lambda p: _edit_config(p, lora_alpha="8"), [CONFIG_FILE, "lora_alpha"]),
    "target_modules_5": (lambda p: _edit_config(p, target_modules=5), [CONFIG_FILE, "target_modules"]),
    "target_modules_regex": (lambda p: _edit_config(p, target_modules="("),
                             [CONFIG_FILE, "target_modules", "regular expression"]),
    "target_modules_mixed": (lambda p: _edit_config(p, target_modules=["q_proj", 3]), [CONFIG_FILE, "target_modules"]),
    "bd_a_not_names": (lambda p: _edit_config(p, use_bdlora={"nblocks": 2, "target_modules_bd_a": [1]}),
                       [CONFIG_FILE, "use_bdlora.target_modules_bd_a"]),
    "use_rslora_string": (lambda p: _edit_config(p, use_rslora="yes"), [CONFIG_FILE, "use_rslora"]),
    "config_is_list": (lambda p: (p / CONFIG_FILE).write_text("[1, 2]"), [CONFIG_FILE, "JSON object"]),
    "int8_tensor": (_int8_tensor, [WEIGHTS_FILE, tensor_key(1, "v_proj", "A"), "I8", "floating-point"]),
    "extra_tensor": (_extra_tensor, [WEIGHTS_FILE, "lm_head"]),
}


@pytest.mark.parametrize("breakage", list(BREAKAGES))
def test_invalid_adapters_are_refused(app, dirs, good_dir, usual, breakage):
    edit, needles = BREAKAGES[breakage]
    bad = copy_good(good_dir, dirs["root"] / f"bad-{breakage}")
    edit(bad)
    before = model_ids(app)
    assert_error(load(app, "bad", bad), 400, *needles, code="invalid_adapter")
    assert_still_serving(app, usual, good_dir, before)


def test_negative_alpha_is_allowed(app, dirs, good_dir, usual):
    """PEFT allows a negative lora_alpha (it flips the update), so the server does too."""
    negative = copy_good(good_dir, dirs["root"] / "negative")
    _edit_config(negative, lora_alpha=-8.0)
    assert load(app, "negative", negative).status_code == 200
    assert isinstance(greedy_text(app, "negative"), str)
    assert unload(app, "negative").status_code == 200


# ---------------------------------------------------------------------------------------------- isolation


def _hold(scheduler: Scheduler) -> threading.Event:
    """Park the scheduler thread in a command until the returned event is set (requests pile up meanwhile)."""
    gate, parked = threading.Event(), threading.Event()

    def wait():
        parked.set()
        gate.wait(60)

    scheduler.call(wait)
    assert parked.wait(60)
    return gate


async def _victim_and_neighbour(app, scheduler: Scheduler) -> tuple[httpx.Response, httpx.Response]:
    """Both requests submitted while the scheduler is held, so they enter the same step."""
    gate = await asyncio.to_thread(_hold, scheduler)
    async with client(app) as c:
        tasks = [asyncio.create_task(c.post("/v1/completions", json=completion_body(model)))
                 for model in ("victim", NEIGHBOUR)]
        deadline = time.monotonic() + 60
        while scheduler.counts()[1] < 2 and time.monotonic() < deadline:
            await asyncio.sleep(0.01)
        gate.set()
        victim, neighbour = await asyncio.gather(*tasks)
    return victim, neighbour


def test_startup_adapter_broken_on_disk_fails_alone(app, engine, scheduler, dirs, good_dir, usual):
    victim = dirs["startup"] / "victim"
    good_config = (victim / CONFIG_FILE).read_text()
    assert load(app, "good", good_dir).status_code == 200
    for model in (NEIGHBOUR, "good"):  # the two slots go to others, so the victim's next request reads its files
        greedy_text(app, model)
    assert unload(app, "good").status_code == 200
    assert "victim" not in engine.pool.resident
    for broken in (5, "("):
        _edit_config(victim, target_modules=broken)
        failed, neighbour = asyncio.run(_victim_and_neighbour(app, scheduler))
        assert_error(failed, 400, "victim", CONFIG_FILE, "target_modules", code="invalid_adapter")
        assert neighbour.status_code == 200, neighbour.text
        assert neighbour.json()["choices"][0]["text"] == usual[NEIGHBOUR]
        assert "victim" in model_ids(app) and "victim" not in engine.pool.resident
    (victim / CONFIG_FILE).write_text(good_config)
    assert greedy_text(app, "victim") == usual["victim"]


# ---------------------------------------------------------------------------------------------- compilations


def _write(engine: Engine, root: Path, name: str, rank: int, nblocks: int = 1, dtype=np.float32) -> Path:
    path = write_adapter(random_adapter(engine.model_config, name, rank=rank, nblocks=nblocks, seed=rank), root / name)
    if dtype != np.float32:
        tensors = {k: v.astype(dtype) for k, v in load_file(str(path / WEIGHTS_FILE)).items()}
        save_file(tensors, str(path / WEIGHTS_FILE))
    return path


def test_no_compilation_after_warmup_for_any_load(app, engine, dirs, good_dir):
    """Dense ranks up to what bdlora on 2 devices serves (max_lora_rank / 2), BD-LoRA ranks up to max_lora_rank,
    f16 tensors, and refused adapters: loading, generating and unloading compile nothing."""
    root = dirs["root"] / "ranks"
    accepted = {f"dense-r{r}": _write(engine, root, f"dense-r{r}", r) for r in (1, 2, 4, 8)}
    accepted |= {f"bd-r{r}": _write(engine, root, f"bd-r{r}", r, nblocks=2) for r in (2, 4, 8, MAX_RANK)}
    accepted["f16"] = _write(engine, root, "f16", 4, dtype=np.float16)
    refused = {
        "too-big": _write(engine, root, "too-big", 2 * MAX_RANK, nblocks=2),
        "dense-too-big": _write(engine, root, "dense-too-big", MAX_RANK),
        "int8": copy_good(good_dir, root / "int8"),
        "extra": copy_good(good_dir, root / "extra"),
        "bad-config": copy_good(good_dir, root / "bad-config"),
    }
    _int8_tensor(refused["int8"])
    _extra_tensor(refused["extra"])
    _edit_config(refused["bad-config"], target_modules="(")
    assert compilations_after_warmup(app) == 0
    for name, path in refused.items():
        assert_error(load(app, name, path), 400, code="invalid_adapter")
    texts = {}
    for name, path in accepted.items():
        assert load(app, name, path).status_code == 200, name
        texts[name] = greedy_text(app, name)
    assert engine.pool.evictions > 0  # slots were rewritten with adapters of every rank
    for name in accepted:
        assert unload(app, name).status_code == 200
    assert len(set(texts.values())) > 1
    assert compilations_after_warmup(app) == 0
