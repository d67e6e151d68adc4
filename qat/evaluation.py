"""What the QAT run reads and measures with: the data (the demo data made on first use), the FP32
checkpoint, the train / calibration / selection / val loaders, and val.run as a function of the
model. The selection split (choices are never made on the reported val split) is made here."""
import inspect
import itertools
import random
from pathlib import Path

from qat.compat import UserError, atomic_output, attempt_load, list_image_files, load_checkpoint
from qat.distributed import WORLD_SIZE, barrier, is_main_rank
from qat.options import DEFAULT_DATA, DEFAULT_WEIGHTS, ROOT
from utils.general import LOGGER, check_dataset, colorstr

METRICS = ("map", "map50", "mp", "mr")


def load_data(data):
    """check_dataset; the default demo data is generated the first time it is needed."""
    if isinstance(data, dict):
        return data
    try:
        return check_dataset(data)
    except UserError:
        if Path(data).resolve() != Path(DEFAULT_DATA).resolve():
            raise
    if is_main_rank():
        from utils.demo_data import main as demo_data
        LOGGER.info(f"{colorstr('data: ')}generating the demo dataset (python -m utils.demo_data --out datasets/demo)")
        if demo_data(["--out", str(ROOT / "datasets/demo"), "--data", DEFAULT_DATA]):
            raise UserError("could not generate the demo data: run python -m utils.demo_data --out datasets/demo")
    barrier()
    return check_dataset(data)

def check_demo_weights(weights):
    """The default checkpoint is made by training, never downloaded: say so before anything runs."""
    if weights and not Path(weights).exists() and Path(weights).resolve() == Path(DEFAULT_WEIGHTS).resolve():
        raise UserError(f"the demo checkpoint {weights} is not there: train it first (python train.py --cfg "
                        f"models/detect/gelan-t.yaml --data data/demo.yaml ...) or pass --weights")

def load_fp32(weights, device, trusted=False):
    """-> (fused FP32 model in eval mode, checkpoint's training opt dict)."""
    weights = str(weights)
    check_demo_weights(weights)
    ckpt = load_checkpoint(weights, trusted=trusted)
    from qat.checkpoint import is_qat_checkpoint
    if is_qat_checkpoint(ckpt):
        LOGGER.warning(f"WARNING: {weights} is a QAT checkpoint: starting again from its FP32 weights "
                       f"(use --resume to continue that run)")
    ckpt_opt = ckpt.get("opt") if isinstance(ckpt.get("opt"), dict) else {}
    del ckpt
    model = attempt_load(weights, device=device, fuse=True, trusted=trusted)
    return model.float().eval(), ckpt_opt

def model_nc(model):
    return int(getattr(model.model[-1], "nc", getattr(model, "nc", 0)))

def check_nc(model, data, weights, data_name="the data"):
    nc, ncm = int(data["nc"]), model_nc(model)
    if ncm != nc:
        raise UserError(f"{weights} predicts {ncm} classes but {data_name} has {nc}: "
                        f"pass the --data the weights were trained on")

class FirstBatches:
    """The first n batches of a DataLoader (n=0: all), with len() for progress bars."""

    def __init__(self, loader, n=0):
        self.loader, self.n = loader, n

    def __iter__(self):
        return itertools.islice(iter(self.loader), self.n) if self.n else iter(self.loader)

    def __len__(self):
        return min(len(self.loader), self.n) if self.n else len(self.loader)

    def __getattr__(self, name):
        return getattr(self.loader, name)

def checked_loader(source, nc, split, imgsz, batch_size, stride, hyp, **kw):
    """create_dataloader whose labels of a class >= nc are skipped and counted by our scan, or refused
    with one line in an upstream clone (its create_dataloader does not know nc)."""
    from utils.dataloaders import create_dataloader
    scan_checks_nc = "nc" in inspect.signature(create_dataloader).parameters
    loader, dataset = create_dataloader(source, imgsz, batch_size, stride, hyp=hyp, **kw,
                                        **({"nc": nc} if scan_checks_nc else {}))
    if not scan_checks_nc:
        check_label_classes(dataset, nc, split)
    return loader


def make_loaders(data, imgsz, stride, opt, hyp, rank=-1):
    """-> (train loader (this rank's shard), calibration loader (the same one unless --augment:
    calibration sees plain images), val loader or None (rank 0)). Arguments after `stride` by
    keyword only, and only those upstream's create_dataloader has too (plus `nc` where it exists)."""
    from utils.dataloaders import create_dataloader
    bs = opt.batch_size // max(WORLD_SIZE, 1)
    augment = bool(getattr(opt, "augment", False))

    def loader(split, batch_size, **kw):
        return checked_loader(data[split], int(data["nc"]), split, imgsz, batch_size, stride, hyp, **kw)

    def train_split(aug, prefix):
        # --seed: calibration sample, data order (upstream's create_dataloader has no seed)
        seed = {"seed": int(getattr(opt, "seed", 0))} if "seed" in inspect.signature(create_dataloader).parameters \
            else {}
        return loader("train", bs, augment=aug, rect=False, rank=rank, workers=opt.workers, shuffle=True,
                      prefix=colorstr(prefix), **seed)

    train = train_split(augment, "train: ")
    calib = train_split(False, "calibration: ") if augment else train
    val = None
    if rank in (-1, 0):
        val = loader("val", bs * 2, augment=False, rect=True, rank=-1, workers=opt.workers * 2, pad=0.5,
                     prefix=colorstr("val: "))
    return train, calib, val

