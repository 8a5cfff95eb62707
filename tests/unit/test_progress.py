from __future__ import annotations

from typing import Any

from diffbox.backends.node_times import NodeTimes
from diffbox.progress import ProgressTracker, node_weight
from diffbox.throttle import Throttle


class Clock:
    def __init__(self) -> None:
        self.now = 0.0

    def __call__(self) -> float:
        return self.now


GRAPH: dict[str, dict[str, Any]] = {
    "1": {"class_type": "UNETLoader", "inputs": {}},
    "2": {"class_type": "KSamplerAdvanced", "inputs": {"steps": 8, "start_at_step": 0, "end_at_step": 4}},
    "3": {"class_type": "KSamplerAdvanced", "inputs": {"steps": 8, "start_at_step": 4, "end_at_step": 10000}},
    "4": {"class_type": "VAEDecode", "inputs": {}},
    "5": {"class_type": "SaveVideo", "inputs": {}},
}


def test_weights_follow_where_time_goes() -> None:
    assert node_weight(GRAPH["2"]) == 4.0 and node_weight(GRAPH["3"]) == 4.0
    assert node_weight(GRAPH["1"]) == 2.0 and node_weight(GRAPH["4"]) == 3.0
    assert node_weight({"class_type": "KSampler", "inputs": {"steps": ["9", 0]}}) == 20.0
    assert node_weight({"class_type": "ImageInvert", "inputs": {}}) == 0.1


def test_percent_is_monotonic_weighted_and_throttled() -> None:
    clock = Clock()
    sent: list[dict[str, Any]] = []
    tracker = ProgressTracker(sent.append, interval_s=1.0, clock=clock)
    tracker.set_graph(GRAPH, node_clip={"2": 1, "3": 1}, clips=1)
    tracker.stage("inputs")
    tracker.stage("starting")
    tracker.stage("queued")
    clock.now = 1.0
    tracker.on_message("execution_start", {"prompt_id": "p"})
    tracker.on_message("progress_state", {"nodes": {"1": {"state": "finished"}}})
    for step in range(1, 5):
        clock.now += 1.5
        tracker.on_message("progress", {"node": "2", "value": step, "max": 4})
    # Several messages inside one interval give one update...
    tracker.on_message("progress_state", {"nodes": {"2": {"state": "finished"}}})
    tracker.on_message("executing", {"node": "3"})
    assert len(sent) == 8  # 3 stage changes + start + 4 step updates, 1.5 s apart
    # ...but a sampler starting is news at once: its steps could all fall inside one interval.
    clock.now += 0.1
    tracker.on_message("progress", {"node": "3", "value": 1, "max": 4})
    stages = [p["stage"] for p in sent]
    assert stages[:4] == ["inputs", "starting", "queued", "running"]
    assert [p["seq"] for p in sent] == list(range(1, len(sent) + 1))
    percents = [p["percent"] for p in sent]
    assert percents == sorted(percents)
    expert_done = sent[-2]
    # Loader (2) + first expert's 4 steps done of 2 + 4 + 4 + 3 + 1 = 14 units.
    assert expert_done["percent"] == round(5 + 90 * 6 / 14, 1)
    assert (expert_done["node"], expert_done["step"], expert_done["steps"], expert_done["clip"],
            expert_done["clips"]) == ("KSamplerAdvanced", 4, 4, 1, 1)
    assert expert_done["eta_s"] == round(6.0 / (6 / 14) * (8 / 14), 1)
    last = sent[-1]
    assert (last["node"], last["step"], last["steps"]) == ("KSamplerAdvanced", 1, 4)
    assert last["percent"] == round(5 + 90 * 7 / 14, 1)
    assert len(sent) == 9


def test_throttle_lets_stage_changes_through() -> None:
    clock = Clock()
    throttle = Throttle(1.0, clock)
    assert throttle.allow("running")
    assert not throttle.allow("running")
    assert throttle.allow("uploading")
    clock.now = 1.0
    assert throttle.allow("uploading")


def test_node_times_end_each_node_where_the_next_begins() -> None:
    clock = iter([0.0, 1.5, 4.0, 4.25]).__next__
    graph = {"1": {"class_type": "CLIPLoader", "inputs": {"clip_name": "umt5.safetensors", "type": "wan"}},
             "2": {"class_type": "CLIPTextEncode", "inputs": {"text": "a fox", "clip": ["1", 0]}}}
    times = NodeTimes(graph, clock)
    for kind, data in [("executing", {"node": "1"}), ("executing", {"node": "2"}), ("executed", {"node": "2"}),
                       ("executing", {"node": "3"}), ("execution_success", {})]:
        times.on_message(kind, data)
    assert times.entries() == [{"node": "1", "class": "CLIPLoader", "s": 1.5, "file": "umt5.safetensors"},
                               {"node": "2", "class": "CLIPTextEncode", "s": 2.5},
                               {"node": "3", "class": None, "s": 0.25}]
