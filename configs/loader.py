"""Compose experiment configs and build objects from ``_target_`` entries.

Merge order (later wins): ``configs/base.yaml`` -> the experiment's group choices (``configs/<group>/<option>.yaml``
stored under the key ``<group>``) -> the experiment body -> the command-line dotlist.

The base and the group files define the schema. The experiment body and the command line may only set keys that
already exist; anything else fails before any work with the key's full path and the closest valid key. Two escape
hatches keep this from being a cage:

* ``group=option`` on the command line switches a group (``logger=csv``);
* ``+key=value`` adds a key that the schema does not have, and a mapping whose ``_target_`` differs from the
  one it replaces is taken whole (its keys are then checked against the new target's signature when built).

``check_config`` then checks every ``_target_`` mapping against its target's signature, names and types, before
anything is built: ``model.lr=abc`` fails naming the key and the type that ``lr`` is declared with. This module
imports neither torch nor Lightning at module level, so that composing (and a misspelt key) takes a fraction of a
second; ``check_config`` imports the targets it checks.
"""

from __future__ import annotations

import collections.abc as abc
import difflib
import functools
import importlib
import inspect
import os
import types
import typing
from collections.abc import Iterable, Sequence
from pathlib import Path, PurePath
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
    if option not in available(group):  # exact stems only: 'model=../data/celeba' is not an option
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
    if name not in available("experiment"):  # exact stems only: '../configs/base' is not an experiment
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
        # OmegaConf's messages run over several lines (full_key, object_type): keep the first, name the key.
        where = f" '{err.full_key}'" if getattr(err, "full_key", None) else ""
        raise ConfigError(f"Could not resolve the config{where}: {str(err).splitlines()[0]}") from None
    if "run_id" in cfg:
        check_run_id(cfg.run_id)
    return cfg


RESERVED_RUN_IDS = ("latest", ".", "..")


def check_run_id(run_id: Any) -> None:
    """A run id names one folder inside ``<runs_dir>/<experiment>/``: a path (``../../x``, ``/abs``) would put the
    run, and the ``latest`` link next to it, anywhere on disk."""
    if run_id is None:
        return
    text = str(run_id)
    if not text or text in RESERVED_RUN_IDS or text.startswith(".") or any(c in text for c in "/\\\0"):
        raise ConfigError(
            f"run_id={text!r} is not a plain folder name: a run is always written to "
            f"<paths.runs_dir>/<experiment>/<run_id>/. Use a name without '/' or a leading '.' (not 'latest'), "
            f"and set paths.runs_dir to keep runs elsewhere."
        )


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
    try:
        return fn(**args)
    except ConfigError:
        raise
    except (ValueError, TypeError) as err:
        # Constructors validate their arguments with ValueError (a negative batch size, an unknown attribute,
        # an image size the networks cannot take); say which config entry it was.
        raise ConfigError(f"'{path or target}' ({target}): {err}") from err


# -- checking a config against the signatures it will be built with -------------------------------------
def check_config(node: Any, path: str = "") -> None:
    """Check every ``_target_`` mapping in ``node`` before anything is built: each key must be a parameter of
    its target (``_check_signature``) and each plain value must fit the parameter's annotation (a str where a
    float is declared fails here, naming the key and the type, instead of deep inside an optimizer).

    Annotations that cannot be evaluated, and classes other than the builtin scalars and containers, are not
    judged: the check may let a wrong value through, it never rejects one the target declares it accepts."""
    if isinstance(node, DictConfig | ListConfig):
        node = OmegaConf.to_container(node, resolve=True)
    if isinstance(node, list):
        for i, v in enumerate(node):
            check_config(v, f"{path}[{i}]")
        return
    if not isinstance(node, dict):
        return
    if "_target_" not in node:
        for k, v in node.items():
            check_config(v, f"{path}.{k}" if path else str(k))
        return
    target = node["_target_"]
    fn = _import(target, path)
    args = {k: v for k, v in node.items() if not str(k).startswith("_")}
    _check_signature(fn, args, path, target)
    params, hints = _parameters(fn)
    for key, value in args.items():
        where = f"{path}.{key}" if path else key
        if _has_target(value):
            check_config(value, where)
            continue
        param = params.get(key)
        if param is None or key not in hints:
            continue
        if value is None and param.default is None:  # `x: int = None`: None is what the target expects
            continue
        if not _conforms(value, hints[key]):
            owner = getattr(fn, "__qualname__", target)
            raise ConfigError(
                f"Config value '{where}' = {value!r} is {_describe_value(value)}, but {owner} declares "
                f"'{key}' as {_describe_type(hints[key])}. Give {where} a value of that type."
            )


