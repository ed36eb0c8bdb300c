"""Sampling throughput: `PolicyModel.generate` (fast backend, fp32 and bf16 mode) vs a hand-written `model.generate`.

What is compared, per model size (the demo world's randomly initialised "tiny" and "small" Llamas, built with
`rlhf.world.build_tiny_lm` for the tokenizer in data/demo/tokenizer plus the action tokens `<add>`, `<review>`, exactly
as `PolicyModel.load` builds them), per batch (rows per call), per n (samples per prompt: batch / n distinct prompts)
and per prompt kind (short: data/demo/eval_prompts.jsonl, ~11 tokens; long: demo SFT texts as context in front of
each prompt, >= 256 tokens):

- raw: what a user writes by hand with transformers: `tokenizer(prompts repeated n times, padding=True,
  padding_side="left", return_tensors="pt")`, `torch.manual_seed(S)`, `model.generate(..., do_sample=True,
  temperature=1.0, top_k=0, top_p=1.0, max_new_tokens=N)`, slice off the prompt, `tokenizer.batch_decode(...)`.
- fast: `policy.generate(prompts, n=n, max_new_tokens=N, temperature=1.0, seed=S, backend="fast")` -> a `Rollout`
  (strings in, decoded text out; its three steps spelled out, so that the call's `SampleStats` come back), with the
  decode step eager (RLHF_COMPILE=0: no compile time anywhere).
- fast bf16: the same with `bf16=True` (weights and KV cache in bfloat16; raw stays fp32).
- compiled (the compile section): the fast backend with its decode step under `torch.compile` (RLHF_COMPILE=1):
  the first call's seconds (the compile), the steady state, and the number of calls after which compiling has paid
  for itself; then the demo GRPO stage's sampling (30 rollouts of 32 prompts x 8, 40 new tokens, tiny) end to end
  with and without compiling.

Same sampling distribution (pure temperature-1 sampling), same seed; the backends draw different random numbers, so
the tokens differ; greedy decoding is checked token-identical (fast vs raw) per model and prompt kind instead.
Timed end to end with `time.perf_counter` and `time.process_time` (CPU seconds of this process), in one process,
interleaved (raw, fast, fast bf16, raw, ...) for `--repeats` rounds after one untimed warm-up call each. Generated
tokens = tokens up to and including the first EOS of each row (`rlhf.ops.response_mask_from_ids`), for both.
Achieved GFLOP/s = model FLOPs (each distinct prompt once + each generated token: 2 x matmul weights + attention)
per second, next to the fp32 (and bf16) matmul peak measured by this script. "Where the time goes" splits one fast
call into phases (read weights / prefill / decode) and one eager decode step into GEMMs, sampling and the rest.

    python benchmarks/bench_generate.py            # everything (~10 min on a quiet 2-core machine, 30+ busy)
    python benchmarks/bench_generate.py --quick    # smoke run: tiny, batch 8, n 1, short, fp32, 1 repeat
    python benchmarks/bench_generate.py --sizes tiny --batches 8 64 --n 1 --prompts short --no-compile
    python benchmarks/bench_generate.py --sections split compile   # only the time split and the compile section
    python benchmarks/bench_generate.py --profile  # also cProfile one call of each side (top functions by tottime)
    python benchmarks/bench_generate.py --model models/smollm2-135m-instruct --no-bf16   # a real chat model

`--model DIR` measures a pretrained causal LM directory instead of the demo models (loaded as the engine loads it,
`rlhf.policy.load_causal_lm`, fp32), on chat prompts: the records of data/chat/rl_prompts.jsonl (chat_add and
chat_review, alternating) rendered through the model's chat template with the generation prompt (~40 tokens for
SmolLM2); defaults then: batches 8 and 64, n 1, the matrix section only (`--sections` adds the others).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import time
from pathlib import Path

import common

torch = common.setup_torch(1)

from rlhf import generation  # noqa: E402
from rlhf.ops import response_mask_from_ids  # noqa: E402
from rlhf.policy import PolicyModel, add_special_tokens, load_causal_lm, load_tokenizer  # noqa: E402
from rlhf.world import ACTION_TOKENS, build_tiny_lm  # noqa: E402

LONG_PROMPT_TOKENS = 256
CHAT_PROMPTS = common.REPO / "data" / "chat" / "rl_prompts.jsonl"


def label(size: str) -> str:
    """A demo size as is, a model directory by its name."""
    return Path(size).name if Path(size).is_dir() else size


def build(size: str):
    """A demo-world model of `size`, or (a directory) a pretrained causal LM and its tokenizer, fp32, eval mode."""
    if Path(size).is_dir():
        model = load_causal_lm(size, "float32")
        model.eval()
        return model, load_tokenizer(size)
    tokenizer = load_tokenizer(str(common.TOKENIZER))
    model = build_tiny_lm(tokenizer, size, seed=0)
    add_special_tokens(model, tokenizer, ACTION_TOKENS)
    model.eval()
    return model, tokenizer


def short_prompts() -> list[str]:
    return [json.loads(line)["prompt"] for line in common.EVAL_PROMPTS.read_text().splitlines() if line.strip()]


def chat_prompts(tokenizer) -> list[str]:
    """The chat prompt records of data/chat/rl_prompts.jsonl, each rendered through the tokenizer's chat template
    with the generation prompt (the text both sides then tokenize the same way)."""
    records = [json.loads(line) for line in CHAT_PROMPTS.read_text().splitlines() if line.strip()]
    return [tokenizer.apply_chat_template(r["prompt"], tokenize=False, add_generation_prompt=True) for r in records]


def pool(size: str, tokenizer) -> list[str]:
    """Short prompts for a demo model; a model directory's chat prompts."""
    return chat_prompts(tokenizer) if Path(size).is_dir() else short_prompts()


