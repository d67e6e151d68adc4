"""qat/timing.py: steps timed side by side take turns."""
from qat.timing import take_turns


def test_steps_take_turns_so_a_drifting_machine_moves_them_alike():
    calls, syncs = [], []
    times = take_turns({"a": lambda: calls.append("a"), "b": lambda: calls.append("b")},
                       rounds=3, per_turn=2, warmup=1, sync=lambda: syncs.append(1))
    assert calls == ["a", "b"] + ["a", "a", "b", "b"] * 3  # warmup, then turns of two calls, never one block
    assert {k: len(v) for k, v in times.items()} == {"a": 6, "b": 6} and all(t >= 0 for t in times["a"])
    assert len(syncs) == 2 * 12  # before and after every timed call, not around the warmup
