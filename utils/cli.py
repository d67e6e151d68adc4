"""Command-line helpers shared by every command: argparse value types with ranges, one-line errors.

    from utils.cli import ArgumentParser, nonneg_int, positive_int, probability
    p = ArgumentParser(description=...)
    p.add_argument("--workers", type=nonneg_int, default=8)

A value out of range is refused by argparse itself, before anything is loaded or written, as one
line `error: argument --workers: -1 is not a whole number >= 0` and exit status 2 (the same form
as `utils.general.run_cli` gives a UserError). Standard library only: patches/install.py copies this
module into an upstream clone together with qat/ and the CLIs that import it.
"""
import argparse
import math
import sys

MAX_IMGSZ = 8192  # px; beyond this a single image no longer fits in any accelerator's memory


class ArgumentParser(argparse.ArgumentParser):
    """argparse.ArgumentParser whose errors are one line, `error: <what> (see <prog> --help)`, exit 2
    (argparse prints the whole usage first, which buries the one line that matters)."""

    def error(self, message):
        print(f"error: {message} (see {self.prog} --help)", file=sys.stderr)
        sys.exit(2)


def int_range(lo=None, hi=None):
    """An argparse type: a whole number in [lo, hi] (either bound may be None)."""
    what = "a whole number" + (f" >= {lo}" if hi is None and lo is not None else "") + \
        (f" <= {hi}" if lo is None and hi is not None else "") + \
        (f" in [{lo}, {hi}]" if lo is not None and hi is not None else "")

    def parse(text):
        try:
            value = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"{text!r} is not {what}") from None
        if (lo is not None and value < lo) or (hi is not None and value > hi):
            raise argparse.ArgumentTypeError(f"{value} is not {what}")
        return value

    parse.__name__ = what  # argparse names the type in its messages
    return parse


def float_range(lo=None, hi=None, lo_open=False, hi_open=False):
    """An argparse type: a finite number in the interval lo..hi (open at a bound with *_open)."""
    parts = []
    if lo is not None:
        parts.append(f"{'>' if lo_open else '>='} {lo}")
    if hi is not None:
        parts.append(f"{'<' if hi_open else '<='} {hi}")
    what = "a finite number" + (" " + " and ".join(parts) if parts else "")

    def parse(text):
        try:
            value = float(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"{text!r} is not {what}") from None
        bad = not math.isfinite(value)
        bad = bad or (lo is not None and (value <= lo if lo_open else value < lo))
        bad = bad or (hi is not None and (value >= hi if hi_open else value > hi))
        if bad:
            raise argparse.ArgumentTypeError(f"{text} is not {what}")
        return value

    parse.__name__ = what
    return parse


positive_int = int_range(1)
nonneg_int = int_range(0)
probability = float_range(0.0, 1.0)  # thresholds, IoUs, fractions
positive_float = float_range(0.0, lo_open=True)  # learning rates, ...
nonneg_float = float_range(0.0)  # weight decay, loss weights, ...
imgsz_int = int_range(32, MAX_IMGSZ)  # image sizes (a multiple of the stride is checked with the model)
opset_int = int_range(13, 23)  # per-channel QuantizeLinear needs 13; torch.onnx (2.x) exports up to 23
