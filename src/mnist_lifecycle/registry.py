"""Model Registry: register a challenger, and move `champion` to it only when it is better.

Aliases, not the deprecated stages: `challenger` always names the newest registered version,
`champion` the one to serve (`models:/<name>@champion`). A version is known by its model's DVC
hash (tag `model_dvc_md5`): registering the same bytes again reuses their version.

`data/registry/decision.json` records what the register stage decided; the registry's aliases are
state outside git and DVC, so after `git checkout` + `dvc checkout` or `dvc exp apply` the two can
differ. `python -m mnist_lifecycle.registry check` reports that (so does the model server, and
`make pipeline` runs it); `... registry sync` moves the aliases to what decision.json says.
"""

from __future__ import annotations

import argparse
import json
import sys
from dataclasses import asdict, dataclass, field

import mlflow
from mlflow.exceptions import MlflowException
from mlflow.tracking import MlflowClient

from . import aliases
from .lineage import MODEL_HASH_TAG, StoreMismatch, store_missing

CHAMPION = "champion"
CHALLENGER = "challenger"


@dataclass
class Decision:
    model_name: str
    challenger_version: str
    challenger_model_dvc_md5: str
    challenger_test_accuracy: float
    previous_champion_version: str | None  # None when there was none
    previous_champion_test_accuracy: float | None
    promoted: bool
    reason: str
    champion_version: str | None  # after the decision; None if a first model was refused
    champion_model_dvc_md5: str | None
    mcnemar_p_value: float | None = None  # None without a champion to compare with
    checks: dict = field(default_factory=dict)  # promotion.GateResult.as_dict()

    def as_dict(self) -> dict:
        return asdict(self)

    def description(self) -> str:
        """The decision in a sentence: the register run's and the model version's description."""
        before = (f"version {self.previous_champion_version} (test accuracy "
                  f"{self.previous_champion_test_accuracy:.4f})" if self.previous_champion_version else "none")
        # Aliases in code spans: the UI renders descriptions as Markdown, where @name is a link.
        verdict = "promoted to `@champion`" if self.promoted else "not promoted: `@champion` stays"
        return (f"{self.model_name} version {self.challenger_version} (test accuracy "
                f"{self.challenger_test_accuracy:.4f}) is `@challenger`, {verdict}. Champion before: "
                f"{before}. Why: {self.reason}.")


def current_champion(model_name: str):
    """The ModelVersion behind `@champion`, or None."""
    try:
        return MlflowClient().get_model_version_by_alias(model_name, CHAMPION)
    except MlflowException:
        return None


def resolve(model_uri: str):
    """The ModelVersion behind models:/NAME@ALIAS or models:/NAME/VERSION; MlflowException if the
    store has none."""
    name, _, alias = model_uri.removeprefix("models:/").partition("@")
    if alias:
        return MlflowClient().get_model_version_by_alias(name, alias)
    name, _, version = name.partition("/")
    return MlflowClient().get_model_version(name, version)


def version_of(model_name: str, model_md5: str):
    """The registered version holding the model with this DVC hash, or None."""
    found = MlflowClient().search_model_versions(
        f"name = '{model_name}' and tags.{MODEL_HASH_TAG} = '{model_md5}'")
    return min(found, key=lambda v: int(v.version)) if found else None


def predictions_on(model_uri: str, images):
    """(predicted digits, the loaded model) of a registered or logged model on images (torch is
    imported only here); the model is returned so that the gate can time it."""
    import mlflow.pytorch
    import torch

    from .model import predict_probabilities

    loaded = mlflow.pytorch.load_model(model_uri)
    return predict_probabilities(loaded, torch.from_numpy(images)).argmax(1).numpy(), loaded


def accuracy_on(model_uri: str, images, labels) -> float:
    """Accuracy of a registered or logged model on test images."""
    return float((predictions_on(model_uri, images)[0] == labels).mean())


