"""Make the tiny Hugging Face / PEFT reference fixtures under tests/fixtures/hf_tiny/.

    python scripts/make_hf_fixtures.py [--out tests/fixtures/hf_tiny] [--check-only]

The tests of bdlora_jax compare our JAX model, checkpoint loader and PEFT adapter
reader/writer against the real thing. This script makes that real thing once, with
transformers + peft + torch (float32, CPU, fixed seeds), and the outputs are committed.
transformers, peft and torch are fixture-generation-only dependencies: nothing in the
package imports them.

It writes, under --out:

    model/          tiny random LlamaForCausalLM (GQA, Llama-3.1 "llama3" RoPE scaling,
                    untied head): config.json, model.safetensors, and a byte-level
                    tokenizer.json (ids 0..255 = bytes, <s>=256, </s>=257, <pad>=258)
    model_tied/     the same with tied embeddings and one layer
    adapters/NAME/  PEFT adapters on model/ (adapter_config.json, adapter_model.safetensors)
                    with nonzero A and B: plain LoRA, rsLoRA on q/v only, and BD-LoRA
                    with 2 and 4 blocks
    reference.npz   prompts int32 [P, T]; logits_base, logits_tied, logits_NAME
                    float32 [P, T, vocab]
    greedy.json     8 greedy new tokens per prompt for the base model and each adapter

Weights are re-initialised large (std 0.2) so that the logits are sensitive to errors.
RoPE: with head_dim 8 and theta 500000 the four wavelengths are about 6, 167, 4443 and
118000 positions; original_max_position_embeddings=256 puts them in all three llama3
regimes (kept, smoothly interpolated, divided by the factor).

After generating, and alone with --check-only, check_roundtrip() reads every adapter
with bdlora_jax.adapters.peft_io.read_adapter, writes it back with write_adapter, and checks
that the file is unchanged and that PEFT loads it to the same logits; check_trained_export()
trains LoRA and BD-LoRA adapters with bdlora_jax.train, exports them, and checks that PEFT
loads them to the logits our engine serves. The script needs the package installed
(pip install -e .); the tokenizer is bdlora_jax.tokenizer's byte-level one.
"""

import argparse
import json
import shutil
import sys
import tempfile
import zipfile
from pathlib import Path

import numpy as np
import torch
from peft import BdLoraConfig, LoraConfig, PeftModel, get_peft_model
from safetensors.torch import load_file
from transformers import LlamaConfig, LlamaForCausalLM

from bdlora_jax.tokenizer import BOS, EOS, PAD, SPECIAL_TOKENS, byte_level_tokenizer

PROMPT_TEXTS = ["Hello world", "JAX + LoRA!", "über café"]  # 11 UTF-8 bytes each, after <s>
MAX_NEW_TOKENS = 8
LOGITS_ATOL = 1e-5

ALL_MODULES = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
BD_A_MODULES = ["o_proj", "down_proj"]  # row-sharded layers: block-diagonal A
BD_B_MODULES = ["q_proj", "k_proj", "v_proj", "gate_proj", "up_proj"]  # column-sharded: block-diagonal B

MODEL_CONFIG = dict(
    vocab_size=260,
    hidden_size=64,
    intermediate_size=128,
    num_hidden_layers=2,
    num_attention_heads=8,
    num_key_value_heads=4,
    head_dim=8,
    rms_norm_eps=1e-5,
    max_position_embeddings=512,
    tie_word_embeddings=False,
    rope_parameters=dict(
        rope_type="llama3",
        rope_theta=500000.0,
        factor=8.0,
        low_freq_factor=1.0,
        high_freq_factor=4.0,
        original_max_position_embeddings=256,
    ),
    bos_token_id=BOS,
    eos_token_id=EOS,
    pad_token_id=PAD,
)


def bdlora(nblocks):
    return BdLoraConfig(target_modules_bd_a=BD_A_MODULES, target_modules_bd_b=BD_B_MODULES, nblocks=nblocks)


