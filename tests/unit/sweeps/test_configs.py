"""The sweepers' sampler presets: the sampler a study builds from them, and how the sweep's first line states it."""

from __future__ import annotations

import optuna
import pytest
from omegaconf import OmegaConf

from src.sweeps.configs import build_sampler, sampler_settings, sampler_text
from tests.conftest import ROOT, compose_hydra

PACKED_AND_PARALLEL = ("hydra.sweeper.pack=2", "hydra.sweeper.n_jobs=2", "hydra.sweeper.sampler.seed=0")


@pytest.mark.parametrize("sweep", ["rank_alpha", "config"])
def test_a_packed_parallel_tpe_study_samples_multivariate_with_the_constant_liar(sweep):
    """Trials asked together (packs, n_jobs) need the liar, or TPE proposes one point for all of them."""
    overrides = PACKED_AND_PARALLEL + (("hydra/sweeper=lora_optuna",) if sweep == "config" else ())
    config_dir = ROOT / ("sweeps" if sweep == "rank_alpha" else "conf")
    cfg = compose_hydra(config_dir, sweep, overrides)
    conf = OmegaConf.to_container(cfg.hydra.sweeper.sampler, resolve=True)
    sampler = build_sampler(conf)
    assert isinstance(sampler, optuna.samplers.TPESampler)
    # TPESampler keeps its settings private: read them as the sampler will use them.
    assert sampler._multivariate is True and sampler._constant_liar is True and sampler._n_startup_trials == 10
    stated = "TPE (multivariate, constant liar, 10 random startup trials, seed 0)"
    assert sampler_text(conf, objectives=1, asked=16) == stated


def test_the_settings_not_given_are_the_installed_optunas_defaults():
    settings = sampler_settings({"_target_": "optuna.samplers.TPESampler", "seed": 3})
    assert settings["seed"] == 3 and settings["n_startup_trials"] == 10 and settings["group"] is False
    # Optuna 5: the liar on; multivariate decided by the number of objectives (None).
    assert settings["constant_liar"] is True and settings["multivariate"] is None
    conf = {"_target_": "optuna.samplers.TPESampler", "seed": None}
    assert sampler_text(conf, 1, 1) == "TPE (multivariate, constant liar, 10 random startup trials, no seed)"
    assert sampler_text(conf, 2, 1) == "TPE (independent, constant liar, 10 random startup trials, no seed)"


def test_tpe_without_the_liar_says_that_trials_asked_together_may_repeat_a_point():
    conf = {"_target_": "optuna.samplers.TPESampler", "multivariate": True, "constant_liar": False, "seed": 1}
    alone = sampler_text(conf, 1, asked=1)
    assert alone == "TPE (multivariate, no constant liar, 10 random startup trials, seed 1)"
    together = sampler_text(conf, 1, asked=8)
    assert together.startswith(alone) and "the 8 trials asked at once may repeat one point" in together
    assert "hydra.sweeper.sampler.constant_liar=true" in together


def test_other_samplers_state_their_given_arguments_and_seed():
    assert sampler_text({"_target_": "optuna.samplers.RandomSampler", "seed": 0}, 1, 4) == "Random (seed 0)"
    nsga = {"_target_": "optuna.samplers.NSGAIISampler", "seed": None, "population_size": 8}
    assert sampler_text(nsga, 2, 4) == "NSGAII (population_size=8, no seed)"
