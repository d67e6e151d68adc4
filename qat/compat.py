"""The few helpers qat/ and the QAT tools need that upstream YOLOv9 does not have.

`patches/install.py` copies qat/ into a user's upstream YOLOv9 clone, where `utils` and `models`
are upstream's own modules. Those lack `UserError`, `run_cli`, `atomic_output`/`save_atomic` and the safe
checkpoint loader, so qat/ code imports these names from here, never from `utils.*` / `models.*`
directly. In this repository they are our own objects (so `run_cli` catches `UserError` raised
anywhere); in an upstream clone the fallbacks below stand in, built on upstream's model classes.

The fallbacks repeat, on purpose, what utils/torch_utils.py (atomic_output), utils/dataloaders.py
(list_image_files) and models/experimental.py (load_checkpoint, attempt_load) do: in a clone those
files are upstream's and lack them, and copying ours over would change upstream's own code. So
`duplicates` lists these pairs; keep each fallback in step with the original it names.
"""
import os
import sys
import tempfile
from pathlib import Path

import torch

try:
    from utils.general import UserError, run_cli
except ImportError:  # upstream YOLOv9 clone
    class UserError(Exception):
        """A problem with the user's input. CLIs print it as one line (`error: ...`) and exit 2."""

    def run_cli(main_fn):
        """`error: <message>` and exit 2 for a UserError, one line and exit 130 for Ctrl-C. In a clone,
        known breakages of upstream's own code in this environment stop the command before it starts."""
        try:
            from qat.upstream_env import find_problems
            problems = find_problems(Path(__file__).resolve().parents[1])
            if problems:
                raise UserError("; ".join(problems))
            return main_fn()
        except UserError as e:
            print(f"error: {e}", file=sys.stderr)
            sys.exit(2)
        except KeyboardInterrupt:
            print("interrupted", file=sys.stderr)
            sys.exit(130)

try:
    from utils.torch_utils import atomic_output, save_atomic
except ImportError:  # upstream YOLOv9 clone: the same contract as ours (see utils/torch_utils.py)
    import contextlib

    @contextlib.contextmanager
    def atomic_output(path):
        """A temp path beside `path`, fsynced and moved onto it only when the block succeeds."""
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
        os.close(fd)
        try:
            yield Path(tmp)
            with open(tmp, "rb") as f:
                os.fsync(f.fileno())
            umask = os.umask(0)
            os.umask(umask)
            os.chmod(tmp, 0o666 & ~umask)
            os.replace(tmp, path)
        finally:
            Path(tmp).unlink(missing_ok=True)

    def save_atomic(obj, path):
        with atomic_output(path) as tmp:
            torch.save(obj, tmp)
        return Path(path)

try:  # upstream has init_seeds in utils.general, we have it in utils.torch_utils
    from utils.torch_utils import init_seeds  # noqa: F401
except ImportError:
    from utils.general import init_seeds  # noqa: F401

try:
    from utils.dataloaders import list_image_files
except ImportError:  # upstream YOLOv9 clone: the sources its LoadImagesAndLabels reads (folder, .txt list)
    def list_image_files(path, prefix=""):
        """Image paths (sorted, absolute) from a folder, a .txt list of paths, or a list of those."""
        from utils.dataloaders import IMG_FORMATS

        def is_image(f):
            return Path(f).suffix[1:].lower() in IMG_FORMATS

        files = []
        for src in (path if isinstance(path, (list, tuple)) else [path]):
            p = Path(src).expanduser()
            if p.is_dir():
                files += [str(f.resolve()) for f in p.rglob("*.*")]
            elif p.is_file() and p.suffix.lower() == ".txt":
                lines = [x.strip() for x in p.read_text(encoding="utf-8", errors="replace").splitlines() if x.strip()]
                files += [str((p.resolve().parent / x).resolve()) if not Path(x).is_absolute() else x for x in lines]
            elif p.is_file():
                files.append(str(p.resolve()))
            else:
                raise UserError(f"{prefix}{src} does not exist (expected a folder of images or a .txt list of images)")
        files = sorted({f for f in files if is_image(f)})
        if not files:
            raise UserError(f"{prefix}no images found in {path}")
        return files

