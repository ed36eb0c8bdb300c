"""PPO step memory and time: PPO with LoRA (policy, reference, critic and reward model on one frozen base) vs an SFT
step with LoRA on the same model, and vs PPO with full separate copies (policy, reference, critic, reward model).

Every configuration runs in a process of its own (peak RSS is per process: `VmHWM` of /proc/self/status, which a
subprocess does not inherit from its parent) that imports what the recipes import, notes its RSS after imports (the
Python runtime: torch, transformers, accelerate, peft), then calls the stage's recipe `run(cfg, ctx)` through
`common.run_recipe` (tracking disabled, log every step, no evaluation, no checkpoints). Reported per configuration:
peak RSS, runtime RSS, their difference (the memory the models, optimizer states and activations take), and the
median of the recipe's own `perf/step_seconds` over the steps after `--warmup`. The processes run one after another
so their times do not compete (except in `--quick`).

Shared inputs, built once: the demo Llama (random init; "medium" = hidden 512 × 8 layers, about 25M parameters, by
default; `--quick`: the "nano" one) with the demo tokenizer and the action tokens, saved as the SFT stage would
leave it; two reward models on the same weights with stored statistics, as the reward stage writes them: one trained
in full (`rm_full`, a full `AutoModelForSequenceClassification`) and one trained as LoRA on the policy's base
(`rm_lora`: the merged weights plus its unmerged `adapter/`); the review prompts of data/demo/rl_prompts.jsonl; the first
512 SFT rows of data/demo/sft.jsonl.

- sft_lora: the `sft` recipe, LoRA (r 8, all linear layers), batch = PPO's micro-batch (B rows), max_length = the
  prompt + response budget, so both forward/backward the same number of rows of about the same length.
- ppo_lora: the `ppo` recipe, LoRA, `critic.kind: adapter`, reward = `rm_lora`: policy, reference (adapters off),
  critic (a second adapter + head, initialised from the reward adapter) and reward model (a third, frozen adapter)
  all on one frozen base.
- ppo_lora_rm_copy: the same with the fully trained reward model `rm_full`, a second copy of the weights.
- ppo_full: the `ppo` recipe without LoRA: the policy, a frozen reference copy, a separate critic initialised from
  `rm_full` (`critic.kind: model`) with its own AdamW states, and `rm_full`.
One PPO step = P prompts × n samples (B rows) of at most N new tokens, K = 1 epoch of one minibatch, fp32, one thread.

    python benchmarks/bench_ppo.py            # medium model, P=8, n=2, N=32, 1 warm-up + 3 timed steps
    python benchmarks/bench_ppo.py --quick    # smoke run: nano model, 1 warm-up + 1 timed step, the 4 processes
                                              # at once (< 60 s; its times compete and are not comparable)
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import tempfile
import warnings
from pathlib import Path

import common

torch = common.setup_torch(1)

CONFIGS = ("sft_lora", "ppo_lora", "ppo_lora_rm_copy", "ppo_full")
MEDIUM = dict(hidden_size=512, intermediate_size=1376, num_hidden_layers=8, num_attention_heads=8, num_key_value_heads=8)
RL_PROMPTS = common.REPO / "data" / "demo" / "rl_prompts.jsonl"
LORA = {"r": 8, "alpha": 16}


def status_mib(field: str) -> float:
    """VmRSS (now) or VmHWM (peak of this process image) from /proc/self/status, in MiB."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1]) / 1024
    raise RuntimeError(f"no {field} in /proc/self/status")


# -- shared inputs ---------------------------------------------------------------------------------------------------


def build_inputs(root: Path, size: str) -> dict[str, str]:
    """The policy (as SFT leaves it), a reward model on the same weights with stored statistics, prompts, SFT rows."""
    from transformers import LlamaConfig, LlamaForCausalLM

    from reward_models.model import RewardModel
    from rlhf.config import LoraSettings
    from rlhf.policy import add_special_tokens, load_tokenizer
    from rlhf.world import ACTION_TOKENS, build_tiny_lm

    tokenizer = load_tokenizer(str(common.TOKENIZER))
    if size == "medium":
        torch.manual_seed(0)
        model = LlamaForCausalLM(LlamaConfig(
            vocab_size=len(tokenizer), max_position_embeddings=256, pad_token_id=tokenizer.pad_token_id,
            bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id, tie_word_embeddings=True, **MEDIUM))
    else:
        model = build_tiny_lm(tokenizer, size, seed=0)
    add_special_tokens(model, tokenizer, ACTION_TOKENS)
    policy = root / "policy"
    model.save_pretrained(policy)
    tokenizer.save_pretrained(policy)
    for name, lora in (("rm_full", None), ("rm_lora", LoraSettings(**LORA))):  # as the reward stage saves them
        rm = RewardModel.from_backbone(str(policy), lora=lora)
        rm.set_stats(torch.tensor([0.0, 1.0, -1.0, 0.5]), "benchmark")
        rm.save(root / name)
    rows = [json.loads(line) for line in RL_PROMPTS.read_text().splitlines() if line.strip()]
    prompts = root / "prompts.jsonl"
    prompts.write_text("".join(json.dumps(r) + "\n" for r in rows if r["task"] == "review"))
    sft_rows = root / "sft.jsonl"  # the first 512 demonstrations: enough for a few steps, quick to tokenize
    sft_rows.write_text("".join(common.SFT_DATA.read_text().splitlines(keepends=True)[:512]))
    return {"policy": str(policy), "rm_full": str(root / "rm_full"), "rm_lora": str(root / "rm_lora"), "prompts": str(prompts),
            "sft": str(sft_rows), "params": sum(t.numel() for t in model.parameters())}


