"""Every YAML in ``conf/`` composes, and every method / task config instantiates and validates.

Groups are globbed, never hard-coded, so a new ``conf/method/<name>.yaml`` is tested for free.
Model configs are only checked for their keys (loading real models is not a unit test), and
``tiny_random`` for availability.
"""

from __future__ import annotations

from pathlib import Path

import pytest
from hydra import compose, initialize_config_dir
from hydra.utils import instantiate
from omegaconf import OmegaConf

from retrobench.cli import GROUPS, conf_dir
from retrobench.runner.run import validate

CONF = conf_dir()
BASE = ["model=tiny_random", "logger=none"]


def _names(group: str) -> list[str]:
    return sorted(p.stem for p in (CONF / group).glob("*.yaml"))


def _compose(overrides: list[str], hydra: bool = False):
    with initialize_config_dir(str(CONF), version_base="1.3"):
        return compose("config", overrides=overrides, return_hydra_config=hydra)


CASES = [(group, name) for group in GROUPS for name in _names(group)]


def test_every_group_has_configs() -> None:
    for group in ("model", "method", "task", "engine", "logger", "hydra", "experiment", "sweep"):
        assert _names(group), f"conf/{group}/ is empty"


@pytest.mark.parametrize(("group", "name"), CASES, ids=[f"{g}={n}" for g, n in CASES])
def test_config_composes(group: str, name: str, tmp_path: Path) -> None:
    overrides = [o for o in BASE if not o.startswith(f"{group}=")] + [
        f"{group}={name}",
        f"results_dir={tmp_path}",
    ]
    cfg = _compose(overrides, hydra=True)
    assert cfg.hydra.runtime.choices[group] == name
    assert str(cfg.hydra.run.dir).startswith(str(tmp_path))
    OmegaConf.resolve(cfg.model)  # no dangling interpolations
    for key in ("seed", "results_dir", "overwrite", "device"):
        assert key in cfg


@pytest.mark.parametrize("name", _names("model"))
def test_model_config_keys(name: str) -> None:
    from retrobench.inputs.models import SOURCES

    cfg = _compose([f"model={name}"])
    assert cfg.model.name == name
    assert cfg.model.source in SOURCES
    assert int(cfg.model.max_context) > 0


def test_tiny_random_is_available() -> None:
    from retrobench.inputs.models import check_model_available

    check_model_available(_compose(BASE).model)


@pytest.mark.parametrize("name", _names("method"))
def test_method_instantiates_and_validates(name: str) -> None:
    cfg = _compose([*BASE, f"method={name}"])
    method = instantiate(cfg.method, _convert_="all")
    assert method.settings()["method"] == method.name
    validate(cfg)


@pytest.mark.parametrize("name", _names("task"))
def test_task_instantiates_and_validates(name: str) -> None:
    cfg = _compose([*BASE, f"task={name}"])
    task = instantiate(cfg.task, _convert_="all")
    assert task.version and task.name
    validate(cfg)


@pytest.mark.parametrize("name", _names("experiment"))
def test_experiment_validates(name: str, tmp_path: Path) -> None:
    """Every experiment validates; those of `make reproduce` (conf/reproduce.yaml) as the first job of
    their grid under the ``tiny`` profile (tiny_random, offline data): the paper's hub models and
    hub data are never needed by a test. tests/test_experiments.py runs each one end to end."""
    from retrobench.drivers import reproduce

    listed = [e for e in reproduce.entries("tiny") if e.experiment == name]
    if not listed:
        validate(_compose([f"experiment={name}"]))
        return
    entry = reproduce._substitute(listed[0], tmp_path / reproduce.OFFLINE_FOLDER)
    reproduce.write_offline_data(tmp_path / reproduce.OFFLINE_FOLDER)
    validate(_compose(reproduce.grid(entry, str(tmp_path), [])[0]))


def test_sweep_sets_multirun() -> None:
    for name in _names("sweep"):
        cfg = _compose([f"sweep={name}"], hydra=True)
        assert str(cfg.hydra.mode) == "RunMode.MULTIRUN" and cfg.hydra.sweeper.params
