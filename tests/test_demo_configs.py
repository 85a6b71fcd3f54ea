"""The demo merges every expert of the family it built, whatever the preset."""

import importlib.util
from pathlib import Path

import yaml

REPO = Path(__file__).resolve().parents[1]


def _demo():
    spec = importlib.util.spec_from_file_location("demo", REPO / "scripts" / "demo_toy.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_the_example_configs_are_used_as_they_are_for_their_own_family():
    demo = _demo()
    for example in demo.CONFIGS.values():
        assert demo.config_for(example, ("rot", "sub")) == example


def test_a_four_expert_family_gets_every_expert_in_each_config(tmp_path, monkeypatch):
    demo = _demo()
    monkeypatch.setattr(demo, "WORK", tmp_path)
    tasks = ("a", "b", "c", "d")
    for name, example in demo.CONFIGS.items():
        written = demo.config_for(example, tasks)
        assert written.parent == tmp_path / "configs"
        original = yaml.safe_load(example.read_text())
        config = yaml.safe_load(written.read_text())
        assert [m["model"] for m in config["models"]] == [
            f"demo-out/family/expert-{t}" for t in tasks
        ]
        for task, model in zip(tasks, config["models"], strict=True):
            scores = model["parameters"].get("lrp_scores")
            assert scores in (None, f"demo-out/scores/{task}.safetensors"), name
        assert config.get("parameters") == original.get("parameters"), name
