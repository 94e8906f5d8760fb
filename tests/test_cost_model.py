"""The decode-step cost model against cases computed by hand, profile loading, and a compiled tiny step."""

import pytest

from bdlora_jax.comm import DecodeShape, communication_report
from bdlora_jax.config import load_model_config_yaml
from bdlora_jax.configs import CONFIGS_DIR
from bdlora_jax.cost_model import (
    PROFILE_FIELDS,
    Collectives,
    DeviceProfile,
    StepCost,
    analytic_bytes,
    analytic_flops,
    gpu_collectives,
    load_device_profile,
    predict,
    speedup,
    step_cost,
)
from bdlora_jax.mesh import make_mesh
from bdlora_jax.sharding import make_plan

TINY = CONFIGS_DIR / "models" / "tiny.yaml"
PROFILE = DeviceProfile(name="made-up", hbm_bandwidth=1e12, peak_flops=1e14, collective_latency=1e-5,
                        link_bandwidth=1e11, sources={f: "test" for f in PROFILE_FIELDS})
COLLECTIVES = (Collectives("all-reduce", 3, 8_000_000), Collectives("all-gather", 2, 4_000_000),
               Collectives("reduce-scatter", 1, 1_000_000))


def test_compute_bound_step_by_hand():
    cost = StepCost(flops=2e11, bytes_moved=1e9, collectives=COLLECTIVES, model_size=4)
    t = predict(cost, PROFILE)
    assert t.compute == pytest.approx(2e11 / 1e14)  # 2 ms
    assert t.memory == pytest.approx(1e9 / 1e12)  # 1 ms
    all_reduce = 3 * 1e-5 + 2 * 3 / 4 * 8e6 / 1e11  # 30 us + 120 us
    all_gather = 2 * 1e-5 + 3 / 4 * 4e6 / 1e11  # 20 us + 30 us
    reduce_scatter = 1e-5 + 3 * 1e6 / 1e11  # 10 us + 30 us (the input is 4x the 1 MB output)
    assert t.communication == pytest.approx(all_reduce + all_gather + reduce_scatter)
    assert t.total == pytest.approx(2e-3 + 150e-6 + 50e-6 + 40e-6)


def test_memory_bound_step_takes_the_memory_time():
    cost = StepCost(flops=5e10, bytes_moved=1e9, collectives=(Collectives("all-reduce", 1, 1_000_000),), model_size=8)
    assert predict(cost, PROFILE).total == pytest.approx(1e-3 + 1e-5 + 2 * 7 / 8 * 1e6 / 1e11)


def test_one_device_has_no_communication_and_unknown_kinds_are_refused():
    assert predict(StepCost(1e11, 1e9, COLLECTIVES, model_size=1), PROFILE).communication == 0.0
    with pytest.raises(ValueError, match="all-to-all"):
        predict(StepCost(1e11, 1e9, (Collectives("all-to-all", 1, 10),), model_size=8), PROFILE)


def test_speedup_of_identical_steps_is_one_and_of_extra_collectives_by_hand():
    base = StepCost(flops=1e11, bytes_moved=2e9, collectives=(Collectives("all-reduce", 10, 1_000_000),), model_size=8)
    assert speedup(base, base, PROFILE) == 1.0
    slower = StepCost(flops=1e11, bytes_moved=2e9, model_size=8,
                      collectives=(Collectives("all-reduce", 10, 1_000_000), Collectives("all-gather", 20, 160_000)))
    base_s = 2e-3 + 10 * 1e-5 + 2 * 7 / 8 * 1e6 / 1e11
    slower_s = base_s + 20 * 1e-5 + 7 / 8 * 160_000 / 1e11
    assert speedup(slower, base, PROFILE) == pytest.approx(slower_s / base_s)


def test_gpu_collectives_halve_promoted_all_reduces():
    hlo = (
        "  %ar = f32[16,1,4096]{2,1,0} all-reduce(f32[16,1,4096]{2,1,0} %x), to_apply=%add_promoted\n"
        "  %ar2 = f32[16,1,16]{2,1,0} all-reduce(f32[16,1,16]{2,1,0} %y), to_apply=%add\n"
        "  %ag = bf16[16,16]{1,0} all-gather(bf16[16,2]{1,0} %z), dimensions={1}\n"
    )
    assert gpu_collectives(hlo) == (Collectives("all-gather", 1, 16 * 16 * 2),
                                    Collectives("all-reduce", 2, 16 * 4096 * 2 + 16 * 16 * 4))


def _write(tmp_path, text):
    path = tmp_path / "gpu.yaml"
    path.write_text(text)
    return path


GOOD = """name: test-gpu
hbm_bandwidth: 1.0e+12
peak_flops: 1.0e+14
collective_latency: 1.0e-5
link_bandwidth: 1.0e+11
sources: {hbm_bandwidth: a, peak_flops: b, collective_latency: c, link_bandwidth: d}
"""


def test_profile_loads_and_errors_name_file_and_field(tmp_path):
    assert load_device_profile(_write(tmp_path, GOOD)) == DeviceProfile(
        "test-gpu", 1e12, 1e14, 1e-5, 1e11, {"hbm_bandwidth": "a", "peak_flops": "b", "collective_latency": "c",
                                             "link_bandwidth": "d"})
    cases = {
        GOOD.replace("peak_flops: 1.0e+14\n", ""): "missing field 'peak_flops'",
        GOOD.replace("1.0e+11", "-3"): "field 'link_bandwidth' = -3: expected a positive number",
        GOOD.replace("1.0e+12", "fast"): "field 'hbm_bandwidth' = 'fast'",
        GOOD.replace("1.0e+12", "1.0e12"): "write 1.0e\\+9",
        GOOD.replace("collective_latency: c, ", ""): "sources.collective_latency",
        GOOD + "nvlink: 3\n": "unknown field",
    }
    for text, message in cases.items():
        with pytest.raises(ValueError, match=message) as err:
            load_device_profile(_write(tmp_path, text))
        assert "gpu.yaml" in str(err.value)


