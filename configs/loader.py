"""Compose experiment configs and build objects from ``_target_`` entries.

Merge order (later wins): ``configs/base.yaml`` -> the experiment's group choices (``configs/<group>/<option>.yaml``
stored under the key ``<group>``) -> the experiment body -> the command-line dotlist.

The base and the group files define the schema. The experiment body and the command line may only set keys that
already exist; anything else fails before any work with the key's full path and the closest valid key. Two escape
hatches keep this from being a cage:

* ``group=option`` on the command line switches a group (``logger=csv``);
* ``+key=value`` adds a key that the schema does not have, and a mapping whose ``_target_`` differs from the
  one it replaces is taken whole (its keys are then checked against the new target's signature when built).
"""

from __future__ import annotations

import difflib
import functools
import importlib
import inspect
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any

import yaml
from omegaconf import DictConfig, ListConfig, OmegaConf

CONFIG_DIR = Path(__file__).resolve().parent
EXPERIMENT_DIR = CONFIG_DIR.parent / "experiments"
GROUPS = ("model", "data", "trainer", "callbacks", "logger")

# ${add:a,b} lets a network's input width follow from others (latent size + attribute count).
def _add(*xs: int | float) -> int | float:
    return sum(xs)


def _len(xs: Any) -> int:
    return len(xs)


def _parents_width(spec: Any) -> int:
    """${parents_width:<parents spec>}: the width of a model's conditioning vector (categorical parents
    one-hot), as ``datamodules.base.condition_vector`` builds it."""
    from datamodules.base import parents_from_spec

    plain = OmegaConf.to_container(spec, resolve=True) if isinstance(spec, DictConfig | ListConfig) else spec
    return sum(a.dim for a in parents_from_spec(plain))


OmegaConf.register_resolver("add", _add, replace=True)
OmegaConf.register_resolver("len", _len, replace=True)
OmegaConf.register_resolver("parents_width", _parents_width, replace=True)


class ConfigError(ValueError):
    """A user mistake in a config or an override; the message names the key and the fix."""


def available(group: str) -> list[str]:
    folder = EXPERIMENT_DIR if group == "experiment" else CONFIG_DIR / group
    return sorted(p.stem for p in folder.glob("*.yaml"))


def _closest(word: str, candidates: Iterable[str]) -> str | None:
    match = difflib.get_close_matches(word, list(candidates), n=1, cutoff=0.5)
    return match[0] if match else None


def _did_you_mean(word: str, candidates: Iterable[str]) -> str:
    best = _closest(word, candidates)
    return f" Did you mean '{best}'?" if best else ""


def _load_yaml(path: Path) -> DictConfig:
    try:
        cfg = OmegaConf.load(path)
    except yaml.YAMLError as err:
        raise ConfigError(f"{path} is not valid YAML: {err}") from None
    if not isinstance(cfg, DictConfig):
        raise ConfigError(f"{path} must hold a mapping at its top level")
    return cfg


def _load_option(group: str, option: str, seen: tuple[str, ...] = ()) -> DictConfig:
    """``configs/<group>/<option>.yaml``; an option may start from another of its group with ``_base_: name``."""
    path = CONFIG_DIR / group / f"{option}.yaml"
    if not path.is_file():
        raise ConfigError(
            f"No '{option}' in config group '{group}'.{_did_you_mean(option, available(group))} "
            f"Available: {', '.join(available(group))}."
        )
    cfg = _load_yaml(path)
    base = cfg.pop("_base_", None)
    if base is None:
        return cfg
    if base in seen:
        raise ConfigError(f"{path}: '_base_' chain loops through '{base}'.")
    parent = _load_option(group, str(base), (*seen, option))
    return _merge_checked(parent, cfg, f"set in {group}/{option}.yaml")


def _all_paths(node: Any, prefix: str = "") -> list[str]:
    if not isinstance(node, DictConfig):
        return []
    out = []
    for key in node.keys():
        path = f"{prefix}{key}"
        out.append(path)
        out += _all_paths(node._get_node(key), path + ".")
    return out