# -- one configuration, in a child process ----------------------------------------------------------------------------


def config_for(name: str, inputs: dict, out: Path, args):
    from rlhf.config import LoopSettings, LoraSettings, ModelSettings, OptimSettings, RLSettings, SamplingSettings
    from rlhf.config import TrackingSettings, TrainSettings
    from rlhf.recipes import ppo, sft
    from rlhf.recipes.rl_settings import PromptData, RLEvalSettings
    from reward_models.scoring import RewardComponent

    steps = args.warmup + args.steps
    rows = args.prompts * args.n
    lora = LoraSettings(**LORA)
    if name == "sft_lora":
        return "sft", sft.Config(
            seed=0, output_dir=str(out), model=ModelSettings(path=inputs["policy"], lora=lora),
            data=sft.SFTData(train=inputs["sft"], eval=None, eval_fraction=0.0, gold_prompts=None,
                             max_length=args.tokens + 16),
            train=TrainSettings(max_steps=steps, batch_size=rows, log_every=1, eval_every=0, save_every=0),
            optim=OptimSettings(lr=1e-4, schedule="constant"), tracking=TrackingSettings(mode="disabled"))
    rm = RewardComponent(name="rm", model=inputs["rm_lora" if name == "ppo_lora" else "rm_full"])
    critic = ppo.CriticSettings(kind="model" if name == "ppo_full" else "adapter")
    return "ppo", ppo.Config(
        seed=0, output_dir=str(out), model=ModelSettings(path=inputs["policy"], lora=None if name == "ppo_full" else lora),
        data=PromptData(prompts=inputs["prompts"]), rewards=[rm],
        sampling=SamplingSettings(n=args.n, max_new_tokens=args.tokens), critic=critic,
        rl=RLSettings(prompts_per_step=args.prompts, epochs=1, minibatches=1, micro_batch_size=rows),
        kl=ppo.PPOKLSettings(beta=0.1, target=None), train=LoopSettings(max_steps=steps, log_every=1),
        optim=ppo.PPOOptimSettings(lr=1e-4, schedule="constant"), eval=RLEvalSettings(prompts=None), samples_every=0,
        tracking=TrackingSettings(mode="disabled"))


def child(args) -> None:
    """One configuration: print its runtime RSS, peak RSS (MiB) and median step seconds as JSON."""
    import contextlib
    import io

    from accelerate import Accelerator  # noqa: F401  (what the recipes import lazily)
    from peft import LoraConfig  # noqa: F401
    from transformers import AutoModelForSequenceClassification, GenerationConfig, LlamaForCausalLM  # noqa: F401

    from rlhf import pipeline  # noqa: F401
    from rlhf.recipes import ppo, sft  # noqa: F401

    runtime = status_mib("VmRSS")
    inputs = json.loads(Path(args.inputs).read_text())
    kind, cfg = config_for(args.child, inputs, Path(args.out), args)
    with contextlib.redirect_stdout(io.StringIO()), contextlib.redirect_stderr(io.StringIO()):
        rows = common.run_recipe(kind, cfg)
    peak = status_mib("VmHWM")
    timed = [rows[s]["perf/step_seconds"] for s in range(args.warmup + 1, args.warmup + args.steps + 1)]
    print("RESULT " + json.dumps({"config": args.child, "runtime_mib": runtime, "peak_mib": peak,
                                  "step_seconds": statistics.median(timed)}))


