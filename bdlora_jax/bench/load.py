"""`bench load`: serving latency and throughput under load, measured over HTTP against any OpenAI-compatible
server (in the style of `vllm bench serve`).

Requests arrive at random (Poisson, or gamma with --burstiness) at --request-rate, each for its own adapter
(--lora-modules with a random / round-robin / Zipf assignment; the request's `model` is the adapter name), with
random token-id prompts of --input-len tokens (or a --dataset), streamed from POST {base-url}/completions.
Per request it measures TTFT (time to the first streamed token), ITL (gaps between streamed chunks carrying
text), TPOT ((E2EL - TTFT) / (output tokens - 1)) and E2EL (end-to-end latency), all from when the request
was sent; the report gives throughputs and the mean / median / p90 / p99 of each, in ms. It sends only to
--base-url.

Random prompts ask for exactly max_tokens output tokens with vLLM's `ignore_eos: true` and `min_tokens`
(accepted by this project's server and by vLLM; --no-ignore-eos leaves them out for servers that refuse them).
--vocab-size bounds the random token ids: the default 256 suits the demo model (byte-level); set it to the
served model's vocabulary for others.
"""

from __future__ import annotations

import argparse
import json
import logging
import math
from pathlib import Path

import numpy as np

from .common import shared_options
from .load_client import first_model
from .load_metrics import parse_goodput, summarize
from .load_plot import plot_sweep
from .load_runner import LoadPlan, run_load
from .load_workload import ASSIGNMENTS, arrival_offsets, assign_adapters, random_workload, read_dataset

NAME = "load"
HELP = "latency and throughput under load against an OpenAI-compatible server (TTFT, TPOT, ITL, E2EL)"
OPTIONS = shared_options()
DEFAULT_BASE_URL = "http://127.0.0.1:8000/v1"


def float_list(text: str) -> list[float]:
    """A comma-separated list of numbers, "inf" allowed, e.g. "1,2,4,inf" (an argparse type)."""
    return [float(v) for v in text.split(",") if v]


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """The server, the workload (prompts, arrivals, adapters), its bounds and where the results go."""
    server = parser.add_argument_group("server")
    server.add_argument("--base-url", default=DEFAULT_BASE_URL,
                        help="the OpenAI-compatible API root requests go to (only there)")
    server.add_argument("--model", default=None,
                        help="the model of requests without an adapter (default: the first id of GET /models)")
    load = parser.add_argument_group("arrivals")
    load.add_argument("--num-prompts", type=int, default=100, help="requests to send")
    load.add_argument("--request-rate", type=float, default=math.inf,
                      help="mean requests/s (inf: all at once)")
    load.add_argument("--burstiness", type=float, default=1.0,
                      help="gamma shape of inter-arrival times (1: Poisson; <1 burstier, >1 more even)")
    load.add_argument("--max-concurrency", type=int, default=None, help="requests in flight at most (default: no cap)")
    load.add_argument("--seed", type=int, default=0, help="seeds prompts, arrivals and adapter assignment")
    prompts = parser.add_argument_group("prompts")
    prompts.add_argument("--input-len", type=int, default=32, help="prompt tokens (random prompts)")
    prompts.add_argument("--output-len", type=int, default=32,
                         help="max_tokens of each request (and of dataset lines without one)")
    prompts.add_argument("--range-ratio", type=float, default=0.0,
                         help="lengths uniform in [len*(1-r), len*(1+r)]")
    prompts.add_argument("--output-range-ratio", type=float, default=None,
                         help="the same for output lengths alone (default: --range-ratio, as vLLM applies it)")
    prompts.add_argument("--vocab-size", type=int, default=256,
                         help="random token ids are drawn from [0, vocab-size); 256 suits the demo model")
    prompts.add_argument("--dataset", type=Path, default=None,
                         help='JSONL, one {"prompt": text | [ids], "max_tokens"?: int, "model"?: str} per line')
    prompts.add_argument("--ignore-eos", action=argparse.BooleanOptionalAction, default=True,
                         help="send ignore_eos and min_tokens=max_tokens so outputs have exactly max_tokens tokens "
                              "(this project's server and vLLM accept both)")
    adapters = parser.add_argument_group("adapters")
    adapters.add_argument("--lora-modules", default=None,
                          help="comma-separated adapter names; each request's model is one of them")
    adapters.add_argument("--lora-assignment", default="random", choices=ASSIGNMENTS)
    adapters.add_argument("--zipf-alpha", type=float, default=1.0, help="Zipf exponent of --lora-assignment zipf")
    bounds = parser.add_argument_group("bounds and results")
    bounds.add_argument("--timeout", type=float, default=300.0, help="seconds per request before it counts as failed")
    bounds.add_argument("--max-duration", type=float, default=None,
                        help="seconds a run may take; requests unfinished then count as failed")
    bounds.add_argument("--goodput", nargs="+", default=None, metavar="METRIC:MS",
                        help="SLOs, e.g. ttft:500 tpot:50 e2el:5000; goodput is requests/s meeting all of them")
    bounds.add_argument("--sweep-rates", type=float_list, default=None,
                        help="run the workload at each of these request rates (e.g. 1,2,4,inf), one row each")
    bounds.add_argument("--plot", type=Path, default=None, help="with --sweep-rates: PNG of p99 TTFT and TPOT by rate")
    bounds.add_argument("--save-json", type=Path, default=None,
                        help="write the report and every request's record to this file (--json prints the report)")


