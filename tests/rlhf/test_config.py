from pathlib import Path

import pytest
import yaml

from rlhf.config import load_config, parse_overrides
from rlhf.errors import UserError
from rlhf.pipeline import STAGES, PipelineConfig, load_pipeline, recipe
from rlhf.recipes import sft

ROOT = Path(__file__).resolve().parents[2]


def test_overrides_are_parsed_as_yaml_and_applied(tmp_path):
    cfg = load_config(sft.Config, None, parse_overrides(["train.max_steps=7", "optim.lr=1e-4", "model.path=x", "model.lora={r: 4}"]))
    assert cfg.train.max_steps == 7 and cfg.optim.lr == 1e-4 and cfg.model.lora.r == 4


def test_unknown_key_names_it_and_suggests_the_nearest(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text("train:\n  max_step: 3\n")
    with pytest.raises(UserError, match=r"unknown config key 'train.max_step' \(did you mean 'train.max_steps'\?\)"):
        load_config(sft.Config, path)
    with pytest.raises(UserError, match="did you mean 'prompt_loss_weight'"):
        load_config(sft.Config, None, parse_overrides(["prompt_los_weight=1"]))


def test_wrong_type_names_key_and_expected_type():
    with pytest.raises(UserError, match=r"config key 'train.max_steps'.*expected int.*'many'"):
        load_config(sft.Config, None, parse_overrides(["train.max_steps=many"]))


def test_bad_override_syntax_and_missing_file():
    with pytest.raises(UserError, match="key=value"):
        parse_overrides(["train.max_steps"])
    with pytest.raises(UserError, match="config file not found"):
        load_config(sft.Config, "nope.yaml")


def test_fingerprint_ignores_tracking_and_output_dir():
    a = load_config(sft.Config, None, {"output_dir": "a", "tracking.mode": "disabled"})
    b = load_config(sft.Config, None, {"output_dir": "b"})
    c = load_config(sft.Config, None, {"optim.lr": 0.5})
    assert a.fingerprint() == b.fingerprint() != c.fingerprint()


def _config_files():
    # configs/accelerate/ holds accelerate's launch configs, checked by tests/rlhf/test_multiprocess.py
    return sorted(p for p in (ROOT / "configs").rglob("*.yaml") if p.parent.name != "accelerate")


@pytest.mark.parametrize("path", _config_files(), ids=lambda p: str(p.relative_to(ROOT / "configs")))
def test_every_config_loads_into_its_schema_and_documents_itself(path):
    """Each YAML has a header (what it runs, how long) and loads into the schema of its kind."""
    text = path.read_text()
    header = text.split("\n\n")[0]
    assert text.startswith("#") and "2 CPU cores" in header, f"{path} needs a header saying what it runs and how long"
    data = yaml.safe_load(text)
    if "stages" in data:
        cfg, _ = load_pipeline(path, [])
        assert isinstance(cfg, PipelineConfig)
        for spec in cfg.stages:
            if spec.config:
                load_config(recipe(spec.kind).Config, ROOT / spec.config)
        return
    kind = path.parent.name if path.parent.name in STAGES else path.stem  # configs/<model>/<stage>.yaml
    if kind not in STAGES:
        pytest.skip(f"{kind} configs are validated by their own package's tests")
    load_config(recipe(kind).Config, path)


def test_dotted_keys_index_into_lists():
    from rlhf.config import set_dotted
    from rlhf.errors import UserError

    data = {"rewards": [{"name": "rm", "model": "old"}]}
    set_dotted(data, "rewards.0.model", "runs/demo/reward")
    assert data == {"rewards": [{"name": "rm", "model": "runs/demo/reward"}]}
    with pytest.raises(UserError, match="'rewards.1.model': '1' is not an index of a list of 1 items"):
        set_dotted(data, "rewards.1.model", "x")