def start_child(name: str, inputs_file: Path, root: Path, args) -> subprocess.Popen:
    cmd = [sys.executable, str(Path(__file__).resolve()), "--child", name, "--inputs", str(inputs_file),
           "--out", str(root / name), "--prompts", str(args.prompts), "--n", str(args.n), "--tokens", str(args.tokens),
           "--warmup", str(args.warmup), "--steps", str(args.steps)]
    return subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, cwd=common.REPO)


def child_result(name: str, proc: subprocess.Popen) -> dict:
    stdout, stderr = proc.communicate()
    lines = [line for line in stdout.splitlines() if line.startswith("RESULT ")]
    if proc.returncode != 0 or not lines:
        raise RuntimeError(f"{name} failed (rc={proc.returncode}):\n{stdout[-2000:]}\n{stderr[-4000:]}")
    return json.loads(lines[-1][len("RESULT "):])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="smoke run: nano model, P=2, n=2, N=8, 1 warm-up + 1 timed step")
    parser.add_argument("--size", default=None, help="nano | tiny | small | medium (default medium)")
    parser.add_argument("--prompts", type=int, default=None, help="P: prompts per step (default 8)")
    parser.add_argument("--n", type=int, default=2, help="samples per prompt (default 2)")
    parser.add_argument("--tokens", type=int, default=None, help="N: max new tokens (default 32)")
    parser.add_argument("--warmup", type=int, default=1, help="untimed steps first (default 1)")
    parser.add_argument("--steps", type=int, default=None, help="timed steps (default 3)")
    parser.add_argument("--child", choices=CONFIGS, help=argparse.SUPPRESS)
    parser.add_argument("--inputs", help=argparse.SUPPRESS)
    parser.add_argument("--out", help=argparse.SUPPRESS)
    args = parser.parse_args()
    args.size = args.size or ("nano" if args.quick else "medium")
    args.prompts = args.prompts or (2 if args.quick else 8)
    args.tokens = args.tokens or (8 if args.quick else 32)
    args.steps = args.steps or (1 if args.quick else 3)
    warnings.filterwarnings("ignore")
    if args.child:
        return child(args)

    print(common.environment(1))
    with tempfile.TemporaryDirectory(prefix="bench-ppo-") as tmp:
        root = Path(tmp)
        inputs = build_inputs(root, args.size)
        inputs_file = root / "inputs.json"
        inputs_file.write_text(json.dumps(inputs))
        print(f"model={args.size} ({inputs['params'] / 1e6:.2f}M parameters), fp32, LoRA r={LORA['r']}; PPO step: "
              f"P={args.prompts} × n={args.n} = {args.prompts * args.n} rows, N={args.tokens} new tokens, K=1; SFT step: "
              f"{args.prompts * args.n} rows of ≤ {args.tokens + 16} tokens; {args.warmup} warm-up + {args.steps} timed "
              "steps, one process per configuration\n")
        results = {}
        if args.quick:  # a smoke run: all at once (memory is per process; the times then compete, and say little)
            procs = {name: start_child(name, inputs_file, root, args) for name in CONFIGS}
        for name in CONFIGS:
            proc = procs[name] if args.quick else start_child(name, inputs_file, root, args)
            results[name] = child_result(name, proc)
            print(f"  {name}: {json.dumps({k: round(v, 4) for k, v in results[name].items() if k != 'config'})}",
                  flush=True)

    base = results["sft_lora"]
    print("\npeak RSS per process (MiB; runtime = RSS after imports; model = peak − runtime) and median step time:")
    print(common.table(
        ["config", "peak RSS", "runtime", "model", "peak / sft_lora", "model / sft_lora", "s/step"],
        [[name, r["peak_mib"], r["runtime_mib"], r["peak_mib"] - r["runtime_mib"], r["peak_mib"] / base["peak_mib"],
          (r["peak_mib"] - r["runtime_mib"]) / max(base["peak_mib"] - base["runtime_mib"], 1e-9), r["step_seconds"]]
         for name, r in results.items()]))
    lora, full = results["ppo_lora"], results["ppo_full"]
    model = lambda r: r["peak_mib"] - r["runtime_mib"]  # noqa: E731
    print(f"ppo_full / ppo_lora: peak RSS {full['peak_mib'] / lora['peak_mib']:.3f}, model memory "
          f"{model(full) / max(model(lora), 1e-9):.3f}, step time {full['step_seconds'] / lora['step_seconds']:.3f}")
    print(f"ratio ppo_lora/sft_lora peak RSS: {lora['peak_mib'] / base['peak_mib']:.3f} (target ≤ 1.5), model memory "
          f"{model(lora) / max(model(base), 1e-9):.3f}, step time {lora['step_seconds'] / base['step_seconds']:.3f}")


if __name__ == "__main__":
    main()
