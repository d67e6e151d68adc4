"""Training hooks, upstream style: `callbacks.register_action('on_fit_epoch_end', fn)`.

train.py calls `callbacks.run(hook, ...)` at fixed points; a hook that raises stops training there
(tests use that to simulate a run killed after an epoch). Hooks run on rank 0 only.
"""
from collections import defaultdict

HOOKS = (
    "on_train_start",  # (ctx): model, optimizer, ema, start_epoch, epochs, dataset, best_fitness, save_dir
    "on_train_epoch_start",  # (epoch)
    "on_train_batch_end",  # (epoch, i, loss_items)
    "on_fit_epoch_end",  # (epoch, row: dict of the results.csv row, best_fitness, fitness)
    "on_model_save",  # (last, epoch, final_epoch, best_fitness, fitness)
    "on_train_end",  # (last, best, epoch, results)
)


class Callbacks:
    def __init__(self):
        self._actions = defaultdict(list)
        self.stop_training = False  # set by a hook to end training after the current batch

    def register_action(self, hook, callback):
        if hook not in HOOKS:
            raise KeyError(f"unknown training hook '{hook}'; known: {', '.join(HOOKS)}")
        if not callable(callback):
            raise TypeError(f"callback for '{hook}' is not callable")
        self._actions[hook].append(callback)

    def run(self, hook, *args, **kwargs):
        for fn in self._actions.get(hook, ()):
            fn(*args, **kwargs)
