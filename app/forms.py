"""Pure helpers of the 'launch a run' form: choices from the registries, parameter values from
text, and the run config they make. No Streamlit here."""

from __future__ import annotations

import json
from typing import Any


def strategies_for(loss: str) -> list[str]:
    """Registered mixing strategies that support ``loss`` ('none' first)."""
    from dml.mixing import list_mixings, supported_pairs

    ok = {m for m, l in supported_pairs() if l == loss}
    names = [m for m in list_mixings() if m in ok]
    return sorted(names, key=lambda m: (m != "none", m))


def parse_param(text: str, default: Any) -> Any:
    """A parameter typed into a text box, read in the type of its default (JSON otherwise)."""
    text = str(text).strip()
    if isinstance(default, bool):
        if text.lower() in ("true", "1", "yes", "on"):
            return True
        if text.lower() in ("false", "0", "no", "off"):
            return False
        raise ValueError(f"expected true or false, got {text!r}")
    if isinstance(default, int):
        return int(float(text)) if float(text).is_integer() else float(text)
    if isinstance(default, float):
        return float(text)
    if text.lower() in ("none", "null", ""):
        return None
    try:
        return json.loads(text)
    except json.JSONDecodeError:
        return text


def changed_params(values: dict[str, Any], defaults: dict[str, Any]) -> dict[str, Any]:
    """Only the parameters that differ from their defaults (the config stays minimal)."""
    return {k: v for k, v in values.items() if k not in defaults or v != defaults[k]}


def build_config(dataset: str, loss: str, strategy: str, loss_params: dict[str, Any],
                 mixing_params: dict[str, Any], *, epochs: int, seed: int,
                 name: str | None = None, data_root: str | None = None,
                 extra: list[str] | None = None) -> dict[str, Any]:
    """The resolved, validated run config (dict) of the form's choices; ``extra`` are
    ``section.key=value`` overrides. Raises ConfigError / ValueError with a clear message."""
    from dml.config import RunConfig, validate
    from dml.mixing import build_mixing

    overrides = [f"data.name={dataset}", f"loss.name={loss}", f"mixing.name={strategy}",
                 f"train.epochs={int(epochs)}", f"train.seed={int(seed)}"]
    if name:
        overrides.append(f"name={name}")
    if data_root:
        overrides.append(f"data.root={data_root}")
    cfg = RunConfig().with_overrides(overrides + [e for e in (extra or []) if e.strip()])
    cfg.loss.params = dict(loss_params)
    cfg.mixing.params = dict(mixing_params)
    validate(cfg)
    build_mixing(strategy, loss, **mixing_params)   # unsupported pair / bad parameter -> error
    from dml.losses import build_loss
    build_loss(loss, num_classes=2, embedding_dim=cfg.model.embedding_dim, **loss_params)
    return cfg.to_dict()
