"""Sampling throughput: `PolicyModel.generate` vs a hand-written `model.generate` on the same model.

What is compared, per model size (the demo world's randomly initialised "tiny" and "small" Llamas, built with
`rlhf.world.build_tiny_lm` for the tokenizer in data/demo/tokenizer plus the action tokens `<add>`, `<review>`, exactly
as `PolicyModel.load` builds them):

- ours: `policy.generate(prompts, max_new_tokens=N, temperature=1.0, seed=S)` -> a `Rollout` (left-padded encoding,
  sampling, response masks, decoded completions).
- raw: what a user writes by hand with transformers: `tokenizer(prompts, padding=True, padding_side="left",
  return_tensors="pt")`, `torch.manual_seed(S)`, `model.generate(..., do_sample=True, temperature=1.0, top_k=0,
  top_p=1.0, max_new_tokens=N)`, slice off the prompt, `tokenizer.batch_decode(..., skip_special_tokens=True)`.

Same prompts (the first `--batch` of data/demo/eval_prompts.jsonl), same batch, same sampling distribution (pure
temperature-1 sampling, no top-k / top-p), same seed. Both sides are timed end to end (prompt strings in, decoded text
out) with `time.perf_counter` (and `time.process_time`, CPU seconds of this process), in one process, alternating
ours/raw for `--repeats` rounds after one untimed warm-up
call each. Generated tokens are counted the same way for both: tokens up to and including the first EOS of each row
(`rlhf.ops.response_mask_from_ids`). Given the same seed both sides sample the very same tokens; the script checks it.
Reports tokens/s per side (median over repeats) and the ratio of medians ours/raw (target >= 0.95).

    python benchmarks/bench_generate.py            # tiny + small, 64 prompts, 48 new tokens, 9 repeats
    python benchmarks/bench_generate.py --quick    # smoke run: tiny only, 1 repeat
    python benchmarks/bench_generate.py --profile  # also cProfile one call of each side (top functions by tottime)
"""

from __future__ import annotations

import argparse
import json
import time

import common

torch = common.setup_torch(1)

from rlhf.ops import response_mask_from_ids  # noqa: E402
from rlhf.policy import PolicyModel, add_special_tokens, load_tokenizer  # noqa: E402
from rlhf.world import ACTION_TOKENS, build_tiny_lm  # noqa: E402


def build(size: str):
    tokenizer = load_tokenizer(str(common.TOKENIZER))
    model = build_tiny_lm(tokenizer, size, seed=0)
    add_special_tokens(model, tokenizer, ACTION_TOKENS)
    model.eval()
    return model, tokenizer


def ours(policy: PolicyModel, prompts: list[str], max_new_tokens: int, seed: int):
    rollout = policy.generate(prompts, max_new_tokens=max_new_tokens, temperature=1.0, seed=seed)
    return rollout.response_ids, rollout.completions


@torch.no_grad()
def raw(model, tokenizer, prompts: list[str], max_new_tokens: int, seed: int):
    enc = tokenizer(prompts, padding=True, padding_side="left", return_tensors="pt")
    torch.manual_seed(seed)
    out = model.generate(
        **enc, do_sample=True, temperature=1.0, top_k=0, top_p=1.0, max_new_tokens=max_new_tokens,
        pad_token_id=tokenizer.pad_token_id, eos_token_id=tokenizer.eos_token_id,
    )
    response = out[:, enc["input_ids"].size(1):]
    return response, tokenizer.batch_decode(response, skip_special_tokens=True)


def count_tokens(response_ids: torch.Tensor, eos: int) -> int:
    return int(response_mask_from_ids(response_ids, eos).sum())


def timed(fn, eos: int):
    def run() -> dict:
        start, cpu = time.perf_counter(), time.process_time()
        ids, _ = fn()
        seconds, cpu = time.perf_counter() - start, time.process_time() - cpu
        tokens = count_tokens(ids, eos)
        return {"seconds": seconds, "cpu_seconds": cpu, "tokens": tokens, "tokens_per_s": tokens / seconds,
                "tokens_per_cpu_s": tokens / cpu}

    return run


