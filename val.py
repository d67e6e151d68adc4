"""Validate a detection model on a YOLO-format dataset.

    python val.py --weights best.pt --data data/demo.yaml --imgsz 640
    python val.py --weights best.pt --data coco.yaml --save-json     # + pycocotools COCOeval

Prints the upstream table (P, R, mAP50, mAP50-95, overall and per class). `run()` is also called
in-process by training and QAT with an in-memory `model` and `dataloader`.
"""
import json
import time
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path

import numpy as np
import torch
from tqdm import tqdm

from utils.cli import (ArgumentParser, add_device_arg, add_trusted_flag, imgsz_int, nonneg_int, positive_int,
                       probability)
from utils.general import (LOGGER, UserError, check_dataset, check_img_size, coco80_to_coco91_class, colorstr,
                           increment_path, non_max_suppression, print_args, run_cli, scale_boxes, xywh2xyxy,
                           xyxy2xywh)
from utils.metrics import ConfusionMatrix, ap_per_class, process_batch

ROOT = Path(__file__).resolve().parent
TABLE_HEADER = ("%22s" + "%11s" * 6) % ("Class", "Images", "Instances", "P", "R", "mAP50", "mAP50-95")
ROW_FORMAT = "%22s" + "%11i" * 2 + "%11.3g" * 4


def save_one_json(predn, jdict, image_id, class_map):
    """Append one image's detections (native-space xyxy) as COCO results: bbox [x, y, w, h]."""
    box = xyxy2xywh(predn[:, :4])
    box[:, :2] -= box[:, 2:] / 2
    for p, b in zip(predn.tolist(), box.tolist()):
        jdict.append({"image_id": image_id, "category_id": class_map[int(p[5])],
                      "bbox": [round(x, 3) for x in b], "score": round(p[4], 5)})


def coco_gt_from_labels(images, annotations, names):
    """A COCO ground-truth dict from YOLO labels: images [(id, file, h, w)], annotations
    [(image_id, cls, x1, y1, x2, y2)] in original image pixels; category id = class index."""
    anns = []
    for k, (image_id, c, x1, y1, x2, y2) in enumerate(annotations):
        w, h = x2 - x1, y2 - y1
        anns.append({"id": k + 1, "image_id": image_id, "category_id": int(c), "bbox": [x1, y1, w, h],
                     "area": w * h, "iscrowd": 0})  # ids from 1: COCOeval treats gt id 0 as "no match"
    return {"info": {"description": "ground truth converted from YOLO labels by val.py"},
            "images": [{"id": i, "file_name": f, "height": h, "width": w} for i, f, h, w in images],
            "annotations": anns,
            "categories": [{"id": i, "name": str(n), "supercategory": ""} for i, n in enumerate(names)]}


def coco_evaluate(anno_json, pred_json, img_ids=None):
    """Run pycocotools COCOeval (bbox) and return (mAP50-95, mAP50); None for undefined values."""
    from pycocotools.coco import COCO
    from pycocotools.cocoeval import COCOeval

    anno = COCO(str(anno_json))
    pred = anno.loadRes(str(pred_json))
    evaluator = COCOeval(anno, pred, "bbox")
    if img_ids is not None:
        evaluator.params.imgIds = list(img_ids)
    evaluator.evaluate()
    evaluator.accumulate()
    evaluator.summarize()
    m, m50 = (float(x) for x in evaluator.stats[:2])
    return (m if m >= 0 else None), (m50 if m50 >= 0 else None)


def _model_device(model):
    try:
        return next(model.parameters()).device
    except (StopIteration, AttributeError):
        return torch.device("cpu")


def _model_nc(model):
    nc = getattr(model, "nc", None)
    if nc is None and hasattr(model, "model"):
        nc = getattr(model.model[-1], "nc", None)
    return nc


def _names_list(names, nc):
    if isinstance(names, dict):
        names = [names[k] for k in sorted(names)]
    names = list(names or [])
    return names if len(names) >= nc else names + [str(i) for i in range(len(names), nc)]