def register_and_decide(params, trained: dict, result, champion, tags: dict[str, str]) -> Decision:
    """Register the trained model (or find its version), alias it `challenger`, and `champion` if
    the gate's `result` (promotion.GateResult) passed; record all on the version. `params` is the
    stage's RegisterParams, `trained` data/model/model.json, `champion` the version before."""
    client = MlflowClient()
    model_name = params.model_name
    model_md5 = trained[MODEL_HASH_TAG]
    existing = version_of(model_name, model_md5)
    if existing is None:
        version = mlflow.register_model(trained["model_uri"], model_name,
                                        tags={**tags, MODEL_HASH_TAG: model_md5}).version
    else:
        version = existing.version
    version = str(version)
    by = f"register stage (run {tags.get('registered_by_run_id', 'none')})"
    aliases.move(model_name, CHALLENGER, version, by, "the newest registered model")
    rolled_back = client.get_model_version(model_name, version).tags.get(aliases.ROLLED_BACK_TAG)
    if champion is not None and str(champion.version) == version:
        promoted, reason = False, f"version {version} (the same model) is the champion already"
    elif rolled_back:
        promoted, reason = False, f"version {version} was rolled back ({rolled_back}); it is not promoted again"
    else:
        promoted, reason = result.promoted, result.reason
    if promoted:
        aliases.move(model_name, CHAMPION, version, by, reason)
    # A refused first registration leaves no champion: None in decision.json.
    after = version if promoted else (str(champion.version) if champion else None)
    decision = Decision(
        model_name, version, model_md5, result.challenger_accuracy,
        str(champion.version) if champion else None, result.champion_accuracy, promoted, reason,
        after, model_md5 if promoted else (champion.tags.get(MODEL_HASH_TAG, "") if champion else None),
        mcnemar_p_value=result.value("alpha"), checks=result.as_dict(),
    )
    version_tags = {
        "test_accuracy": result.challenger_accuracy,
        "champion_test_accuracy_before": result.champion_accuracy,
        "promoted": promoted,
        "decision": reason,
        "mcnemar_p_value": decision.mcnemar_p_value,
    }
    # One tag per check: gate.<parameter> = passed|failed, gate.<parameter>.value = the measurement.
    for name, check in decision.checks.items():
        version_tags[f"gate.{name}"] = "passed" if check["passed"] else "failed"
        version_tags[f"gate.{name}.value"] = check["value"]
    for key, value in version_tags.items():
        client.set_model_version_tag(model_name, version, key, "none" if value is None else str(value))
    client.update_model_version(model_name, version, description=decision.description())
    return decision


def _alias_targets(decision: dict) -> dict[str, tuple[str, str]]:
    """alias -> (version, model hash) that decision.json names; no champion if none was promoted."""
    targets = {CHAMPION: (decision["champion_version"], decision["champion_model_dvc_md5"]),
               CHALLENGER: (decision["challenger_version"], decision["challenger_model_dvc_md5"])}
    return {alias: target for alias, target in targets.items() if target[0] is not None}


def disagreements(decision: dict) -> list[str]:
    """How the registry's aliases differ from decision.json (by model hash, so that a store that
    numbers versions differently still agrees); empty when they agree."""
    client, name = MlflowClient(), decision["model_name"]
    found = []
    for alias, (version, model_md5) in _alias_targets(decision).items():
        try:
            current = client.get_model_version_by_alias(name, alias)
        except MlflowException:
            found.append(f"{name}@{alias} is not set; decision.json names version {version} ({model_md5})")
            continue
        if current.tags.get(MODEL_HASH_TAG) != model_md5:
            found.append(f"{name}@{alias} is version {current.version} ({current.tags.get(MODEL_HASH_TAG)}), "
                         f"decision.json names version {version} ({model_md5})")
    return found


def sync(decision: dict) -> list[str]:
    """Move the aliases to the versions decision.json names; returns what moved."""
    name = decision["model_name"]
    moved = []
    for alias, (version, model_md5) in _alias_targets(decision).items():
        target = version_of(name, model_md5)
        if target is None:
            raise StoreMismatch(f"the tracking store {mlflow.get_tracking_uri()} has no version of {name} "
                                f"with {MODEL_HASH_TAG}={model_md5} (decision.json's {alias}, version {version})")
        entry = aliases.move(name, alias, target.version, f"{aliases.who()} (registry sync)",
                             "follow decision.json of the checkout")
        if entry is not None:  # None: it was there already
            moved.append(f"{name}@{alias}: {entry['from_version']} -> {entry['to_version']}")
    return moved


