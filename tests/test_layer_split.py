from pathlib import Path

import mlx.core as mx
import pytest

from ringserve.distributed.layer_split import (
    ModelSizes,
    check_split,
    layer_ranges,
    model_sizes,
    pipeline_split,
    stage_bytes,
)
from ringserve.errors import ConfigError, MemoryCheckError

MIB = 1024**2


def test_equal_budgets_split_the_layers_evenly() -> None:
    sizes = ModelSizes(layer_bytes=(MIB,) * 8, shared_bytes=MIB)
    assert pipeline_split(sizes, [100 * MIB, 100 * MIB]) == [4, 4]
    assert pipeline_split(sizes, [100 * MIB] * 3) in ([3, 3, 2], [2, 3, 3], [3, 2, 3])


def test_a_rank_with_three_times_the_memory_holds_three_times_the_weights() -> None:
    sizes = ModelSizes(layer_bytes=(MIB,) * 28, shared_bytes=2 * MIB)
    split = pipeline_split(sizes, [300 * MIB, 100 * MIB])
    assert split == [22, 6]
    assert stage_bytes(sizes, split) == [24 * MIB, 8 * MIB]


def test_rank_0_runs_the_last_layers_as_mlx_lm_splits_them() -> None:
    assert layer_ranges([2, 5, 1]) == [range(6, 8), range(1, 6), range(0, 1)]


def test_unequal_layers_are_split_by_their_bytes_not_their_count() -> None:
    # The first two layers are large: the rank running the first layers stops after one.
    sizes = ModelSizes(layer_bytes=(8 * MIB, 8 * MIB, MIB, MIB, MIB, MIB), shared_bytes=0)
    split = pipeline_split(sizes, [100 * MIB, 100 * MIB])
    assert split == [5, 1]
    assert stage_bytes(sizes, split) == [12 * MIB, 8 * MIB]


def test_every_rank_gets_a_layer_however_small_its_budget() -> None:
    sizes = ModelSizes(layer_bytes=(MIB,) * 4, shared_bytes=0)
    assert pipeline_split(sizes, [1000 * MIB, 2 * MIB]) == [3, 1]


def test_rounding_that_overfills_a_rank_gives_way_to_a_split_that_fits() -> None:
    # Proportional: rank 1 would take 2 of 3 layers (2.2 MiB with headroom > 2 MiB).
    sizes = ModelSizes(layer_bytes=(MIB, MIB, MIB), shared_bytes=0)
    split = pipeline_split(sizes, [int(2.3 * MIB), 2 * MIB])
    assert split == [2, 1]


def test_budgets_too_small_name_each_short_rank_and_what_it_needs() -> None:
    sizes = ModelSizes(layer_bytes=(MIB,) * 8, shared_bytes=MIB)
    with pytest.raises(MemoryCheckError) as error:
        pipeline_split(sizes, [3 * MIB, MIB], model_name="tiny")
    message = str(error.value)
    assert "cannot hold tiny split by layers" in message
    assert "rank 0 has 3.0 MiB but needs" in message
    assert "rank 1 has 1.0 MiB but needs" in message
    assert "need 11.0 MiB together and have 4.0 MiB" in message


def test_more_ranks_than_layers_is_refused() -> None:
    with pytest.raises(MemoryCheckError, match="2 layers, too few for 3 pipeline ranks"):
        pipeline_split(ModelSizes((MIB, MIB), 0), [100 * MIB] * 3)


def test_sizes_come_from_the_safetensors_headers(tmp_path: Path) -> None:
    weights = {
        "model.embed_tokens.weight": mx.zeros((16, 4)),  # 256 bytes
        "model.layers.0.mlp.weight": mx.zeros((4, 4)),  # 64
        "model.layers.1.mlp.weight": mx.zeros((8, 4), dtype=mx.float16),  # 64
        "model.layers.1.norm.weight": mx.zeros((4,)),  # 16
        "model.layers.2.mtp.weight": mx.zeros((4,)),  # past the model's layers: nowhere
        "lm_head.weight": mx.zeros((16, 4)),  # 256
    }
    mx.save_safetensors(str(tmp_path / "model.safetensors"), weights)
    assert model_sizes(tmp_path, num_layers=2) == ModelSizes((64, 80), 512)


def test_a_split_given_beforehand_must_cover_the_layers_and_fit_each_budget() -> None:
    sizes = ModelSizes((MIB,) * 4, MIB)
    check_split(sizes, (3, 1), [100 * MIB, 100 * MIB])
    for wrong in ((4,), (4, 0), (2, 1), (3, 2)):
        with pytest.raises(ConfigError, match="RINGSERVE_PIPELINE_SPLIT"):
            check_split(sizes, wrong, [100 * MIB, 100 * MIB])
    with pytest.raises(MemoryCheckError, match=r"rank 0 has 3\.0 MiB but needs"):
        check_split(sizes, (3, 1), [3 * MIB, 100 * MIB])