def _has_target(value: Any) -> bool:
    if isinstance(value, dict):
        return "_target_" in value or any(_has_target(v) for v in value.values())
    if isinstance(value, list):
        return any(_has_target(v) for v in value)
    return False


def _parameters(fn: Any) -> tuple[dict[str, inspect.Parameter], dict[str, Any]]:
    """(parameters, evaluable annotations) of a callable or of a class's constructor."""
    try:
        params = dict(inspect.signature(fn).parameters)
    except (TypeError, ValueError):
        return {}, {}
    init = fn.__init__ if isinstance(fn, type) else fn
    # A class may list in its signature options its constructor takes as **kwargs (the fine-tuned HVAE, the
    # image-file DataModules), with their types: those annotations count too.
    listed = {name: p.annotation for name, p in params.items()
              if p.annotation is not inspect.Parameter.empty and not isinstance(p.annotation, str)}
    try:
        return params, {**listed, **typing.get_type_hints(init)}
    except Exception:
        # One unevaluable annotation (a name imported only for type checkers) must not hide the others.
        namespace = getattr(inspect.unwrap(init), "__globals__", {})
        hints = {}
        for name, ann in getattr(init, "__annotations__", {}).items():
            if isinstance(ann, str):
                try:
                    ann = eval(ann, namespace)  # the module's own annotation text, as get_type_hints does
                except Exception:
                    continue
            hints[name] = ann
        return params, {**listed, **hints}


_SEQUENCES = (list, tuple, set, frozenset, abc.Sequence, abc.MutableSequence, abc.Iterable, abc.Collection,
              abc.Set, abc.MutableSet)
_MAPPINGS = (dict, abc.Mapping, abc.MutableMapping)


def _conforms(value: Any, hint: Any) -> bool:
    """Whether a plain config value (None, bool, int, float, str, list, dict) can be passed as ``hint``."""
    if hint is Any or hint is inspect.Parameter.empty or isinstance(hint, typing.TypeVar | str):
        return True
    if hint is None or hint is type(None):
        return value is None
    origin, args = typing.get_origin(hint), typing.get_args(hint)
    if origin is typing.Union or origin is types.UnionType:
        return any(_conforms(value, a) for a in args)
    if origin is typing.Literal:
        return any(value == a and type(value) is type(a) for a in args)
    if origin is typing.Annotated:
        return _conforms(value, args[0])
    if origin is not None:
        if origin in _SEQUENCES:
            if not isinstance(value, list | tuple):
                return False
            if origin is tuple and args and args[-1] is not Ellipsis:
                return len(value) == len(args) and all(_conforms(v, a) for v, a in zip(value, args, strict=True))
            return not args or all(_conforms(v, args[0]) for v in value)
        if origin in _MAPPINGS:
            return isinstance(value, dict) and (len(args) < 2 or all(_conforms(v, args[1]) for v in value.values()))
        if origin is abc.Callable:
            return callable(value)
        return True
    if hint is bool:
        return isinstance(value, bool)
    if hint is int:
        return isinstance(value, int) and not isinstance(value, bool)
    if hint is float:
        return isinstance(value, int | float) and not isinstance(value, bool)
    if hint is str:
        return isinstance(value, str)
    if isinstance(hint, type) and issubclass(hint, PurePath | os.PathLike):
        return isinstance(value, str)
    if hint in _SEQUENCES:
        return isinstance(value, list | tuple)
    if hint in _MAPPINGS:
        return isinstance(value, dict)
    if hint is abc.Callable:
        return callable(value)
    return True  # any other class: not ours to judge from a plain value


def _describe_value(value: Any) -> str:
    if value is None:
        return "null"
    return {bool: "a bool", int: "an int", float: "a float", str: "a string", list: "a list",
            dict: "a mapping"}.get(type(value), type(value).__name__)


def _describe_type(hint: Any) -> str:
    if hint is None or hint is type(None):
        return "null"
    origin, args = typing.get_origin(hint), typing.get_args(hint)
    if origin is typing.Union or origin is types.UnionType:
        return " or ".join(dict.fromkeys(_describe_type(a) for a in args))
    if origin is typing.Literal:
        return "one of " + ", ".join(repr(a) for a in args)
    if origin is typing.Annotated:
        return _describe_type(args[0])
    if origin in _SEQUENCES:
        if origin is tuple and args and args[-1] is not Ellipsis:
            return f"a list of {len(args)} ({', '.join(_describe_type(a) for a in args)})"
        return f"a list of {_describe_type(args[0])}" if args else "a list"
    if origin in _MAPPINGS:
        return f"a mapping to {_describe_type(args[1])}" if len(args) == 2 else "a mapping"
    if isinstance(hint, type) and issubclass(hint, PurePath | os.PathLike):
        return "a path"
    return getattr(hint, "__name__", str(hint)).replace("NoneType", "null")