@dataclass
class _Tally:
    """What the batch loop gathers: per-image match statistics (correct, conf, pred class, label class),
    COCO-json predictions and ground truth, counters, timings (pre-process, inference, NMS) and losses."""
    loss: torch.Tensor
    stats: list = field(default_factory=list)
    jdict: list = field(default_factory=list)
    gt_images: list = field(default_factory=list)
    gt_annotations: list = field(default_factory=list)
    coco_img_ids: list = field(default_factory=list)
    seen: int = 0
    n_batches: int = 0
    dt: list = field(default_factory=lambda: [0.0, 0.0, 0.0])


def _setup_model(model, weights, device, half, batch_size, trusted):
    """The model in eval mode on its device, FP16 only where that runs (CUDA) -> (model, device, half).
    An in-memory model (training, QAT) stays where it is; else `weights` is loaded and fused."""
    if model is not None:
        device = _model_device(model)
        half = half and device.type != "cpu"
    else:
        from models.experimental import attempt_load
        from utils.torch_utils import select_device

        device = select_device(device, batch_size=batch_size)
        if half and device.type == "cpu":
            LOGGER.warning("WARNING: --half needs a CUDA device; running FP32 on the CPU")
            half = False
        model = attempt_load(weights, device=device, fuse=True, trusted=trusted)
    model.half() if half else model.float()
    model.eval()
    return model, device, half


def _class_names(model, data, single_cls, training, weights):
    """-> (nc, names); a loaded checkpoint must predict the data's classes."""
    nc = 1 if single_cls else int(data.get("nc") or len(data["names"]))
    names = _names_list(getattr(model, "names", None) or data.get("names"), nc)
    if single_cls:
        names = ["item"]
    ncm = _model_nc(model)
    if not training and not single_cls and ncm is not None and ncm != nc:
        raise UserError(f"{weights} predicts {ncm} classes but the data has {nc}: "
                        f"pass the --data the weights were trained on (or --single-cls)")
    return nc, names


def _split_dataloader(data, task, model, imgsz, batch_size, workers, single_cls, nc):
    """A rectangular-batch loader of the `task` split (labels of a class >= nc skipped and counted)."""
    split = data.get(task)
    if not split:
        raise UserError(f"the data yaml has no '{task}' split: add '{task}:' or pass another --task")
    from utils.dataloaders import create_dataloader

    stride = int(max(getattr(model, "stride", torch.tensor([32]))))
    imgsz = check_img_size(imgsz, s=stride)
    return create_dataloader(split, imgsz, batch_size, stride, pad=0.5, rect=True, workers=workers,
                             prefix=colorstr(f"{task}: "), nc=None if single_cls else nc)[0]


def _infer_batch(model, im, targets, device, half, compute_loss, tally, nms):
    """Pre-process, model, NMS on one batch (timed) -> (images, pixel-space targets, predictions)."""
    t0 = time.perf_counter()
    im = im.to(device, non_blocking=True)
    im = (im.half() if half else im.float()) / 255
    targets = targets.to(device).float().clone()
    _, _, height, width = im.shape
    t1 = time.perf_counter()
    out = model(im)
    if compute_loss is not None:
        if not (isinstance(out, (list, tuple)) and len(out) == 2):
            raise ValueError("compute_loss needs a model that returns (inference output, train output)")
        preds, train_out = out
        tally.loss += compute_loss(train_out, targets)[1]
    else:
        preds = out
    t2 = time.perf_counter()
    targets[:, 2:] *= torch.tensor((width, height, width, height), device=device)  # to pixels
    preds = nms(preds)
    t3 = time.perf_counter()
    dt = tally.dt
    dt[0], dt[1], dt[2] = dt[0] + t1 - t0, dt[1] + t2 - t1, dt[2] + t3 - t2
    return im, targets, preds


