"""``retrobench.generate``: any method on a given model and tokenizer from Python, the same tokens
as the CLI run of the same settings, per-sample accounting, and clear errors for bad settings."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from conftest import run_cli
from hydra.utils import instantiate
from omegaconf import OmegaConf

import retrobench
from retrobench.methods.base import ConfigError

CLI = ["model=tiny_random", "task=synthetic", "task.num_samples=2", "task.context_tokens=600", "task.num_queries=2",
       "task.max_new_tokens=12", "method=retro", "method.window=4", "method.budget=64"]  # fmt: skip


def test_generate_equals_the_cli_run(tiny_random, tmp_path: Path) -> None:
    model, tokenizer = tiny_random
    metrics, results = run_cli(tmp_path, *CLI)
    (samples,) = (results / "runs").glob("*/samples.jsonl")
    rows = [json.loads(line) for line in samples.read_text().splitlines()]
    task_cfg = OmegaConf.load(Path(__file__).resolve().parent.parent / "conf" / "task" / "synthetic.yaml")
    task_cfg.update({"num_samples": 2, "context_tokens": 600, "num_queries": 2, "max_new_tokens": 12})
    task = instantiate(task_cfg, _convert_="all")
    prompts = [s.prompt for s in task.samples(tokenizer, 0)]
    outs = retrobench.generate(model, tokenizer, prompts, method="retro", window=4, budget=64,
                               max_new_tokens=12, stop=task.stop, chat=bool(task.chat_template))  # fmt: skip
    batched = retrobench.generate(model, tokenizer, prompts, method="retro", window=4, budget=64, batch_size=2,
                                  max_new_tokens=12, stop=task.stop, chat=bool(task.chat_template))  # fmt: skip
    assert [o.text for o in batched] == [o.text for o in outs]
    assert [o.exposure for o in batched] == pytest.approx([o.exposure for o in outs])
    assert [o.text for o in outs] == [r["output"] for r in rows]
    assert [o.finish_reason for o in outs] == [r["finish_reason"] for r in rows]
    for o, r in zip(outs, rows):
        assert o.exposure == pytest.approx(r["stats"]["exposure"]) and o.exposure > 1.0
        assert o.attended_kv == pytest.approx(r["stats"]["attended_kv"]) and o.prompt_tokens == r["prompt_tokens"]
        assert o.tokens_per_s and o.tokens_per_s > 0 and o.ttft_s > 0


def test_generate_takes_one_prompt_and_any_method(tiny_random) -> None:
    model, tokenizer = tiny_random
    (quest,) = retrobench.generate(model, tokenizer, "abc", method="quest", budget=0.5, max_new_tokens=4)
    (full,) = retrobench.generate(model, tokenizer, "abc", method="full", max_new_tokens=4)
    assert len(quest.tokens) == len(full.tokens) == 4 and full.exposure == 1.0


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [({"method": "nope"}, "method=nope is not a method"), ({"method": "full", "budget": 32}, "budget does not apply"),
     ({"method": "quest", "windw": 3}, "windw is not a setting of method=quest"),
     ({"method": "quest", "budget": "2048"}, "budget must be an int"),
     ({"method": "quest", "batch_size": 0}, "batch_size must be an integer >= 1")],
)  # fmt: skip
def test_bad_settings_name_the_key(tiny_random, kwargs, match) -> None:
    with pytest.raises(ConfigError, match=match):
        retrobench.generate(*tiny_random, ["abc"], max_new_tokens=2, **kwargs)