def profile(label: str, fn, top: int = 15) -> None:
    import cProfile
    import io
    import pstats

    prof = cProfile.Profile()
    prof.enable()
    fn()
    prof.disable()
    buf = io.StringIO()
    pstats.Stats(prof, stream=buf).sort_stats("tottime").print_stats(top)
    print(f"\n--- cProfile, one call, {label} (sorted by tottime) ---")
    print("\n".join(buf.getvalue().splitlines()[:top + 12]))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="smoke run: tiny model only, 1 repeat")
    parser.add_argument("--sizes", nargs="+", default=None, help="model sizes (default: tiny small; --quick: tiny)")
    parser.add_argument("--batch", type=int, default=64, help="prompts per generate call")
    parser.add_argument("--max-new-tokens", type=int, default=48)
    parser.add_argument("--repeats", type=int, default=None, help="timed rounds per side (default 9; --quick 1)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--profile", action="store_true", help="cProfile one call of each side afterwards")
    args = parser.parse_args()
    sizes = args.sizes or (["tiny"] if args.quick else ["tiny", "small"])
    repeats = args.repeats or (1 if args.quick else 9)

    prompts = [json.loads(line)["prompt"] for line in common.EVAL_PROMPTS.read_text().splitlines() if line.strip()]
    prompts = (prompts * (args.batch // len(prompts) + 1))[: args.batch]
    print(common.environment(1))
    print(f"batch={len(prompts)} prompts, max_new_tokens={args.max_new_tokens}, temperature=1.0 (no top-k/top-p), "
          f"seed={args.seed}, repeats={repeats} (interleaved ours/raw after 1 warm-up each)")

    rows = []
    for size in sizes:
        model, tokenizer = build(size)
        policy = PolicyModel(model, tokenizer)
        eos = tokenizer.eos_token_id
        run_ours = lambda: ours(policy, prompts, args.max_new_tokens, args.seed)  # noqa: E731
        run_raw = lambda: raw(model, tokenizer, prompts, args.max_new_tokens, args.seed)  # noqa: E731

        ids_ours, _ = run_ours()  # warm-up, and the same-samples check
        ids_raw, _ = run_raw()
        pad = tokenizer.pad_token_id
        same = ids_ours.shape == ids_raw.shape and bool(
            (ids_ours.masked_fill(~response_mask_from_ids(ids_ours, eos), pad)
             == ids_raw.masked_fill(~response_mask_from_ids(ids_raw, eos), pad)).all()
        )
        n_params = sum(p.numel() for p in model.parameters()) / 1e6
        print(f"\n[{size}] {n_params:.2f}M parameters; ours and raw sampled identical tokens: {same}")
        results = common.interleaved({"ours": timed(run_ours, eos), "raw": timed(run_raw, eos)}, repeats)
        tps_ours, tps_raw = common.median(results["ours"], "tokens_per_s"), common.median(results["raw"], "tokens_per_s")
        cpu_ours = common.median(results["ours"], "tokens_per_cpu_s")
        cpu_raw = common.median(results["raw"], "tokens_per_cpu_s")
        rows.append([size, results["ours"][0]["tokens"], tps_ours, tps_raw, tps_ours / tps_raw,
                     common.spread(results["ours"], "tokens_per_s"), common.spread(results["raw"], "tokens_per_s"),
                     cpu_ours, cpu_raw, cpu_ours / cpu_raw])
        if args.profile:
            profile(f"{size} ours", run_ours)
            profile(f"{size} raw", run_raw)

    print("\nmedian generated tokens/s (tokens up to and including the first EOS), ratio of medians ours/raw; wall "
          "clock, then per CPU-second of this process (time.process_time: with one thread on a shared machine it "
          "leaves out the time other workers held the core):")
    print(common.table(["model", "tokens/call", "ours tok/s", "raw tok/s", "ours/raw", "ours range", "raw range",
                        "ours tok/cpu-s", "raw tok/cpu-s", "ours/raw (cpu)"], rows))
    for row in rows:
        met = "met" if row[4] >= 0.95 else "NOT met"
        print(common.ratio_line(f"ours/raw tokens/s [{row[0]}]", row[4], row[9], f"target >= 0.95 wall: {met}"))


if __name__ == "__main__":
    main()
