"""One `bench load` run: every work item sent at its arrival offset (at most max_concurrency in flight), a
progress bar over completed requests, and the whole run bounded by max_duration."""

from __future__ import annotations

import asyncio
import time
from dataclasses import dataclass

import httpx
from tqdm import tqdm

from .load_client import send_request
from .load_metrics import RequestRecord
from .load_workload import WorkItem


@dataclass(frozen=True)
class LoadPlan:
    """What one run sends: the items, each one's model and send offset (s), and the bounds it runs under."""

    base_url: str
    items: list[WorkItem]
    models: list[str]
    offsets: list[float]
    max_concurrency: int | None
    timeout: float
    max_duration: float | None
    ignore_eos: bool = True
    progress: bool = True


async def _run(plan: LoadPlan) -> tuple[list[RequestRecord], float]:
    """The records of every request, in workload order, and the run's duration in seconds."""
    semaphore = asyncio.Semaphore(plan.max_concurrency) if plan.max_concurrency else None
    limits = httpx.Limits(max_connections=plan.max_concurrency or len(plan.items), max_keepalive_connections=None)
    bar = tqdm(total=len(plan.items), desc="requests", disable=not plan.progress, leave=False)
    async with httpx.AsyncClient(timeout=httpx.Timeout(plan.timeout), limits=limits) as client:
        start = time.perf_counter()

        async def one(item: WorkItem, model: str, offset: float) -> RequestRecord:
            """Wait for the item's arrival time (and a concurrency slot), then send it."""
            await asyncio.sleep(max(0.0, start + offset - time.perf_counter()))
            if semaphore is None:
                record = await sent(item, model)
            else:
                async with semaphore:
                    record = await sent(item, model)
            bar.update(1)
            return record

        async def sent(item: WorkItem, model: str) -> RequestRecord:
            """Send one request now; its record says when, from the run's start."""
            sent_at = time.perf_counter() - start
            record = await send_request(client, plan.base_url, item, model, plan.ignore_eos, plan.timeout)
            record.sent_at = sent_at
            return record

        tasks = [asyncio.create_task(one(i, m, o)) for i, m, o in zip(plan.items, plan.models, plan.offsets)]
        _, pending = await asyncio.wait(tasks, timeout=plan.max_duration)
        for task in pending:
            task.cancel()
        await asyncio.gather(*pending, return_exceptions=True)
        duration = time.perf_counter() - start
    bar.close()
    stopped = f"stopped at --max-duration {plan.max_duration:g} s" if plan.max_duration else ""
    records = [task.result() if task not in pending else RequestRecord(model=model, error=stopped)
               for task, model in zip(tasks, plan.models)]
    return records, duration


def run_load(plan: LoadPlan) -> tuple[list[RequestRecord], float]:
    """Run a plan to the end (or to max_duration): (each request's record in workload order, duration in seconds)."""
    if len({len(plan.items), len(plan.models), len(plan.offsets)}) != 1:
        raise ValueError("a load plan needs one model and one offset per item")
    return asyncio.run(_run(plan))