def check_label_classes(dataset, nc, split):
    """Upstream clones: refuse a split with a label of class >= nc (their scan does not check it)."""
    for file, labels in zip(dataset.label_files, dataset.labels):
        if len(labels) and labels[:, 0].max() >= nc:
            raise UserError(f"{file}: class {labels[:, 0].max():g} but the data has nc={nc} ({split} split): "
                            f"fix the label or the data yaml's names")

def make_val_fn(data, val_loader, imgsz, batch_size, n_batches=0):
    """model -> {'mp', 'mr', 'map50', 'map'} through val.run (upstream's signature)."""
    import val as validate
    loader = FirstBatches(val_loader, n_batches)

    def val_fn(model):
        results, _, _ = validate.run(data, batch_size=batch_size, imgsz=imgsz, model=model, dataloader=loader,
                                     half=False, plots=False, save_dir=Path(""), compute_loss=None)
        model.float()
        return dict(zip(("mp", "mr", "map50", "map"), (float(x) for x in results[:4])))

    return val_fn

def selection_split(data, opt, save_dir):
    """-> (train source for training and calibration, selection source). With --select-split, or
    else the data yaml's `select:` split, the train set stays whole; otherwise --select-images train
    images (at most half of them, chosen with --seed) are held out: splits/train.txt and
    splits/select.txt in the run folder (kept on --resume so the split never changes within a run).
    Held-out train images are the last resort: the checkpoint has fitted them, and on them PTQ ranked
    above QAT models that were better on unseen images (utils/demo_data.py gives the numbers)."""
    if opt.select_split:
        select = Path(opt.select_split)
        if not select.exists() and isinstance(data.get(opt.select_split), (str, list)):
            return data["train"], data[opt.select_split]  # a key of the data yaml, e.g. 'test'
        list_image_files(str(select), "--select-split ")  # one-line error when there are no images
        return data["train"], str(select)
    if data.get("select"):
        return data["train"], _yaml_select_split(data)
    LOGGER.warning(f"WARNING: selection split: {opt.select_images} train images held out, but the checkpoint "
                   f"most likely trained on them, which can rank PTQ above better QAT models: add 'select:' "
                   f"(images the model never trained on) to the data yaml or pass --select-split")
    split_dir = Path(save_dir) / "splits"
    train_txt, select_txt = split_dir / "train.txt", split_dir / "select.txt"
    if not (train_txt.is_file() and select_txt.is_file()):
        files = list_image_files(data["train"], "train: ")
        n = min(int(opt.select_images), len(files) // 2)
        if n < 1:
            raise UserError(f"train has {len(files)} image(s): too few to hold out a selection split; "
                            f"pass --select-split")
        held = set(random.Random(opt.seed).sample(range(len(files)), n))
        if is_main_rank():
            split_dir.mkdir(parents=True, exist_ok=True)
            with atomic_output(train_txt) as tmp:
                tmp.write_text("\n".join(f for i, f in enumerate(files) if i not in held) + "\n")
            with atomic_output(select_txt) as tmp:
                tmp.write_text("\n".join(files[i] for i in sorted(held)) + "\n")
    barrier()  # every rank, whether or not it saw the lists already
    return str(train_txt), str(select_txt)

def _yaml_select_split(data):
    """The data yaml's `select:` (a folder, .txt list or list of those), absolute against its `path`
    (an upstream clone's check_dataset resolves train/val/test only)."""
    root = Path(str(data.get("path") or "."))
    one = not isinstance(data["select"], (list, tuple))
    items = [str(root / str(p)) for p in ([data["select"]] if one else data["select"])]  # an absolute p stays p
    list_image_files(items, "data yaml 'select:' ")  # one-line error when there are no images
    return items[0] if one else items


def make_select_loader(select, nc, imgsz, stride, opt, hyp):
    """The selection split in the deployed protocol: square --imgsz letterbox, as val_trt.py and a
    static-shape engine see images. Not val.py's rectangular batches: those run a square image at
    imgsz + one stride with a grey border, where quantized models lose less (seed 1 of the demo's kd
    benchmark: -0.0009 there, -0.0030 deployed), so choices made there flattered what ships."""
    bs = 2 * opt.batch_size // max(WORLD_SIZE, 1)
    return checked_loader(select, nc, "selection", imgsz, bs, stride, hyp, augment=False, rect=False, rank=-1,
                          workers=opt.workers * 2, pad=0.0, prefix=colorstr("select: "))