def _tally_image(tally, si, pred, im, targets, path, shape, iouv, single_cls, confusion_matrix, can_plot, coco):
    """Match image `si`'s predictions to its labels in native pixels (for AP, the confusion matrix and
    COCO json). coco: None without --save-json, else (is_coco, class_map)."""
    height, width = im.shape[2:]
    labels = targets[targets[:, 0] == si, 1:]
    if single_cls:
        labels[:, 0] = 0
        pred[:, 5] = 0
    nl, npr = labels.shape[0], pred.shape[0]
    shape0, ratio_pad = (shape[0], shape[1]) if shape is not None else ((height, width), ((1.0, 1.0), (0.0, 0.0)))
    tally.seen += 1

    labelsn = torch.zeros((0, 5), device=iouv.device)
    if nl:
        tbox = scale_boxes(im[si].shape[1:], xywh2xyxy(labels[:, 1:5]), shape0, ratio_pad)
        labelsn = torch.cat((labels[:, 0:1], tbox), 1)  # native-space labels
    predn = scale_boxes(im[si].shape[1:], pred.float().clone(), shape0, ratio_pad)  # native-space preds
    correct = torch.zeros(npr, len(iouv), dtype=torch.bool, device=iouv.device)
    if nl and npr:
        correct = process_batch(predn, labelsn, iouv)
    if can_plot and nl:
        confusion_matrix.process_batch(predn if npr else None, labelsn if npr else labels[:, 0])
    tally.stats.append((correct, pred[:, 4].float(), pred[:, 5].float(), labels[:, 0]))

    if coco is not None:
        is_coco, class_map = coco
        if is_coco:
            if not path.stem.isnumeric():
                raise UserError(f"{path.name}: COCO val2017 images must be named by their numeric id")
            image_id = int(path.stem)
            tally.coco_img_ids.append(image_id)
        else:
            image_id = tally.seen - 1
            tally.gt_images.append((image_id, path.name, int(shape0[0]), int(shape0[1])))
            tally.gt_annotations += [(image_id, int(c), *b) for c, *b in labelsn.tolist()]
        save_one_json(predn, tally.jdict, image_id, class_map)


def _ap_metrics(stats, nc, can_plot, save_dir, names, ap_method):
    """Per-image statistics -> (mp, mr, map50, map, p, r, ap50, ap, ap_class, nt): upstream's AP over
    the classes that have labels (ap_class); nt = labels per class."""
    mp, mr, map50, map_ = 0.0, 0.0, 0.0, 0.0
    p = r = ap50 = ap = np.zeros(0)
    ap_class = np.zeros(0, dtype=int)
    stats = [torch.cat(x, 0).cpu().numpy() for x in zip(*stats)]
    if len(stats) and stats[0].any():
        _tp, _fp, p, r, _f1, ap, ap_class = ap_per_class(*stats, plot=can_plot, save_dir=save_dir, names=names,
                                                         method=ap_method)
        ap50, ap = ap[:, 0], ap.mean(1)
        mp, mr, map50, map_ = p.mean(), r.mean(), ap50.mean(), ap.mean()
    nt = np.bincount(stats[3].astype(int), minlength=nc) if len(stats) else np.zeros(nc, dtype=int)
    return mp, mr, map50, map_, p, r, ap50, ap, ap_class, nt


def _log_table(m, names, seen, task, nc, per_class):
    """The upstream table: 'all', then (per_class and several classes) one row per class with labels."""
    mp, mr, map50, map_, p, r, ap50, ap, ap_class, nt = m
    LOGGER.info(TABLE_HEADER)
    LOGGER.info(ROW_FORMAT % ("all", seen, nt.sum(), mp, mr, map50, map_))
    if nt.sum() == 0:
        LOGGER.warning(f"WARNING: no labels found in the {task} set, can not compute metrics without labels")
    if per_class and nc > 1:
        for i, c in enumerate(ap_class):
            LOGGER.info(ROW_FORMAT % (names[c], seen, nt[c], p[i], r[i], ap50[i], ap[i]))


