"""Placing stages over several devices (`hss_ee_hf.server.placement`), with fake capacities: no GPU needed."""

from __future__ import annotations

import pytest
import torch

from hss_ee_hf.errors import DevicePlacementError, InvalidConfigError
from hss_ee_hf.server import placement
from hss_ee_hf.server.engine import StageEngine
from hss_ee_hf.server.placement import device_capacities, load_stage_weights, plan_placement

GIB = 1 << 30


def test_stages_fill_devices_in_order_and_never_split():
    stages = [("a", 6), ("b", 6), ("c", 3), ("d", 10)]
    plan = plan_placement(stages, [("cuda:0", 10), ("cuda:1", 10), ("cuda:2", 10)])
    assert plan.devices == {"a": "cuda:0", "b": "cuda:1", "c": "cuda:1", "d": "cuda:2"}
    assert plan.summary() == [
        {"device": "cuda:0", "stages": 1, "first": "a", "last": "a", "bytes": 6},
        {"device": "cuda:1", "stages": 2, "first": "b", "last": "c", "bytes": 9},
        {"device": "cuda:2", "stages": 1, "first": "d", "last": "d", "bytes": 10},
    ]


def test_exact_fit_is_accepted_and_one_byte_more_is_refused():
    assert set(plan_placement([("a", 5), ("b", 5)], [("cuda:0", 10)]).devices.values()) == {"cuda:0"}
    with pytest.raises(DevicePlacementError) as info:
        plan_placement([("a", 5), ("b", 5)], [("cuda:0", 9), ("cuda:1", 4)])
    assert "stage 'b'" in str(info.value) and "--device cpu" in str(info.value)


def test_a_model_larger_than_all_gpus_is_refused_with_the_totals():
    stages = [(f"layers.{i}.mlp", 3 * GIB) for i in range(10)]
    with pytest.raises(DevicePlacementError, match=r"need 30\.00 GiB but the devices offer 16\.00 GiB"):
        plan_placement(stages, [("cuda:0", 8 * GIB), ("cuda:1", 8 * GIB)])
    with pytest.raises(DevicePlacementError, match="no device"):
        plan_placement(stages, [])


def test_checkpoint_is_refused_before_any_weight_is_read(tiny_ee_checkpoint, monkeypatch):
    from transformers import AutoConfig

    from hss_ee_hf.artifacts.checkpoint import HSSEECheckpointInfo

    info = HSSEECheckpointInfo.from_folder(tiny_ee_checkpoint)
    config = AutoConfig.from_pretrained(tiny_ee_checkpoint)
    cpu = torch.device("cpu")
    # Room for everything: the plan's byte counts are exactly what the int8 weights then hold.
    weights, plan = load_stage_weights(
        tiny_ee_checkpoint, config, info.ring, cpu, kernel="int8", capacities=[("cpu", 1 << 40)]
    )
    assert plan.stage_bytes == {name: w.nbytes for name, w in weights.items()}
    assert set(plan.devices) == set(weights) and set(plan.devices.values()) == {"cpu"}

    def must_not_read(*args, **kwargs):
        raise AssertionError("a weight was read before the placement was checked")

    monkeypatch.setattr(placement, "iter_stage_weights", must_not_read)
    too_small = sum(plan.stage_bytes.values()) - 1
    with pytest.raises(DevicePlacementError, match="need"):
        load_stage_weights(tiny_ee_checkpoint, config, info.ring, cpu, kernel="int8", capacities=[("cpu", too_small)])


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the refusal on a machine without CUDA")
def test_cuda_without_a_gpu_is_a_clear_error(tiny_ee_checkpoint):
    with pytest.raises(DevicePlacementError, match="asks for CUDA"):
        device_capacities("cuda")
    # The engine refuses it before placing anything (its device check runs first), naming the flag.
    with pytest.raises(InvalidConfigError, match="asks for a GPU"):
        StageEngine(tiny_ee_checkpoint, device="cuda")


def test_engine_on_cpu_reports_its_placement(tiny_ee_checkpoint):
    engine = StageEngine(tiny_ee_checkpoint, kernel="float64")
    (part,) = engine.placement.summary()
    assert part["device"] == "cpu" and part["stages"] == len(engine.weights)
    assert part["bytes"] == sum(w.nbytes for w in engine.weights.values())
