"""Model cards (Jinja templates in ``model_cards/`` and ``diffusers_stages/model_cards/``) and Hub upload."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Union

from huggingface_hub import HfApi, ModelCard, ModelCardData

MODEL_CARDS_DIR = Path(__file__).resolve().parents[1] / "model_cards"
PACKAGE_MODEL_CARDS_DIR = Path(__file__).resolve().parent / "model_cards"
# Tags a template always carries (besides ``diffusers``).
TEMPLATE_TAGS = {"deme_merged.md": ["decouple-then-merge", "lora"]}
REQUIRED_FILES = ("model_index.json", "README.md")


def render_model_card(
    template: Union[str, os.PathLike] = "deme_merged.md",
    base_model: str | None = None,
    tags: list[str] | None = None,
    license: str | None = None,
    pipeline_tag: str | None = None,
    **fields,
) -> ModelCard:
    r"""
    Render a model card from a Jinja template (a file in ``model_cards/`` by name, or any path) with
    `huggingface_hub.ModelCard.from_template`; the YAML metadata carries ``library_name: diffusers``, the base model
    and the tags.

    Args:
        template (`str` or `os.PathLike`, defaults to ``"deme_merged.md"``): Template file name or path.
        base_model (`str`, *optional*): The pretrained model the adapters were trained on.
        tags (`list[str]`, *optional*): Hub tags (``diffusers`` and the template's `TEMPLATE_TAGS` are always added).
        license (`str`, *optional*): The license identifier.
        pipeline_tag (`str`, *optional*): E.g. ``"text-to-image"`` or ``"unconditional-image-generation"``.
        **fields: Template variables (stages, merge weights, training settings, metrics, ...).
    """
    candidates = [Path(template), MODEL_CARDS_DIR / template, PACKAGE_MODEL_CARDS_DIR / template]
    path = next((p for p in candidates if p.is_file()), None)
    if path is None:
        names = sorted(p.name for d in (MODEL_CARDS_DIR, PACKAGE_MODEL_CARDS_DIR) for p in d.glob("*.md"))
        raise ValueError(f"`template` must be a file or one of {names}.")
    all_tags = list(dict.fromkeys(["diffusers", *TEMPLATE_TAGS.get(path.name, []), *(tags or [])]))
    data = ModelCardData(
        library_name="diffusers", base_model=base_model, tags=all_tags, license=license, pipeline_tag=pipeline_tag
    )
    return ModelCard.from_template(data, template_path=str(path), base_model=base_model, **fields)


def check_upload_folder(folder: Union[str, os.PathLike]) -> list[str]:
    """
    Check that ``folder`` is a complete diffusers pipeline folder for the Hub (``model_index.json``, a ``README.md``
    model card with YAML metadata, safetensors weights for every component with weights, no pickles); return its
    files (relative paths) or raise a `ValueError` naming what is missing.
    """
    root = Path(folder)
    files = sorted(p.relative_to(root).as_posix() for p in root.rglob("*") if p.is_file())
    missing = [f for f in REQUIRED_FILES if f not in files]
    if missing:
        raise ValueError(f"Upload folder {root} is missing {missing}.")
    if not (root / "README.md").read_text().startswith("---"):
        raise ValueError(f"{root}/README.md has no YAML metadata header.")
    pickles = [f for f in files if f.endswith((".bin", ".pt", ".pth", ".ckpt", ".pkl"))]
    if pickles:
        raise ValueError(f"Upload folder {root} holds pickled weights {pickles}; save with safetensors.")
    for sub in sorted({f.split("/")[0] for f in files if "/" in f}):
        if (root / sub / "config.json").is_file() and not any(
            f.startswith(f"{sub}/") and f.endswith(".safetensors") for f in files
        ):
            raise ValueError(f"Component `{sub}` of {root} has a config but no safetensors weights.")
    return files


def push_to_hub(
    folder: Union[str, os.PathLike],
    repo_id: str,
    token: str | None = None,
    private: bool = False,
    commit_message: str = "Upload Decouple-then-Merge model",
    endpoint: str | None = None,
) -> str:
    r"""
    Check ``folder`` (`check_upload_folder`), create the model repo if needed and upload the folder in one commit.
    Returns the commit URL.

    Args:
        folder (`str` or `os.PathLike`): The merged pipeline folder with its model card.
        repo_id (`str`): ``"user/name"`` on the Hub.
        token (`str`, *optional*): A write token (defaults to the logged-in one).
        private (`bool`, defaults to `False`): Create the repo private.
        commit_message (`str`): The commit message.
        endpoint (`str`, *optional*): Another Hub endpoint (e.g. a local test server).
    """
    check_upload_folder(folder)
    api = HfApi(endpoint=endpoint, token=token)
    api.create_repo(repo_id, private=private, exist_ok=True, repo_type="model")
    info = api.upload_folder(repo_id=repo_id, folder_path=os.fspath(folder), commit_message=commit_message)
    return str(info.commit_url)


def push_folder_to_hub(
    folder,
    repo_id: str,
    token: str | None = None,
    private: bool = False,
    ignore_patterns: list[str] | None = None,
    endpoint: str | None = None,
) -> str:
    """Create ``repo_id`` if needed and upload ``folder`` (model card included, ``ignore_patterns`` skipped, e.g.
    training checkpoints); returns the commit URL."""
    api = HfApi(endpoint=endpoint, token=token)
    api.create_repo(repo_id, private=private, exist_ok=True)
    info = api.upload_folder(
        repo_id=repo_id,
        folder_path=str(folder),
        ignore_patterns=ignore_patterns,
        commit_message="Upload with diffusers-stages",
    )
    return str(info)