def _coco_eval(tally, weights, save_dir, task, names, is_coco, anno_json):
    """Write the predictions (and, for non-COCO data, ground truth from the labels) as COCO json and run
    COCOeval -> (coco_map, coco_map50)."""
    from utils.torch_utils import atomic_output

    w = Path(weights).stem if isinstance(weights, (str, Path)) else "model"
    pred_json = save_dir / f"{w}_predictions.json"
    with atomic_output(pred_json) as tmp:
        tmp.write_text(json.dumps(tally.jdict))
    if not is_coco:
        anno_json = save_dir / f"{task}_ground_truth_coco.json"
        with atomic_output(anno_json) as tmp:
            tmp.write_text(json.dumps(coco_gt_from_labels(tally.gt_images, tally.gt_annotations, names)))
    LOGGER.info(f"\nEvaluating pycocotools mAP against {anno_json}, predictions saved to {pred_json}")
    if tally.jdict:
        return coco_evaluate(anno_json, pred_json, tally.coco_img_ids if is_coco else None)
    LOGGER.warning("WARNING: no detections, pycocotools mAP is 0")
    return 0.0, 0.0


@torch.no_grad()
def run(data, weights=None, batch_size=32, imgsz=640, conf_thres=0.001, iou_thres=0.7, max_det=300, task="val",
        device="", workers=8, single_cls=False, save_json=False, project=ROOT / "runs/val", name="exp",
        exist_ok=False, half=False, model=None, dataloader=None, save_dir=Path(""), plots=True, compute_loss=None,
        verbose=False, trusted=False, return_dict=False, ap_method="interp"):
    """Evaluate `model` (or the checkpoint `weights`) on the `task` split of `data`.

    Returns ((mp, mr, map50, map, *losses), maps, times) as upstream: the upstream-style metrics
    (also with save_json; pycocotools' numbers do not replace them), maps = mAP50-95 per class,
    times = ms per image (pre-process, inference, NMS). return_dict=True returns instead a dict
    with keys mp, mr, map50, map, maps, coco_map50, coco_map (None unless save_json evaluated),
    losses, times, save_dir. ap_method: 'interp' (upstream) or 'coco' (COCOeval's AP rule)."""
    training = model is not None
    if task not in ("train", "val", "test"):
        raise UserError(f"--task {task} is not one of train, val, test")
    if isinstance(data, (str, Path)):
        data = check_dataset(data, required=() if dataloader is not None else (task,))
    if training and save_dir == Path("") and save_json:
        save_dir = increment_path(Path(project) / name, exist_ok=exist_ok, mkdir=True)
    model, device, half = _setup_model(model, weights, device, half, batch_size, trusted)
    nc, names = _class_names(model, data, single_cls, training, weights)
    if dataloader is None:
        dataloader = _split_dataloader(data, task, model, imgsz, batch_size, workers, single_cls, nc)
    if not training:  # only once the inputs are known to be good: a failed run leaves no empty folder
        save_dir = increment_path(Path(project) / name, exist_ok=exist_ok, mkdir=True)

    # COCO val2017 with its annotation json: evaluate against that (COCO ids), else build one from labels
    split = data.get(task) if isinstance(data.get(task), str) else ""
    anno_json = Path(data.get("path") or "") / "annotations" / f"instances_{Path(split).stem}.json"
    is_coco = save_json and Path(split).stem.endswith("val2017") and nc == 80 and anno_json.is_file()
    coco = (is_coco, coco80_to_coco91_class() if is_coco else list(range(nc))) if save_json else None
    can_plot = plots and save_dir != Path("")
    confusion_matrix = ConfusionMatrix(nc=nc)

    iouv = torch.linspace(0.5, 0.95, 10, device=device)
    tally = _Tally(loss=torch.zeros(3, device=device))
    nms = partial(non_max_suppression, conf_thres=conf_thres, iou_thres=iou_thres, multi_label=True,
                  agnostic=single_cls, max_det=max_det)
    for im, targets, paths, shapes in tqdm(dataloader, desc=TABLE_HEADER, bar_format="{l_bar}{bar:10}{r_bar}"):
        tally.n_batches += 1
        im, targets, preds = _infer_batch(model, im, targets, device, half, compute_loss, tally, nms)
        for si, pred in enumerate(preds):
            _tally_image(tally, si, pred, im, targets, Path(paths[si]), shapes[si] if shapes is not None else None,
                         iouv, single_cls, confusion_matrix, can_plot, coco)

    m = _ap_metrics(tally.stats, nc, can_plot, save_dir, names, ap_method)
    mp, mr, map50, map_, _, _, _, ap, ap_class, _ = m
    _log_table(m, names, tally.seen, task, nc, per_class=(verbose or (nc < 50 and not training)) and len(tally.stats))
    times = tuple(x / max(tally.seen, 1) * 1e3 for x in tally.dt)
    if not training:
        LOGGER.info("Speed: %.1fms pre-process, %.1fms inference, %.1fms NMS per image" % times)
    if can_plot:
        confusion_matrix.plot(save_dir=save_dir, names=names)
    coco_map, coco_map50 = _coco_eval(tally, weights, save_dir, task, names, is_coco, anno_json) if save_json \
        else (None, None)

    model.float()
    if not training:
        LOGGER.info(f"Results saved to {colorstr('bold', save_dir)}")
    maps = np.zeros(nc) + map_
    for i, c in enumerate(ap_class):
        maps[c] = ap[i]
    losses = (tally.loss.cpu() / max(tally.n_batches, 1)).tolist()
    if return_dict:
        return {"mp": float(mp), "mr": float(mr), "map50": float(map50), "map": float(map_), "maps": maps,
                "coco_map50": coco_map50, "coco_map": coco_map, "losses": losses, "times": times,
                "save_dir": save_dir}
    return (mp, mr, map50, map_, *losses), maps, times