def _unknown_key_error(path: str, parent: DictConfig, root: DictConfig, source: str) -> ConfigError:
    key = path.rsplit(".", 1)[-1]
    parent_path = path.rsplit(".", 1)[0] if "." in path else ""
    siblings = [str(k) for k in parent.keys()]
    best = _closest(key, siblings)
    if best is not None:
        best = f"{parent_path}.{best}" if parent_path else best
    else:
        best = _closest(path, _all_paths(root))
    hint = f" Did you mean '{best}'?" if best else ""
    where = f"under '{parent_path}'" if parent_path else "at the top level"
    return ConfigError(
        f"Unknown config key '{path}' ({source}).{hint} Valid keys {where}: {', '.join(sorted(siblings))}. "
        f"Use '+{path}=...' to add a new key on purpose."
    )


def _check_known(update: DictConfig, target: DictConfig, root: DictConfig, source: str, prefix: str = "") -> None:
    """Raise if ``update`` sets a key that ``target`` does not have (recursively)."""
    for key in update.keys():
        path = f"{prefix}{key}"
        if key not in target:
            raise _unknown_key_error(path, target, root, source)
        new, old = update._get_node(key), target._get_node(key)
        if isinstance(new, DictConfig) and isinstance(old, DictConfig):
            if "_target_" in new and new.get("_target_") != old.get("_target_"):
                continue
            _check_known(new, old, root, source, path + ".")


def _merge_checked(cfg: DictConfig, update: DictConfig, source: str) -> DictConfig:
    _check_known(update, cfg, cfg, source)
    replaced = _replaced_targets(update, cfg)
    for path in replaced:
        OmegaConf.update(cfg, path, None, force_add=True)
    return OmegaConf.merge(cfg, update)


def _replaced_targets(update: DictConfig, target: DictConfig, prefix: str = "") -> list[str]:
    """Paths whose mapping gets a new ``_target_``: they are replaced whole, not merged key by key."""
    out = []
    for key in update.keys():
        new, old = update._get_node(key), target._get_node(key) if key in target else None
        if isinstance(new, DictConfig) and isinstance(old, DictConfig):
            if "_target_" in new and new.get("_target_") != old.get("_target_"):
                out.append(f"{prefix}{key}")
            else:
                out += _replaced_targets(new, old, f"{prefix}{key}.")
    return out


def _parse_overrides(overrides: Sequence[str]) -> tuple[dict[str, str], list[str], list[str]]:
    """Split ``key=value`` arguments into group switches, checked overrides and ``+key`` additions."""
    groups: dict[str, str] = {}
    checked: list[str] = []
    added: list[str] = []
    for arg in overrides:
        arg = arg.removeprefix("--")
        if "=" not in arg:
            raise ConfigError(f"Override '{arg}' is not of the form key=value.")
        key, value = arg.split("=", 1)
        if key.startswith("+"):
            added.append(f"{key[1:]}={value}")
        elif key in GROUPS:
            if value not in available(key):
                raise ConfigError(
                    f"No '{value}' in config group '{key}'.{_did_you_mean(value, available(key))} "
                    f"Available: {', '.join(available(key))}."
                )
            groups[key] = value
        else:
            checked.append(f"{key}={value}")
    return groups, checked, added


def _load_experiment(name: str, seen: tuple[str, ...] = ()) -> tuple[Path, DictConfig, DictConfig]:
    """(path, group choices, body) of an experiment; ``extends: other`` starts from another experiment."""
    path = EXPERIMENT_DIR / f"{name}.yaml"
    if not path.is_file():
        raise ConfigError(
            f"No experiment named '{name}'.{_did_you_mean(name, available('experiment'))} "
            f"Experiments: {', '.join(available('experiment'))}."
        )
    body = _load_yaml(path)
    defaults = body.pop("defaults", OmegaConf.create({}))
    parent = body.pop("extends", None)
    if not isinstance(defaults, DictConfig):
        raise ConfigError(f"{path}: 'defaults' must map group -> option, e.g. {{model: ifcvae}}")
    unknown = [g for g in defaults.keys() if g not in GROUPS]
    if unknown:
        raise ConfigError(f"{path}: unknown config group '{unknown[0]}'.{_did_you_mean(unknown[0], GROUPS)}")
    if parent is None:
        return path, defaults, body
    if parent in seen:
        raise ConfigError(f"{path}: 'extends' chain loops through '{parent}'.")
    _, parent_defaults, parent_body = _load_experiment(str(parent), (*seen, name))
    return path, OmegaConf.merge(parent_defaults, defaults), OmegaConf.merge(parent_body, body)


