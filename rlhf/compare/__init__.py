"""`rlhf compare`: PPO, GRPO, RLOO, REINFORCE++ (and DPO) from one SFT checkpoint on equal budgets and several seeds.

    config.py     the comparison config (base checkpoint, shared settings, budget, seeds, algorithms, sweep)
    runner.py     plan: budget -> each run's max_steps; run each (algorithm, seed) as an ordinary stage run
    report.py     report.html (inlined, no network) + PNGs + summary.json: curves, over-optimization, CIs over seeds
    dashboard.py  the W&B report spec (offline) and its upload (online only)
"""

from rlhf.compare.config import CompareConfig, load_compare
from rlhf.compare.runner import plan, run_comparison

__all__ = ["CompareConfig", "load_compare", "plan", "run_comparison"]
