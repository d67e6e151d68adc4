"""Turn a dual-head (PGI) training model into its single-head converted model.

    python tools/reparameterize.py --weights yolov9-c.pt --cfg models/detect/gelan-c.yaml --out yolov9-c-converted.pt

As upstream's converted release files are made: the GELAN model of `--cfg` receives the weights of the
dual model's main branch, and its head (cv2 cv3 dfl) the dual head's main head (cv4 cv5 dfl2); the
auxiliary branch is dropped. The output equals the dual model's main-head output.

Which dual layer feeds which GELAN layer is found by walking both graphs back from their heads, pairing
layers of the same class, attributes, parameter shapes and inputs; no table per model, so any pair of
configs built this way (a user's own too) converts.
"""
import sys
from pathlib import Path

import torch
import torch.nn as nn

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from models.common import Silence  # noqa: E402
from models.experimental import load_checkpoint, model_from_checkpoint  # noqa: E402
from models.yolo import DDetect, DetectionModel, DualDDetect  # noqa: E402
from utils.cli import ArgumentParser, add_trusted_flag, cli_main  # noqa: E402
from utils.general import LOGGER, UserError, file_size, run_cli  # noqa: E402
from utils.torch_utils import save_atomic  # noqa: E402

INPUT = "input"  # the image, as a layer source
_LAYER_ATTRS = ("i", "f", "type", "np", "training")  # set by parse_model / nn.Module, not part of a layer's identity


def _sources(model, i):
    """Absolute sources of layer i: layer indices or INPUT. Silence layers are looked through."""
    f = model.model[i].f
    out = []
    for j in [f] if isinstance(f, int) else f:
        j = i - 1 if j == -1 else j
        while j >= 0 and isinstance(model.model[j], Silence):
            j = _single_source(model, j)
        out.append(INPUT if j < 0 else j)
    return out


def _single_source(model, j):
    f = model.model[j].f
    return j - 1 if f == -1 else f


def _attrs(m):
    return {k: v for k, v in vars(m).items()
            if not k.startswith("_") and k not in _LAYER_ATTRS and isinstance(v, (int, float, str, list, tuple))}


def _same_layer(a, b):
    """Two layers are interchangeable when class, the names and shapes of every parameter and buffer and
    the plain attributes both have (Concat.d, CBFuse.idx, Upsample's scale, ...) agree. Only shared
    attributes count: a layer unpickled from an upstream checkpoint may carry a few more."""
    if type(a) is not type(b):
        return False
    if [(k, v.shape) for k, v in a.state_dict().items()] != [(k, v.shape) for k, v in b.state_dict().items()]:
        return False
    aa, ba = _attrs(a), _attrs(b)
    return all(aa[k] == ba[k] for k in aa.keys() & ba.keys())


def layer_mapping(dual, single):
    """{single layer index: dual layer index} for every layer the single model's head depends on."""
    dh, sh = dual.model[-1], single.model[-1]
    if not isinstance(dh, DualDDetect):
        raise UserError(f"the checkpoint's model has a {type(dh).__name__} head, not DualDDetect: it is not a "
                        f"dual-head (yolov9-t/s/m/c/e) training model and needs no reparameterization")
    if type(sh) is not DDetect:
        raise UserError(f"--cfg builds a {type(sh).__name__} head; pass the single-head GELAN config "
                        f"(e.g. models/detect/gelan-c.yaml for yolov9-c)")
    d_in, s_in = _sources(dual, len(dual.model) - 1), _sources(single, len(single.model) - 1)
    nl = dh.nl
    if len(s_in) != nl:
        raise UserError(f"--cfg head has {len(s_in)} inputs but the dual model's main head has {nl}")
    mapping = {}
    stack = list(zip(s_in, d_in[nl:]))  # main head inputs: the last nl of DualDDetect's
    while stack:
        s, d = stack.pop()
        if s == INPUT or d == INPUT:
            if s != d:
                raise UserError(f"--cfg does not match the checkpoint: layer {s if s != INPUT else d} reads the image "
                                f"in one model but not in the other")
            continue
        if s in mapping:
            if mapping[s] != d:
                raise UserError(f"--cfg does not match the checkpoint: its layer {s} would take weights from dual "
                                f"layers {mapping[s]} and {d}")
            continue
        if not _same_layer(single.model[s], dual.model[d]):
            raise UserError(f"--cfg does not match the checkpoint: its layer {s} ({type(single.model[s]).__name__}) "
                            f"differs from dual layer {d} ({type(dual.model[d]).__name__}) in kind or shape; pass the "
                            f"GELAN config of the same size as the dual model (yolov9-c -> gelan-c)")
        src_s, src_d = _sources(single, s), _sources(dual, d)
        if len(src_s) != len(src_d):
            raise UserError(f"--cfg does not match the checkpoint: layer {s} has {len(src_s)} inputs, dual layer {d} "
                            f"has {len(src_d)}")
        mapping[s] = d
        stack.extend(zip(src_s, src_d))
    orphans = [i for i, m in enumerate(single.model[:-1])
               if i not in mapping and next(m.parameters(), None) is not None]
    if orphans:
        raise UserError(f"--cfg layers {orphans} have weights but no counterpart on the dual model's main branch")
    return mapping