def long_prompts(tokenizer, count: int) -> list[str]:
    """Each short prompt behind a different run of demo SFT texts, >= LONG_PROMPT_TOKENS tokens in all."""
    texts = [(r := json.loads(line))["prompt"] + r["completion"] for line in common.SFT_DATA.read_text().splitlines()[:4000]]
    out = []
    for i, prompt in enumerate(short_prompts()[:count]):
        parts, j = [prompt], i * 13
        while len(tokenizer(" ".join(parts)).input_ids) < LONG_PROMPT_TOKENS:
            parts.insert(0, texts[j % len(texts)])
            j += 1
        out.append(" ".join(parts))
    return out


def fast(policy: PolicyModel, prompts: list[str], n: int, max_new_tokens: int, seed: int, bf16: bool = False,
         compile: bool = False):
    """What `policy.generate` does (encode, `generation.generate`, `rollout_from_ids`), keeping the SampleStats."""
    os.environ["RLHF_COMPILE"] = "1" if compile else "0"
    ids, mask = policy.encode_prompts(prompts)
    tok = policy.tokenizer
    response, stats = generation.generate(
        policy.model, ids, mask, n=n, max_new_tokens=max_new_tokens, eos_token_id=tok.eos_token_id,
        pad_token_id=tok.pad_token_id, bos_token_id=tok.bos_token_id, temperature=1.0, seed=seed, backend="fast",
        bf16=bf16)
    rollout = policy.rollout_from_ids(ids.repeat_interleave(n, 0), mask.repeat_interleave(n, 0), response, prompts, n)
    return rollout.response_ids, rollout.completions, stats


@torch.no_grad()
def raw(model, tokenizer, prompts: list[str], n: int, max_new_tokens: int, seed: int, greedy: bool = False):
    enc = tokenizer([p for p in prompts for _ in range(n)], padding=True, padding_side="left", return_tensors="pt")
    torch.manual_seed(seed)
    sampling = dict(do_sample=False) if greedy else dict(do_sample=True, temperature=1.0, top_k=0, top_p=1.0)
    out = model.generate(**enc, **sampling, max_new_tokens=max_new_tokens, pad_token_id=tokenizer.pad_token_id,
                         eos_token_id=tokenizer.eos_token_id)
    response = out[:, enc["input_ids"].size(1):]
    return response, tokenizer.batch_decode(response, skip_special_tokens=True)


def count_tokens(response_ids: torch.Tensor, eos: int) -> int:
    return int(response_mask_from_ids(response_ids, eos).sum())