def workload(args: argparse.Namespace) -> tuple[list, list[str]]:
    """The run's work items and each one's model: the dataset's model, else the adapter assignment, else --model
    (or the server's first model)."""
    rng = np.random.default_rng([args.seed, 0])
    if args.num_prompts < 1:
        raise ValueError(f"--num-prompts must be >= 1, got {args.num_prompts}")
    if args.dataset is not None:
        items = read_dataset(args.dataset, args.output_len)[:args.num_prompts]
    else:
        items = random_workload(args.num_prompts, args.input_len, args.output_len, args.range_ratio, args.vocab_size,
                                rng, args.output_range_ratio)
    names = [n for n in (args.lora_modules or "").split(",") if n]
    if names:
        assigned = assign_adapters(names, len(items), args.lora_assignment, np.random.default_rng([args.seed, 2]),
                                   args.zipf_alpha)
    elif all(item.model for item in items):
        assigned = [args.model] * len(items)
    else:
        assigned = [args.model or first_model(args.base_url, args.timeout)] * len(items)
    return items, [item.model or model for item, model in zip(items, assigned)]


def run(args: argparse.Namespace) -> dict:
    """Send the workload at each rate and summarize each run; writes --save-json and --plot when asked."""
    logging.getLogger("httpx").setLevel(logging.WARNING)  # not a log line per request
    if args.plot is not None and not args.sweep_rates:
        raise SystemExit("--plot needs --sweep-rates")
    if args.max_concurrency is not None and args.max_concurrency < 1:
        raise SystemExit(f"--max-concurrency must be >= 1, got {args.max_concurrency}")
    try:
        slos = parse_goodput(args.goodput)
        items, models = workload(args)
        rates = args.sweep_rates or [args.request_rate]
        offsets = [arrival_offsets(len(items), rate, args.burstiness, np.random.default_rng([args.seed, 1]))
                   for rate in rates]
    except (ValueError, OSError) as e:
        raise SystemExit(str(e)) from None
    runs, records = [], []
    for rate, offs in zip(rates, offsets):
        plan = LoadPlan(args.base_url, items, models, [float(o) for o in offs], args.max_concurrency, args.timeout,
                        args.max_duration, args.ignore_eos, progress=not args.json)
        run_records, duration = run_load(plan)
        runs.append({"request_rate": reported_rate(rate), "burstiness": args.burstiness,
                     "max_concurrency": args.max_concurrency,
                     **summarize(run_records, duration, slos)})
        records.append(run_records)
    report = {"setup": {"base_url": args.base_url, "num_prompts": len(items), "models": sorted(set(models)),
                        "dataset": str(args.dataset) if args.dataset else None, "input_len": args.input_len,
                        "output_len": args.output_len, "range_ratio": args.range_ratio,
                        "output_range_ratio": args.output_range_ratio, "seed": args.seed},
              "runs": runs}
    if args.plot is not None:
        plot_sweep(runs, args.plot)
        report["plot"] = str(args.plot)
    if args.save_json is not None:
        saved = {**report, "runs": [{**r, "requests": [rec.to_json() for rec in recs]}
                                    for r, recs in zip(runs, records)]}
        args.save_json.write_text(json.dumps(saved, indent=1))
        report["saved_json"] = str(args.save_json)
    return report


