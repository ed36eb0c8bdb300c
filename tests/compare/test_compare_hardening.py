"""`rlhf compare` refuses what cannot work before it starts a run: a missing base checkpoint, an input every run
lacks, a seed outside [0, 2³²), and `--report-only` where nothing has run yet."""

from __future__ import annotations

import pytest

from .conftest import comparison_config, write_config
from rlhf.compare.config import load_compare
from rlhf.compare.runner import run_comparison
from rlhf.errors import UserError


def _config(tmp_path, inputs, **changes) -> str:
    cfg = comparison_config(inputs, tmp_path / "out", seeds=[0], tracking={"mode": "disabled"},
                            eval={"every_samples": 16, "completions": 0}, isolate=False, **changes)
    return write_config(tmp_path / "c.yaml", cfg)


def test_a_missing_base_is_refused_before_any_run_starts(tmp_path, compare_inputs):
    path = _config(tmp_path, compare_inputs, base=str(tmp_path / "no-such-sft"))
    with pytest.raises(UserError, match=r"config key 'base': model path not found: .*no-such-sft"):
        run_comparison(path)
    assert not (tmp_path / "out" / "grpo").exists() and not (tmp_path / "out" / "rloo").exists()


def test_an_input_every_run_lacks_is_refused_before_any_run_starts(tmp_path, compare_inputs):
    cfg = comparison_config(compare_inputs, tmp_path / "out", seeds=[0], tracking={"mode": "disabled"}, isolate=False)
    cfg["shared"]["data.prompts"] = str(tmp_path / "no-such-prompts.jsonl")
    with pytest.raises(UserError, match=r"every run would fail, starting with grpo-seed0: config key 'data.prompts': "
                                        r"not found: .*no-such-prompts.jsonl"):
        run_comparison(write_config(tmp_path / "c.yaml", cfg))
    assert not (tmp_path / "out" / "grpo").exists()


def test_report_only_on_a_fresh_directory_is_refused(tmp_path, compare_inputs):
    with pytest.raises(UserError, match=r"--report-only: nothing to report in .*out: no run of this comparison has started"):
        run_comparison(_config(tmp_path, compare_inputs), report_only=True)
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("seed", [-1, 2**32])
def test_a_seed_outside_0_to_2_pow_32_is_refused(tmp_path, compare_inputs, seed):
    with pytest.raises(UserError, match=r"config key 'seeds.0'"):
        load_compare(_config(tmp_path, compare_inputs), [f"seeds=[{seed}]"])