try:
    from models.experimental import attempt_load, load_checkpoint
except ImportError:  # upstream YOLOv9 clone: its attempt_load unpickles anything (weights_only=False)
    import importlib
    import pickle
    import zipfile

    import torch.nn as nn

    from utils.safe_unpickle import RefusedCheckpoint, load as safe_load, module_classes, restore_fused_forward

    def _model_classes():
        """The model classes of this checkout's `models` package and torch.nn's layers: unpickled as
        inert placeholders, so a file can name them but never construct one with its own arguments
        (upstream's DetectionModel(cfg) would run eval() on the file's strings)."""
        return module_classes(*(importlib.import_module(f"models.{n}") for n in ("common", "yolo", "experimental")))

    def load_checkpoint(weights, trusted=False, map_location="cpu"):
        """Read a checkpoint into a dict without running code from it (unless `trusted`)."""
        path = Path(weights)
        if not path.is_file() or path.stat().st_size == 0:
            raise UserError(f"weights file '{weights}' not found or empty; check the path")
        if path.suffix.lower() == ".onnx":
            raise UserError(f"weights '{weights}' is an ONNX file; pass a PyTorch checkpoint (.pt)")
        try:
            if trusted:
                ckpt = torch.load(str(path), map_location=map_location, weights_only=False)
            else:
                ckpt = safe_load(path, _model_classes(), map_location=map_location)
        except (RefusedCheckpoint, pickle.UnpicklingError) as e:
            first = " ".join(str(e).split())[:200] or type(e).__name__
            raise UserError(f"weights '{weights}' was refused by the safe loader ({first}); nothing was executed; "
                            f"if you trust this file, pass --trusted") from None
        except (RuntimeError, zipfile.BadZipFile, EOFError, OSError, ValueError) as e:
            first = (str(e).strip().splitlines() or [type(e).__name__])[0][:200]
            raise UserError(f"weights '{weights}' could not be read: truncated or not a checkpoint ({first})") from None
        if isinstance(ckpt, nn.Module):
            ckpt = {"model": ckpt}
        if not isinstance(ckpt, dict) or not isinstance(ckpt.get("ema") or ckpt.get("model"), nn.Module):
            raise UserError(f"weights '{weights}' is not a YOLOv9 checkpoint (no 'model' or 'ema' entry holding "
                            f"a model)")
        try:  # qat.checkpoint.save_qat stored upstream fuse()'s per-instance forward bindings as names
            for key in ("model", "ema"):
                restore_fused_forward(ckpt.get(key))
        except RefusedCheckpoint as e:
            raise UserError(f"weights '{weights}': {e}") from None
        return ckpt

    def attempt_load(weights, device="cpu", inplace=True, fuse=True, trusted=False):
        """One checkpoint as a float eval model (ema preferred), fused if asked: upstream's
        attempt_load without the ensemble, through the safe loader."""
        if isinstance(weights, (list, tuple)):
            if len(weights) != 1:
                raise UserError("model ensembles are not supported; pass one weights file")
            weights = weights[0]
        ckpt = load_checkpoint(weights, trusted=trusted)
        model = (ckpt["ema"] if ckpt.get("ema") is not None else ckpt["model"]).to(device).float()
        if not hasattr(model, "stride"):
            model.stride = torch.tensor([32.0])
        if hasattr(model, "names") and isinstance(model.names, (list, tuple)):
            model.names = dict(enumerate(model.names))
        if fuse and hasattr(model, "fuse"):
            model.fuse()
        for m in model.modules():
            if type(m) in (nn.Hardswish, nn.LeakyReLU, nn.ReLU, nn.ReLU6, nn.SiLU):
                m.inplace = inplace
            elif type(m) is nn.Upsample and not hasattr(m, "recompute_scale_factor"):
                m.recompute_scale_factor = None
        return model.eval()