def reported_rate(rate: float) -> float | str:
    """A request rate as the report gives it (as vLLM's does): the number, or "inf" (JSON has no infinity)."""
    return "inf" if math.isinf(rate) else rate


def _ms(value: float | None) -> str:
    """Milliseconds with two decimals, or "-" where there were no samples."""
    return f"{value:.2f}" if value is not None else "-"


def print_run(run: dict) -> None:
    """One run's summary, as `vllm bench serve` prints it."""
    print(f"{'Request rate (req/s):':<40}{run['request_rate']:>12}")
    print(f"{'Successful requests:':<40}{run['completed']:>12}")
    print(f"{'Failed requests:':<40}{run['failed']:>12}")
    for error in run["errors"]:
        print(f"  {error['count']} x {error['error']}")
    print(f"{'Benchmark duration (s):':<40}{run['duration_s']:>12.2f}")
    print(f"{'Total input tokens:':<40}{run['total_input_tokens']:>12}")
    print(f"{'Total generated tokens:':<40}{run['total_output_tokens']:>12}")
    print(f"{'Request throughput (req/s):':<40}{run['request_throughput']:>12.2f}")
    if "goodput" in run:
        print(f"{'Request goodput (req/s):':<40}{run['goodput']:>12.2f}")
    print(f"{'Output token throughput (tok/s):':<40}{run['output_throughput']:>12.2f}")
    print(f"{'Total token throughput (tok/s):':<40}{run['total_token_throughput']:>12.2f}")
    print(f"{'Peak requests in flight:':<40}{run['peak_in_flight']:>12}")
    print(f"{'Peak requests decoding at once:':<40}{run['peak_decoding']:>12}")
    for key, title in (("ttft_ms", "TTFT"), ("tpot_ms", "TPOT"), ("itl_ms", "ITL"), ("e2el_ms", "E2EL")):
        d = run[key]
        print(f"{title + ' (ms)':<12}mean {_ms(d['mean']):>10}  median {_ms(d['median']):>10}  "
              f"p90 {_ms(d['p90']):>10}  p99 {_ms(d['p99']):>10}")


def print_report(report: dict) -> None:
    """The summary of a single run, or one row per rate of a sweep; then where the plot and records went."""
    s = report["setup"]
    print(f"load on {s['base_url']}: {s['num_prompts']} requests over {', '.join(s['models'])}")
    if len(report["runs"]) == 1:
        print_run(report["runs"][0])
    else:
        print(f"{'rate':>8}{'done':>6}{'failed':>8}{'req/s':>9}{'out tok/s':>11}{'p99 TTFT':>11}{'p99 TPOT':>11}"
              f"{'p99 E2EL':>11}{'decoding':>10}")
        for run in report["runs"]:
            print(f"{run['request_rate']:>8}{run['completed']:>6}{run['failed']:>8}{run['request_throughput']:>9.2f}"
                  f"{run['output_throughput']:>11.1f}{_ms(run['ttft_ms']['p99']):>11}{_ms(run['tpot_ms']['p99']):>11}"
                  f"{_ms(run['e2el_ms']['p99']):>11}{run['peak_decoding']:>10}")
            for error in run["errors"]:
                print(f"  {error['count']} x {error['error']}")
    for key, what in (("plot", "plot"), ("saved_json", "report and per-request records")):
        if key in report:
            print(f"{what}: {report[key]}")