def compose(experiment: str, overrides: Sequence[str] = ()) -> DictConfig:
    """The resolved config of ``experiment`` with command-line ``overrides`` applied."""
    exp_path, defaults, body = _load_experiment(experiment)
    group_switch, checked, added = _parse_overrides(overrides)

    cfg = _load_yaml(CONFIG_DIR / "base.yaml")
    for group in GROUPS:
        option = group_switch.get(group, defaults.get(group))
        if option is None:
            raise ConfigError(f"{exp_path}: no option chosen for config group '{group}'.")
        cfg[group] = _load_option(group, str(option))
        cfg.choices[group] = str(option)
    cfg.name = experiment
    cfg = _merge_checked(cfg, body, f"set in {exp_path.name}")
    return apply_overrides(cfg, checked, added)


def apply_overrides(cfg: DictConfig, checked: Sequence[str], added: Sequence[str] = ()) -> DictConfig:
    if checked:
        cfg = _merge_checked(cfg, OmegaConf.from_dotlist(list(checked)), "from the command line")
    if added:
        cfg = OmegaConf.merge(cfg, OmegaConf.from_dotlist(list(added)))
    try:
        OmegaConf.resolve(cfg)
    except Exception as err:
        raise ConfigError(f"Could not resolve the config: {err}") from None
    return cfg


def override_saved(cfg: DictConfig, overrides: Sequence[str]) -> DictConfig:
    """Apply command-line overrides to a saved (already resolved) run config, e.g. when resuming."""
    groups, checked, added = _parse_overrides(overrides)
    if groups:
        raise ConfigError(f"Cannot switch config groups ({', '.join(groups)}) when resuming a run.")
    return apply_overrides(cfg, checked, added)


# -- instantiation --------------------------------------------------------------------------------------
def _import(target: str, path: str):
    module_name, _, attr = target.rpartition(".")
    try:
        return getattr(importlib.import_module(module_name), attr)
    except (ImportError, AttributeError, ValueError):
        raise ConfigError(f"'{path}._target_' = '{target}' cannot be imported; check the module path.") from None


def _check_signature(fn, kwargs: dict[str, Any], path: str, target: str) -> None:
    try:
        sig = inspect.signature(fn)
    except (TypeError, ValueError):
        return
    params = sig.parameters
    if any(p.kind is inspect.Parameter.VAR_KEYWORD for p in params.values()):
        return
    for key in kwargs:
        if key not in params:
            where = f"{path}.{key}" if path else key
            raise ConfigError(
                f"Config key '{where}' is not a parameter of {target}.{_did_you_mean(key, params)} "
                f"Parameters: {', '.join(p for p in params if p != 'self')}."
            )


def instantiate(node: Any, path: str = "", **kwargs: Any) -> Any:
    """Build ``node``: mappings with ``_target_`` become objects (``_partial_: true`` -> functools.partial),
    nested ones first; other mappings and lists are returned as plain containers with their items built.

    Keys of a ``_target_`` mapping that start with an underscore are config-only variables (e.g. ``_width``,
    shared by a model's networks through interpolation): they are not passed to the target."""
    if isinstance(node, (DictConfig, ListConfig)):
        node = OmegaConf.to_container(node, resolve=True)
    if isinstance(node, list):
        return [instantiate(v, f"{path}[{i}]") for i, v in enumerate(node)]
    if not isinstance(node, dict):
        return node
    if "_target_" not in node:
        return {k: instantiate(v, f"{path}.{k}" if path else k) for k, v in node.items()}
    target = node["_target_"]
    partial = bool(node.get("_partial_", False))
    args = {
        k: instantiate(v, f"{path}.{k}" if path else k) for k, v in node.items() if not k.startswith("_")
    }
    args.update(kwargs)
    fn = _import(target, path)
    _check_signature(fn, args, path, target)
    if partial:
        return functools.partial(fn, **args)
    return fn(**args)