@pytest.mark.parametrize("name", ["a100-80gb-nvlink.yaml", "h100-sxm.yaml"])
def test_shipped_profiles_load_with_a_source_for_every_number(name):
    profile = load_device_profile(CONFIGS_DIR / "devices" / name)
    assert set(profile.sources) == set(PROFILE_FIELDS)


@pytest.fixture(scope="module")
def tiny():
    return load_model_config_yaml(TINY)


SHAPE = DecodeShape(batch=4, max_seq_len=64, max_loras=2, rank=8, dtype="bfloat16")


def test_analytic_counts_of_tiny_by_hand(tiny):
    # tiny: hidden 64, mlp 128, 2 layers, 8 heads = 8 kv heads of 8, vocab 256; 1x8 mesh, so 1/8 of each weight
    plan = make_plan(make_mesh("1x8"), "slora", tiny, SHAPE.rank)
    weights = 2 * (4 * 64 * 64 + 3 * 64 * 128) // 8 + 64 * 256 // 8  # 12288 elements per device
    kv = 2 * 2 * 4 * 64 * 1 * 8  # layers x (k, v) x rows x context x 1 local kv head x head_dim = 8192
    # S-LoRA rank 8 per layer and device: column A (64, 8/8) x5; B (8, d_out/8) for q,k,v (64) and gate,up (128);
    # o: A (64/8, 8) + B (8, 64/8); down: A (128/8, 8) + B (8, 64/8)
    lora = 2 * (5 * 64 + (3 * 64 + 2 * 128) + (64 + 64) + (128 + 64))  # 2176
    assert analytic_bytes(tiny, plan, SHAPE, with_lora=True) == 2 * (weights + kv + lora)
    assert analytic_bytes(tiny, plan, SHAPE, with_lora=True, adapters=3) == 2 * (weights + kv + 3 * lora)
    assert analytic_bytes(tiny, plan, SHAPE, with_lora=False) == 2 * (weights + kv)
    attention = 2 * 4 * 4 * 1 * 8 * 64  # layers x (2 einsums x 2 flops) x rows x local heads x head_dim x context
    assert analytic_flops(tiny, plan, SHAPE, with_lora=True) == 2 * 4 * weights + attention + 2 * 4 * lora


def test_bdlora_adapter_is_one_eighth_of_its_parameters_per_device(tiny):
    plan = make_plan(make_mesh("1x8"), "bdlora", tiny, 16)
    shape = DecodeShape(batch=4, max_seq_len=64, max_loras=2, rank=16, dtype="bfloat16")
    # BD-LoRA rank 16 parameters per layer: column A 64x16 + block-diagonal B 16 x d_out/8; row block-diagonal A
    # d_in x 16/8 + B 16x64
    per_layer = 3 * (64 * 16 + 16 * 8) + 2 * (64 * 16 + 16 * 16) + (8 * 16 + 16 * 64) + (16 * 16 + 16 * 64)
    extra = analytic_bytes(tiny, plan, shape, True) - analytic_bytes(tiny, plan, shape, False)
    assert extra == 2 * 2 * per_layer // 8


def test_step_cost_of_compiled_tiny_step_matches_communication_report(tiny):
    plan = make_plan(make_mesh("1x8"), "slora", tiny, SHAPE.rank)
    cost = step_cost(tiny, plan, SHAPE)
    report = communication_report(tiny, plan, SHAPE)["with_lora"]
    assert {c.kind: c.count for c in cost.collectives} == {k: v["count"] for k, v in report.items()}
    assert cost.model_size == 8 and cost.flops_source == "cost_analysis" and cost.flops > 0
    by_kind = {c.kind: c.bytes for c in cost.collectives}
    assert by_kind["all-gather"] == report["all-gather"]["bytes"] == 2 * 5 * 4 * 8 * 4  # float32 (rows, rank)
    # 5 promoted bf16 (rows, 1, hidden) all-reduces (2 per layer + the embedding) move 2-byte elements on a GPU;
    # the 4 S-LoRA rank sums stay float32
    assert report["all-reduce"]["promoted"] == 5
    assert by_kind["all-reduce"] == 5 * 4 * 64 * 2 + 4 * 4 * 8 * 4


def test_bench_cost_pairs_slora_with_bdlora_on_every_device(tiny):
    from bdlora_jax.bench import cost as bench_cost
    from bdlora_jax.bench.cli import build_parser

    args = build_parser().parse_args(["cost", "--model", str(TINY), "--ranks", "8", "--multipliers", "2",
                                      "--batch", "4", "--seq-len", "64", "--max-loras", "2", "--json"])
    report = bench_cost.run(args)
    assert [(s["strategy"], s["rank"]) for s in report["steps"]] == [("slora", 8), ("bdlora", 16)]
    slora, bdlora = report["steps"]
    assert slora["collectives"]["all-gather"]["count"] == 5 * 2 and "all-gather" not in bdlora["collectives"]
    (entry,) = report["speedups"]
    assert set(entry["speedup"]) == set(report["devices"]) == {"A100-80GB-SXM4 (NVLink)", "H100-SXM5-80GB (NVLink)"}
    for name, value in entry["speedup"].items():
        assert value == slora["seconds"][name]["total"] / bdlora["seconds"][name]["total"] > 1
