"""The environment promises: torch and torchvision import together, and every lock agrees."""

import hashlib
import re
import subprocess
import tomllib

import yaml

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


def test_committed_dvc_lock_matches_the_committed_sources():
    """dvc.lock records the hashes of the notebooks and modules it ran: a source changed without
    `dvc repro` (or `dvc commit` when outputs cannot change) would make a clone's pipeline stale."""
    lock = yaml.safe_load((ROOT / "dvc.lock").read_text())
    tracked = set(subprocess.run(["git", "ls-files"], cwd=ROOT, capture_output=True, text=True,
                                 check=True).stdout.split())
    stale = [(stage, dep["path"]) for stage, locked in lock["stages"].items() for dep in locked["deps"]
             if dep["path"] in tracked
             and hashlib.md5((ROOT / dep["path"]).read_bytes()).hexdigest() != dep["md5"]]
    assert stale == []
