"""val.py against upstream YOLOv9's val.py (the `yolo9` peer): same checkpoint, same images, same mAP."""
import pytest
import torch

import val
from models.experimental import load_checkpoint
from tests.peer import load_peer, one_thread, peer_module, quiet_peer  # noqa: F401  (one_thread: fixture)
from utils.general import check_dataset

pytestmark = pytest.mark.usefixtures("one_thread")
DEMO_WEIGHTS = "weights/demo-gelan.pt"
IMGSZ, BATCH = 320, 8


@pytest.fixture(scope="module")
def demo_val(tmp_path_factory):
    """48 demo val images (the demo checkpoint's kind of data: mAP well above zero), written twice (same
    seed, same files): ours and upstream's dataloaders each write their own label cache beside them."""
    from utils.demo_data import generate

    return [generate(tmp_path_factory.mktemp(who) / "demo", n_train=0, n_val=48, imgsz=IMGSZ, seed=5)
            for who in ("ours", "upstream")]


class InferenceOnly(torch.nn.Module):
    """The inference output alone. The `yolo9` package's NMS reads a tuple output as a dual head's
    (`prediction[0][0]`); given a single-head model's (y, x) it would take y's first image as the batch."""

    def __init__(self, model):
        super().__init__()
        self.model, self.names = model, model.names

    def forward(self, x, augment=False):
        return self.model(x, augment=augment)[0]


def peer_map(data_yaml):
    """Upstream's val.run on the demo checkpoint's weights in upstream's own DetectionModel (fused as
    upstream's loader fuses), with upstream's own dataloader: (P, R, mAP50, mAP50-95)."""
    yolo, _ = load_peer()
    quiet_peer()
    peer_val, peer_loaders = peer_module("yolo9.val"), peer_module("yolo9.utils.dataloaders")
    ours = load_checkpoint(DEMO_WEIGHTS)
    ours = (ours.get("ema") or ours["model"]).float()
    model = yolo.DetectionModel(ours.yaml, nc=ours.nc)
    model.load_state_dict(ours.state_dict())
    model.names, model.stride = ours.names, ours.stride
    model = InferenceOnly(model.fuse().eval())
    data = check_dataset(data_yaml)
    loader = peer_loaders.create_dataloader(data["val"], IMGSZ, BATCH, 32, pad=0.5, rect=True, workers=0)[0]
    results, _, _ = peer_val.run(data, model=model, dataloader=loader, batch_size=BATCH, imgsz=IMGSZ,
                                 half=False, plots=False)
    return results[:4]


def test_val_run_matches_upstream(demo_val, tmp_path):
    ours = val.run(demo_val[0], weights=DEMO_WEIGHTS, batch_size=BATCH, imgsz=IMGSZ, workers=0, save_json=True,
                   project=tmp_path, name="val", plots=False, return_dict=True)
    ref = peer_map(demo_val[1])
    print(f"ours P {ours['mp']:.4f} R {ours['mr']:.4f} mAP50 {ours['map50']:.4f} mAP50-95 {ours['map']:.4f} | "
          f"upstream {ref[0]:.4f} {ref[1]:.4f} {ref[2]:.4f} {ref[3]:.4f} | "
          f"pycocotools {ours['coco_map50']:.4f} {ours['coco_map']:.4f}")
    assert 0.3 < ref[3] < 0.9  # a real model on real data: errors in the matching show
    for name, x, y in zip(("P", "R", "mAP50", "mAP50-95"), (ours["mp"], ours["mr"], ours["map50"], ours["map"]), ref):
        assert x == pytest.approx(y, abs=1e-4), f"{name}: ours {x:.5f}, upstream {y:.5f}"
    # --save-json: pycocotools' COCOeval on the same predictions, greedy by score like the matching above
    assert ours["coco_map"] == pytest.approx(ours["map"], abs=0.02)
    assert ours["coco_map50"] == pytest.approx(ours["map50"], abs=0.02)
