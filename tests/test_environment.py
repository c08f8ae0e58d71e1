"""The environment promises: torch and torchvision import together, and every lock agrees."""

import re
import tomllib

from .conftest import ROOT


def test_torch_and_torchvision_are_a_working_pair():
    import torch
    import torchvision
    from torchvision.ops import nms  # fails with "operator torchvision::nms does not exist" on a mismatch

    boxes = torch.tensor([[0.0, 0.0, 10.0, 10.0], [1.0, 1.0, 10.0, 10.0], [20.0, 20.0, 30.0, 30.0]])
    assert nms(boxes, torch.tensor([0.9, 0.8, 0.7]), iou_threshold=0.5).tolist() == [0, 2]
    assert torchvision.__version__.split("+")[0] == "0.28.0"


def test_requirements_lock_matches_uv_lock():
    locked = {p["name"]: p["version"] for p in tomllib.loads((ROOT / "uv.lock").read_text())["package"]
              if "version" in p}
    pinned = dict(re.findall(r"^([A-Za-z0-9_.\-]+)==([^\s;]+)", (ROOT / "requirements.lock").read_text(), re.M))
    assert {"torch", "torchvision", "mlflow", "dvc", "papermill"} <= set(pinned)
    assert {name: version for name, version in pinned.items() if locked.get(name) != version} == {}