class Flops:
    """Model FLOPs of a sampling call: each distinct prompt once, then each generated token (finished rows' padding
    steps are not counted: they are waste, not work). Per token: 2 x matmul weights (attention and MLP projections,
    LM head) + 4 x context x q_size per layer (scores and weighted values)."""

    def __init__(self, model):
        cfg = model.config
        self.matmul = sum(m.weight.numel() for name, m in model.named_modules()
                          if isinstance(m, torch.nn.Linear) and (".layers." in name or name.endswith("lm_head")))
        self.layers, self.q_size = cfg.num_hidden_layers, cfg.num_attention_heads * (
            getattr(cfg, "head_dim", None) or cfg.hidden_size // cfg.num_attention_heads)

    def __call__(self, prompt_lengths: list[int], n: int, response_ids: torch.Tensor, eos: int) -> float:
        prefill = sum(2 * self.matmul * p + 2 * self.layers * p * p * self.q_size for p in prompt_lengths)
        mask = response_mask_from_ids(response_ids, eos)
        context = torch.tensor(prompt_lengths).repeat_interleave(n)[:, None] + torch.arange(mask.size(1))[None]
        decode = (mask * (2 * self.matmul + 4 * self.layers * context * self.q_size)).sum().item()
        return prefill + decode


def matmul_peak(dtype: torch.dtype, size: int = 1024, repeats: int = 7) -> float:
    """Single-thread GEMM throughput (GFLOP/s, best of `repeats`) of a size^3 matmul: the ceiling for this core."""
    a, b = torch.randn(size, size, dtype=dtype), torch.randn(size, size, dtype=dtype)
    a @ b
    best = 0.0
    for _ in range(repeats):
        start = time.perf_counter()
        a @ b
        best = max(best, 2 * size ** 3 / (time.perf_counter() - start) / 1e9)
    return best


def timed(fn, eos: int, flops=None, phases: bool = False):
    def run() -> dict:
        start, cpu = time.perf_counter(), time.process_time()
        ids, *rest = fn()  # fast sides also return their SampleStats
        seconds, cpu = time.perf_counter() - start, time.process_time() - cpu
        tokens = count_tokens(ids, eos)
        out = {"seconds": seconds, "cpu_seconds": cpu, "tokens": tokens, "tokens_per_s": tokens / seconds,
               "tokens_per_cpu_s": tokens / cpu}
        if flops is not None:
            out["gflops"] = flops(ids) / seconds / 1e9
        if phases:
            stats = rest[-1]
            out.update(prefill_s=stats.prefill, decode_s=stats.decode, compile_s=stats.compile)
        return out

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


def greedy_identical(policy: PolicyModel, model, tokenizer, prompts: list[str], n: int) -> bool:
    os.environ["RLHF_COMPILE"] = "0"
    ours = policy.generate(prompts, n=n, max_new_tokens=24, greedy=True, backend="fast").response_ids
    theirs, _ = raw(model, tokenizer, prompts, n, 24, 0, greedy=True)
    eos, pad = tokenizer.eos_token_id, tokenizer.pad_token_id
    theirs = theirs.masked_fill(~response_mask_from_ids(theirs, eos), pad)
    return ours.shape == theirs.shape and bool((ours == theirs).all())


def decode_breakdown(policy: PolicyModel, prompts: list[str], max_new_tokens: int, steps: int = 20) -> dict:
    """Seconds per eager decode step half way through a response (mean of `steps`): the whole step, its GEMMs alone
    (the same F.linear calls on the same shapes), and token selection (softmax + draw) alone; the rest is attention,
    norms, RoPE and dispatch."""
    import torch.nn.functional as F

    os.environ["RLHF_COMPILE"] = "0"
    seen = {}
    original = generation._decode_step

    def spy(*args):
        if args[11] <= max_new_tokens // 2:  # a step half way through the response (args[11] = the slot)
            seen["args"] = args
        return original(*args)

    generation._decode_step = spy
    try:
        policy.generate(prompts, max_new_tokens=max_new_tokens, seed=0, backend="fast")
    finally:
        generation._decode_step = original
    args = seen["args"]
    spec, layers, head, rows = args[0], args[3], args[5], args[9].numel()
    x = torch.randn(rows, head.size(1))
    mids = [(torch.randn(rows, w[3].size(1)), torch.randn(rows, w[8].size(1))) for w in layers]

    def gemms():
        for w, (attn_out, mlp_mid) in zip(layers, mids):
            F.linear(x, w[1], w[2])
            F.linear(attn_out, w[3], w[4])
            F.linear(x, w[6], w[7])
            F.linear(mlp_mid, w[8], w[9])
        F.linear(x, head)

    def one(fn) -> float:
        fn()
        start = time.process_time()
        for _ in range(steps):
            fn()
        return (time.process_time() - start) / steps

    with torch.inference_mode():  # the captured caches are inference tensors, written in place by the step
        logits = original(*args)
        return {"step": one(lambda: original(*args)), "gemm": one(gemms),
                "select": one(lambda: generation.select_tokens(logits, False)), "layers": spec.layers}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="smoke run: tiny, batch 8, n 1, short prompts, fp32, 1 repeat")
    parser.add_argument("--sizes", nargs="+", default=None, help="model sizes (default: tiny small)")
    parser.add_argument("--batches", nargs="+", type=int, default=None, help="rows per call (default: 8 32 64)")
    parser.add_argument("--n", nargs="+", type=int, default=None, help="samples per prompt (default: 1 8)")
    parser.add_argument("--prompts", nargs="+", default=None, choices=["short", "long", "chat"],
                        help="default: short long (chat with --model)")
    parser.add_argument("--model", help="a pretrained causal-LM directory with a chat template instead of the demo "
                        "models (chat prompts), e.g. models/smollm2-135m-instruct")
    parser.add_argument("--no-bf16", action="store_true", help="leave out the bf16 side")
    parser.add_argument("--no-compile", action="store_true", help="leave out the compile section")
    parser.add_argument("--sections", nargs="+", default=None, choices=["matrix", "split", "compile"],
                        help="what to run: the backend matrix, the decode-step time split, the compile section")
    parser.add_argument("--max-new-tokens", type=int, default=48)
    parser.add_argument("--repeats", type=int, default=None, help="timed rounds per side (default 3; --quick 1)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--profile", action="store_true", help="cProfile one call of each side afterwards")
    args = parser.parse_args()
    if args.model:
        sizes = [str(Path(args.model).resolve())]
        batches = args.batches or [8, 64]
        ns = args.n or [1]
        kinds = args.prompts or ["chat"]
        args.sections = args.sections or ["matrix"]
    else:
        sizes = args.sizes or (["tiny"] if args.quick else ["tiny", "small"])
        batches = args.batches or ([8] if args.quick else [8, 32, 64])
        ns = args.n or ([1] if args.quick else [1, 8])
        kinds = args.prompts or (["short"] if args.quick else ["short", "long"])
        args.sections = args.sections or ["matrix", "split", "compile"]
    with_bf16 = not (args.no_bf16 or args.quick)
    with_compile = not (args.no_compile or args.quick) and "compile" in args.sections
    repeats = args.repeats or (1 if args.quick else 3)
    tokens_n = args.max_new_tokens

    print(common.environment(1))
    peak32 = matmul_peak(torch.float32)
    peak16 = matmul_peak(torch.bfloat16) if with_bf16 else float("nan")
    print(f"matmul peak, one thread, 1024^3: fp32 {peak32:.1f} GFLOP/s, bf16 {peak16:.1f} GFLOP/s")
    print(f"max_new_tokens={tokens_n}, temperature=1.0 (no top-k/top-p), seed={args.seed}, repeats={repeats} "
          f"(interleaved after 1 warm-up each); batch = rows per call = prompts x n")

    rows, headline, notes = [], {}, []
    for size in sizes if "matrix" in args.sections else []:
        model, tokenizer = build(size)
        policy = PolicyModel(model, tokenizer)
        eos = tokenizer.eos_token_id
        flops_of = Flops(model)
        n_params = sum(p.numel() for p in model.parameters()) / 1e6
        pools = {"short": short_prompts()}
        if "long" in kinds:
            pools["long"] = long_prompts(tokenizer, max(batches))
        if "chat" in kinds:
            pools["chat"] = chat_prompts(tokenizer)
        size = label(size)
        for kind in kinds:
            same = greedy_identical(policy, model, tokenizer, pools[kind][:4], 2)
            print(f"\n[{size}] {n_params:.2f}M parameters; {kind} prompts: greedy fast == raw model.generate: {same}")
            notes.append(f"{size}/{kind}: greedy identical {same}")
            for n in ns:
                for batch in batches:
                    if batch % n:
                        continue
                    prompts = (pools[kind] * (batch // len(pools[kind]) + 1))[: batch // n]
                    lengths = [len(tokenizer(p).input_ids) for p in prompts]
                    flops = lambda ids, lengths=lengths, n=n: flops_of(lengths, n, ids, eos)  # noqa: E731
                    print(f"[{size}] {kind} prompts (mean {statistics.mean(lengths):.0f} tokens), n={n}, batch={batch}")

                    def fast_side(prompts=prompts, n=n):
                        return fast(policy, prompts, n, tokens_n, args.seed)

                    def bf16_side(prompts=prompts, n=n):
                        return fast(policy, prompts, n, tokens_n, args.seed, bf16=True)

                    def raw_side(prompts=prompts, n=n):
                        return raw(model, tokenizer, prompts, n, tokens_n, args.seed)

                    sides = {"raw": timed(raw_side, eos, flops), "fast": timed(fast_side, eos, flops, phases=True)}
                    if with_bf16:
                        sides["bf16"] = timed(bf16_side, eos, flops, phases=True)
                    for fn in sides.values():
                        fn()  # warm-up
                    res = common.interleaved(sides, repeats)
                    med = {k: {m: common.median(v, m) for m in v[0]} for k, v in res.items()}
                    r = med["raw"]
                    row = [size, kind, n, batch, int(med["fast"]["tokens"]), r["tokens_per_s"], med["fast"]["tokens_per_s"],
                           med["fast"]["tokens_per_s"] / r["tokens_per_s"],
                           med["fast"]["tokens_per_cpu_s"] / r["tokens_per_cpu_s"]]
                    if with_bf16:
                        row += [med["bf16"]["tokens_per_s"] / r["tokens_per_s"],
                                med["bf16"]["tokens_per_cpu_s"] / r["tokens_per_cpu_s"]]
                    share = med["fast"]["prefill_s"] / (med["fast"]["prefill_s"] + med["fast"]["decode_s"])
                    row += [r["gflops"], med["fast"]["gflops"]] + ([med["bf16"]["gflops"]] if with_bf16 else []) + [
                        f"{100 * share:.0f}%"]
                    rows.append(row)
                    if kind == "short" and n == 1:
                        headline.setdefault(size, row)  # the smallest batch
                    elif kind == "chat" and n == 1:
                        headline[f"{size}, batch {batch}"] = row  # a real model: every batch (target >= 2 at each)
        if args.profile:
            profile(f"{size} fast", lambda: fast(policy, pools[kinds[0]][: batches[0]], 1, tokens_n, args.seed))
            profile(f"{size} raw", lambda: raw(model, tokenizer, pools[kinds[0]][: batches[0]], 1, tokens_n, args.seed))

    if rows:
        print_matrix(rows, notes, with_bf16, peak32, peak16)
    if "split" in args.sections:
        print_split(sizes, batches, tokens_n)
    if with_compile:
        compile_section(sizes, batches, tokens_n, args.seed, repeats)

    for size, row in headline.items():
        target = "target >= 2" if row[1] == "chat" else "target >= 2 at batch 8"
        note = f"{row[1]} prompts, n={row[2]}, batch={row[3]}, fp32, eager; {target}"
        print(common.ratio_line(f"ours/raw tokens/s [{size}]", row[7], row[8], note))


def print_matrix(rows, notes, with_bf16, peak32, peak16) -> None:
    header = ["model", "prompts", "n", "batch", "tokens/call", "raw tok/s", "fast tok/s", "fast/raw", "fast/raw (cpu)"]
    if with_bf16:
        header += ["bf16/raw", "bf16/raw (cpu)"]
    header += ["raw GFLOP/s", "fast GFLOP/s"] + (["bf16 GFLOP/s"] if with_bf16 else []) + ["fast prefill share"]
    print(f"\nmedian generated tokens/s (up to and including the first EOS); ratios of medians vs raw model.generate (fp32), "
          f"wall clock and per CPU-second of this process; achieved model GFLOP/s (fp32 matmul peak {peak32:.0f}, bf16 "
          f"{peak16:.0f}); fast = eager decode step, no compile time:")
    print(common.table(header, rows))
    print("greedy token identity (fast vs raw, 24 new tokens, n=2): " + "; ".join(notes))


def print_split(sizes, batches, tokens_n) -> None:
    print("\nwhere the fast sampler's time goes (eager decode step, CPU ms per step; GEMMs = the same F.linear calls alone):")
    split_rows = []
    for size in sizes:
        model, tokenizer = build(size)
        policy = PolicyModel(model, tokenizer)
        for batch in sorted({batches[0], batches[-1]}):
            b = decode_breakdown(policy, (pool(size, tokenizer) * 8)[:batch], tokens_n)
            rest = b["step"] - b["gemm"]
            split_rows.append([label(size), batch, 1e3 * b["step"], 1e3 * b["gemm"], f"{100 * b['gemm'] / b['step']:.0f}%",
                               1e3 * rest, 1e3 * b["select"]])
    print(common.table(["model", "batch", "step ms", "GEMMs ms", "GEMM share", "rest ms (attention, norms, RoPE, dispatch)",
                        "token selection ms (outside the step)"], split_rows))


def compile_section(sizes, batches, tokens_n, seed, repeats) -> None:
    """The compiled decode step: compile seconds (first call of a bucket), steady state vs eager, break-even calls;
    then the demo GRPO stage's sampling with and without compiling."""
    print("\ncompiled decode step (torch.compile, one graph per bucket; short prompts, n=1), fp32 and bf16 mode. compile s = "
          "first call minus a steady call; break-even = compile s / (eager s - compiled s per call), fp32:")
    rows = []
    for size in sizes:
        model, tokenizer = build(size)
        policy = PolicyModel(model, tokenizer)
        eos = tokenizer.eos_token_id
        for batch in sorted({batches[0], batches[-1]}):
            prompts = (pool(size, tokenizer) * 8)[:batch]
            first = {}
            for bf16 in (False, True):
                start = time.perf_counter()
                fast(policy, prompts, 1, tokens_n, seed, bf16=bf16, compile=True)
                first[bf16] = time.perf_counter() - start
            sides = {"eager": timed(lambda p=prompts: fast(policy, p, 1, tokens_n, seed), eos),
                     "compiled": timed(lambda p=prompts: fast(policy, p, 1, tokens_n, seed, compile=True), eos),
                     "bf16c": timed(lambda p=prompts: fast(policy, p, 1, tokens_n, seed, bf16=True, compile=True), eos),
                     "raw": timed(lambda p=prompts: raw(model, tokenizer, p, 1, tokens_n, seed), eos)}
            for fn in sides.values():
                fn()
            res = common.interleaved(sides, repeats)
            sec = {k: common.median(v, "seconds") for k, v in res.items()}
            tps = {k: common.median(v, "tokens_per_s") for k, v in res.items()}
            cpu = {k: common.median(v, "tokens_per_cpu_s") for k, v in res.items()}
            compile_s = first[False] - sec["compiled"]
            gain = sec["eager"] - sec["compiled"]
            rows.append([label(size), batch, compile_s, first[True] - sec["bf16c"], sec["raw"], sec["eager"], sec["compiled"],
                         tps["eager"] / tps["raw"], tps["compiled"] / tps["raw"], cpu["compiled"] / cpu["raw"],
                         tps["bf16c"] / tps["raw"], cpu["bf16c"] / cpu["raw"], f"{compile_s / gain:.0f}" if gain > 0 else "never"])
    print(common.table(["model", "batch", "compile s", "compile s (bf16)", "raw s/call", "eager s/call", "compiled s/call",
                        "eager/raw", "compiled/raw", "compiled/raw (cpu)", "compiled bf16/raw", "compiled bf16/raw (cpu)",
                        "break-even calls"], rows))

    if any(Path(size).is_dir() for size in sizes):
        return  # the demo GRPO stage's sampling below is the demo world's
    # the demo GRPO stage's sampling: 30 rollouts of 32 prompts x 8 samples, 40 new tokens, tiny model
    model, tokenizer = build("tiny")
    policy = PolicyModel(model, tokenizer)
    prompts = short_prompts()[:32]
    stage = {}
    for side, kw in (("raw model.generate", None), ("fast eager", dict()), ("fast compiled", dict(compile=True))):
        start = time.perf_counter()
        for step in range(30):
            if kw is None:
                raw(model, tokenizer, prompts, 8, 40, seed + step)
            else:
                fast(policy, prompts, 8, 40, seed + step, **kw)
        stage[side] = time.perf_counter() - start
        print(f"  demo GRPO stage sampling (30 x 256 rows x <= 40 tokens, tiny), {side}: {stage[side]:.1f} s", flush=True)
    print(f"demo GRPO stage sampling: fast eager {stage['raw model.generate'] / stage['fast eager']:.2f}x raw, fast compiled "
          f"(compile included) {stage['raw model.generate'] / stage['fast compiled']:.2f}x raw")


if __name__ == "__main__":
    main()