def _main_head_state(dual_head):
    """The dual head's main head (cv4 cv5 dfl2) renamed to a single head's keys (cv2 cv3 dfl)."""
    rename = {"cv4": "cv2", "cv5": "cv3", "dfl2": "dfl"}
    out = {}
    for k, v in dual_head.state_dict().items():
        first, _, rest = k.partition(".")
        if first in rename:
            out[f"{rename[first]}.{rest}"] = v
    return out


@torch.no_grad()
def reparameterize_model(dual, cfg):
    """A new single-head DetectionModel built from `cfg`, carrying the main branch of `dual` and its main
    head; unfused like `dual` (or fused, when `dual` was saved fused). Eval mode."""
    if not isinstance(getattr(dual, "model", None), nn.Sequential) or not isinstance(dual.model[-1], DualDDetect):
        head = type(dual.model[-1]).__name__ if isinstance(getattr(dual, "model", None), nn.Sequential) else "no"
        raise UserError(f"the checkpoint's model has {head} head, not DualDDetect: it is not a dual-head "
                        f"(yolov9-t/s/m/c/e) training model and needs no reparameterization")
    dh = dual.model[-1]
    single = DetectionModel(cfg, ch=getattr(dual, "yaml", {}).get("ch", 3), nc=dh.nc)
    if not any(isinstance(m, nn.BatchNorm2d) for m in dual.modules()):
        single.fuse()  # a dual model saved fused: copy into the same (folded) layout
    mapping = layer_mapping(dual, single)
    for s, d in sorted(mapping.items()):
        single.model[s].load_state_dict(dual.model[d].state_dict())
    sh = single.model[-1]
    try:
        sh.load_state_dict(_main_head_state(dh))
    except RuntimeError as e:
        detail = str(e).strip().splitlines()[-1].strip()
        raise UserError(f"--cfg head does not match the dual model's main head: {detail}") from None
    if not torch.equal(sh.stride.cpu(), dh.stride.cpu()):
        raise UserError(f"--cfg head strides {sh.stride.tolist()} differ from the dual model's {dh.stride.tolist()}")
    for attr in ("names", "hyp"):
        if hasattr(dual, attr):
            setattr(single, attr, getattr(dual, attr))
    single.nc = dh.nc  # as upstream's converted files carry it
    LOGGER.info(f"reparameterize: {len(mapping)} layers + main head copied from {type(dual).__name__} "
                f"({sum(p.numel() for p in dual.parameters()):,} -> {sum(p.numel() for p in single.parameters()):,} "
                f"parameters)")
    return single.eval()


def default_cfg(dual):
    """gelan-X.yaml for a model built from yolov9-X.yaml, when the checkpoint remembers its yaml file."""
    name = getattr(dual, "yaml_file", "") or ""
    candidate = ROOT / "models" / "detect" / name.replace("yolov9", "gelan")
    if name.startswith("yolov9") and candidate.is_file():
        return candidate
    raise UserError("cannot tell which GELAN config matches this checkpoint; pass --cfg "
                    "(e.g. models/detect/gelan-c.yaml)")


def run(weights, cfg=None, out=None, trusted=False):
    """Reparameterize `weights` and write upstream's converted layout atomically. Returns the output path."""
    out = Path(out) if out else Path(weights).with_name(f"{Path(weights).stem}-converted.pt")
    if out.resolve() == Path(weights).resolve():
        raise UserError(f"--out {out} would overwrite --weights; choose another file name")
    if out.is_dir():
        example = out / f"{Path(weights).stem}-converted.pt"
        raise UserError(f"--out {out} is a folder: pass a file name, e.g. {example}")
    ckpt = load_checkpoint(weights, trusted=trusted)
    dual = model_from_checkpoint(ckpt, fuse=False)
    single = reparameterize_model(dual, cfg or default_cfg(dual))
    save_atomic({"model": single.half(), "optimizer": None, "best_fitness": None, "ema": None, "updates": None,
                 "opt": None, "git_hash": None, "date": None, "epoch": -1}, out)
    LOGGER.info(f"reparameterize: saved {out} ({file_size(out):.1f} MB)")
    return out


def parse_opt(argv=None):
    parser = ArgumentParser(description="Convert a dual-head YOLOv9 training checkpoint into its single-head "
                                                 "(GELAN) converted model, as upstream's *-converted.pt files")
    parser.add_argument("--weights", type=str, required=True, help="dual-head checkpoint, e.g. yolov9-c.pt")
    parser.add_argument("--cfg", type=str, default=None,
                        help="single-head config, e.g. models/detect/gelan-c.yaml (default: from the checkpoint)")
    parser.add_argument("--out", type=str, default=None, help="output file (default: <weights>-converted.pt)")
    add_trusted_flag(parser)
    return parser.parse_args(argv)


main = cli_main(parse_opt, run, run_cli)  # main(argv=None)


if __name__ == "__main__":
    main()
