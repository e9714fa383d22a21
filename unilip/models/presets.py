"""The presets: where the Hydra configs are (`CONF_DIR`), composing them as train.py and eval.py do, and the
tokenizer presets of conf/model/. (A trained tokenizer in any form: `unilip.pretrained.load_tokenizer`.)"""

from __future__ import annotations

from pathlib import Path

from omegaconf import OmegaConf

from unilip.models.tokenizer import TokenizerConfig


def _conf_dir() -> Path:
    """The Hydra configs: `unilip/conf` in an installed package (pyproject maps the repository's conf/
    there), else the repository's top-level conf/ beside the package (a checkout, or an editable install)."""
    package = Path(__file__).resolve().parents[1]
    installed = package / "conf"
    return installed if installed.is_dir() else package.parent / "conf"


CONF_DIR = _conf_dir()


def compose_config(name: str, overrides: list[str]):
    """Compose `conf/<name>.yaml` with command-line style overrides, as `python train.py` / `eval.py` would
    (without Hydra's run-time keys: give `run_dir` / `out_dir` explicitly)."""
    from hydra import compose, initialize_config_dir

    with initialize_config_dir(config_dir=str(CONF_DIR), version_base="1.3"):
        return compose(config_name=name, overrides=overrides)


def tokenizer_preset(name: str) -> TokenizerConfig:
    """The `TokenizerConfig` of a preset in `conf/model/` (`tiny`, `unilip_1b`, `unilip_2b`) or a YAML path."""
    path = Path(name)
    if path.suffix not in (".yaml", ".yml"):
        path = CONF_DIR / "model" / f"{name}.yaml"
    if not path.exists():
        available = sorted(p.stem for p in (CONF_DIR / "model").glob("*.yaml")) if CONF_DIR.exists() else []
        raise FileNotFoundError(f"no tokenizer preset '{name}' ({path} missing); available: {available}")
    node = OmegaConf.to_container(OmegaConf.load(path).config, resolve=True)
    node.pop("_target_", None)
    node.pop("_convert_", None)
    return TokenizerConfig(**node)