def check_served(model_uri: str, decision_path=None) -> list[str]:
    """Before serving a registered model: stop (StoreMismatch) if the store lacks it; returns
    warnings where the alias served disagrees with the project's decision.json."""
    if not model_uri.startswith("models:/"):
        return []
    tracking_uri = mlflow.get_tracking_uri()
    advice = ("Run `make pipeline` to train and register into it, set MLFLOW_TRACKING_URI to the store "
              "the pipeline ran against, or serve the pipeline's model directory after `dvc pull`: "
              "make serve MODEL_URI=data/model/mlflow_model")
    if store_missing(tracking_uri):
        raise StoreMismatch(f"the tracking store {tracking_uri} does not exist. {advice}")
    try:
        served = resolve(model_uri)
    except MlflowException:
        raise StoreMismatch(f"the tracking store {tracking_uri} has no {model_uri}. {advice}") from None
    alias = model_uri.partition("@")[2]
    if not alias or decision_path is None or not decision_path.is_file():
        return []
    decision = json.loads(decision_path.read_text())
    if decision.get("model_name") != served.name or alias not in (CHAMPION, CHALLENGER):
        return []
    _, model_md5 = _alias_targets(decision).get(alias, (None, None))
    if served.tags.get(MODEL_HASH_TAG) == model_md5:
        return []
    return [f"{model_uri} is version {served.version} ({served.tags.get(MODEL_HASH_TAG)}), but "
            f"{decision_path.name} of this checkout names {model_md5}; `python -m mnist_lifecycle.registry "
            "sync` makes the registry follow the checkout"]


def main(argv: list[str] | None = None) -> int:
    from . import config
    from .paths import Layout

    parser = argparse.ArgumentParser(prog="python -m mnist_lifecycle.registry",
                                     description="Compare the registry's aliases with data/registry/decision.json "
                                                 "(check), move them to it (sync), move @champion back to the "
                                                 "previous champion or --to a version (rollback), or list every "
                                                 "alias move (history).")
    parser.add_argument("action", choices=["check", "sync", "rollback", "history"])
    parser.add_argument("--to", help="rollback: the version to make champion (default: the previous champion)")
    parser.add_argument("--reason", default="", help="rollback: why (required; recorded in the history)")
    args = parser.parse_args(argv)
    root = config.project_root()
    path = Layout.of(root).decision
    if args.action in ("rollback", "history"):
        return rollback_or_history(root, path, args)
    if not path.is_file():
        print(f"no {path.relative_to(root)}: the register stage has not run (dvc repro, or dvc pull)")
        return 0 if args.action == "check" else 1
    decision = json.loads(path.read_text())
    tracking_uri = config.use_default_tracking_uri(root)
    try:
        if store_missing(tracking_uri):
            raise StoreMismatch(f"the tracking store {tracking_uri} does not exist: nothing is registered in it")
        if args.action == "sync":
            for line in sync(decision):
                print(f"moved {line}")
        found = disagreements(decision)
    except StoreMismatch as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    if found:
        print(f"error: the registry in {tracking_uri} disagrees with {path.relative_to(root)}:\n  "
              + "\n  ".join(found) + "\n`python -m mnist_lifecycle.registry sync` (make registry-sync) moves the "
              "aliases to what this checkout decided", file=sys.stderr)
        return 1
    print(f"registry in {tracking_uri} agrees with {path.relative_to(root)}: champion version "
          f"{decision['champion_version']}, challenger version {decision['challenger_version']}")
    return 0


def rollback_or_history(root, path, args) -> int:
    from . import config, outputs

    decision = json.loads(path.read_text()) if path.is_file() else {}
    name = decision.get("model_name") or config.load(root, "register").model_name
    tracking_uri = config.use_default_tracking_uri(root)
    try:
        if store_missing(tracking_uri):
            raise StoreMismatch(f"the tracking store {tracking_uri} does not exist: nothing is registered in it")
        if args.action == "history":
            for entry in aliases.history(name):
                print(f"{entry['time']}  @{entry['alias']}: {entry['from_version']} -> {entry['to_version']}  "
                      f"by {entry['by']}: {entry['reason']}")
            return 0
        entry = aliases.rollback(name, CHAMPION, args.reason, args.to)
    except (StoreMismatch, aliases.RollbackError, MlflowException) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    print(f"moved {name}@{CHAMPION}: {entry['from_version']} -> {entry['to_version']} ({entry['reason']})")
    if decision:
        # The checkout follows the registry, so that `registry check` agrees after a rollback.
        target = MlflowClient().get_model_version(name, entry["to_version"])
        decision.update(champion_version=entry["to_version"], champion_model_dvc_md5=target.tags.get(MODEL_HASH_TAG, ""),
                        rolled_back=entry)
        outputs.write_json(path, decision)
        print(f"{path.relative_to(root)} names version {entry['to_version']} as champion")
    return 0


if __name__ == "__main__":
    sys.exit(main())
