"""YAML -> omegaconf -> typed dataclasses. Unknown keys are errors that name
the key and the file."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import fields
from pathlib import Path
from typing import Any

from mixattn.model import ModelConfig


class ConfigError(ValueError):
    pass


def load_yaml(path: str | Path, overrides: Sequence[str] = ()) -> dict[str, Any]:
    """Load ``path`` and apply ``key=value`` dot-list overrides; return plain data."""
    from omegaconf import OmegaConf
    from omegaconf.errors import OmegaConfBaseException

    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"config file {str(path)!r} does not exist")
    bad = [o for o in overrides if "=" not in o]
    if bad:
        raise ConfigError(f"override {bad[0]!r} is not of the form key=value")
    try:
        cfg = _load_with_bases(path, ())
        if overrides:
            cfg = OmegaConf.merge(cfg, OmegaConf.from_dotlist(list(overrides)))
        data = OmegaConf.to_container(cfg, resolve=True)
    except ConfigError:
        raise
    except OmegaConfBaseException as e:
        raise ConfigError(f"{path}: {e}") from None
    except Exception as e:  # yaml.YAMLError and friends
        raise ConfigError(f"{path}: cannot parse YAML: {e}") from None
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: expected a mapping at the top level, got {type(data).__name__}")
    return data


def _load_with_bases(path: Path, chain: tuple[Path, ...]):
    """``path`` as an omegaconf node, merged over the file its ``base:`` key
    names (relative to ``path``; that file may have a base too). Mappings
    merge key by key, anything else (lists included) is replaced; ``${...}``
    interpolations resolve after every merge, so a base's
    ``save_folder: runs/${run_name}/checkpoints`` takes the recipe's run_name."""
    from omegaconf import DictConfig, OmegaConf

    cfg = OmegaConf.load(path)
    if not isinstance(cfg, DictConfig) or "base" not in cfg:
        return cfg
    base = cfg.pop("base")
    if not isinstance(base, str) or not base:
        raise ConfigError(f"{path}: base must be the path of one YAML file (relative to this one), got {base!r}")
    target = (path.parent / base).resolve()
    if target in chain or target == path.resolve():
        loop = " -> ".join(str(c) for c in (*chain, path.resolve(), target))
        raise ConfigError(f"{path}: base {base!r} makes a loop: {loop}")
    if not target.is_file():
        raise ConfigError(f"{path}: base {base!r} does not exist (looked for {target})")
    return OmegaConf.merge(_load_with_bases(target, (*chain, path.resolve())), cfg)


def model_config(data: dict[str, Any], source: str = "<config>") -> ModelConfig:
    """Build a ModelConfig from a mapping; unknown keys name ``source``."""
    known = {f.name for f in fields(ModelConfig) if f.init}
    unknown = sorted(set(data) - known)
    if unknown:
        raise ConfigError(f"{source}: unknown key(s) {', '.join('model.' + k for k in unknown)}; valid model keys: {', '.join(sorted(known))}")
    try:
        return ModelConfig(**data)
    except ValueError as e:
        raise ConfigError(f"{source}: {e}") from None


def load_model_config(path: str | Path, overrides: Sequence[str] = ()) -> ModelConfig:
    """The ``model:`` section of a recipe (or a file that is only a model section)."""
    data = load_yaml(path, overrides)
    section = data["model"] if "model" in data else data
    if not isinstance(section, dict):
        raise ConfigError(f"{path}: 'model' must be a mapping")
    return model_config(section, str(path))


# -- credentials never leave the process --------------------------------------------

_SECRET_PARTS = {"key", "secret", "token", "password", "passwd", "credential", "credentials", "apikey", "sig",
                 "signature", "auth", "authorization"}
REDACTED = "***"


def _is_secret_name(name: str) -> bool:
    import re

    return any(part in _SECRET_PARTS for part in re.split(r"[^a-z0-9]+", name.lower()))


def _redact_url(text: str) -> str:
    from urllib.parse import parse_qsl, urlencode, urlsplit, urlunsplit

    if "://" not in text:
        return text
    try:
        u = urlsplit(text)
    except ValueError:
        return text
    netloc = u.netloc
    if "@" in netloc:  # scheme://user:password@host
        userinfo, host = netloc.rsplit("@", 1)
        netloc = (userinfo.split(":", 1)[0] + ":" + REDACTED if ":" in userinfo else REDACTED) + "@" + host
    query = u.query
    if query:
        pairs = parse_qsl(query, keep_blank_values=True)
        query = urlencode([(k, REDACTED if _is_secret_name(k) else v) for k, v in pairs], safe="*")
    return urlunsplit((u.scheme, netloc, u.path, query, u.fragment))


def redact(obj: Any) -> Any:
    """A copy of plain config data with credentials replaced by ``***``: the
    values of keys named like secrets (``*_key``, ``token``, ``password``, ...),
    passwords in URLs (``scheme://user:password@host``) and signed-URL query
    parameters (``X-Amz-Signature``, ``sig``, ...). What the saved config and
    the logged hyperparameters get; secrets belong in the environment."""
    if isinstance(obj, dict):
        return {k: (REDACTED if _is_secret_name(str(k)) and v not in (None, "") and not isinstance(v, (dict, list, bool))
                    else redact(v)) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return type(obj)(redact(v) for v in obj)
    if isinstance(obj, str):
        return _redact_url(obj)
    return obj