ADAPTERS = {
    "lora_r8": dict(r=8, lora_alpha=16, target_modules=ALL_MODULES),
    "lora_rs_r4_qv": dict(r=4, lora_alpha=8, use_rslora=True, target_modules=["q_proj", "v_proj"]),
    "bdlora_nb2_r8": dict(r=8, lora_alpha=16, target_modules=ALL_MODULES, use_bdlora=bdlora(2)),
    "bdlora_nb4_r8": dict(r=8, lora_alpha=16, target_modules=ALL_MODULES, use_bdlora=bdlora(4)),
}


# ---------------------------------------------------------------------------- base models


def make_model(seed, **overrides):
    torch.manual_seed(seed)
    model = LlamaForCausalLM(LlamaConfig(**{**MODEL_CONFIG, **overrides})).float().eval()
    with torch.no_grad():
        for name, param in model.named_parameters():
            if "norm" in name:
                param.copy_(1.0 + 0.1 * torch.randn_like(param))
            else:
                param.normal_(0.0, 0.2)
    return model


def load_model(model_dir):
    return LlamaForCausalLM.from_pretrained(model_dir, dtype=torch.float32, attn_implementation="eager").eval()


def save_model(model, model_dir):
    model.save_pretrained(model_dir, safe_serialization=True)
    config = json.loads((model_dir / "config.json").read_text())
    form = "rope_parameters" if "rope_parameters" in config else "rope_theta + rope_scaling"
    print(f"{model_dir.name}/config.json: RoPE written as {form}: "
          f"{config.get('rope_parameters') or (config.get('rope_theta'), config.get('rope_scaling'))}")
    print(f"{model_dir.name}/model.safetensors: {sorted(load_file(model_dir / 'model.safetensors'))}")


def describe_rope():
    rope = MODEL_CONFIG["rope_parameters"]
    dim = MODEL_CONFIG["head_dim"]
    wavelengths = [2 * np.pi * rope["rope_theta"] ** (i / dim) for i in range(0, dim, 2)]
    high = rope["original_max_position_embeddings"] / rope["high_freq_factor"]
    low = rope["original_max_position_embeddings"] / rope["low_freq_factor"]
    regimes = ["kept" if w < high else "scaled" if w > low else "smoothed" for w in wavelengths]
    print("llama3 RoPE wavelengths: " + ", ".join(f"{w:.0f} ({r})" for w, r in zip(wavelengths, regimes)))


# ---------------------------------------------------------------------------- tokenizer


def check_tokenizer(tok):
    assert tok.get_vocab_size() == 259, tok.get_vocab_size()
    for text in ["Hello", *PROMPT_TEXTS]:
        ids = tok.encode(text).ids
        assert ids == list(text.encode()), (text, ids)
        assert tok.decode(ids) == text, (text, tok.decode(ids))
    assert [tok.token_to_id(t) for t in SPECIAL_TOKENS] == [BOS, EOS, PAD]
    assert tok.encode("<s>Hi</s>").ids == [BOS, 72, 105, EOS]
    print(f"tokenizer.json: 'Hello' -> {tok.encode('Hello').ids}, round-trips; specials {SPECIAL_TOKENS}")


# ---------------------------------------------------------------------------- adapters


def make_adapter(model_dir, adapter_dir, seed, lora_kwargs):
    torch.manual_seed(seed)
    config = LoraConfig(task_type="CAUSAL_LM", lora_dropout=0.0, **lora_kwargs)
    peft_model = get_peft_model(load_model(model_dir), config)
    with torch.no_grad():
        for name, param in peft_model.named_parameters():
            if "lora_A" in name or "lora_B" in name:
                param.normal_(0.0, 0.1)
    peft_model.peft_config["default"].base_model_name_or_path = "../../model"  # relative to adapter_dir
    peft_model.save_pretrained(adapter_dir, safe_serialization=True)
    (adapter_dir / "README.md").unlink()  # PEFT's empty model-card template
    sort_target_modules(adapter_dir / "adapter_config.json")
    return peft_model.eval()