def parse_opt(argv=None):
    parser = ArgumentParser(description="Validate a YOLOv9 detection model (upstream metrics, "
                                                 "optionally pycocotools)")
    parser.add_argument("--data", type=str, default=str(ROOT / "data/coco.yaml"), help="dataset.yaml path")
    parser.add_argument("--weights", type=str, required=True, help="model checkpoint (.pt)")
    parser.add_argument("--batch-size", type=positive_int, default=32, help="batch size")
    parser.add_argument("--imgsz", "--img", "--img-size", type=imgsz_int, default=640, help="inference size (pixels)")
    parser.add_argument("--conf-thres", type=probability, default=0.001, help="confidence threshold")
    parser.add_argument("--iou-thres", type=probability, default=0.7, help="NMS IoU threshold")
    parser.add_argument("--max-det", type=positive_int, default=300, help="maximum detections per image")
    parser.add_argument("--task", default="val", choices=("train", "val", "test"), help="split to evaluate")
    add_device_arg(parser, default="")
    parser.add_argument("--workers", type=nonneg_int, default=8, help="max dataloader workers")
    parser.add_argument("--single-cls", action="store_true", help="treat as single-class dataset")
    parser.add_argument("--save-json", action="store_true", help="save COCO-JSON results and run pycocotools")
    parser.add_argument("--project", default=str(ROOT / "runs/val"), help="save to project/name")
    parser.add_argument("--name", default="exp", help="save to project/name")
    parser.add_argument("--exist-ok", action="store_true", help="existing project/name ok, do not increment")
    parser.add_argument("--half", action="store_true", help="use FP16 half-precision inference (CUDA)")
    parser.add_argument("--verbose", action="store_true", help="report mAP by class")
    add_trusted_flag(parser)
    opt = parser.parse_args(argv)
    opt.save_json |= str(opt.data).endswith("coco.yaml")
    return opt


def main(opt):
    print_args(vars(opt))
    if opt.conf_thres > 0.001:
        LOGGER.info(f"WARNING: confidence threshold {opt.conf_thres} > 0.001 gives lower mAP than the usual setting")
    return run(**vars(opt))


if __name__ == "__main__":
    run_cli(lambda: main(parse_opt()))
