"""Steps timed side by side (qat.speed's training steps, qat.deploy.latency's OpenVINO models): the steps
take turns, so a machine that speeds up, slows down or is shared hits them alike and their ratios hold."""
import time


def take_turns(steps, rounds, per_turn=1, warmup=0, sync=None):
    """{name: fn} -> {name: [seconds of each timed call]}. Each step first runs `warmup` calls, then
    `rounds` rounds in which every step makes `per_turn` calls in a row. `sync()` (e.g. CUDA's) runs
    before and after every timed call."""
    for fn in steps.values():
        for _ in range(warmup):
            fn()
    times = {name: [] for name in steps}
    for _ in range(rounds):
        for name, fn in steps.items():
            for _ in range(per_turn):
                if sync:
                    sync()
                t = time.perf_counter()
                fn()
                if sync:
                    sync()
                times[name].append(time.perf_counter() - t)
    return times