def sort_target_modules(config_path):
    """PEFT keeps target_modules as a set and writes it in string-hash order, which changes
    from run to run; sort it so that the file is reproducible (same meaning)."""
    config = json.loads(config_path.read_text())
    config["target_modules"] = sorted(config["target_modules"])
    config_path.write_text(json.dumps(config, indent=2, sort_keys=True))


def check_bd_packing(adapter_dir, nblocks, r):
    """BD tensors are packed: block-diagonal A (r, d_in/nb), block-diagonal B (d_out, r/nb)."""
    tensors = load_file(adapter_dir / "adapter_model.safetensors")
    shapes = {}
    for key, t in tensors.items():
        module = key.split(".")[-3]
        base_shape = dense_lora_shape(module, "lora_A" in key, r)
        if module in BD_A_MODULES and "lora_A" in key or module in BD_B_MODULES and "lora_B" in key:
            expected = (base_shape[0], base_shape[1] // nblocks)
        else:
            expected = base_shape
        assert tuple(t.shape) == expected, (key, tuple(t.shape), expected)
        shapes[f"{module}.{key.split('.')[-2]}"] = tuple(t.shape)
    print(f"  packed BD shapes (nblocks={nblocks}): {shapes}")


def dense_lora_shape(module, is_a, r):
    h, f = MODEL_CONFIG["hidden_size"], MODEL_CONFIG["intermediate_size"]
    kv = MODEL_CONFIG["num_key_value_heads"] * MODEL_CONFIG["head_dim"]
    d_in, d_out = {"q_proj": (h, h), "k_proj": (h, kv), "v_proj": (h, kv), "o_proj": (h, h),
                   "gate_proj": (h, f), "up_proj": (h, f), "down_proj": (f, h)}[module]
    return (r, d_in) if is_a else (d_out, r)


def check_bd_semantics(peft_model, nblocks, scaling):
    """PEFT's BD forward equals x @ (B_dense A_dense)^T * scaling, with the dense factor
    = block_diag(*chunk(packed, nblocks, dim=0)), as docs/design.md describes the packing."""
    layer = peft_model.base_model.model.model.layers[0]
    x = torch.randn(5, MODEL_CONFIG["hidden_size"])
    for module, packed in ((layer.self_attn.o_proj, "A"), (layer.self_attn.k_proj, "B")):
        a, b = module.lora_A["default"].weight, module.lora_B["default"].weight
        if packed == "A":
            a = torch.block_diag(*torch.chunk(a, nblocks, dim=0))
        else:
            b = torch.block_diag(*torch.chunk(b, nblocks, dim=0))
        with torch.no_grad():
            delta = module(x) - module.get_base_layer()(x)
        torch.testing.assert_close(delta, x @ (b @ a).T * scaling, atol=1e-5, rtol=1e-5)


def print_keys(adapter_dir):
    for key, t in sorted(load_file(adapter_dir / "adapter_model.safetensors").items()):
        print(f"    {key} {tuple(t.shape)}")


# ---------------------------------------------------------------------------- references


def make_prompts():
    prompts = [[BOS, *text.encode()] for text in PROMPT_TEXTS]
    assert len({len(p) for p in prompts}) == 1, [len(p) for p in prompts]
    return np.array(prompts, dtype=np.int32)


def logits(model, prompts):
    with torch.no_grad():
        return model(torch.from_numpy(prompts).long()).logits.float().numpy()


def greedy(model, prompts):
    """Plain argmax decoding, full recompute each step: no EOS stop, no cache subtleties.
    Returns the new ids and the smallest top-1/top-2 logit gap met on the way."""
    ids = torch.from_numpy(prompts).long()
    min_gap = float("inf")
    with torch.no_grad():
        for _ in range(MAX_NEW_TOKENS):
            last = model(ids).logits[:, -1].float()
            top2 = last.topk(2).values
            min_gap = min(min_gap, (top2[:, 0] - top2[:, 1]).min().item())
            ids = torch.cat([ids, last.argmax(-1, keepdim=True)], dim=1)
    return ids[:, prompts.shape[1]:].tolist(), min_gap


def save_npz(path, arrays):
    """np.savez with a fixed zip timestamp, so that regenerating gives identical bytes."""
    with zipfile.ZipFile(path, "w", zipfile.ZIP_DEFLATED) as zf:
        for name, array in arrays.items():
            info = zipfile.ZipInfo(f"{name}.npy", date_time=(1980, 1, 1, 0, 0, 0))
            info.compress_type = zipfile.ZIP_DEFLATED
            with zf.open(info, "w") as f:
                np.lib.format.write_array(f, np.ascontiguousarray(array), allow_pickle=False)


# ---------------------------------------------------------------------------- generation


def generate(out):
    torch.use_deterministic_algorithms(True)
    if out.exists():
        shutil.rmtree(out)
    out.mkdir(parents=True)
    prompts = make_prompts()
    describe_rope()

    model_dir = out / "model"
    save_model(make_model(seed=0), model_dir)
    tok = byte_level_tokenizer()
    check_tokenizer(tok)
    tok.save(str(model_dir / "tokenizer.json"))

    tied_dir = out / "model_tied"
    save_model(make_model(seed=1, tie_word_embeddings=True, num_hidden_layers=1), tied_dir)

    base = load_model(model_dir)
    arrays = {"prompts": prompts, "logits_base": logits(base, prompts),
              "logits_tied": logits(load_model(tied_dir), prompts)}
    tokens, gap = greedy(base, prompts)
    outputs = {"max_new_tokens": MAX_NEW_TOKENS, "prompts": prompts.tolist(), "base": tokens}
    print(f"base: greedy {tokens}, min top-2 gap {gap:.3f}")

    for seed, (name, kwargs) in enumerate(ADAPTERS.items(), start=10):
        adapter_dir = out / "adapters" / name
        in_memory = make_adapter(model_dir, adapter_dir, seed, kwargs)
        reloaded = PeftModel.from_pretrained(load_model(model_dir), adapter_dir).eval()
        arrays[f"logits_{name}"] = logits(reloaded, prompts)
        np.testing.assert_array_equal(arrays[f"logits_{name}"], logits(in_memory, prompts))
        change = np.abs(arrays[f"logits_{name}"] - arrays["logits_base"]).max()
        assert change > 0.5, f"{name} barely changes the logits ({change})"
        tokens, gap = greedy(reloaded, prompts)
        outputs[name] = tokens
        print(f"{name}: max |logits - base| {change:.2f}, greedy {tokens}, min top-2 gap {gap:.3f}")
        if "use_bdlora" in kwargs:
            bd = kwargs["use_bdlora"]
            check_bd_packing(adapter_dir, bd.nblocks, kwargs["r"])
            check_bd_semantics(reloaded, bd.nblocks, kwargs["lora_alpha"] / kwargs["r"])

    print("adapter_model.safetensors keys of lora_r8:")
    print_keys(out / "adapters" / "lora_r8")
    save_npz(out / "reference.npz", arrays)
    (out / "greedy.json").write_text(json.dumps(outputs, indent=1) + "\n")


def summary(out):
    print(f"\nwrote {out}:")
    total = 0
    for path in sorted(p for p in out.rglob("*") if p.is_file()):
        total += path.stat().st_size
        print(f"  {path.relative_to(out)}  {path.stat().st_size / 1024:.1f} KiB")
    print(f"  total {total / 1024:.1f} KiB")


# ---------------------------------------------------------------------------- round trip


def check_roundtrip(out):
    """Our read_adapter -> write_adapter must give back the same tensors, and PEFT must
    load what we wrote to the reference logits."""
    try:
        from bdlora_jax.adapters.peft_io import read_adapter, write_adapter
        from bdlora_jax.checkpoint import load_model_config
    except ImportError as e:
        sys.exit(f"the round-trip check needs the bdlora_jax package installed (pip install -e .): {e}")

    reference = np.load(out / "reference.npz")
    prompts = reference["prompts"]
    model_config = load_model_config(out / "model")
    for adapter_dir in sorted((out / "adapters").iterdir()):
        name = adapter_dir.name
        with tempfile.TemporaryDirectory() as tmp:
            write_adapter(read_adapter(adapter_dir, model_config), tmp)
            original = load_file(adapter_dir / "adapter_model.safetensors")
            written = load_file(Path(tmp) / "adapter_model.safetensors")
            assert sorted(written) == sorted(original), (name, sorted(set(written) ^ set(original)))
            for key, t in original.items():
                assert written[key].dtype == t.dtype and written[key].shape == t.shape, \
                    (name, key, written[key].dtype, tuple(written[key].shape), t.dtype, tuple(t.shape))
                assert torch.equal(written[key], t), (name, key)
            peft_model = PeftModel.from_pretrained(load_model(out / "model"), tmp).eval()
            error = np.abs(logits(peft_model, prompts) - reference[f"logits_{name}"]).max()
        assert error <= LOGITS_ATOL, f"{name}: PEFT logits of our written adapter off by {error}"
        print(f"round trip {name}: {len(original)} tensors identical, PEFT logits max error {error:.2e}")


def check_trained_export(out):
    """Adapters trained by bdlora_jax.train (LoRA, and BD-LoRA with 4 blocks) and exported as PEFT directories
    load in PEFT to the logits our engine serves them with."""
    from bdlora_jax import Engine
    from bdlora_jax.train.config import TrainConfig
    from bdlora_jax.train.trainer import Trainer

    reference = np.load(out / "reference.npz")
    prompts = reference["prompts"]
    with tempfile.TemporaryDirectory() as tmp:
        data = Path(tmp) / "data.jsonl"
        data.write_text("".join(json.dumps({"prompt": w + "=", "completion": w.upper()}) + "\n"
                                for w in ["jax", "lora", "mesh", "block", "tensor", "shard", "peft", "adapter"]))
        for kind in ("lora", "bdlora"):
            cfg = TrainConfig(model=str(out / "model"), adapters={"a": str(data), "b": str(data)}, kind=kind,
                              nblocks=4, rank=8, alpha=16.0, batch_size=4, seq_len=24, steps=5, warmup_steps=1,
                              learning_rate=5e-2, eval_fraction=0.0, out_dir=f"{tmp}/{kind}")
            trainer = Trainer(cfg)
            trainer.fit(progress=False)
            paths = trainer.export()
            engine = Engine.from_pretrained(out / "model", mesh="1x1", strategy="replicated", max_loras=2,
                                            max_lora_rank=8)
            for name, path in paths.items():
                engine.add_adapter(name, path)
                ours = np.stack(engine.batch_logits([list(p) for p in prompts], [name] * len(prompts)))
                peft_model = PeftModel.from_pretrained(load_model(out / "model"), path).eval()
                error = np.abs(logits(peft_model, prompts) - ours).max()
                assert error <= LOGITS_ATOL, f"trained {kind} adapter {name}: PEFT logits off by {error}"
                print(f"trained {kind} adapter {name}: PEFT reloads it, logits max error {error:.2e}")


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=Path("tests/fixtures/hf_tiny"))
    parser.add_argument("--check-only", action="store_true", help="only run the round-trip check")
    args = parser.parse_args()
    if not args.check_only:
        generate(args.out)
        summary(args.out)
    check_roundtrip(args.out)
    check_trained_export(args.out)


if __name__ == "__main__":
    main()
