from pathlib import Path

import pytest

from ringserve.config.settings import HostSpec, Settings, load_settings
from ringserve.distributed.layout import RankMemory, choose_layout, rank_budgets
from ringserve.errors import ConfigError

GIB = 1024**3
NO_FILE = Path("/nonexistent/.env")


def test_auto_is_tensor_for_equal_ranks_and_a_model_that_divides() -> None:
    assert choose_layout("auto", [16 * GIB, 16 * GIB], divides=True) == "tensor"
    # Measured free memory moves a little between equal machines.
    assert choose_layout("auto", [16 * GIB, int(15.5 * GIB)], divides=True) == "tensor"


def test_auto_is_a_pipeline_for_unequal_ranks_or_a_model_that_does_not_divide() -> None:
    assert choose_layout("auto", [128 * GIB, 16 * GIB], divides=True) == "pipeline"
    assert choose_layout("auto", [16 * GIB, 16 * GIB], divides=False) == "pipeline"


def test_a_chosen_layout_is_kept_and_one_rank_is_single() -> None:
    assert choose_layout("tensor", [128 * GIB, 16 * GIB], divides=True) == "tensor"
    assert choose_layout("pipeline", [16 * GIB, 16 * GIB], divides=True) == "pipeline"
    assert choose_layout("pipeline", [16 * GIB], divides=True) == "single"


def test_parallel_must_be_a_known_layout() -> None:
    with pytest.raises(ConfigError, match="RINGSERVE_PARALLEL='ring' is invalid"):
        load_settings(NO_FILE, {"RINGSERVE_PARALLEL": "ring"})


def test_ranks_sharing_a_hosts_ram_share_its_budget_or_its_free_memory() -> None:
    local = [RankMemory(0, 8 * GIB, False), RankMemory(0, 8 * GIB, False)]
    assert rank_budgets(Settings(), local) == [4 * GIB, 4 * GIB]
    assert rank_budgets(Settings(memory_budget=2 * GIB), local) == [GIB, GIB]


def test_a_gpu_of_its_own_is_a_ranks_whole_budget() -> None:
    gpus = [RankMemory(0, 80 * GIB, True), RankMemory(0, 40 * GIB, True)]
    assert rank_budgets(Settings(), gpus) == [80 * GIB, 40 * GIB]


def test_a_hosts_budget_wins_and_may_list_one_per_rank() -> None:
    settings = Settings(
        memory_budget=GIB,
        hosts=(
            HostSpec(host="10.0.0.1", ranks=2, memory_budget=(3 * GIB, GIB)),
            HostSpec(host="10.0.0.2", memory_budget=16 * GIB),
            HostSpec(host="10.0.0.3"),
        ),
    )
    ranks = [
        RankMemory(0, 64 * GIB, False),
        RankMemory(0, 64 * GIB, False),
        RankMemory(1, 64 * GIB, False),
        RankMemory(2, 64 * GIB, False),
    ]
    assert rank_budgets(settings, ranks) == [3 * GIB, GIB, 16 * GIB, GIB]


def test_a_budget_list_must_have_one_entry_per_rank() -> None:
    hosts = '[{"host": "10.0.0.1", "ranks": 2, "memory_budget": [1000]}]'
    with pytest.raises(ConfigError, match="lists 1 budgets for the host's 2 ranks"):
        load_settings(NO_FILE, {"RINGSERVE_HOSTS": hosts})


def test_a_rank_that_did_not_find_its_host_gets_no_other_hosts_budget() -> None:
    settings = Settings(
        hosts=(HostSpec(host="10.0.0.1"), HostSpec(host="10.0.0.2", memory_budget=16 * GIB))
    )
    ranks = [RankMemory(0, 8 * GIB, False), RankMemory(-1, 4 * GIB, False)]
    assert rank_budgets(settings, ranks) == [8 * GIB, 4 * GIB]
